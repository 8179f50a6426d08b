"""The LLaMA family as pure functions over a params pytree (EasyLM-legible, jit/pjit friendly).

Params (layer weights stacked on a leading `layers` axis whether or not we scan, so the same
checkpoint serves both settings):

    embed/embedding          [vocab, embed]
    layers/attn_norm/scale   [layers, embed]
    layers/attn/wq           [layers, embed, heads, head_dim]
    layers/attn/wk, wv       [layers, embed, kv_heads, head_dim]
    layers/attn/wo           [layers, heads, head_dim, embed]
    layers/mlp_norm/scale    [layers, embed]
    layers/mlp/w_gate, w_up  [layers, embed, mlp]
    layers/mlp/w_down        [layers, mlp, embed]
    final_norm/scale         [embed]
    lm_head/kernel           [embed, vocab]       (absent with tied embeddings)

`logical_axes(cfg)` gives the same tree with a tuple of logical axis names per array; the
sharding rules map those names to mesh axes.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from xinst_jax.config import ModelConfig
from xinst_jax.model.attention import gqa_attention, segment_causal_mask
from xinst_jax.model.rope import apply_rope, inverse_frequencies, rope_cos_sin
from xinst_jax.sharding import constrain

Params = dict[str, Any]

BTE = ("activation_batch", "activation_length", "activation_embed")
BTHD = ("activation_batch", "activation_length", "activation_heads", None)
BTKD = ("activation_batch", "activation_length", "activation_kv_heads", None)
BTM = ("activation_batch", "activation_length", "activation_mlp")
BTV = ("activation_batch", "activation_length", "activation_vocab")

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def param_specs(cfg: ModelConfig) -> dict:
    """Tree of (shape, logical axes, init) for every parameter: the single source of layout."""
    L, E, H, KV, D, M, V = (cfg.num_layers, cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads,
                            cfg.head_dim, cfg.mlp_dim, cfg.vocab_size)
    specs = {
        "embed": {"embedding": ((V, E), ("vocab", "embed"), "normal")},
        "layers": {
            "attn_norm": {"scale": ((L, E), ("layers", "norm"), "ones")},
            "attn": {
                "wq": ((L, E, H, D), ("layers", "embed", "heads", "head_dim"), "normal"),
                "wk": ((L, E, KV, D), ("layers", "embed", "kv_heads", "head_dim"), "normal"),
                "wv": ((L, E, KV, D), ("layers", "embed", "kv_heads", "head_dim"), "normal"),
                "wo": ((L, H, D, E), ("layers", "heads", "head_dim", "embed"), "normal"),
            },
            "mlp_norm": {"scale": ((L, E), ("layers", "norm"), "ones")},
            "mlp": {
                "w_gate": ((L, E, M), ("layers", "embed", "mlp"), "normal"),
                "w_up": ((L, E, M), ("layers", "embed", "mlp"), "normal"),
                "w_down": ((L, M, E), ("layers", "mlp", "embed"), "normal"),
            },
        },
        "final_norm": {"scale": ((E,), ("norm",), "ones")},
    }
    if not cfg.tie_embeddings:
        specs["lm_head"] = {"kernel": ((E, V), ("embed", "vocab"), "normal")}
    return specs


def _is_spec(x: Any) -> bool:
    return isinstance(x, tuple) and len(x) == 3 and isinstance(x[0], tuple)


def logical_axes(cfg: ModelConfig) -> dict:
    return jax.tree.map(lambda s: s[1], param_specs(cfg), is_leaf=_is_spec)


def param_shapes(cfg: ModelConfig) -> dict:
    dtype = DTYPES[cfg.param_dtype]
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s[0], dtype), param_specs(cfg), is_leaf=_is_spec)


def init_params(cfg: ModelConfig, rng: jax.Array) -> Params:
    """Random init (normal(init_std) matrices, unit norms). Pure: jit it with out_shardings to
    create the params directly sharded."""
    specs = param_specs(cfg)
    leaves, treedef = jax.tree.flatten(specs, is_leaf=_is_spec)
    keys = jax.random.split(rng, len(leaves))
    dtype = DTYPES[cfg.param_dtype]

    def make(spec, key):
        shape, _, init = spec
        if init == "ones":
            return jnp.ones(shape, dtype)
        return (cfg.init_std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)

    return jax.tree.unflatten(treedef, [make(s, k) for s, k in zip(leaves, keys)])


def count_params(cfg: ModelConfig) -> int:
    total = 0
    for spec in jax.tree.leaves(param_specs(cfg), is_leaf=_is_spec):
        n = 1
        for d in spec[0]:
            n *= d
        total += n
    return total


# --------------------------------------------------------------------------- layers


def rms_norm(x: jnp.ndarray, scale: jnp.ndarray, eps: float) -> jnp.ndarray:
    """Normalise in float32 (as HF does), return in the input dtype."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return scale.astype(x.dtype) * y.astype(x.dtype)


