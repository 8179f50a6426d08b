"""Grouped-query attention over packed rows: causal, never crossing segments."""

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
    """q [B, T, H, D], k/v [B, S, KV, D], mask [B, T, S] -> [B, T, H, D].

    Query heads are grouped onto their KV head by reshaping (head h uses KV head h // groups,
    as HF's repeat_kv does) instead of materialising repeated keys and values.
    """
    b, t, h, d = q.shape
    kv = k.shape[2]
    q = q.reshape(b, t, kv, h // kv, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = scores * (d ** -0.5)
    scores = jnp.where(mask[:, None, None, :, :], scores, NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, h, d)
