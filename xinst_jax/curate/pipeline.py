"""Job `pipeline`: the whole X-Instruction method in one command, resumable by stage.

    python launch/tpu_run.py --config xinst_pipeline --set pipeline.base_model=/path/llama3-8b-hf \\
        --set pipeline.tokenizer=/path/llama3-8b-hf --set 'pipeline.seed_pairs=[{path: seed/*.jsonl}]' \\
        --set 'pipeline.corpus=[{path: corpus/*.parquet}]'

Stages, in order, each a job of the entry point run with its own config (`pipeline.stages.<name>
.config`, default below) and the paths between stages filled in:

  tokenizer   train_tokenizer on seed pairs + corpus       only when pipeline.tokenizer is empty
  revgen      finetune, revgen_xinst: the reverse instruction generator, exported to revgen/hf
  candidates  candidates_xinst: filter the corpus, sample instructions   -> candidates/candidates.jsonl
  ratings     ratings (evaluator_xinst): best / flawed / worst from the seed pairs -> ratings/ratings.jsonl
  evaluator   finetune, evaluator_xinst: the evaluator, exported to evaluator/hf
  refine      refine_xinst: label, regenerate the flawed, keep the best -> refine/refined.jsonl
  diversify   diversify_xinst: cluster and draw evenly              -> diversify/<lang>.jsonl
  sft         finetune, sft_xinst: the final model on the diversified data, exported to sft/hf

A stage's config is its config file, then `pipeline.set` (every stage), then the wiring (paths,
languages, tokenizer, base model), then `pipeline.stages.<name>.set`. A finished stage leaves
`stages/<name>.done` holding its resolved config and the fingerprints of the stage outputs it
read. A rerun skips a stage whose marker matches; resumes an unfinished one through the stage's
own resume (checkpoints, done shards); and refuses, in one line naming the stage and the key, a
finished stage whose config or inputs changed, unless `pipeline.from_stage` names that stage or
an earlier one: then that stage and every later one are moved aside (into `replaced/`) and rerun.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from xinst_jax import paths
from xinst_jax.config import (PIPELINE_STAGES, Config, ConfigError, DataInputConfig, load_config, save_resolved,
                              to_dict)
from xinst_jax.jobs import get_job, register_job
from xinst_jax.shards import write_json

log = logging.getLogger(__name__)

DEFAULT_CONFIGS = {"tokenizer": "revgen_xinst", "revgen": "revgen_xinst", "candidates": "candidates_xinst",
                   "ratings": "evaluator_xinst", "evaluator": "evaluator_xinst", "refine": "refine_xinst",
                   "diversify": "diversify_xinst", "sft": "sft_xinst"}
# what each stage reads from earlier ones (their fingerprints are part of its done-marker)
UPSTREAM = {"tokenizer": (), "revgen": ("tokenizer",), "candidates": ("revgen",), "ratings": (),
            "evaluator": ("tokenizer", "ratings"), "refine": ("candidates", "evaluator", "revgen"),
            "diversify": ("refine",), "sft": ("tokenizer", "diversify")}


def inputs_value(inputs: list[DataInputConfig]) -> list[dict]:
    return [{k: v for k, v in dataclasses.asdict(i).items() if v not in ("", {}, "train")} for i in inputs]


class Pipeline:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.p = cfg.pipeline
        self.root = Path(self.p.dir or cfg.resolved_run_dir())
        unknown = sorted(set(self.p.stages) - set(PIPELINE_STAGES))
        if unknown:
            raise ConfigError(f"pipeline.stages: unknown stage(s) {', '.join(unknown)} (stages: "
                              f"{', '.join(PIPELINE_STAGES)})")
        if self.p.from_stage and self.p.from_stage not in PIPELINE_STAGES:
            raise ConfigError(f"pipeline.from_stage: unknown stage '{self.p.from_stage}' (stages: "
                              f"{', '.join(PIPELINE_STAGES)})")
        if self.p.base_model and not self.p.tokenizer:
            raise ConfigError("pipeline.tokenizer: required with pipeline.base_model (the base model's tokenizer; "
                              "its vocabulary fixes the model's)")
        self.stages = [s for s in PIPELINE_STAGES if s != "tokenizer" or not self.p.tokenizer]
        self.tokenizer = self.p.tokenizer or str(self.root / "tokenizer")

    # ----------------------------------------------------------------- stage configs

    def dirs(self, stage: str) -> list[Path]:
        """What a stage writes (moved aside when it reruns)."""
        logs = self.root / "logs" / stage
        return {"tokenizer": [self.root / "tokenizer", logs], "revgen": [self.root / "revgen"],
                "candidates": [self.root / "candidates", logs], "ratings": [self.root / "ratings", logs],
                "evaluator": [self.root / "evaluator"], "refine": [self.root / "refine", logs],
                "diversify": [self.root / "diversify", logs], "sft": [self.root / "sft"]}[stage]

    def wiring(self, stage: str) -> dict[str, Any]:
        r, p = self.root, self.p
        langs = list(self.cfg.data.languages)
        common = {"seed": self.cfg.seed, "data.languages": langs, "distributed": to_dict(self.cfg.distributed)}
        trained = {"data.tokenizer": self.tokenizer, "train.init_from": p.base_model, "train.export_at_end": True,
                   "job": "finetune"}
        engine = {"generate.tokenizer": self.tokenizer, "generate.hf_dir": str(r / "revgen" / "hf"),
                  "curate.out": str(r)}
        return {
            "tokenizer": {**common, "job": "train_tokenizer", "run_dir": str(r / "logs" / "tokenizer"),
                          "data.tokenizer": self.tokenizer,
                          "data.inputs": inputs_value(p.seed_pairs) + inputs_value(p.corpus)},
            "revgen": {**common, **trained, "run_dir": str(r / "revgen"), "data.inputs": inputs_value(p.seed_pairs)},
            "candidates": {**common, **engine, "job": "candidates", "run_dir": str(r / "logs" / "candidates"),
                           "curate.corpus": inputs_value(p.corpus)},
            "ratings": {**common, "job": "ratings", "run_dir": str(r / "logs" / "ratings"), "curate.out": str(r),
                        "curate.seed_pairs": inputs_value(p.seed_pairs)},
            "evaluator": {**common, **trained, "run_dir": str(r / "evaluator"),
                          "data.inputs": [{"path": str(r / "ratings" / "ratings.jsonl")}]},
            "refine": {**common, **engine, "job": "refine", "run_dir": str(r / "logs" / "refine"),
                       "curate.candidates": str(r / "candidates" / "candidates.jsonl"),
                       "curate.evaluator_hf_dir": str(r / "evaluator" / "hf"), "curate.evaluator_checkpoint": ""},
            "diversify": {**common, "job": "diversify", "run_dir": str(r / "logs" / "diversify"), "curate.out": str(r),
                          "curate.diversify.input": str(r / "refine" / "refined.jsonl")},
            "sft": {**common, **trained, "run_dir": str(r / "sft"),
                    # the directory, not a file per language: a language whose pairs were all
                    # dropped has no file, and the records carry their own `lang`
                    "data.inputs": [{"path": str(r / "diversify")}]},
        }[stage]

    def stage_config(self, stage: str) -> Config:
        spec = self.p.stages.get(stage)
        name = (spec.config if spec and spec.config else DEFAULT_CONFIGS[stage])
        overrides = dict(self.p.set)
        overrides.update(self.wiring(stage))
        overrides.update(spec.set if spec else {})
        if stage != "tokenizer" and not self.p.base_model:  # from scratch: the model's vocabulary is the tokenizer's
            overrides.update(self.vocabulary_overrides())
        items = [f"{k}={json.dumps(v)}" for k, v in overrides.items()]
        try:
            return load_config(name, items)
        except ConfigError as e:
            raise ConfigError(f"pipeline: stage '{stage}' (config {name}): {e}") from None

    def vocabulary_overrides(self) -> dict[str, Any]:
        from xinst_jax.data.tokenizer import load_tokenizer

        if not paths.exists(self.tokenizer):
            return {}  # not trained yet: filled when the stage runs (after the tokenizer stage)
        tok = load_tokenizer(self.tokenizer, key="pipeline.tokenizer")
        return {"model.vocab_size": tok.vocab_size, "model.bos_token_id": tok.bos_id, "model.eos_token_id": tok.eos_id}

    # ----------------------------------------------------------------- done-markers

    def marker(self, stage: str) -> Path:
        return self.root / "stages" / f"{stage}.done"

    def fingerprint(self, stage: str) -> str:
        """The content hash of a finished stage (its marker), what later stages record."""
        path = self.marker(stage)
        return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else ""

    def expected_marker(self, stage: str, cfg: Config) -> dict:
        config = json.loads(json.dumps(to_dict(cfg)))
        config.pop("distributed")  # which process wrote the marker is not the stage's result
        return {"stage": stage, "config": config,
                "upstream": {u: self.fingerprint(u) for u in UPSTREAM[stage] if u in self.stages},
                "outputs": {}}

    def outputs(self, stage: str) -> dict[str, str]:
        """sha256 of the files a stage leaves for the next ones."""
        r = self.root
        files = {"tokenizer": [r / "tokenizer" / "tokenizer.model"],
                 "revgen": sorted((r / "revgen" / "hf").glob("*")),
                 "candidates": [r / "candidates" / "candidates.jsonl"],
                 "ratings": [r / "ratings" / "ratings.jsonl"],
                 "evaluator": sorted((r / "evaluator" / "hf").glob("*")),
                 "refine": [r / "refine" / "refined.jsonl"],
                 "diversify": sorted((r / "diversify").glob("*.jsonl")),
                 "sft": sorted((r / "sft" / "hf").glob("*"))}[stage]
        from xinst_jax.shards import file_sha256

        missing = [f for f in files if not f.is_file()]
        if missing or not files:
            raise ConfigError(f"pipeline: stage '{stage}' finished without its output "
                              f"{missing[0] if missing else self.dirs(stage)[0]}")
        return {str(f.relative_to(r)): file_sha256(f) for f in files}

    def changed_key(self, stage: str, saved: dict, expected: dict) -> str:
        if saved.get("upstream") != expected["upstream"]:
            changed = [u for u in expected["upstream"] if saved.get("upstream", {}).get(u) != expected["upstream"][u]]
            return f"the output of stage '{changed[0] if changed else '?'}' it read"
        old, new = _flatten(saved.get("config", {})), _flatten(expected["config"])
        keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        key = keys[0] if keys else "?"
        return f"{key}={json.dumps(old.get(key))} (now {json.dumps(new.get(key))})"

    # ----------------------------------------------------------------- running

    def check_seed_pairs(self) -> dict[str, int]:
        from xinst_jax.data.records import RecordReader

        if not self.p.seed_pairs:
            raise ConfigError("pipeline.seed_pairs: none given; the generator and the evaluator learn from seed pairs "
                              "{id, lang, instruction (English), output (target language)}")
        if not self.p.corpus:
            raise ConfigError("pipeline.corpus: none given; candidates come from web text {id, lang, text}")
        reader = RecordReader(self.cfg.data.languages, self.cfg.data.max_chars, self.cfg.data.strict)
        counts: dict[str, int] = {lang: 0 for lang in self.cfg.data.languages}
        for rec in reader.read(self.p.seed_pairs):
            counts[rec["lang"]] += 1
        missing = [lang for lang, n in counts.items() if n == 0]
        print("pipeline: seed pairs per language: " + ", ".join(f"{k} {v}" for k, v in counts.items()), flush=True)
        if missing:
            raise ConfigError(f"pipeline.seed_pairs: no seed pairs for {', '.join(missing)}; every language the run "
                              "covers (data.languages) needs some, or drop it from data.languages")
        return counts

    def move_aside(self, stage: str) -> None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for path in self.dirs(stage) + [self.marker(stage)]:
            if path.exists():
                target = self.root / "replaced" / stamp / path.relative_to(self.root)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(str(path), str(target))
                print(f"pipeline: moved {path} aside to {target}", flush=True)

    def run(self) -> dict:
        import jax

        from xinst_jax.runtime import setup_runtime

        self.check_seed_pairs()
        setup_runtime(self.cfg.distributed)
        process = jax.process_index()
        rerun_from = self.stages.index(self.p.from_stage) if self.p.from_stage in self.stages else None
        timings: dict[str, float] = {}
        for i, stage in enumerate(self.stages):
            cfg = self.stage_config(stage)
            expected = self.expected_marker(stage, cfg)
            marker = self.marker(stage)
            if marker.exists():
                saved = json.loads(marker.read_text())
                if {k: saved.get(k) for k in ("config", "upstream")} == {k: expected[k] for k in ("config", "upstream")}:
                    print(f"pipeline: stage {stage}: done (skipped)", flush=True)
                    continue
                if rerun_from is None or i < rerun_from:
                    raise ConfigError(f"pipeline: stage '{stage}' finished with {self.changed_key(stage, saved, expected)}"
                                      f"; to rerun from it: --set pipeline.from_stage={stage}")
                if process == 0:
                    self.move_aside(stage)
                self.sync(f"aside-{stage}")
            print(f"pipeline: stage {stage} ({cfg.name}, job {cfg.job}) ...", flush=True)
            start = time.perf_counter()
            save_resolved(cfg)
            get_job(cfg.job, source=f"pipeline stage {stage}")(cfg)
            self.sync(f"done-{stage}")
            timings[stage] = round(time.perf_counter() - start, 1)
            if process == 0:
                expected["outputs"] = self.outputs(stage)
                expected["seconds"] = timings[stage]
                marker.parent.mkdir(parents=True, exist_ok=True)
                write_json(marker, expected)
            self.sync(f"marker-{stage}")
            print(f"pipeline: stage {stage}: done in {timings[stage]} s", flush=True)
        final = self.root / "sft" / "hf"
        print(f"pipeline: finished; the final model is {final}", flush=True)
        return {"stages": self.stages, "seconds": timings, "final_model": str(final)}

    @staticmethod
    def sync(name: str) -> None:
        import jax

        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"xinst_jax.pipeline.{name}")


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix.rstrip("."): d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}."))
    return out


def run_pipeline(cfg: Config) -> dict:
    return Pipeline(cfg).run()


@register_job("pipeline")
def pipeline_job(cfg: Config) -> None:
    run_pipeline(cfg)

