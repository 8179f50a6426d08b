"""The prepare job: TFRecord shards with the contract's features, manifest, determinism across
worker counts, resume of deleted shards, and the job through the entry point."""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml

from data_helpers import LANGS, REPO, all_texts, cldr_pairs, train_small_tokenizer, write_jsonl
from xinst_jax.config import Config, DataConfig, DataInputConfig
from xinst_jax.data import templates as T
from xinst_jax.data.prepare import (FEATURES, length_stats, read_manifest, run_prepare, serialize_example,
                                    shard_name, shard_paths)
from xinst_jax.data.records import DataError, import_tf
from xinst_jax.data.tokenizer import load_tokenizer

RECORDS = cldr_pairs(per_lang=9)
BAD_LINES = ["{not json", json.dumps({"lang": "xx", "instruction": "a", "output": "b"}),
             json.dumps({"lang": "th", "instruction": "a", "output": ""})]
NUM_SHARDS = 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("prep")
    tok = train_small_tokenizer(root / "tok", all_texts(RECORDS) + [T.SFT_PROMPT, T.REVGEN_PROMPT])
    a = write_jsonl(root / "a.jsonl", RECORDS[:50] + BAD_LINES[:2])
    b = write_jsonl(root / "b.jsonl", RECORDS[50:] + BAD_LINES[2:])
    return root, tok, [a, b]


def make_cfg(root, tok, files, out, **data) -> Config:
    inputs = [DataInputConfig(path=str(f)) for f in files]
    return Config(run_dir=str(root / "run"), data=DataConfig(
        inputs=inputs, tokenizer=str(tok), prepared_dir=str(out), num_shards=data.pop("num_shards", NUM_SHARDS),
        num_workers=data.pop("num_workers", 1), **data))


def read_shard(path):
    tf = import_tf()
    out = []
    for raw in tf.data.TFRecordDataset(str(path)):
        raw = raw.numpy()
        ex = tf.train.Example.FromString(raw)
        f = ex.features.feature
        assert set(f.keys()) == set(FEATURES)
        out.append({"id": f["id"].bytes_list.value[0].decode(), "lang": f["lang"].bytes_list.value[0].decode(),
                    "tokens": list(f["tokens"].int64_list.value), "loss_mask": list(f["loss_mask"].int64_list.value),
                    "raw": raw, "canonical": ex.SerializeToString(deterministic=True)})
    return out


def digests(directory):
    return {p: hashlib.sha256(open(os.path.join(directory, p), "rb").read()).hexdigest()
            for p in sorted(os.listdir(directory)) if p.endswith(".tfrecord")}


@pytest.fixture(scope="module")
def prepared(setup, tmp_path_factory):
    root, tok, files = setup
    out = tmp_path_factory.mktemp("out1")
    result = run_prepare(make_cfg(root, tok, files, out))
    return out, result


def test_shards_hold_the_templated_examples(setup, prepared):
    root, tok_dir, _ = setup
    out, result = prepared
    tok = load_tokenizer(str(tok_dir))
    by_id = {r["id"]: r for r in RECORDS}
    names = [shard_name("train", s, NUM_SHARDS) for s in range(NUM_SHARDS)]
    assert sorted(os.listdir(out)) == sorted(["manifest.json"] + names + [n + ".done" for n in names])
    assert result.written == names and result.reused == []
    seen = []
    for s, name in enumerate(names):
        for i, ex in enumerate(read_shard(out / name)):
            assert ex["raw"] == ex["canonical"]  # our encoder == protobuf's deterministic serialisation
            rec = by_id[ex["id"]]
            k = RECORDS.index(rec)
            assert k % NUM_SHARDS == s and k // NUM_SHARDS == i  # round-robin, in input order
            rendered = T.render("sft", rec)
            assert ex["lang"] == rec["lang"]
            assert tok.decode(ex["tokens"]) == rendered.prompt + rendered.completion
            assert ex["tokens"][0] == tok.bos_id and ex["tokens"][-1] == tok.eos_id
            n_prompt = len(tok.encode(rendered.prompt))
            assert ex["loss_mask"] == [0] * n_prompt + [1] * (len(ex["tokens"]) - n_prompt)
            seen.append(ex["id"])
    assert sorted(seen) == sorted(by_id)  # every kept record exactly once


