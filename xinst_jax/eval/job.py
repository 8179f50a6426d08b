"""Job `eval_xinst`: how well does a model answer English instructions in each language?

    python launch/tpu_run.py --config eval_xinst --set generate.hf_dir=runs/sft_xinst/hf \\
        --set generate.tokenizer=runs/sft_xinst/hf --set eval.prompts=data/seed_tasks.jsonl

Parts (each runs when its input is set; at least one must be):

  answers     eval.prompts (English instructions) x eval.languages: the model answers each with the
              `sft` Task's prompt (the template appends " Answer in {Language}."; `sft_assistant`
              when data.sft_assistant_style or generate.template says so), sampled with generate.*
              (the X-Instruction settings). -> answers/<lang>.jsonl
  fidelity    the answers' language (py3langid) and scripts (fidelity.py) -> fidelity.jsonl
  judge       ours against eval.reference (answers {id, lang, output}) or against a second
              OpenAI-compatible endpoint (eval.opponent_base_url + eval.opponent_model, asked
              the way the released code asked ChatGPT), judged by eval.judge.* in both orders
              with the released prompt (judge.py) -> judge.jsonl (every verdict, raw replies)
  xcopa       eval.xcopa (lm-eval's layout <lang>/val.<lang>.jsonl) for the eval.languages XCOPA
              has (id sw ta th tr vi) -> xcopa.jsonl (per item: both choices' log-likelihoods)
  perplexity  eval.perplexity (held-out {lang, text} records) -> perplexity.jsonl (per document)
  report      results.json (every number), report.md and PNG plots, the loss curve from
              eval.metrics (default <run_dir>/metrics.jsonl when it exists)

Prompt records (eval.prompts, .jsonl or a .json list): `instruction` (or `text`, as the
released vicuna-eval questions), `id` (or `question_id`; default the 1-based record number),
and an optional `input` (or the first of `instances`' inputs, as in seed_tasks.jsonl), which
is appended to the instruction after a blank line, before " Answer in {Language}.".

Resume: answers are written per language (atomically) beside a manifest of what made them
(prompts, model, tokenizer, template, sampling); a rerun reuses every finished language and is
refused if the manifest differs. Judge and opponent replies are cached (judge.py): a rerun sends
no request twice. The benchmarks are recomputed (they are cheap next to generation).

Paths: eval.prompts, eval.reference, eval.xcopa, eval.perplexity, eval.metrics, eval.judge.cache
and eval.out are local or gs://, read and written through xinst_jax/paths.py.

Processes: each process generates the languages i::n of the list, and scores the XCOPA items and
perplexity documents i::n, on its own engine over its local devices; process 0 gathers the parts
(files under <out>/parts), judges and writes the report.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
import zlib
from typing import Any, Optional

from xinst_jax import paths
from xinst_jax.config import Config, ConfigError
from xinst_jax.data.records import DataError
from xinst_jax.jobs import register_job
from xinst_jax.shards import check_manifest, file_sha256, write_atomic, write_json

log = logging.getLogger(__name__)

INPUT_JOIN = "\n\n"  # between a prompt's instruction and its input
XCOPA_ADD_BOS = False  # as lm-eval's default (add_bos_token=False); not yet a config key
ROW_ID_STRIDE = 1 << 20  # sampling row id = language slot * stride + prompt index (< 2^32)


def _out_dir(cfg: Config) -> Any:
    """eval.out (local or gs://, as paths.as_path gives it), or <run_dir>/eval."""
    return paths.as_path(cfg.eval.out) if cfg.eval.out else cfg.resolved_run_dir() / "eval"


# --------------------------------------------------------------------------- inputs


def read_prompts(path: Any, max_prompts: int = 0, key: str = "eval.prompts") -> list[dict]:
    """[{id, instruction}] from a .jsonl or a .json list (module docstring), local or gs://; a bad
    record is a ConfigError naming the file, the line (or list index) and the field."""
    path = paths.as_path(str(path))
    rows: list[tuple[str, Any]] = []
    if path.suffix == ".json":
        try:
            data = json.loads(paths.read_text(path))
        except (UnicodeDecodeError, ValueError) as e:
            raise ConfigError(f"{key}: {path}: not valid JSON ({e})") from None
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise ConfigError(f"{key}: {path}: expected a JSON list of objects")
        rows = [(f"{path}[{i}]", obj) for i, obj in enumerate(data)]
    elif path.name.endswith(".jsonl"):
        with paths.open(path, "rb") as f:
            for n, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    rows.append((f"{path}:{n}", json.loads(raw.decode("utf-8"))))
                except (UnicodeDecodeError, ValueError) as e:
                    raise ConfigError(f"{key}: {path}:{n}: not a JSON line ({e})") from None
    else:
        raise ConfigError(f"{key}: {path}: expected a .jsonl or .json file")
    prompts, seen = [], set()
    for i, (where, obj) in enumerate(rows, 1):
        if not isinstance(obj, dict):
            raise ConfigError(f"{key}: {where}: expected a JSON object")
        ins = obj.get("instruction", obj.get("text"))
        if not isinstance(ins, str) or not ins.strip():
            raise ConfigError(f"{key}: {where}: instruction: missing or empty (also read from `text`)")
        extra = obj.get("input")
        if extra is None and isinstance(obj.get("instances"), list) and obj["instances"]:
            first = obj["instances"][0]
            extra = first.get("input") if isinstance(first, dict) else None
        if extra is not None and not isinstance(extra, str):
            raise ConfigError(f"{key}: {where}: input: expected a string")
        rid = obj.get("id", obj.get("question_id", i))
        if isinstance(rid, bool) or not isinstance(rid, (str, int)):
            raise ConfigError(f"{key}: {where}: id: expected a string or an integer")
        rid = str(rid)
        if rid in seen:
            raise ConfigError(f"{key}: {where}: id: {rid!r} repeats an earlier record's id")
        seen.add(rid)
        text = ins.strip() + (INPUT_JOIN + extra.strip() if extra and extra.strip() else "")
        prompts.append({"id": rid, "instruction": text})
        if max_prompts and len(prompts) >= max_prompts:
            break
    if not prompts:
        raise ConfigError(f"{key}: {path}: no prompts")
    return prompts


def read_reference(path: Any, key: str = "eval.reference") -> dict[tuple[str, str], str]:
    """(id, lang) -> output from a JSONL of {id, lang, output}."""
    from xinst_jax.data.records import json_objects

    out: dict[tuple[str, str], str] = {}
    for where, obj in json_objects(path, key):
        for fld in ("id", "lang", "output"):
            if fld not in obj or obj[fld] is None:
                raise ConfigError(f"{where}: {fld}: missing")
        if not isinstance(obj["output"], str) or not isinstance(obj["lang"], str):
            raise ConfigError(f"{where}: output and lang: expected strings")
        out[(str(obj["id"]), obj["lang"].strip().lower())] = obj["output"]
    return out


def _validate(cfg: Config) -> dict:
    """Every check that needs no model; returns the resolved inputs."""
    from xinst_jax.data.templates import language_name
    from xinst_jax.eval.judge import api_key_from_env, is_local_url

    ev, gen = cfg.eval, cfg.generate
    if not ev.languages:
        raise ConfigError("eval.languages: empty; name at least one language")
    for lang in ev.languages:
        try:
            language_name(lang)
        except DataError as e:
            raise ConfigError(f"eval.languages: {e}") from None
    if len(set(ev.languages)) != len(ev.languages):
        raise ConfigError(f"eval.languages: repeats a language ({ev.languages})")
    if ev.max_prompts < 0:
        raise ConfigError(f"eval.max_prompts: must be >= 0, got {ev.max_prompts}")
    for k in ("batch_size", "decode_segments"):
        if getattr(gen, k) < 1:
            raise ConfigError(f"generate.{k}: must be >= 1, got {getattr(gen, k)}")
    if not gen.prompt_buckets or any(b < 2 for b in gen.prompt_buckets):
        raise ConfigError(f"generate.prompt_buckets: expected lengths >= 2, got {gen.prompt_buckets}")
    # inputs local or gs:// (the path layer): checked here, before a model is loaded
    got: dict = {"prompts": None, "reference": None, "xcopa": None, "metrics": None}
    if ev.prompts:
        p = paths.as_path(ev.prompts)
        if not p.is_file():
            raise ConfigError(f"eval.prompts: {p} not found")
        got["prompts"] = p
    if ev.reference and ev.opponent_base_url:
        raise ConfigError("eval.reference and eval.opponent_base_url: set one of them (what our answers are judged "
                          "against), not both")
    judging = bool(ev.reference or ev.opponent_base_url)
    if judging:
        which = "eval.reference" if ev.reference else "eval.opponent_base_url"
        if not ev.prompts:
            raise ConfigError(f"{which}: judging needs eval.prompts (the questions)")
        if not ev.judge.base_url:
            raise ConfigError(f"eval.judge.base_url: empty, but {which} is set (e.g. https://api.openai.com/v1)")
        if not ev.judge.model:
            raise ConfigError("eval.judge.model: empty")
        if ev.judge.retries < 0 or ev.judge.max_tokens < 1 or ev.judge.timeout_s <= 0 or ev.judge.backoff_s < 0:
            raise ConfigError("eval.judge: retries >= 0, max_tokens >= 1, timeout_s > 0 and backoff_s >= 0 needed "
                              f"(got {ev.judge.retries}, {ev.judge.max_tokens}, {ev.judge.timeout_s}, "
                              f"{ev.judge.backoff_s})")
        for url_key, url in (("eval.judge.base_url", ev.judge.base_url),
                             ("eval.opponent_base_url", ev.opponent_base_url)):
            if url and not url.startswith(("http://", "https://")):
                raise ConfigError(f"{url_key}: expected an http(s) URL, got {url!r}")
            if url and ev.judge.api_key_env and not api_key_from_env(ev.judge.api_key_env) and not is_local_url(url):
                raise ConfigError(f"eval.judge.api_key_env: the environment variable {ev.judge.api_key_env} is not "
                                  f"set, and {url_key}={url} is not a local endpoint")
    if ev.reference:
        r = paths.as_path(ev.reference)
        if not r.is_file():
            raise ConfigError(f"eval.reference: {r} not found")
        got["reference"] = r
    if ev.opponent_base_url and not ev.opponent_model:
        raise ConfigError("eval.opponent_model: empty, but eval.opponent_base_url is set")
    if ev.xcopa:
        x = paths.as_path(ev.xcopa)
        if not x.is_dir():
            raise ConfigError(f"eval.xcopa: {x} is not a directory (expected lm-eval's layout <lang>/val.<lang>.jsonl)")
        got["xcopa"] = x
    if ev.metrics:
        m = paths.as_path(ev.metrics)
        if not m.is_file():
            raise ConfigError(f"eval.metrics: {m} not found")
        got["metrics"] = m
    else:
        m = cfg.resolved_run_dir() / "metrics.jsonl"
        got["metrics"] = m if m.is_file() else None
    for i, inp in enumerate(ev.perplexity):
        if bool(inp.path) == bool(inp.tfds_name):
            raise ConfigError(f"eval.perplexity[{i}]: set exactly one of path and tfds_name")
    if not (ev.prompts or ev.xcopa or ev.perplexity):
        raise ConfigError("eval: nothing to evaluate: set eval.prompts, eval.xcopa or eval.perplexity")
    return got


# --------------------------------------------------------------------------- processes


def _barrier(name: str) -> None:
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _gather(out: Any, name: str, mine: list, process: int, count: int) -> Optional[list]:
    """Every process's `mine` (lists of JSON-able rows), concatenated in process order; on
    process 0 only (None elsewhere). One process: no files."""
    if count == 1:
        return mine
    parts = out / "parts"
    parts.mkdir(parents=True, exist_ok=True)
    write_atomic(parts / f"{name}.{process:03d}-of-{count:03d}.json", json.dumps(mine, ensure_ascii=False).encode())
    _barrier(f"xinst_jax.eval.{name}")
    if process:
        return None
    rows: list = []
    for p in range(count):
        rows += json.loads((parts / f"{name}.{p:03d}-of-{count:03d}.json").read_text())
    return rows


# --------------------------------------------------------------------------- answers


def _row_slot(lang: str) -> int:
    return zlib.crc32(lang.encode()) % ((1 << 32) // ROW_ID_STRIDE)


def _count_lines(path: Any) -> int:
    with paths.open(path, "rb") as f:
        return sum(1 for _ in f)


def generate_answers(cfg: Config, engine, task, tokenizer, settings, prompts: list[dict], langs: list[str],
                     answers_dir: Any) -> dict[str, str]:
    """answers/<lang>.jsonl for `langs` (skipping finished ones); returns lang -> 'generated'|'reused'."""
    from xinst_jax.infer.job import output_text

    done = {}
    for lang in langs:
        path = answers_dir / f"{lang}.jsonl"
        if path.is_file() and _count_lines(path) == len(prompts):
            done[lang] = "reused"
            continue
        records = [{"id": p["id"], "instruction": p["instruction"], "lang": lang} for p in prompts]
        t0 = time.perf_counter()
        toks = [task.prompt_tokens(r) for r in records]
        base = _row_slot(lang) * ROW_ID_STRIDE
        result = engine.generate(toks, settings, row_ids=[base + i for i in range(len(records))])
        lines = []
        for r, out_toks, finish, plen, trunc in zip(records, result.tokens, result.finish_reasons,
                                                    result.prompt_lengths, result.truncated):
            text, finish = output_text(tokenizer, out_toks, finish, settings, cfg.generate.stop_strings)
            lines.append(json.dumps({"id": r["id"], "lang": lang, "instruction": r["instruction"], "output": text,
                                     "finish_reason": finish, "prompt_tokens": plen, "output_tokens": len(out_toks),
                                     "truncated": bool(trunc)}, ensure_ascii=False))
        write_atomic(path, "".join(line + "\n" for line in lines).encode("utf-8"))
        done[lang] = "generated"
        print(f"eval: answers in {lang}: {len(lines)} in {time.perf_counter() - t0:.1f}s", flush=True)
    return done


def read_answers(answers_dir: Any, langs: list[str]) -> dict[str, list[dict]]:
    out = {}
    for lang in langs:
        lines = paths.read_text(answers_dir / f"{lang}.jsonl").splitlines()
        out[lang] = [json.loads(line) for line in lines if line.strip()]
    return out


def answer_stats(answers: dict[str, list[dict]]) -> dict:
    out = {}
    for lang, rows in answers.items():
        n = len(rows)
        out[lang] = {"answers": n,
                     "mean_output_tokens": round(sum(r["output_tokens"] for r in rows) / n, 2) if n else None,
                     "finished_by_length": sum(r["finish_reason"] == "length" for r in rows),
                     "truncated_prompts": sum(bool(r["truncated"]) for r in rows),
                     "mean_output_chars": round(sum(len(r["output"]) for r in rows) / n, 1) if n else None}
    return out


# --------------------------------------------------------------------------- opponents and judging


def opponent_answers(cfg: Config, prompts: list[dict], langs: list[str], out: Any) -> tuple[dict, dict]:
    """(lang -> id -> answer or None when the endpoint failed, client stats) from the second endpoint."""
    import concurrent.futures

    from xinst_jax.eval.judge import (JUDGE_CONCURRENCY, OPPONENT_TEMPERATURE, OPPONENT_TOP_P, ChatClient,
                                      EndpointError, ReplyCache, api_key_from_env, opponent_messages)

    ev = cfg.eval
    client = ChatClient(ev.opponent_base_url, ev.opponent_model, api_key_from_env(ev.judge.api_key_env),
                        timeout_s=ev.judge.timeout_s, retries=ev.judge.retries, backoff_s=ev.judge.backoff_s,
                        cache=ReplyCache(out / "opponent_cache.jsonl"), name="eval.opponent")

    def ask(lang: str, p: dict):
        try:
            return client.chat(opponent_messages(p["instruction"], lang), max_tokens=cfg.generate.max_new_tokens,
                               temperature=OPPONENT_TEMPERATURE, top_p=OPPONENT_TOP_P).content
        except EndpointError as e:
            if e.fatal:
                raise ConfigError(str(e)) from None
            log.warning("%s", e)
            return None

    answers: dict[str, dict] = {lang: {} for lang in langs}
    jobs = [(lang, p) for lang in langs for p in prompts]
    try:
        with concurrent.futures.ThreadPoolExecutor(JUDGE_CONCURRENCY) as pool:
            for (lang, p), text in zip(jobs, pool.map(lambda j: ask(*j), jobs)):
                answers[lang][p["id"]] = text
    finally:
        client.cache.save()  # what a cache on a bucket has not written yet
    opp_dir = out / "answers_opponent"
    opp_dir.mkdir(parents=True, exist_ok=True)
    for lang in langs:
        lines = [json.dumps({"id": p["id"], "lang": lang, "output": answers[lang][p["id"]]}, ensure_ascii=False)
                 for p in prompts]
        write_atomic(opp_dir / f"{lang}.jsonl", "".join(x + "\n" for x in lines).encode("utf-8"))
    return answers, client.stats.to_dict()


def run_judge(cfg: Config, prompts: list[dict], answers: dict[str, list[dict]], theirs: dict[str, dict],
              opponent: str, out: Any) -> dict:
    """Judge ours against `theirs` (lang -> id -> text or None); judge.jsonl + the summary."""
    from xinst_jax.eval.judge import (ChatClient, EndpointError, Judge, PairItem, PairVerdict, ReplyCache,
                                      api_key_from_env, judge_endpoint_config, rule_text, summarize)

    jc = cfg.eval.judge
    cache_path = paths.as_path(jc.cache) if jc.cache else out / "judge_cache.jsonl"
    cache = ReplyCache(cache_path)
    client = ChatClient(jc.base_url, jc.model, api_key_from_env(jc.api_key_env), timeout_s=jc.timeout_s,
                        retries=jc.retries, backoff_s=jc.backoff_s, cache=cache)
    judge = Judge(client, max_tokens=jc.max_tokens, temperature=jc.temperature)
    instructions = {p["id"]: p["instruction"] for p in prompts}
    items, missing, failed_opponent = [], {}, []
    for lang, rows in answers.items():
        for r in rows:
            if r["id"] not in theirs.get(lang, {}):
                missing[lang] = missing.get(lang, 0) + 1
                continue
            other = theirs[lang][r["id"]]
            if other is None:  # the opponent endpoint failed for this one
                failed_opponent.append(PairVerdict(r["id"], lang, "failed", None, None, None, None, 0,
                                                   "no answer from eval.opponent_base_url"))
                continue
            items.append(PairItem(r["id"], lang, instructions[r["id"]], r["output"], other))
    t0 = time.perf_counter()
    try:
        verdicts = judge.judge(items) + failed_opponent
    except EndpointError as e:
        raise ConfigError(str(e)) from None
    finally:
        cache.save()  # what a cache on a bucket has not written yet
    order = {lang: i for i, lang in enumerate(answers)}
    position = {p["id"]: i for i, p in enumerate(prompts)}
    verdicts.sort(key=lambda v: (order[v.lang], position[v.id]))
    lines = [json.dumps(v.to_dict(), ensure_ascii=False) for v in verdicts]
    write_atomic(out / "judge.jsonl", "".join(x + "\n" for x in lines).encode("utf-8"))
    summary = summarize(verdicts)
    per_language = {lang: summary[lang] for lang in answers if lang in summary}
    per_language["all"] = summary["all"]
    return {"opponent": opponent, "endpoint": judge_endpoint_config(jc), "rule": rule_text(),
            "per_language": per_language, "missing_reference": missing,
            "usage": client.stats.to_dict() | {"cache_file": str(cache_path), "cache_entries_at_start": cache.loaded},
            "seconds": round(time.perf_counter() - t0, 3)}


# --------------------------------------------------------------------------- benchmarks


def xcopa_inputs(root: Any, langs: list[str]) -> tuple[dict[str, tuple[Any, str]], list[str]]:
    """lang -> (file, split) for the eval languages XCOPA has; and the XCOPA languages without a file."""
    from xinst_jax.eval.benchmarks import XCOPA_CONNECTORS, XCOPA_SPLITS, xcopa_file

    found, missing = {}, []
    for lang in langs:
        if lang not in XCOPA_CONNECTORS:
            continue
        for split in XCOPA_SPLITS:
            f = xcopa_file(root, lang, split)
            if f.is_file():
                found[lang] = (f, split)
                break
        else:
            missing.append(lang)
    if not found:
        xl = [lang for lang in langs if lang in XCOPA_CONNECTORS]
        raise ConfigError(f"eval.xcopa: {root}: no <lang>/val.<lang>.jsonl (or test.<lang>.jsonl) for "
                          f"{', '.join(xl) if xl else 'any of eval.languages (XCOPA has ' + ', '.join(sorted(XCOPA_CONNECTORS)) + ')'}")
    return found, missing


def run_xcopa(engine, tokenizer, files: dict[str, tuple[Any, str]], process: int, count: int, out: Any
              ) -> Optional[list[dict]]:
    from xinst_jax.eval.benchmarks import read_xcopa, score_xcopa

    docs = [(lang, d) for lang, (path, _) in files.items() for d in read_xcopa(path, lang)]
    mine = docs[process::count]
    items: list[dict] = []
    for lang in files:
        ds = [d for lg, d in mine if lg == lang]
        items += score_xcopa(engine, tokenizer, ds, lang, XCOPA_ADD_BOS)
    return _gather(out, "xcopa", items, process, count)


def read_perplexity_docs(cfg: Config) -> tuple[list, dict]:
    """Held-out documents in eval.languages (others are skipped and counted, as are bad lines)."""
    from xinst_jax.data.records import RecordReader
    from xinst_jax.eval.benchmarks import PerplexityDoc

    reader = RecordReader(cfg.eval.languages, sys.maxsize, strict=False, required=("text",), require_lang=True,
                          keep_bad=20, log_first=0, strict_key="eval.perplexity")
    docs = [PerplexityDoc(loc.record["id"], loc.record["lang"], loc.record["text"])
            for loc in reader.read_located(cfg.eval.perplexity, key="eval.perplexity")]
    totals = reader.totals()
    if not docs:
        raise ConfigError(f"eval.perplexity: no documents in eval.languages ({', '.join(cfg.eval.languages)}); "
                          f"skipped: {totals['skipped'] or 'none'}")
    return docs, {"read": totals["in"], "kept": totals["kept"], "skipped": totals["skipped"], "bad": reader.bad}


# --------------------------------------------------------------------------- the job


def run_eval(cfg: Config) -> dict:
    """The job body; returns results (also <out>/results.json, written by process 0)."""
    import jax

    from xinst_jax.data.tokenizer import load_tokenizer
    from xinst_jax.eval import report
    from xinst_jax.eval.benchmarks import perplexity_summary, score_perplexity, xcopa_summary
    from xinst_jax.eval.fidelity import MIXED_SCRIPT_SHARE, answer_fidelity, fidelity_table
    from xinst_jax.infer.job import build_engine, check_tokenizer_fits, load_model, sampling_settings
    from xinst_jax.runtime import setup_runtime
    from xinst_jax.tasks import Task

    start = time.perf_counter()
    ev, gen = cfg.eval, cfg.generate
    inputs = _validate(cfg)
    out = _out_dir(cfg)
    langs = list(ev.languages)
    prompts = read_prompts(inputs["prompts"], ev.max_prompts) if inputs["prompts"] else []
    reference = read_reference(inputs["reference"]) if inputs["reference"] else None
    xcopa_files, xcopa_missing = xcopa_inputs(inputs["xcopa"], langs) if inputs["xcopa"] else ({}, [])
    ppl_docs, ppl_read = read_perplexity_docs(cfg) if ev.perplexity else ([], {})

    tokenizer = load_tokenizer(gen.tokenizer, key="generate.tokenizer")
    task = Task.for_answers(cfg.data, gen, tokenizer)
    setup_runtime(cfg.distributed)
    process, count = jax.process_index(), jax.process_count()
    out.mkdir(parents=True, exist_ok=True)
    model, params, source = load_model(cfg)
    check_tokenizer_fits(tokenizer, model, "generate.tokenizer")
    settings = sampling_settings(cfg, model, tokenizer)
    engine = build_engine(cfg, model, params)
    del params
    results: dict[str, Any] = {"model": source, "template": task.name, "languages": langs,
                               "tokenizer": gen.tokenizer, "seconds": {}}

    # ---- answers
    answers: dict[str, list[dict]] = {}
    if prompts:
        t0 = time.perf_counter()
        answers_dir = out / "answers"
        answers_dir.mkdir(parents=True, exist_ok=True)
        manifest = {"prompts": paths.absolute(str(inputs["prompts"])),
                    "prompts_sha256": file_sha256(inputs["prompts"]),
                    "max_prompts": ev.max_prompts, "model_source": source, "model": dataclasses.asdict(model),
                    "tokenizer_sha256": tokenizer.sha256(), "template": task.describe(),
                    "settings": {k: v for k, v in dataclasses.asdict(gen).items()
                                 if k not in ("input", "output", "progress", "split", "checkpoint", "hf_dir",
                                              "shard_size", "strict", "lang", "template")}}
        if process == 0:
            check_manifest(answers_dir, manifest, "eval.out")
        _barrier("xinst_jax.eval.manifest")
        check_manifest(answers_dir, manifest, "eval.out", write=False)
        status = generate_answers(cfg, engine, task, tokenizer, settings, prompts, langs[process::count], answers_dir)
        _barrier("xinst_jax.eval.answers")
        results["seconds"]["answers"] = round(time.perf_counter() - t0, 3)
        if process == 0:
            answers = read_answers(answers_dir, langs)
            results["prompts"] = {"path": str(inputs["prompts"]), "count": len(prompts)}
            results["answers"] = answer_stats(answers)
            results["answers_reused"] = sorted(k for k, v in status.items() if v == "reused")

    # ---- benchmarks (every process scores its share)
    if xcopa_files:
        t0 = time.perf_counter()
        items = run_xcopa(engine, tokenizer, xcopa_files, process, count, out)
        if process == 0:
            items.sort(key=lambda it: (list(xcopa_files).index(it["lang"]), it["idx"]))
            write_atomic(out / "xcopa.jsonl", "".join(json.dumps(it, ensure_ascii=False) + "\n"
                                                      for it in items).encode("utf-8"))
            per = {lang: xcopa_summary([it for it in items if it["lang"] == lang]) for lang in xcopa_files}
            accs = [r["acc"] for r in per.values()]
            splits = sorted({split for _, split in xcopa_files.values()})
            results["xcopa"] = {"per_language": per, "average_acc": round(sum(accs) / len(accs), 4),
                                "split": splits[0] if len(splits) == 1 else "+".join(splits),
                                "files": {lang: str(p) for lang, (p, _) in xcopa_files.items()},
                                "missing_languages": xcopa_missing, "add_bos": XCOPA_ADD_BOS,
                                "format": "lm-evaluation-harness xcopa (task version 1.0), metric acc"}
        results["seconds"]["xcopa"] = round(time.perf_counter() - t0, 3)
    if ppl_docs:
        t0 = time.perf_counter()
        max_seq_len = engine.score_buckets[-1] - 1
        per_doc = _gather(out, "perplexity", score_perplexity(engine, tokenizer, ppl_docs[process::count],
                                                              max_seq_len), process, count)
        if process == 0:
            write_atomic(out / "perplexity.jsonl", "".join(json.dumps(d, ensure_ascii=False) + "\n"
                                                           for d in per_doc).encode("utf-8"))
            results["perplexity"] = {"per_language": perplexity_summary(per_doc), "max_seq_len": max_seq_len,
                                     "inputs": [dataclasses.asdict(i) for i in ev.perplexity], "records": ppl_read}
        results["seconds"]["perplexity"] = round(time.perf_counter() - t0, 3)
    del engine
    if process != 0:
        _barrier("xinst_jax.eval.report")
        return results

    # ---- fidelity
    if answers:
        t0 = time.perf_counter()
        verdicts, lines = [], []
        for lang, rows in answers.items():
            for r in rows:
                v = answer_fidelity(r["output"], lang)
                verdicts.append((lang, v))
                lines.append(json.dumps({"id": r["id"], "lang": lang, **v}, ensure_ascii=False))
        write_atomic(out / "fidelity.jsonl", "".join(x + "\n" for x in lines).encode("utf-8"))
        results["fidelity"] = fidelity_table(verdicts, langs) | {"mixed_script_threshold": MIXED_SCRIPT_SHARE}
        results["seconds"]["fidelity"] = round(time.perf_counter() - t0, 3)

    # ---- judge
    if answers and (reference is not None or ev.opponent_base_url):
        if reference is not None:
            theirs: dict[str, dict] = {lang: {} for lang in langs}
            for (rid, lang), text in reference.items():
                if lang in theirs:
                    theirs[lang][rid] = text
            opponent = f"reference {inputs['reference'].name}"
            opp_usage = None
        else:
            theirs, opp_usage = opponent_answers(cfg, prompts, langs, out)
            opponent = f"{ev.opponent_model} at {ev.opponent_base_url}"
        results["judge"] = run_judge(cfg, prompts, answers, theirs, opponent, out)
        if opp_usage is not None:
            results["judge"]["opponent_usage"] = opp_usage
        results["seconds"]["judge"] = results["judge"].pop("seconds")

    # ---- report
    results["seconds"]["total"] = round(time.perf_counter() - start, 3)
    plots = report.make_plots(out, results, inputs["metrics"])
    results["plots"] = plots
    results["metrics"] = str(inputs["metrics"]) if inputs["metrics"] else None
    write_json(out / "results.json", results)
    report.write_report(out, results, plots)
    _barrier("xinst_jax.eval.report")
    _print_summary(out, results)
    return results


def _print_summary(out: Any, results: dict) -> None:
    parts = []
    if "fidelity" in results:
        parts.append(f"fidelity {results['fidelity']['all']['fidelity']}")
    if "judge" in results:
        a = results["judge"]["per_language"]["all"]
        parts.append(f"judge win/tie/loss {a['win']}/{a['tie']}/{a['loss']} ({a['unparseable']} unparseable, "
                     f"{a['failed']} failed; {results['judge']['usage']['requests']} requests)")
    if "xcopa" in results:
        parts.append(f"XCOPA acc {results['xcopa']['average_acc']}")
    if "perplexity" in results:
        parts.append(f"perplexity on {len(results['perplexity']['per_language'])} language(s)")
    print(f"eval: {out / 'report.md'}: {'; '.join(parts)}", flush=True)


@register_job("eval_xinst")
def eval_job(cfg: Config) -> None:
    run_eval(cfg)

