"""Next-token selection with Hugging Face semantics, as pure jit-friendly JAX.

The processing chain is the one `transformers` builds for `generate(do_sample=True, ...)`:

    min-new-tokens, no-repeat-ngram (bans)  ->  temperature  ->  top-k  ->  top-p  ->  sample

- min-new-tokens (MinNewTokensLengthLogitsProcessor): stop tokens are banned until that many
  tokens have been generated.
- no-repeat-ngram (NoRepeatNGramLogitsProcessor): a token is banned when it would complete an
  n-gram that already occurs in the row's sequence (prompt and generated tokens alike).
- top-k (TopKLogitsWarper): keep every token whose score is >= the k-th largest (ties kept).
- top-p (TopPLogitsWarper): sort ascending, drop the tokens whose cumulative probability is
  <= 1 - p, always keep the most likely one.
- temperature 0 means greedy: argmax of the (n-gram-banned) logits, first index on ties.

`process_logits_full` gives the processed [B, V] scores exactly as HF would (tests compare the
two); `candidate_scores` gives the same distribution restricted to the top-k candidates, which is
what the decode loop samples from (a [B, k] softmax instead of a full-vocabulary sort per step),
unless more tokens tie with the k-th score than the candidates hold: then it samples from the full
chain, as transformers would.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf
TIE_SLOTS = 8  # candidates beyond top-k kept for exact ties with the k-th score (more: the full chain)


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
    """Static (hashable) decode settings: one compiled decode loop per distinct value."""

    max_new_tokens: int = 128
    temperature: float = 0.7  # 0: greedy
    top_p: float = 0.9  # >= 1: off
    top_k: int = 50  # 0: off
    no_repeat_ngram: int = 6  # 0: off
    stop_token_ids: tuple[int, ...] = ()  # any of these ends a row (it is kept as the row's last token)
    stop_sequences: tuple[tuple[int, ...], ...] = ()  # token sequences that end a row when generated
    min_new_tokens: int = 0  # stop tokens are banned before this many new tokens (HF MinNewTokensLength)
    pad_id: int = 0  # what finished rows emit
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    def without_seed(self) -> "SamplingSettings":
        """These settings as the compiled decode pieces see them: the seed only makes the rows' PRNG
        keys (`row_keys`, on the host, passed in per row), so leaving it out lets every seed share
        one compile and rows of different seeds share one continuous schedule."""
        return dataclasses.replace(self, seed=0)

    def validate(self) -> None:
        for name, least in (("max_new_tokens", 1), ("temperature", 0), ("top_k", 0), ("min_new_tokens", 0),
                            ("no_repeat_ngram", 0)):
            if getattr(self, name) < least:
                raise ValueError(f"{name} must be >= {least}, got {getattr(self, name)}")
        if not 0.0 < self.top_p:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if any(len(s) == 0 for s in self.stop_sequences):
            raise ValueError("stop_sequences must not contain an empty sequence")


# --------------------------------------------------------------------------- no-repeat-ngram


def ngram_banned_mask(history: jnp.ndarray, first: jnp.ndarray, cur: jnp.ndarray, n: int,
                      vocab_size: int) -> jnp.ndarray:
    """[B, V] bool: tokens that would complete an n-gram already in the row.

    history [B, S] int: each row's tokens at slots [first[b], cur) (left-padded rows: `first` is
    the slot of the row's first real token; slots outside that range are ignored). `cur` is the
    (shared) slot of the token being chosen. A window [j, j+n) with first <= j and j+n <= cur
    whose first n-1 tokens equal the row's last n-1 tokens bans its last token.
    """
    b, s = history.shape
    if n <= 0 or s < n:
        return jnp.zeros((b, vocab_size), bool)
    w = s - n + 1  # window starts 0..s-n
    prefix = jax.lax.dynamic_slice_in_dim(history, cur - (n - 1), n - 1, axis=1) if n > 1 else history[:, :0]
    match = jnp.ones((b, w), bool)
    for k in range(n - 1):
        match &= history[:, k:k + w] == prefix[:, k:k + 1]
    start = jnp.arange(w, dtype=jnp.int32)[None, :]
    match &= (start >= first[:, None]) & (start + n <= cur)
    banned_tok = jnp.where(match, history[:, n - 1:n - 1 + w], vocab_size)  # non-matches -> spare column
    banned = jnp.zeros((b, vocab_size + 1), bool)
    banned = jax.vmap(lambda row, idx: row.at[idx].set(True))(banned, banned_tok)
    return banned[:, :vocab_size]


# --------------------------------------------------------------------------- warpers (HF-exact)


def top_k_filter(scores: jnp.ndarray, k: int) -> jnp.ndarray:
    k = min(k, scores.shape[-1])
    kth = jax.lax.top_k(scores, k)[0][..., -1:]
    return jnp.where(scores < kth, NEG_INF, scores)


def _top_p_keep_sorted_ascending(sorted_scores: jnp.ndarray, p: float) -> jnp.ndarray:
    """Keep-mask over scores sorted ascending (HF: cumulative prob <= 1-p removed, last kept)."""
    cum = jnp.cumsum(jax.nn.softmax(sorted_scores, axis=-1), axis=-1)
    keep = cum > (1.0 - p)
    return keep.at[..., -1].set(True)


def top_p_filter(scores: jnp.ndarray, p: float) -> jnp.ndarray:
    order = jnp.argsort(scores, axis=-1)  # ascending, stable
    sorted_scores = jnp.take_along_axis(scores, order, axis=-1)
    keep_sorted = _top_p_keep_sorted_ascending(sorted_scores, p)
    keep = jnp.zeros_like(keep_sorted)
    keep = jax.vmap(lambda row, idx, val: row.at[idx].set(val))(keep, order, keep_sorted)
    return jnp.where(keep, scores, NEG_INF)


def process_logits_full(logits: jnp.ndarray, settings: SamplingSettings, banned: jnp.ndarray | None = None
                        ) -> jnp.ndarray:
    """[B, V] float32 -> processed scores [B, V] (-inf = filtered), the HF sampling chain."""
    scores = logits.astype(jnp.float32)
    if banned is not None:
        scores = jnp.where(banned, NEG_INF, scores)
    if settings.greedy:
        return scores
    if settings.temperature != 1.0:
        scores = scores / settings.temperature
    if settings.top_k > 0:
        scores = top_k_filter(scores, settings.top_k)
    if settings.top_p < 1.0:
        scores = top_p_filter(scores, settings.top_p)
    return scores


def candidate_scores(logits: jnp.ndarray, settings: SamplingSettings, banned: jnp.ndarray | None = None
                     ) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray | None]:
    """The processed distribution over its only possible survivors: (scores [B, K], token ids [B, K],
    cut [B] bool, or None where nothing can be cut).

    With top-k on, only the k best can survive (plus HF's ties with the k-th score), so
    temperature and top-p run on the k + TIE_SLOTS best (in descending order; top-p's ascending
    cumulative sum is taken over the reversed order), those below the k-th score masked. The
    result equals `process_logits_full` scattered back (tests check, ties included) except in rows
    marked `cut`: there the last candidate still ties the k-th score, so more tokens may tie
    beyond the candidates (`choose_tokens` then uses the full chain).
    """
    scores = logits.astype(jnp.float32)
    if banned is not None:
        scores = jnp.where(banned, NEG_INF, scores)
    if settings.temperature != 1.0:
        scores = scores / settings.temperature
    vocab = scores.shape[-1]
    cut = None
    if settings.top_k > 0:
        k = min(settings.top_k, vocab)
        n = min(k + TIE_SLOTS, vocab)
        values, ids = jax.lax.top_k(scores, n)  # descending
        kth = values[..., k - 1:k]
        if n < vocab:
            cut = (values[..., -1] == kth[..., 0]) & jnp.isfinite(kth[..., 0])
        values = jnp.where(values < kth, NEG_INF, values)  # keep ties with the k-th, as HF
    else:
        ids = jnp.argsort(-scores, axis=-1, stable=True)
        values = jnp.take_along_axis(scores, ids, axis=-1)
    if settings.top_p < 1.0:
        keep = _top_p_keep_sorted_ascending(values[..., ::-1], settings.top_p)[..., ::-1]
        values = jnp.where(keep, values, NEG_INF)
    return values, ids.astype(jnp.int32), cut


# --------------------------------------------------------------------------- choosing


# compiled once per row count: the server makes keys for every request, and the eager vmap costs
# milliseconds where this costs a fraction of one (the same integer ops, the same keys)
_fold_rows = jax.jit(jax.vmap(jax.random.fold_in, in_axes=(None, 0)))


def row_keys(seed: int, row_ids: Sequence[int] | jnp.ndarray) -> jnp.ndarray:
    """[B, 2] uint32 raw keys, one per row, from (seed, the row's global id): a row's samples do
    not depend on which batch, bucket, device or process it ran in."""
    return _fold_rows(jax.random.PRNGKey(seed), jnp.asarray(row_ids, jnp.uint32))


def choose_tokens(logits: jnp.ndarray, settings: SamplingSettings, keys: jnp.ndarray, step: jnp.ndarray,
                  banned: jnp.ndarray | None = None) -> jnp.ndarray:
    """[B, V] logits -> [B] int32 tokens, greedy or sampled: row b draws with fold_in(keys[b],
    step) -- `step` one scalar for a static batch, or [B] with each row at its own step (the rows
    of a continuous batch started at different times), which draws for a row exactly what the
    static batch draws for it at that step."""
    if settings.greedy:
        scores = logits if banned is None else jnp.where(banned, NEG_INF, logits)
        return jnp.argmax(scores, axis=-1).astype(jnp.int32)
    steps = jnp.broadcast_to(step, keys.shape[:1])

    def sample(values, ids):
        def one(key, row_step, v, i):
            return i[jax.random.categorical(jax.random.fold_in(key, row_step), v)]

        return jax.vmap(one)(keys, steps, values, ids)

    values, ids, cut = candidate_scores(logits, settings, banned)
    if cut is None:
        return sample(values, ids)

    def full_chain():  # rare: more than TIE_SLOTS tokens tie with the k-th score
        scores = process_logits_full(logits, settings, banned)
        return sample(scores, jnp.broadcast_to(jnp.arange(scores.shape[-1], dtype=jnp.int32), scores.shape))

    return jax.lax.cond(jnp.any(cut), full_chain, lambda: sample(values, ids))
