"""The `candidates` job: corpus filters counted per language, instructions sampled per kept
document with the revgen Task, instruction filters counted, shards resumable after a real
`kill -9` (same bytes), and bad input as one-line errors. The filters themselves:
test_filters.py."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_helpers import tiny_hf_model, write_jsonl
from xinst_jax.config import ConfigError, load_config
from xinst_jax.curate.candidates import run_candidates
from xinst_jax.data.tokenizer import ByteTokenizer
from xinst_jax.tasks import Task

REPO = Path(__file__).resolve().parent.parent
ENTRY = REPO / "launch" / "tpu_run.py"
UDHR = REPO.parent / "shared" / "data" / "udhr" / "udhr_articles.jsonl"
LANGS = ["bn", "fi", "hi", "id", "sw", "ta", "th", "tr", "ur", "vi"]
needs_udhr = pytest.mark.skipif(not UDHR.exists(), reason="../shared/data (UDHR) not present")


def udhr_documents(langs=LANGS, per_lang: int = 3) -> list[dict]:
    """Real documents of the filters' length window: UDHR articles joined three at a time."""
    by_lang: dict[str, list[str]] = {}
    for line in UDHR.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if row["lang"] in langs:
            by_lang.setdefault(row["lang"], []).append(row["text"].strip())
    docs = []
    for lang in langs:
        texts, chunk, n = by_lang[lang], [], 0
        for text in texts:
            chunk.append(text)
            if len("\n".join(chunk)) >= 600:
                docs.append({"id": f"{lang}-{n}", "lang": lang, "text": "\n".join(chunk)[:2900]})
                chunk, n = [], n + 1
                if n == per_lang:
                    break
    return docs


@pytest.fixture(scope="module")
def generator_dir(tmp_path_factory) -> Path:
    """A tiny random-init Llama exported as a Hugging Face directory: the 'generator'."""
    return tiny_hf_model(tmp_path_factory.mktemp("generator") / "hf", seed=3)


def job_overrides(tmp_path: Path, corpus: Path, generator: Path, *extra: str) -> list[str]:
    # the random generator writes bytes, not English: the language check is off unless a test turns it on
    return [f"run_dir={tmp_path / 'run'}", f"curate.out={tmp_path / 'out'}", f"curate.corpus=[{{path: {corpus}}}]",
            f"generate.hf_dir={generator}", "generate.tokenizer=bytes", "model.preset=tiny",
            "generate.max_new_tokens=24", "generate.batch_size=4", "generate.prompt_buckets=[128]",
            "generate.progress=false", "generate.min_new_tokens=12", "curate.shard_size=4", "curate.samples=2",
            "curate.instruction_filters.check_english=false", "curate.instruction_filters.min_chars=1",
            "mesh.num_devices=1", "mesh.fsdp=1", *extra]


def candidates_config(tmp_path, corpus, generator, *extra):
    return load_config("candidates_xinst", job_overrides(tmp_path, corpus, generator, *extra))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@needs_udhr
def test_candidates_end_to_end(tmp_path, generator_dir):
    docs = udhr_documents(["th", "sw", "ur"], per_lang=3)
    planted = [dict(docs[0], id="th-copy"),  # an exact duplicate of a Thai document
               {"id": "sw-short", "lang": "sw", "text": "Kila mtu ana haki."},  # too short
               dict(docs[3], id="th-wrong", lang="th")]  # Swahili text labelled Thai
    corpus = write_jsonl(tmp_path / "corpus.jsonl", docs + planted + ['{"id": "bad", "lang": "th"'])
    report = run_candidates(candidates_config(tmp_path, corpus, generator_dir))
    out = tmp_path / "out" / "candidates"
    manifest = json.loads((out / "manifest.json").read_text())

    d = manifest["documents"]
    assert d["th"]["dropped"] == {"exact_duplicate": 1, "wrong_lang": 1} and d["th"]["kept"] == 3
    assert d["sw"]["dropped"] == {"too_short": 1} and d["sw"]["kept"] == 3
    assert d["ur"] == {"in": 3, "kept": 3, "dropped": {}}
    assert manifest["unreadable_lines"] == {"malformed_json": 1}
    for counts in (manifest["documents"], manifest["instructions"]):
        for row in counts.values():
            assert row["in"] == row["kept"] + sum(row["dropped"].values())

    kept_docs = read_jsonl(out / "documents.jsonl")
    assert [x["id"] for x in kept_docs] == [x["id"] for x in docs]
    cands = read_jsonl(out / "candidates.jsonl")
    assert manifest["instructions"]["all"]["in"] == 2 * len(docs)  # two samples per kept document
    assert len(cands) == manifest["instructions"]["all"]["kept"] == report["candidates_kept"] > 0
    by_doc = {x["id"]: x for x in docs}
    tok = ByteTokenizer()
    task = Task("revgen", tok)
    for c in cands:
        assert set(c) == {"id", "lang", "instruction", "output", "source_id", "sample", "logprob", "finish_reason"}
        doc = by_doc[c["source_id"]]
        assert c["id"] == f"{doc['id']}#{c['sample']}" and c["lang"] == doc["lang"] and c["output"] == doc["text"]
        assert c["instruction"] and c["instruction"] == c["instruction"].strip() and c["logprob"] < 0
    # the two samples of a document are different draws; the revgen prompt is the Task's
    pairs = {}
    for c in cands:
        pairs.setdefault(c["source_id"], {})[c["sample"]] = c["instruction"]
    assert any(len(set(v.values())) == 2 for v in pairs.values())
    assert task.prompt_text(docs[0]).endswith("### English Instruction:")

    # a rerun reuses every shard and writes the same bytes
    before = (out / "candidates.jsonl").read_bytes()
    again = run_candidates(candidates_config(tmp_path, corpus, generator_dir))
    assert again["shards_generated"] == 0 and (out / "candidates.jsonl").read_bytes() == before
    # other settings in the same directory are refused, naming what changed
    with pytest.raises(ConfigError, match="settings"):
        run_candidates(candidates_config(tmp_path, corpus, generator_dir, "curate.samples=3"))


