"""Job registry: the config's `job` key names one of these; `launch/tpu_run.py` runs it."""

from __future__ import annotations

import functools
import importlib
import logging
from typing import Callable

from xinst_jax.config import Config, ConfigError

JobFn = Callable[[Config], None]

# job name -> (module that registers it, one-line description). Modules import lazily so that
# `--help` and config errors answer before jax/tensorflow load.
JOB_MODULES: dict[str, tuple[str, str]] = {
    "demo": ("xinst_jax.demo", "CPU demo: CLDR pairs in ten languages -> tokenizer -> prepare -> train -> HF export"),
    "finetune": ("xinst_jax.finetune", "prepare data.inputs (resumable) then train and export: sft_xinst, revgen_xinst"),
    "train": ("xinst_jax.train.loop", "train a model (revgen or sft), sharded over the mesh, auto-resuming"),
    "export_hf": ("xinst_jax.convert.export_job", "write params as a Hugging Face Llama directory"),
    "generate": ("xinst_jax.infer.job", "generate completions for a JSONL of prompts: sharded, resumable"),
    "train_tokenizer": ("xinst_jax.data.train_tokenizer",
                        "train a SentencePiece BPE (byte fallback) on data.inputs; HF files beside it"),
    "prepare": ("xinst_jax.data.prepare", "tokenise data.inputs with a template into TFRecord shards + manifest"),
    "candidates": ("xinst_jax.curate.candidates",
                   "filter curate.corpus, then sample English instructions for every kept document: resumable"),
    "ratings": ("xinst_jax.curate.ratings", "three-level rating set (best / flawed / worst) from curate.seed_pairs"),
    "refine": ("xinst_jax.curate.refine", "evaluator labels candidates; flawed get fresh instructions; keep best"),
    "diversify": ("xinst_jax.curate.diversify", "embed instructions, k-means per language, draw evenly across clusters"),
    "pipeline": ("xinst_jax.curate.pipeline", "seed pairs + corpus -> generator -> candidates -> evaluator -> refine -> "
                 "diversify -> final model, resumable by stage"),
    "serve": ("xinst_jax.serve.server", "OpenAI-compatible HTTP server over the engine (completions, chat, streaming)"),
    "eval_xinst": ("xinst_jax.eval.job", "answers in every language -> fidelity, judge win rates, XCOPA, perplexity "
                   "-> report.md"),
    "pipeline_demo": ("xinst_jax.curate.pipeline_demo", "the pipeline on CPU on real text in ten languages, with "
                      "ground-truth figures against baselines (report.md)"),
}

_REGISTRY: dict[str, JobFn] = {}


def register_job(name: str, log_level: int = logging.WARNING) -> Callable[[JobFn], JobFn]:
    """Register `fn` as job `name`; the launcher configures logging at `log_level` before it runs
    (jobs that report progress through the log, such as prepare, ask for INFO)."""

    def wrap(fn: JobFn) -> JobFn:
        @functools.wraps(fn)
        def run_logged(cfg: Config) -> None:
            logging.basicConfig(level=log_level, format="%(levelname)s %(name)s: %(message)s")
            fn(cfg)

        _REGISTRY[name] = run_logged
        return fn

    return wrap


def get_job(name: str, source: str = "config") -> JobFn:
    if name not in JOB_MODULES:
        raise ConfigError(f"{source}: job: unknown job '{name}' (known: {', '.join(sorted(JOB_MODULES))})")
    importlib.import_module(JOB_MODULES[name][0])
    return _REGISTRY[name]
