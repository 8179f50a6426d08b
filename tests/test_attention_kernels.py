"""The fused attention kernels against the XLA reference (model/attention.py).

Splash attention runs here in Pallas' interpret mode: the TPU kernel's own code, its block
skipping and segment-id masking, executed by the CPU. cuDNN needs a GPU: on CPU this checks our
wrapper around `jax.nn.dot_product_attention` (layout, GQA, segment mask, causality) through its
XLA implementation; benchmarks/mfu_gpu.py checks the cuDNN kernel itself against the reference on
a GPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xinst_jax.config import ConfigError, load_config
from xinst_jax.data.synthetic import SyntheticSource
from xinst_jax.model.attention import (choose_kernel, gqa_attention, sdpa_attention, segment_bias,
                                       segment_causal_mask, splash_attention)
from xinst_jax.train.program import build_train_program
from xinst_jax.sharding import activation_sharding, parse_rules
from xinst_jax.train.step import init_state, loss_and_grads

B, T, H, KV, D = 2, 256, 4, 2, 16


def packed_segments() -> jnp.ndarray:
    """Row 0: three documents then padding; row 1: two documents filling the row."""
    seg = np.zeros((B, T), np.int32)
    seg[0, :100], seg[0, 100:190], seg[0, 190:230] = 1, 2, 3
    seg[1, :50], seg[1, 50:] = 1, 2
    return jnp.asarray(seg)


@pytest.fixture(scope="module")
def qkv():
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(B, T, H, D)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(B, KV, T, D)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(B, KV, T, D)), jnp.float32)
    weights = jnp.asarray(rng.normal(size=(B, T, H, D)), jnp.float32)
    return q, k, v, weights


def reference(q, k, v, seg):
    index = jnp.broadcast_to(jnp.arange(T), (B, T))
    return gqa_attention(q, k, v, segment_causal_mask(seg, seg, index, index))


def loss_on_real_tokens(attention, seg, weights):
    """A scalar over real (non-padding) positions only: what the training loss can see."""
    real = (seg != 0)[:, :, None, None]
    return lambda q, k, v: jnp.sum(jnp.where(real, attention(q, k, v, seg) * weights, 0.0))


KERNELS = {
    "splash": splash_attention,
    "sdpa (xla)": lambda q, k, v, seg: sdpa_attention(q, k, v, segment_bias(seg, q.dtype), implementation="xla"),
}


@pytest.mark.parametrize("name", list(KERNELS))
def test_kernel_matches_reference_on_packed_rows(qkv, name):
    q, k, v, weights = qkv
    seg = packed_segments()
    real = np.asarray(seg != 0)
    out = np.asarray(KERNELS[name](q, k, v, seg))
    ref = np.asarray(reference(q, k, v, seg))
    np.testing.assert_allclose(out[real], ref[real], atol=2e-6, rtol=1e-5)
    # A query sees no other document: changing document 1 of row 0 leaves documents 2 and 3 as they were.
    k2 = k.at[0, :, :100].set(0.0)
    out2 = np.asarray(KERNELS[name](q, k2, v, seg))
    np.testing.assert_array_equal(out2[0, 100:230], out[0, 100:230])
    assert not np.allclose(out2[0, :100], out[0, :100])


@pytest.mark.parametrize("name", list(KERNELS))
def test_kernel_gradients_match_reference(qkv, name):
    q, k, v, weights = qkv
    seg = packed_segments()
    grads = jax.grad(loss_on_real_tokens(KERNELS[name], seg, weights), argnums=(0, 1, 2))(q, k, v)
    expected = jax.grad(loss_on_real_tokens(reference, seg, weights), argnums=(0, 1, 2))(q, k, v)
    for got, want, what in zip(grads, expected, "qkv"):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-4, err_msg=f"d/d{what}")


def test_auto_picks_by_platform_and_precision():
    assert choose_kernel("auto", jnp.bfloat16, on="tpu") == "splash"
    assert choose_kernel("auto", jnp.float32, on="tpu") == "splash"
    assert choose_kernel("auto", jnp.bfloat16, on="gpu") == "cudnn"
    assert choose_kernel("auto", jnp.float32, on="gpu") == "xla"  # cuDNN's fused attention is half precision only
    assert choose_kernel("auto", jnp.bfloat16, on="cpu") == "xla"
    assert choose_kernel("xla", jnp.bfloat16, on="tpu") == "xla"


def test_splash_needs_a_length_of_whole_blocks(qkv):
    q, k, v, _ = qkv
    seg = packed_segments()[:, :200]
    with pytest.raises(ConfigError, match="divisible by 128"):
        splash_attention(q[:, :200], k[:, :, :200], v[:, :, :200], seg)


# --------------------------------------------------------------------------- in the trainer


def loss_and_grads_of(attention: str, mesh: tuple[int, int, int], num_devices: int):
    """The trainer's loss and gradients of a tiny model on packed synthetic rows, sharded as a
    train step shards them."""
    data, fsdp, tensor = mesh
    cfg = load_config("tiny_synthetic", overrides=[
        "model.vocab_size=256", "model.embed_dim=64", "model.num_heads=4", "model.num_kv_heads=2",
        "model.head_dim=16", "model.mlp_dim=128", "model.num_layers=1", f"model.attention={attention}",
        "train.batch_size=8", "train.seq_len=128", "data.source=synthetic",
        f"mesh.data={data}", f"mesh.fsdp={fsdp}", f"mesh.tensor={tensor}", f"mesh.num_devices={num_devices}"])
    program = build_train_program(cfg, jax.devices()[:num_devices])
    state = jax.jit(functools.partial(init_state, cfg.model, program.optimizer),
                    out_shardings=program.state_sharding)(jax.random.key(cfg.seed))
    batch = SyntheticSource(cfg.data.synthetic, cfg.model.vocab_size, 8, 128, cfg.seed).batch_at(0)
    assert (batch["segment_ids"].max(axis=1) > 1).all(), "rows should hold several documents"
    with activation_sharding(program.mesh, parse_rules(cfg.mesh.rules)):  # active while jit traces
        sums, grads = jax.jit(lambda p, b: loss_and_grads(p, b, cfg.model, cfg.train))(
            state["params"], jax.device_put(batch, program.batch_sharding))
    return float(sums.loss), jax.device_get(grads)


def test_splash_gradients_on_8_devices_equal_reference_on_one():
    ref_loss, ref_grads = loss_and_grads_of("xla", (1, 1, 1), 1)
    loss, grads = loss_and_grads_of("splash", (2, 2, 2), 8)  # rows over data x fsdp, heads over tensor
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(got, want, atol=1e-7, rtol=1e-4)
