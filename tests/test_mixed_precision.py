"""Half-precision matmuls keep half-precision backward matmuls (model/llama.py `_mixed_einsum`).

A float32-accumulated einsum left to autodiff hands its backward matmuls a float32 cotangent, so
both run as float32 matmuls (TF32 on a GPU, at half the bf16 rate: measured as a third of a 1B
model's train step on an H200). The custom VJP casts the cotangent down first. Checked here with
float16 (XLA:CPU runs f16 x f16 -> f32 dots; it has no bf16 kernel for them).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xinst_jax.model.llama import _mixed_einsum

SPECS = [("ne,ehd->nhd", (64, 32), (32, 4, 8)),   # q/k/v projections
         ("nhd,hde->ne", (64, 4, 8), (4, 8, 32)),  # output projection
         ("ne,ve->nv", (64, 32), (100, 32))]       # tied-embedding logits


@pytest.mark.parametrize("spec, x_shape, w_shape", SPECS)
def test_gradients_match_float32(spec, x_shape, w_shape):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=x_shape), jnp.float32)
    w = jnp.asarray(rng.normal(size=w_shape), jnp.float32)
    ct = jnp.asarray(rng.normal(size=jnp.einsum(spec, x, w).shape), jnp.float32)
    half = jax.grad(lambda x, w: jnp.sum(_mixed_einsum(spec, x.astype(jnp.float16), w) * ct), (0, 1))(x, w)
    full = jax.grad(lambda x, w: jnp.sum(jnp.einsum(spec, x, w) * ct), (0, 1))(x, w)
    assert half[1].dtype == jnp.float32  # the float32 parameter's gradient stays float32
    for got, want in zip(half, full):
        rel = float(jnp.linalg.norm(got.astype(jnp.float32) - want) / jnp.linalg.norm(want))
        assert rel < 2e-3, rel  # float16 operands: ~5e-4 expected


def dot_operand_dtypes(jaxpr) -> list[tuple]:
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.append(tuple(str(v.aval.dtype) for v in eqn.invars))
        for param in eqn.params.values():
            inner = getattr(param, "jaxpr", None)
            if inner is not None:
                found += dot_operand_dtypes(getattr(inner, "jaxpr", inner))
    return found


def test_every_matmul_of_the_backward_takes_half_operands():
    spec = "ne,em->nm"
    x = jnp.ones((16, 8), jnp.float16)
    w = jnp.ones((8, 32), jnp.float32)  # a float32 parameter, as the trainer holds them
    jaxpr = jax.make_jaxpr(jax.grad(lambda x, w: jnp.sum(_mixed_einsum(spec, x, w)), (0, 1)))(x, w)
    dots = dot_operand_dtypes(jaxpr.jaxpr)
    assert len(dots) == 3, dots  # forward, dx, dw
    assert all(d == ("float16", "float16") for d in dots), dots
