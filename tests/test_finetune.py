"""sft_xinst (the pod config) runs on this CPU with overrides for a tiny model and small data;
unset required paths are one clear error naming the key."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import REPO_ROOT
from xinst_jax.config import load_config
from xinst_jax.convert.hf import export_hf
from xinst_jax.data.demo_data import write_demo_pairs
from xinst_jax.data.tokenizer import load_tokenizer
from xinst_jax.data.train_tokenizer import run_train_tokenizer
from xinst_jax.model.llama import init_params

ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2"}


def run_cli(*args, timeout=600):
    return subprocess.run([sys.executable, os.path.join(REPO_ROOT, "launch", "tpu_run.py"), *args],
                          capture_output=True, text=True, timeout=timeout, env=ENV, cwd=REPO_ROOT)


def test_sft_xinst_without_required_paths_names_the_key():
    result = run_cli("--config", "sft_xinst")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "data.tokenizer is required" in lines[0], result.stderr


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    """A tiny 'pretrained' Llama in Hugging Face format with its own SentencePiece tokenizer."""
    root = tmp_path_factory.mktemp("base")
    pairs = root / "pairs.jsonl"
    write_demo_pairs(pairs, per_kind=8)
    cfg = load_config("sft_xinst", [f"data.tokenizer={root / 'hf'}", f"data.inputs=[{{path: {pairs}}}]",
                                    "data.tokenizer_vocab_size=1024"])
    run_train_tokenizer(cfg)
    tokenizer = load_tokenizer(str(root / "hf"))
    model_cfg = load_config("sft_xinst", ["model.preset=tiny", f"model.vocab_size={tokenizer.vocab_size}",
                                          "model.dtype=float32", "train.seq_len=128"]).model
    params = init_params(model_cfg, jax.random.key(7))
    export_hf(params, model_cfg, root / "hf", dtype="float32")
    return root, pairs, tokenizer, params


def test_sft_xinst_runs_on_cpu_with_tiny_overrides(base_model, tmp_path):
    root, pairs, tokenizer, base_params = base_model
    run_dir = tmp_path / "run"
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text("".join(pairs.read_text().splitlines(keepends=True)[:40]))
    overrides = [f"run_dir={run_dir}", "model.preset=tiny", f"model.vocab_size={tokenizer.vocab_size}",
                 "model.dtype=float32", "model.remat=none", f"train.init_from={root / 'hf'}",
                 f"data.tokenizer={root / 'hf'}", f"data.inputs=[{{path: {pairs}}}]", "data.num_shards=2",
                 "data.shuffle_buffer=64", "train.steps=4", "train.batch_size=4", "train.seq_len=128",
                 "train.warmup_steps=1", "train.learning_rate=1e-3", "checkpoint.every=2",
                 # held-out loss through the tf.data path, on held-out inputs the job prepares itself
                 "train.eval_every=2", "train.eval_batches=2", f"data.eval_inputs=[{{path: {heldout}}}]"]
    args = ["--config", "sft_xinst"] + [a for o in overrides for a in ("--set", o)]
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((run_dir / "data" / "manifest.json").read_text())
    assert manifest["template"]["name"] == "sft"
    assert sorted(manifest["languages"]) == sorted(["bn", "fi", "hi", "id", "sw", "ta", "th", "tr", "ur", "vi"])
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert all(np.isfinite(m["loss"]) for m in metrics)
    # Mixed-language packed rows: several segments per row on average.
    assert all(m["real_tokens"] > 0 for m in metrics)
    evals = [(m["step"], m["eval_loss"], m["eval_tokens"]) for m in metrics if "eval_loss" in m]
    assert [step for step, _, _ in evals] == [2, 4] and all(np.isfinite(x) and n > 0 for _, x, n in evals)
    held = json.loads((run_dir / "eval_data" / "manifest.json").read_text())
    assert held["num_examples"] == 40 < manifest["num_examples"]  # prepared apart from the training shards

    # Training started from the imported weights, not a random init: after 4 Adam steps of lr 1e-3
    # every weight is within a few 1e-3 of the base (two independent inits differ by ~0.1), yet the
    # weights did move. The export carries the base model's tokenizer.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    exported = AutoModelForCausalLM.from_pretrained(run_dir / "hf").state_dict()
    base = AutoModelForCausalLM.from_pretrained(root / "hf").state_dict()
    deltas = {name: float((p.float() - base[name].float()).abs().max()) for name, p in exported.items()}
    assert max(deltas.values()) > 0, "fine-tuning left every weight unchanged"
    assert max(deltas.values()) < 0.02, f"weights moved by {max(deltas.values())}: not a fine-tune of the base"
    text = "Swahili: Jumatatu, Jumanne"
    assert AutoTokenizer.from_pretrained(run_dir / "hf").encode(text) == tokenizer.encode(text)
