"""Checkpoint checksums: a flipped byte in an array data file or in the data-iterator file makes
that step unrestorable (moved aside, the previous step used), a step without checksum files
restores with a warning, and the digests do not depend on the mesh. Readers outside training
(the export_hf job, generate) verify the params they read the same way: a flipped byte is a
one-line error naming the step directory and the array, nothing falls back or moves.

A module fixture trains the reference once: 4 steps of the tiny preset on 2 devices (fsdp=2),
checkpoints at 2 and 4. Each test corrupts a copy of its checkpoints.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from test_checkpoint import assert_bitwise_equal, host
from xinst_jax.checkpoint import CHECKSUMS_FILE, Checkpointer, state_digests
from xinst_jax.config import load_config
from xinst_jax.train.loop import run_training
from xinst_jax.train.program import build_train_program

# A failed orbax restore leaves read coroutines that are collected un-awaited: orbax's noise.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

STEPS, EVERY = 4, 2


def make_cfg(run_dir: Path):
    return load_config("tiny_synthetic", overrides=[
        f"run_dir={run_dir}", "model.preset=tiny", f"train.steps={STEPS}", "train.batch_size=8",
        "train.seq_len=32", "train.warmup_steps=0", "train.learning_rate=3e-3", "train.export_at_end=false",
        "train.log_every=1000", "data.source=synthetic", f"checkpoint.every={EVERY}", "checkpoint.keep=5",
        "checkpoint.resume=true", "mesh.data=1", "mesh.fsdp=2", "mesh.tensor=1", "mesh.num_devices=2"])


def ckpt_dir(cfg) -> Path:
    return cfg.resolved_run_dir() / "checkpoints"


def entries(cfg) -> list[str]:
    return sorted(p.name for p in ckpt_dir(cfg).iterdir())


def flip_byte(path: Path, offset: int, bit: int = 0x01) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= bit
    path.write_bytes(bytes(data))


def array_data_files(step_dir: Path) -> list[Path]:
    """The files orbax wrote array chunks into (OCDBT `d/` files, or zarr chunk files), largest first."""
    skip = {"_METADATA", "_sharding", "manifest.ocdbt", "commit_success.txt"}
    files = [p for p in (step_dir / "state").rglob("*")
             if p.is_file() and p.name not in skip and "array_metadatas" not in p.parts]
    return sorted(files, key=lambda p: p.stat().st_size, reverse=True)


def largest_array_data_file(step_dir: Path) -> Path:
    return array_data_files(step_dir)[0]


def named_leaves(tree) -> dict[str, np.ndarray]:
    """`opt_state/1/0/mu/embed/embedding`: the names the checksums use."""
    def name(path) -> str:
        return "/".join(str(next(getattr(p, a) for a in ("key", "name", "idx") if hasattr(p, a))) for p in path)

    return {name(path): np.asarray(x) for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def checkpoint_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and r.name == "xinst_jax.checkpoint"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    cfg = make_cfg(tmp_path_factory.mktemp("checksum") / "ref")
    result = run_training(cfg)
    assert result.final_step == STEPS
    assert entries(cfg) == ["2", "4"]
    return {"cfg": cfg, "state": host(result.state)}


def copy_of(base, tmp_path) -> object:
    cfg = make_cfg(tmp_path / "run")
    shutil.copytree(ckpt_dir(base["cfg"]), ckpt_dir(cfg))
    return cfg


def test_digests_ignore_the_mesh_and_see_every_bit():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 24)).astype(np.float32)
    tree = {"f32": x, "bf16": x.astype(jnp.bfloat16), "i32": np.arange(7, dtype=np.int32),
            "scalar": np.float32(3.0), "key": jax.random.key(1)}
    on_host = state_digests(tree)
    mesh = jax.make_mesh((2, 4), ("data", "fsdp"))
    for specs in ((P("data", "fsdp"), P("fsdp", None)), (P(None, "data"), P())):
        placed = {**tree, "f32": jax.device_put(x, NamedSharding(mesh, specs[0])),
                  "bf16": jax.device_put(tree["bf16"], NamedSharding(mesh, specs[1]))}
        assert state_digests(placed) == on_host, specs
    # Any single bit, and two sign flips that a plain sum of words would miss.
    for index, bit in ((0, 0x01), (777, 0x80), (x.nbytes - 1, 0x80)):
        y = x.copy()
        y.reshape(-1).view(np.uint8)[index] ^= bit
        assert state_digests({"f32": y})["f32"]["digest"] != on_host["f32"]["digest"], (index, bit)
    y = x.copy()
    y[0, 0], y[3, 5] = -y[0, 0], -y[3, 5]
    assert state_digests({"f32": y})["f32"]["digest"] != on_host["f32"]["digest"]
    swapped = x.copy()
    swapped[0, :2] = swapped[0, 1::-1]  # same values, other places
    assert state_digests({"f32": swapped})["f32"]["digest"] != on_host["f32"]["digest"]


def _reference_digest(x: np.ndarray) -> str:
    """checkpoint.py's documented digest, in numpy: per 32-bit word w at row-major position i,
    k = fmix32(i * golden + seed), v = fmix32(w ^ k); (sum v, sum v * (k | 1)) mod 2^32."""
    def fmix32(h):
        h = h ^ (h >> 16)
        h = h * np.uint64(0x85EBCA6B) & np.uint64(0xFFFFFFFF)
        h = h ^ (h >> 13)
        h = h * np.uint64(0xC2B2AE35) & np.uint64(0xFFFFFFFF)
        return h ^ (h >> 16)

    unsigned = {1: np.uint8, 2: np.uint16, 4: np.uint32}[x.dtype.itemsize]
    words = np.ascontiguousarray(x).reshape(-1).view(unsigned).astype(np.uint64)
    mask = np.uint64(0xFFFFFFFF)
    key = fmix32((np.arange(words.size, dtype=np.uint64) * np.uint64(0x9E3779B9) + np.uint64(0x2545F491)) & mask)
    mixed = fmix32(words ^ key)
    first, second = int(mixed.sum()) % 2**32, int((mixed * (key | np.uint64(1)) & mask).sum()) % 2**32
    return f"{first:08x}{second:08x}"


def test_digests_are_the_documented_formula():
    """The digests saved with every checkpoint are the algorithm DIGEST_ALGORITHM names, whatever
    the computation's shape (one fused reduction now): a checkpoint saved earlier still verifies."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((33, 17)).astype(np.float32)
    tree = {"f32": x, "bf16": np.asarray(x.astype(jnp.bfloat16)), "i32": rng.integers(-9, 9, (5, 2, 3)).astype(np.int32),
            "u8": rng.integers(0, 255, (11,)).astype(np.uint8), "scalar": np.float32(-2.5)}
    digests = state_digests(tree)
    for name, value in tree.items():
        assert digests[name]["digest"] == _reference_digest(np.asarray(value)), name


