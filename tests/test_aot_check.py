"""launch/aot_check.py --mode decode: the decode step it compiles is the Engine's (same weight layout,
shardings and model call, the cache donated), checked here on 8 fake CPU devices; compiled for a
TPU v5e-8 it reads the weights and the KV cache about once per step (needs libtpu, the `tpu` extra;
skipped without it)."""

import importlib.util
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO_ROOT
from xinst_jax.config import load_config
from xinst_jax.infer.generate import inference_params
from xinst_jax.model.kv_cache import init_cache
from xinst_jax.model.llama import bind, default_positions_and_segments, forward, init_params

AOT_CHECK = os.path.join(REPO_ROOT, "launch", "aot_check.py")


def load_aot_check():
    if "aot_check" in sys.modules:
        return sys.modules["aot_check"]
    spec = importlib.util.spec_from_file_location("aot_check", AOT_CHECK)
    module = importlib.util.module_from_spec(spec)
    sys.modules["aot_check"] = module  # its dataclasses resolve their annotations through it
    spec.loader.exec_module(module)
    return module


def test_decode_program_is_the_engines_step_with_the_cache_donated():
    aot = load_aot_check()
    cfg = load_config("tiny_synthetic", ["mesh.data=4", "mesh.fsdp=1", "mesh.tensor=2"])
    batch, context = 8, 32
    step, abstract, mesh, infer_cfg = aot.decode_program(cfg, jax.devices(), batch, context, "float32", "float32")
    assert dict(mesh.shape) == {"data": 4, "fsdp": 1, "tensor": 2}
    compiled = step.lower(*abstract).compile()
    cache_bytes = aot._per_chip_bytes((abstract[1].k, abstract[1].v))
    assert compiled.memory_analysis().alias_size_in_bytes >= cache_bytes  # the cache is updated in place

    # Prefill context - 1 tokens on one device, then the compiled (sharded) step writes the last slot.
    params = inference_params(init_params(cfg.model, jax.random.key(0)), cfg.model, infer_cfg)
    model = bind(params, infer_cfg, stack_layers=False)
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, infer_cfg.vocab_size, (batch, context)), jnp.int32)
    positions, segments = default_positions_and_segments(tokens)
    cache = init_cache(infer_cfg.num_layers, batch, context, infer_cfg.num_kv_heads, infer_cfg.head_dim, jnp.float32)
    _, cache = model(tokens[:, :-1], positions[:, :-1], segments[:, :-1], cache)
    placed = jax.device_put((params, cache, tokens[:, -1:], positions[:, -1:]),
                            jax.tree.map(lambda a: a.sharding, abstract))
    logits, new_cache = step(*placed)
    expected = forward(init_params(cfg.model, jax.random.key(0)), tokens, positions, segments, cfg.model)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(expected[:, -1]), atol=2e-5, rtol=0)
    assert int(new_cache.index) == context
    assert new_cache.k[0].sharding.is_equivalent_to(abstract[1].k[0].sharding, 4)


def test_decode_on_v5e_8_reads_weights_and_cache_about_once():
    """Llama-3-8B, batch 64 x 2048 slots, tensor parallel over a v5e-8: bytes accessed per step within
    1.3x the weights + KV cache per chip, XLA's FLOPs those of all 32 layers, the step fits in HBM."""
    pytest.importorskip("libtpu")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, AOT_CHECK, "--mode", "decode", "--config", "sft_xinst", "--topology",
                             "v5e:2x4", "--batch", "64", "--context", "2048", "--set", "mesh.fsdp=1", "--set",
                             "mesh.tensor=8"], capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
    out = result.stdout
    ratio = float(re.search(r"= ([0-9.]+) x \(weights \+ KV cache\)", out).group(1))
    flops_ratio = float(re.search(r"all 32 layers: ([0-9.]+) x", out).group(1))
    assert ratio <= 1.3 and 0.95 <= flops_ratio <= 1.1, out
    assert "of 16 GiB HBM" in out and "'tensor': 8" in out


def test_decode_reading_a_prefix_costs_what_a_cache_of_that_length_costs():
    """--read-len (continuous batching's rows of a shorter bucket in slots sized for a longer one):
    compiled for a v5e-8, a step over 512 slots reading 256 accesses what a 256-slot cache's step
    accesses (the same ratio to the same weights + KV bytes); reading all 512 is another program."""
    pytest.importorskip("libtpu")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}

    def bytes_ratio(*args: str) -> float:
        result = subprocess.run([sys.executable, AOT_CHECK, "--mode", "decode", "--config", "tiny_synthetic",
                                 "--topology", "v5e:2x4", "--batch", "64", "--max-ratio", "100", *args,
                                 "--set", "mesh.fsdp=1", "--set", "mesh.tensor=1", "--set", "mesh.data=8"],
                                capture_output=True, text=True, timeout=600, env=env)
        assert result.returncode == 0, result.stdout + result.stderr[-2000:]
        return float(re.search(r"= ([0-9.]+) x \(weights \+ KV cache\)", result.stdout).group(1))

    prefix = bytes_ratio("--context", "512", "--read-len", "256")
    assert prefix == bytes_ratio("--context", "256")
    assert prefix != bytes_ratio("--context", "512")
