"""The `finetune` job: prepare (when inputs are given; held-out inputs too) -> train -> export, as
one command.

This is what `sft_xinst` (the final cross-lingual model) and `revgen_xinst` (the reverse
instruction generator) run; the template in `data.template` decides what is trained. Prepare is
resumable and idempotent, so rerunning the same command after a preemption skips finished
shards and resumes training from the latest checkpoint.
"""

from __future__ import annotations

import logging
from pathlib import Path

from xinst_jax import paths
from xinst_jax.config import Config, ConfigError
from xinst_jax.jobs import register_job

log = logging.getLogger(__name__)


def require(cfg: Config, key: str, hint: str) -> None:
    value: object = cfg
    for part in key.split("."):
        value = getattr(value, part)
    if value in ("", None, [], {}):
        raise ConfigError(f"{cfg.name or 'config'}: {key} is required ({hint}); set it in the config or with "
                          f"--set {key}=...")


def check_finetune_config(cfg: Config) -> None:
    if cfg.data.source != "tfrecord":
        raise ConfigError(f"{cfg.name}: data.source must be 'tfrecord' for a finetune job")
    require(cfg, "data.tokenizer", "the tokenizer of the base model: tokenizer.json, tokenizer.model or their dir")
    # prepared shards on a bucket are read (and their manifest checked) by the trainer
    if not cfg.data.inputs and not paths.is_remote(cfg.data.prepared_dir):
        prepared = Path(cfg.data.prepared_dir or cfg.resolved_run_dir() / "data")
        if not (prepared / "manifest.json").exists():
            raise ConfigError(f"{cfg.name}: data.inputs is required (X-Instruction JSONL: instruction, output, lang) "
                              f"unless data.prepared_dir already holds prepared shards ({prepared} has no "
                              "manifest.json)")
    if cfg.train.init_from:
        try:
            paths.check_dir("train.init_from", cfg.train.init_from)
        except ConfigError as e:
            raise ConfigError(f"{cfg.name}: {e}") from None


def run_finetune(cfg: Config):
    from xinst_jax.train.loop import run_training

    check_finetune_config(cfg)
    from xinst_jax.data.prepare import run_prepare  # TensorFlow: only once a job prepares

    for what, data_cfg in (("prepare", cfg), ("prepare held-out", cfg.held_out())):
        if data_cfg.data.inputs:
            prepared = run_prepare(data_cfg)
            langs = prepared.manifest.get("languages", {})
            print(f"{what}: {sum(v.get('examples', 0) for v in langs.values())} examples in {len(langs)} languages "
                  f"-> {prepared.directory} ({len(prepared.written)} shards written, {len(prepared.reused)} reused)",
                  flush=True)
    return run_training(cfg)


@register_job("finetune")
def finetune_job(cfg: Config) -> None:
    run_finetune(cfg)  # the trainer prints the loss summary
