"""The KV cache: an input and an output of every decoder layer (prefill and decode modes).

Per layer, keys and values are [batch, kv_heads, length, head_dim]: the layout both attention
matmuls read in place (a [batch, length, kv_heads, head_dim] cache is transposed, i.e. copied
whole, on every decode step). Which slot holds which document is `segment_ids` ([batch, length],
0 = empty or padding), so left-padded prompts, packed prompts and rows that stop early all mask
the same way as packed training rows. The cache's logical axes (`CACHE_AXES`) are mapped to mesh
axes by `mesh.rules`, so it shards with the weights (kv heads over `tensor`, rows over the data
axes).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

CACHE_AXES = ("cache_batch", "cache_kv_heads", "cache_sequence", "cache_head_dim")
CACHE_SEGMENT_AXES = ("cache_batch", "cache_sequence")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    k: Any  # per-layer list of [B, KV, S, D], or one [layers, B, KV, S, D] array for scanned layers
    v: Any
    segment_ids: jax.Array  # [B, S] int32: the segment of the token in each slot (0: empty / padding)
    index: jax.Array  # [] int32: the slot the next token is written to; [B]: each row's own slot

    @property
    def length(self) -> int:
        return self.segment_ids.shape[1]


def init_cache(num_layers: int, batch: int, length: int, kv_heads: int, head_dim: int, dtype: Any,
               stacked: bool = False) -> KVCache:
    shape = (batch, kv_heads, length, head_dim)
    if stacked:
        k = jnp.zeros((num_layers,) + shape, dtype)
        v = jnp.zeros((num_layers,) + shape, dtype)
    else:
        k = [jnp.zeros(shape, dtype) for _ in range(num_layers)]
        v = [jnp.zeros(shape, dtype) for _ in range(num_layers)]
    return KVCache(k, v, jnp.zeros((batch, length), jnp.int32), jnp.zeros((), jnp.int32))


def grow_cache(cache: KVCache, length: int) -> KVCache:
    """The same cache with empty slots appended up to `length` (a copy; a no-op at that length)."""
    extra = length - cache.length
    if extra == 0:
        return cache
    if extra < 0:
        raise ValueError(f"cannot shrink a KV cache of {cache.length} slots to {length}")

    def pad(x):
        widths = [(0, 0)] * x.ndim
        widths[-2] = (0, extra)  # the sequence axis of [..., S, D]
        return jnp.pad(x, widths)

    return KVCache(jax.tree.map(pad, cache.k), jax.tree.map(pad, cache.v),
                   jnp.pad(cache.segment_ids, ((0, 0), (0, extra))), cache.index)


def write_slots(buffer: jax.Array, new: jax.Array, index: jax.Array, limit: int | None = None) -> jax.Array:
    """buffer [B, KV, S, D] with new [B, KV, T, D] written from slot `index`, in place: one slot
    for every row (index []) or each row's own (index [B]: a per-row update, i.e. a scatter).
    `limit`: every write lies below this slot (the prefix attention reads), so a write that
    touches whole slots touches only that prefix.

    On XLA:CPU 16-bit floats are written through their uint16 bits: it otherwise widens a
    bfloat16 dynamic-update-slice to float32, converting the whole cache there and back. Only
    there: on TPU the bit casts are two whole-cache copies per layer and step, and the write no
    longer lands in the donated buffer (launch/aot_check.py --mode decode measures it). A per-row
    write of one slot is a select over the cache there instead (a 16-bit scatter on XLA:CPU is
    ~6x slower than rewriting the whole cache)."""
    new = new.astype(buffer.dtype)

    def update(buffer, new, index):
        if index.ndim == 0:
            return jax.lax.dynamic_update_slice(buffer, new, (0, 0, index, 0))
        return jax.vmap(lambda b, n, i: jax.lax.dynamic_update_slice(b, n, (0, i, 0)))(buffer, new, index)

    def through_bits(buffer, new, index):
        if index.ndim == 1 and new.shape[2] == 1:
            prefix = buffer[:, :, :limit]
            hit = jnp.arange(prefix.shape[2], dtype=index.dtype)[None, :] == index[:, None]
            return jax.lax.dynamic_update_slice(buffer, jnp.where(hit[:, None, :, None], new, prefix), (0, 0, 0, 0))
        bits = update(jax.lax.bitcast_convert_type(buffer, jnp.uint16), jax.lax.bitcast_convert_type(new, jnp.uint16),
                      index)
        return jax.lax.bitcast_convert_type(bits, buffer.dtype)

    if buffer.dtype.itemsize != 2 or not jnp.issubdtype(buffer.dtype, jnp.floating):
        return update(buffer, new, index)
    return jax.lax.platform_dependent(buffer, new, index, cpu=through_bits, default=update)
