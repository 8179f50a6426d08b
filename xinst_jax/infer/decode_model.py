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
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from xinst_jax.config import ModelConfig
from xinst_jax.model.attention import NEG_INF
from xinst_jax.model.llama import DTYPES, logical_axes, rms_norm
from xinst_jax.model.rope import apply_rope, inverse_frequencies, rope_cos_sin

F32 = jnp.float32


# --------------------------------------------------------------------------- params


# Matrices stored [out, in] ("transposed", torch's nn.Linear layout) instead of our [in, out]. With
# batch-8 decoding every matmul is [8, in] x weight, and XLA:CPU's dot kernels read [out, in] faster:
# a SmolLM2-135M decode step went 133 -> 116 ms in float32 and 71 -> 61 ms in bfloat16 (same run;
# benchmarks/generate_bench.py). On TPU/GPU XLA picks the layouts itself; the choice is harmless.
ALL_MATRICES = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down", "lm_head")

# Attention projections with (heads, head_dim) flattened into one axis: then no dot can pick
# another order of the two contracted axes, which makes XLA transpose (copy) the weight per step.
_FLAT_SHAPES = {
    "wq": lambda c: (c.embed_dim, c.num_heads * c.head_dim),
    "wk": lambda c: (c.embed_dim, c.num_kv_heads * c.head_dim),
    "wv": lambda c: (c.embed_dim, c.num_kv_heads * c.head_dim),
    "wo": lambda c: (c.num_heads * c.head_dim, c.embed_dim),
}
_FLAT_AXES = {"wq": ("embed", "heads"), "wk": ("embed", "kv_heads"), "wv": ("embed", "kv_heads"),
              "wo": ("heads", "embed")}
T_SUFFIX = "_t"  # a matrix stored [out, in] is keyed name + "_t"


def prepare_params(params: dict, cfg: ModelConfig, weight_dtype: str | None = None,
                   transposed: tuple[str, ...] | None = None) -> dict:
    """Stacked training params -> inference layout {embed, final_norm, lm_head?, layers: [per layer]}.

    Matrices (and the embedding) are cast to `weight_dtype` (default: the params' own dtype);
    norm scales stay as they are. Matrices named in `transposed` (default: all of them) are stored
    [out, in] under `name_t`. Pure: jit it with `out_shardings=` prepared shardings.
    """
    wd = DTYPES[weight_dtype] if weight_dtype else None
    if transposed is None:
        transposed = ALL_MATRICES

    def cast(x):
        return x.astype(wd) if (wd is not None and x.ndim >= 2) else x

    def place(group: dict, name: str, value):
        if name in transposed:
            group[name + T_SUFFIX] = value.T
        else:
            group[name] = value

    out = {"embed": {"embedding": cast(params["embed"]["embedding"])},
           "final_norm": {"scale": params["final_norm"]["scale"]}}
    if "lm_head" in params:
        out["lm_head"] = {}
        place(out["lm_head"], "lm_head", cast(params["lm_head"]["kernel"]))
    layers = []
    for i in range(cfg.num_layers):
        layer = jax.tree.map(lambda x, i=i: cast(x[i]), params["layers"])
        attn, mlp = {}, {}
        for name, value in layer["attn"].items():
            place(attn, name, value.reshape(_FLAT_SHAPES[name](cfg)))
        for name, value in layer["mlp"].items():
            place(mlp, name, value)
        layer["attn"], layer["mlp"] = attn, mlp
        layers.append(layer)
    out["layers"] = layers
    return out


def prepared_logical_axes(cfg: ModelConfig, prepared: Any) -> dict:
    """Logical axes for a tree made by `prepare_params` (its keys say which matrices are transposed)."""
    axes = logical_axes(cfg)
    per_layer = jax.tree.map(lambda a: a[1:], axes["layers"], is_leaf=lambda x: isinstance(x, tuple))
    per_layer["attn"] = dict(_FLAT_AXES)

    def resolve(group_axes: dict, group: dict) -> dict:
        out = {}
        for key in group:
            base = key[:-len(T_SUFFIX)] if key.endswith(T_SUFFIX) else key
            a = group_axes[base]
            out[key] = tuple(reversed(a)) if key.endswith(T_SUFFIX) else a
        return out

    result = {"embed": axes["embed"], "final_norm": axes["final_norm"]}
    if "lm_head" in prepared:
        result["lm_head"] = resolve({"lm_head": axes["lm_head"]["kernel"]}, prepared["lm_head"])
    result["layers"] = [{"attn_norm": per_layer["attn_norm"], "mlp_norm": per_layer["mlp_norm"],
                         "attn": resolve(per_layer["attn"], lp["attn"]), "mlp": resolve(per_layer["mlp"], lp["mlp"])}
                        for lp in prepared["layers"]]
    return result


def cache_logical_axes() -> tuple[str, ...]:
    return ("batch", "kv_heads", "length", "head_dim")


def init_decode_cache(cfg: ModelConfig, batch: int, max_len: int, kv_dtype: str | None = None) -> dict:
    dt = DTYPES[kv_dtype] if kv_dtype else F32
    shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)  # the layout both attention dots read as is
    return {"k": [jnp.zeros(shape, dt) for _ in range(cfg.num_layers)],
            "v": [jnp.zeros(shape, dt) for _ in range(cfg.num_layers)]}


# --------------------------------------------------------------------------- layers


def _dot(spec: str, x: jnp.ndarray, w: jnp.ndarray) -> jnp.ndarray:
    """Matmul in the weight's dtype, accumulated and returned in float32."""
    return jnp.einsum(spec, x.astype(w.dtype), w, preferred_element_type=F32)


