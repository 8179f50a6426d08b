"""Records: JSONL / JSONL.gz / Parquet / TFDS / gfile sources, validation by reason, strict mode."""

from __future__ import annotations

import gzip
import json
import logging

import pytest

from data_helpers import write_jsonl
from xinst_jax.config import ConfigError, DataInputConfig
from xinst_jax.data.records import DataError, RecordReader

LANGS = ["th", "ur", "ta", "en", "fi"]
GOOD = [
    {"id": "a", "lang": "th", "instruction": "Say hello.", "output": "สวัสดีครับ"},
    {"id": 7, "lang": "UR", "instruction": "Say hello.", "output": "سلام", "score": 0.5},
    {"lang": "ta", "instruction": "Say hello.", "output": "வணக்கம்\u2028இரண்டு", "meta": {"src": "x"}},
]


def reader(**kw) -> RecordReader:
    return RecordReader(kw.pop("languages", LANGS), kw.pop("max_chars", 50), kw.pop("strict", False), **kw)


# Each bad line and the reason key it must be counted under.
BAD = [
    (b'{"lang": "th", "instruction": "x", "output": ', "malformed_json"),
    (b'{"lang": "th", "instruction": "x", "output": "\xff\xfe"}', "invalid_utf8"),
    (b'["a list"]', "not_object"),
    (json.dumps({"lang": "th", "output": "y"}).encode(), "missing_field:instruction"),
    (json.dumps({"lang": "th", "instruction": "x", "output": None}).encode(), "missing_field:output"),
    (json.dumps({"lang": "th", "instruction": "   ", "output": "y"}).encode(), "empty_field:instruction"),
    (json.dumps({"lang": "th", "instruction": 3, "output": "y"}).encode(), "bad_type:instruction"),
    (json.dumps({"lang": "xx", "instruction": "x", "output": "y"}).encode(), "unknown_lang:lang"),
    (json.dumps({"instruction": "x", "output": "y"}).encode(), "missing_field:lang"),
    (json.dumps({"lang": "th", "instruction": "x", "output": "y" * 51}).encode(), "too_long:output"),
    (json.dumps({"id": [1], "lang": "th", "instruction": "x", "output": "y"}).encode(), "bad_type:id"),
]


def mixed_file(tmp_path, name="mixed.jsonl"):
    lines = [json.dumps(GOOD[0], ensure_ascii=False).encode("utf-8"), b""]
    for raw, _ in BAD:
        lines.append(raw)
    lines += [json.dumps(r, ensure_ascii=False).encode("utf-8") for r in GOOD[1:]]
    path = tmp_path / name
    path.write_bytes(b"\xef\xbb\xbf" + b"\n".join(lines) + b"\n   \n")
    return path


def test_jsonl_counts_every_reason_and_keeps_good_records(tmp_path, caplog):
    path = mixed_file(tmp_path)
    r = reader()
    with caplog.at_level(logging.WARNING, logger="xinst_jax.data.records"):
        records = list(r.read([DataInputConfig(path=str(path))]))
    assert [x["id"] for x in records] == ["a", "7", f"{path.name}:{len(BAD) + 4}"]  # default id: file:line
    assert records[1]["lang"] == "ur"  # lower-cased
    assert records[1]["meta"] == {"score": 0.5}  # unmapped fields ride along
    assert records[2]["meta"] == {"src": "x"}
    assert records[2]["output"] == GOOD[2]["output"]  # U+2028 inside a string is not a line break
    assert records[0]["output"] == "สวัสดีครับ"  # the BOM before line 1 is not part of the record
    (stats,) = r.stats
    expected = {}
    for _, reason in BAD:
        expected[reason] = expected.get(reason, 0) + 1
    assert dict(stats.skipped) == expected
    assert stats.n_in == len(GOOD) + len(BAD) and stats.kept == len(GOOD)
    assert stats.n_in == stats.kept + stats.n_skipped
    assert stats.blank_lines == 2
    # each bad line logged as file:line: field: reason
    logged = "\n".join(m for m in caplog.messages)
    assert f"{path}:3: -: malformed_json" in logged
    assert f"{path}:4: -: invalid_utf8" in logged
    assert f"{path}:6: instruction: missing_field" in logged
    assert f"{path}:10: lang: unknown_lang" in logged


