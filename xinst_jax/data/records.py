"""Records: read JSONL (.jsonl, .jsonl.gz), Parquet and TFDS datasets, validate, normalise.

A record (DESIGN.md) is a dict with `id`, `lang` (ISO 639-1), the fields of its kind (`text` for
corpus documents; `instruction`, `output` for pairs; `label` for evaluator examples; `prompt` for
the raw template's generation prompts) and `meta` (every other field of the source row, plus the
source's own `meta` dict).

This is the one reader of records: prepare, train_tokenizer and the generate job all use it, so a
bad line is skipped and counted (or, with strict, raised) the same way everywhere.
`RecordReader.read_located` yields each record with its source and line (`Located`).

Sources: files are opened through the path layer (xinst_jax/paths.py): plain `open` for local
paths, etils.epath for `gs://` URLs (tf.io.gfile underneath when TensorFlow is installed).
`DataInputConfig.path` is a file, a glob, or a directory (its *.jsonl, *.jsonl.gz and *.parquet
files); files are read in sorted order.
`DataInputConfig.tfds_name` reads a TFDS dataset by name (`tfds.builder(name, data_dir)`; already
prepared, never downloaded here).

Bad input is never lost silently. Each source (file or TFDS split) gets a `SourceStats` with
`in` (non-blank lines / rows), `kept` and `skipped` counts by reason, `in == kept + sum(skipped)`.
Reasons (a field-specific reason is written `reason:field`):

  invalid_utf8            the line is not valid UTF-8
  malformed_json          the line does not parse as JSON
  not_object              the line is JSON but not an object
  missing_field:F         F absent or null (`id` defaults to `<file>:<line>` unless the caller
                          requires ids; `lang` defaults to the input's `lang`)
  bad_type:F              F is not a string (`id` may also be an integer)
  empty_field:F           F is empty or whitespace only
  too_long:F              F has more than `data.max_chars` characters
  unknown_lang:lang       `lang` (lower-cased) is not one of `data.languages`
  bad_value:F             F is not one of its allowed values (the evaluator `label`)

The first few of each reason per source are logged as `file:line: field: reason`, and the first
`keep_bad` of them all are kept as such lines (`RecordReader.bad`, for reports). With
`strict: true` the first bad record raises `DataError` (a ConfigError: exit code 2) naming
file:line:field. Blank lines are not records: they are counted as `blank_lines`, not in `in`.
Only the fields the caller needs (the template's) are validated and taken into the record; any
other field of the source row goes into `meta`. `lang` is required and checked against the
languages unless the caller says its template does not need it (then it is taken as given, or
"" when absent). Field values are kept exactly as read (no
stripping, no Unicode normalisation): what the tokenizer sees is what the file holds.
"""

from __future__ import annotations

import collections
import gzip
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Optional, Sequence

from xinst_jax import paths
from xinst_jax.config import ConfigError, DataInputConfig
from xinst_jax.paths import import_tf, is_remote  # noqa: F401 (re-exported: prepare, tokenizer, ...)

log = logging.getLogger(__name__)

TEXT_FIELDS = ("text", "instruction", "output")  # the free-text fields of records (tokenizer training)
LIMITED_FIELDS = TEXT_FIELDS + ("prompt",)  # max_chars applies
CONTENT_FIELDS = ("text", "instruction", "output", "label", "prompt")  # validated when the caller needs them
RECORD_FIELDS = ("id", "lang") + CONTENT_FIELDS + ("meta",)
FILE_SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet")
LOG_FIRST = 3  # bad records logged per reason and source


class DataError(ConfigError):
    """Bad input data or a data path that does not resolve (exit code 2 at the entry point)."""


# --------------------------------------------------------------------------- files (the path layer)


def open_binary(path: str, mode: str = "rb"):
    """A binary file object through the path layer: plain `open` locally, epath for gs:// and co."""
    return paths.open(path, mode)


def glob_files(pattern: str) -> list[str]:
    """A directory's record files, or the files a glob (or a plain path) names, sorted."""
    if paths.isdir(pattern):
        base = pattern.rstrip("/") if is_remote(pattern) else pattern
        return [paths.join(base, n) for n in paths.listdir(pattern) if n.endswith(FILE_SUFFIXES)]
    return paths.glob(pattern)


# --------------------------------------------------------------------------- stats


