"""Job `generate`: completions for a JSONL of prompts, sharded over processes, resumable.

    python launch/tpu_run.py --config generate_demo
    python launch/tpu_run.py --config generate_demo --set generate.input=my.jsonl --set generate.output=out/

Input (`generate.input`): JSONL, one JSON object per line:

    {"id": "doc-17", "prompt": "Write a question whose answer is ..."}
    {"id": 18, "instruction": "Summarise the text.", "text": "..."}     # joined by generate.join
    {"id": 19, "text": "..."}                                            # text alone is the prompt

`id` (string or integer) is required and copied to the output; `prompt`, else `instruction`
and/or `text`, must be non-empty strings. Other fields are ignored. Lines that are not valid JSON
objects of that shape are skipped, and reported as `file:line: reason` (stdout and report.json);
blank lines are ignored.

Output (`generate.output`, default <run_dir>/generate):

    part-00000.jsonl, part-00000.done, ...   one shard per `shard_size` valid records, in input order
    output.jsonl                             all shards merged, in input order (written when all are done)
    manifest.json                            what the shards were made from (input, settings, model)
    report.json                              counts, bad lines, timing

Each output line: {"id", "line" (1-based input line), "output" (text), "finish_reason"
("stop": EOS / stop token / stop string, "length": max_new_tokens), "prompt_tokens",
"output_tokens", "truncated" (the prompt lost its beginning to fit the largest bucket)}.

Processes: every process reads the whole input (so all agree on shard boundaries) and takes the
shards `generate.split` gives it (a contiguous range, or i::n); shard names depend only on the
input and shard_size, not on the process count. Each process runs its own engine on its local
devices (mesh over them: data parallel over rows, tensor parallel by the rules).

Resume: a shard is written to a temporary file, renamed, then its `.done` marker is written; a
rerun (after a crash, a `kill -9`, a preemption) skips shards with a marker and redoes the rest.
Sampling depends only on (generate.seed, the record's input line), and batches never cross shard
boundaries, so a redone shard is identical to the lost one. A rerun with another input or other
settings in the same output directory is refused (manifest.json), never mixed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator

from xinst_jax.config import CONFIG_DIR, Config, ConfigError, ModelConfig
from xinst_jax.jobs import register_job

log = logging.getLogger(__name__)

DEMO_PROMPTS = CONFIG_DIR / "data" / "generate_demo_prompts.jsonl"
MAX_LISTED_BAD = 20


# --------------------------------------------------------------------------- input


@dataclasses.dataclass(frozen=True)
class InputRecord:
    line: int  # 1-based line number in the input file
    offset: int  # byte offset of the line
    length: int  # bytes (without the newline)


@dataclasses.dataclass
class InputScan:
    path: Path
    records: list[InputRecord]
    bad: list[str]  # "file:line: reason"
    fingerprint: str  # of the file's bytes


def parse_record(raw: bytes, join: str) -> tuple[Any, str]:
    """One input line -> (id, prompt text); ValueError with a one-line reason when unusable."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"not UTF-8 ({e.reason} at byte {e.start})") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    if "id" not in obj:
        raise ValueError("missing field 'id'")
    rid = obj["id"]
    if isinstance(rid, bool) or not isinstance(rid, (str, int)):
        raise ValueError(f"field 'id' must be a string or an integer, got {type(rid).__name__}")
    fields = {}
    for name in ("prompt", "instruction", "text"):
        if name in obj and obj[name] is not None:
            if not isinstance(obj[name], str):
                raise ValueError(f"field '{name}' must be a string, got {type(obj[name]).__name__}")
            fields[name] = obj[name]
    if fields.get("prompt"):
        return rid, fields["prompt"]
    parts = [fields[n] for n in ("instruction", "text") if fields.get(n)]
    if not parts:
        raise ValueError("missing field: needs a non-empty 'prompt', or 'instruction' and/or 'text'")
    return rid, join.join(parts)


def scan_input(path: Path, join: str) -> InputScan:
    records: list[InputRecord] = []
    bad: list[str] = []
    digest = hashlib.sha256()
    offset = 0
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            digest.update(line)
            body = line.rstrip(b"\r\n")
            if body.strip():
                try:
                    parse_record(body, join)
                    records.append(InputRecord(number, offset, len(body)))
                except ValueError as e:
                    bad.append(f"{path.name}:{number}: {e}")
            offset += len(line)
    return InputScan(path, records, bad, digest.hexdigest())


def read_records(path: Path, records: list[InputRecord], join: str) -> Iterator[tuple[InputRecord, Any, str]]:
    with open(path, "rb") as f:
        for rec in records:
            f.seek(rec.offset)
            rid, prompt = parse_record(f.read(rec.length), join)
            yield rec, rid, prompt


# --------------------------------------------------------------------------- shards


def shard_ranges(num_records: int, shard_size: int) -> list[tuple[int, int]]:
    return [(s, min(s + shard_size, num_records)) for s in range(0, num_records, shard_size)]


