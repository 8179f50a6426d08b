"""The native CPU decode-attention kernel (xinst_jax/infer/native_kernels.py): the same numbers as
XLA's masked attention, slots outside each row's span never read, the engine's tokens unchanged,
the build cached per machine, and a clear fallback or error without a compiler."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from test_generate import random_prompts, tiny_cfg, tiny_params
from xinst_jax.config import MeshConfig
from xinst_jax.infer import decode_model as dm
from xinst_jax.infer import native_kernels
from xinst_jax.infer.generate import Engine, use_native_attention
from xinst_jax.infer.sampling import SamplingSettings
from xinst_jax.sharding import make_mesh

needs_kernel = pytest.mark.skipif(native_kernels.available() is not None,
                                  reason=f"native kernels unavailable: {native_kernels.available()}")


def random_step(dtype, b=4, kv=2, g=3, d=32, slots=40, seed=0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((b, 1, kv * g, d)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((b, kv, slots, d)) * 1.5, dtype) for _ in range(2))
    return q, k, v


def both(q, k, v, first, last):
    span = dm.SlotSpan(jnp.asarray(first, jnp.int32), jnp.int32(last))
    xla = jax.jit(lambda q, k, v: dm._attention(q, k, v, span))(q, k, v)
    native = jax.jit(lambda q, k, v: dm._attention(q, k, v, span._replace(native=True)))(q, k, v)
    return np.asarray(xla), np.asarray(native)


@needs_kernel
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("last", [39, 21])
@pytest.mark.parametrize("g,d", [(3, 64), (1, 64), (2, 64), (4, 128), (1, 128), (2, 128), (3, 32)])  # every compiled branch, then run-time sizes
def test_kernel_matches_xla_attention(dtype, last, g, d):
    """Both round the query and the probabilities to the cache's dtype and accumulate in float32:
    what differs is only the float32 summation order (and the kernel's exp, within 1 ulp)."""
    q, k, v = random_step(dtype, g=g, d=d)
    first = [0, 5, 17, last]  # the last row attends to one slot
    xla, native = both(q, k, v, first, last)
    assert np.abs(xla).max() > 0.1
    np.testing.assert_allclose(native, xla, rtol=0, atol=2e-6)


@needs_kernel
def test_kernel_reads_only_each_rows_span():
    """NaN keys and values outside [first[b], last] leave the output unchanged (XLA's masked dots
    would carry the NaN into it)."""
    q, k, v = random_step(jnp.bfloat16)
    first, last = np.array([3, 0, 10, 25]), 30
    _, clean = both(q, k, v, first, last)
    slot = np.arange(k.shape[2])
    outside = (slot[None, :] < first[:, None]) | (slot[None, :] > last)  # [B, S]
    poison = jnp.asarray(outside[:, None, :, None])
    k_bad, v_bad = (jnp.where(poison, jnp.nan, x).astype(x.dtype) for x in (k, v))
    _, native = both(q, k_bad, v_bad, first, last)
    np.testing.assert_array_equal(native, clean)


CONCURRENT_CALLS = """
import jax, jax.numpy as jnp, numpy as np
from test_native_attention import random_step
from xinst_jax.infer import decode_model as dm
caches = [random_step(jnp.bfloat16, seed=i)[1:] for i in range(30)]
q = random_step(jnp.bfloat16)[0]
span = dm.SlotSpan(jnp.asarray([0, 5, 17, 30], jnp.int32), jnp.int32(39))
def every(native):  # independent calls: XLA runs them at once on its pool threads
    return jax.jit(lambda q, c: [dm._attention(q, k, v, span._replace(native=native)) for k, v in c])(q, caches)
for a, b in zip(every(True), every(False)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=2e-6)
print("ok")
"""


@needs_kernel
def test_concurrent_kernel_calls_finish():
    """30 independent calls in one jit, as 30 layers' attention timed alone: XLA runs them at once,
    so every pool thread is inside the kernel (one that waits for work it queued on the pool then
    deadlocks; it did, hence a subprocess with a timeout)."""
    tests = Path(__file__).parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tests.parent), str(tests)])}
    done = subprocess.run([sys.executable, "-c", CONCURRENT_CALLS], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


@needs_kernel
@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_engine_tokens_equal_with_and_without_the_kernel(temperature):
    """A GQA model in float32, greedy and sampled (X-Instruction's filters), rows of mixed lengths
    stopping at different steps: the same tokens either way."""
    cfg = tiny_cfg()
    params = tiny_params(cfg, seed=3)
    prompts = random_prompts(cfg.vocab_size, [3, 17, 9, 30, 1, 12], seed=4)
    settings = SamplingSettings(max_new_tokens=40, temperature=temperature, top_p=0.9, top_k=20,
                                no_repeat_ngram=3, stop_token_ids=(5,), seed=11)
    outs = {}
    for kernel in ("xla", "native"):
        engine = Engine(params, cfg, batch_size=4, buckets=(16, 32), attention_kernel=kernel)
        assert engine.native_attention == (kernel == "native")
        outs[kernel] = engine.generate(prompts, settings)
    assert outs["native"].tokens == outs["xla"].tokens
    assert len({len(t) for t in outs["xla"].tokens}) > 1 or temperature == 0.0


def test_attention_kernel_choice():
    with pytest.raises(ValueError, match="'auto', 'xla' or 'native'"):
        use_native_attention("fast", None)
    assert use_native_attention("xla", None) is False
    mesh = make_mesh(MeshConfig(data=2, fsdp=1, tensor=4), jax.devices()[:8])
    assert use_native_attention("auto", mesh) is False  # a custom call has no sharding rule
    with pytest.raises(ValueError, match="one CPU device; this mesh has 8"):
        use_native_attention("native", mesh)
    assert use_native_attention("auto", None) is (native_kernels.available() is None)


def test_without_a_compiler_auto_falls_back_and_native_says_why(monkeypatch, tmp_path):
    monkeypatch.setattr(native_kernels, "_state", {})
    monkeypatch.setenv("XINST_JAX_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "no-such-compiler-xinst")
    assert "no-such-compiler-xinst" in native_kernels.available()
    assert use_native_attention("auto", None) is False
    with pytest.raises(ValueError, match="attention_kernel='native': no C\\+\\+ compiler"):
        use_native_attention("native", None)


@needs_kernel
def test_the_build_is_cached_per_machine(monkeypatch, tmp_path):
    """A second process (fresh state) loads the cached library without compiling: with `false` as
    the compiler it would fail. A compile error names the command and keeps the cache clean."""
    monkeypatch.setenv("XINST_JAX_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(native_kernels, "_state", {})
    assert native_kernels.available() is None
    built = list(tmp_path.glob("*.so"))
    assert len(built) == 1
    compiler = native_kernels.os.environ.get("CXX") or "c++"
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / compiler).symlink_to(native_kernels.shutil.which("false"))
    monkeypatch.setenv("PATH", f"{fake}:{native_kernels.os.environ['PATH']}")
    monkeypatch.setattr(native_kernels, "_state", {})
    assert native_kernels.available() is None  # same key: loaded, not rebuilt
    monkeypatch.setattr(native_kernels, "FLAGS", native_kernels.FLAGS + ("-DXINST_NEW_KEY",))
    monkeypatch.setattr(native_kernels, "_state", {})
    error = native_kernels.available()
    assert error is not None and "failed" in error and compiler in error
    assert sorted(tmp_path.glob("*.so")) == built  # no partial library left behind
