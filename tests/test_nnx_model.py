"""The NNX Module and the functional core are one model: same params, same logits."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xinst_jax.config import ModelConfig
from xinst_jax.model.llama import default_positions_and_segments, forward, logical_axes
from xinst_jax.model.nnx_model import LlamaForCausalLM


def test_nnx_module_matches_functional_core_and_carries_logical_axes():
    cfg = ModelConfig(vocab_size=64, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                      mlp_dim=48)
    model = LlamaForCausalLM(cfg, rngs=nnx.Rngs(3))
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, 64, (2, 12)))
    positions, segments = default_positions_and_segments(tokens)
    # Both jitted: the same traced graph, so the logits agree bit for bit.
    expected = jax.jit(lambda p, t, pos, seg: forward(p, t, pos, seg, cfg))(model.pure_params(), tokens, positions,
                                                                           segments)
    np.testing.assert_array_equal(np.asarray(nnx.jit(lambda m, t, p, s: m(t, p, s))(model, tokens, positions,
                                                                                     segments)),
                                  np.asarray(expected))
    axes = jax.tree.map(lambda v: v.get_metadata()["logical_axes"], model.params,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))
    assert axes == logical_axes(cfg)
    # Weights given explicitly are used as they are (e.g. after a Hugging Face import).
    same = LlamaForCausalLM(cfg, params=model.pure_params())
    np.testing.assert_array_equal(np.asarray(nnx.jit(lambda m, t, p, s: m(t, p, s))(same, tokens, positions,
                                                                                    segments)),
                                  np.asarray(expected))
