"""The `pipeline` job: every stage in order with done-markers, real `kill -9`s in three different
stages then reruns giving the same final data and exported weights (sha256) as an uninterrupted
run, a changed config for a finished stage refused in one line naming the stage and the key,
`pipeline.from_stage` moving stages aside and rerunning them, and seed pairs counted per language
(a language with none refused, by name)."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from xinst_jax.config import ConfigError, load_config
from xinst_jax.curate.pipeline import Pipeline
from xinst_jax.data.demo_data import write_demo_pairs

REPO = Path(__file__).resolve().parent.parent
ENTRY = REPO / "launch" / "tpu_run.py"
LANGS = ["th", "sw"]


def write_inputs(root: Path) -> tuple[Path, Path]:
    """CLDR seed pairs, and a corpus of documents made of CLDR answers (8 per language)."""
    seed = root / "seed.jsonl"
    write_demo_pairs(seed, LANGS, per_kind=6)
    pairs = [json.loads(line) for line in seed.read_text(encoding="utf-8").splitlines()]
    docs = []
    for lang in LANGS:
        outputs = [p["output"] for p in pairs if p["lang"] == lang]
        for i in range(8):
            chunk = outputs[i * 3:] + outputs[:i * 3]
            docs.append({"id": f"{lang}-doc{i}", "lang": lang, "text": "\n".join(chunk)[:1200]})
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    return seed, corpus


def overrides(root: Path, seed: Path, corpus: Path, *extra: str) -> list[str]:
    # every stage a tiny Llama on this CPU (the test's own settings: pipeline_demo may change)
    small = {"model.preset": "tiny", "model.dtype": "float32", "model.param_dtype": "float32", "model.remat": "none",
             "model.max_seq_len": 512, "mesh.data": 1, "mesh.fsdp": 1, "mesh.tensor": 1, "mesh.num_devices": 1,
             "data.num_shards": 2, "data.overlong": "truncate", "data.shuffle_buffer": 200, "train.learning_rate": 3e-3,
             "train.log_every": 50, "checkpoint.keep": 1, "export.dtype": "float32", "generate.weight_dtype": "float32",
             "generate.kv_dtype": "float32", "generate.progress": False,
             "train.steps": 8, "train.batch_size": 4, "train.seq_len": 128, "checkpoint.every": 3,
             "checkpoint.async_save": False, "train.warmup_steps": 2, "data.tokenizer_vocab_size": 600,
             "generate.max_new_tokens": 12, "generate.min_new_tokens": 8, "generate.batch_size": 8,
             "generate.prompt_buckets": [128, 512], "curate.shard_size": 4, "curate.fresh_instructions": 1,
             "curate.filters.check_lang": False, "curate.filters.min_lang_confidence": 0.0,
             "curate.instruction_filters.check_english": False, "curate.instruction_filters.min_chars": 1,
             "curate.diversify.per_language": 5, "curate.diversify.embed_batch_size": 16}
    return [f"run_dir={root / 'run'}", f"data.languages={json.dumps(LANGS)}",
            f"pipeline.seed_pairs=[{{path: {seed}}}]", f"pipeline.corpus=[{{path: {corpus}}}]",
            f"pipeline.set={json.dumps(small)}", *extra]


def command(root: Path, seed: Path, corpus: Path, *extra: str) -> list[str]:
    args = [sys.executable, str(ENTRY), "--config", "xinst_pipeline"]
    for o in overrides(root, seed, corpus, *extra):
        args += ["--set", o]
    return args


def final_shas(root: Path) -> dict[str, str]:
    run = root / "run"
    files = sorted((run / "diversify").glob("*.jsonl")) + sorted((run / "sft" / "hf").glob("*.safetensors"))
    return {str(f.relative_to(run)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


ENV = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")


def run_to_end(args: list[str]) -> str:
    proc = subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def run_and_kill(args: list[str], stage: str, delay: float) -> bool:
    """Start the pipeline; `delay` seconds after `stage` starts, SIGKILL it. False if it finished first."""
    proc = subprocess.Popen(args, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    killed_at = None
    for line in proc.stdout:
        if line.startswith(f"pipeline: stage {stage} (") and killed_at is None:
            killed_at = time.time() + delay
            break
    if killed_at is None:
        proc.wait()
        return False
    while time.time() < killed_at and proc.poll() is None:
        time.sleep(0.05)
    finished = proc.poll() is not None
    proc.kill()
    proc.wait()
    return not finished


@pytest.mark.slow
def test_kill_9_in_three_stages_then_rerun_gives_the_same_data_and_weights(tmp_path):
    seed, corpus = write_inputs(tmp_path)
    reference_out = run_to_end(command(tmp_path / "a", seed, corpus))
    for stage in ("tokenizer", "revgen", "candidates", "ratings", "evaluator", "refine", "diversify", "sft"):
        assert f"pipeline: stage {stage}: done in" in reference_out
    reference = final_shas(tmp_path / "a")
    assert any(k.startswith("diversify/") for k in reference) and any(k.startswith("sft/hf/") for k in reference)

    rng = random.Random(int(os.environ.get("XINST_TEST_SEED", "0")) or None)
    killed = []
    for stage in ("revgen", "candidates", "sft"):  # training, generation shards, training + export
        delay = rng.uniform(2.0, 8.0)
        if run_and_kill(command(tmp_path / "b", seed, corpus), stage, delay):
            killed.append((stage, round(delay, 2)))
    assert len(killed) >= 2, f"the kills landed after their stages finished: {killed}"
    out = run_to_end(command(tmp_path / "b", seed, corpus))
    assert "pipeline: stage tokenizer: done (skipped)" in out
    assert final_shas(tmp_path / "b") == reference, f"kills at {killed}"

    # a finished stage with another setting: one line naming the stage and the key
    changed = subprocess.run(command(tmp_path / "b", seed, corpus, "pipeline.stages.refine.set={curate.rounds: 1}"),
                             env=ENV, capture_output=True, text=True, timeout=300)
    assert changed.returncode == 2
    assert changed.stderr.strip().splitlines()[-1] == (
        "error: pipeline: stage 'refine' finished with curate.rounds=2 (now 1); to rerun from it: "
        "--set pipeline.from_stage=refine")
    # ... rerun from there: refine and the later stages are moved aside and redone, the earlier reused
    again = run_to_end(command(tmp_path / "b", seed, corpus, "pipeline.stages.refine.set={curate.rounds: 1}",
                               "pipeline.from_stage=refine"))
    assert "pipeline: stage evaluator: done (skipped)" in again and "pipeline: stage refine: done in" in again
    assert "pipeline: stage sft: done in" in again
    assert (tmp_path / "b" / "run" / "replaced").is_dir()
    marker = json.loads((tmp_path / "b" / "run" / "stages" / "refine.done").read_text())
    assert marker["config"]["curate"]["rounds"] == 1 and "refine/refined.jsonl" in marker["outputs"]


def test_seed_pairs_counted_and_a_language_without_any_refused(tmp_path, capsys):
    seed, corpus = write_inputs(tmp_path)
    cfg = load_config("xinst_pipeline", overrides(tmp_path, seed, corpus)[1:] +
                      ['data.languages=["th", "sw", "ta"]'])
    with pytest.raises(ConfigError, match=r"pipeline.seed_pairs: no seed pairs for ta;"):
        Pipeline(cfg).run()
    per_lang = sum(1 for line in seed.read_text(encoding="utf-8").splitlines() if '"lang": "th"' in line)
    assert f"seed pairs per language: th {per_lang}, sw {per_lang}, ta 0" in capsys.readouterr().out
    # the final model reads whatever languages the diversify stage wrote (a language may have none)
    sft = Pipeline(load_config("xinst_pipeline", overrides(tmp_path, seed, corpus))).stage_config("sft")
    assert [(i.path, i.lang) for i in sft.data.inputs] == [(str(tmp_path / "run" / "diversify"), "")]
    with pytest.raises(ConfigError, match="pipeline.from_stage: unknown stage 'nope'"):
        Pipeline(load_config("xinst_pipeline", ["pipeline.from_stage=nope"]))
    with pytest.raises(ConfigError, match="pipeline.stages: unknown stage"):
        Pipeline(load_config("xinst_pipeline", ["pipeline.stages={sfts: {}}"]))