def test_first_few_per_reason_logged_then_summarised(tmp_path, caplog):
    path = write_jsonl(tmp_path / "many.jsonl", ["{oops"] * 10)
    r = reader(log_first=3)
    with caplog.at_level(logging.WARNING, logger="xinst_jax.data.records"):
        assert list(r.read([DataInputConfig(path=str(path))])) == []
    per_line = [m for m in caplog.messages if m.startswith("skipped ")]
    assert len(per_line) == 3
    assert any("10 records skipped for malformed_json" in m for m in caplog.messages)
    assert r.stats[0].skipped == {"malformed_json": 10}


@pytest.mark.parametrize("raw, reason", BAD, ids=[reason for _, reason in BAD])
def test_strict_names_file_line_field(tmp_path, raw, reason):
    path = tmp_path / "one.jsonl"
    path.write_bytes(json.dumps(GOOD[0], ensure_ascii=False).encode() + b"\n" + raw + b"\n")
    with pytest.raises(DataError) as e:
        list(reader(strict=True).read([DataInputConfig(path=str(path))]))
    assert isinstance(e.value, ConfigError)  # the entry point turns it into exit code 2
    msg = str(e.value)
    field = reason.split(":")[1] if ":" in reason else "-"
    assert f"{path}:2: {field}: {reason.split(':')[0]}" in msg, msg


def test_gzip_reads_like_plain(tmp_path):
    plain = mixed_file(tmp_path)
    gz = tmp_path / "mixed.jsonl.gz"
    gz.write_bytes(gzip.compress(plain.read_bytes()))
    a, b = reader(), reader()
    ra = list(a.read([DataInputConfig(path=str(plain))]))
    rb = list(b.read([DataInputConfig(path=str(gz))]))
    for x in ra + rb:
        x.pop("id")  # the default id names the file
    assert ra == rb
    assert a.stats[0].skipped == b.stats[0].skipped


def test_truncated_gzip_is_an_error_not_a_silent_loss(tmp_path):
    data = gzip.compress(b"".join(json.dumps(GOOD[0]).encode() + b"\n" for _ in range(200)))
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="cut.jsonl.gz"):
        list(reader().read([DataInputConfig(path=str(path))]))


def test_input_lang_and_field_map(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"q": "Translate.", "a": "Kiitos", "uid": "k1"},
                                               {"q": "Translate.", "a": "Hei", "lang": "en", "uid": "k2"}])
    inp = DataInputConfig(path=str(path), lang="fi", field_map={"instruction": "q", "output": "a", "id": "uid"})
    records = list(reader().read([inp]))
    assert [(r["id"], r["lang"], r["instruction"], r["output"]) for r in records] == [
        ("k1", "fi", "Translate.", "Kiitos"), ("k2", "en", "Translate.", "Hei")]
    assert records[0]["meta"] == {}


def test_label_validated_only_when_required(tmp_path):
    rows = [{"lang": "th", "instruction": "x", "output": "y", "label": "best"},
            {"lang": "th", "instruction": "x", "output": "y", "label": "great"},
            {"lang": "th", "instruction": "x", "output": "y", "label": 3}]
    path = write_jsonl(tmp_path / "l.jsonl", rows)
    ev = reader(required=("instruction", "output", "label"), allowed={"label": ("best", "flawed", "worst")})
    assert [r["label"] for r in ev.read([DataInputConfig(path=str(path))])] == ["best"]
    assert ev.stats[0].skipped == {"bad_value:label": 1, "bad_type:label": 1}
    sft = reader()  # the sft template does not need a label: all three kept, label in meta
    kept = list(sft.read([DataInputConfig(path=str(path))]))
    assert len(kept) == 3 and kept[2]["meta"] == {"label": 3}


def test_any_of_text_fields(tmp_path):
    rows = [{"lang": "th", "text": "ข้อความ"}, {"lang": "th", "output": "คำตอบ"}, {"lang": "th", "text": " "},
            {"lang": "th"}]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    r = reader(required=(), any_of=("text", "instruction", "output"))
    got = list(r.read([DataInputConfig(path=str(path))]))
    assert [("text" in g, "output" in g) for g in got] == [(True, False), (False, True)]
    assert r.stats[0].skipped == {"missing_field:text|instruction|output": 2}


