"""Checkpoints through `run_training`: exact auto-resume, restoring onto another mesh or fewer
devices, skipping a corrupt latest step, keep-K, the data-iterator state, NaN divergence, and
`load_params_for_export`.

The tiny preset on 8 fake CPU devices. A module fixture trains the reference runs once:
  U   uninterrupted, 6 steps on mesh (data=2, fsdp=4), checkpoints at 3 and 6;
  S   the same config in another dir, stopped after 3 steps (checkpoint every step, keep 2),
      a snapshot of its checkpoints taken, then resumed by a second call with the same config.
Restore-only checks use `run_training(..., stop_after=0)`, which restores and returns without
compiling a train step.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from xinst_jax.checkpoint import file_digest, load_params_for_export
from xinst_jax.config import ConfigError, load_config
from xinst_jax.data.synthetic import SyntheticSource
from xinst_jax.model.llama import logical_axes, param_shapes
from xinst_jax.sharding import make_mesh, parse_rules, tree_shardings
from xinst_jax.train.loop import TrainingDiverged, run_training

# A failed orbax restore (the corrupt-checkpoint tests) leaves read coroutines that are garbage
# collected un-awaited, whenever that happens: noise from orbax, not a failure of any test here.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

STEPS = 6
REL_TOL = 1e-5  # other meshes reduce in another order: equal to float32 rounding, not bitwise


def make_cfg(run_dir: Path, mesh=(2, 4), num_devices: int = 0, every: int = 3, keep: int = 5, *extra: str):
    data, fsdp = mesh
    return load_config("tiny_synthetic", overrides=[
        f"run_dir={run_dir}", "model.preset=tiny", f"train.steps={STEPS}", "train.batch_size=8", "train.seq_len=32",
        "train.warmup_steps=0", "train.learning_rate=3e-3", "train.export_at_end=false", "train.log_every=1000",
        "data.source=synthetic", f"checkpoint.every={every}", f"checkpoint.keep={keep}", "checkpoint.resume=true",
        f"mesh.data={data}", f"mesh.fsdp={fsdp}", "mesh.tensor=1", f"mesh.num_devices={num_devices}", *extra])


def ckpt_dir(cfg) -> Path:
    return cfg.resolved_run_dir() / "checkpoints"


def steps_on_disk(cfg) -> list[int]:
    return sorted(int(p.name) for p in ckpt_dir(cfg).iterdir() if p.name.isdigit())


def host(tree):
    """numpy copies (PRNG keys as their raw data)."""
    def one(x):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        return np.asarray(x)

    return jax.tree.map(one, tree)


def assert_bitwise_equal(a, b, what: str = "") -> None:
    fa, fb = jax.tree_util.tree_flatten_with_path(host(a))[0], jax.tree_util.tree_flatten_with_path(host(b))[0]
    assert [p for p, _ in fa] == [p for p, _ in fb], what
    for (path, x), (_, y) in zip(fa, fb):
        name = f"{what}{jax.tree_util.keystr(path)}"
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert np.array_equal(x, y), name


def losses(result) -> list[float]:
    return [h["loss"] for h in result.history]


def copy_checkpoints(src: Path, cfg) -> None:
    shutil.copytree(src, ckpt_dir(cfg))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    out = {}
    out["u_cfg"] = make_cfg(root / "u", every=3, keep=5)
    out["u"] = run_training(out["u_cfg"])
    out["s_cfg"] = make_cfg(root / "s", every=1, keep=2)
    s = run_training(out["s_cfg"], stop_after=3)
    out["s"], out["p3"] = s, host(s.state)
    out["s_steps_after_first_call"] = steps_on_disk(out["s_cfg"])
    out["snapshot"] = root / "snapshot"  # S's checkpoints after 3 steps: {2, 3}
    shutil.copytree(ckpt_dir(out["s_cfg"]), out["snapshot"])
    out["s2"] = run_training(out["s_cfg"])  # the same cfg again: resumes at 3
    return out


# --------------------------------------------------------------------------- resume


def test_auto_resume_is_bitwise_identical(base):
    u, s, s2 = base["u"], base["s"], base["s2"]
    assert u.final_step == STEPS and s.final_step == 3 and s2.final_step == STEPS
    assert [h["step"] for h in s.history] == [1, 2, 3]
    assert [h["step"] for h in s2.history] == [4, 5, 6]  # resumed, not restarted
    assert losses(s) + losses(s2) == losses(u)
    assert_bitwise_equal(s2.state, u.state, "state")
    assert not np.array_equal(base["p3"]["params"]["lm_head"]["kernel"], host(u.state)["params"]["lm_head"]["kernel"])


def test_keep_k(base):
    # every=1, keep=2: after 3 steps only 2 and 3 remain; after the resumed run only 5 and 6.
    assert base["s_steps_after_first_call"] == [2, 3]
    assert steps_on_disk(base["s_cfg"]) == [5, 6]
    assert steps_on_disk(base["u_cfg"]) == [3, 6]


def test_data_iterator_state_saved_and_restored(base, tmp_path):
    saved = json.loads((base["snapshot"] / "3" / "data" / "process_0.json").read_text())
    assert saved == {"index": 3, "process_count": 1}
    final = json.loads((ckpt_dir(base["s_cfg"]) / "6" / "data" / "process_0.json").read_text())
    assert final["index"] == 6

    cfg = make_cfg(tmp_path / "run", every=1, keep=2)
    copy_checkpoints(base["snapshot"], cfg)
    source = SyntheticSource(cfg.data.synthetic, cfg.model.vocab_size, 8, cfg.train.seq_len, cfg.seed)
    assert source.index == 0
    result = run_training(cfg, source=source, stop_after=0)
    assert result.final_step == 3
    assert source.index == 3  # the next batch is the 4th, as in the uninterrupted run


def test_other_process_count_is_a_config_error(base, tmp_path):
    cfg = make_cfg(tmp_path / "run", every=1, keep=2)
    copy_checkpoints(base["snapshot"], cfg)
    path = ckpt_dir(cfg) / "3" / "data" / "process_0.json"
    state = json.loads(path.read_text())
    state["process_count"] = 2
    path.write_text(json.dumps(state))
    path.with_suffix(".sha256").write_text(file_digest(path.read_bytes()))  # as 2 processes would have saved it
    with pytest.raises(ConfigError) as e:
        run_training(cfg, stop_after=0)
    msg = str(e.value)
    assert "saved by 2 processes" in msg and "restoring with 1" in msg, msg
    assert steps_on_disk(cfg) == [2, 3]  # a config problem deletes nothing


def test_changed_model_config_is_a_config_error_and_deletes_nothing(base, tmp_path):
    cfg = make_cfg(tmp_path / "run", (2, 4), 0, 1, 2, "model.mlp_dim=192")
    copy_checkpoints(base["snapshot"], cfg)
    with pytest.raises(ConfigError, match=r"checkpoint step 3 .*shape \(2, 176, 64\) in the checkpoint, \(2, 192, 64\) in this run"):
        run_training(cfg, stop_after=0)
    cfg = make_cfg(tmp_path / "run", (2, 4), 0, 1, 2, "train.clip_grad_norm=0")  # another optimizer tree
    with pytest.raises(ConfigError, match=r"checkpoint step 3 .*another model or optimizer config"):
        run_training(cfg, stop_after=0)
    assert steps_on_disk(cfg) == [2, 3]


# --------------------------------------------------------------------------- other meshes


@pytest.mark.parametrize("mesh, num_devices", [((8, 1), 0), ((1, -1), 4)], ids=["data8_fsdp1", "4_devices"])
def test_restore_onto_other_mesh(base, tmp_path, mesh, num_devices):
    cfg = make_cfg(tmp_path / "run", mesh, num_devices, every=1, keep=2)
    copy_checkpoints(base["snapshot"], cfg)
    restored = run_training(cfg, stop_after=0)
    assert restored.final_step == 3 and restored.history == []
    assert_bitwise_equal(restored.state, base["p3"], "restored")

    n = num_devices or 8
    new_mesh = make_mesh(cfg.mesh)
    want_mesh = {"data": 8, "fsdp": 1, "tensor": 1} if n == 8 else {"data": 1, "fsdp": 4, "tensor": 1}
    assert dict(new_mesh.shape) == want_mesh
    target = tree_shardings(logical_axes(cfg.model), param_shapes(cfg.model), parse_rules(cfg.mesh.rules), new_mesh)
    params = restored.state["params"]
    for (path, x), want in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(target)):
        name = jax.tree_util.keystr(path)
        assert x.sharding.device_set == set(jax.devices()[:n]), name
        assert dict(x.sharding.mesh.shape) == dict(new_mesh.shape), name
        assert x.sharding.is_equivalent_to(want, x.ndim), (name, x.sharding, want)
        if n == 4 and x.size >= 4096:
            assert not x.sharding.is_fully_replicated, name  # really split over fsdp=4
    assert restored.state["params"]["lm_head"]["kernel"].sharding.spec[0] == ("fsdp" if n == 4 else None)

    continued = run_training(cfg)
    assert continued.final_step == STEPS
    assert [h["step"] for h in continued.history] == [4, 5, 6]
    ref = losses(base["u"])[3:]
    rels = [abs(a - b) / abs(b) for a, b in zip(losses(continued), ref)]
    print(f"\n{mesh} x {n} devices, continued from step 3: {losses(continued)} vs uninterrupted {ref} "
          f"(max rel {max(rels):.2e})")
    assert max(rels) <= REL_TOL


# --------------------------------------------------------------------------- corrupt / diverged


def _corrupt(state_dir: Path, how: str) -> Path:
    data_files = sorted((state_dir / "ocdbt.process_0" / "d").iterdir(), key=lambda p: p.stat().st_size)
    victim = data_files[-1]  # the largest array data file
    if how == "truncate_data":
        os.truncate(victim, victim.stat().st_size // 2)
    elif how == "delete_data":
        victim.unlink()
    else:
        victim = state_dir / "_METADATA"
        victim.unlink()
    return victim


@pytest.mark.parametrize("how", ["truncate_data", "delete_data", "delete_metadata"])
def test_corrupt_latest_checkpoint_is_skipped(base, tmp_path, caplog, how):
    # U and S are the same computation: U's step-3 checkpoint holds S's state after 3 steps.
    assert losses(base["u"])[:3] == losses(base["s"])
    cfg = make_cfg(tmp_path / "run", every=3, keep=5)
    copy_checkpoints(ckpt_dir(base["u_cfg"]), cfg)
    _corrupt(ckpt_dir(cfg) / "6" / "state", how)
    with caplog.at_level(logging.WARNING, logger="xinst_jax.checkpoint"):
        restored = run_training(cfg, stop_after=0)
    assert restored.final_step == 3
    assert_bitwise_equal(restored.state, base["p3"], "restored")
    warnings = [r.getMessage() for r in caplog.records
                if r.levelno == logging.WARNING and r.name == "xinst_jax.checkpoint"]
    assert any("checkpoint step 6" in m and "does not restore" in m for m in warnings), warnings
    # The broken step is moved aside (kept for inspection, never deleted), so step 6 can be saved again.
    assert steps_on_disk(cfg) == [3]
    assert (ckpt_dir(cfg) / "6.unrestorable" / "state").is_dir()
    assert any("moved aside to 6.unrestorable" in m for m in warnings), warnings


class NaNAtIndex(SyntheticSource):
    """Synthetic batches, except that batch `bad` has NaN loss weights (so a NaN loss)."""

    def __init__(self, *args, bad: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.bad = bad

    def batch_at(self, index: int):
        batch = super().batch_at(index)
        if index == self.bad:
            batch["loss_weights"] = np.full_like(batch["loss_weights"], np.nan)
        return batch


def test_nan_loss_raises_and_last_good_checkpoint_restores(base, tmp_path):
    cfg = make_cfg(tmp_path / "run", every=2, keep=5)
    source = NaNAtIndex(cfg.data.synthetic, cfg.model.vocab_size, 8, cfg.train.seq_len, cfg.seed, bad=3)
    with pytest.raises(TrainingDiverged) as e:
        run_training(cfg, source=source)
    msg = str(e.value)
    assert "at step 4" in msg and "last good checkpoint is step 2" in msg, msg
    assert steps_on_disk(cfg) == [2]  # the diverged step was never saved

    restored = run_training(cfg, stop_after=0)
    assert restored.final_step == 2
    params = host(restored.state["params"])
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params))
    # the same params as S's step-2 checkpoint (the same data and config up to step 2)
    assert_bitwise_equal(params, load_params_for_export(base["snapshot"] / "2", cfg.model), "step 2 params")


# --------------------------------------------------------------------------- export


def test_load_params_for_export_returns_trained_params(base):
    u_cfg = base["u_cfg"]
    trained = host(base["u"].state["params"])
    for path in (ckpt_dir(u_cfg) / "6", ckpt_dir(u_cfg)):  # a step dir, or the root (latest step)
        params = load_params_for_export(path, u_cfg.model)
        assert_bitwise_equal(params, trained, f"{path}: ")
    step3 = load_params_for_export(ckpt_dir(u_cfg) / "3", u_cfg.model)
    assert_bitwise_equal(step3, base["p3"]["params"], "step 3: ")
    assert not math.isclose(float(np.abs(step3["lm_head"]["kernel"] - trained["lm_head"]["kernel"]).max()), 0.0)


def test_relative_run_dir_checkpoints_and_resumes(tmp_path, monkeypatch):
    """run_dir defaults to the relative runs/<name>; orbax needs absolute paths."""
    monkeypatch.chdir(tmp_path)
    cfg = load_config("tiny_synthetic", overrides=["run_dir=runs/rel", "train.steps=2", "checkpoint.every=1",
                                                    "train.export_at_end=false", "mesh.num_devices=1"])
    assert run_training(cfg).final_step == 2
    assert sorted(p.name for p in (tmp_path / "runs" / "rel" / "checkpoints").iterdir() if p.name.isdigit()) == ["1", "2"]
    cfg = load_config("tiny_synthetic", overrides=["run_dir=runs/rel", "train.steps=3", "checkpoint.every=1",
                                                    "train.export_at_end=false", "mesh.num_devices=1"])
    resumed = run_training(cfg)
    assert resumed.final_step == 3 and [h["step"] for h in resumed.history] == [3]