def attention_block(x, p, cos, sin, mask, dtype):
    q = constrain(jnp.einsum("bte,ehd->bthd", x, p["wq"].astype(dtype)), BTHD)
    k = constrain(jnp.einsum("bte,ekd->btkd", x, p["wk"].astype(dtype)), BTKD)
    v = constrain(jnp.einsum("bte,ekd->btkd", x, p["wv"].astype(dtype)), BTKD)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    out = gqa_attention(q, k, v, mask)
    return constrain(jnp.einsum("bthd,hde->bte", out, p["wo"].astype(dtype)), BTE)


def mlp_block(x, p, dtype):
    gate = constrain(jnp.einsum("bte,em->btm", x, p["w_gate"].astype(dtype)), BTM)
    up = constrain(jnp.einsum("bte,em->btm", x, p["w_up"].astype(dtype)), BTM)
    return constrain(jnp.einsum("btm,me->bte", jax.nn.silu(gate) * up, p["w_down"].astype(dtype)), BTE)


def decoder_layer(h, layer, cos, sin, mask, cfg: ModelConfig):
    dtype = DTYPES[cfg.dtype]
    x = rms_norm(h, layer["attn_norm"]["scale"], cfg.norm_eps)
    h = h + attention_block(x, layer["attn"], cos, sin, mask, dtype)
    x = rms_norm(h, layer["mlp_norm"]["scale"], cfg.norm_eps)
    return h + mlp_block(x, layer["mlp"], dtype)


REMAT_POLICIES: dict[str, Callable | None] = {
    "dots_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "full": jax.checkpoint_policies.nothing_saveable,
}


def _maybe_remat(fn: Callable, remat: str) -> Callable:
    if remat == "none":
        return fn
    return jax.checkpoint(fn, policy=REMAT_POLICIES[remat], prevent_cse=True)


def _decoder_stack(params: Params, h, cos, sin, mask, cfg: ModelConfig):
    """All layers, scanned or unrolled over the stacked `layers` axis."""
    layer_fn = _maybe_remat(functools.partial(decoder_layer, cfg=cfg), cfg.remat)
    if cfg.scan_layers:
        h, _ = jax.lax.scan(lambda carry, layer: (layer_fn(carry, layer, cos, sin, mask), None), h,
                            params["layers"])
        return h
    for i in range(cfg.num_layers):
        h = layer_fn(h, jax.tree.map(functools.partial(lambda i, w: w[i], i), params["layers"]), cos, sin, mask)
    return h


def _embed(params: Params, tokens, cfg: ModelConfig):
    return constrain(jnp.take(params["embed"]["embedding"], tokens, axis=0).astype(DTYPES[cfg.dtype]), BTE)


def _logits(params: Params, h, cfg: ModelConfig):
    dtype = DTYPES[cfg.dtype]
    h = rms_norm(h, params["final_norm"]["scale"], cfg.norm_eps)
    if cfg.tie_embeddings:
        logits = jnp.einsum("bte,ve->btv", h, params["embed"]["embedding"].astype(dtype))
    else:
        logits = jnp.einsum("bte,ev->btv", h, params["lm_head"]["kernel"].astype(dtype))
    return constrain(logits.astype(jnp.float32), BTV)


def forward(params: Params, tokens: jnp.ndarray, positions: jnp.ndarray, segment_ids: jnp.ndarray,
            cfg: ModelConfig) -> jnp.ndarray:
    """tokens, positions, segment_ids [B, T] int32 -> logits [B, T, vocab] float32."""
    cos, sin = rope_cos_sin(positions, inverse_frequencies(cfg))
    index = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    mask = segment_causal_mask(segment_ids, segment_ids, index, index)
    h = _decoder_stack(params, _embed(params, tokens, cfg), cos, sin, mask, cfg)
    return _logits(params, h, cfg)


def default_positions_and_segments(tokens: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """One unpacked sequence per row: positions 0..T-1, segment 1 everywhere."""
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    return positions, jnp.ones((b, t), jnp.int32)
