"""Token cross-entropy: fp32, weighted by loss_weights, summed (callers normalise globally)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def weighted_cross_entropy(logits: jnp.ndarray, targets: jnp.ndarray, weights: jnp.ndarray,
                           z_loss: float = 0.0) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Returns (sum of weighted CE [+ z-loss], sum of weighted z-loss) over all tokens.

    Sums rather than means so gradient accumulation can divide once by the token count of the
    whole global batch: micro-batches with different token counts then weigh tokens equally.
    """
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    weights = weights.astype(jnp.float32)
    ce = jnp.sum((log_z - target_logit) * weights)
    z = jnp.sum(z_loss * jnp.square(log_z) * weights) if z_loss else jnp.zeros((), jnp.float32)
    return ce + z, z
