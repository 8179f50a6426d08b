"""Job `candidates` (X-Instruction stage 2): native web text -> (English instruction, native
response) candidates.

    python launch/tpu_run.py --config candidates_xinst --set generate.checkpoint=runs/revgen_xinst/checkpoints \\
        --set generate.tokenizer=... --set 'curate.corpus=[{path: corpus/*.jsonl}]'

1. Filter (curate/filters.py): documents {id, lang, text} from curate.corpus (JSONL, Parquet,
   TFDS or gs:// globs: the one records reader) go through the length window, short-line,
   boilerplate, language-id, exact- and near-duplicate filters in input order. Every process runs
   the same deterministic pass (so all agree on the kept documents without waiting on each
   other); process 0 writes them to `documents.jsonl` with the filter counts.
2. Generate: the kept documents are cut into shards of curate.shard_size; each process takes its
   shards (generate.split). For every document the reverse instruction generator is prompted with
   the `revgen` Task (the prompt it was trained with) and samples curate.samples English
   instructions with generate.* (the X-Instruction settings: T 0.7, top-p 0.9, top-k 50,
   no-repeat-ngram 6). Sample j of document i is seeded by (generate.seed, i * samples + j), so a
   redone shard is identical to the lost one. Each instruction is filtered (not English, outside
   the length window, copying the document, template residue) and counted.

Output, `<curate.out or run_dir>/candidates/`:

    documents.jsonl, filter.done          the kept documents (in input order) and the filter counts
    part-00000.jsonl, part-00000.done ... candidate shards; a marker holds the shard's counts
    candidates.jsonl                      all shards merged in order, when all are done
    manifest.json                         settings (a rerun with other settings is refused), and,
                                          when done, `documents` and `instructions` counts per
                                          language: in == kept + dropped by reason

A candidate: {"id": "<doc id>#<sample>", "lang", "instruction" (English), "output" (the document
text), "source_id" (the document's id), "sample", "logprob" (sum of the generator's log-probs of
the instruction's tokens and EOS, at temperature 1), "finish_reason"}.

Resume: rerun the same command. The filter pass is redone unless `filter.done` matches; finished
shards are kept, unfinished ones redone: a `kill -9` at any point and a rerun give the same
`candidates.jsonl`, byte for byte.

Memory: the kept documents of the whole corpus are held once per process (about 1.5 GB for a
million documents of the paper's length); split a larger corpus into several runs.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from pathlib import Path
from typing import Iterator

from xinst_jax import paths
from xinst_jax.config import Config, ConfigError, DataInputConfig
from xinst_jax.curate.counts import StageCounts
from xinst_jax.data.records import RecordReader
from xinst_jax.jobs import register_job
from xinst_jax.shards import (check_manifest, merge_shards, read_done_marker, shard_ranges, shards_for_process,
                              write_atomic, write_json, write_shard)

log = logging.getLogger(__name__)


def stage_dir(cfg: Config, name: str) -> Path:
    """<curate.out or run_dir>/<name>: where a curation stage writes (curate.out may be gs://)."""
    return paths.as_path(cfg.curate.out or cfg.resolved_run_dir()) / name


# --------------------------------------------------------------------------- 1. filter


@dataclasses.dataclass
class FilteredCorpus:
    documents: list[dict]  # kept {id, lang, text}, in input order
    counts: StageCounts  # per language: in, kept, dropped by reason
    unreadable: dict  # lines the reader could not take ({reason: n}): not documents, so not per language


def read_corpus(cfg: Config) -> tuple[RecordReader, Iterator[dict]]:
    """The reader and the corpus's documents; bad lines are skipped and counted by the reader."""
    if not cfg.curate.corpus:
        raise ConfigError("curate.corpus: no inputs; give documents {id, lang, text}, e.g. "
                          "--set 'curate.corpus=[{path: corpus/*.jsonl}]'")
    reader = RecordReader(cfg.data.languages, sys.maxsize, cfg.data.strict, required=("text",),
                          strict_key="data.strict")
    return reader, reader.read(cfg.curate.corpus)


def filter_corpus(cfg: Config) -> FilteredCorpus:
    from xinst_jax.curate.filters import CorpusFilter

    reader, records = read_corpus(cfg)
    corpus_filter = CorpusFilter(cfg.curate.filters, cfg.data.languages)
    counts = StageCounts()
    kept = []
    for record in records:
        reason = corpus_filter.check(record)
        counts.add(record["lang"], reason)
        if reason is None:
            kept.append({"id": record["id"], "lang": record["lang"], "text": record["text"]})
    totals = reader.totals()
    if totals["in"] == 0:
        raise ConfigError(f"curate.corpus: no documents in {describe_inputs(cfg.curate.corpus)}")
    if not kept:
        raise ConfigError("curate.corpus: no document passed the filters (curate.filters.*):\n" + counts.summary()
                          + (f"\n  unreadable lines: {totals['skipped']}" if totals["skipped"] else ""))
    return FilteredCorpus(kept, counts, totals["skipped"])


def describe_inputs(inputs: list[DataInputConfig]) -> str:
    return ", ".join(i.path or f"tfds:{i.tfds_name}/{i.split}" for i in inputs)


def corpus_fingerprint(inputs: list[DataInputConfig]) -> list[dict]:
    """What the corpus was: each input and, for local files, their names and sizes."""
    import os

    from xinst_jax.data.records import glob_files, is_remote

    out = []
    for inp in inputs:
        entry = dataclasses.asdict(inp)
        if inp.path and not is_remote(inp.path):
            entry["files"] = [[f, os.path.getsize(f)] for f in glob_files(inp.path)]
        out.append(entry)
    return out


def load_or_filter(cfg: Config, out: Path, is_writer: bool) -> FilteredCorpus:
    """The filter pass, or its result from `documents.jsonl` when `filter.done` matches it."""
    docs_path, marker = out / "documents.jsonl", out / "filter.done"
    if marker.exists() and docs_path.exists():
        from xinst_jax.shards import file_sha256

        try:
            done = json.loads(marker.read_text())
        except ValueError:
            done = {}
        if done.get("sha256") == file_sha256(docs_path):
            docs = [json.loads(line) for line in docs_path.read_text(encoding="utf-8").splitlines()]
            return FilteredCorpus(docs, StageCounts.from_dict(done["counts"]), done["unreadable"])
    filtered = filter_corpus(cfg)
    if is_writer:
        import hashlib

        data = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in filtered.documents).encode("utf-8")
        write_atomic(docs_path, data)
        write_json(marker, {"sha256": hashlib.sha256(data).hexdigest(), "counts": filtered.counts.to_dict(),
                            "unreadable": filtered.unreadable})
    return filtered


