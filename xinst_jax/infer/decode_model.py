"""The Llama forward laid out for inference: prefill, one decode step, and full-sequence scoring.

Same math as `xinst_jax.model.llama` (its `rms_norm`, RoPE and parameter tree; tests check the
float32 logits against `llama.forward` and against transformers), arranged for decode speed on
memory-bound hardware:

- `prepare_params` unstacks the `layers` axis into a list of per-layer trees, once. A decode step
  then reads each weight where it lies; slicing a stacked [layers, ...] array inside the step
  (scan or unrolled) copies every weight matrix on every step.
- Weights may be kept in bfloat16 (`weight_dtype`): matmuls take bfloat16 inputs and accumulate
  in float32 (`preferred_element_type`), which on CPU is the fast path and halves the bytes read
  per step; the residual stream, norms, RoPE, softmax and logits stay float32.
- The KV cache is a list of per-layer [batch, kv_heads, length, head_dim] buffers (optionally
  bfloat16) that the decode loop updates in place; which slots a row attends to comes from the
  row's first real slot (left padding) and the current slot, so no segment array is carried.
- A decode step's mask is a `SlotSpan` (row b attends to slots [first[b], slot]); on one CPU device
  the engine runs that attention as `native_kernels.decode_attention`, which reads only the span.
- Prefill is ragged (`RaggedPrompts`): the token-wise work (projections, MLP, norms, RoPE) runs
  on the prompts' tokens packed end to end, about sum(lengths) tokens instead of B x bucket;
  only attention runs on the left-padded [B, bucket] layout, which is also the cache's.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from xinst_jax.config import ModelConfig
from xinst_jax.infer import native_kernels
from xinst_jax.model.attention import NEG_INF
from xinst_jax.model.llama import DTYPES, logical_axes, rms_norm
from xinst_jax.model.rope import apply_rope, inverse_frequencies, rope_table

F32 = jnp.float32


# --------------------------------------------------------------------------- params


def prepare_params(params: dict, cfg: ModelConfig, weight_dtype: str | None = None) -> dict:
    """Stacked training params -> inference layout {embed, final_norm, lm_head?, layers: [per layer]}.

    Per layer: `wqkv` [kv_heads, group + 2, head_dim, embed] (for each KV head: its `group` query
    heads, then its key, then its value), `wo` [embed, heads, head_dim], `w_gate_up` [mlp, 2, embed],
    `w_down` [embed, mlp]; `lm_head` [vocab, embed]. Every matrix is [out..., in...]: see `_matmul`.
    Fusing q/k/v and gate/up makes two big matmuls of five small ones (fewer, larger kernels on CPU);
    grouping by KV head and interleaving gate/up keeps each tensor-parallel shard self-contained.
    Matrices (and the embedding) are cast to `weight_dtype` (default: the params' own dtype); norm
    scales stay as they are. Pure: jit it with `out_shardings=` prepared shardings.
    """
    wd = DTYPES[weight_dtype] if weight_dtype else None
    kv, g, d, e = cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads, cfg.head_dim, cfg.embed_dim

    def cast(x):
        return x.astype(wd) if (wd is not None and x.ndim >= 2) else x

    out = {"embed": {"embedding": cast(params["embed"]["embedding"])},
           "final_norm": {"scale": params["final_norm"]["scale"]}}
    if "lm_head" in params:
        out["lm_head"] = {"lm_head": cast(params["lm_head"]["kernel"]).T}
    layers = []
    for i in range(cfg.num_layers):
        lp = jax.tree.map(lambda x, i=i: cast(x[i]), params["layers"])
        a, m = lp["attn"], lp["mlp"]
        q = a["wq"].reshape(e, kv, g, d)
        k, v = a["wk"].reshape(e, kv, 1, d), a["wv"].reshape(e, kv, 1, d)
        wqkv = jnp.concatenate([q, k, v], axis=2).transpose(1, 2, 3, 0)  # [KV, G+2, D, E]
        layers.append({
            "attn_norm": lp["attn_norm"], "mlp_norm": lp["mlp_norm"],
            "attn": {"wqkv": wqkv, "wo": a["wo"].transpose(2, 0, 1)},
            "mlp": {"w_gate_up": jnp.stack([m["w_gate"].T, m["w_up"].T], axis=1), "w_down": m["w_down"].T},
        })
    out["layers"] = layers
    return out


_LAYER_AXES = {
    "attn_norm": {"scale": ("norm",)}, "mlp_norm": {"scale": ("norm",)},
    "attn": {"wqkv": ("kv_heads", None, "head_dim", "embed"), "wo": ("embed", "heads", "head_dim")},
    "mlp": {"w_gate_up": ("mlp", None, "embed"), "w_down": ("embed", "mlp")},
}


def prepared_logical_axes(cfg: ModelConfig, prepared: Any) -> dict:
    """Logical axes for a tree made by `prepare_params`."""
    axes = logical_axes(cfg)
    result = {"embed": axes["embed"], "final_norm": axes["final_norm"],
              "layers": [_LAYER_AXES for _ in prepared["layers"]]}
    if "lm_head" in prepared:
        result["lm_head"] = {"lm_head": ("vocab", "embed")}
    return result


def cache_logical_axes() -> tuple[str, ...]:
    return ("batch", "kv_heads", "length", "head_dim")


def init_decode_cache(cfg: ModelConfig, batch: int, max_len: int, kv_dtype: str | None = None) -> dict:
    dt = DTYPES[kv_dtype] if kv_dtype else F32
    shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)  # the layout both attention dots read as is
    return {"k": [jnp.zeros(shape, dt) for _ in range(cfg.num_layers)],
            "v": [jnp.zeros(shape, dt) for _ in range(cfg.num_layers)]}


# --------------------------------------------------------------------------- ragged prefill


class RaggedPrompts(NamedTuple):
    """A batch of B left-padded prompts (bucket P) with their tokens packed into R rows of T.

    Rows b*B/R .. (b+1)*B/R - 1 of the batch are packed, in order, into pack b (R = the batch's
    data-parallel shards, so every shard packs and gathers its own rows). A padded row's slots
    are `slots = B/R * P` per pack, row-major. Built on the host by `pack_prompts`."""

    tokens: Any  # [R, T] int32: prompts end to end, then padding
    positions: Any  # [R, T] int32: each token's position within its prompt
    token_of_slot: Any  # [R, slots] int32: the packed index of the token at each slot (pad slot: 0)
    slot_of_token: Any  # [R, T] int32: the slot of each packed token (packing padding: 0)
    last: Any  # [R, B/R] int32: the packed index of each prompt's last token (empty row: 0)

    @property
    def batch(self) -> int:  # B
        return self.last.shape[0] * self.last.shape[1]

    @property
    def bucket(self) -> int:  # P
        return self.token_of_slot.shape[1] // self.last.shape[1]


def packed_length(total: int, cap: int) -> int:
    """Tokens per pack for `total` real ones: rounded up to 4 sizes per octave (at most 25% padding,
    a few compiles per prompt bucket), and never more than the padded layout's `cap`."""
    if total <= 16:
        return min(16, cap)
    step = 2 ** (int(math.log2(total)) - 2)
    return min(-(-total // step) * step, cap)


def pack_prompts(tokens: np.ndarray, lengths: np.ndarray, packs: int, pad_id: int) -> RaggedPrompts:
    """Left-padded prompts tokens [B, P] (row b's last lengths[b] tokens are real) -> the ragged
    layout, in numpy. `packs` must divide B."""
    b, p = tokens.shape
    if b % packs:
        raise ValueError(f"{b} rows do not split into {packs} packs")
    rows = b // packs
    lengths = np.asarray(lengths, np.int64)
    totals = lengths.reshape(packs, rows).sum(axis=1)
    t = packed_length(int(totals.max()), rows * p)
    packed = np.full((packs, t), pad_id, np.int32)
    positions = np.zeros((packs, t), np.int32)
    token_of_slot = np.zeros((packs, rows * p), np.int32)
    slot_of_token = np.zeros((packs, t), np.int32)
    last = np.zeros((packs, rows), np.int32)
    for r in range(packs):
        at = 0
        for j in range(rows):
            n = int(lengths[r * rows + j])
            if n == 0:
                continue
            slots = j * p + np.arange(p - n, p)
            packed[r, at:at + n] = tokens[r * rows + j, p - n:]
            positions[r, at:at + n] = np.arange(n)
            token_of_slot[r, slots] = np.arange(at, at + n)
            slot_of_token[r, at:at + n] = slots
            last[r, j] = at + n - 1
            at += n
    return RaggedPrompts(packed, positions, token_of_slot, slot_of_token, last)


def _gather(x: jnp.ndarray, index: jnp.ndarray) -> jnp.ndarray:
    """x [R, N, ...], index [R, M] -> [R, M, ...]: per pack, so each data shard gathers locally."""
    return jax.vmap(lambda a, i: jnp.take(a, i, axis=0))(x, index)


def _packed_to_rows(x: jnp.ndarray, ragged: RaggedPrompts) -> jnp.ndarray:
    """[R, T, ...] -> [B, P, ...] (pad slots hold some real token's values; attention masks them)."""
    return _gather(x, ragged.token_of_slot).reshape(ragged.batch, ragged.bucket, *x.shape[2:])


def _rows_to_packed(x: jnp.ndarray, ragged: RaggedPrompts) -> jnp.ndarray:
    """[B, P, ...] -> [R, T, ...]."""
    packs = ragged.tokens.shape[0]
    return _gather(x.reshape(packs, -1, *x.shape[2:]), ragged.slot_of_token)


# --------------------------------------------------------------------------- layers


def _matmul(w: jnp.ndarray, x: jnp.ndarray, contract: int = 1) -> jnp.ndarray:
    """w [*out, *in] times x [B, T, *in] (the last `contract` axes) -> [B, T, *out] float32.

    The weight is the dot's left operand with its contracted axes last: the form XLA:CPU's dot
    kernels take as is. As the right operand, XLA adds a transpose that it hoists out of the
    decode while-loop, i.e. it copies every weight to [in, out] per generate call and then runs the
    slower [in, out] kernels on every step (bf16 SmolLM2 decode: 40 -> 27 ms/step). Matmul inputs
    are in the weight's dtype, accumulated in float32.
    """
    x = x.astype(w.dtype)
    dims = (tuple(range(w.ndim - contract, w.ndim)), tuple(range(x.ndim - contract, x.ndim)))
    y = jax.lax.dot_general(w, x, (dims, ((), ())), preferred_element_type=F32)  # [*out, B, T]
    n_out = w.ndim - contract
    return jnp.moveaxis(y, (n_out, n_out + 1), (0, 1))


def _write_cache(cache: jnp.ndarray, new: jnp.ndarray, start) -> jnp.ndarray:
    """cache [B, KV, S, D] with new [B, KV, T, D] written at slot `start`, in place.

    A 16-bit float cache is updated through its uint16 bits: XLA:CPU widens a bfloat16
    dynamic-update-slice to float32, i.e. converts the whole cache there and back on every step."""
    new = new.astype(cache.dtype)
    if cache.dtype.itemsize != 2 or not jnp.issubdtype(cache.dtype, jnp.floating):
        return jax.lax.dynamic_update_slice(cache, new, (0, 0, start, 0))
    bits = jax.lax.dynamic_update_slice(jax.lax.bitcast_convert_type(cache, jnp.uint16),
                                        jax.lax.bitcast_convert_type(new, jnp.uint16), (0, 0, start, 0))
    return jax.lax.bitcast_convert_type(bits, cache.dtype)


class SlotSpan(NamedTuple):
    """A decode step's mask in short: row b attends to cache slots [first[b], last]."""
    first: jnp.ndarray  # [B] int32
    last: jnp.ndarray  # [] int32
    native: bool = False  # run native_kernels.decode_attention (skips the other slots) instead of XLA's dots

    def mask(self, slots: int) -> jnp.ndarray:  # [B, 1, slots]
        slot = jnp.arange(slots, dtype=jnp.int32)[None, :]
        return ((slot >= self.first[:, None]) & (slot <= self.last))[:, None, :]


def _attention(q, k, v, mask):
    """q [B, T, H, D] f32, k/v [B, KV, S, D] (cache dtype), mask [B, T, S] or a SlotSpan ->
    [B, T, H, D] f32.

    Query head h uses KV head h // (H / KV), as HF's repeat_kv. With k/v stored [B, KV, S, D]
    both dots read the cache in place (a [B, S, KV, D] cache is transposed, i.e. copied whole,
    by XLA on every step)."""
    if isinstance(mask, SlotSpan):
        if mask.native:
            return native_kernels.decode_attention(q, k, v, mask.first, mask.last)
        mask = mask.mask(k.shape[2])
    b, t, h, d = q.shape
    kv = k.shape[1]
    g = h // kv
    # [B, KV, G*T, D]: one (batch, kv-head) pair per matmul, rows = its query heads x tokens
    q = q.reshape(b, t, kv, g, d).transpose(0, 2, 3, 1, 4).reshape(b, kv, g * t, d).astype(k.dtype)
    scores = jnp.einsum("bkqd,bksd->bkqs", q, k, preferred_element_type=F32) * (d ** -0.5)
    mask = jnp.broadcast_to(mask[:, None, None, :, :], (b, 1, g, t, mask.shape[-1])).reshape(b, 1, g * t, -1)
    scores = jnp.where(mask, scores, NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bkqs,bksd->bkqd", probs.astype(v.dtype), v, preferred_element_type=F32)
    return out.reshape(b, kv, g, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


def _layer(h, lp, cos, sin, mask, cfg: ModelConfig, k_cache=None, v_cache=None, start=None,
           attend_cache: bool = True, ragged: RaggedPrompts | None = None):
    """One decoder layer. With a cache, the new keys/values are written at slot `start`; attention
    then covers the whole cache (`attend_cache`, decode) or only the new tokens (prefill into an
    empty cache). With `ragged`, h holds packed prompts and attention runs on their rows."""
    b, t, _ = h.shape
    nh, kv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    g = nh // kv
    x = rms_norm(h, lp["attn_norm"]["scale"], cfg.norm_eps)
    qkv = _matmul(lp["attn"]["wqkv"], x)  # [B, T, KV, G+2, D]
    q = qkv[:, :, :, :g].reshape(b, t, nh, d)
    k, v = qkv[:, :, :, g], qkv[:, :, :, g + 1]  # [B, T, KV, D]
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if ragged is not None:
        q, k, v = (_packed_to_rows(y, ragged) for y in (q, k, v))
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, KV, T, D]
    if k_cache is not None:
        k_cache, v_cache = _write_cache(k_cache, k, start), _write_cache(v_cache, v, start)
        if attend_cache:
            k, v = k_cache, v_cache
        else:
            k, v = k.astype(k_cache.dtype), v.astype(v_cache.dtype)
    out = _attention(q, k, v, mask)
    if ragged is not None:
        out = _rows_to_packed(out, ragged)
    h = h + _matmul(lp["attn"]["wo"], out, contract=2)
    x = rms_norm(h, lp["mlp_norm"]["scale"], cfg.norm_eps)
    gate_up = _matmul(lp["mlp"]["w_gate_up"], x)  # [B, T, M, 2]
    h = h + _matmul(lp["mlp"]["w_down"], jax.nn.silu(gate_up[..., 0]) * gate_up[..., 1])
    return h, k_cache, v_cache


def _embed(prepared, tokens):
    return jnp.take(prepared["embed"]["embedding"], tokens, axis=0).astype(F32)


def logits(prepared, h, cfg: ModelConfig):
    """Hidden states [B, T, embed] -> logits [B, T, vocab] float32 (final norm, then lm_head)."""
    h = rms_norm(h, prepared["final_norm"]["scale"], cfg.norm_eps)
    w = prepared["embed"]["embedding"] if cfg.tie_embeddings else prepared["lm_head"]["lm_head"]
    return _matmul(w, h)  # [vocab, embed] either way


def _stack(prepared, h, positions, max_position: int, mask, cfg: ModelConfig, cache=None, start=None,
           attend_cache=True, ragged: RaggedPrompts | None = None):
    """The decoder layers over h [B, T, embed]; `positions` [B, T] are all below `max_position`."""
    # Looked up in a table made at trace time: computed in the graph, XLA fuses sin/cos into every
    # layer's RoPE and recomputes them there (SmolLM2 prefill: 20% of its time).
    cos, sin = (jnp.asarray(table)[positions] for table in rope_table(max_position, inverse_frequencies(cfg)))
    ks, vs = [], []
    for i, lp in enumerate(prepared["layers"]):
        kc = vc = None
        if cache is not None:
            kc, vc = cache["k"][i], cache["v"][i]
        h, kc, vc = _layer(h, lp, cos, sin, mask, cfg, kc, vc, start, attend_cache, ragged)
        ks.append(kc)
        vs.append(vc)
    return h, (None if cache is None else {"k": ks, "v": vs})


# --------------------------------------------------------------------------- entry points


def prefill_step(prepared, ragged: RaggedPrompts, first, cache, cfg: ModelConfig):
    """Prompts in the ragged layout (row b real from slot first[b] of its left-padded bucket P)
    written at slots [0, P). Returns (logits of each prompt's last token [B, V] float32, cache)."""
    b, p = ragged.batch, ragged.bucket
    slot = jnp.arange(p, dtype=jnp.int32)[None, :]
    real = slot >= first[:, None]  # [B, P]
    mask = real[:, :, None] & real[:, None, :] & (slot[:, None, :] <= slot[:, :, None])
    h, cache = _stack(prepared, _embed(prepared, ragged.tokens), ragged.positions, p, mask, cfg, cache, jnp.int32(0),
                      attend_cache=False, ragged=ragged)
    last = _gather(h, ragged.last).reshape(b, 1, -1)
    return logits(prepared, last, cfg)[:, 0], cache


def decode_step(prepared, tokens, positions, first, cache, slot, cfg: ModelConfig, native_attention: bool = False):
    """tokens [B, 1] at cache slot `slot` (positions [B, 1]) -> (logits [B, V] float32, cache).
    Row b attends to slots [first[b], slot]; `native_attention`: with the CPU kernel (call
    `native_kernels.available()` first)."""
    s = cache["k"][0].shape[2]
    span = SlotSpan(first, slot, native_attention)
    mask = span if native_attention else span.mask(s)  # built once here, not in each layer
    h, cache = _stack(prepared, _embed(prepared, tokens), positions, s, mask, cfg, cache, slot)  # position <= slot < s
    return logits(prepared, h, cfg)[:, 0], cache


def final_hidden(prepared, tokens, segments, cfg: ModelConfig):
    """Right-padded rows tokens [B, T] (segment 0 = padding), positions 0.. per row ->
    the last layer's hidden states [B, T, embed] float32 (before the final norm); `logits` of
    them give the next-token logits (scoring)."""
    b, t = tokens.shape
    slot = jnp.arange(t, dtype=jnp.int32)[None, :]
    positions = jnp.broadcast_to(slot, (b, t))
    real = segments != 0
    mask = real[:, :, None] & real[:, None, :] & (slot[:, None, :] <= slot[:, :, None])
    h, _ = _stack(prepared, _embed(prepared, tokens), positions, t, mask, cfg)
    return h


def param_bytes(prepared: Any) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(prepared))