def shards_for_process(num_shards: int, process: int, count: int, split: str) -> list[int]:
    """Shard indices process `process` of `count` handles: a contiguous range or process::count."""
    if split == "strided":
        return list(range(process, num_shards, count))
    base, extra = divmod(num_shards, count)
    start = process * base + min(process, extra)
    return list(range(start, start + base + (1 if process < extra else 0)))


def shard_paths(out: Path, k: int) -> tuple[Path, Path]:
    return out / f"part-{k:05d}.jsonl", out / f"part-{k:05d}.done"


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def shard_is_done(out: Path, k: int, expected: int) -> bool:
    part, done = shard_paths(out, k)
    if not (part.exists() and done.exists()):
        return False
    try:
        marker = json.loads(done.read_text())
        data = part.read_bytes()
    except (OSError, ValueError):
        return False
    return (marker.get("records") == expected and data.count(b"\n") == expected
            and marker.get("sha256") == hashlib.sha256(data).hexdigest())


def write_shard(out: Path, k: int, lines: list[str]) -> None:
    part, done = shard_paths(out, k)
    if done.exists():
        done.unlink()
    data = "".join(line + "\n" for line in lines).encode("utf-8")
    _write_atomic(part, data)
    _write_atomic(done, json.dumps({"records": len(lines), "sha256": hashlib.sha256(data).hexdigest()}).encode())


def merge_shards(out: Path, num_shards: int) -> Path:
    target = out / "output.jsonl"
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        for k in range(num_shards):
            f.write(shard_paths(out, k)[0].read_bytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, target)
    return target


def check_manifest(out: Path, manifest: dict) -> None:
    """Refuse to mix shards of different runs; write the manifest if there is none."""
    path = out / "manifest.json"
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except ValueError:
            old = None
        if old is not None and old != manifest:
            changed = sorted(k for k in set(old) | set(manifest) if old.get(k) != manifest.get(k))
            raise ConfigError(f"generate.output: {out} holds shards of another run ({', '.join(changed)} "
                              "changed); use another generate.output or delete that directory")
        if old is not None:
            return
    _write_atomic(path, json.dumps(manifest, indent=2, sort_keys=True).encode())


# --------------------------------------------------------------------------- model


def load_model(cfg: Config) -> tuple[ModelConfig, Any, str]:
    """(model config, params, where they came from): generate.checkpoint, else generate.hf_dir,
    else a random init from `seed` (with a warning)."""
    gen = cfg.generate
    if gen.checkpoint:
        from xinst_jax.checkpoint import load_params_for_export

        if not Path(gen.checkpoint).exists():
            raise ConfigError(f"generate.checkpoint: {gen.checkpoint} not found")
        return cfg.model, load_params_for_export(gen.checkpoint, cfg.model), f"checkpoint {gen.checkpoint}"
    if gen.hf_dir:
        from xinst_jax.convert.hf import import_hf, model_for_hf_dir

        path = Path(gen.hf_dir)
        if not (path / "config.json").is_file():
            raise ConfigError(f"generate.hf_dir: {path} is not a Hugging Face model directory (no config.json)")
        try:
            model, params = import_hf(path, model_for_hf_dir(cfg.model, path))
        except ConfigError as e:
            raise ConfigError(f"generate.hf_dir: {e} (set model.preset to the checkpoint's architecture, or "
                              "model.preset=null to take it from config.json)") from None
        return model, params, f"hf {path}"
    import jax

    from xinst_jax.model.llama import init_params

    print(f"warning: generate: neither generate.checkpoint nor generate.hf_dir is set; using random-init "
          f"params (seed {cfg.seed}), so the outputs are noise", file=sys.stderr, flush=True)
    return cfg.model, jax.jit(lambda k: init_params(cfg.model, k))(jax.random.PRNGKey(cfg.seed)), \
        f"random init (seed {cfg.seed})"


# --------------------------------------------------------------------------- the job


def sampling_settings(cfg: Config, model: ModelConfig, tokenizer) -> "Any":
    from xinst_jax.infer.sampling import SamplingSettings

    gen = cfg.generate
    stop_ids = list(gen.stop_token_ids)
    if gen.stop_on_eos:
        stop_ids.append(model.eos_token_id)
    stop_seqs = []
    for s in gen.stop_strings:
        ids = tokenizer.encode(s)
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


def output_text(tokenizer, tokens: list[int], finish: str, settings, stop_strings: list[str]) -> tuple[str, str]:
    """Decoded text without the stop token, cut at the first stop string."""
    if finish == "stop" and tokens and tokens[-1] in settings.stop_token_ids:
        tokens = tokens[:-1]
    text = tokenizer.decode(tokens)
    cuts = [text.find(s) for s in stop_strings if s and s in text]
    if cuts:
        text, finish = text[:min(cuts)], "stop"
    return text, finish


def _validate(cfg: Config) -> Path:
    gen = cfg.generate
    for key in ("batch_size", "shard_size", "decode_segments"):
        if getattr(gen, key) < 1:
            raise ConfigError(f"generate.{key}: must be >= 1, got {getattr(gen, key)}")
    if not gen.prompt_buckets or any(b < 1 for b in gen.prompt_buckets):
        raise ConfigError(f"generate.prompt_buckets: expected positive lengths, got {gen.prompt_buckets}")
    path = Path(gen.input) if gen.input else DEMO_PROMPTS
    if not path.is_file():
        raise ConfigError(f"generate.input: {path} not found")
    return path