def test_manifest(setup, prepared):
    _, tok_dir, files = setup
    out, _ = prepared
    m = read_manifest(str(out))
    assert m["complete"] and m["split"] == "train" and m["num_shards"] == NUM_SHARDS
    assert m["template"] == {"name": "sft", "version": T.TEMPLATE_VERSION, "kind": "pairs", "trains": "targets"}
    tok = load_tokenizer(str(tok_dir))
    assert m["tokenizer"]["vocab_size"] == tok.vocab_size
    assert (m["tokenizer"]["bos_id"], m["tokenizer"]["eos_id"]) == (tok.bos_id, tok.eos_id)
    assert m["tokenizer"]["path"] == os.path.join(str(tok_dir), "tokenizer.json")
    # inputs: in == kept + skipped, per file and by reason
    assert [(i["source"], i["in"], i["kept"], i["skipped"]) for i in m["inputs"]] == [
        (str(files[0]), 52, 50, {"malformed_json": 1, "unknown_lang:lang": 1}),
        (str(files[1]), len(RECORDS) - 50 + 1, len(RECORDS) - 50, {"empty_field:output": 1})]
    for i in m["inputs"]:
        assert i["in"] == i["kept"] + sum(i["skipped"].values())
    assert m["totals"]["kept"] == m["num_examples"] == len(RECORDS)
    # shards and per-language stats agree with the files
    lengths: dict[str, list[int]] = {}
    loss: dict[str, int] = {}
    for shard, path in zip(m["shards"], shard_paths(str(out), m)):
        exs = read_shard(path)
        assert shard["complete"] and shard["examples"] == len(exs)
        assert shard["sha256"] == hashlib.sha256(open(path, "rb").read()).hexdigest()
        assert sum(shard["languages"].values()) == len(exs)
        for ex in exs:
            lengths.setdefault(ex["lang"], []).append(len(ex["tokens"]))
            loss[ex["lang"]] = loss.get(ex["lang"], 0) + sum(ex["loss_mask"])
    assert sorted(m["languages"]) == sorted(LANGS)
    for lang, st in m["languages"].items():
        arr = np.array(lengths[lang])
        assert st["count"] == st["examples"] == len(arr) == 9
        assert st["total_tokens"] == arr.sum() and st["max"] == arr.max() and st["loss_tokens"] == loss[lang]
        assert math.isclose(st["mean"], arr.mean(), abs_tol=1e-3)
        for q in (50, 90, 99):
            assert st[f"p{q}"] == np.percentile(arr, q, method="inverted_cdf")


def test_length_stats_percentiles():
    hist = {5: 1, 7: 8, 100: 1}
    st = length_stats(hist, loss_tokens=3)
    arr = np.repeat(list(hist), list(hist.values()))
    assert (st["count"], st["max"], st["total_tokens"], st["loss_tokens"]) == (10, 100, arr.sum(), 3)
    assert (st["p50"], st["p90"], st["p99"]) == tuple(np.percentile(arr, q, method="inverted_cdf") for q in (50, 90, 99))
    assert length_stats({})["count"] == 0


def test_serialize_example_is_a_deterministic_tf_example():
    tf = import_tf()
    feats = {"tokens": [0, 1, 127, 128, 300, 2**40, -1], "loss_mask": [0, 0, 1], "id": "x-1", "lang": "ur", "e": []}
    ex = tf.train.Example(features=tf.train.Features(feature={
        "tokens": tf.train.Feature(int64_list=tf.train.Int64List(value=feats["tokens"])),
        "loss_mask": tf.train.Feature(int64_list=tf.train.Int64List(value=feats["loss_mask"])),
        "id": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"x-1"])),
        "lang": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"ur"])),
        "e": tf.train.Feature(int64_list=tf.train.Int64List(value=[])),
    }))
    data = serialize_example(feats)
    assert data == ex.SerializeToString(deterministic=True)
    assert serialize_example(dict(reversed(list(feats.items())))) == data  # key order does not matter
    back = tf.train.Example.FromString(data).features.feature
    assert list(back["tokens"].int64_list.value) == feats["tokens"]
    assert back["e"].WhichOneof("kind") == "int64_list"  # an empty list keeps its type
    # a fixed byte layout: the first map entry is "e" (keys sorted), an empty Int64List
    assert data.startswith(b"\n") and b"\n\x01e\x12\x02\x1a\x00" in data


