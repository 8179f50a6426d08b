"""The tf.data input pipeline: prepared TFRecord shards -> this host's packed Batch (numpy).

    shards ─ per host (files, or records when the file count does not divide) ─┐
    for each language l: interleave this host's shards → keep records of l → shuffle(seed) → repeat
    sample_from_datasets(p_l)  (temperature over example counts, or explicit weights)
    batch(pack_window) → parse (ragged tokens, loss_mask) → prefetch    ← tf.data, C++ threads
    ─────────────────────────────────────────────────────────────────────────────────────────
    truncate/split overlong → best-fit decreasing of each window into a pool of `pack_pool`
    open rows → rows queue → Batch of `rows` rows                                  ← numpy

Every host builds its own iterator over a disjoint part of the data (whole shards when their
count divides by the host count, else every host reads every shard and keeps the records
i ≡ process_index mod process_count), so within an epoch of a language every example reaches
exactly one host once. Each language's stream reads this host's shards and keeps its own records
(a cheap parse of `lang` only), so the shards are read once per language; the prepare job deals
records round-robin over the shards, so every shard holds every language. TensorFlow is imported
lazily, here only: the trainer sees numpy batches.

Packing runs outside tf.data on whole windows of `pack_window` examples (one tf.data element
each): a window is packed completely inside one `__next__`, so the packer's state between calls
is just its open rows and its queue of finished rows.

Exact resume: `get_state()` returns (JSON-able) this host's tf.data iterator checkpoint (it holds
the shuffle buffers, the sampler's RNG, the prefetched windows and the epoch counts; no Python
function lives inside tf.data, so TensorFlow saves it without any external-state policy), the
packer's open and finished rows, and the counters. `set_state()` on a freshly built source with
the same config puts it back, so the next batches are the ones an uninterrupted run would yield.
A state from a different host count, host index, pipeline config or prepared data is refused
with a message. The state's size is dominated by the shuffle buffers (`data.shuffle_buffer`
serialized examples in all, split over the languages: ~20-35 MB per host at the default 10,000).

With `num_epochs: n` the stream ends after n passes over every language: the pool is flushed,
the last batch is padded with empty rows (segment_ids 0), then StopIteration. Hosts may then
produce different numbers of batches, so finite epochs are for evaluation and tests; training
repeats forever (`num_epochs: 0`) and stops at `train.steps`.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import posixpath
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from xinst_jax.config import Config, ConfigError, DataConfig
from xinst_jax.data.mixing import format_mix, language_counts, mixing_probabilities
from xinst_jax.data.packing import OverlongStats, PoolPacker, fit_example, rows_to_batch

log = logging.getLogger(__name__)
# The realised mix is part of a run's record: shown even when the job configures WARNING logging.
if log.level == logging.NOTSET:
    log.setLevel(logging.INFO)

MAX_CYCLE = 16  # shards read at once per language
STATE_VERSION = 1


def import_tf():
    """TensorFlow, quiet and CPU-only (it must never grab the accelerator JAX uses)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    import tensorflow as tf

    try:
        tf.config.set_visible_devices([], "GPU")
    except (RuntimeError, ValueError):  # already initialised; tensorflow-cpu has none anyway
        pass
    return tf


def read_prepared(prepared_dir: str, split: str, gfile) -> tuple[list[str], dict[str, int], dict]:
    """(shard paths in order, per-language example counts, manifest) of a prepared directory
    (local or gs://, through tf.io.gfile). The manifest's `shards` list names the files when it
    has one; else `<split>-XXXXX-of-NNNNN.tfrecord` files are listed. Incomplete sets are errors."""
    d = str(prepared_dir).rstrip("/")
    if not gfile.isdir(d):
        raise ConfigError(f"data.prepared_dir: {d} is not a directory (run the prepare job first)")
    path = posixpath.join(d, "manifest.json")
    if not gfile.exists(path):
        raise ConfigError(f"data.prepared_dir: {path} not found (run the prepare job, or it is still running / "
                          "was interrupted)")
    try:
        with gfile.GFile(path, "r") as f:
            manifest = json.loads(f.read())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: invalid JSON ({e})") from None
    if manifest.get("complete") is False:
        raise ConfigError(f"{path}: the prepared data is not complete (rerun the prepare job)")
    counts = language_counts(manifest, path)
    shards = manifest.get("shards")
    if isinstance(shards, list) and shards and all(isinstance(s, dict) and "file" in s for s in shards):
        incomplete = [s["file"] for s in shards if s.get("complete") is False]
        if incomplete:
            raise ConfigError(f"{path}: shards not complete: {', '.join(incomplete[:5])} (rerun the prepare job)")
        files = [posixpath.join(d, s["file"]) for s in shards]
        missing = [f for f in files if not gfile.exists(f)]
        if missing:
            raise ConfigError(f"{path}: lists shards that do not exist: {', '.join(missing[:3])}")
        return files, counts, manifest
    pattern = re.compile(rf"^{re.escape(split)}-(\d{{5}})-of-(\d{{5}})\.tfrecord$")
    found = sorted(name.rstrip("/") for name in gfile.listdir(d) if pattern.match(name.rstrip("/")))
    if not found:
        raise ConfigError(f"data.prepared_dir: no {split}-XXXXX-of-NNNNN.tfrecord shards in {d}")
    totals = {int(pattern.match(name).group(2)) for name in found}
    if len(totals) != 1 or len(found) != totals.pop():
        raise ConfigError(f"data.prepared_dir: {d} holds {len(found)} shards of an incomplete or mixed set "
                          f"({', '.join(found[:3])}...); rerun the prepare job")
    return [posixpath.join(d, name) for name in found], counts, manifest


