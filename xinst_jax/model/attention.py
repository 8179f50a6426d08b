"""Grouped-query attention over packed rows or a KV cache: causal, never crossing segments."""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -1e30  # finite: a fully masked (padding) row softmaxes to uniform, never NaN


def segment_causal_mask(q_segment_ids: jnp.ndarray, kv_segment_ids: jnp.ndarray,
                        q_index: jnp.ndarray, kv_index: jnp.ndarray) -> jnp.ndarray:
    """[B, Tq, Tk] bool: same non-padding segment and key not after query.

    Indices are absolute slots in the row (or in the KV cache), so a query attends only to
    earlier tokens of its own document even when several documents share a row.
    """
    same = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    real = (q_segment_ids != 0)[:, :, None]
    causal = kv_index[:, None, :] <= q_index[:, :, None]
    return same & real & causal


def gqa_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
    """q [B, T, H, D], k/v [B, KV, S, D] (the KV cache's layout), mask [B, T, S] -> [B, T, H, D].

    Query head h uses KV head h // (H / KV), as HF's repeat_kv does, by grouping the queries of
    one KV head into the rows of its matmul ([B, KV, G*T, D]) instead of repeating keys and
    values. Scores, softmax and the probabilities' accumulation are float32 whatever the inputs.
    """
    b, t, h, d = q.shape
    dtype = q.dtype
    kv = k.shape[1]
    g = h // kv
    q = q.reshape(b, t, kv, g, d).transpose(0, 2, 3, 1, 4).reshape(b, kv, g * t, d).astype(k.dtype)
    scores = jnp.einsum("bkqd,bksd->bkqs", q, k, preferred_element_type=jnp.float32) * (d ** -0.5)
    mask = jnp.broadcast_to(mask[:, None, None], (b, 1, g, t, mask.shape[-1])).reshape(b, 1, g * t, -1)
    probs = jax.nn.softmax(jnp.where(mask, scores, NEG_INF), axis=-1)
    out = jnp.einsum("bkqs,bksd->bkqd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(b, kv, g, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, h, d).astype(dtype)