def test_same_bytes_with_more_workers_and_resume_rewrites_only_missing_shard(setup, prepared, tmp_path):
    root, tok, files = setup
    out1, _ = prepared
    out2 = tmp_path / "out2"
    cfg = make_cfg(root, tok, files, out2, num_workers=2)
    first = run_prepare(cfg)
    assert len(first.written) == NUM_SHARDS
    want = digests(out1)
    assert digests(out2) == want  # independent of the number of worker processes
    assert read_manifest(str(out2))["shards"] == read_manifest(str(out1))["shards"]

    # a complete rerun rewrites nothing
    before = {p: os.stat(out2 / p) for p in want}
    again = run_prepare(cfg)
    assert again.written == [] and len(again.reused) == NUM_SHARDS
    for p, st in before.items():
        assert (os.stat(out2 / p).st_mtime_ns, os.stat(out2 / p).st_ino) == (st.st_mtime_ns, st.st_ino)

    # delete one shard and its marker: only that shard is rewritten, with the same bytes
    victim = shard_name("train", 2, NUM_SHARDS)
    os.remove(out2 / victim)
    os.remove(out2 / (victim + ".done"))
    resumed = run_prepare(cfg)
    assert resumed.written == [victim]
    assert digests(out2) == want
    for p, st in before.items():
        if p != victim:
            assert (os.stat(out2 / p).st_mtime_ns, os.stat(out2 / p).st_ino) == (st.st_mtime_ns, st.st_ino)
    assert read_manifest(str(out2))["shards"] == read_manifest(str(out1))["shards"]

    # a shard file without its marker (an interrupted write) is redone too (in this process: each
    # worker pool costs a TensorFlow import per worker, and the worker count is not in the bytes)
    (out2 / victim).write_bytes(b"partial")
    os.remove(out2 / (victim + ".done"))
    assert run_prepare(make_cfg(root, tok, files, out2, num_workers=1)).written == [victim] and digests(out2) == want

    # another template changes the fingerprint: every shard is rewritten
    changed = run_prepare(make_cfg(root, tok, files, out2, num_workers=1, template="revgen"))
    assert len(changed.written) == NUM_SHARDS
    assert read_manifest(str(out2))["template"]["name"] == "revgen"
    assert digests(out2) != want


@pytest.mark.parametrize("template", ["revgen", "evaluator", "sft_assistant", "raw"])
def test_other_templates_train_the_right_part(setup, tmp_path, template):
    root, tok_dir, _ = setup
    labels = T.EVALUATOR_LABELS
    rows = [dict(r, label=labels[i % 3]) for i, r in enumerate(RECORDS[:20])] + [dict(RECORDS[0], id="bad-label", label="meh")]
    src = write_jsonl(tmp_path / "l.jsonl", rows)
    out = tmp_path / "out"
    result = run_prepare(make_cfg(root, tok_dir, [src], out, template=template, num_shards=2))
    tok = load_tokenizer(str(tok_dir))
    m = result.manifest
    if template == "evaluator":
        assert m["inputs"][0]["skipped"] == {"bad_value:label": 1}
    else:
        assert m["inputs"][0]["skipped"] == {}  # the others do not need a label
    assert m["template"]["name"] == template and m["template"]["trains"] == ("all" if template == "raw" else "targets")
    by_id = {r["id"]: r for r in rows}
    for path in shard_paths(str(out)):
        for ex in read_shard(path):
            rec = by_id[ex["id"]]
            trained = [t for t, w in zip(ex["tokens"], ex["loss_mask"]) if w]
            assert trained[-1] == tok.eos_id
            if template == "raw":  # the record's text (instruction here: pairs have no text), BOS untrained
                assert ex["tokens"][0] == tok.bos_id and ex["loss_mask"][0] == 0
                assert trained == ex["tokens"][1:] and tok.decode(trained[:-1]) == rec["instruction"]
                continue
            want = {"revgen": rec["instruction"], "evaluator": rec["label"]}.get(template, rec["output"])
            assert tok.decode(trained[:-1]) == want
            if template == "sft_assistant":
                assert tok.decode(ex["tokens"]).endswith("style of an AI assistant. \n\n### Response:" + rec["output"])


