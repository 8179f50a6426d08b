"""`launch/tpu_run.py` as users run it: a subprocess, exit codes, one-line errors, and the
`export_hf` job end to end (an HF directory that transformers loads and that matches our forward)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from xinst_jax.config import available_configs, load_config
from xinst_jax.jobs import JOB_MODULES

REPO = Path(__file__).resolve().parent.parent
ENTRY = REPO / "launch" / "tpu_run.py"


def run(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("XLA_FLAGS", None)
    return subprocess.run([sys.executable, str(ENTRY), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


# --------------------------------------------------------------------------- CLI


def test_help_lists_configs_and_jobs(tmp_path):
    proc = run("--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "--config" in proc.stdout and "--set" in proc.stdout and "--print-config" in proc.stdout
    assert {"base", "export_hf"} <= set(available_configs())
    for name in available_configs():
        assert name in proc.stdout, name
    for name in JOB_MODULES:
        assert name in proc.stdout, name


def test_unknown_config(tmp_path):
    proc = run("--config", "no_such_config", cwd=tmp_path)
    assert_one_line_error(proc, "no_such_config")
    assert proc.stdout == ""


def test_unknown_key_via_set(tmp_path):
    proc = run("--config", "export_hf", "--set", "model.num_layerz=3", cwd=tmp_path)
    assert_one_line_error(proc, "model.num_layerz", "--set")
    assert not (tmp_path / "runs").exists()  # nothing is written for a bad config


def test_wrong_type_via_set(tmp_path):
    proc = run("--config", "export_hf", "--set", "export.max_shard_bytes=lots", cwd=tmp_path)
    assert_one_line_error(proc, "export.max_shard_bytes", "int", "--set")


def test_rows_longer_than_the_model_and_unknown_preset(tmp_path):
    proc = run("--config", "tiny_synthetic", "--set", "train.seq_len=1024", cwd=tmp_path)
    assert_one_line_error(proc, "--set", "train.seq_len=1024", "model.max_seq_len=512", "models/tiny.yaml")
    proc = run("--config", "tiny_synthetic", "--set", "model.preset=llama9", cwd=tmp_path)
    assert_one_line_error(proc, "model.preset", "llama9", "known: llama2_13b, llama2_7b, llama3_2_1b, llama3_8b")
    assert not (tmp_path / "runs").exists()


def test_unknown_key_in_file_names_file(tmp_path):
    cfg = tmp_path / "mine.yaml"
    cfg.write_text(f"base: {REPO / 'configs' / 'export_hf.yaml'}\nexport:\n  shard_size: 3\n")
    proc = run("--config", str(cfg), cwd=tmp_path)
    assert_one_line_error(proc, "export.shard_size", "mine.yaml")


def test_unknown_job(tmp_path):
    proc = run("--config", "export_hf", "--set", "job=no_such_job", cwd=tmp_path)
    assert_one_line_error(proc, "no_such_job", "job")
    cfg = tmp_path / "job.yaml"
    cfg.write_text("job: also_missing\n")
    assert_one_line_error(run("--config", str(cfg), cwd=tmp_path), "also_missing")


def test_print_config_reflects_overrides(tmp_path):
    proc = run("--config", "export_hf", "--set", "model.num_layers=3", "--set", "export.dtype=float32",
               "--set", "seed=11", "--set", "model.norm_eps=1e-6", "--print-config", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    printed = yaml.safe_load(proc.stdout)
    assert printed["job"] == "export_hf" and printed["name"] == "export_hf" and printed["seed"] == 11
    assert printed["model"]["num_layers"] == 3 and printed["model"]["norm_eps"] == 1e-6
    assert printed["export"]["dtype"] == "float32"
    # the rest is the resolved config: the tiny preset from base.yaml, schema defaults elsewhere
    expected = load_config("export_hf")
    assert printed["model"]["embed_dim"] == expected.model.embed_dim
    assert printed["model"]["rope_scaling"]["type"] == expected.model.rope_scaling.type
    assert not (tmp_path / "runs").exists()  # --print-config runs nothing


# --------------------------------------------------------------------------- export_hf job


def hf_logits(hf_dir: Path, tokens: np.ndarray) -> tuple[np.ndarray, dict]:
    import torch
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(str(hf_dir), output_loading_info=True,
                                                       dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(tokens).long()).logits.float().numpy()
    return logits, info


def our_logits(model_cfg, seed: int, tokens: np.ndarray) -> np.ndarray:
    import jax

    from xinst_jax.model.llama import default_positions_and_segments, forward, init_params

    params = init_params(model_cfg, jax.random.PRNGKey(seed))
    positions, segments = default_positions_and_segments(tokens)
    return np.asarray(forward(params, tokens, positions, segments, model_cfg))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One float32 export from a fresh init (seed 3) through the entry point."""
    tmp = tmp_path_factory.mktemp("export")
    run_dir = tmp / "run"
    overrides = [f"run_dir={run_dir}", "export.dtype=float32", "seed=3"]
    args = [a for o in overrides for a in ("--set", o)]
    proc = run("--config", "export_hf", *args, cwd=tmp)
    assert proc.returncode == 0, proc.stderr
    return dict(tmp=tmp, run_dir=run_dir, proc=proc, overrides=overrides)