@dataclass
class SourceStats:
    source: str  # file path or tfds:<name>/<split>
    input_index: int = 0  # which data.inputs entry
    n_in: int = 0
    kept: int = 0
    skipped: collections.Counter = field(default_factory=collections.Counter)
    blank_lines: int = 0

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    def to_dict(self) -> dict:
        return {"source": self.source, "input": self.input_index, "in": self.n_in, "kept": self.kept,
                "skipped": dict(sorted(self.skipped.items())), "skipped_total": self.n_skipped,
                "blank_lines": self.blank_lines}


@dataclass(frozen=True)
class Located:
    """A record with where it came from: `source` (file path or tfds:<name>/<split>), `line`
    (1-based line or row) and `source_id`, the id as the row held it (str or int; the default
    `<file>:<line>` when absent), where `record["id"]` is always a string."""

    record: dict
    source: str
    line: int
    source_id: Any

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"


class _Bad(Exception):
    def __init__(self, reason: str, fld: str = "-", detail: str = ""):
        super().__init__(reason)
        self.reason, self.field, self.detail = reason, fld, detail

    @property
    def key(self) -> str:
        return f"{self.reason}:{self.field}" if self.field != "-" else self.reason


# --------------------------------------------------------------------------- reader


class RecordReader:
    """Reads `DataInputConfig`s into validated records and keeps per-source stats.

    required: fields every record must have (non-empty strings within max_chars);
    any_of: at least one of these must be present (e.g. any text field, for tokenizer training);
    allowed: field -> allowed values (e.g. the evaluator's labels);
    require_id: a row without `id` is bad (missing_field:id) instead of getting `<file>:<line>`;
    require_lang: `lang` must be present and one of `languages` (else taken as given, "" if absent);
    keep_bad: this many bad-line descriptions are kept for reports (`bad`), all sources together.
    shown_as: file path -> the name that messages, stats and `bad` give it (a local copy of a URL
    is named as the URL).
    """

    def __init__(self, languages: Sequence[str], max_chars: int, strict: bool = False,
                 required: Sequence[str] = ("instruction", "output"), any_of: Sequence[str] = (),
                 allowed: Optional[dict[str, Sequence[str]]] = None, log_first: int = LOG_FIRST,
                 require_id: bool = False, require_lang: bool = True, keep_bad: int = 0,
                 strict_key: str = "data.strict", shown_as: Optional[dict[str, str]] = None):
        self.languages = set(languages)
        self.shown_as = dict(shown_as or {})
        self.max_chars = max_chars
        self.strict = strict
        self.required = tuple(required)
        self.any_of = tuple(any_of)
        self.allowed = {k: tuple(v) for k, v in (allowed or {}).items()}
        self.log_first = log_first
        self.require_id = require_id
        self.require_lang = require_lang
        self.keep_bad = keep_bad
        self.strict_key = strict_key  # named in strict errors
        self.bad: list[str] = []  # "file:line: field: reason (detail)", the first keep_bad
        self.stats: list[SourceStats] = []
        unknown = (set(self.required) | set(self.any_of) | set(self.allowed)) - set(CONTENT_FIELDS)
        if unknown:
            raise ValueError(f"RecordReader: unknown record fields {sorted(unknown)} (known: {CONTENT_FIELDS})")

    # ---- public

    def read(self, inputs: Sequence[DataInputConfig]) -> Iterator[dict]:
        for located in self.read_located(inputs):
            yield located.record

    def read_located(self, inputs: Sequence[DataInputConfig], key: str = "data.inputs") -> Iterator[Located]:
        for i, inp in enumerate(inputs):
            yield from self.read_input(inp, i, f"{key}[{i}]")

    def read_input(self, inp: DataInputConfig, index: int = 0, key: str = "") -> Iterator[Located]:
        key = key or f"data.inputs[{index}]"
        if bool(inp.path) == bool(inp.tfds_name):
            raise DataError(f"{key}: set exactly one of path (JSONL/Parquet files) and tfds_name "
                            f"(got path={inp.path!r}, tfds_name={inp.tfds_name!r})")
        if inp.tfds_name:
            yield from self._read_source(f"tfds:{inp.tfds_name}/{inp.split}", _tfds_rows(inp), inp, index)
            return
        files = glob_files(inp.path)
        if not files:
            raise DataError(f"{key}.path: no files match {inp.path!r}")
        for path in files:
            if path.endswith((".jsonl", ".jsonl.gz")):
                rows = _jsonl_rows(path)
            elif path.endswith(".parquet"):
                rows = _parquet_rows(path)
            else:
                raise DataError(f"{key}.path: {path}: unsupported file type (expected {', '.join(FILE_SUFFIXES)})")
            yield from self._read_source(self.shown_as.get(path, path), rows, inp, index)

    def totals(self) -> dict:
        skipped: collections.Counter = collections.Counter()
        for s in self.stats:
            skipped.update(s.skipped)
        return {"in": sum(s.n_in for s in self.stats), "kept": sum(s.kept for s in self.stats),
                "skipped": dict(sorted(skipped.items())), "skipped_total": sum(skipped.values()),
                "blank_lines": sum(s.blank_lines for s in self.stats)}

    # ---- internals

    def _read_source(self, source: str, rows: Iterable[tuple[int, Any]], inp: DataInputConfig,
                     index: int) -> Iterator[Located]:
        stats = SourceStats(source=source, input_index=index)
        self.stats.append(stats)
        base = os.path.basename(source.rstrip("/"))
        logged: collections.Counter = collections.Counter()
        for line, row in rows:
            if row is _BLANK:
                stats.blank_lines += 1
                continue
            stats.n_in += 1
            try:
                record, source_id = self._normalise(row, inp, f"{base}:{line}")
            except _Bad as bad:
                where = f"{source}:{line}: {bad.field}: {bad.reason}" + (f" ({bad.detail})" if bad.detail else "")
                if self.strict:
                    raise DataError(f"{where} [{self.strict_key} is true]") from None
                stats.skipped[bad.key] += 1
                logged[bad.key] += 1
                if logged[bad.key] <= self.log_first:
                    log.warning("skipped %s", where)
                if len(self.bad) < self.keep_bad:
                    self.bad.append(where)
                continue
            stats.kept += 1
            yield Located(record, source, line, source_id)
        for key, n in sorted(logged.items()):
            if n > self.log_first > 0:  # log_first 0: the caller reports bad lines itself
                log.warning("%s: %d records skipped for %s (first %d logged)", source, n, key, self.log_first)

    def _normalise(self, row: Any, inp: DataInputConfig, default_id: str) -> tuple[dict, Any]:
        if isinstance(row, _BadRow):
            raise _Bad(row.reason, detail=row.detail)
        if not isinstance(row, dict):
            raise _Bad("not_object", detail=type(row).__name__)
        fmap = inp.field_map
        src_name = {f: fmap.get(f, f) for f in RECORD_FIELDS}

        def get(f: str) -> Any:
            value = row.get(src_name[f])
            if isinstance(value, bytes):  # Parquet binary columns, TFDS text features
                try:
                    value = value.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise _Bad("invalid_utf8", f, str(e)) from None
            return value

        out: dict[str, Any] = {}
        # id: a string or integer; absent -> <file>:<line>
        rid = get("id")
        if rid is None:
            if self.require_id:
                raise _Bad("missing_field", "id")
            rid = default_id
        elif isinstance(rid, bool) or not isinstance(rid, (str, int)):
            raise _Bad("bad_type", "id", type(rid).__name__)
        out["id"] = str(rid)
        if not out["id"].strip():
            raise _Bad("empty_field", "id")
        # lang
        lang = get("lang")
        if lang is None:
            lang = inp.lang or None
        if lang is None and not self.require_lang:
            lang = ""
        if lang is None:
            raise _Bad("missing_field", "lang")
        if not isinstance(lang, str):
            raise _Bad("bad_type", "lang", type(lang).__name__)
        lang = lang.strip().lower()
        if self.require_lang:
            if not lang:
                raise _Bad("empty_field", "lang")
            if lang not in self.languages:
                raise _Bad("unknown_lang", "lang", repr(lang))
        out["lang"] = lang
        # content fields: those the caller needs are validated; others ride along in `meta`
        checked = set(self.required) | set(self.any_of)
        for f in CONTENT_FIELDS:
            if f not in checked:
                continue
            value = get(f)
            if value is None:
                if f in self.required:
                    raise _Bad("missing_field", f)
                continue
            if not isinstance(value, str):
                raise _Bad("bad_type", f, type(value).__name__)
            if not value.strip():
                if f in self.required:
                    raise _Bad("empty_field", f)
                continue  # an empty any_of field counts as absent
            if f in LIMITED_FIELDS and len(value) > self.max_chars:
                raise _Bad("too_long", f, f"{len(value)} > max_chars {self.max_chars}")
            if f in self.allowed and value not in self.allowed[f]:
                raise _Bad("bad_value", f, f"{value!r} not in {list(self.allowed[f])}")
            out[f] = value
        if self.any_of and not any(f in out for f in self.any_of):
            raise _Bad("missing_field", "|".join(self.any_of))
        # meta: the source's meta dict plus every field not taken into the record
        meta = row.get(src_name["meta"])
        meta = dict(meta) if isinstance(meta, dict) else ({} if meta is None else {"meta": meta})
        used = {src_name[f] for f in ("id", "lang", "meta")} | {src_name[f] for f in out}
        for k, v in row.items():
            if k not in used:
                meta[k] = _plain(v)
        out["meta"] = meta
        return out, rid