def test_sft_assistant_style_is_the_sft_assistant_task(setup, tmp_path):
    root, tok, files = setup
    a = run_prepare(make_cfg(root, tok, files[:1], tmp_path / "a", template="sft", sft_assistant_style=True))
    b = run_prepare(make_cfg(root, tok, files[:1], tmp_path / "b", template="sft_assistant"))
    assert a.manifest["template"]["name"] == b.manifest["template"]["name"] == "sft_assistant"
    assert a.manifest["fingerprint"] == b.manifest["fingerprint"] and digests(tmp_path / "a") == digests(tmp_path / "b")
    with pytest.raises(DataError, match="data.sft_assistant_style: applies to template sft only"):
        run_prepare(make_cfg(root, tok, files[:1], tmp_path / "c", template="revgen", sft_assistant_style=True))


def test_errors(setup, tmp_path):
    root, tok, files = setup
    with pytest.raises(DataError, match="data.inputs: empty"):
        run_prepare(make_cfg(root, tok, [], tmp_path / "o"))
    with pytest.raises(DataError, match="data.num_shards"):
        run_prepare(make_cfg(root, tok, files, tmp_path / "o", num_shards=0))
    cfg = make_cfg(root, tok, files, tmp_path / "o", strict=True)
    with pytest.raises(DataError, match=rf"{files[0]}:51: -: malformed_json"):
        run_prepare(cfg)
    assert not (tmp_path / "o" / "manifest.json").exists()
    assert not [p for p in os.listdir(tmp_path / "o") if p.endswith((".tmp", ".tfrecord"))]
    with pytest.raises(DataError, match="no manifest"):
        read_manifest(str(tmp_path / "o"))
    cfg = make_cfg(root, "", files, tmp_path / "o")
    with pytest.raises(DataError, match="data.tokenizer: not set"):
        run_prepare(cfg)


def run_entry(*args, cwd, timeout=300):
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run([sys.executable, str(REPO / "launch" / "tpu_run.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_prepare_job_through_the_entry_point(setup, prepared, tmp_path):
    root, tok, files = setup
    out1, _ = prepared
    cfg = {"job": "prepare", "run_dir": str(tmp_path / "run"),
           "data": {"inputs": [{"path": str(f)} for f in files], "tokenizer": str(tok), "num_shards": NUM_SHARDS,
                    "num_workers": 2}}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(cfg))
    proc = run_entry("--config", str(tmp_path / "p.yaml"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"prepared {len(RECORDS)} examples" in proc.stdout
    assert "malformed_json" in proc.stderr  # skipped lines are logged with file:line
    out = tmp_path / "run" / "data"  # default prepared_dir: <run_dir>/data
    assert digests(out) == digests(out1)
    proc = run_entry("--config", str(tmp_path / "p.yaml"), "--set", "data.strict=true",
                     "--set", f"data.prepared_dir={tmp_path / 'strict'}", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"{files[0]}:51: -: malformed_json" in proc.stderr.strip().splitlines()[-1]


def test_other_pod_hosts_wait_for_process_0(setup, prepared, tmp_path, monkeypatch):
    import dataclasses

    from xinst_jax.data import prepare

    root, tok, files = setup
    out1, _ = prepared
    before = digests(out1)
    cfg = make_cfg(root, tok, files, out1)
    cfg = dataclasses.replace(cfg, distributed=dataclasses.replace(cfg.distributed, process_id=1))
    result = run_prepare(cfg)  # process 0's manifest is there: nothing written, nothing waited for
    assert result.written == [] and result.manifest == read_manifest(str(out1)) and digests(out1) == before
    monkeypatch.setattr(prepare, "WAIT_TIMEOUT_S", 0.3)
    monkeypatch.setattr(prepare, "WAIT_POLL_S", 0.05)
    with pytest.raises(DataError, match="process 1 waited"):
        run_prepare(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, prepared_dir=str(tmp_path / "e"))))
    assert not (tmp_path / "e").exists()  # a waiting host writes nothing
    monkeypatch.setenv("TPU_WORKER_ID", "3")
    assert prepare.process_index(make_cfg(root, tok, files, out1)) == 3
