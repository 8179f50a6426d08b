"""The KV cache's prefix reads (model.hidden's read_len, write_slots' limit): continuous batching
decodes rows of a short prompt bucket in slots sized for the longest one, reading and writing only
the prefix those rows use, in place. Exact against the same step on a cache cut to that prefix."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from test_generate import cached_model, random_prompts, tiny_cfg, tiny_params
from xinst_jax.model.kv_cache import KVCache, write_slots


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("limit", [None, 6])
def test_per_row_write_lands_at_each_rows_slot_only(dtype, limit):
    """One new slot per row at its own index (the bfloat16 one through XLA:CPU's select path):
    exactly those slots change, whatever the limit."""
    rng = np.random.default_rng(0)
    buffer = jnp.asarray(rng.normal(size=(3, 2, 10, 4)), dtype)
    new = jnp.asarray(rng.normal(size=(3, 2, 1, 4)), dtype)
    index = jnp.asarray([0, 5, 2], jnp.int32)
    want = np.array(buffer).copy()
    for row, slot in enumerate([0, 5, 2]):
        want[row, :, slot] = np.array(new)[row, :, 0]
    got = jax.jit(write_slots, static_argnums=3)(buffer, new, index, limit)
    assert got.dtype == dtype and got.shape == buffer.shape
    np.testing.assert_array_equal(np.array(got), want)


def test_reading_a_prefix_equals_a_cache_of_that_length():
    """Rows at different steps (index [B]) decode one token through a 24-slot cache whose last 8
    slots hold other data, reading 16: the logits, and the first 16 slots written, equal the same
    step on the cache cut to 16 slots; the slots past the prefix are untouched and unread."""
    cfg = tiny_cfg()
    params = tiny_params(cfg, seed=4)
    model, cache = cached_model(params, cfg, batch=3, length=24)
    rng = np.random.default_rng(1)
    fill = lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype)  # noqa: E731
    filled = KVCache([fill(x) for x in cache.k], [fill(x) for x in cache.v],
                     jnp.asarray((np.arange(24)[None] < np.array([[9], [14], [3]])).astype(np.int32)),
                     jnp.asarray([9, 14, 3], jnp.int32))
    tokens = jnp.asarray(random_prompts(cfg.vocab_size, [1, 1, 1], seed=2), jnp.int32)
    positions = jnp.asarray([[9], [14], [3]], jnp.int32)
    ones = jnp.ones_like(tokens)

    @jax.jit
    def step_prefix(cache):
        h, cache = model.hidden(tokens, positions, ones, cache, read_len=16)
        return model.logits(h), cache

    @jax.jit
    def step_cut(cache):
        h, cache = model.hidden(tokens, positions, ones, cache)
        return model.logits(h), cache

    cut = KVCache([x[:, :, :16] for x in filled.k], [x[:, :, :16] for x in filled.v], filled.segment_ids[:, :16],
                  filled.index)
    logits, out = step_prefix(filled)
    want_logits, want = step_cut(cut)
    np.testing.assert_array_equal(np.array(logits), np.array(want_logits))
    for got, ref, before in zip(out.k + out.v, want.k + want.v, filled.k + filled.v):
        np.testing.assert_array_equal(np.array(got[:, :, :16]), np.array(ref))
        np.testing.assert_array_equal(np.array(got[:, :, 16:]), np.array(before[:, :, 16:]))
    np.testing.assert_array_equal(np.array(out.index), [10, 15, 4])
    # and the prefix is all attention reads: no matmul operand spans the 24 slots
    dots = [eqn for eqn in jax.make_jaxpr(step_prefix)(filled).eqns[0].params["jaxpr"].eqns
            if eqn.primitive.name == "dot_general"]
    spans = [v.aval.shape for eqn in dots for v in eqn.invars if 16 in v.aval.shape or 24 in v.aval.shape]
    assert spans and all(24 not in shape for shape in spans), spans
