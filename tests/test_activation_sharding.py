"""Activation sharding constraints: under fsdp the batch stays split over devices inside the
model (GSPMD would otherwise be free to follow the fsdp-sharded weights and replicate it)."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from conftest import REPO_ROOT
from xinst_jax.config import MeshConfig, ModelConfig, _default_rules
from xinst_jax.model.llama import default_positions_and_segments, forward, init_params, logical_axes, param_shapes
from xinst_jax.sharding import activation_sharding, batch_sharding, constrain, make_mesh, parse_rules, tree_shardings


def test_constrain_is_a_no_op_outside_the_context():
    x = jnp.ones((8, 4))
    assert constrain(x, ("activation_batch", None)) is x


@pytest.mark.parametrize("axes", [(1, 8, 1), (2, 2, 2)])
def test_logits_keep_the_batch_split_and_match_unsharded(axes):
    cfg = ModelConfig(vocab_size=256, embed_dim=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                      mlp_dim=128)
    mesh = make_mesh(MeshConfig(data=axes[0], fsdp=axes[1], tensor=axes[2]))
    rules = parse_rules(_default_rules())
    params = init_params(cfg, jax.random.key(0))
    shardings = tree_shardings(logical_axes(cfg), param_shapes(cfg), rules, mesh)
    sharded_params = jax.device_put(params, shardings)
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, 256, (8, 16)))
    positions, segments = default_positions_and_segments(tokens)
    batch_sh = batch_sharding(mesh, rules)

    def run(p, t, pos, seg):
        with activation_sharding(mesh, rules):
            return forward(p, t, pos, seg, cfg)

    logits = jax.jit(run)(sharded_params, *(jax.device_put(a, batch_sh) for a in (tokens, positions, segments)))
    batch_axes = tuple(a for a in ("data", "fsdp") if mesh.shape[a] > 1)
    vocab_axis = "tensor" if mesh.shape["tensor"] > 1 else None
    expected = NamedSharding(mesh, P(batch_axes if len(batch_axes) > 1 else batch_axes[0], None, vocab_axis))
    assert logits.sharding.is_equivalent_to(expected, 3), logits.sharding
    np.testing.assert_allclose(np.asarray(logits), np.asarray(forward(params, tokens, positions, segments, cfg)),
                               atol=2e-5, rtol=0)


@pytest.mark.slow  # compiles Llama-3-8B for TPU (~2 min): started first under `make test`
def test_aot_check_fits_llama3_8b_on_v5p(tmp_path):
    """launch/aot_check.py compiles sft_xinst (Llama-3-8B, fsdp) for a v5p pod on this CPU. Needs the
    `tpu` extra (libtpu); CI's test extra does not install it, so this runs where it is present."""
    pytest.importorskip("libtpu")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "launch", "aot_check.py"), "--config",
                             "sft_xinst", "--topology", "v5p:4x4x4"], capture_output=True, text=True, timeout=900,
                            env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "8.03B params" in result.stdout and "of 95 GiB HBM" in result.stdout