def run_generate(cfg: Config) -> dict:
    """The job body; returns the report (also written to <output>/report.json by process 0)."""
    import jax

    from xinst_jax.infer.generate import Engine
    from xinst_jax.infer.tokenizer import load_tokenizer
    from xinst_jax.runtime import setup_runtime
    from xinst_jax.sharding import make_mesh, parse_rules

    gen = cfg.generate
    input_path = _validate(cfg)
    tokenizer = load_tokenizer(gen.tokenizer)
    setup_runtime(cfg.distributed)
    process, count = jax.process_index(), jax.process_count()
    out = Path(gen.output) if gen.output else cfg.resolved_run_dir() / "generate"
    out.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    scan = scan_input(input_path, gen.join)
    ranges = shard_ranges(len(scan.records), gen.shard_size)
    model, params, source = load_model(cfg)
    if getattr(tokenizer, "vocab_size", 0) > model.vocab_size:
        raise ConfigError(f"generate.tokenizer: {gen.tokenizer} has {tokenizer.vocab_size} tokens but the model's "
                          f"vocabulary is {model.vocab_size}")
    settings = sampling_settings(cfg, model, tokenizer)
    manifest = {
        "input": str(input_path.resolve()), "input_sha256": scan.fingerprint, "records": len(scan.records),
        "shard_size": gen.shard_size, "model_source": source, "model": dataclasses.asdict(model),
        "tokenizer": gen.tokenizer,
        "settings": {k: v for k, v in dataclasses.asdict(gen).items()
                     if k not in ("input", "output", "progress", "split", "checkpoint", "hf_dir")},
    }
    check_manifest(out, json.loads(json.dumps(manifest)))

    mine = shards_for_process(len(ranges), process, count, gen.split)
    todo = [k for k in mine if not shard_is_done(out, k, ranges[k][1] - ranges[k][0])]
    reused = len(mine) - len(todo)
    if process == 0 and scan.bad:
        print(f"generate: skipped {len(scan.bad)} bad input line(s):", flush=True)
        for line in scan.bad[:MAX_LISTED_BAD]:
            print(f"  {line}", flush=True)
        if len(scan.bad) > MAX_LISTED_BAD:
            print(f"  ... and {len(scan.bad) - MAX_LISTED_BAD} more (all in {out / 'report.json'})", flush=True)

    new_tokens = truncated = 0
    gen_seconds = 0.0
    if todo:
        mesh = make_mesh(cfg.mesh, jax.local_devices())
        rules = parse_rules(cfg.mesh.rules)
        try:
            engine = Engine(params, model, mesh=mesh, rules=rules, batch_size=gen.batch_size,
                            buckets=gen.prompt_buckets, kv_dtype=gen.kv_dtype or None,
                            weight_dtype=gen.weight_dtype or None, max_segments=gen.decode_segments,
                            attention_kernel=gen.attention_kernel)
        except ValueError as e:
            raise ConfigError(f"generate: {e}") from None
        del params
        bar = _progress(gen.progress, sum(b - a for a, b in (ranges[k] for k in mine)),
                        sum(ranges[k][1] - ranges[k][0] for k in mine if k not in todo))
        t0 = time.perf_counter()
        for k in todo:
            a, b = ranges[k]
            recs, ids, prompts = [], [], []
            for rec, rid, text in read_records(input_path, scan.records[a:b], gen.join):
                tokens = tokenizer.encode(text)
                if gen.add_bos:
                    tokens = [model.bos_token_id] + tokens
                recs.append(rec)
                ids.append(rid)
                prompts.append(tokens or [model.bos_token_id])
            result = engine.generate(prompts, settings, row_ids=[r.line for r in recs])
            lines = []
            for rec, rid, toks, finish, plen, trunc in zip(recs, ids, result.tokens, result.finish_reasons,
                                                           result.prompt_lengths, result.truncated):
                text, finish = output_text(tokenizer, toks, finish, settings, gen.stop_strings)
                lines.append(json.dumps({"id": rid, "line": rec.line, "output": text, "finish_reason": finish,
                                         "prompt_tokens": plen, "output_tokens": len(toks), "truncated": trunc},
                                        ensure_ascii=False))
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
        "input": str(input_path), "output": str(out), "records": len(scan.records), "bad_lines": len(scan.bad),
        "bad": scan.bad, "shards": len(ranges), "process": process, "process_count": count,
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
        _write_atomic(out / "report.json", json.dumps(report, indent=2, ensure_ascii=False).encode("utf-8"))
        rate = f", {report['tokens_per_s']} tok/s" if report["tokens_per_s"] else ""
        print(f"generate: {out / 'output.jsonl'}: {len(scan.records)} records in {len(ranges)} shard(s) "
              f"({len(todo)} generated, {reused} reused); {new_tokens} new tokens{rate}; "
              f"{len(scan.bad)} bad line(s) skipped; model: {source}", flush=True)
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
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    run_generate(cfg)
