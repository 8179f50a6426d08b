"""What a run fixes from its config and mesh: shardings, the jitted train step, the step-0 state.

Built the same way for training (train/loop.py) and ahead-of-time compilation (launch/aot_check.py).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

from xinst_jax import paths
from xinst_jax.config import Config, ConfigError
from xinst_jax.model.llama import init_params, join_trainable, logical_axes, param_shapes, split_trainable
from xinst_jax.sharding import (activation_sharding, batch_sharding, make_mesh, parse_rules, replicated,
                                state_shardings_like_params, tree_shardings)
from xinst_jax.train.optimizer import learning_rate_schedule, make_optimizer
from xinst_jax.train.step import eval_sums, init_state, make_train_step


def validate_batch(cfg: Config, data_parallel: int) -> int:
    """Rows this host contributes per step; clear errors before anything compiles."""
    t = cfg.train
    if t.batch_size % t.grad_accum:
        raise ConfigError(f"train.batch_size={t.batch_size} is not divisible by train.grad_accum={t.grad_accum}")
    micro = t.batch_size // t.grad_accum
    if micro % data_parallel:
        raise ConfigError(f"train.batch_size/grad_accum={micro} rows cannot be split over the {data_parallel} "
                          "data-parallel shards (mesh data x fsdp)")
    if t.batch_size % jax.process_count():
        raise ConfigError(f"train.batch_size={t.batch_size} is not divisible by {jax.process_count()} processes")
    return t.batch_size // jax.process_count()


@dataclass
class TrainProgram:
    """Everything about a run that is fixed by the config and the mesh: shardings and the jitted
    step. Built the same way for training and for ahead-of-time compilation (launch/aot_check.py)."""

    mesh: Any
    optimizer: Any
    abstract_state: Any  # ShapeDtypeStructs carrying their shardings
    state_sharding: Any
    batch_sharding: Any
    step_fn: Any
    host_rows: int
    eval_fn: Any  # (params, batch) -> (sum of token losses, loss tokens), replicated


def build_train_program(cfg: Config, devices: list | None = None) -> TrainProgram:
    mesh = make_mesh(cfg.mesh, devices)
    rules = parse_rules(cfg.mesh.rules)
    rows = validate_batch(cfg, mesh.shape["data"] * mesh.shape["fsdp"])
    optimizer = make_optimizer(cfg.train)
    abstract = jax.eval_shape(functools.partial(init_state, cfg.model, optimizer), jax.random.key(cfg.seed))
    param_sh = tree_shardings(logical_axes(cfg.model), param_shapes(cfg.model), rules, mesh)
    state_sh = {"step": replicated(mesh), "params": param_sh,
                "opt_state": state_shardings_like_params(abstract["opt_state"], param_sh, mesh),
                "rng": replicated(mesh)}
    batch_sh = batch_sharding(mesh, rules)
    train_step = make_train_step(cfg.model, cfg.train, optimizer, learning_rate_schedule(cfg.train))

    def sharded_step(state, batch):
        with activation_sharding(mesh, rules):  # active while jit traces
            return train_step(state, batch)

    step_fn = jax.jit(sharded_step, in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, replicated(mesh)),
                      donate_argnums=0)

    def sharded_eval(params, batch):
        with activation_sharding(mesh, rules):
            return eval_sums(params, batch, cfg.model, cfg.train)

    eval_fn = jax.jit(sharded_eval, in_shardings=(param_sh, batch_sh), out_shardings=replicated(mesh))
    target = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), abstract, state_sh)
    return TrainProgram(mesh, optimizer, target, state_sh, batch_sh, step_fn, rows, eval_fn)


def load_pretrained(cfg: Config, rng: jax.Array, optimizer, state_sh: dict) -> dict:
    """Step-0 state from Hugging Face weights: each tensor is placed straight into its shard
    layout (never a random init first), and the optimizer state is created for it."""
    from xinst_jax.convert.hf import import_hf

    paths.check_dir("train.init_from", cfg.train.init_from)
    _, params = import_hf(cfg.train.init_from, cfg.model, shardings=state_sh["params"])  # gs://: copied once
    params_rng, state_rng = jax.random.split(rng)  # the same split init_state makes
    if cfg.model.lora_rank > 0:  # fresh adapters (b = 0) beside the imported weights
        adapter_sh = split_trainable(state_sh["params"], cfg.model)[0]
        adapters = jax.jit(lambda k: split_trainable(init_params(cfg.model, k), cfg.model)[0],
                           out_shardings=adapter_sh)(params_rng)
        params = join_trainable(adapters, params)
    opt_state = jax.jit(optimizer.init, out_shardings=state_sh["opt_state"])(split_trainable(params, cfg.model)[0])
    step = jax.device_put(np.zeros((), np.int32), state_sh["step"])
    return {"step": step, "params": params, "opt_state": opt_state,
            "rng": jax.device_put(state_rng, state_sh["rng"])}
