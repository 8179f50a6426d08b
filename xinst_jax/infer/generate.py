"""Batched KV-cache generation: bucketed, ragged prefill, then one jit-compiled decode loop.

Layout of a batch (B rows, prompt bucket P, N = max_new_tokens):

    slot:      0 .. P-1                         P .. P+N-1
    row b:     [pad ... pad | prompt_b]         [generated tokens]
    segment:   0 ......... 0 | 1 ...... 1       1 ...

Prompts are left-padded to the bucket with segment id 0 (never attended) and their positions
start at 0 on each row's first real token, so every row decodes at the same cache slot P+i while
keeping its own RoPE positions. The decode loop is a `lax.while_loop` inside one jit: rows stop
independently (a stop token or stop sequence; finished rows emit `pad_id`) and the loop exits
as soon as every row is done. The decode loop's shapes depend only on (B, P, N), so every batch
of the same bucket reuses it (`Engine.trace_counts` counts traces; tests assert it).

The prefill is ragged (`decode_model.RaggedPrompts`): projections and MLP run on the batch's
prompt tokens packed end to end (one pack per data-parallel shard), rounded up to 4 sizes per
octave, and only attention runs on the [B, P] layout above. A batch of prompts of mixed lengths
then costs about its real tokens, not B x P; the prefill compiles once per (bucket, packed size).

The model runs in the inference layout of `decode_model` (per-layer weights, optionally bfloat16,
[out, in] matrices; the KV cache a per-layer [batch, kv_heads, length, head_dim] buffer updated in
place), prepared once from the training params when the Engine is built.

Sharding: with a mesh, the prepared params are placed by the logical-axis rules (tensor parallel
where the rules say so: heads, kv_heads, mlp, vocab), batch inputs by `batch_sharding` (data
parallel over rows), and the KV cache is constrained to [batch, kv_heads -> tensor, length,
head_dim]. Outputs equal the single-device ones (tests/test_generate.py, 8 fake CPU devices).

Attention reads every slot of the cache it is given, so a cache sized for the whole generation
wastes reads on slots not yet written (half of them on average; on CPU attention cost is linear
in the cache length). The decode loop therefore runs in segments (`decode_segments`): each
segment's cache ends just past the last slot that segment writes, and between segments the cache
is grown by a copy (once per segment, not per step). Each segment is its own `while_loop` in the
same jit, so a bucket still compiles once; the loop exits early as soon as every row is done.
On one CPU device the decode attention runs as a native kernel (`attention_kernel`, see
native_kernels.py) that reads only each row's real slots, left padding and tail alike.

Scoring (`Engine.score`, see score.py) uses the same prepared params and buckets.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from xinst_jax.config import ModelConfig
from xinst_jax.infer import native_kernels
from xinst_jax.infer.decode_model import (RaggedPrompts, cache_logical_axes, decode_step, init_decode_cache,
                                          pack_prompts, prefill_step, prepare_params, prepared_logical_axes)
from xinst_jax.infer.sampling import SamplingSettings, choose_tokens, ngram_banned_mask, row_keys
from xinst_jax.sharding import Rules, batch_sharding, logical_to_spec, tree_shardings

log = logging.getLogger(__name__)

DEFAULT_BUCKETS = (32, 64, 128, 256, 512)

FINISH_LENGTH, FINISH_STOP = 0, 1
FINISH_NAMES = {FINISH_LENGTH: "length", FINISH_STOP: "stop"}


@dataclasses.dataclass
class GenerationOutput:
    tokens: list[list[int]]  # generated tokens per prompt (ending with the stop token if one ended it)
    finish_reasons: list[str]  # "stop" (stop token / sequence) or "length" (max_new_tokens)
    prompt_lengths: list[int]  # tokens of prompt actually used (after left truncation)
    truncated: list[bool]  # the prompt was longer than the largest bucket and lost its beginning


@dataclasses.dataclass
class BatchTiming:
    bucket: int
    rows: int  # real rows (not batch padding)
    prefill_s: float
    decode_s: float
    steps: int  # decode-loop iterations actually run (early exit when all rows are done)
    new_tokens: int  # generated tokens over the real rows


def decode_segments(n_new: int, max_segments: int, min_steps: int) -> list[int]:
    """End (exclusive) of each decode-loop segment over the loop's steps 1 .. n_new-1 (the first
    token comes from the prefill logits): at most `max_segments`, each at least `min_steps` steps
    (fewer segments when there are not enough steps), nearly equal. [] when n_new == 1."""
    steps = n_new - 1
    if steps <= 0:
        return []
    k = max(1, min(max_segments, steps // max(min_steps, 1)))
    return [1 + (steps * (j + 1)) // k for j in range(k)]


def pick_bucket(length: int, buckets: Sequence[int]) -> int:
    for b in sorted(buckets):
        if length <= b:
            return b
    return max(buckets)


def use_native_attention(choice: str, mesh: Mesh | None) -> bool:
    """Resolve Engine's `attention_kernel` ("auto", "xla", "native") for this mesh to a yes/no."""
    if choice not in ("auto", "xla", "native"):
        raise ValueError(f"attention_kernel must be 'auto', 'xla' or 'native', got {choice!r}")
    if choice == "xla":
        return False
    devices = list(mesh.devices.flat) if mesh is not None else [jax.devices()[0]]
    # The kernel is a CPU custom call without a sharding rule: one CPU device only.
    if len(devices) != 1 or devices[0].platform != "cpu":
        if choice == "native":
            raise ValueError(f"attention_kernel='native' runs on one CPU device; this mesh has {len(devices)} "
                             f"{devices[0].platform} device(s)")
        return False
    why_not = native_kernels.available()
    if why_not is not None and choice == "native":
        raise ValueError(f"attention_kernel='native': {why_not}")
    return why_not is None


