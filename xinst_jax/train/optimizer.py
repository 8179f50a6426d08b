"""AdamW with warmup + cosine/linear decay, global-norm clipping and a weight-decay mask."""

from __future__ import annotations

from typing import Any

import jax
import optax

from xinst_jax.config import TrainConfig


def learning_rate_schedule(cfg: TrainConfig) -> optax.Schedule:
    peak = cfg.learning_rate
    warmup = optax.linear_schedule(0.0, peak, max(cfg.warmup_steps, 1))
    decay_steps = max(cfg.steps - cfg.warmup_steps, 1)
    end = peak * cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=cfg.min_lr_ratio)
    elif cfg.schedule == "linear":
        decay = optax.linear_schedule(peak, end, decay_steps)
    else:
        decay = optax.constant_schedule(peak)
    return optax.join_schedules([warmup, decay], [cfg.warmup_steps])


def weight_decay_mask(params: Any, exclude: list[str]) -> Any:
    """True where weight decay applies: every param whose path names none of `exclude`."""
    def keep(path, _):
        name = "/".join(str(getattr(p, "key", p)) for p in path)
        return not any(pattern in name for pattern in exclude)

    return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    parts = []
    if cfg.clip_grad_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.clip_grad_norm))
    parts.append(optax.adamw(learning_rate_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                             weight_decay=cfg.weight_decay,
                             mask=lambda params: weight_decay_mask(params, cfg.weight_decay_exclude)))
    return optax.chain(*parts)
