"""Model FLOPs per the MaxText formula, chip peaks, and a measured CPU matmul peak."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from xinst_jax.config import ModelConfig

# Dense bf16 peak FLOP/s per chip (vendor figures, as MaxText uses them).
PEAK_FLOPS = {
    "tpu v4": 275e12,
    "tpu v5 lite": 197e12,  # v5e
    "tpu v5e": 197e12,
    "tpu v5p": 459e12,
    "tpu v5": 459e12,
    "tpu v6 lite": 918e12,  # v6e (Trillium)
    "tpu v6e": 918e12,
    "nvidia h100": 989e12,
    "nvidia h200": 989e12,
}


def training_flops_per_step(cfg: ModelConfig, batch: int, seq_len: int) -> float:
    """MaxText's accounting: 3 x (forward matmul FLOPs) plus 3 x causal attention FLOPs.

    Learnable-weight matmuls: 2 FLOPs per multiply-add, forward; backward costs twice forward.
    Attention scores and weighted values: 4 * B * T^2 * heads * head_dim per layer, halved for
    the causal mask.
    """
    tokens = batch * seq_len
    E, H, KV, D, M, L, V = (cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim,
                            cfg.num_layers, cfg.vocab_size)
    ffn = 2 * tokens * E * M * 3  # gate, up, down
    qkv = 2 * tokens * E * (H + 2 * KV) * D
    proj = 2 * tokens * H * D * E
    embedding = 2 * tokens * E * V  # the output projection
    learnable = (ffn + qkv + proj) * L + embedding
    attention = 4 * batch * seq_len * seq_len * H * D * L / 2
    return 3 * learnable + 3 * attention


def device_peak_flops(device: jax.Device | None = None) -> float | None:
    """Vendor peak for known accelerators, None for others (measure instead)."""
    kind = (device or jax.devices()[0]).device_kind.lower()
    for name, peak in PEAK_FLOPS.items():
        if kind.startswith(name):
            return peak
    return None


def measured_matmul_peak(size: int = 1024, repeats: int = 5, dtype=jnp.float32) -> float:
    """FLOP/s of a jitted square matmul on device 0: the CPU stand-in for a vendor peak."""
    a = jnp.ones((size, size), dtype)
    matmul = jax.jit(lambda x, y: x @ y)
    matmul(a, a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def peak_flops_per_device() -> tuple[float, str]:
    """(peak FLOP/s per device, where the figure comes from)."""
    peak = device_peak_flops()
    if peak is not None:
        return peak, f"vendor peak of {jax.devices()[0].device_kind}"
    return measured_matmul_peak(), "measured fp32 matmul peak of this CPU"
