"""The `ratings` job: the rating scheme (labels, proportions, determinism, each flaw kind), bad
inputs, and a manifest whose counts add up."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from xinst_jax.config import ConfigError, load_config
from xinst_jax.curate import ratings as R
from xinst_jax.curate.ratings import GENERIC_INSTRUCTIONS, SCHEMES, build_ratings, run_ratings

REPO = Path(__file__).resolve().parent.parent
TOPICS = ["river", "city", "music", "war", "king", "sea", "bread", "school", "rain", "mountain", "law", "court",
          "vote", "child", "science", "radar", "ship", "forest", "bridge", "train"]
WORDS = {"fi": "talo joki kaupunki meri leipä koulu sade vuori laki lapsi".split(),
         "sw": "nyumba mto mji bahari mkate shule mvua mlima sheria mtoto".split(),
         "th": "บ้าน แม่น้ำ เมือง ทะเล ขนมปัง โรงเรียน ฝน ภูเขา กฎหมาย เด็ก".split()}


def make_pairs(langs=("fi", "sw", "th"), n: int = 30, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    pairs = []
    for lang in langs:
        for i in range(n):
            topic = " and ".join(rng.choice(TOPICS, 3, replace=False))
            words = WORDS[lang]
            sentences = [" ".join(rng.choice(words, int(rng.integers(5, 10)))) + "." for _ in range(3)]
            pairs.append({"id": f"{lang}-{i}", "lang": lang, "instruction": f"Write about the {topic}.",
                          "output": " ".join(sentences)})
    return pairs


def by_label(ratings):
    return {(r["meta"]["source_id"], r["label"]): r for r in ratings}


def test_three_ratings_per_pair_one_per_label():
    pairs = make_pairs()
    ratings = build_ratings(pairs, seed=0)
    assert len(ratings) == 3 * len(pairs)
    assert [r["meta"]["source_id"] for r in ratings] == [p["id"] for p in pairs for _ in range(3)]
    assert [r["label"] for r in ratings] == ["best", "flawed", "worst"] * len(pairs)
    per_lang = collections.Counter((r["lang"], r["label"]) for r in ratings)
    assert set(per_lang.values()) == {30}  # exactly 1/3 per label in every language
    for r in ratings:
        assert set(r) == {"id", "lang", "instruction", "output", "label", "meta"}
        assert r["id"] == f"{r['meta']['source_id']}/{r['label']}"
        assert R.SCHEME_LABEL[r["meta"]["scheme"]] == r["label"]
        assert r["instruction"].strip() and r["output"].strip()
    pairs_by_id = {p["id"]: p for p in pairs}
    for r in ratings:
        p = pairs_by_id[r["meta"]["source_id"]]
        assert r["lang"] == p["lang"]
        if r["label"] == "best":
            assert (r["instruction"], r["output"], r["meta"]["scheme"]) == (p["instruction"], p["output"], "true_pair")
        else:
            assert (r["instruction"], r["output"]) != (p["instruction"], p["output"])
    # every kind is used, and the kinds of a label are balanced (+-1 per language)
    kinds = collections.Counter((r["lang"], r["meta"]["scheme"]) for r in ratings)
    for lang in ("fi", "sw", "th"):
        for label, schemes in SCHEMES.items():
            if label != "best":
                counts = [kinds[(lang, s)] for s in schemes]
                assert min(counts) >= 30 // len(schemes) - 1 and sum(counts) == 30, (lang, label, counts)


def test_deterministic_in_the_seed():
    pairs = make_pairs()
    a, b = build_ratings(pairs, seed=3), build_ratings([dict(p) for p in pairs], seed=3)
    assert json.dumps(a, ensure_ascii=False) == json.dumps(b, ensure_ascii=False)
    c = build_ratings(pairs, seed=4)
    assert a != c and [r["label"] for r in a] == [r["label"] for r in c]


def test_each_flaw_kind():
    pairs = make_pairs(n=24)
    pairs_by_id = {p["id"]: p for p in pairs}
    ratings = build_ratings(pairs, seed=1)
    seen = collections.Counter()
    for lang in ("fi", "sw", "th"):
        own = [p for p in pairs if p["lang"] == lang]
        sims = R.similarity_matrix([p["instruction"] for p in own])
        index = {p["id"]: i for i, p in enumerate(own)}
        for r in ratings:
            if r["lang"] != lang or r["label"] == "best":
                continue
            scheme, src = r["meta"]["scheme"], pairs_by_id[r["meta"]["source_id"]]
            i = index[src["id"]]
            seen[scheme] += 1
            row = np.where(np.arange(len(own)) == i, -1.0, sims[i])
            if scheme == "near_instruction":  # the nearest other pair's instruction, same output
                donor = pairs_by_id[r["meta"]["donor_id"]]
                assert donor["lang"] == lang and donor["id"] != src["id"] and r["output"] == src["output"]
                assert r["instruction"] == donor["instruction"]
                assert sims[i, index[donor["id"]]] == row.max()
            elif scheme == "generic_instruction":
                assert r["instruction"] in GENERIC_INSTRUCTIONS and r["output"] == src["output"]
            elif scheme == "truncated_output":  # a prefix cut at a boundary, 25-60% of the characters
                assert r["instruction"] == src["instruction"]
                out, full = r["output"], src["output"]
                assert full.startswith(out) and 0.25 <= len(out) / len(full.rstrip()) <= 0.60
                rest = full[len(out):]
                assert rest[:1].isspace() or out[-1] in R.SENTENCE_END
            elif scheme == "mismatched_instruction":  # a non-near pair of the same language
                donor = pairs_by_id[r["meta"]["donor_id"]]
                assert donor["lang"] == lang and r["instruction"] == donor["instruction"] != src["instruction"]
                assert r["output"] == src["output"]
                j = index[donor["id"]]
                assert (row > row[j]).sum() >= int(np.ceil(R.NEAR_SHARE * (len(own) - 1)))  # not in the near quarter
            elif scheme == "other_language_output":  # another language's response under this instruction
                donor = pairs_by_id[r["meta"]["donor_id"]]
                assert donor["lang"] != lang and r["output"] == donor["output"]
                assert r["instruction"] == src["instruction"]
            else:
                raise AssertionError(scheme)
    assert set(seen) == {s for label in ("flawed", "worst") for s in SCHEMES[label]}


def test_truncation_at_word_and_sentence_boundaries():
    rng = np.random.default_rng(0)
    text = "Yksi kaksi kolme. Neljä viisi kuusi seitsemän. Kahdeksan yhdeksän kymmenen yksitoista."
    for _ in range(50):
        out = R.truncate_output(text, rng)
        assert text.startswith(out) and 0.25 <= len(out) / len(text) <= 0.6
        assert text[len(out)] == " "
    assert R.truncate_output("ภาษาไทยไม่มีช่องว่างระหว่างคำเลย", rng) is None  # no boundary: not truncatable
    assert R.truncate_output("यह पहला वाक्य है।दूसरा वाक्य यहाँ है।", np.random.default_rng(1)) == "यह पहला वाक्य है।"


def test_fallbacks_on_small_inputs():
    # one language: no other-language responses to borrow, so every worst is a mismatched instruction;
    # two pairs: the only other pair is the mismatched donor, so no near flaw
    pairs = [{"id": "a", "lang": "sw", "instruction": "Describe rivers.", "output": "Mito ni mirefu sana hapa."},
             {"id": "b", "lang": "sw", "instruction": "Name a city.", "output": "Nairobi"}]
    ratings = build_ratings(pairs, seed=0)
    schemes = {r["id"]: r["meta"]["scheme"] for r in ratings}
    assert schemes["a/worst"] == schemes["b/worst"] == "mismatched_instruction"
    assert schemes["b/flawed"] == "generic_instruction"  # one word: cannot be truncated
    assert schemes["a/flawed"] in ("generic_instruction", "truncated_output")


def test_bad_scheme_inputs_are_one_line_config_errors():
    with pytest.raises(ConfigError, match=r"^curate.seed_pairs: no pairs"):
        build_ratings([], 0)
    pairs = make_pairs(("fi", "sw"), n=3)
    with pytest.raises(ConfigError, match=r"too few in th \(1 pair\)$"):
        build_ratings(pairs + [{"id": "x", "lang": "th", "instruction": "Say hi.", "output": "สวัสดี"}], 0)
    same = [{"id": str(i), "lang": "fi", "instruction": "Same.", "output": f"Teksti {i}."} for i in range(3)]
    with pytest.raises(ConfigError, match=r"language fi: cannot build a worst rating"):
        build_ratings(same, 0)
    assert len(build_ratings(same + make_pairs(("sw",), n=2), 0)) == 15  # another language lends responses


# --------------------------------------------------------------------------- the job


def job_config(tmp_path: Path, *inputs: Path, extra: tuple = ()):
    spec = ", ".join(f"{{path: {p}}}" for p in inputs)
    return load_config("evaluator_xinst", [f"run_dir={tmp_path / 'run'}", "job=ratings",
                                           f"curate.seed_pairs=[{spec}]", f"curate.out={tmp_path / 'out'}", *extra])


def write_lines(path: Path, lines) -> Path:
    with open(path, "wb") as f:
        for line in lines:
            f.write((line if isinstance(line, bytes) else
                     (line if isinstance(line, str) else json.dumps(line, ensure_ascii=False)).encode()) + b"\n")
    return path


def test_job_writes_ratings_and_a_manifest_that_adds_up(tmp_path):
    pairs = make_pairs(n=10)
    bad = ["{broken", json.dumps({"id": "q", "lang": "fi", "instruction": "x"}),
           json.dumps({"id": "r", "lang": "xx", "instruction": "x", "output": "y"}), b"\xff\xfe"]
    dup = [dict(pairs[0], id="dup-content"), dict(pairs[1], output="another text", lang="fi", id=pairs[1]["id"])]
    path = write_lines(tmp_path / "pairs.jsonl", pairs[:15] + bad + dup + [""])
    path2 = write_lines(tmp_path / "more.jsonl", pairs[15:])
    manifest = run_ratings(job_config(tmp_path, path, path2))
    out = tmp_path / "out" / "ratings"
    rows = [json.loads(line) for line in (out / "ratings.jsonl").read_text(encoding="utf-8").splitlines()]
    assert rows == build_ratings(pairs, 0)
    saved = json.loads((out / "manifest.json").read_text())
    assert saved == json.loads(json.dumps(manifest))
    inp = saved["input"]
    assert inp["in"] == len(pairs) + len(bad) + len(dup) and inp["blank_lines"] == 1
    assert inp["in"] == inp["kept"] + inp["skipped_total"] and inp["skipped_total"] == len(bad)
    assert inp["skipped"] == {"malformed_json": 1, "missing_field:output": 1, "unknown_lang:lang": 1,
                              "invalid_utf8": 1}
    assert len(saved["bad"]) == 4
    p = saved["pairs"]
    assert p["fi"] == {"in": 12, "kept": 10, "dropped": {"duplicate_id": 1, "duplicate_pair": 1}}
    for lang, row in p.items():
        assert row["in"] == row["kept"] + sum(row["dropped"].values())
    assert p["all"]["in"] == inp["kept"] and p["all"]["kept"] == len(pairs)
    labels, schemes = saved["labels"], saved["schemes"]
    assert set(labels) == set(schemes) == {"fi", "sw", "th", "all"}
    for lang in ("fi", "sw", "th"):
        assert labels[lang] == {"best": 10, "flawed": 10, "worst": 10}
        assert sum(schemes[lang].values()) == 30 == 3 * p[lang]["kept"]
        assert schemes[lang]["true_pair"] == labels[lang]["best"]
        for label in ("flawed", "worst"):
            assert sum(schemes[lang].get(s, 0) for s in SCHEMES[label]) == labels[lang][label]
    assert labels["all"] == {"best": 30, "flawed": 30, "worst": 30} and saved["ratings"] == len(rows) == 90
    # the file is what the evaluator template trains on: prepare's reader takes every line
    from xinst_jax.config import DataInputConfig
    from xinst_jax.data.records import RecordReader
    from xinst_jax.tasks import Task

    reader = RecordReader(["fi", "sw", "th"], 20000, strict=True, **Task("evaluator", None).reader_fields(True))
    assert len(list(reader.read([DataInputConfig(path=str(out / "ratings.jsonl"))]))) == 90


def test_job_input_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"^curate.seed_pairs: no inputs"):
        run_ratings(load_config("evaluator_xinst", [f"run_dir={tmp_path}", "job=ratings"]))
    empty = write_lines(tmp_path / "empty.jsonl", ["", "{bad"])
    with pytest.raises(ConfigError, match=r"no valid pairs in .*empty.jsonl \(1 lines: malformed_json 1\)$"):
        run_ratings(job_config(tmp_path, empty))
    with pytest.raises(ConfigError, match=r"curate.seed_pairs\[0\].path: no files match"):
        run_ratings(job_config(tmp_path, tmp_path / "nope.jsonl"))
    one = write_lines(tmp_path / "one.jsonl", make_pairs(("fi",), n=4) + make_pairs(("sw",), n=1))
    with pytest.raises(ConfigError, match=r"too few in sw \(1 pair\)"):
        run_ratings(job_config(tmp_path, one))
    strict = write_lines(tmp_path / "strict.jsonl", make_pairs(("fi",), n=2) + ["{bad"])
    with pytest.raises(ConfigError, match=r"strict.jsonl:3: -: malformed_json"):
        run_ratings(job_config(tmp_path, strict, extra=("data.strict=true",)))


def test_job_through_the_entry_point(tmp_path):
    path = write_lines(tmp_path / "pairs.jsonl", make_pairs(("fi", "th"), n=4))
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, str(REPO / "launch" / "tpu_run.py"), "--config", "evaluator_xinst", "--set", "job=ratings",
           "--set", f"run_dir={tmp_path / 'run'}"]
    ok = subprocess.run(cmd + ["--set", f"curate.seed_pairs=[{{path: {path}}}]"], capture_output=True, text=True,
                        env=env, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "24 ratings from 8 pairs in 2 language(s)" in ok.stdout
    assert len((tmp_path / "run" / "ratings" / "ratings.jsonl").read_text().splitlines()) == 24
    bad = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    assert bad.stderr.startswith("error: curate.seed_pairs: no inputs")