def _plain(value: Any) -> Any:
    """JSON-able meta values (numpy scalars/arrays from Parquet or TFDS become Python values)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if hasattr(value, "tolist"):
        return _plain(value.tolist())
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# --------------------------------------------------------------------------- sources


class _BlankType:
    pass


_BLANK = _BlankType()


@dataclass
class _BadRow:
    reason: str
    detail: str = ""


def _jsonl_rows(path: str) -> Iterator[tuple[int, Any]]:
    """(line number, parsed object | _BadRow | _BLANK). Lines split at b"\\n" only, so U+2028 and
    other Unicode line breaks inside strings stay inside their record."""
    with open_binary(path) as raw:
        f = gzip.GzipFile(fileobj=raw, mode="rb") if path.endswith(".gz") else raw
        try:
            for lineno, line in enumerate(f, 1):
                if lineno == 1 and line.startswith(b"\xef\xbb\xbf"):
                    line = line[3:]  # a UTF-8 BOM at the start of the file
                line = line.rstrip(b"\n").rstrip(b"\r")
                if not line.strip():
                    yield lineno, _BLANK
                    continue
                try:
                    text = line.decode("utf-8")
                except UnicodeDecodeError as e:
                    yield lineno, _BadRow("invalid_utf8", f"byte {e.start}")
                    continue
                try:
                    yield lineno, json.loads(text)
                except json.JSONDecodeError as e:
                    yield lineno, _BadRow("malformed_json", f"{e.msg} at column {e.colno}")
                except RecursionError:
                    yield lineno, _BadRow("malformed_json", "nested too deeply")
        except (EOFError, OSError, gzip.BadGzipFile) as e:
            raise DataError(f"{path}: unreadable ({e}); records after the last good line would be lost") from None


def _parquet_rows(path: str) -> Iterator[tuple[int, Any]]:
    """(row number from 1, row dict)."""
    import pyarrow.parquet as pq

    with open_binary(path) as f:
        try:
            pf = pq.ParquetFile(f if is_remote(path) else path)
        except Exception as e:  # noqa: BLE001 (pyarrow raises several types for a bad file)
            raise DataError(f"{path}: not a readable Parquet file ({e})") from None
        n = 0
        for batch in pf.iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                n += 1
                yield n, row


def _tfds_rows(inp: DataInputConfig) -> Iterator[tuple[int, Any]]:
    """(example number from 1, example dict of numpy values) from a prepared TFDS dataset."""
    import_tf()
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(inp.tfds_name, data_dir=inp.tfds_data_dir or None)
        ds = builder.as_dataset(split=inp.split, shuffle_files=False)
    except Exception as e:  # noqa: BLE001 (tfds raises many kinds: not found, not prepared, bad split)
        raise DataError(f"data.inputs: tfds_name {inp.tfds_name!r} split {inp.split!r}: {e}") from None
    for n, example in enumerate(tfds.as_numpy(ds), 1):
        yield n, example


def json_objects(path, key: str) -> Iterator[tuple[str, dict]]:
    """(`key: file:line`, object) for every non-blank line of a JSONL file whose schema is not a
    record's (benchmark items, reference answers); a line that is not a JSON object is a
    DataError naming `key`, the file and the line."""
    with open_binary(str(path)) as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            where = f"{key}: {path}:{n}"
            try:
                obj = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, ValueError) as e:
                raise DataError(f"{where}: not a JSON line ({e})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{where}: expected a JSON object")
            yield where, obj


def write_jsonl(path: str, records: Iterable[dict]) -> int:
    """Write records as UTF-8 JSONL (gzip when the name ends in .gz); returns the count."""
    n = 0
    with open_binary(path, "wb") as raw:
        out = gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) if path.endswith(".gz") else raw
        try:
            for r in records:
                out.write(json.dumps(r, ensure_ascii=False).encode("utf-8") + b"\n")
                n += 1
        finally:
            if out is not raw:
                out.close()
    return n