# --------------------------------------------------------------------------- 2. generate


def candidate_lines(documents: list[dict], first_index: int, samples: int, engine, task, tokenizer, settings,
                    stop_strings: list[str], instruction_filter) -> tuple[list[str], StageCounts, dict]:
    """Candidates of one shard (`first_index`: the shard's first document in the kept corpus)."""
    from xinst_jax.infer.job import output_text

    prompts, row_ids = [], []
    for i, doc in enumerate(documents):
        prompt = task.prompt_tokens(doc)
        for j in range(samples):
            prompts.append(prompt)
            row_ids.append((first_index + i) * samples + j)
    result = engine.generate(prompts, settings, row_ids=row_ids)
    texts, finishes = [], []
    for toks, finish in zip(result.tokens, result.finish_reasons):
        text, finish = output_text(tokenizer, toks, finish, settings, stop_strings)
        texts.append(text.strip())
        finishes.append(finish)
    # the generator's log-likelihood of each instruction as the Task would train it (text + EOS)
    targets = [tokenizer.encode_continuation(t) + [tokenizer.eos_id] if t else [tokenizer.eos_id] for t in texts]
    scored = engine.score(prompts, targets)
    counts = StageCounts()
    lines = []
    stats = {"new_tokens": sum(len(t) for t in result.tokens), "truncated_prompts": int(sum(result.truncated))}
    for r, (text, finish) in enumerate(zip(texts, finishes)):
        doc = documents[r // samples]
        reason = instruction_filter.check(text, doc["text"])
        counts.add(doc["lang"], reason)
        if reason is not None:
            continue
        sample = r % samples
        lines.append(json.dumps({
            "id": f"{doc['id']}#{sample}", "lang": doc["lang"], "instruction": text, "output": doc["text"],
            "source_id": doc["id"], "sample": sample, "logprob": round(float(scored.sum_logprob[r]), 6),
            "finish_reason": finish}, ensure_ascii=False))
    return lines, counts, stats


def check_curate_config(cfg: Config) -> None:
    cur = cfg.curate
    for key in ("samples", "shard_size"):
        if getattr(cur, key) < 1:
            raise ConfigError(f"curate.{key}: must be >= 1, got {getattr(cur, key)}")
    if not cfg.generate.checkpoint and not cfg.generate.hf_dir:
        raise ConfigError("generate.checkpoint: the candidates job needs the trained reverse instruction generator "
                          "(revgen_xinst): set generate.checkpoint (trainer checkpoint) or generate.hf_dir")


def run_candidates(cfg: Config) -> dict:
    """The job body; returns the report (process 0 also writes it into the manifest)."""
    import jax

    from xinst_jax.curate.filters import InstructionFilter
    from xinst_jax.data.tokenizer import load_tokenizer
    from xinst_jax.infer.job import build_engine, check_tokenizer_fits, load_model, sampling_settings
    from xinst_jax.runtime import setup_runtime
    from xinst_jax.tasks import Task

    check_curate_config(cfg)
    cur, gen = cfg.curate, cfg.generate
    tokenizer = load_tokenizer(gen.tokenizer, key="generate.tokenizer")
    task = Task("revgen", tokenizer)
    setup_runtime(cfg.distributed)
    process, count = jax.process_index(), jax.process_count()
    out = stage_dir(cfg, "candidates")
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    model, params, source = load_model(cfg)
    check_tokenizer_fits(tokenizer, model, "generate.tokenizer")
    settings = sampling_settings(cfg, model, tokenizer)
    manifest = {
        "stage": "candidates", "corpus": corpus_fingerprint(cur.corpus), "languages": cfg.data.languages,
        "filters": dataclasses.asdict(cur.filters), "instruction_filters": dataclasses.asdict(cur.instruction_filters),
        "samples": cur.samples, "shard_size": cur.shard_size, "model_source": source,
        "model": dataclasses.asdict(model), "tokenizer_sha256": tokenizer.sha256(), "template": task.describe(),
        "settings": {k: v for k, v in dataclasses.asdict(gen).items()
                     if k not in ("input", "output", "progress", "split", "checkpoint", "hf_dir", "template")},
    }
    check_manifest(out, {"settings": manifest}, "curate.out", write=False)
    filtered = load_or_filter(cfg, out, is_writer=process == 0)
    if process == 0:  # written once the corpus is known to hold documents
        check_manifest(out, {"settings": manifest}, "curate.out")
    docs = filtered.documents
    ranges = shard_ranges(len(docs), cur.shard_size)
    mine = shards_for_process(len(ranges), process, count, gen.split)
    todo = [k for k in mine if read_done_marker(out, k) is None]
    new_tokens = 0
    gen_seconds = 0.0
    if todo:
        engine = build_engine(cfg, model, params)
        del params
        instruction_filter = InstructionFilter(cur.instruction_filters)
        t0 = time.perf_counter()
        for k in todo:
            a, b = ranges[k]
            lines, counts, stats = candidate_lines(docs[a:b], a, cur.samples, engine, task, tokenizer, settings,
                                                   gen.stop_strings, instruction_filter)
            write_shard(out, k, lines, {"counts": counts.to_dict(), **stats})
            new_tokens += stats["new_tokens"]
            print(f"candidates: shard {k + 1}/{len(ranges)}: {b - a} documents -> {len(lines)} candidates",
                  flush=True)
        gen_seconds = time.perf_counter() - t0

    if count > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("xinst_jax.candidates.done")
    report = {"output": str(out), "documents_kept": len(docs), "shards": len(ranges), "shards_generated": len(todo),
              "shards_reused": len(mine) - len(todo), "new_tokens": new_tokens, "model": source,
              "generate_seconds": round(gen_seconds, 3), "seconds": round(time.perf_counter() - start, 3)}
    if process == 0:
        markers = [read_done_marker(out, k) for k in range(len(ranges))]
        missing = [k for k, m in enumerate(markers) if m is None]
        if missing:
            print(f"candidates: {len(missing)} shard(s) not done yet (e.g. part-{missing[0]:05d}); rerun to finish",
                  flush=True)
            report["missing_shards"] = missing
            return report
        instructions = StageCounts()
        for m in markers:
            instructions.merge(m["counts"])
        merged = merge_shards(out, len(ranges), "candidates.jsonl")
        report.update(documents=filtered.counts.to_dict(), unreadable_lines=filtered.unreadable,
                      instructions=instructions.to_dict(), candidates=str(merged),
                      candidates_kept=instructions.total_kept())
        write_json(out / "manifest.json", {"settings": manifest, **report})
        print(f"candidates: documents per language:\n{filtered.counts.summary()}", flush=True)
        if filtered.unreadable:
            print(f"  unreadable lines skipped: {filtered.unreadable}", flush=True)
        print(f"candidates: instructions per language:\n{instructions.summary()}", flush=True)
        print(f"candidates: {merged}: {instructions.total_kept()} candidates from {len(docs)} documents", flush=True)
    return report


@register_job("candidates")
def candidates_job(cfg: Config) -> None:
    run_candidates(cfg)
