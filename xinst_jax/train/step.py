"""Train state and the train step: scanned gradient accumulation, one global normalisation.

With LoRA (`model.lora_rank > 0`) only the adapters are differentiated and updated: the optimizer
state covers them alone, and the base weights pass through the step untouched (bitwise)."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from xinst_jax.config import ModelConfig, TrainConfig
from xinst_jax.model.llama import forward, init_params, join_trainable, split_trainable
from xinst_jax.train.loss import weighted_cross_entropy

Batch = dict[str, jnp.ndarray]  # the keys of data.batch.BATCH_KEYS, each [B, T]


def init_state(model_cfg: ModelConfig, optimizer: optax.GradientTransformation, rng: jax.Array) -> dict:
    """{step, params, opt_state, rng}: a plain pytree, so orbax and shardings see it directly."""
    params_rng, state_rng = jax.random.split(rng)
    params = init_params(model_cfg, params_rng)
    return {"step": jnp.zeros((), jnp.int32), "params": params,
            "opt_state": optimizer.init(split_trainable(params, model_cfg)[0]), "rng": state_rng}


class StepSums(NamedTuple):
    loss: jnp.ndarray  # sum of weighted CE (+ z-loss)
    z_loss: jnp.ndarray
    weight: jnp.ndarray  # number of loss tokens
    real_tokens: jnp.ndarray  # non-padding tokens


def _micro_sums(trainable, frozen, batch: Batch, model_cfg: ModelConfig, z_loss: float):
    params = join_trainable(trainable, frozen)
    logits = forward(params, batch["inputs"], batch["positions"], batch["segment_ids"], model_cfg)
    loss, z = weighted_cross_entropy(logits, batch["targets"], batch["loss_weights"], z_loss)
    sums = StepSums(loss, z, jnp.sum(batch["loss_weights"].astype(jnp.float32)),
                    jnp.sum((batch["segment_ids"] != 0).astype(jnp.float32)))
    return loss, sums


def _micro_batches(batch: Batch, accum: int) -> Batch:
    """[accum, B / accum, T] arrays: micro-batch i takes rows i, i+accum, ...: each data shard holds
    contiguous rows, so every shard contributes equally to every micro-batch and a scan over them
    needs no resharding."""
    return jax.tree.map(lambda x: x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1), batch)


def _zero_sums() -> StepSums:
    return StepSums(*([jnp.zeros((), jnp.float32)] * 4))


def eval_sums(params, batch: Batch, model_cfg: ModelConfig,
              train_cfg: TrainConfig) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(sum of weighted cross-entropy, loss tokens) of a batch: the held-out loss's parts, summed
    over batches before the one division (as the train step normalises); no z-loss. In the train
    step's `grad_accum` micro-batches: a batch whose activations need them to fit does here too."""
    trainable, frozen = split_trainable(params, model_cfg)

    def sums_of(mb: Batch) -> StepSums:
        return _micro_sums(trainable, frozen, mb, model_cfg, 0.0)[1]

    if train_cfg.grad_accum == 1:
        sums = sums_of(batch)
    else:
        sums, _ = jax.lax.scan(lambda acc, mb: (jax.tree.map(jnp.add, acc, sums_of(mb)), None), _zero_sums(),
                               _micro_batches(batch, train_cfg.grad_accum))
    return sums.loss, sums.weight


def loss_and_grads(params, batch: Batch, model_cfg: ModelConfig, train_cfg: TrainConfig):
    """Gradient of (sum of token losses / loss tokens in the global batch) with respect to the
    trainable params, with the batch split into `grad_accum` micro-batches scanned in sequence.
    Equal to the one-big-batch gradient."""
    params, frozen = split_trainable(params, model_cfg)
    grad_fn = jax.value_and_grad(_micro_sums, has_aux=True)
    accum = train_cfg.grad_accum
    if accum == 1:
        (_, sums), grads = grad_fn(params, frozen, batch, model_cfg, train_cfg.z_loss)
    else:
        micro = _micro_batches(batch, accum)

        def body(carry, mb):
            grads_acc, sums_acc = carry
            (_, sums), grads = grad_fn(params, frozen, mb, model_cfg, train_cfg.z_loss)
            return (jax.tree.map(jnp.add, grads_acc, grads), jax.tree.map(jnp.add, sums_acc, sums)), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        (grads, sums), _ = jax.lax.scan(body, (zeros, _zero_sums()), micro)
    denom = jnp.maximum(sums.weight, 1.0)
    grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grads, params)
    return sums, grads


def make_train_step(model_cfg: ModelConfig, train_cfg: TrainConfig, optimizer: optax.GradientTransformation,
                    lr_schedule: Callable[[Any], Any]) -> Callable[[dict, Batch], tuple[dict, dict]]:
    def train_step(state: dict, batch: Batch) -> tuple[dict, dict]:
        sums, grads = loss_and_grads(state["params"], batch, model_cfg, train_cfg)
        trainable, frozen = split_trainable(state["params"], model_cfg)
        updates, opt_state = optimizer.update(grads, state["opt_state"], trainable)
        params = join_trainable(optax.apply_updates(trainable, updates), frozen)
        denom = jnp.maximum(sums.weight, 1.0)
        metrics = {
            "loss": sums.loss / denom,
            "z_loss": sums.z_loss / denom,
            "grad_norm": optax.global_norm(grads),
            "learning_rate": lr_schedule(state["step"]),
            "loss_tokens": sums.weight,
            "real_tokens": sums.real_tokens,
        }
        new_state = {"step": state["step"] + 1, "params": params, "opt_state": opt_state, "rng": state["rng"]}
        return new_state, metrics

    return train_step
