"""The README's demo end to end (fewer steps): CLDR pairs in ten languages -> tokenizer ->
prepare -> train (loss falls) -> Hugging Face export that transformers loads with its tokenizer."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT

pytestmark = pytest.mark.slow


def test_demo_end_to_end(tmp_path):
    run_dir = tmp_path / "demo"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "launch", "tpu_run.py"), "--config", "demo",
                             "--set", f"run_dir={run_dir}", "--set", "train.steps=60", "--set", "checkpoint.every=30"],
                            capture_output=True, text=True, timeout=600, env=env, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr[-3000:]

    pairs = [json.loads(line) for line in (run_dir / "data" / "cldr_pairs.jsonl").read_text().splitlines()]
    assert {p["lang"] for p in pairs} == {"bn", "fi", "hi", "id", "sw", "ta", "th", "tr", "ur", "vi"}
    manifest = json.loads((run_dir / "data" / "prepared" / "manifest.json").read_text())
    assert sum(v["examples"] for v in manifest["languages"].values()) == len(pairs)

    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    first, last = metrics[0]["loss"], sum(m["loss"] for m in metrics[-5:]) / 5
    assert last < 0.7 * first, (first, last)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()) == ["30", "60"]

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, info = AutoModelForCausalLM.from_pretrained(run_dir / "hf", output_loading_info=True)
    assert not any(info.values()), info
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "hf")
    thai = next(p["output"] for p in pairs if p["lang"] == "th")
    assert tokenizer.decode(tokenizer.encode(thai), skip_special_tokens=True) == thai
    assert model.config.vocab_size == tokenizer.vocab_size