def test_located_records_and_kept_bad_lines(tmp_path):
    """read_located: each record with its file:line and the id as the row held it; the first
    keep_bad bad lines are kept as report lines, across sources."""
    path = mixed_file(tmp_path)
    second = write_jsonl(tmp_path / "second.jsonl", ["{oops", GOOD[0]])
    r = reader(keep_bad=3)
    located = list(r.read_located([DataInputConfig(path=str(path)), DataInputConfig(path=str(second))]))
    assert [(x.source, x.line, x.source_id) for x in located] == [
        (str(path), 1, "a"), (str(path), len(BAD) + 3, 7), (str(path), len(BAD) + 4, f"{path.name}:{len(BAD) + 4}"),
        (str(second), 2, "a")]
    assert located[1].record["id"] == "7" and located[1].where == f"{path}:{len(BAD) + 3}"
    assert r.bad == [f"{path}:3: -: malformed_json (Expecting value at column 46)",
                     f"{path}:4: -: invalid_utf8 (byte 46)", f"{path}:5: -: not_object (list)"]
    assert r.totals()["skipped_total"] == len(BAD) + 1  # counted in full, kept only in part
    with pytest.raises(DataError, match=r"^.*second.jsonl:1: -: malformed_json .*\[generate.strict is true\]$"):
        list(reader(strict=True, strict_key="generate.strict").read([DataInputConfig(path=str(second))]))


def test_a_copy_is_named_as_the_file_it_copies(tmp_path, caplog):
    """shown_as: a local copy of a URL (paths.read_once) is named as the URL in skipped-line
    warnings, kept bad lines, stats, located records and strict errors; never as the copy."""
    copy = write_jsonl(tmp_path / "copy.jsonl", ["{oops", GOOD[0]])
    url = "gs://bucket/pairs/in.jsonl"
    r = reader(keep_bad=1, shown_as={str(copy): url})
    with caplog.at_level(logging.WARNING):
        located = list(r.read_located([DataInputConfig(path=str(copy))]))
    assert [(x.source, x.line) for x in located] == [(url, 2)] and r.stats[0].source == url
    assert r.bad == [f"{url}:1: -: malformed_json (Expecting property name enclosed in double quotes at column 2)"]
    assert f"skipped {url}:1: -: malformed_json" in caplog.text and str(copy) not in caplog.text
    with pytest.raises(DataError, match=r"^gs://bucket/pairs/in.jsonl:1: -: malformed_json"):
        list(reader(strict=True, shown_as={str(copy): url}).read([DataInputConfig(path=str(copy))]))


