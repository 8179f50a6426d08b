"""The pipeline demo (job `pipeline_demo`) end to end at a reduced size: CLDR data with planted truth
in two languages -> every pipeline stage -> the five figures against their baselines. Asserts on
the numbers in results.json (not only that files exist), on counts that add up from the data to
the final model's examples, and that a rerun skips the finished stages and gives the same figures.
Also checks chrF against hand-computed values and the demo data's planted truth."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from xinst_jax.config import load_config
from xinst_jax.curate.pipeline_demo import PLANTED, corpus_chrf, run_pipeline_demo
from xinst_jax.data.demo_corpus import DemoSizes, build_demo_data

LANGS = ["th", "sw"]
SMALL = DemoSizes(seed_docs=10, seed_short_per_kind=1, corpus_clean=15, planted=2, heldout=5)
STEPS = {"revgen": 30, "evaluator": 60, "sft": 12}  # the evaluator learns its label prior in ~50 steps


def test_chrf_matches_hand_computed_values():
    assert corpus_chrf(["abc"], ["abc"]) == pytest.approx(100.0)
    assert corpus_chrf(["xyz"], ["abc"]) == 0.0
    assert corpus_chrf([""], ["abc"]) == 0.0
    # "ab" vs "abc": orders 1, 2 have n-grams on both sides; P = (2/2 + 1/1) / 2 = 1,
    # R = (2/3 + 1/2) / 2 = 7/12; F2 = 5 P R / (4 P + R)
    p, r = 1.0, 7 / 12
    assert corpus_chrf(["ab"], ["abc"]) == pytest.approx(100 * 5 * p * r / (4 * p + r))
    assert corpus_chrf(["a b c"], ["abc"]) == pytest.approx(100.0)  # whitespace is ignored (sacreBLEU)
    # corpus level: statistics are summed before the score (sentence scores 100 and 0 would average 50):
    # order 1 matches 4 of 5 n-grams on both sides, orders 2-4 all of theirs -> P = R = 0.95
    assert corpus_chrf(["abcd", "x"], ["abcd", "y"]) == pytest.approx(95.0)


def test_demo_data_is_deterministic_and_holds_its_truth(tmp_path):
    a = build_demo_data(tmp_path / "a", LANGS, seed=3, sizes=SMALL)
    b = build_demo_data(tmp_path / "b", LANGS, seed=3, sizes=SMALL)
    assert a == b
    for name in ("seed_pairs.jsonl", "corpus.jsonl", "truth.jsonl", "heldout_pairs.jsonl", "heldout_rated.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    truth = [json.loads(line) for line in (tmp_path / "a" / "truth.jsonl").read_text().splitlines()]
    for lang in LANGS:
        kinds = [t["truth"] for t in truth if t["lang"] == lang]
        assert kinds.count("clean") == SMALL.corpus_clean
        assert all(kinds.count(k) == SMALL.planted for k in PLANTED)
    position = {t["id"]: i for i, t in enumerate(truth)}
    assert all(position[t["source_id"]] < position[t["id"]] for t in truth if t["source_id"])
    corpus = {json.loads(line)["text"] for line in (tmp_path / "a" / "corpus.jsonl").read_text().splitlines()}
    held = [json.loads(line) for line in (tmp_path / "a" / "heldout_pairs.jsonl").read_text().splitlines()]
    seeds = {json.loads(line)["output"] for line in (tmp_path / "a" / "seed_pairs.jsonl").read_text().splitlines()}
    assert not {h["output"] for h in held} & (corpus | seeds), "held-out documents are seen by no stage"


def demo_config(run_dir):
    cfg = load_config("pipeline_demo", [f"run_dir={run_dir}", f"data.languages={json.dumps(LANGS)}"])
    p = cfg.pipeline
    stages = {name: dataclasses.replace(spec, set={**spec.set, "train.steps": STEPS[name]})
              for name, spec in p.stages.items()}
    return dataclasses.replace(cfg, pipeline=dataclasses.replace(
        p, stages=stages, set={**p.set, "train.batch_size": 4, "curate.diversify.per_language": 6}))


def untimed(x):
    """`x` without its `seconds` entries (wall time differs between runs)."""
    if isinstance(x, dict):
        return {k: untimed(v) for k, v in x.items() if k != "seconds"}
    return x


def finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


@pytest.mark.slow
def test_pipeline_demo_small(tmp_path, capsys):
    cfg = demo_config(tmp_path / "demo")
    results = run_pipeline_demo(cfg, sizes=SMALL)
    saved = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert saved["filters"] == json.loads(json.dumps(results["filters"]))
    report = (tmp_path / "demo" / "report.md").read_text()
    out = capsys.readouterr().out
    assert "generator: chrF vs reference" in out and "| filters: near_duplicate P / R |" in report

    # filters: every planted document caught for its reason, every clean one kept
    f = saved["filters"]
    for kind in PLANTED:
        assert f["pipeline"][kind]["recall"] == 1.0 and f["pipeline"][kind]["precision"] == 1.0, kind
        assert f["pipeline"][kind]["actual"] == SMALL.planted * len(LANGS)
    assert f["pipeline"]["clean_kept"]["precision"] == 1.0 and f["pipeline"]["clean_kept"]["recall"] == 1.0
    # the naive baseline catches the short ones only (the exact copies differ in spacing)
    assert f["baseline"]["too_short"]["recall"] == 1.0
    assert f["baseline"]["near_duplicate"]["recall"] == 0.0 and f["baseline"]["wrong_lang"]["recall"] == 0.0
    assert f["baseline"]["clean_kept"]["precision"] < 1.0

    # each figure and its baseline present and finite
    g, e, d, m = saved["generator"], saved["evaluator"], saved["diversity"], saved["final_model"]
    assert g["pairs"] == SMALL.heldout * len(LANGS)
    for name in ("trained", "untrained"):
        assert finite(g[name]["chrf"]) and 0 <= g[name]["chrf"] <= 100 and set(g[name]["per_language"]) == set(LANGS)
    for name in ("evaluator", "baseline"):
        for label in ("best", "worst"):
            assert 0 <= e[name][label]["precision"] <= 1 and 0 <= e[name][label]["recall"] <= 1
        assert e[name]["best"]["actual"] == SMALL.heldout * len(LANGS)
    assert len(e["length_rater"]["thresholds"]) == 2 and finite(e["length_rater"]["train_accuracy"])
    for name in ("diversified", "random"):
        assert 0 < d[name]["coverage"] <= 1 and 0 <= d[name]["entropy"] <= d["max_entropy"] + 1e-9
    for lang, row in d["per_language"].items():
        assert row["drawn"] == min(6, row["pool"])
        assert sum(row["diversified"]["topics"].values()) == sum(row["random"]["topics"].values()) == row["drawn"]
    assert finite(m["final"]["loss"]) and finite(m["base"]["loss"])
    assert m["final"]["loss"] < m["base"]["loss"], "training lowers the held-out loss"

    # counts add up, language by language, from the data to the final model's examples
    data = json.loads((tmp_path / "demo" / "data" / "manifest.json").read_text())
    counts = saved["counts"]
    for lang in LANGS:
        row = counts[lang]
        assert row["corpus"] == sum(data["corpus"][lang].values())
        assert row["docs kept"] == data["corpus"][lang]["clean"]
        assert row["seed pairs"] == sum(data["seed_pairs"][lang].values()) and row["ratings"] == 3 * row["seed pairs"]
        assert row["candidates"] <= row["docs kept"] and row["refined"] <= row["candidates"]
        assert row["diversified"] == min(6, row["refined"]) == row["sft examples"]
    for key in counts["all"]:
        assert counts["all"][key] == sum(counts[lang][key] for lang in LANGS), key
    assert set(saved["timings"]) >= {"data", "tokenizer", "revgen", "candidates", "ratings", "evaluator", "refine",
                                     "diversify", "sft", "figures"}

    # a rerun skips every stage and recomputes the same figures
    again = run_pipeline_demo(cfg, sizes=SMALL)
    assert "pipeline: stage sft: done (skipped)" in capsys.readouterr().out
    for key in ("filters", "generator", "evaluator", "diversity", "final_model", "counts"):
        assert untimed(json.loads(json.dumps(again[key]))) == untimed(saved[key]), key
