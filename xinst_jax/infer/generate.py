"""Batched KV-cache generation on the model's own layers: bucketed prefill, then one compiled
decode loop.

Layout of a batch (B rows, prompt bucket P, N = max_new_tokens):

    slot:      0 .. P-1                         P .. P+N-1
    row b:     [pad ... pad | prompt_b]         [generated tokens]
    segment:   0 ......... 0 | 1 ...... 1       1 ...

Prompts are left-padded to the bucket with segment id 0 (never attended) and their positions
start at 0 on each row's first real token, so every row decodes at the same cache slot P+i while
keeping its own RoPE positions. Prefill and every decode step are calls of the same
`LlamaForCausalLM` the trainer trains (model/llama.py), with a `KVCache` passed through every
layer; the decode loop is a `lax.while_loop` inside one jit: rows stop independently (a stop
token or stop sequence; finished rows emit `pad_id`) and the loop exits as soon as every row is
done. Its shapes depend only on (B, P, N), so every batch of the same bucket reuses it
(`Engine.trace_counts` counts traces; tests assert it).

The Engine lays the weights out once for inference: LoRA adapters merged, layers unstacked into
a list (`stack_layers=False`: a decode step reads each weight where it lies instead of slicing it
out of the stacked array on every step), optionally cast (`weight_dtype`: bfloat16 weights and
compute, as transformers runs a bfloat16 checkpoint). With a mesh, weights are placed by the
logical-axis rules (tensor parallel where they say so), rows by `batch_sharding`, and the KV
cache by its own logical axes (`cache_*` in `mesh.rules`): outputs equal the single-device ones
(tests/test_generate.py, 8 fake CPU devices).

Attention reads every slot of the cache it is given, so a cache sized for the whole generation
wastes reads on slots not yet written. The decode loop therefore runs in segments
(`decode_segments`): each segment's cache ends just past the last slot that segment writes, and
between segments the cache is grown by a copy (once per segment, not per step). Each segment is
its own `while_loop` in the same jit, so a bucket still compiles once.

Continuous batching (`generate(..., schedule="continuous")`): `batch_size` slots live on the device
with one KV cache whose index is per row ([B]: each row writes at its own slot). The host prefills
waiting prompts `refill_size` at a time (the same bucketed left-padded prefill; one compile per
bucket), chooses their first tokens and moves them into free slots: the prompt's keys and values
at slots [0, P), segment ids 0 after it, so nothing of the slot's previous row stays visible. A
jit'd `while_loop` then decodes every slot until `chunk_steps` steps ran or enough slots are free
for the next group (a runtime threshold: no recompilation), and the host collects finished rows
(one device-to-host read per chunk). A row keeps exactly what a static batch gives it (prompt
slots, RoPE positions, PRNG key from (seed, row id), step counter, prefill cache length), so its
tokens are the static ones: bit for bit in float32 (tests/test_continuous.py;
benchmarks/continuous_bench.py on SmolLM2). In bfloat16 XLA:CPU rounds attention over a cache of
another length differently, so rows agree up to bf16 near-ties, as static batches with another
segment count do. Per-row `max_new_tokens` work in both schedules. The host side of that loop is
`ContinuousSchedule` (continuous.py, `Engine.continuous`): rows can also be added while it runs,
each with its own PRNG key (so its own seed), which is how the server admits requests into a
running batch. The compiled pieces see the settings without the seed (`without_seed`): one
compile serves every seed.

Scoring (`Engine.score`, see score.py) uses the same weights and the model's training-mode call.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections import Counter
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from xinst_jax.config import ModelConfig
from xinst_jax.infer.buckets import DEFAULT_BUCKETS, pick_bucket
from xinst_jax.infer.sampling import SamplingSettings, choose_tokens, ngram_banned_mask, row_keys
from xinst_jax.infer.score import ScoreOutput, chunk_positions, score_batches, score_rows
from xinst_jax.model.kv_cache import CACHE_AXES, CACHE_SEGMENT_AXES, KVCache, grow_cache, init_cache
from xinst_jax.model.llama import DTYPES, abstract_model, logical_axes, merge_lora, unstack_layers
from xinst_jax.sharding import Rules, activation_sharding, batch_sharding, constrain, tree_shardings

if TYPE_CHECKING:
    from xinst_jax.infer.continuous import ContinuousSchedule

SCHEDULES = ("static", "continuous")

log = logging.getLogger(__name__)

FINISH_LENGTH, FINISH_STOP = 0, 1
FINISH_NAMES = {FINISH_LENGTH: "length", FINISH_STOP: "stop"}

# generate(progress=...): called on the host with (prompt index, the row's tokens new since its
# last call, its finish reason or None while it runs) whenever a row has new tokens: after every
# decode chunk in the continuous schedule (what streaming servers send), once per row (all its
# tokens) at the end of a static batch. The calls' tokens join to the row's output, each token once.
Progress = Callable[[int, list[int], Optional[str]], None]


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
    # Continuous batching appends one record per generate call: bucket = the largest used, steps =
    # decode steps of all chunks, prefill_s = 0 (prefills run between the decode chunks: the whole
    # wall time is in decode_s).
    schedule: str = "static"
    refills: int = 0  # continuous: prefill-and-insert calls
    chunks: int = 0  # continuous: decode-loop calls (returns to the host)


def ends_row(context: Sequence[int], settings: SamplingSettings) -> bool:
    """The decode loop's stop rule (`select`, `_select_rows`) on the host, for the newest token of
    `context` (the prompt as the engine uses it, then the tokens generated so far): a stop token,
    or the last token of a stop sequence, which may begin in the prompt. (min_new_tokens is no
    part of it: it keeps stop tokens from being chosen.)"""
    return context[-1] in settings.stop_token_ids or any(
        len(q) <= len(context) and tuple(context[-len(q):]) == tuple(q) for q in settings.stop_sequences)


def decode_segments(n_new: int, max_segments: int, min_steps: int) -> list[int]:
    """End (exclusive) of each decode-loop segment over the loop's steps 1 .. n_new-1 (the first
    token comes from the prefill logits): at most `max_segments`, each at least `min_steps` steps
    (fewer segments when there are not enough steps), nearly equal. [] when n_new == 1."""
    steps = n_new - 1
    if steps <= 0:
        return []
    k = max(1, min(max_segments, steps // max(min_steps, 1)))
    return [1 + (steps * (j + 1)) // k for j in range(k)]


def inference_config(cfg: ModelConfig, weight_dtype: str | None) -> ModelConfig:
    """The model config inference runs: adapters merged (no LoRA), weights and compute in
    `weight_dtype` when given."""
    cfg = dataclasses.replace(cfg, lora_rank=0)
    if weight_dtype:
        cfg = dataclasses.replace(cfg, dtype=weight_dtype, param_dtype=weight_dtype)
    return cfg


def inference_params(params: Any, cfg: ModelConfig, infer_cfg: ModelConfig) -> Any:
    """Training params (stacked layers, maybe LoRA) -> the inference layout of `infer_cfg`. Pure."""
    if cfg.lora_rank > 0:
        params = merge_lora(params, cfg)
    dtype = DTYPES[infer_cfg.param_dtype]
    return jax.tree.map(lambda x: x.astype(dtype), unstack_layers(params, cfg))


class Engine:
    """Generation and scoring for one model on one mesh (or the default device)."""

    def __init__(self, params: Any, cfg: ModelConfig, *, mesh: Mesh | None = None, rules: Rules | None = None,
                 batch_size: int = 8, buckets: Sequence[int] = DEFAULT_BUCKETS, kv_dtype: str | None = None,
                 weight_dtype: str | None = None, score_buckets: Sequence[int] | None = None,
                 max_segments: int = 4, min_segment_steps: int = 32, score_logits_bytes: int = 256 << 20,
                 schedule: str = "static", refill_size: int | None = None, chunk_steps: int = 64):
        """`params`: the model's training params (stacked layers), on any device/sharding.
        `weight_dtype`: weights and compute in this dtype for inference (default: as configured);
        `kv_dtype`: the KV cache's dtype (default: the compute dtype). The decode loop runs in at
        most `max_segments` segments of at least `min_segment_steps` steps, each with a cache just
        long enough for it (1 = one cache for the whole generation). Scoring runs the lm_head over
        positions in chunks whose float32 logits fit in `score_logits_bytes`.

        `schedule`: what `generate` does by default: "static" (batches of `batch_size` prompts,
        each decoded until its last row is done) or "continuous" (`batch_size` slots refilled with
        waiting prompts as rows finish, `refill_size` prompts per prefill (default batch_size // 8,
        at least 1, a multiple of the data-parallel shards), at most `chunk_steps` decode steps
        between returns to the host)."""
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        if chunk_steps < 1:
            raise ValueError(f"chunk_steps must be >= 1, got {chunk_steps}")
        if not buckets or any(b < 1 for b in buckets):
            raise ValueError(f"prompt buckets must be positive lengths, got {list(buckets)}")
        if max_segments < 1 or min_segment_steps < 1:
            raise ValueError(f"max_segments and min_segment_steps must be >= 1, got {max_segments}, "
                             f"{min_segment_steps}")
        self.cfg = inference_config(cfg, weight_dtype)
        self.mesh = mesh
        self.rules = rules
        self.batch_size = int(batch_size)
        self.buckets = tuple(sorted(set(int(b) for b in buckets)))
        self.score_buckets = tuple(sorted(set(int(b) for b in (score_buckets or self.buckets))))
        self.kv_dtype = jnp.dtype(DTYPES[kv_dtype or self.cfg.dtype])
        self.max_segments, self.min_segment_steps = int(max_segments), int(min_segment_steps)
        self.score_logits_bytes = int(score_logits_bytes)
        self.schedule, self.chunk_steps = schedule, int(chunk_steps)
        self.trace_counts: Counter = Counter()
        self.timings: list[BatchTiming] = []
        self.spare_slots: dict | None = None  # a closed schedule's slots, for the next (reuse_slots)
        dp = 1
        if mesh is not None:
            if rules is None:
                raise ValueError("a mesh needs the sharding rules")
            lead = batch_sharding(mesh, rules, 1).spec[0]
            axes = () if lead is None else (lead,) if isinstance(lead, str) else tuple(lead)
            dp = int(np.prod([mesh.shape[a] for a in axes], dtype=np.int64))
            if self.batch_size % dp:
                raise ValueError(f"batch_size={self.batch_size} is not divisible by the {dp} data-parallel "
                                 "shards of the mesh (the `batch` rule's axes)")
        if refill_size is None:
            refill_size = -(-max(1, self.batch_size // 8) // dp) * dp
        self.refill_size = int(refill_size)
        if not 1 <= self.refill_size <= self.batch_size or self.refill_size % dp:
            raise ValueError(f"refill_size={self.refill_size} must be in [1, batch_size={self.batch_size}] and "
                             f"divisible by the {dp} data-parallel shards of the mesh")
        model = abstract_model(self.cfg, stack_layers=False)
        self._graphdef = nnx.split(model)[0]
        layout = jax.jit(lambda p: inference_params(p, cfg, self.cfg))
        if mesh is not None:
            shapes = jax.eval_shape(layout, params)
            shardings = tree_shardings(logical_axes(self.cfg, stack_layers=False), shapes, rules, mesh)
            layout = jax.jit(lambda p: inference_params(p, cfg, self.cfg), out_shardings=shardings)
        self.params = layout(params)
        self._prefill = jax.jit(self._prefill_impl, static_argnames=("max_len",))
        self._decode = jax.jit(self._decode_impl, static_argnames=("settings",))
        self._score = jax.jit(self._score_impl)
        self._init_slots = jax.jit(self._init_slots_impl, static_argnames=("rows", "length", "width"))
        self._refill = jax.jit(self._refill_impl, static_argnames=("settings",), donate_argnames=("state",))
        self._chunk = jax.jit(self._chunk_impl, static_argnames=("settings", "live"), donate_argnames=("state",))
        self._read_tokens = jax.jit(self._read_tokens_impl, static_argnames=("width",))

    # ----------------------------------------------------------------- placement helpers

    def _sharding_context(self):
        """Activation and cache constraints apply while the compiled pieces trace."""
        return activation_sharding(self.mesh, self.rules) if self.mesh is not None else contextlib.nullcontext()

    def _put(self, x: np.ndarray) -> jax.Array:
        if self.mesh is None:
            return jnp.asarray(x)
        return jax.device_put(x, batch_sharding(self.mesh, self.rules, x.ndim))

    @staticmethod
    def _constrain_cache(cache: KVCache) -> KVCache:
        return KVCache([constrain(x, CACHE_AXES) for x in cache.k], [constrain(x, CACHE_AXES) for x in cache.v],
                       constrain(cache.segment_ids, CACHE_SEGMENT_AXES), cache.index)

    # ----------------------------------------------------------------- compiled pieces

    def _prefill_impl(self, params, tokens, lengths, max_len: int):
        """Left-padded prompts tokens [B, P], lengths [B] -> (last logits [B, V] float32, cache)."""
        b, p = tokens.shape
        self.trace_counts[("prefill", b, p, max_len)] += 1
        with self._sharding_context():
            return self._prefill_body(params, tokens, lengths, max_len)

    def _prefill_body(self, params, tokens, lengths, max_len: int):
        b, p = tokens.shape
        cfg = self.cfg
        model = nnx.merge(self._graphdef, params)
        slot = jnp.arange(p, dtype=jnp.int32)[None, :]
        first = (p - lengths)[:, None]
        segments = (slot >= first).astype(jnp.int32)
        positions = jnp.maximum(slot - first, 0)
        cache = self._constrain_cache(init_cache(cfg.num_layers, b, max_len, cfg.num_kv_heads, cfg.head_dim,
                                                 self.kv_dtype))
        h, cache = model.hidden(tokens, positions, segments, cache)
        return model.logits(h[:, -1:])[:, 0], cache

    def _decode_impl(self, params, cache, logits, history, lengths, done, keys, limits, settings: SamplingSettings):
        """The decode loop. history [B, P+N]: prompts in [0, P), pads after; limits [B]: each row's
        max new tokens (<= N). Returns (generated [B, N], count [B] (incl. a final stop token),
        finish [B], loop steps run)."""
        b, s = history.shape
        n_new = settings.max_new_tokens
        p = s - n_new
        self.trace_counts[("decode", b, p, settings)] += 1
        with self._sharding_context():
            return self._decode_loop(params, cache, logits, history, lengths, done, keys, limits, settings)

    def _decode_loop(self, params, cache, logits, history, lengths, done, keys, limits, settings: SamplingSettings):
        b, s = history.shape
        n_new = settings.max_new_tokens
        p = s - n_new
        model = nnx.merge(self._graphdef, params)
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
            return history, done | stop | (count >= limits), finish, count

        zeros = jnp.zeros((b,), jnp.int32)
        history, done, finish, count = select(0, logits, history, done, zeros, zeros)

        def cond(carry):
            i, _, _, _, done, _, _ = carry
            return (i < n_new) & ~jnp.all(done)

        def body(carry):
            i, cache, history, logits, done, finish, count = carry
            prev = jax.lax.dynamic_slice_in_dim(history, p + i - 1, 1, axis=1)
            positions = (lengths + i - 1)[:, None]
            h, cache = model.hidden(prev, positions, jnp.ones_like(prev), cache)  # writes slot p + i - 1
            logits = model.logits(h)[:, 0]
            history, done, finish, count = select(i, logits, history, done, finish, count)
            return i + 1, cache, history, logits, done, finish, count

        carry = (jnp.int32(1), cache, history, logits, done, finish, count)
        for end in self.segment_ends(n_new):
            i, cache = carry[:2]
            cache = self._constrain_cache(grow_cache(cache, self.cache_length(p, end)))
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

    # ----------------------------------------------------------------- continuous batching (compiled)
    #
    # The device holds `rows` slots, a dict of arrays whose first axis is the slot:
    #   cache     KVCache, index [rows]: each slot writes at its own cache slot
    #   history   [rows, W] tokens by cache slot: the left-padded prompt in [0, base), token i at base + i
    #   first     slot of the prompt's first real token; base: the prompt bucket; lengths: prompt tokens
    #   step      tokens generated so far; limit: the row's max new tokens; keys: its PRNG key
    #   done      the slot is free or its row finished (and waits for the host); finish: why
    # A slot's layout is the one a static batch gives the row (prompt slots, positions, key, step),
    # so its tokens are the ones static batching gives it.

    @staticmethod
    def _constrain_rows(x: jax.Array) -> jax.Array:
        return constrain(x, ("cache_batch",) + (None,) * (x.ndim - 1))

    def _init_slots_impl(self, rows: int, length: int, width: int):
        """Empty slots (all free) with a KV cache of `length` slots and a history `width` wide."""
        self.trace_counts[("init_slots", rows, length, width)] += 1
        cfg = self.cfg
        with self._sharding_context():
            cache = init_cache(cfg.num_layers, rows, length, cfg.num_kv_heads, cfg.head_dim, self.kv_dtype)
            cache = self._constrain_cache(dataclasses.replace(cache, index=jnp.zeros((rows,), jnp.int32)))
            zeros = jnp.zeros((rows,), jnp.int32)
            state = dict(history=jnp.zeros((rows, width), jnp.int32), first=zeros, base=zeros, lengths=zeros,
                         step=zeros, limit=zeros + 1, done=jnp.ones((rows,), bool), finish=zeros,
                         keys=jnp.zeros((rows, 2), jnp.uint32))
            state = {k: self._constrain_rows(v) for k, v in state.items()}
            return dict(cache=cache, **state)

    def _select_rows(self, logits, rows: dict, settings: SamplingSettings) -> dict:
        """Choose each unfinished row's token number `step` (at history slot base + step) from its
        logits [B, V]: the static loop's `select` with a step and a slot per row."""
        history, first, step, done = rows["history"], rows["first"], rows["step"], rows["done"]
        width = history.shape[1]
        cur = rows["base"] + step
        vocab = logits.shape[-1]
        banned = None
        if settings.no_repeat_ngram > 0:
            n = settings.no_repeat_ngram
            banned = jax.vmap(lambda h, f, c: ngram_banned_mask(h[None], f[None], c, n, vocab)[0])(history, first, cur)
        if settings.min_new_tokens > 0 and settings.stop_token_ids:
            stop_vocab = jnp.zeros((vocab,), bool).at[jnp.asarray(settings.stop_token_ids, jnp.int32)].set(
                True, mode="drop")
            early = stop_vocab[None, :] & (step < settings.min_new_tokens)[:, None]
            banned = early if banned is None else banned | early
        tok = choose_tokens(logits, settings, rows["keys"], step, banned)
        at = jnp.minimum(cur, width - 1)
        old = jnp.take_along_axis(history, at[:, None], axis=1)[:, 0]
        tok = jnp.where(done, settings.pad_id, tok)
        history = jax.vmap(lambda h, t, c: jax.lax.dynamic_update_slice(h, t[None], (c,)))(
            history, jnp.where(done, old, tok), at)  # a finished row's tokens stay as they are
        stop_ids = jnp.asarray(settings.stop_token_ids or (-1,), jnp.int32)
        stop = jnp.any(tok[:, None] == stop_ids[None, :], axis=-1)
        for q in settings.stop_sequences:
            m = len(q)
            if m <= width:
                q = jnp.asarray(q, jnp.int32)
                tail = jax.vmap(lambda h, c: jax.lax.dynamic_slice_in_dim(h, c, m))(history, jnp.maximum(cur - m + 1, 0))
                stop |= jnp.all(tail == q[None, :], axis=-1) & (cur - m + 1 >= first)
        stop &= ~done
        step = jnp.where(done, step, step + 1)
        finish = jnp.where(stop, FINISH_STOP, rows["finish"])
        return dict(rows, history=history, step=step, finish=finish, done=done | stop | (step >= rows["limit"]))

    def _refill_impl(self, params, state, tokens, lengths, slots, limits, keys, settings: SamplingSettings):
        """Prefill a group of left-padded prompts (tokens [G, P], the static path's prefill), choose
        their first tokens, and move them into the free `slots` [G] of `state` (slot == rows: a
        padding entry of the group, dropped). Each slot's cache row gets the prompt's keys and
        values in [0, P) and empty (segment 0) slots after it: nothing of its previous row stays
        visible."""
        g, p = tokens.shape
        rows, width = state["history"].shape
        length = state["cache"].length
        self.trace_counts[("refill", g, p, rows, length, settings)] += 1
        with self._sharding_context():
            # The static path's prefill cache length for this bucket: XLA computes a cache exactly
            # as long as the prompt differently (the write covers the whole buffer), and the rows'
            # logits would differ in the last bits from static batching's.
            max_len = self.cache_length(p, (self.segment_ends(settings.max_new_tokens) or [1])[0])
            logits, group_cache = self._prefill_body(params, tokens, lengths, max_len=max_len)
            zeros = jnp.zeros((g,), jnp.int32)
            group = dict(history=jnp.concatenate([tokens, jnp.full((g, width - p), settings.pad_id, jnp.int32)], 1),
                         first=p - lengths, base=zeros + p, lengths=lengths, step=zeros, limit=limits,
                         done=jnp.zeros((g,), bool), finish=zeros, keys=keys)
            group = self._select_rows(logits, group, settings)
            out = {k: self._constrain_rows(state[k].at[slots].set(v, mode="drop")) for k, v in group.items()}
            cache = state["cache"]

            def put(buffer, new):
                return buffer.at[slots, :, :p, :].set(new.astype(buffer.dtype), mode="drop")

            segments = jnp.pad(group_cache.segment_ids[:, :p], ((0, 0), (0, length - p)))
            group_k = [x[:, :, :p] for x in group_cache.k]
            group_v = [x[:, :, :p] for x in group_cache.v]
            out["cache"] = self._constrain_cache(KVCache(
                jax.tree.map(put, cache.k, group_k), jax.tree.map(put, cache.v, group_v),
                cache.segment_ids.at[slots].set(segments, mode="drop"), cache.index.at[slots].set(p, mode="drop")))
            return out

    def _chunk_impl(self, params, state, threshold, max_steps, settings: SamplingSettings, live: int):
        """Decode steps for every slot until `max_steps` steps ran or at least `threshold` slots are
        done (free or finished). Returns (steps run, state).

        `live`: the largest prompt bucket among the running rows. A row of bucket P only uses cache
        slots [0, P + N - 1) and history [0, P + N], so attention reads only that prefix of the
        cache, in place (model.hidden's read_len), and the steps run on that prefix of the history:
        a layout sized for the largest bucket costs what its longest running prompt needs. (Copying
        the cache's prefix out and back instead costs two reads and writes of it per chunk: 4 GiB
        per chip for Llama-3-8B at batch 64 on a v5e-8, more than a whole decode step.) One compile
        per `live` bucket."""
        rows, width = state["history"].shape
        length = state["cache"].length
        self.trace_counts[("chunk", rows, length, width, live, settings)] += 1
        n_new = settings.max_new_tokens
        read_len, view_width = min(self.cache_length(live, n_new), length), min(live + n_new + 1, width)
        with self._sharding_context():
            model = nnx.merge(self._graphdef, params)
            view = dict(state, history=state["history"][:, :view_width])  # token ids: a small copy

            def cond(carry):
                i, state = carry
                return (i < max_steps) & (jnp.sum(state["done"].astype(jnp.int32)) < threshold)

            def body(carry):
                i, state = carry
                step = state["step"]
                last = jnp.clip(state["base"] + step - 1, 0, view_width - 1)  # the slot of the previous token
                prev = jnp.take_along_axis(state["history"], last[:, None], axis=1)
                positions = jnp.maximum(state["lengths"] + step - 1, 0)[:, None]
                cache = dataclasses.replace(state["cache"], index=jnp.minimum(last, read_len - 1))
                h, cache = model.hidden(prev, positions, jnp.ones_like(prev), self._constrain_cache(cache),
                                        read_len=read_len)
                logits = model.logits(h)[:, 0]
                rows = self._select_rows(logits, {k: v for k, v in state.items() if k != "cache"}, settings)
                return i + 1, dict(rows, cache=self._constrain_cache(cache))

            steps, out = jax.lax.while_loop(cond, body, (jnp.int32(0), view))
            if view_width < width:  # the prefix back into the (donated) full history, in place
                out["history"] = self._constrain_rows(
                    jax.lax.dynamic_update_slice(state["history"], out["history"], (0, 0)))
            return steps, out

    def _read_tokens_impl(self, history, slots, starts, width: int):
        """history[slots[i], starts[i] : starts[i] + width] for every i: [len(slots), width]. A
        window that would run past the history's end starts earlier (dynamic_slice clamps; the
        host shifts back). What a chunk's reports read off the device instead of the whole history."""
        self.trace_counts[("read_tokens", *history.shape, slots.shape[0], width)] += 1
        rows = jnp.take(history, slots, axis=0)
        return jax.vmap(lambda h, s: jax.lax.dynamic_slice_in_dim(h, s, width))(rows, starts)

    # ----------------------------------------------------------------- host API

    def generate(self, prompts: Sequence[Sequence[int]], settings: SamplingSettings,
                 row_ids: Sequence[int] | None = None, max_new_tokens: Sequence[int] | None = None,
                 schedule: str | None = None, progress: Progress | None = None,
                 chunk_steps: int | None = None) -> GenerationOutput:
        """Generate for every prompt (token lists, each non-empty). `row_ids` (default 0..n-1)
        seed each row's sampling: the same id and seed give the same sample in any batch.
        `max_new_tokens`: each prompt's own limit (default: all `settings.max_new_tokens`, which
        caps them); a row reaching its limit finishes "length". `schedule` (default: the
        engine's): "static" or "continuous" batching; both give a row the same tokens (bit for bit
        in float32; in bfloat16 up to near-ties, see the module notes). `progress`: see `Progress`.
        `chunk_steps` (continuous): decode steps between returns to the host for this call (default:
        the engine's); a runtime bound, so another value neither recompiles nor changes tokens."""
        settings.validate()
        if chunk_steps is not None and chunk_steps < 1:
            raise ValueError(f"chunk_steps must be >= 1, got {chunk_steps}")
        schedule = schedule or self.schedule
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        n = len(prompts)
        row_ids = list(range(n)) if row_ids is None else list(row_ids)
        if len(row_ids) != n:
            raise ValueError(f"{len(row_ids)} row ids for {n} prompts")
        cap = settings.max_new_tokens
        if max_new_tokens is None:
            limits = [cap] * n
        else:
            if len(max_new_tokens) != n:
                raise ValueError(f"{len(max_new_tokens)} max_new_tokens for {n} prompts")
            if any(int(m) < 1 for m in max_new_tokens):
                raise ValueError("max_new_tokens must be >= 1 for every prompt")
            limits = [min(int(m), cap) for m in max_new_tokens]
        for i, prompt in enumerate(prompts):
            if len(prompt) == 0:
                raise ValueError(f"prompt {i} is empty (add a BOS token)")
        if n == 0:
            return GenerationOutput([], [], [], [])
        if schedule == "continuous":
            return self._generate_continuous(prompts, settings, row_ids, limits, progress,
                                             chunk_steps or self.chunk_steps)
        tokens_out: list[list[int]] = [[] for _ in range(n)]
        finish_out = ["length"] * n
        used = [self.fit(p)[0] for p in prompts]
        truncated = [self.fit(p)[1] for p in prompts]
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
            row_limits = np.full((bsz,), cap, np.int32)
            for r, i in enumerate(idx):
                prompt = list(prompts[i])[-bucket:]
                tokens[r, bucket - len(prompt):] = prompt
                lengths[r] = len(prompt)
                done[r] = False
                ids[r] = row_ids[i]
                row_limits[r] = limits[i]
            generated, count, finish, timing = self._run_batch(tokens, lengths, done, ids, settings, row_limits)
            timing.rows = len(idx)
            timing.new_tokens = int(count[:len(idx)].sum())
            self.timings.append(timing)
            for r, i in enumerate(idx):
                tokens_out[i] = generated[r, :count[r]].tolist()
                finish_out[i] = FINISH_NAMES[int(finish[r])]
                if progress is not None:
                    progress(i, tokens_out[i], finish_out[i])
        return GenerationOutput(tokens_out, finish_out, used, truncated)

    def continuous(self, settings: SamplingSettings, *, bucket: int | None = None, chunk_steps: int | None = None,
                   stream_chunk_steps: int | None = None, eager: bool = False,
                   reuse_slots: bool = False) -> "ContinuousSchedule":
        """A continuous schedule over this engine's slots (continuous.py): rows are added to it and
        enter free slots between decode chunks. `bucket` (default: the largest prompt bucket, so
        every prompt fits, whenever it arrives) fixes the slot layout for the schedule's life."""
        from xinst_jax.infer.continuous import ContinuousSchedule  # continuous.py imports this module

        return ContinuousSchedule(self, settings, bucket=bucket or self.buckets[-1],
                                  chunk_steps=chunk_steps or self.chunk_steps, stream_chunk_steps=stream_chunk_steps,
                                  eager=eager, reuse_slots=reuse_slots)

    def _generate_continuous(self, prompts, settings: SamplingSettings, row_ids: list[int], limits: list[int],
                             progress: Progress | None, chunk_steps: int) -> GenerationOutput:
        """Continuous batching over known prompts: every row added to one schedule up front
        (shortest first, so prefill groups share buckets), sized for the largest of them, run
        until all finished. One device-to-host read per chunk, not per token (with `progress`,
        that read also takes the running rows' new tokens)."""
        from xinst_jax.infer.continuous import slot_rows

        n = len(prompts)
        used, truncated = zip(*(self.fit(p) for p in prompts))
        tokens_out: list[list[int]] = [[] for _ in range(n)]
        finish_out = ["length"] * n
        schedule = self.continuous(settings, bucket=pick_bucket(max(used), self.buckets), chunk_steps=chunk_steps)

        def finished(i: int, tokens: list[int], finish: str) -> None:
            tokens_out[i], finish_out[i] = tokens, finish

        rows = slot_rows(prompts, limits, settings.seed, row_ids, finished, progress)
        schedule.add(rows[i] for i in sorted(range(n), key=lambda i: used[i]))
        while schedule.step():
            pass
        self.timings.append(schedule.timing())
        return GenerationOutput(tokens_out, finish_out, list(used), list(truncated))

    def fit(self, prompt: Sequence[int]) -> tuple[int, bool]:
        """(tokens of the prompt used, whether it lost its beginning): prompts longer than the
        largest bucket keep their end."""
        return min(len(prompt), self.buckets[-1]), len(prompt) > self.buckets[-1]

    def _run_batch(self, tokens: np.ndarray, lengths: np.ndarray, done: np.ndarray, ids: np.ndarray,
                   settings: SamplingSettings, limits: np.ndarray):
        bsz, bucket = tokens.shape
        n_new = settings.max_new_tokens
        history = np.concatenate([tokens, np.full((bsz, n_new), settings.pad_id, np.int32)], axis=1)
        keys = np.asarray(row_keys(settings.seed, ids.astype(np.uint32)))
        first_segment_end = (self.segment_ends(n_new) or [1])[0]
        t0 = time.perf_counter()
        logits, cache = self._prefill(self.params, self._put(tokens), self._put(lengths),
                                      max_len=self.cache_length(bucket, first_segment_end))
        jax.block_until_ready(logits)
        t1 = time.perf_counter()
        out = self._decode(self.params, cache, logits, self._put(history), self._put(lengths), self._put(done),
                           self._put(keys), self._put(limits), settings=settings.without_seed())
        generated, count, finish, steps = jax.device_get(out)
        t2 = time.perf_counter()
        timing = BatchTiming(bucket=bucket, rows=bsz, prefill_s=t1 - t0, decode_s=t2 - t1, steps=int(steps),
                             new_tokens=0)
        return np.asarray(generated), np.asarray(count), np.asarray(finish), timing

    # ----------------------------------------------------------------- scoring

    def _score_impl(self, params, tokens, segments, target_mask):
        self.trace_counts[("score",) + tuple(tokens.shape)] += 1
        chunk = chunk_positions(tokens.shape[0], self.cfg.vocab_size, self.score_logits_bytes)
        with self._sharding_context():
            return score_rows(nnx.merge(self._graphdef, params), tokens, segments, target_mask, chunk)

    def score(self, prompts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]]) -> ScoreOutput:
        return score_batches(self, prompts, continuations)