def host_split(files: list[str], process_index: int, process_count: int) -> tuple[list[str], int]:
    """(files this host reads, record stride): whole files when they divide evenly over the hosts,
    else every host reads every file and keeps the records i ≡ process_index (mod process_count)."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    if len(files) % process_count == 0:
        return files[process_index::process_count], 1
    return list(files), process_count


class PipelineSource:
    """A BatchSource over prepared TFRecord shards (see the module docstring)."""

    def __init__(self, data: DataConfig, prepared_dir: str | Path, rows: int, seq_len: int, seed: int,
                 process_index: int = 0, process_count: int = 1):
        if rows < 1 or seq_len < 1:
            raise ValueError(f"pipeline needs rows >= 1 and seq_len >= 1, got {rows}, {seq_len}")
        if data.overlong not in ("truncate", "split"):
            raise ConfigError(f"data.overlong: expected 'truncate' or 'split', got {data.overlong!r}")
        if data.pack_pool < 1:
            raise ConfigError(f"data.pack_pool: expected >= 1, got {data.pack_pool}")
        if data.pack_window < 1:
            raise ConfigError(f"data.pack_window: expected >= 1, got {data.pack_window}")
        if data.num_epochs < 0:
            raise ConfigError(f"data.num_epochs: expected >= 0 (0 repeats forever), got {data.num_epochs}")
        self.data, self.rows, self.seq_len, self.seed = data, rows, seq_len, seed
        self.process_index, self.process_count = process_index, process_count
        self.prepared_dir = str(prepared_dir)
        self._tf = import_tf()
        self.files, counts, manifest = read_prepared(self.prepared_dir, data.split, self._tf.io.gfile)
        self.data_fingerprint = manifest.get("fingerprint")  # the prepare job's hash of inputs + tokenizer
        self.host_files, self.record_stride = host_split(self.files, process_index, process_count)
        self.target = mixing_probabilities(counts, data.mixing, data.temperature, data.weights)
        self.langs = list(self.target)
        self.shuffle_per_lang = max(1, data.shuffle_buffer // len(self.langs))
        self._dataset = self._build()
        self._iterator = iter(self._dataset)
        self.packer = PoolPacker(seq_len, data.pack_pool, seed=_seed(seed, 2000 + process_index))
        self._reset_counters()
        log.info("data pipeline (host %d of %d): %d of %d shards%s; target mix %s", process_index, process_count,
                 len(self.host_files), len(self.files),
                 f" (records = {process_index} mod {process_count} of each)" if self.record_stride > 1 else "",
                 " ".join(f"{lang} {100 * p:.1f}%" for lang, p in self.target.items()))

    # ------------------------------------------------------------------ tf.data graph

    def _build(self):
        tf = self._tf
        files, stride, index = self.host_files, self.record_stride, self.process_index
        cycle = min(len(files), MAX_CYCLE)

        def read(path):
            ds = tf.data.TFRecordDataset(path)
            return ds.shard(stride, index) if stride > 1 else ds

        def records(lang_seed: int):
            names = tf.data.Dataset.from_tensor_slices(files)
            if len(files) > 1:
                names = names.shuffle(len(files), seed=lang_seed, reshuffle_each_iteration=True)
            return names.interleave(read, cycle_length=cycle, block_length=1,
                                    num_parallel_calls=min(cycle, 4), deterministic=True)

        lang_spec = {"lang": tf.io.FixedLenFeature([], tf.string)}
        per_lang = []
        for li, lang in enumerate(self.langs):
            lang_seed = _seed(self.seed, 1 + li)
            ds = records(lang_seed).filter(
                lambda r, lang=lang: tf.io.parse_single_example(r, lang_spec)["lang"] == lang)
            ds = ds.shuffle(self.shuffle_per_lang, seed=lang_seed, reshuffle_each_iteration=True)
            ds = ds.repeat(self.data.num_epochs or None)  # epoch boundaries stay clean: shuffle is inside
            per_lang.append(ds.map(lambda r, li=li: (r, tf.constant(li, tf.int32))))
        if len(per_lang) == 1:
            mixed = per_lang[0]
        else:
            mixed = tf.data.Dataset.sample_from_datasets(
                per_lang, weights=[self.target[lang] for lang in self.langs],
                seed=_seed(self.seed, 1000 + self.process_index), stop_on_empty_dataset=False)
        spec = {"id": tf.io.FixedLenFeature([], tf.string, default_value=""),
                "tokens": tf.io.RaggedFeature(tf.int64, row_splits_dtype=tf.int32),
                "loss_mask": tf.io.RaggedFeature(tf.int64, row_splits_dtype=tf.int32)}

        def parse(serialized, lang):
            ex = tf.io.parse_example(serialized, spec)
            return (tf.cast(ex["tokens"], tf.int32), tf.cast(ex["loss_mask"], tf.int8), ex["id"], lang)

        ds = mixed.batch(self.data.pack_window).map(parse).prefetch(max(1, self.data.prefetch))
        options = tf.data.Options()
        options.deterministic = True
        return ds.with_options(options)

    # ------------------------------------------------------------------ iteration

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        while len(self.packer.ready) < self.rows and not self.exhausted:
            self._pack_next_window()
        rows = self.packer.pop_rows(self.rows)
        if not rows:
            raise StopIteration
        self._count(rows)
        self.batches += 1
        every = self.data.mix_log_every
        if every > 0 and self.batches % every == 0:
            log.info("data mix after %d batches (host %d): %s; real tokens %.2f%%", self.batches,
                     self.process_index, format_mix(self.target, self.realised),
                     100 * self.real_tokens / max(1, self.positions))
        return rows_to_batch(rows, self.rows, self.seq_len)

    def _pack_next_window(self) -> None:
        try:
            tokens, mask, ids, langs = next(self._iterator)
        except StopIteration:
            self.exhausted = True
            self.packer.flush()
            return
        flat, splits = tokens.flat_values.numpy(), tokens.row_splits.numpy()
        mflat, msplits = mask.flat_values.numpy(), mask.row_splits.numpy()
        langs = langs.numpy()
        if not np.array_equal(splits, msplits):
            bad = int(np.nonzero(np.diff(splits) != np.diff(msplits))[0][0])
            raise ValueError(f"{self.prepared_dir}: example {ids.numpy()[bad].decode(errors='replace')!r} has "
                             f"{splits[bad + 1] - splits[bad]} tokens but {msplits[bad + 1] - msplits[bad]} "
                             "loss_mask entries")
        window = []
        for li, n in zip(*np.unique(langs, return_counts=True)):
            self.read[self.langs[li]] += int(n)
        for j in range(len(langs)):
            a, b = splits[j], splits[j + 1]
            window += fit_example(flat[a:b], mflat[a:b], int(langs[j]), self.seq_len, self.data.overlong,
                                  self.overlong)
        self.packer.add_window(window)

    def _count(self, rows) -> None:
        for row in rows:
            for seg in row:
                r = self.realised[self.langs[seg.lang]]
                r["examples"] += 1
                r["tokens"] += seg.length
                r["loss_tokens"] += int(np.count_nonzero(seg.loss_mask[1:]))
                self.real_tokens += seg.length
        self.positions += self.rows * self.seq_len

    def _reset_counters(self) -> None:
        self.batches = 0
        self.exhausted = False
        self.realised = {lang: {"examples": 0, "tokens": 0, "loss_tokens": 0} for lang in self.langs}
        self.read = {lang: 0 for lang in self.langs}  # examples taken from the stream (packed or in the pool)
        self.real_tokens = 0
        self.positions = 0
        self.overlong = OverlongStats()

    def mix_report(self) -> dict[str, Any]:
        """The realised mix of the batches produced so far (segments, real and loss tokens per
        language) against the target probabilities, the examples read per language (epoch l =
        read_l // this host's count of l), the real-token rate and overlong counts."""
        total = sum(r["examples"] for r in self.realised.values()) or 1
        return {
            "batches": self.batches,
            "target": dict(self.target),
            "realised": {lang: {**r, "share": r["examples"] / total} for lang, r in self.realised.items()},
            "read": dict(self.read),
            "real_token_rate": self.real_tokens / max(1, self.positions),
            "overlong": vars(self.overlong).copy(),
        }

    # ------------------------------------------------------------------ exact state

    def fingerprint(self) -> dict[str, Any]:
        """What must match for a saved state to continue this stream."""
        d = self.data
        return {"files": [posixpath.basename(f) for f in self.files], "data": self.data_fingerprint, "langs": self.langs,
                "target": {k: round(v, 12) for k, v in self.target.items()}, "rows": self.rows,
                "seq_len": self.seq_len, "seed": self.seed, "shuffle_buffer": d.shuffle_buffer,
                "pack_pool": d.pack_pool, "pack_window": d.pack_window, "overlong": d.overlong,
                "num_epochs": d.num_epochs, "version": STATE_VERSION}

    def get_state(self) -> dict:
        tf = self._tf
        with tempfile.TemporaryDirectory(prefix="xinst_it_") as tmp:
            tf.train.Checkpoint(it=self._iterator).write(os.path.join(tmp, "it"))
            blobs = {name: base64.b64encode((Path(tmp) / name).read_bytes()).decode("ascii")
                     for name in sorted(os.listdir(tmp))}
        return {"kind": "tfrecord_pipeline", "process_index": self.process_index,
                "process_count": self.process_count, "fingerprint": self.fingerprint(), "batches": self.batches,
                "exhausted": self.exhausted, "read": dict(self.read),
                "realised": {lang: dict(r) for lang, r in self.realised.items()},  # a snapshot: saves are async
                "real_tokens": self.real_tokens,
                "positions": self.positions, "overlong": vars(self.overlong).copy(),
                "packer": self.packer.get_state(), "tf_iterator": blobs}

    def set_state(self, state: dict) -> None:
        if state.get("kind") != "tfrecord_pipeline":
            raise ConfigError("data-iterator state in the checkpoint was not written by the tfrecord pipeline "
                              f"(data.source changed?); keys: {', '.join(sorted(state))}")
        if state["process_count"] != self.process_count:
            raise ConfigError(f"data-iterator state was saved by {state['process_count']} processes; restoring "
                              f"with {self.process_count} would repeat or drop examples. Resume with "
                              f"{state['process_count']} processes, or start the data afresh.")
        if state["process_index"] != self.process_index:
            raise ConfigError(f"data-iterator state of process {state['process_index']} offered to process "
                              f"{self.process_index}")
        mine, saved = self.fingerprint(), state["fingerprint"]
        diff = [k for k in sorted(set(mine) | set(saved)) if mine.get(k) != saved.get(k)]
        if diff:
            changes = "; ".join(f"{k}: saved {saved.get(k)!r}, now {mine.get(k)!r}" for k in diff)
            raise ConfigError(f"data-iterator state does not match this pipeline ({changes[:500]}); the stream "
                              "cannot continue exactly. Restore with the same data config, or start the data afresh.")
        tf = self._tf
        with tempfile.TemporaryDirectory(prefix="xinst_it_") as tmp:
            for name, blob in state["tf_iterator"].items():
                (Path(tmp) / name).write_bytes(base64.b64decode(blob))
            tf.train.Checkpoint(it=self._iterator).read(os.path.join(tmp, "it")).assert_consumed()
        self.packer.set_state(state["packer"])
        self.batches = int(state["batches"])
        self.exhausted = bool(state["exhausted"])
        self.realised = {lang: dict(state["realised"][lang]) for lang in self.langs}
        self.read = {lang: int(state["read"][lang]) for lang in self.langs}
        self.real_tokens, self.positions = int(state["real_tokens"]), int(state["positions"])
        self.overlong = OverlongStats(**state["overlong"])


def _seed(seed: int, salt: int) -> int:
    """A distinct, reproducible op-level seed per use (tf seeds are int64)."""
    return int(np.random.SeedSequence([seed, salt]).generate_state(1, np.uint64)[0] >> 1)


def make_pipeline_source(cfg: Config, rows: int, process_index: int, process_count: int) -> PipelineSource:
    """The tfrecord BatchSource for this host: `rows` rows of `cfg.train.seq_len` per batch."""
    prepared = cfg.data.prepared_dir or str(cfg.resolved_run_dir() / "data")
    return PipelineSource(cfg.data, prepared, rows, cfg.train.seq_len, cfg.seed, process_index, process_count)
