"""LoRA (model.lora_rank > 0): only the adapters train, the base weights stay bitwise as they
were, the optimizer holds state for the adapters alone, and the Hugging Face export (adapters
merged) gives the adapter model's logits in transformers."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from transformers import AutoModelForCausalLM

from hf_reference import hf_logits
from xinst_jax.config import load_config
from xinst_jax.convert.hf import export_hf
from xinst_jax.data.synthetic import SyntheticSource
from xinst_jax.model.llama import (count_params, default_positions_and_segments, forward, init_params,
                                   is_lora_path, merge_lora)
from xinst_jax.train.program import build_train_program
from xinst_jax.train.step import init_state

LORA = ["model.lora_rank=4", "model.lora_alpha=8", "model.init_std=0.2", "train.learning_rate=1e-2",
        "train.warmup_steps=1", "train.batch_size=4", "train.seq_len=32", "mesh.num_devices=1"]


@pytest.fixture(scope="module")
def trained():
    """A tiny LoRA model after 4 optimizer steps, with its step-0 state kept aside."""
    cfg = load_config("tiny_synthetic", LORA)
    program = build_train_program(cfg)
    state = jax.jit(lambda k: init_state(cfg.model, program.optimizer, k),
                    out_shardings=program.state_sharding)(jax.random.key(cfg.seed))
    initial = jax.tree.map(np.asarray, state["params"])
    source = SyntheticSource(cfg.data.synthetic, cfg.model.vocab_size, 4, 32, cfg.seed, 0, 1)
    for _ in range(4):
        state, metrics = program.step_fn(state, {k: jnp.asarray(v) for k, v in next(source).items()})
    return cfg, initial, state, float(metrics["loss"])


def flat(tree) -> dict:
    return traverse_util.flatten_dict(tree)


def test_only_adapters_train(trained):
    cfg, initial, state, loss = trained
    assert np.isfinite(loss)
    before, after = flat(initial), flat(jax.tree.map(np.asarray, state["params"]))
    assert before.keys() == after.keys()
    adapters = [p for p in before if is_lora_path(p)]
    assert len(adapters) == 2 * 7  # a and b for q, k, v, o, gate, up, down
    for path in before:
        if is_lora_path(path):
            continue
        assert before[path].dtype == after[path].dtype
        assert np.array_equal(before[path].view(np.uint8), after[path].view(np.uint8)), path  # bitwise
    changed = [p for p in adapters if not np.array_equal(before[p], after[p])]
    assert len(changed) == len(adapters)  # every adapter moved (b from zero, a through b's gradient)
    # Optimizer state exists for the adapters alone: Adam's moments hold exactly their sizes.
    moment_sizes = sorted(x.size for x in jax.tree.leaves(state["opt_state"]) if x.ndim > 0)
    adapter_sizes = sorted(before[p].size for p in adapters)
    assert moment_sizes == sorted(adapter_sizes * 2)
    assert count_params(cfg.model, trainable_only=True) == sum(adapter_sizes) < count_params(cfg.model) / 5


def test_merged_export_matches_adapter_model(trained, tmp_path):
    cfg, _, state, _ = trained
    params = jax.tree.map(np.asarray, state["params"])
    out = export_hf(params, cfg.model, tmp_path / "hf", dtype="float32")
    hf = AutoModelForCausalLM.from_pretrained(out, dtype="float32")
    assert not any("lora" in name for name, _ in hf.named_parameters())
    tokens = np.random.default_rng(0).integers(3, cfg.model.vocab_size, (2, 24)).astype(np.int32)
    positions, segments = default_positions_and_segments(jnp.asarray(tokens))
    ours = np.asarray(forward(params, jnp.asarray(tokens), positions, segments, cfg.model))
    base = np.asarray(forward(merge_lora(params, cfg.model), jnp.asarray(tokens), positions, segments,
                              dataclasses.replace(cfg.model, lora_rank=0)))
    theirs = hf_logits(hf, tokens)
    assert np.abs(ours).max() > 0.5  # O(1) logits: the bound means something
    assert np.abs(theirs - ours).max() <= 1e-4
    assert np.abs(base - ours).max() <= 1e-4  # merging in float32 rounds differently from two matmuls
    # The adapters matter: the export differs from the base weights alone.
    plain = {p: x for p, x in flat(params).items() if not is_lora_path(p)}
    without = np.asarray(forward(traverse_util.unflatten_dict(plain), jnp.asarray(tokens), positions, segments,
                                 dataclasses.replace(cfg.model, lora_rank=0)))
    assert np.abs(without - ours).max() > 1e-3


def test_fresh_adapters_leave_the_model_unchanged():
    cfg = load_config("tiny_synthetic", LORA).model
    params = init_params(cfg, jax.random.key(0))
    tokens = jnp.asarray(np.random.default_rng(1).integers(3, cfg.vocab_size, (1, 16)), jnp.int32)
    positions, segments = default_positions_and_segments(tokens)
    plain = traverse_util.unflatten_dict({p: x for p, x in flat(params).items() if not is_lora_path(p)})
    np.testing.assert_array_equal(
        np.asarray(forward(params, tokens, positions, segments, cfg)),
        np.asarray(forward(plain, tokens, positions, segments, dataclasses.replace(cfg, lora_rank=0))))
