"""Job `refine` (X-Instruction stage 3): the evaluator labels candidates, flawed ones get fresh
instructions, the best are kept.

    python launch/tpu_run.py --config refine_xinst --set curate.evaluator_checkpoint=runs/evaluator_xinst/checkpoints \\
        --set generate.checkpoint=runs/revgen_xinst/checkpoints --set generate.tokenizer=...

Round r (1 .. curate.rounds) takes the candidates still open (round 1: all of them):

  - the evaluator (curate/evaluator.py) labels each pair best / flawed / worst by the probability
    of the three label tokens; `score` is p(best);
  - best: kept, with its score and round;
  - worst: dropped;
  - flawed: the generator samples curate.fresh_instructions new instructions for the response
    (the revgen Task, generate.* settings), the instruction filters drop bad ones, the evaluator
    rates the rest; the highest-scoring one replaces the instruction and, when it is labelled
    best, the pair is kept ("fixed"); otherwise the pair stays open for the next round. Pairs
    still open after the last round are dropped.

With curate.retrain_generator, the generator is fine-tuned on the round's kept pairs (revgen
template, train.* settings, from the generator's weights) before the next round, as instruction
backtranslation does; the next round samples from the fine-tuned generator.

Output, `<curate.out or run_dir>/refine/` (local or gs://: every file through xinst_jax/paths.py):

    round-1/part-00000.jsonl ...   every open pair of the round with its `status` (best, fixed,
                                   worst, flawed) and the evaluator's `probs`; markers hold counts
    refined.jsonl                  kept pairs in candidate order: {id, lang, instruction, output,
                                   score, round, source_id, refined (the instruction was regenerated)}
    manifest.json                  settings, and per round and language: in, best, fixed, dropped
                                   (worst), flawed (open after the round); in == the sum of the rest
    round-1/generator/             with curate.retrain_generator (retrain_generator): the round's
                                   pairs, checkpoints and the tuned generator `hf`

Resume: rounds and shards are redone only when their marker is missing; sampling is seeded by
(generate.seed, round, candidate index, draw), so a redone shard is the same as the lost one.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import sys
import time
from typing import Any

from xinst_jax import paths
from xinst_jax.config import Config, ConfigError, DataInputConfig
from xinst_jax.curate.candidates import stage_dir
from xinst_jax.data.records import RecordReader
from xinst_jax.jobs import register_job
from xinst_jax.shards import (check_manifest, read_done_marker, shard_paths, shard_ranges,
                              shards_for_process, write_atomic, write_json, write_shard)

log = logging.getLogger(__name__)

STATUSES = ("best", "fixed", "worst", "flawed")  # per round; best and fixed are kept, worst dropped, flawed open
KEPT = ("best", "fixed")


def candidates_path(cfg: Config) -> Any:
    path = paths.as_path(cfg.curate.candidates) if cfg.curate.candidates else stage_dir(cfg, "candidates")
    if path.is_dir():
        path = path / "candidates.jsonl"
    if not path.is_file():
        raise ConfigError(f"curate.candidates: {path} not found (run the candidates job first, or point "
                          "curate.candidates at a candidates JSONL)")
    return path


def read_candidates(cfg: Config, path: Any) -> tuple[list[dict], str]:
    """Candidates in file order, each with its `index`, and the sha256 of the file (for the
    manifest), from one read of it; bad lines are an error naming file:line:field (the candidates
    job wrote this file, so a bad line means it was edited or truncated)."""
    out = []
    with paths.read_once([str(path)]) as [(local, sha256)]:
        reader = RecordReader(cfg.data.languages, sys.maxsize, strict=True, required=("instruction", "output"),
                              require_id=True, strict_key="refine (candidates are read strictly)",
                              shown_as={local: str(path)})
        for i, rec in enumerate(reader.read([DataInputConfig(path=local)])):
            out.append({"index": i, "id": rec["id"], "lang": rec["lang"], "instruction": rec["instruction"],
                        "output": rec["output"], "source_id": rec["meta"].get("source_id", rec["id"])})
    if not out:
        raise ConfigError(f"curate.candidates: {path} holds no candidates")
    return out, sha256


@dataclasses.dataclass
class Models:
    """The evaluator, and the generator (loaded on first need: a round without flawed pairs needs none)."""

    cfg: Config
    evaluator: Any
    generator_source: tuple[str, str]  # (checkpoint, hf_dir)
    _generator: Any = None

    def generator(self):
        if self._generator is None:
            from xinst_jax.convert.sources import load_params
            from xinst_jax.data.tokenizer import load_tokenizer
            from xinst_jax.infer.job import build_engine, check_tokenizer_fits, sampling_settings
            from xinst_jax.tasks import Task

            gen = self.cfg.generate
            checkpoint, hf_dir = self.generator_source
            model, params, _ = load_params(self.cfg.model, checkpoint=checkpoint, hf_dir=hf_dir, seed=self.cfg.seed,
                                           keys=("generate.checkpoint", "generate.hf_dir"))
            tokenizer = load_tokenizer(gen.tokenizer, key="generate.tokenizer")
            check_tokenizer_fits(tokenizer, model, "generate.tokenizer")
            self._generator = (build_engine(self.cfg, model, params), Task("revgen", tokenizer), tokenizer,
                               sampling_settings(self.cfg, model, tokenizer))
        return self._generator


def row_id(round_: int, index: int, draw: int, draws: int) -> int:
    """The sampling id of draw `draw` for candidate `index` in round `round_` (32 bits)."""
    return ((round_ * 1_000_003 + index) * draws + draw) % (1 << 32)


def fresh_instructions(models: Models, pairs: list[dict], round_: int, instruction_filter) -> list[list[str]]:
    """curate.fresh_instructions new instructions per pair, filtered (those dropped are left out)."""
    from xinst_jax.infer.job import output_text

    engine, task, tokenizer, settings = models.generator()
    n = models.cfg.curate.fresh_instructions
    prompts, ids = [], []
    for p in pairs:
        prompt = task.prompt_tokens(p)
        for j in range(n):
            prompts.append(prompt)
            ids.append(row_id(round_, p["index"], j, n))
    result = engine.generate(prompts, settings, row_ids=ids)
    out: list[list[str]] = [[] for _ in pairs]
    for r, (toks, finish) in enumerate(zip(result.tokens, result.finish_reasons)):
        text = output_text(tokenizer, toks, finish, settings, models.cfg.generate.stop_strings)[0].strip()
        if instruction_filter.check(text, pairs[r // n]["output"]) is None:
            out[r // n].append(text)
    return out


def refine_shard(models: Models, pairs: list[dict], round_: int, instruction_filter) -> list[dict]:
    """One shard of one round: each open pair with its status, score and probabilities."""
    ratings = models.evaluator.rate(pairs)
    rows = []
    for p, rating in zip(pairs, ratings):
        status = {"best": "best", "worst": "worst"}.get(rating.label, "flawed")
        rows.append(dict(p, status=status, score=rating.score, probs=rating.probs, round=round_,
                         refined=p.get("refined", False)))
    flawed = [row for row in rows if row["status"] == "flawed"]
    if models.cfg.curate.fresh_instructions > 0 and flawed:
        fresh = fresh_instructions(models, flawed, round_, instruction_filter)
        tries = [(i, text) for i, texts in enumerate(fresh) for text in texts]
        if tries:
            rated = models.evaluator.rate([dict(flawed[i], instruction=text) for i, text in tries])
            best: dict[int, tuple] = {}
            for (i, text), rating in zip(tries, rated):
                if i not in best or rating.score > best[i][1].score:
                    best[i] = (text, rating)
            for i, (text, rating) in best.items():
                row = flawed[i]
                if rating.label == "best" or rating.score > row["score"]:
                    row.update(instruction=text, score=rating.score, probs=rating.probs, refined=True)
                if rating.label == "best":
                    row["status"] = "fixed"
    for row in rows:
        row["score"] = round(float(row["score"]), 6)
        row["probs"] = {k: round(float(v), 6) for k, v in row["probs"].items()}
    return rows


def round_counts(rows: list[dict]) -> dict:
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for row in rows:
        counts[row["lang"]][row["status"]] += 1
    table = {}
    for lang in sorted(counts) + ["all"]:
        c = counts[lang] if lang != "all" else sum(counts.values(), collections.Counter())
        table[lang] = {"in": sum(c.values()), "best": c["best"], "fixed": c["fixed"], "dropped": c["worst"],
                       "flawed": c["flawed"]}
    return table


def read_round(rdir: Any, num_shards: int) -> list[dict]:
    rows = []
    for k in range(num_shards):
        rows += [json.loads(line) for line in shard_paths(rdir, k)[0].read_text(encoding="utf-8").splitlines()]
    return rows


def retrain_generator(cfg: Config, models: Models, kept: list[dict], round_: int, out: Any) -> None:
    """Fine-tune the generator on this round's kept pairs (revgen: response -> instruction) and use
    the result for the next round. Its files go to <out>/round-<r>/generator/ (local or gs://):
    pairs.jsonl, init_hf (a checkpoint generator's weights as the trainer's start), checkpoints
    (so that a preempted retraining resumes) and hf, the tuned generator. The trainer's run_dir
    (metrics, TensorBoard events, the prepared TFRecords) is that directory when local, else the
    same path under the job's own run_dir: run_dir stays on the worker."""
    from xinst_jax.finetune import run_finetune

    rel = f"round-{round_}/generator"
    rdir = paths.join(out, rel)
    hf = paths.join(rdir, "hf")
    if not paths.exists(paths.join(hf, "config.json")):
        pairs = paths.join(rdir, "pairs.jsonl")
        paths.makedirs(rdir)
        write_atomic(pairs, "".join(json.dumps({"id": r["id"], "lang": r["lang"], "instruction": r["instruction"],
                                                "output": r["output"]}, ensure_ascii=False) + "\n"
                                    for r in kept).encode("utf-8"))
        checkpoint, hf_dir = models.generator_source
        init = hf_dir
        if checkpoint:  # the trainer starts from a Hugging Face directory: export the checkpoint's weights
            from xinst_jax.checkpoint import load_params_for_export
            from xinst_jax.convert.hf import export_hf

            init = paths.join(rdir, "init_hf")
            if not paths.exists(paths.join(init, "config.json")):
                export_hf(load_params_for_export(checkpoint, cfg.model), cfg.model, init, dtype="float32")
        run_dir = paths.join(cfg.resolved_run_dir(), "refine", rel) if paths.is_remote(rdir) else rdir
        tuned = dataclasses.replace(
            cfg, job="finetune", run_dir=run_dir,
            data=dataclasses.replace(cfg.data, source="tfrecord", template="revgen", inputs=[DataInputConfig(
                path=pairs)], tokenizer=cfg.data.tokenizer or cfg.generate.tokenizer, prepared_dir=""),
            train=dataclasses.replace(cfg.train, init_from=init, export_at_end=True),
            checkpoint=dataclasses.replace(cfg.checkpoint, dir=paths.join(rdir, "checkpoints")),
            export=dataclasses.replace(cfg.export, out=hf, dtype="float32", checkpoint="", hf_source=""))
        run_finetune(tuned)
    models.generator_source = ("", hf)
    models._generator = None


def check_refine_config(cfg: Config) -> None:
    cur = cfg.curate
    if cur.rounds < 1 or cur.fresh_instructions < 0 or cur.shard_size < 1:
        raise ConfigError(f"curate: rounds >= 1, fresh_instructions >= 0 and shard_size >= 1 required (got "
                          f"{cur.rounds}, {cur.fresh_instructions}, {cur.shard_size})")
    if not (cur.evaluator_checkpoint or cur.evaluator_hf_dir):
        raise ConfigError("curate.evaluator_checkpoint: the refine job needs the trained evaluator (evaluator_xinst): "
                          "set curate.evaluator_checkpoint or curate.evaluator_hf_dir")
    if cur.fresh_instructions > 0 and not (cfg.generate.checkpoint or cfg.generate.hf_dir):
        raise ConfigError("generate.checkpoint: the refine job samples fresh instructions with the generator "
                          "(revgen_xinst): set generate.checkpoint or generate.hf_dir, or curate.fresh_instructions=0")


def run_refine(cfg: Config) -> dict:
    import jax

    from xinst_jax.curate.evaluator import load_evaluator
    from xinst_jax.curate.filters import InstructionFilter
    from xinst_jax.runtime import setup_runtime

    check_refine_config(cfg)
    cur, gen = cfg.curate, cfg.generate
    source = candidates_path(cfg)
    candidates, candidates_sha256 = read_candidates(cfg, source)
    setup_runtime(cfg.distributed)
    process, count = jax.process_index(), jax.process_count()
    out = stage_dir(cfg, "refine")
    out.mkdir(parents=True, exist_ok=True)
    settings = {
        "stage": "refine", "candidates": paths.absolute(str(source)), "candidates_sha256": candidates_sha256,
        "evaluator": [cur.evaluator_checkpoint, cur.evaluator_hf_dir], "generator": [gen.checkpoint, gen.hf_dir],
        "rounds": cur.rounds, "fresh_instructions": cur.fresh_instructions, "shard_size": cur.shard_size,
        "retrain_generator": cur.retrain_generator, "model": dataclasses.asdict(cfg.model),
        "instruction_filters": dataclasses.asdict(cur.instruction_filters),
        "generate": {k: v for k, v in dataclasses.asdict(gen).items()
                     if k not in ("input", "output", "progress", "split", "template")},
    }
    check_manifest(out, {"settings": settings}, "curate.out")
    start = time.perf_counter()
    models = Models(cfg, load_evaluator(cfg), (gen.checkpoint, gen.hf_dir))
    instruction_filter = InstructionFilter(cur.instruction_filters)

    open_pairs, kept, per_round = candidates, [], {}
    for r in range(1, cur.rounds + 1):
        rdir = out / f"round-{r}"
        rdir.mkdir(exist_ok=True)
        ranges = shard_ranges(len(open_pairs), cur.shard_size)
        for k in shards_for_process(len(ranges), process, count, gen.split):
            if read_done_marker(rdir, k) is None:
                a, b = ranges[k]
                rows = refine_shard(models, open_pairs[a:b], r, instruction_filter)
                write_shard(rdir, k, [json.dumps(row, ensure_ascii=False) for row in rows],
                            {"counts": round_counts(rows)})
        if count > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"xinst_jax.refine.round{r}")
        rows = read_round(rdir, len(ranges))
        per_round[f"round-{r}"] = round_counts(rows)
        round_kept = [row for row in rows if row["status"] in KEPT]
        kept += round_kept
        open_pairs = [{k: row[k] for k in ("index", "id", "lang", "instruction", "output", "source_id", "refined")}
                      for row in rows if row["status"] == "flawed"]
        print(f"refine: round {r}: " + ", ".join(f"{k} {v}" for k, v in per_round[f"round-{r}"]["all"].items()),
              flush=True)
        if not open_pairs:
            break
        if cur.retrain_generator and r < cur.rounds and round_kept:
            if process == 0:
                retrain_generator(cfg, models, round_kept, r, out)
            if count > 1:
                multihost_utils.sync_global_devices(f"xinst_jax.refine.retrain{r}")
            models.generator_source = ("", paths.join(out, f"round-{r}", "generator", "hf"))
            models._generator = None

    kept.sort(key=lambda row: row["index"])
    report = {"output": str(out / "refined.jsonl"), "candidates": len(candidates), "kept": len(kept),
              "dropped_open": len(open_pairs), "rounds": per_round, "seconds": round(time.perf_counter() - start, 3)}
    if process == 0:
        lines = [json.dumps({"id": row["id"], "lang": row["lang"], "instruction": row["instruction"],
                             "output": row["output"], "score": row["score"], "round": row["round"],
                             "source_id": row["source_id"], "refined": row["refined"]}, ensure_ascii=False)
                 for row in kept]
        write_atomic(out / "refined.jsonl", "".join(line + "\n" for line in lines).encode("utf-8"))
        write_json(out / "manifest.json", {"settings": settings, **report})
        for name, table in per_round.items():
            print(f"refine: {name} per language:", flush=True)
            for lang, row in table.items():
                print(f"  {lang}: " + ", ".join(f"{k} {v}" for k, v in row.items()), flush=True)
        print(f"refine: {out / 'refined.jsonl'}: {len(kept)} of {len(candidates)} candidates kept "
              f"({len(open_pairs)} still flawed after {len(per_round)} round(s) dropped)", flush=True)
    return report


@register_job("refine")
def refine_job(cfg: Config) -> None:
    run_refine(cfg)