def _proj(x: jnp.ndarray, group: dict, name: str) -> jnp.ndarray:
    """x [B, T, in] times the matrix `name` of `group`, stored [in, out] or [out, in] (`name_t`)."""
    if name in group:
        return _dot("bti,io->bto", x, group[name])
    return _dot("bti,oi->bto", x, group[name + T_SUFFIX])


def _attention(q, k, v, mask):
    """q [B, T, H, D] f32, k/v [B, KV, S, D] (cache dtype), mask [B, T, S] -> [B, T, H, D] f32.

    Query head h uses KV head h // (H / KV), as HF's repeat_kv. With k/v stored [B, KV, S, D]
    both dots read the cache in place (a [B, S, KV, D] cache is transposed, i.e. copied whole,
    by XLA on every step)."""
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
           attend_cache: bool = True):
    """One decoder layer. With a cache, the new keys/values are written at slot `start`; attention
    then covers the whole cache (`attend_cache`, decode) or only the new tokens (prefill into an
    empty cache)."""
    x = rms_norm(h, lp["attn_norm"]["scale"], cfg.norm_eps)
    p = lp["attn"]
    b, t, _ = x.shape
    nh, kv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    q = _proj(x, p, "wq").reshape(b, t, nh, d)
    k = _proj(x, p, "wk").reshape(b, t, kv, d)
    v = _proj(x, p, "wv").reshape(b, t, kv, d)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, KV, T, D]
    if k_cache is not None:
        k_cache = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, 0, start, 0))
        v_cache = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, 0, start, 0))
        if attend_cache:
            k, v = k_cache, v_cache
        else:
            k, v = k.astype(k_cache.dtype), v.astype(v_cache.dtype)
    out = _attention(q, k, v, mask)
    h = h + _proj(out.reshape(b, t, nh * d), p, "wo")
    x = rms_norm(h, lp["mlp_norm"]["scale"], cfg.norm_eps)
    m = lp["mlp"]
    gate = _proj(x, m, "w_gate")
    up = _proj(x, m, "w_up")
    h = h + _proj(jax.nn.silu(gate) * up, m, "w_down")
    return h, k_cache, v_cache


def _embed(prepared, tokens):
    return jnp.take(prepared["embed"]["embedding"], tokens, axis=0).astype(F32)


def _logits(prepared, h, cfg: ModelConfig):
    h = rms_norm(h, prepared["final_norm"]["scale"], cfg.norm_eps)
    if cfg.tie_embeddings:
        return _dot("bte,ve->btv", h, prepared["embed"]["embedding"])
    return _proj(h, prepared["lm_head"], "lm_head")


def _stack(prepared, h, positions, mask, cfg: ModelConfig, cache=None, start=None, attend_cache=True):
    cos, sin = rope_cos_sin(positions, inverse_frequencies(cfg))
    ks, vs = [], []
    for i, lp in enumerate(prepared["layers"]):
        kc = vc = None
        if cache is not None:
            kc, vc = cache["k"][i], cache["v"][i]
        h, kc, vc = _layer(h, lp, cos, sin, mask, cfg, kc, vc, start, attend_cache)
        ks.append(kc)
        vs.append(vc)
    return h, (None if cache is None else {"k": ks, "v": vs})


# --------------------------------------------------------------------------- entry points


def prefill_step(prepared, tokens, first, cache, cfg: ModelConfig):
    """Left-padded prompts tokens [B, P] (row b real from slot first[b]) written at slots [0, P).
    Returns (logits of slot P-1 [B, V] float32, cache)."""
    b, p = tokens.shape
    slot = jnp.arange(p, dtype=jnp.int32)[None, :]
    positions = jnp.maximum(slot - first[:, None], 0)
    real = slot >= first[:, None]  # [B, P]
    mask = real[:, :, None] & real[:, None, :] & (slot[:, None, :] <= slot[:, :, None])
    h, cache = _stack(prepared, _embed(prepared, tokens), positions, mask, cfg, cache, jnp.int32(0),
                      attend_cache=False)
    return _logits(prepared, h[:, -1:], cfg)[:, 0], cache


def decode_step(prepared, tokens, positions, first, cache, slot, cfg: ModelConfig):
    """tokens [B, 1] at cache slot `slot` (positions [B, 1]) -> (logits [B, V] float32, cache).
    Row b attends to slots [first[b], slot]."""
    s = cache["k"][0].shape[2]
    kv_slot = jnp.arange(s, dtype=jnp.int32)[None, :]
    mask = ((kv_slot >= first[:, None]) & (kv_slot <= slot))[:, None, :]
    h, cache = _stack(prepared, _embed(prepared, tokens), positions, mask, cfg, cache, slot)
    return _logits(prepared, h, cfg)[:, 0], cache


def full_logits(prepared, tokens, segments, cfg: ModelConfig):
    """Right-padded rows tokens [B, T] (segment 0 = padding), positions 0.. per row ->
    logits [B, T, V] float32 (scoring)."""
    b, t = tokens.shape
    slot = jnp.arange(t, dtype=jnp.int32)[None, :]
    positions = jnp.broadcast_to(slot, (b, t))
    real = segments != 0
    mask = real[:, :, None] & real[:, None, :] & (slot[:, None, :] <= slot[:, :, None])
    h, _ = _stack(prepared, _embed(prepared, tokens), positions, mask, cfg)
    return _logits(prepared, h, cfg)


def param_bytes(prepared: Any) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(prepared))