def test_export_writes_resolved_config_and_summary(exported):
    run_dir, proc = exported["run_dir"], exported["proc"]
    saved = run_dir / "config.yaml"
    assert saved.exists()
    assert load_config(str(saved)) == load_config("export_hf", exported["overrides"])
    summary = [l for l in proc.stdout.splitlines() if l.startswith("export_hf:")]
    assert len(summary) == 1, proc.stdout
    n_tensors = 2 + 9 * load_config("export_hf").model.num_layers + 1
    assert str(run_dir / "hf") in summary[0] and f"{n_tensors} tensors" in summary[0]
    assert "1 shard" in summary[0] and "seed 3" in summary[0]


def test_export_loads_in_transformers_and_matches_forward(exported):
    hf_dir = exported["run_dir"] / "hf"
    cfg = load_config("export_hf", exported["overrides"])
    hf_config = json.loads((hf_dir / "config.json").read_text())
    assert hf_config["hidden_size"] == cfg.model.embed_dim and hf_config["num_hidden_layers"] == cfg.model.num_layers
    assert hf_config["dtype"] == "float32"

    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.model.vocab_size, size=(2, 24)).astype(np.int32)
    theirs, info = hf_logits(hf_dir, tokens)
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        assert not info.get(kind), (kind, info[kind])
    ours = our_logits(cfg.model, cfg.seed, tokens)
    assert theirs.shape == ours.shape == (2, 24, cfg.model.vocab_size)
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)
    # the seed is honoured: another seed's params give other logits
    assert np.abs(our_logits(cfg.model, 0, tokens) - theirs).max() > 1e-2


def test_export_from_hf_source_resharded_bf16(exported, tmp_path):
    """Re-export the first export as bfloat16 in several shards; with model.preset=null the
    architecture comes from the source's config.json."""
    src = exported["run_dir"] / "hf"
    out = tmp_path / "resharded"
    proc = run("--config", "export_hf", "--set", f"export.hf_source={src}", "--set", f"export.out={out}",
               "--set", "export.max_shard_bytes=20000", "--set", f"run_dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert f"hf {src}" in proc.stdout

    import ml_dtypes
    from safetensors.numpy import load_file

    original = load_file(str(src / "model.safetensors"))
    resharded = {}
    for shard in sorted(set(index["weight_map"].values())):
        tensors = load_file(str(out / shard))
        assert all(index["weight_map"][name] == shard for name in tensors)
        resharded.update(tensors)
    assert sorted(resharded) == sorted(original) == sorted(index["weight_map"])
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in resharded.values())
    for name, tensor in resharded.items():
        assert tensor.dtype == ml_dtypes.bfloat16, (name, tensor.dtype)
        np.testing.assert_array_equal(tensor, original[name].astype(ml_dtypes.bfloat16), err_msg=name)

    # architecture taken from config.json when `model` is at the schema defaults
    out2 = tmp_path / "from_config_json"
    proc = run("--config", "export_hf", "--set", "model.preset=null", "--set", f"export.hf_source={src}",
               "--set", f"export.out={out2}", "--set", "export.dtype=float32", "--set", f"run_dir={tmp_path / 'r2'}",
               cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out2 / "config.json").read_text())["hidden_size"] == \
        json.loads((src / "config.json").read_text())["hidden_size"]
    tokens = np.arange(10, dtype=np.int32)[None]
    np.testing.assert_allclose(hf_logits(out2, tokens)[0], hf_logits(src, tokens)[0], atol=1e-6)


def test_export_hf_source_architecture_mismatch(exported, tmp_path):
    src = exported["run_dir"] / "hf"
    proc = run("--config", "export_hf", "--set", f"export.hf_source={src}", "--set", "model.embed_dim=96",
               "--set", f"run_dir={tmp_path / 'run'}", cwd=tmp_path)
    assert_one_line_error(proc, "export.hf_source", "model.embed_dim")
    assert not (tmp_path / "run" / "hf").exists()


@pytest.mark.parametrize("key", ["export.hf_source", "export.checkpoint", "export.tokenizer_dir"])
def test_export_missing_directory(tmp_path, key):
    missing = tmp_path / "does_not_exist"
    proc = run("--config", "export_hf", "--set", f"{key}={missing}", "--set", f"run_dir={tmp_path / 'run'}",
               cwd=tmp_path)
    assert_one_line_error(proc, key, str(missing), "not found")


def test_export_from_trainer_checkpoint(tmp_path):
    """export.checkpoint wins over a fresh init: the exported weights are the checkpoint's."""
    import jax

    from xinst_jax.checkpoint import Checkpointer
    from xinst_jax.config import CheckpointConfig
    from xinst_jax.model.llama import init_params

    cfg = load_config("export_hf")
    params = init_params(cfg.model, jax.random.PRNGKey(123))
    ckpt = Checkpointer(tmp_path / "ckpt", CheckpointConfig(async_save=False))
    ckpt.save(7, {"params": params}, {}, dataclasses.asdict(cfg), force=True)
    ckpt.close()

    out = tmp_path / "hf"
    proc = run("--config", "export_hf", "--set", f"export.checkpoint={tmp_path / 'ckpt'}", "--set",
               f"export.out={out}", "--set", "export.dtype=float32", "--set", f"run_dir={tmp_path / 'run'}",
               cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "checkpoint" in proc.stdout
    from safetensors.numpy import load_file  # noqa: E402

    tensors = load_file(str(out / "model.safetensors"))
    np.testing.assert_array_equal(tensors["model.embed_tokens.weight"], np.asarray(params["embed"]["embedding"]))
    w_down = np.asarray(params["layers"]["mlp"]["w_down"][1])
    np.testing.assert_array_equal(tensors["model.layers.1.mlp.down_proj.weight"], w_down.T)
