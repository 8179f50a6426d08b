"""The evaluator: labels (English instruction, target-language response) pairs best / flawed /
worst by the log-likelihood of the three label completions -- no free text is generated or
parsed (a free-text judge's "Score: 5" went unparseable for most outputs in one public
re-implementation of instruction backtranslation).

    evaluator = load_evaluator(cfg)          # curate.evaluator_checkpoint or curate.evaluator_hf_dir
    ratings = evaluator.rate([{"instruction": ..., "output": ..., "lang": "sw"}, ...])
    ratings[0].label, ratings[0].probs, ratings[0].score   # "best", {"best": .8, ...}, .8

For each record the `evaluator` Task's prompt (xinst_jax/tasks.py, the template the evaluator was
trained with: configs/evaluator_xinst.yaml) is tokenised once; each label is scored as exactly the
target tokens `Task("evaluator").encode` writes for a record with that label (the label as a
continuation, then EOS): the quantity its training loss minimised. The three sums of token
log-probabilities are normalised by a softmax over the labels: `probs`; `label` is the most
probable (ties: the first of EVALUATOR_LABELS), `score` = probs["best"] (what refine ranks by).
Prompts longer than the largest score bucket lose their beginning (`truncated`), as generation's
do; the instruction then is partly or wholly cut, so size `generate.prompt_buckets` to the data.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from xinst_jax.config import Config, ConfigError
from xinst_jax.data.records import DataError
from xinst_jax.data.templates import EVALUATOR_LABELS
from xinst_jax.tasks import Task

log = logging.getLogger(__name__)

RATE_CHUNK = 4096  # records tokenised and scored per engine.score call (bounds host memory)
PROMPT_FIELDS = ("instruction", "output", "lang")


@dataclass
class Rating:
    label: str  # the most probable of EVALUATOR_LABELS
    probs: dict[str, float]  # softmax over the labels' summed log-probabilities
    score: float  # probs["best"]
    truncated: bool = False  # the prompt lost its beginning to fit the largest score bucket
    logprobs: dict[str, float] = field(default_factory=dict)  # each label's summed log-probability


def label_targets(task: Task, labels: Sequence[str] = EVALUATOR_LABELS) -> dict[str, list[int]]:
    """The target tokens (completion + EOS) `task.encode` writes for a record of each label. They do
    not depend on the record (the completion is encoded as a continuation), so they are built once."""
    probe = {"instruction": "x", "output": "x", "lang": "en"}
    targets = {label: list(task.encode(dict(probe, label=label)).target) for label in labels}
    if len({tuple(t) for t in targets.values()}) != len(targets):
        raise ConfigError(f"evaluator: the tokenizer {task.tokenizer.path or task.tokenizer.kind!r} gives two labels "
                          "the same tokens")
    return targets


def softmax_labels(logprobs: np.ndarray) -> np.ndarray:
    """[N, labels] summed log-probabilities -> probabilities over the labels (float64)."""
    z = np.asarray(logprobs, np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


class Evaluator:
    """Rates records {instruction, output, lang} with `engine` (an infer.generate.Engine holding
    the evaluator's weights) and the tokenizer it was trained with (module docstring)."""

    def __init__(self, engine: Any, tokenizer: Any, source: str = ""):
        self.engine = engine
        self.tokenizer = tokenizer
        self.task = Task("evaluator", tokenizer)
        self.labels = tuple(EVALUATOR_LABELS)
        self.targets = label_targets(self.task, self.labels)
        self.source = source  # where the weights came from (load_evaluator)

    def prompt_tokens(self, record: dict) -> list[int]:
        for f in PROMPT_FIELDS:
            value = record.get(f)
            if not isinstance(value, str) or not value.strip():
                raise DataError(f"evaluator: record {record.get('id', '?')!r}: {f} is missing or empty "
                                "(the evaluator rates {instruction, output, lang})")
        return self.task.prompt_tokens(record)

    def logprobs(self, records: Sequence[dict]) -> tuple[np.ndarray, np.ndarray]:
        """[N, labels] summed log-probability of each label's target, and [N] truncated flags."""
        n, k = len(records), len(self.labels)
        out = np.zeros((n, k), np.float64)
        truncated = np.zeros((n,), bool)
        for start in range(0, n, RATE_CHUNK):
            chunk = records[start:start + RATE_CHUNK]
            prompts = [self.prompt_tokens(r) for r in chunk]
            rows_p = [p for p in prompts for _ in self.labels]
            rows_c = [self.targets[label] for _ in prompts for label in self.labels]
            scored = self.engine.score(rows_p, rows_c)
            out[start:start + len(chunk)] = np.asarray(scored.sum_logprob, np.float64).reshape(len(chunk), k)
            truncated[start:start + len(chunk)] = np.asarray(scored.truncated, bool).reshape(len(chunk), k).any(1)
        return out, truncated

    def rate(self, records: Sequence[dict]) -> list[Rating]:
        if not records:
            return []
        logprobs, truncated = self.logprobs(records)
        probs = softmax_labels(logprobs)
        ratings = []
        for row, lp, trunc in zip(probs, logprobs, truncated):
            p = {label: float(v) for label, v in zip(self.labels, row)}
            ratings.append(Rating(label=self.labels[int(np.argmax(row))], probs=p, score=p["best"],
                                  truncated=bool(trunc), logprobs={lb: float(v) for lb, v in zip(self.labels, lp)}))
        return ratings


def load_evaluator(cfg: Config) -> Evaluator:
    """The evaluator of `curate.evaluator_checkpoint` (a trainer checkpoint: step dir or checkpoints
    root) or else `curate.evaluator_hf_dir` (its Hugging Face export), `model.*` its architecture,
    tokenised by `generate.tokenizer`, on an engine with generate.batch_size / prompt_buckets /
    weight_dtype / kv_dtype over a mesh of this process's devices (as the generate job)."""
    cur, gen = cfg.curate, cfg.generate
    if not (cur.evaluator_checkpoint or cur.evaluator_hf_dir):
        raise ConfigError("curate.evaluator_checkpoint: neither it nor curate.evaluator_hf_dir is set; the evaluator "
                          "is a trained model (configs/evaluator_xinst.yaml)")
    if gen.batch_size < 1:
        raise ConfigError(f"generate.batch_size: must be >= 1, got {gen.batch_size}")
    if not gen.prompt_buckets or any(b < 2 for b in gen.prompt_buckets):
        raise ConfigError(f"generate.prompt_buckets: expected lengths >= 2, got {gen.prompt_buckets}")
    import jax

    from xinst_jax.convert.sources import load_params
    from xinst_jax.data.tokenizer import load_tokenizer
    from xinst_jax.infer.generate import Engine
    from xinst_jax.sharding import make_mesh, parse_rules

    tokenizer = load_tokenizer(gen.tokenizer, key="generate.tokenizer")
    model, params, source = load_params(cfg.model, checkpoint=cur.evaluator_checkpoint, hf_dir=cur.evaluator_hf_dir,
                                        seed=cfg.seed, keys=("curate.evaluator_checkpoint", "curate.evaluator_hf_dir"))
    if getattr(tokenizer, "vocab_size", 0) > model.vocab_size:
        raise ConfigError(f"generate.tokenizer: {gen.tokenizer} has {tokenizer.vocab_size} tokens but the evaluator's "
                          f"vocabulary ({source}) is {model.vocab_size}")
    mesh = make_mesh(cfg.mesh, jax.local_devices())
    try:
        engine = Engine(params, model, mesh=mesh, rules=parse_rules(cfg.mesh.rules), batch_size=gen.batch_size,
                        buckets=gen.prompt_buckets, kv_dtype=gen.kv_dtype or None,
                        weight_dtype=gen.weight_dtype or None)
    except ValueError as e:
        raise ConfigError(f"evaluator: {e}") from None
    return Evaluator(engine, tokenizer, source=source)
