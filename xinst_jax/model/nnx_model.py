"""Flax NNX face of the model: a Module holding `nnx.Param`s tagged with logical axes.

The numerics live in the functional core (llama.forward), which is what the trainer jits and
shards; this Module is for users who want the NNX object API (nnx.split/merge, nnx.jit,
attribute access to weights). Both views share one parameter layout.
"""

from __future__ import annotations

import jax
from flax import nnx

from xinst_jax.config import ModelConfig
from xinst_jax.model.llama import Params, forward, init_params, logical_axes


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


class LlamaForCausalLM(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs | None = None, params: Params | None = None):
        if params is None:
            params = init_params(cfg, (rngs or nnx.Rngs(0)).params())
        self.cfg = cfg
        self.params = nnx.data(jax.tree.map(lambda value, axes: nnx.Param(value, logical_axes=axes), params,
                                            logical_axes(cfg), is_leaf=lambda x: isinstance(x, tuple)))

    def pure_params(self) -> Params:
        """The plain params pytree the functional core, checkpoints and HF export use."""
        return jax.tree.map(lambda v: v[...], self.params, is_leaf=_is_variable)

    def __call__(self, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array) -> jax.Array:
        return forward(self.pure_params(), tokens, positions, segment_ids, self.cfg)
