"""The `refine` job: best kept, worst dropped, flawed regenerated and kept only when a fresh
instruction reaches best, open pairs carried to the next round, counts per round and language
that add up, resume, and bad input. The evaluator's scoring itself: test_evaluator.py."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from data_helpers import tiny_hf_model
from xinst_jax.config import ConfigError, load_config
from xinst_jax.curate.evaluator import Rating
from xinst_jax.curate.filters import InstructionFilter
from xinst_jax.curate.refine import Models, read_candidates, refine_shard, round_counts, run_refine


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> tuple[Path, Path]:
    """Two tiny random-init Llamas as Hugging Face directories: generator and evaluator."""
    root = tmp_path_factory.mktemp("models")
    return tiny_hf_model(root / "generator", seed=1), tiny_hf_model(root / "evaluator", seed=2)


CANDIDATES = [
    {"id": "d1#0", "lang": "th", "instruction": "GOOD: describe the city.", "output": "กรุงเทพมหานครเป็นเมืองหลวง",
     "source_id": "d1"},
    {"id": "d2#0", "lang": "sw", "instruction": "BAD: unrelated.", "output": "Kila mtu ana haki ya kuishi.",
     "source_id": "d2"},
    {"id": "d3#0", "lang": "sw", "instruction": "MEH: vague request.", "output": "Watu wote wamezaliwa huru.",
     "source_id": "d3"},
    {"id": "d4#0", "lang": "th", "instruction": "MEH: another vague one.", "output": "ทุกคนมีสิทธิในการมีชีวิต",
     "source_id": "d4"},
]


def write_candidates(path: Path, rows=CANDIDATES) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def overrides(tmp_path: Path, generator: Path, evaluator: Path, candidates: Path, *extra: str) -> list[str]:
    return [f"run_dir={tmp_path / 'run'}", f"curate.out={tmp_path / 'out'}", f"curate.candidates={candidates}",
            f"generate.hf_dir={generator}", f"curate.evaluator_hf_dir={evaluator}", "generate.tokenizer=bytes",
            "model.preset=tiny", "generate.max_new_tokens=16", "generate.min_new_tokens=12", "generate.batch_size=4",
            "generate.prompt_buckets=[128]", "generate.progress=false", "curate.shard_size=2",
            "curate.fresh_instructions=2", "curate.instruction_filters.check_english=false",
            "curate.instruction_filters.min_chars=1", "mesh.num_devices=1", "mesh.fsdp=1", *extra]


class KeywordEvaluator:
    """A rule standing in for the trained evaluator, so that the control flow is checked exactly:
    GOOD -> best, BAD -> worst, MEH -> flawed; any other (freshly generated) instruction is best
    when `fix` is on, else flawed with a lower score."""

    def __init__(self, fix: bool):
        self.fix = fix
        self.seen: list[str] = []

    def rate(self, records):
        out = []
        for r in records:
            self.seen.append(r["instruction"])
            ins = r["instruction"]
            if ins.startswith("GOOD"):
                label, score = "best", 0.9
            elif ins.startswith("BAD"):
                label, score = "worst", 0.05
            elif ins.startswith("MEH"):
                label, score = "flawed", 0.3
            else:
                label, score = ("best", 0.8) if self.fix else ("flawed", 0.2)
            rest = (1 - score) / 2
            probs = {"best": score, "flawed": rest, "worst": rest}
            out.append(Rating(label=label, probs=probs, score=score))
        return out


@pytest.mark.parametrize("fix", [True, False])
def test_refine_shard_rules(tmp_path, model_dirs, fix):
    generator, evaluator = model_dirs
    cfg = load_config("refine_xinst", overrides(tmp_path, generator, evaluator, write_candidates(tmp_path / "c.jsonl")))
    pairs, sha256 = read_candidates(cfg, tmp_path / "c.jsonl")
    assert sha256 == hashlib.sha256((tmp_path / "c.jsonl").read_bytes()).hexdigest()  # the manifest's fingerprint
    judge = KeywordEvaluator(fix)
    models = Models(cfg, judge, ("", str(generator)))
    rows = refine_shard(models, pairs, 1, InstructionFilter(cfg.curate.instruction_filters))
    status = {r["id"]: r["status"] for r in rows}
    assert status["d1#0"] == "best" and status["d2#0"] == "worst"
    # two fresh instructions were sampled and rated for each flawed pair (the 4 originals first)
    assert len(judge.seen) == 4 + 2 * 2
    for rid in ("d3#0", "d4#0"):
        row = next(r for r in rows if r["id"] == rid)
        if fix:  # a fresh instruction reached best: the pair is kept with it
            assert row["status"] == "fixed" and row["refined"] and not row["instruction"].startswith("MEH")
            assert row["score"] == 0.8
        else:  # no fresh one beat the original: it stays as it was, open for the next round
            assert row["status"] == "flawed" and not row["refined"] and row["instruction"].startswith("MEH")
    table = round_counts(rows)
    assert table["all"] == {"in": 4, "best": 1, "fixed": 2 if fix else 0, "dropped": 1, "flawed": 0 if fix else 2}
    for row in table.values():
        assert row["in"] == row["best"] + row["fixed"] + row["dropped"] + row["flawed"]


def test_refine_job_end_to_end(tmp_path, model_dirs):
    """The real job with a (random) evaluator model: rounds carry the open pairs, counts add up
    per round and language, the output is in candidate order, a rerun reuses everything."""
    generator, evaluator = model_dirs
    cands = [dict(c, id=f"{c['id']}-{i}") for i in range(3) for c in CANDIDATES]
    path = write_candidates(tmp_path / "c.jsonl", cands)
    cfg = load_config("refine_xinst", overrides(tmp_path, generator, evaluator, path))
    report = run_refine(cfg)
    out = tmp_path / "out" / "refine"
    manifest = json.loads((out / "manifest.json").read_text())
    rounds = manifest["rounds"]
    assert rounds["round-1"]["all"]["in"] == len(cands)
    for name, table in rounds.items():
        for lang, row in table.items():
            assert row["in"] == row["best"] + row["fixed"] + row["dropped"] + row["flawed"], (name, lang)
    if "round-2" in rounds:  # the open pairs of round 1 are exactly round 2's input
        assert rounds["round-2"]["all"]["in"] == rounds["round-1"]["all"]["flawed"]
    kept_total = sum(t["all"]["best"] + t["all"]["fixed"] for t in rounds.values())
    refined = [json.loads(line) for line in (out / "refined.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(refined) == kept_total == report["kept"]
    order = {c["id"]: i for i, c in enumerate(cands)}
    assert [order[r["id"]] for r in refined] == sorted(order[r["id"]] for r in refined)
    for r in refined:
        assert set(r) == {"id", "lang", "instruction", "output", "score", "round", "source_id", "refined"}
        assert 0.0 <= r["score"] <= 1.0 and r["round"] in (1, 2)
    before = (out / "refined.jsonl").read_bytes()
    run_refine(cfg)
    assert (out / "refined.jsonl").read_bytes() == before
    with pytest.raises(ConfigError, match="settings"):
        run_refine(load_config("refine_xinst", overrides(tmp_path, generator, evaluator, path, "curate.rounds=3")))


def test_refine_bad_input(tmp_path, model_dirs):
    generator, evaluator = model_dirs
    with pytest.raises(ConfigError, match="curate.candidates: .* not found"):
        run_refine(load_config("refine_xinst", overrides(tmp_path, generator, evaluator, tmp_path / "none.jsonl")))
    empty = write_candidates(tmp_path / "empty.jsonl", [])
    with pytest.raises(ConfigError, match="holds no candidates"):
        run_refine(load_config("refine_xinst", overrides(tmp_path, generator, evaluator, empty)))
    path = write_candidates(tmp_path / "c.jsonl")
    no_eval = [o for o in overrides(tmp_path, generator, evaluator, path) if not o.startswith("curate.evaluator")]
    with pytest.raises(ConfigError, match="needs the trained evaluator"):
        run_refine(load_config("refine_xinst", no_eval))
    bad_lang = write_candidates(tmp_path / "de.jsonl", [dict(CANDIDATES[0], lang="de")])
    with pytest.raises(ConfigError, match=r"de.jsonl:1: lang: unknown_lang"):
        run_refine(load_config("refine_xinst", overrides(tmp_path, generator, evaluator, bad_lang)))
    with pytest.raises(ConfigError, match="model.num_layers is 2 in the checkpoint but 3"):
        run_refine(load_config("refine_xinst", overrides(tmp_path, generator, evaluator, path, "model.num_layers=3")))


def test_retrain_generator_on_kept_pairs(tmp_path, model_dirs):
    """curate.retrain_generator: the round's kept pairs fine-tune the generator (revgen template,
    the finetune job), and the next round samples from the result."""
    import numpy as np
    from safetensors.numpy import load_file

    from xinst_jax.curate.refine import retrain_generator

    generator, evaluator = model_dirs
    cfg = load_config("refine_xinst", overrides(
        tmp_path, generator, evaluator, write_candidates(tmp_path / "c.jsonl"), "curate.retrain_generator=true",
        "train.steps=3", "train.batch_size=2", "train.seq_len=128", "train.warmup_steps=1", "train.log_every=1",
        "data.num_shards=1", "checkpoint.every=3", "checkpoint.async_save=false", "train.learning_rate=1e-2"))
    models = Models(cfg, KeywordEvaluator(fix=True), ("", str(generator)))
    kept = [dict(c, index=i) for i, c in enumerate(CANDIDATES[:2])]
    retrain_generator(cfg, models, kept, 1, tmp_path / "refine")
    tuned = tmp_path / "refine" / "round-1" / "generator" / "hf"
    assert models.generator_source == ("", str(tuned)) and models._generator is None
    pairs = (tmp_path / "refine" / "round-1" / "generator" / "pairs.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(p)["instruction"] for p in pairs] == [c["instruction"] for c in CANDIDATES[:2]]
    before, after = (load_file(str(d / "model.safetensors")) for d in (generator, tuned))
    assert before.keys() == after.keys()
    assert any(not np.array_equal(before[k], after[k]) for k in before)
