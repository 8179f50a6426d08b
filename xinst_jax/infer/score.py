"""Log-likelihood of continuations given prompts: per row sum and mean over the continuation
tokens, plus whether greedy decoding would have produced the continuation (lm-eval's
`is_greedy`), batched and bucketed like generation.

Each row is `prompt + continuation`, right-padded (segment 0) to a bucket length; one full
forward gives log p(token t+1 | tokens <= t) for every position, of which the continuation's are
summed. Prompts longer than fits lose their beginning (the continuation is always kept whole).

The [rows, positions, vocab] logits are never held whole: the positions go through the lm_head
in chunks of `chunk` (a 128k vocabulary at 8 x 2048 positions would be 8.6 GB of float32 logits),
each chunk reduced to log p of its targets and its argmax before the next.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from xinst_jax.infer.buckets import pick_bucket

if TYPE_CHECKING:
    from xinst_jax.infer.generate import Engine
    from xinst_jax.model.llama import LlamaForCausalLM
    from xinst_jax.tasks import Task


@dataclasses.dataclass
class ScoreOutput:
    sum_logprob: np.ndarray  # [N] float64: sum over continuation tokens of log p
    mean_logprob: np.ndarray  # [N]: sum / num_tokens
    num_tokens: np.ndarray  # [N] int: continuation tokens scored
    is_greedy: np.ndarray  # [N] bool: every continuation token was the argmax
    token_logprobs: list[np.ndarray]  # per row, log p of each continuation token
    truncated: np.ndarray  # [N] bool: the prompt lost its beginning to fit the largest bucket
    top_tokens: list[np.ndarray] = dataclasses.field(default_factory=list)  # per row, the argmax token at each continuation position
    top_logprobs: list[np.ndarray] = dataclasses.field(default_factory=list)  # ... and its log p


def chunk_positions(batch: int, vocab: int, logits_bytes: int) -> int:
    """Positions per lm_head chunk so that one chunk's float32 logits fit in `logits_bytes`."""
    return max(1, logits_bytes // (batch * vocab * 4))


def score_rows(model: "LlamaForCausalLM", tokens, segments, target_mask, chunk: int):
    """tokens/segments/target_mask [B, T]; target_mask[b, t] marks tokens t that are scored
    (given tokens < t). Returns per-token log p [B, T] (0 where unscored), greedy hits [B, T], and
    the argmax token at each position with its log p ([B, T]; position t: the most likely token t
    given tokens < t; position 0: 0).
    `chunk`: positions per lm_head chunk (see the module docstring)."""
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    h, _ = model.hidden(tokens, positions, segments)
    h = h[:, :-1]  # predicts tokens[:, 1:]
    targets = tokens[:, 1:]
    chunk = max(1, min(chunk, t - 1))
    n = -(-(t - 1) // chunk)
    pad = n * chunk - (t - 1)

    def per_chunk(args):
        h_c, tgt_c = args  # [B, chunk, E], [B, chunk]
        lg = model.logits(h_c)
        norm = jax.nn.logsumexp(lg, axis=-1)
        picked = jnp.take_along_axis(lg, tgt_c[..., None], axis=-1)[..., 0]
        top = jnp.argmax(lg, axis=-1)
        return picked - norm, top == tgt_c, top.astype(jnp.int32), jnp.max(lg, axis=-1) - norm

    def to_chunks(x):  # [B, T-1, ...] -> [n, B, chunk, ...]
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape((b, n, chunk) + x.shape[2:]), 1, 0)

    outs = jax.lax.map(per_chunk, (to_chunks(h), to_chunks(targets)))
    logp, greedy, top, top_logp = (jnp.moveaxis(x, 0, 1).reshape(b, n * chunk)[:, :t - 1] for x in outs)
    mask = target_mask[:, 1:]

    def shifted(x, first):  # position t holds the prediction of token t
        return jnp.concatenate([jnp.full((b, 1), first, x.dtype), x], axis=1)

    return (shifted(jnp.where(mask, logp, 0.0), 0), shifted(greedy | ~mask, True), shifted(top, 0),
            shifted(top_logp, 0))


def score_batches(engine: "Engine", prompts: Sequence[Sequence[int]],
                  continuations: Sequence[Sequence[int]]) -> ScoreOutput:
    n = len(prompts)
    if len(continuations) != n:
        raise ValueError(f"{len(continuations)} continuations for {n} prompts")
    max_len = engine.score_buckets[-1]
    rows = []
    truncated = np.zeros((n,), bool)
    for i, (p, c) in enumerate(zip(prompts, continuations)):
        p, c = list(p), list(c)
        if not p:
            raise ValueError(f"prompt {i} is empty: the first continuation token needs context (add a BOS token)")
        if not c:
            raise ValueError(f"continuation {i} is empty")
        if len(c) + 1 > max_len:
            raise ValueError(f"continuation {i} has {len(c)} tokens; the largest score bucket is {max_len}")
        keep = max_len - len(c)
        truncated[i] = len(p) > keep
        rows.append((p[-keep:], c))
    order = sorted(range(n), key=lambda i: len(rows[i][0]) + len(rows[i][1]))
    token_logprobs: list[np.ndarray] = [np.zeros(0)] * n
    top_tokens: list[np.ndarray] = [np.zeros(0, np.int32)] * n
    top_logprobs: list[np.ndarray] = [np.zeros(0)] * n
    is_greedy = np.zeros((n,), bool)
    bsz = engine.batch_size
    for start in range(0, n, bsz):
        idx = order[start:start + bsz]
        t = pick_bucket(max(len(rows[i][0]) + len(rows[i][1]) for i in idx), engine.score_buckets)
        tokens = np.zeros((bsz, t), np.int32)
        segments = np.zeros((bsz, t), np.int32)
        target = np.zeros((bsz, t), bool)
        for r, i in enumerate(idx):
            p, c = rows[i]
            seq = p + c
            tokens[r, :len(seq)] = seq
            segments[r, :len(seq)] = 1
            target[r, len(p):len(seq)] = True
        out = engine._score(engine.params, engine._put(tokens), engine._put(segments), engine._put(target))
        logp, greedy, top, top_logp = (np.asarray(x) for x in out)
        for r, i in enumerate(idx):
            p, c = rows[i]
            span = slice(len(p), len(p) + len(c))
            token_logprobs[i] = logp[r, span].astype(np.float64)
            is_greedy[i] = bool(greedy[r, span].all())
            top_tokens[i], top_logprobs[i] = top[r, span], top_logp[r, span].astype(np.float64)
    sums = np.array([x.sum() for x in token_logprobs], np.float64)
    counts = np.array([len(x) for x in token_logprobs], np.int64)
    return ScoreOutput(sum_logprob=sums, mean_logprob=sums / counts, num_tokens=counts, is_greedy=is_greedy,
                       token_logprobs=token_logprobs, truncated=truncated, top_tokens=top_tokens,
                       top_logprobs=top_logprobs)


def score_records(engine: "Engine", task: "Task", records: Sequence[dict]) -> ScoreOutput:
    """Log-likelihood of each record's target (completion + EOS) given its prompt, both tokenised by
    `task` exactly as `prepare` writes them: the quantity the training loss minimises."""
    examples = [task.encode(record) for record in records]
    return score_batches(engine, [e.prompt for e in examples], [e.target for e in examples])
