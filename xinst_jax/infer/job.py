"""Job `generate`: completions for a file of records, sharded over processes, resumable.

    python launch/tpu_run.py --config generate_demo
    python launch/tpu_run.py --config generate_demo --set generate.input=my.jsonl --set generate.output=out/

Prompts: `generate.template` names the Task (xinst_jax/tasks.py) that turns a record into prompt
tokens, the same Task `prepare` uses for training data: a model is prompted exactly as it was
trained (template string, tokenizer, BOS as the tokenizer adds it). Set it to the template the
model was trained with. The default, `raw`, is a plain completion job:

    {"id": "doc-17", "prompt": "Write a question whose answer is ..."}
    {"id": 18, "instruction": "Summarise the text.", "text": "..."}     # joined by generate.join
    {"id": 19, "text": "..."}                                            # text alone is the prompt

Other templates read their prompt fields: `sft` / `sft_assistant` an English `instruction` and a
`lang`; `revgen` the target-language `output` (or a document's `text`); `evaluator` `instruction`,
`output` and `lang`. `lang` may come from `generate.lang`; templates that name the language
check it against `data.languages`.

Input (`generate.input`): one JSONL (.jsonl.gz) or Parquet file, read by the records reader of
`prepare` (xinst_jax/data/records.py): `id` (string or integer) is required and copied to the
output; other fields ride along unused. Bad lines are skipped and counted by reason (report.json
`skipped`), and listed as `file:line: field: reason` (stdout and report.json `bad`); blank lines
are ignored. `generate.strict` makes the first bad line an error naming file, line and field.

Output (`generate.output`, default <run_dir>/generate):

    part-00000.jsonl, part-00000.done, ...   one shard per `shard_size` valid records, in input order
    output.jsonl                             all shards merged, in input order (written when all are done)
    manifest.json                            what the shards were made from (input, template, settings, model)
    report.json                              counts, bad lines, timing

Each output line: {"id", "line" (1-based input line), "output" (text), "finish_reason"
("stop": EOS / stop token / stop string, "length": max_new_tokens), "prompt_tokens",
"output_tokens", "truncated" (the prompt lost its beginning to fit the largest bucket)}.

Processes: every process reads the whole input (so all agree on shard boundaries) and takes the
shards `generate.split` gives it (a contiguous range, or i::n); shard names depend only on the
input and shard_size, not on the process count. Each process runs its own engine on its local
devices (mesh over them: data parallel over rows, tensor parallel by the rules). The input is
read twice: once to count the records (shard boundaries), once to generate shard by shard, so
memory holds one shard's records, not the file.

Resume: a shard is written to a temporary file, renamed, then its `.done` marker is written; a
rerun (after a crash, a `kill -9`, a preemption) skips shards with a marker and redoes the rest.
Sampling depends only on (generate.seed, the record's input line), and batches never cross shard
boundaries, so a redone shard is identical to the lost one. A rerun with another input or other
settings in the same output directory is refused (manifest.json), never mixed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from xinst_jax import paths
from xinst_jax.config import CONFIG_DIR, Config, ConfigError, DataInputConfig, ModelConfig
from xinst_jax.data.records import Located, RecordReader
from xinst_jax.jobs import register_job
from xinst_jax.shards import (check_manifest, file_sha256, merge_shards, shard_is_done, shard_ranges,
                               shards_for_process, write_atomic, write_shard)
from xinst_jax.tasks import Task

log = logging.getLogger(__name__)

DEMO_PROMPTS = CONFIG_DIR / "data" / "generate_demo_prompts.jsonl"
MAX_LISTED_BAD = 20  # bad lines printed; report.json keeps up to MAX_KEPT_BAD
MAX_KEPT_BAD = 10000
NO_CHAR_LIMIT = sys.maxsize  # long prompts are not skipped: the engine keeps their end ("truncated")


# --------------------------------------------------------------------------- input


def input_reader(cfg: Config, task: Task, keep_bad: int = MAX_KEPT_BAD) -> RecordReader:
    """The records reader with the task's prompt fields: ids required, `lang` only where the
    template names the language. Bad lines are listed by the job, so the reader logs none."""
    fields = task.reader_fields(training=False)
    return RecordReader(cfg.data.languages, NO_CHAR_LIMIT, cfg.generate.strict, required=fields["required"],
                        any_of=fields["any_of"], require_id=True, require_lang=task.spec.needs_lang,
                        keep_bad=keep_bad, log_first=0, strict_key="generate.strict")


def read_input(cfg: Config, task: Task, path: Path, keep_bad: int = MAX_KEPT_BAD) -> tuple[RecordReader,
                                                                                          Iterator[Located]]:
    reader = input_reader(cfg, task, keep_bad)
    inp = DataInputConfig(path=str(path), lang=cfg.generate.lang)
    return reader, reader.read_located([inp], key="generate.input")


@dataclasses.dataclass
class InputScan:
    path: Path
    records: int  # valid records
    bad: list[str]  # "file:line: field: reason (detail)", the first MAX_KEPT_BAD
    totals: dict  # the reader's counts: in, kept, skipped {reason: n}, skipped_total, blank_lines
    fingerprint: str  # sha256 of the file's bytes


def scan_input(cfg: Config, task: Task, path: Path) -> InputScan:
    """Pass 1: count the valid records (shard boundaries) and collect the bad lines."""
    reader, records = read_input(cfg, task, path)
    count = sum(1 for _ in records)
    return InputScan(path, count, list(reader.bad), reader.totals(), file_sha256(path))


def shard_records(cfg: Config, task: Task, path: Path, ranges: list[tuple[int, int]],
                  wanted: list[int]) -> Iterator[tuple[int, list[Located]]]:
    """Pass 2: (shard, its records) for the wanted shards, in input order; stops after the last."""
    if not wanted:
        return
    _, records = read_input(cfg, task, path, keep_bad=0)
    wanted_set, last = set(wanted), max(wanted)
    k, batch = 0, []
    for i, loc in enumerate(records):
        while i >= ranges[k][1]:
            k += 1
        if k in wanted_set:
            batch.append(loc)
            if i + 1 == ranges[k][1]:
                yield k, batch
                batch = []
                if k == last:
                    return
    raise ConfigError(f"generate.input: {path} changed while the job ran (shard {k} is incomplete on the second "
                      "read); rerun")


# --------------------------------------------------------------------------- model


def load_model(cfg: Config) -> tuple[ModelConfig, Any, str]:
    """(model config, params, where they came from): generate.checkpoint, else generate.hf_dir,
    else a random init from `seed` (with a warning)."""
    from xinst_jax.convert.sources import load_params

    gen = cfg.generate
    loaded = load_params(cfg.model, checkpoint=gen.checkpoint, hf_dir=gen.hf_dir, seed=cfg.seed,
                         keys=("generate.checkpoint", "generate.hf_dir"))
    if not (gen.checkpoint or gen.hf_dir):
        print(f"warning: generate: neither generate.checkpoint nor generate.hf_dir is set; using random-init "
              f"params (seed {cfg.seed}), so the outputs are noise", file=sys.stderr, flush=True)
    return loaded


def build_engine(cfg: Config, model: ModelConfig, params: Any) -> "Any":
    """The inference engine over this process's devices, as generate.* configures it (every job
    that generates or scores: generate, candidates, refine)."""
    import jax

    from xinst_jax.infer.generate import Engine
    from xinst_jax.sharding import make_mesh, parse_rules

    gen = cfg.generate
    mesh = make_mesh(cfg.mesh, jax.local_devices())
    try:
        return Engine(params, model, mesh=mesh, rules=parse_rules(cfg.mesh.rules), batch_size=gen.batch_size,
                      buckets=gen.prompt_buckets, kv_dtype=gen.kv_dtype or None,
                      weight_dtype=gen.weight_dtype or None, max_segments=gen.decode_segments,
                      schedule=gen.schedule)
    except ValueError as e:
        raise ConfigError(f"generate: {e}") from None


def check_tokenizer_fits(tokenizer, model: ModelConfig, key: str) -> None:
    if getattr(tokenizer, "vocab_size", 0) > model.vocab_size:
        raise ConfigError(f"{key}: {tokenizer.path} has {tokenizer.vocab_size} tokens but the model's vocabulary "
                          f"is {model.vocab_size}")


# --------------------------------------------------------------------------- the job


def sampling_settings(cfg: Config, model: ModelConfig, tokenizer) -> "Any":
    from xinst_jax.infer.sampling import SamplingSettings

    gen = cfg.generate
    stop_ids = list(gen.stop_token_ids)
    if gen.stop_on_eos:  # the model's EOS, and the tokenizer's (the one prepare ends examples with)
        stop_ids += [i for i in (model.eos_token_id, tokenizer.eos_id) if i is not None]
    stop_seqs = []
    for s in gen.stop_strings:
        ids = tokenizer.encode(s, add_special_tokens=False)
        if not ids:
            raise ConfigError(f"generate.stop_strings: {s!r} encodes to no tokens")
        stop_seqs.append(tuple(ids))
    pad = model.pad_token_id if model.pad_token_id is not None else 0
    settings = SamplingSettings(
        max_new_tokens=gen.max_new_tokens, temperature=gen.temperature, top_p=gen.top_p, top_k=gen.top_k,
        no_repeat_ngram=gen.no_repeat_ngram, stop_token_ids=tuple(sorted(set(stop_ids))),
        stop_sequences=tuple(stop_seqs), min_new_tokens=gen.min_new_tokens, pad_id=pad, seed=gen.seed)
    try:
        settings.validate()
    except ValueError as e:
        raise ConfigError(f"generate: {e}") from None
    return settings


def first_stop(text: str, stop_strings: Sequence[str], start: int = 0) -> Optional[int]:
    """Where the first stop string found in text[start:] begins (an index into `text`), None when
    none is there: the one stop-string rule of whole answers (`output_text`) and streamed ones
    (serve/detok.StopText)."""
    found = [i for i in (text.find(s, start) for s in stop_strings if s) if i >= 0]
    return min(found) if found else None


def output_text(tokenizer, tokens: list[int], finish: str, settings, stop_strings: Sequence[str]) -> tuple[str, str]:
    """Decoded text without the stop token, cut at the first stop string (then finished "stop")."""
    if finish == "stop" and tokens and tokens[-1] in settings.stop_token_ids:
        tokens = tokens[:-1]
    text = tokenizer.decode(tokens)
    cut = first_stop(text, stop_strings)
    return (text, finish) if cut is None else (text[:cut], "stop")


def _validate(cfg: Config) -> Path:
    gen = cfg.generate
    for key in ("batch_size", "shard_size", "decode_segments"):
        if getattr(gen, key) < 1:
            raise ConfigError(f"generate.{key}: must be >= 1, got {getattr(gen, key)}")
    if not gen.prompt_buckets or any(b < 1 for b in gen.prompt_buckets):
        raise ConfigError(f"generate.prompt_buckets: expected positive lengths, got {gen.prompt_buckets}")
    path = paths.as_path(gen.input) if gen.input else DEMO_PROMPTS
    if not paths.is_remote(path) and not path.is_file():  # a URL is read (and reported) by the records reader
        raise ConfigError(f"generate.input: {path} not found")
    if not path.name.endswith((".jsonl", ".jsonl.gz", ".parquet")):
        raise ConfigError(f"generate.input: {path}: expected a .jsonl, .jsonl.gz or .parquet file")
    return path


def run_generate(cfg: Config) -> dict:
    """The job body; returns the report (also written to <output>/report.json by process 0)."""
    import jax

    from xinst_jax.data.tokenizer import load_tokenizer
    from xinst_jax.runtime import setup_runtime

    gen = cfg.generate
    input_path = _validate(cfg)
    tokenizer = load_tokenizer(gen.tokenizer, key="generate.tokenizer")
    task = Task.from_generate_config(gen, tokenizer)
    setup_runtime(cfg.distributed)
    process, count = jax.process_index(), jax.process_count()
    out = paths.as_path(gen.output) if gen.output else cfg.resolved_run_dir() / "generate"
    out.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    scan = scan_input(cfg, task, input_path)
    ranges = shard_ranges(scan.records, gen.shard_size)
    model, params, source = load_model(cfg)
    check_tokenizer_fits(tokenizer, model, "generate.tokenizer")
    settings = sampling_settings(cfg, model, tokenizer)
    manifest = {
        "input": paths.absolute(input_path), "input_sha256": scan.fingerprint, "records": scan.records,
        "shard_size": gen.shard_size, "model_source": source, "model": dataclasses.asdict(model),
        "tokenizer": gen.tokenizer, "tokenizer_sha256": tokenizer.sha256(), "template": task.describe(),
        "settings": {k: v for k, v in dataclasses.asdict(gen).items()
                     if k not in ("input", "output", "progress", "split", "checkpoint", "hf_dir")},
    }
    check_manifest(out, manifest, "generate.output")

    mine = shards_for_process(len(ranges), process, count, gen.split)
    todo = [k for k in mine if not shard_is_done(out, k, ranges[k][1] - ranges[k][0])]
    reused = len(mine) - len(todo)
    n_bad = scan.totals["skipped_total"]
    if process == 0 and n_bad:
        reasons = ", ".join(f"{k} {v}" for k, v in scan.totals["skipped"].items())
        print(f"generate: skipped {n_bad} bad input line(s) ({reasons}):", flush=True)
        for line in scan.bad[:MAX_LISTED_BAD]:
            print(f"  {line}", flush=True)
        if n_bad > MAX_LISTED_BAD:
            print(f"  ... and {n_bad - MAX_LISTED_BAD} more (the first {MAX_KEPT_BAD} in {out / 'report.json'})",
                  flush=True)

    new_tokens = truncated = 0
    gen_seconds = 0.0
    if todo:
        engine = build_engine(cfg, model, params)
        del params
        bar = _progress(gen.progress, sum(b - a for a, b in (ranges[k] for k in mine)),
                        sum(ranges[k][1] - ranges[k][0] for k in mine if k not in todo))
        t0 = time.perf_counter()
        for k, recs in shard_records(cfg, task, input_path, ranges, todo):
            a, b = ranges[k]
            # the Task's prompt: token for token the prompt part prepare writes for this record
            # (an empty one, possible only without BOS, gets the model's BOS: the engine needs a token)
            prompts = [task.prompt_tokens(loc.record) or [model.bos_token_id] for loc in recs]
            result = engine.generate(prompts, settings, row_ids=[loc.line for loc in recs])
            lines = []
            for loc, toks, finish, plen, trunc in zip(recs, result.tokens, result.finish_reasons,
                                                      result.prompt_lengths, result.truncated):
                text, finish = output_text(tokenizer, toks, finish, settings, gen.stop_strings)
                lines.append(json.dumps({"id": loc.source_id, "line": loc.line, "output": text,
                                         "finish_reason": finish, "prompt_tokens": plen, "output_tokens": len(toks),
                                         "truncated": trunc}, ensure_ascii=False))
                new_tokens += len(toks)
                truncated += int(trunc)
            write_shard(out, k, lines)
            bar.update(b - a)
        gen_seconds = time.perf_counter() - t0
        bar.close()

    if count > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("xinst_jax.generate.done")
    report = {
        "input": str(input_path), "output": str(out), "records": scan.records, "bad_lines": n_bad,
        "skipped": scan.totals["skipped"], "blank_lines": scan.totals["blank_lines"], "bad": scan.bad,
        "template": task.name, "shards": len(ranges), "process": process, "process_count": count,
        "shards_this_process": len(mine), "shards_reused": reused, "shards_generated": len(todo),
        "new_tokens": new_tokens, "truncated_prompts": truncated, "model": source,
        "generate_seconds": round(gen_seconds, 3), "seconds": round(time.perf_counter() - start, 3),
        "tokens_per_s": round(new_tokens / gen_seconds, 1) if gen_seconds > 0 else None,
    }
    if process == 0:
        missing = [k for k in range(len(ranges)) if not shard_is_done(out, k, ranges[k][1] - ranges[k][0])]
        report["missing_shards"] = missing
        if missing:
            print(f"generate: {len(missing)} shard(s) not done yet (e.g. part-{missing[0]:05d}); rerun to finish "
                  "and merge", flush=True)
        else:
            merged = merge_shards(out, len(ranges))
            report["merged"] = str(merged)
        write_atomic(out / "report.json", json.dumps(report, indent=2, ensure_ascii=False).encode("utf-8"))
        rate = f", {report['tokens_per_s']} tok/s" if report["tokens_per_s"] else ""
        print(f"generate: {out / 'output.jsonl'}: {scan.records} records in {len(ranges)} shard(s) "
              f"({len(todo)} generated, {reused} reused); {new_tokens} new tokens{rate}; "
              f"{n_bad} bad line(s) skipped; template {task.name}; model: {source}", flush=True)
    return report


class _NoBar:
    def update(self, n):
        pass

    def close(self):
        pass


def _progress(enabled: bool, total: int, initial: int):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="rec", desc="generate", file=sys.stderr, dynamic_ncols=True)


@register_job("generate")
def generate_job(cfg: Config) -> None:
    run_generate(cfg)