def test_ids_and_langs_the_caller_requires(tmp_path):
    rows = [{"id": 5, "prompt": "p"}, {"prompt": "no id"}, {"id": "x", "prompt": "p", "lang": "XX"},
            {"id": "y", "prompt": "z" * 51}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    # generation prompts: ids required, no language needed (kept as given, "" when absent)
    r = reader(required=(), any_of=("prompt",), require_id=True, require_lang=False)
    got = list(r.read_located([DataInputConfig(path=str(path))]))
    assert [(x.source_id, x.record["lang"], x.record["prompt"]) for x in got] == [(5, "", "p"), ("x", "xx", "p")]
    assert r.stats[0].skipped == {"missing_field:id": 1, "too_long:prompt": 1}  # max_chars applies to prompts
    # prepare: ids default to file:line, lang required
    r = reader(required=(), any_of=("prompt",))
    assert list(r.read([DataInputConfig(path=str(path))])) == []
    assert r.stats[0].skipped == {"missing_field:lang": 3, "unknown_lang:lang": 1}
    with pytest.raises(ValueError, match="unknown record fields"):
        reader(required=("answer",))


def test_glob_directory_sorted_and_no_match(tmp_path):
    (tmp_path / "d").mkdir()
    write_jsonl(tmp_path / "d" / "b.jsonl", [GOOD[1]])
    write_jsonl(tmp_path / "d" / "a.jsonl", [GOOD[0]])
    (tmp_path / "d" / "notes.txt").write_text("ignored")
    for path in (str(tmp_path / "d"), str(tmp_path / "d" / "*.jsonl")):
        r = reader()
        assert [x["id"] for x in r.read([DataInputConfig(path=path)])] == ["a", "7"]
        assert [s.source.rsplit("/", 1)[1] for s in r.stats] == ["a.jsonl", "b.jsonl"]
    with pytest.raises(DataError, match=r"data.inputs\[1\].path: no files match"):
        list(reader().read([DataInputConfig(path=str(tmp_path / "d")), DataInputConfig(path=str(tmp_path / "nope*"))]))
    with pytest.raises(DataError, match="exactly one of path"):
        list(reader().read([DataInputConfig()]))


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({
        "id": ["p1", "p2", "p3", "p4"],
        "lang": ["th", "ta", None, "ur"],
        "instruction": ["Greet.", "Greet.", "Greet.", "Greet."],
        "output": [b"\xe0\xb8\xaa\xe0\xb8\xa7\xe0\xb8\xb1\xe0\xb8\xaa\xe0\xb8\x94\xe0\xb8\xb5", b"\xff", b"x",
                   "سلام".encode()],
        "n": [1, 2, 3, 4],
    })
    path = tmp_path / "pairs.parquet"
    pq.write_table(table, path, row_group_size=2)
    r = reader()
    records = list(r.read([DataInputConfig(path=str(path))]))
    assert [(x["id"], x["lang"], x["output"], x["meta"]) for x in records] == [
        ("p1", "th", "สวัสดี", {"n": 1}), ("p4", "ur", "سلام", {"n": 4})]
    assert r.stats[0].skipped == {"invalid_utf8:output": 1, "missing_field:lang": 1}
    assert r.stats[0].n_in == 4
    with pytest.raises(DataError, match=r"pairs.parquet:2: output: invalid_utf8"):
        list(reader(strict=True).read([DataInputConfig(path=str(path))]))


def test_url_paths_go_through_the_path_layer(tmp_path):
    """A gs:// glob is read through the path layer (xinst_jax/paths.py; here gs:// in memory)."""
    from memory_gcs import memory_gcs

    from xinst_jax import paths

    src = mixed_file(tmp_path).read_bytes()
    with memory_gcs():
        paths.write_atomic("gs://xinst_records/m.jsonl.gz", gzip.compress(src))
        r = reader()
        records = list(r.read([DataInputConfig(path="gs://xinst_records/*.jsonl.gz")]))
        assert [x["id"] for x in records][:2] == ["a", "7"]
        assert r.stats[0].source == "gs://xinst_records/m.jsonl.gz"
        assert r.stats[0].n_in == r.stats[0].kept + r.stats[0].n_skipped == len(GOOD) + len(BAD)
        dir_records = list(reader().read([DataInputConfig(path="gs://xinst_records")]))  # a directory: its files
        assert [x["id"] for x in dir_records] == [x["id"] for x in records]


TFDS_ROWS = [
    {"lang": "th", "instruction": "Greet.", "output": "สวัสดี"},
    {"lang": "ta", "instruction": "Greet.", "output": "வணக்கம்"},
    {"lang": "ur", "instruction": "Greet.", "output": ""},  # empty: skipped and counted
    {"lang": "zz", "instruction": "Greet.", "output": "?"},  # unknown language
]


@pytest.fixture(scope="module")
def tiny_tfds(tmp_path_factory):
    """A TFDS dataset built here from in-memory rows (no download), registered by name."""
    from xinst_jax.data.records import import_tf

    import_tf()
    import tensorflow_datasets as tfds
    from etils import epath

    data_dir = tmp_path_factory.mktemp("tfds")

    class XinstTinyPairs(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")
        pkg_dir_path = epath.Path(data_dir)  # no package beside this test module to hold metadata

        def _info(self):
            text = tfds.features.Text()
            return self.dataset_info_from_configs(
                features=tfds.features.FeaturesDict({"lang": text, "instruction": text, "output": text}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i, row in enumerate(TFDS_ROWS):
                yield i, row

    XinstTinyPairs(data_dir=str(data_dir)).download_and_prepare()
    return "xinst_tiny_pairs", str(data_dir)


def test_tfds_by_name(tiny_tfds):
    name, data_dir = tiny_tfds
    r = reader()
    records = list(r.read([DataInputConfig(tfds_name=name, tfds_data_dir=data_dir, split="train")]))
    assert sorted((x["lang"], x["output"]) for x in records) == [("ta", "வணக்கம்"), ("th", "สวัสดี")]
    (stats,) = r.stats
    assert stats.source == f"tfds:{name}/train"
    assert (stats.n_in, stats.kept) == (4, 2)
    assert dict(stats.skipped) == {"empty_field:output": 1, "unknown_lang:lang": 1}
    with pytest.raises(DataError, match="tfds_name 'xinst_no_such_dataset'"):
        list(reader().read([DataInputConfig(tfds_name="xinst_no_such_dataset", tfds_data_dir=data_dir)]))