def _grow_cache(cache: dict, length: int) -> dict:
    """Pad every [B, KV, S, D] buffer with empty slots to `length` (a no-op if already that long)."""
    def grow(x):
        extra = length - x.shape[2]
        return x if extra == 0 else jnp.pad(x, ((0, 0), (0, 0), (0, extra), (0, 0)))

    return jax.tree.map(grow, cache)


class Engine:
    """Generation and scoring for one model on one mesh (or the default device)."""

    def __init__(self, params: Any, cfg: ModelConfig, *, mesh: Mesh | None = None, rules: Rules | None = None,
                 batch_size: int = 8, buckets: Sequence[int] = DEFAULT_BUCKETS, kv_dtype: str | None = None,
                 weight_dtype: str | None = None, score_buckets: Sequence[int] | None = None,
                 max_segments: int = 4, min_segment_steps: int = 32, score_logits_bytes: int = 256 << 20,
                 attention_kernel: str = "auto"):
        """`params`: the model's (stacked, training-layout) params, on any device/sharding.
        `weight_dtype`: keep matrices in this dtype for inference (default: as given);
        `kv_dtype`: the KV cache's dtype (default float32). The decode loop runs in at most
        `max_segments` segments of at least `min_segment_steps` steps, each with a cache just long
        enough for it (see the module docstring; 1 = one cache for the whole generation).
        Scoring runs the lm_head over positions in chunks whose float32 logits fit in
        `score_logits_bytes`. `attention_kernel`: the decode step's attention over the cache runs
        as XLA's dots ("xla") or the native CPU kernel ("native", see native_kernels; one CPU
        device only); "auto" takes the kernel where it applies and builds, else XLA's."""
        if not buckets or any(b < 1 for b in buckets):
            raise ValueError(f"prompt buckets must be positive lengths, got {list(buckets)}")
        self.cfg = cfg
        self.mesh = mesh
        self.rules = rules
        self.batch_size = int(batch_size)
        self.buckets = tuple(sorted(set(int(b) for b in buckets)))
        self.score_buckets = tuple(sorted(set(int(b) for b in (score_buckets or self.buckets))))
        self.kv_dtype = kv_dtype or None
        if max_segments < 1 or min_segment_steps < 1:
            raise ValueError(f"max_segments and min_segment_steps must be >= 1, got {max_segments}, "
                             f"{min_segment_steps}")
        self.max_segments, self.min_segment_steps = int(max_segments), int(min_segment_steps)
        self.score_logits_bytes = int(score_logits_bytes)
        self.native_attention = use_native_attention(attention_kernel, mesh)
        self.trace_counts: Counter = Counter()
        self.timings: list[BatchTiming] = []
        self._packs = 1  # prefill packs: one per data-parallel shard
        if mesh is not None:
            if rules is None:
                raise ValueError("a mesh needs the sharding rules")
            self._batch_sh = batch_sharding(mesh, rules, 1)
            lead = self._batch_sh.spec[0]
            axes = () if lead is None else (lead,) if isinstance(lead, str) else tuple(lead)
            dp = int(np.prod([mesh.shape[a] for a in axes], dtype=np.int64))
            if self.batch_size % dp:
                raise ValueError(f"batch_size={self.batch_size} is not divisible by the {dp} data-parallel "
                                 "shards of the mesh (the `batch` rule's axes)")
            self._packs = dp
        prepare = jax.jit(lambda p: prepare_params(p, cfg, weight_dtype))
        if mesh is not None:
            shapes = jax.eval_shape(prepare, params)
            prepared_sh = tree_shardings(prepared_logical_axes(cfg, shapes), shapes, rules, mesh)
            prepare = jax.jit(lambda p: prepare_params(p, cfg, weight_dtype), out_shardings=prepared_sh)
        self.params = prepare(params)  # the inference layout (per-layer weights); see decode_model
        self._prefill = jax.jit(self._prefill_impl, static_argnames=("max_len",))
        self._decode = jax.jit(self._decode_impl, static_argnames=("settings",))
        self._score = jax.jit(self._score_impl)

    # ----------------------------------------------------------------- placement helpers

    def _put(self, x: np.ndarray) -> jax.Array:
        if self.mesh is None:
            return jnp.asarray(x)
        return jax.device_put(x, self._batch_sh if x.ndim == 1 else batch_sharding(self.mesh, self.rules, x.ndim))

    def _constrain_cache(self, cache: dict) -> dict:
        if self.mesh is None:
            return cache

        def one(value):
            spec = logical_to_spec(cache_logical_axes(), value.shape, self.rules, self.mesh, "kv_cache")
            return jax.lax.with_sharding_constraint(value, NamedSharding(self.mesh, spec))

        return jax.tree.map(one, cache)

    def _constrain_rows(self, x: jnp.ndarray) -> jnp.ndarray:
        if self.mesh is None:
            return x
        return jax.lax.with_sharding_constraint(x, batch_sharding(self.mesh, self.rules, x.ndim))

    # ----------------------------------------------------------------- compiled pieces

    def _prefill_impl(self, params, ragged: RaggedPrompts, lengths, max_len: int):
        """Prompts in the ragged layout, lengths [B] -> (last logits [B, V] float32, cache)."""
        b, p = ragged.batch, ragged.bucket
        self.trace_counts[("prefill", b, p, ragged.tokens.shape[1], max_len)] += 1
        cache = self._constrain_cache(init_decode_cache(self.cfg, b, max_len, self.kv_dtype))
        logits, cache = prefill_step(params, ragged, p - lengths, cache, self.cfg)
        return self._constrain_rows(logits), self._constrain_cache(cache)

    def _decode_impl(self, params, cache, logits, history, lengths, done, keys, settings: SamplingSettings):
        """The decode loop. history [B, P+N]: prompts in [0, P), pads after. Returns
        (generated [B, N], count [B] (incl. a final stop token), finish [B], loop steps run)."""
        b, s = history.shape
        n_new = settings.max_new_tokens
        p = s - n_new
        self.trace_counts[("decode", b, p, settings)] += 1
        cfg = self.cfg
        first = p - lengths
        stop_ids = jnp.asarray(settings.stop_token_ids or (-1,), jnp.int32)
        stop_seqs = [jnp.asarray(q, jnp.int32) for q in settings.stop_sequences]
        vocab = logits.shape[-1]
        stop_vocab = jnp.zeros((vocab,), bool)
        if settings.stop_token_ids:
            stop_vocab = stop_vocab.at[jnp.asarray(settings.stop_token_ids, jnp.int32)].set(True, mode="drop")

        def select(i, logits, history, done, finish, count):
            cur = p + i
            banned = None
            if settings.no_repeat_ngram > 0:
                banned = ngram_banned_mask(history, first, cur, settings.no_repeat_ngram, vocab)
            if settings.min_new_tokens > 0 and settings.stop_token_ids:
                early = jnp.broadcast_to(stop_vocab & (i < settings.min_new_tokens), logits.shape)
                banned = early if banned is None else banned | early
            tok = choose_tokens(logits, settings, keys, i, banned)
            tok = jnp.where(done, settings.pad_id, tok)
            history = jax.lax.dynamic_update_slice_in_dim(history, tok[:, None], cur, axis=1)
            stop = jnp.any(tok[:, None] == stop_ids[None, :], axis=-1)
            for q in stop_seqs:
                m = q.shape[0]
                if m <= s:
                    tail = jax.lax.dynamic_slice_in_dim(history, jnp.maximum(cur - m + 1, 0), m, axis=1)
                    stop |= jnp.all(tail == q[None, :], axis=-1) & (cur - m + 1 >= first)
            stop &= ~done
            count = jnp.where(done, count, i + 1)
            finish = jnp.where(stop, FINISH_STOP, finish)
            return history, done | stop, finish, count

        zeros = jnp.zeros((b,), jnp.int32)
        history, done, finish, count = select(0, logits, history, done, zeros, zeros)

        def cond(carry):
            i, _, _, _, done, _, _ = carry
            return (i < n_new) & ~jnp.all(done)

        def body(carry):
            i, cache, history, logits, done, finish, count = carry
            prev = jax.lax.dynamic_slice_in_dim(history, p + i - 1, 1, axis=1)
            positions = (lengths + i - 1)[:, None]
            logits, cache = decode_step(params, prev, positions, first, cache, p + i - 1, cfg, self.native_attention)
            cache = self._constrain_cache(cache)
            history, done, finish, count = select(i, logits, history, done, finish, count)
            return i + 1, cache, history, logits, done, finish, count

        carry = (jnp.int32(1), cache, history, logits, done, finish, count)
        for end in self.segment_ends(n_new):
            i, cache = carry[:2]
            cache = self._constrain_cache(_grow_cache(cache, self.cache_length(p, end)))
            carry = jax.lax.while_loop(lambda c, end=end: cond(c) & (c[0] < end), body, (i, cache) + carry[2:])
        steps, _, history, _, _, finish, count = carry
        return history[:, p:], count, finish, steps

    def segment_ends(self, n_new: int) -> list[int]:
        return decode_segments(n_new, self.max_segments, self.min_segment_steps)

    @staticmethod
    def cache_length(bucket: int, end: int) -> int:
        """Cache slots for decode steps before `end`: step i writes the previous token at slot
        bucket + i - 1 (the prompt fills slots 0 .. bucket-1)."""
        return bucket + max(end - 1, 0)

    # ----------------------------------------------------------------- host API

    def generate(self, prompts: Sequence[Sequence[int]], settings: SamplingSettings,
                 row_ids: Sequence[int] | None = None) -> GenerationOutput:
        """Generate for every prompt (token lists, each non-empty). `row_ids` (default 0..n-1)
        seed each row's sampling: the same id and seed give the same sample in any batch."""
        settings.validate()
        n = len(prompts)
        row_ids = list(range(n)) if row_ids is None else list(row_ids)
        if len(row_ids) != n:
            raise ValueError(f"{len(row_ids)} row ids for {n} prompts")
        for i, prompt in enumerate(prompts):
            if len(prompt) == 0:
                raise ValueError(f"prompt {i} is empty (add a BOS token)")
        max_bucket = self.buckets[-1]
        tokens_out: list[list[int]] = [[] for _ in range(n)]
        finish_out = ["length"] * n
        used = [min(len(p), max_bucket) for p in prompts]
        truncated = [len(p) > max_bucket for p in prompts]
        # Group rows of similar length: fewer pad slots, fewer distinct buckets.
        order = sorted(range(n), key=lambda i: used[i])
        bsz = self.batch_size
        for start in range(0, n, bsz):
            idx = order[start:start + bsz]
            bucket = pick_bucket(max(used[i] for i in idx), self.buckets)
            tokens = np.full((bsz, bucket), settings.pad_id, np.int32)
            lengths = np.zeros((bsz,), np.int32)
            done = np.ones((bsz,), bool)  # batch-padding rows start finished
            ids = np.zeros((bsz,), np.int64)
            for r, i in enumerate(idx):
                prompt = list(prompts[i])[-bucket:]
                tokens[r, bucket - len(prompt):] = prompt
                lengths[r] = len(prompt)
                done[r] = False
                ids[r] = row_ids[i]
            generated, count, finish, timing = self._run_batch(tokens, lengths, done, ids, settings)
            timing.rows = len(idx)
            timing.new_tokens = int(count[:len(idx)].sum())
            self.timings.append(timing)
            for r, i in enumerate(idx):
                tokens_out[i] = generated[r, :count[r]].tolist()
                finish_out[i] = FINISH_NAMES[int(finish[r])]
        return GenerationOutput(tokens_out, finish_out, used, truncated)

    def _run_batch(self, tokens: np.ndarray, lengths: np.ndarray, done: np.ndarray, ids: np.ndarray,
                   settings: SamplingSettings):
        bsz, bucket = tokens.shape
        n_new = settings.max_new_tokens
        history = np.concatenate([tokens, np.full((bsz, n_new), settings.pad_id, np.int32)], axis=1)
        keys = np.asarray(row_keys(settings.seed, ids.astype(np.uint32)))
        first_segment_end = (self.segment_ends(n_new) or [1])[0]
        t0 = time.perf_counter()
        ragged = pack_prompts(tokens, lengths, self._packs, settings.pad_id)
        logits, cache = self._prefill(self.params, RaggedPrompts(*map(self._put, ragged)), self._put(lengths),
                                      max_len=self.cache_length(bucket, first_segment_end))
        jax.block_until_ready(logits)
        t1 = time.perf_counter()
        out = self._decode(self.params, cache, logits, self._put(history), self._put(lengths), self._put(done),
                           self._put(keys), settings=settings)
        generated, count, finish, steps = jax.device_get(out)
        t2 = time.perf_counter()
        timing = BatchTiming(bucket=bucket, rows=bsz, prefill_s=t1 - t0, decode_s=t2 - t1, steps=int(steps),
                             new_tokens=0)
        return np.asarray(generated), np.asarray(count), np.asarray(finish), timing

    # ----------------------------------------------------------------- scoring

    def _score_impl(self, params, tokens, segments, target_mask):
        from xinst_jax.infer.score import chunk_positions, score_rows

        self.trace_counts[("score",) + tuple(tokens.shape)] += 1
        chunk = chunk_positions(tokens.shape[0], self.cfg.vocab_size, self.score_logits_bytes)
        return score_rows(params, tokens, segments, target_mask, self.cfg, chunk)

    def score(self, prompts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]]):
        from xinst_jax.infer.score import score_batches

        return score_batches(self, prompts, continuations)