def test_flipped_byte_in_array_data_moves_the_step_aside_and_resumes(base, tmp_path, caplog):
    cfg = copy_of(base, tmp_path)
    victim = largest_array_data_file(ckpt_dir(cfg) / "4")
    flip_byte(victim, victim.stat().st_size // 2)
    # Without checksums orbax restores this step without complaint, with a wrong value somewhere.
    plain = ocp.PyTreeCheckpointer()
    tree = plain.metadata(ckpt_dir(cfg) / "4" / "state").item_metadata.tree
    silent = plain.restore(ckpt_dir(cfg) / "4" / "state", args=ocp.args.PyTreeRestore(
        restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)))
    want = named_leaves(base["state"])
    wrong = [name for name, x in named_leaves(silent).items() if not np.array_equal(x, want[name])]
    assert len(wrong) == 1, wrong

    with caplog.at_level(logging.WARNING, logger="xinst_jax.checkpoint"):
        resumed = run_training(cfg)
    warnings = checkpoint_warnings(caplog)
    assert any("checkpoint step 4 " in m and f"state array {wrong[0]} does not match its checksum" in m
               and "moved aside to 4.unrestorable" in m for m in warnings), warnings
    assert [h["step"] for h in resumed.history] == [3, 4]  # from step 2
    # Resuming is bitwise exact (test_checkpoint), so a run resumed from the intact step 2 ends
    # with the uninterrupted run's params.
    assert_bitwise_equal(host(resumed.state)["params"], base["state"]["params"], "params")
    assert entries(cfg) == ["2", "4", "4.unrestorable"]  # step 4 saved again, the bad copy kept
    assert (ckpt_dir(cfg) / "4.unrestorable" / "state").is_dir()

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="xinst_jax.checkpoint"):
        assert run_training(cfg, stop_after=0).final_step == 4  # the new step 4 verifies
    assert checkpoint_warnings(caplog) == []


def test_flipped_byte_in_iterator_state_moves_the_step_aside(base, tmp_path, caplog):
    cfg = copy_of(base, tmp_path)
    path = ckpt_dir(cfg) / "4" / "data" / "process_0.json"
    text = path.read_text()
    flip_byte(path, text.index('"index": 4') + len('"index": '))  # '4' -> '5': still valid JSON
    assert json.loads(path.read_text())["index"] == 5
    with caplog.at_level(logging.WARNING, logger="xinst_jax.checkpoint"):
        restored = run_training(cfg, stop_after=0)
    assert restored.final_step == 2
    warnings = checkpoint_warnings(caplog)
    assert any("checkpoint step 4 " in m and "data/process_0.json does not match its checksum" in m
               for m in warnings), warnings
    assert entries(cfg) == ["2", "4.unrestorable"]


def test_step_without_checksum_files_restores_with_a_warning(base, tmp_path, caplog):
    """Checkpoints saved before checksums existed stay usable: restored unverified, said in the log."""
    cfg = copy_of(base, tmp_path)
    (ckpt_dir(cfg) / "4" / "checksums" / CHECKSUMS_FILE).unlink()
    (ckpt_dir(cfg) / "4" / "data" / "process_0.sha256").unlink()
    with caplog.at_level(logging.WARNING, logger="xinst_jax.checkpoint"):
        restored = run_training(cfg, stop_after=0)
    assert restored.final_step == 4
    assert_bitwise_equal(host(restored.state), base["state"], "state")
    warnings = checkpoint_warnings(caplog)
    assert sum("restoring it unverified" in m for m in warnings) == 2, warnings
    assert entries(cfg) == ["2", "4"]


