"""Grouped-query attention over packed rows or a KV cache: causal, never crossing segments.

Three implementations of the same function (`model.attention`):
  xla     the reference below: scores for every (query, key) pair under a [B, T, S] mask; CPU,
          and every call with a KV cache (prefill, decode).
  splash  Pallas splash attention on TPU: blocks of the causal mask that are all masked are
          skipped, and segment ids keep packed documents apart inside the kernel.
  cudnn   cuDNN flash attention through `jax.nn.dot_product_attention` on GPU: causal by
          block skipping, segments through its mask input.
`auto` picks splash on TPU, cudnn on GPU for bf16/fp16 compute, xla otherwise. The fused kernels
serve packed rows without a cache (training and scoring), where the T x T scores dominate.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from xinst_jax.config import ConfigError
from xinst_jax.sharding import active_mesh_and_rules, compile_platform, logical_to_spec

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


# --------------------------------------------------------------------------- fused kernels

BATCH_HEADS = ("activation_batch", "activation_heads", None, None)  # [B, H, T, D] as splash takes it
BATCH_KV_HEADS = ("activation_batch", "activation_kv_heads", None, None)


@dataclass(frozen=True)
class FusedMask:
    """Packed rows without a cache, for a kernel that masks from segment ids itself: causal within
    each segment."""

    segment_ids: jax.Array  # [B, T]
    kernel: str  # "splash" or "cudnn"


def choose_kernel(requested: str, compute_dtype, on: str | None = None) -> str:
    if requested != "auto":
        return requested
    on = on or compile_platform()
    if on == "tpu":
        return "splash"
    if on in ("gpu", "cuda", "rocm") and jnp.dtype(compute_dtype) in (jnp.bfloat16, jnp.float16):
        return "cudnn"  # cuDNN's fused attention takes half precision only
    return "xla"


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask) -> jax.Array:
    """q [B, T, H, D], k/v [B, KV, S, D]; `mask` a [B, T, S] bool array (reference) or a FusedMask."""
    if not isinstance(mask, FusedMask):
        return gqa_attention(q, k, v, mask)
    if mask.kernel == "splash":
        return splash_attention(q, k, v, mask.segment_ids)
    if mask.kernel == "cudnn":
        return sdpa_attention(q, k, v, segment_bias(mask.segment_ids, q.dtype), implementation="cudnn")
    raise ConfigError(f"model.attention: unknown kernel '{mask.kernel}' (auto, xla, splash, cudnn)")


# Masked logits for cuDNN: large but finite, and no larger in bf16/fp16 than cuDNN handles (the
# values jax's own cuDNN wrapper uses for a boolean mask).
MASK_BIAS = {jnp.dtype(jnp.bfloat16): -(2.0 ** 41), jnp.dtype(jnp.float16): -(2.0 ** 15)}


def segment_bias(segment_ids: jax.Array, dtype) -> jax.Array:
    """[B, 1, T, T] additive mask: 0 within a segment, very negative across segments. Padding
    (segment 0) attends to earlier padding: finite, and unseen by real tokens and by the loss."""
    same_segment = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
    return jnp.where(same_segment, 0.0, MASK_BIAS.get(jnp.dtype(dtype), NEG_INF)).astype(dtype)


def sdpa_attention(q, k, v, bias, implementation: str = "cudnn") -> jax.Array:
    """`jax.nn.dot_product_attention`, causal by the kernel's own mask type (cuDNN skips the
    blocks above the diagonal) and within segments by `bias` (segment_bias). `implementation="xla"`
    runs the same call on any backend."""
    out = jax.nn.dot_product_attention(q, k.transpose(0, 2, 1, 3).astype(q.dtype), v.transpose(0, 2, 1, 3).astype(q.dtype),
                                       bias=bias, is_causal=True, implementation=implementation)
    return out.astype(q.dtype)


def splash_block(length: int) -> int:
    """Splash tiles the sequence in blocks of 128 lanes; 512 is MaxText's default size on TPU."""
    for block in (512, 256, 128):
        if length % block == 0:
            return block
    raise ConfigError(f"model.attention=splash needs a sequence length divisible by 128, got {length} "
                      "(set train.seq_len accordingly, or model.attention=xla)")


def _splash_local(q, k, v, segment_ids, interpret: bool):
    """One device's share: q [b, h, T, D] (pre-scaled), k/v [b, kv, T, D], segment ids [b, T]."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    heads, length = q.shape[1], q.shape[2]
    block = splash_block(length)
    sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                          block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    causal = sm.MultiHeadMask([sm.CausalMask((length, length)) for _ in range(heads)])
    kernel = sk.make_splash_mha(causal, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)
    return jax.vmap(kernel)(q, k, v, sk.SegmentIds(q=segment_ids, kv=segment_ids))


def splash_attention(q, k, v, segment_ids) -> jax.Array:
    """Splash attention over packed rows, q [B, T, H, D], k/v [B, KV, T, D] -> [B, T, H, D].

    Under a mesh the kernel runs per device (shard_map): rows split as the batch is, heads as the
    tensor axis splits them; query heads and their KV heads must be split alike. Off TPU it runs
    in Pallas' interpret mode (slow; for checking numerics)."""
    b, t, h, d = q.shape
    dtype = q.dtype
    qh = (q * (d ** -0.5)).astype(k.dtype).transpose(0, 2, 1, 3)
    segment_ids = segment_ids.astype(jnp.int32)
    interpret = compile_platform() != "tpu"
    active = active_mesh_and_rules()
    if active is None:
        out = _splash_local(qh, k, v, segment_ids, interpret)
    else:
        mesh, rules = active
        q_spec = logical_to_spec(BATCH_HEADS, qh.shape, rules, mesh, "attention queries")
        kv_spec = logical_to_spec(BATCH_KV_HEADS, k.shape, rules, mesh, "attention keys")
        if q_spec[1] != kv_spec[1]:
            raise ConfigError(f"model.attention=splash: query heads ({h}) are split over {q_spec[1]} but KV heads "
                              f"({k.shape[1]}) over {kv_spec[1]}; use a tensor axis that divides both, or "
                              "model.attention=xla")
        row_spec = jax.sharding.PartitionSpec(q_spec[0], None)
        out = jax.shard_map(lambda *a: _splash_local(*a, interpret), mesh=mesh,
                            in_specs=(q_spec, kv_spec, kv_spec, row_spec), out_specs=q_spec,
                            check_vma=False)(qh, k, v, segment_ids)
    return out.transpose(0, 2, 1, 3).astype(dtype)