@needs_udhr
def test_instruction_filters_count_random_output(tmp_path, generator_dir):
    """With the English check on, a random generator's byte soup is dropped as not English, counted."""
    corpus = write_jsonl(tmp_path / "corpus.jsonl", udhr_documents(["fi"], per_lang=2))
    cfg = candidates_config(tmp_path, corpus, generator_dir, "curate.instruction_filters.check_english=true",
                            "curate.samples=1")
    run_candidates(cfg)
    manifest = json.loads((tmp_path / "out" / "candidates" / "manifest.json").read_text())
    fi = manifest["instructions"]["fi"]
    assert fi["in"] == 2 and fi["kept"] + fi["dropped"].get("not_english", 0) + fi["dropped"].get("too_short", 0) \
        + fi["dropped"].get("template_residue", 0) == 2 and fi["kept"] < 2


def test_bad_corpus_is_one_line_error(tmp_path, generator_dir):
    empty = write_jsonl(tmp_path / "empty.jsonl", [])
    with pytest.raises(ConfigError, match="no documents"):
        run_candidates(candidates_config(tmp_path, empty, generator_dir))
    with pytest.raises(ConfigError, match="no files match"):
        run_candidates(candidates_config(tmp_path, tmp_path / "missing-*.jsonl", generator_dir))
    with pytest.raises(ConfigError, match="curate.corpus: no inputs"):
        run_candidates(load_config("candidates_xinst", job_overrides(tmp_path, empty, generator_dir)[:2] + [
            "generate.hf_dir=" + str(generator_dir), "generate.tokenizer=bytes", "model.preset=tiny"]))
    # nothing passes: every document too short, or in a language outside data.languages (counted skip)
    short = write_jsonl(tmp_path / "short.jsonl", [{"id": 1, "lang": "fi", "text": "Lyhyt teksti."},
                                                   {"id": 2, "lang": "de", "text": "Ein Text. " * 80}])
    with pytest.raises(ConfigError, match=r"no document passed the filters[\s\S]*fi: 1 in, 0 kept, 1 dropped "
                                          r"\(too_short 1\)[\s\S]*unknown_lang:lang"):
        run_candidates(candidates_config(tmp_path, short, generator_dir))


def test_generator_of_another_architecture(tmp_path, generator_dir):
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": 1, "lang": "fi", "text": "x" * 500}])
    with pytest.raises(ConfigError, match="model.num_layers is 2 in the checkpoint but 4"):
        run_candidates(candidates_config(tmp_path, corpus, generator_dir, "model.num_layers=4"))
    with pytest.raises(ConfigError, match="generate.checkpoint: the candidates job needs"):
        run_candidates(load_config("candidates_xinst", [x for x in job_overrides(tmp_path, corpus, generator_dir)
                                                        if not x.startswith("generate.hf_dir")]))


@needs_udhr
def test_kill_mid_run_then_rerun_and_two_processes_give_the_same_file(tmp_path, generator_dir):
    """A real `kill -9` after the first shards are done; the rerun finishes with the same bytes
    as an uninterrupted run, no line lost or doubled. Two processes splitting the shards write
    the same bytes too."""
    # One document per shard, 12 shards: with the test run's compilation cache a shard takes
    # ~25 ms, so the kill after the second shard must land with most of the loop still to go.
    docs = udhr_documents(["bn", "vi"], per_lang=6)
    shards = len(docs)
    assert shards == 12
    corpus = write_jsonl(tmp_path / "corpus.jsonl", docs)
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))

    def command(out_name: str, *extra: str) -> list[str]:
        args = [sys.executable, str(ENTRY), "--config", "candidates_xinst"]
        for o in job_overrides(tmp_path, corpus, generator_dir, "curate.shard_size=1", "curate.samples=1", *extra):
            args += ["--set", o.replace(str(tmp_path / "out"), str(tmp_path / out_name))]
        return args

    full = subprocess.run(command("full"), env=env, capture_output=True, text=True, timeout=600)
    assert full.returncode == 0, full.stderr[-2000:]
    reference = (tmp_path / "full" / "candidates" / "candidates.jsonl").read_bytes()

    out = tmp_path / "killed" / "candidates"
    proc = subprocess.Popen(command("killed"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while time.time() < deadline and not (out / "part-00001.done").exists():
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (out / "part-00000.done").exists() and not (out / f"part-{shards - 1:05d}.done").exists(), \
        "the kill landed outside the shard loop"
    assert not (out / "candidates.jsonl").exists()
    rerun = subprocess.run(command("killed"), env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert (out / "candidates.jsonl").read_bytes() == reference
    assert len(reference.splitlines()) == len(docs)

    port = free_port()
    procs = [subprocess.Popen(command("two", f"distributed.coordinator=127.0.0.1:{port}",
                                      "distributed.num_processes=2", f"distributed.process_id={i}"),
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        results = [p.communicate(timeout=600) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (stdout, err) in zip(procs, results):
        assert p.returncode == 0, err[-2000:]
    half = shards // 2  # contiguous split: each process did its half
    assert f"shard 1/{shards}" in results[0][0] and f"shard {half + 1}/{shards}" in results[1][0]
    assert f"shard {half + 1}/{shards}" not in results[0][0] and f"shard 1/{shards}" not in results[1][0]
    assert (tmp_path / "two" / "candidates" / "candidates.jsonl").read_bytes() == reference


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