def test_no_step_left_starts_fresh(base, tmp_path, caplog):
    cfg = copy_of(base, tmp_path)
    victim = largest_array_data_file(ckpt_dir(cfg) / "2")
    flip_byte(victim, victim.stat().st_size // 2)
    checksums = ckpt_dir(cfg) / "4" / "checksums" / CHECKSUMS_FILE  # a digest itself damaged
    saved = json.loads(checksums.read_text())
    digest = saved["arrays"]["params/lm_head/kernel"]["digest"]
    saved["arrays"]["params/lm_head/kernel"]["digest"] = digest[:-1] + ("0" if digest[-1] != "0" else "1")
    checksums.write_text(json.dumps(saved))
    checkpointer = Checkpointer(ckpt_dir(cfg), cfg.checkpoint)  # not run_training: no init to compile
    with caplog.at_level(logging.WARNING, logger="xinst_jax.checkpoint"):
        assert checkpointer.restore_latest(build_train_program(cfg).abstract_state) is None
    checkpointer.close()
    warnings = checkpoint_warnings(caplog)
    assert any("checkpoint step 4 " in m and "params/lm_head/kernel does not match" in m for m in warnings), warnings
    assert any("checkpoint step 2 " in m and "does not match its checksum" in m for m in warnings), warnings
    assert any("starting from step 0" in m for m in warnings), warnings
    assert entries(cfg) == ["2.unrestorable", "4.unrestorable"]


# --------------------------------------------------------------------------- readers outside training


def flip_a_params_byte(step_dir: Path, want: dict[str, np.ndarray]) -> str:
    """Flip one byte of the array data so that a params array (not the optimizer state, which
    readers do not read) restores silently wrong; returns that array's name. The data file is
    compressed, and which data file holds the params depends on the order of orbax's async writes,
    so where a params array lies is found by trying, largest file first: flip, restore unverified,
    compare."""
    plain = ocp.PyTreeCheckpointer()
    tree = plain.metadata(step_dir / "state").item_metadata.tree
    args = ocp.args.PyTreeRestore(restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree))
    files = array_data_files(step_dir)
    for victim in files:
        size = victim.stat().st_size
        for offset in range(size // 16, size, max(1, size // 16)):
            flip_byte(victim, offset)
            try:
                silent = named_leaves(plain.restore(step_dir / "state", args=args))
            except Exception:  # noqa: BLE001 - this flip breaks the decoding: try another byte
                silent = {}
            wrong = [name for name, x in silent.items() if name in want and not np.array_equal(x, want[name])]
            if wrong:
                return wrong[0]
            flip_byte(victim, offset)  # back as it was
    raise AssertionError(f"no single flipped byte of {len(files)} data files reached a params array")


def test_readers_refuse_a_corrupt_step_naming_it_and_the_array(base, tmp_path, capsys):
    """An intact checkpoint exports byte for byte what the trained params export to; after a
    flipped byte in the newest step, the export_hf job (through the entry point) and generate
    stop with one line naming the step directory and the array; nothing is moved or rewritten."""
    import importlib

    from xinst_jax.convert.hf import export_hf
    from xinst_jax.infer.job import run_generate
    from xinst_jax.checkpoint import UnreadableCheckpoint

    tpu_run = importlib.import_module("launch.tpu_run")
    cfg = copy_of(base, tmp_path)
    root = ckpt_dir(cfg)

    def export(out: Path) -> int:
        sets = ["model.preset=tiny", f"run_dir={tmp_path / 'x'}", f"export.checkpoint={root}", f"export.out={out}"]
        return tpu_run.main(["--config", "export_hf", *[arg for s in sets for arg in ("--set", s)]])

    assert export(tmp_path / "hf") == 0
    want = export_hf(base["state"]["params"], make_cfg(tmp_path).model, tmp_path / "want", dtype="bfloat16")
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == sorted(p.name for p in want.iterdir())
    for f in want.iterdir():
        assert (tmp_path / "hf" / f.name).read_bytes() == f.read_bytes(), f.name
    capsys.readouterr()

    name = flip_a_params_byte(root / "4", named_leaves({"params": base["state"]["params"]}))
    before = entries(cfg)
    assert export(tmp_path / "hf2") == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: checkpoint {root / '4'}: state array {name} does not match its checksum; earlier steps "
                   f"that may restore: {root / '2'}"), err
    assert not (tmp_path / "hf2").exists() and entries(cfg) == before  # read-only: no fallback, nothing moved

    gen = load_config("generate_demo", [f"generate.checkpoint={root / '4'}", f"run_dir={tmp_path / 'gen'}",
                                        "generate.max_new_tokens=2", "mesh.num_devices=1"])
    with pytest.raises(UnreadableCheckpoint, match=rf"^checkpoint {root / '4'}: state array {name} does not match"):
        run_generate(gen)
    assert entries(cfg) == before
