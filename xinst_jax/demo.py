"""The CPU demo job: train_tokenizer -> prepare -> train -> export, on real cross-lingual text.

With no `data.inputs` configured the demo writes English-instruction / native-answer pairs for
all ten languages from the Unicode CLDR data that ships inside `babel` (no download). Each stage
is the same code the real jobs run; the demo only derives the paths between them and the model's
vocabulary from the tokenizer it trained.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path

from xinst_jax.config import LANGUAGES, Config, DataInputConfig, save_resolved
from xinst_jax.jobs import register_job

log = logging.getLogger(__name__)


def resolve_demo_config(cfg: Config) -> Config:
    """Fill the paths between the stages: pairs file, tokenizer dir, prepared shards, export."""
    run_dir = cfg.resolved_run_dir()
    data = cfg.data
    inputs = data.inputs
    if not inputs:
        pairs = run_dir / "data" / "cldr_pairs.jsonl"
        if not pairs.exists():
            from xinst_jax.data.demo_data import write_demo_pairs

            langs = [lang for lang in data.languages if lang in LANGUAGES]
            counts = write_demo_pairs(pairs, langs, seed=cfg.seed)
            print(f"demo data: {sum(counts.values())} CLDR pairs in {len(counts)} languages -> {pairs}", flush=True)
        inputs = [DataInputConfig(path=str(pairs))]
    data = dataclasses.replace(data, inputs=inputs, source="tfrecord",
                               tokenizer=data.tokenizer or str(run_dir / "tokenizer"),
                               prepared_dir=data.prepared_dir or str(run_dir / "data" / "prepared"))
    return dataclasses.replace(cfg, data=data)


@register_job("demo")
def demo_job(cfg: Config) -> None:
    from xinst_jax.data.tokenizer import load_tokenizer
    from xinst_jax.data.train_tokenizer import run_train_tokenizer
    from xinst_jax.finetune import run_finetune

    start = time.time()
    cfg = resolve_demo_config(cfg)
    if not os.path.exists(os.path.join(cfg.data.tokenizer, "tokenizer.model")):
        run_train_tokenizer(cfg)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    model = dataclasses.replace(cfg.model, vocab_size=tokenizer.vocab_size, bos_token_id=tokenizer.bos_id,
                                eos_token_id=tokenizer.eos_id)
    cfg = dataclasses.replace(cfg, model=model)
    save_resolved(cfg)  # the run directory's config.yaml now holds the derived paths and vocabulary
    run_finetune(cfg)  # the trainer prints the loss summary
    print(f"demo finished in {time.time() - start:.0f}s; Hugging Face export in "
          f"{Path(cfg.export.out or cfg.resolved_run_dir() / 'hf')}", flush=True)
