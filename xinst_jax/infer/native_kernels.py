"""CPU kernels that XLA:CPU runs poorly, built from C++ on first use and called through XLA's FFI.

`decode_attention` is the decode step's attention over the KV cache. XLA runs it as two batched
dots over every cache slot, with a mask, and its dot library takes ~3 us per (row, kv head) GEMM
of a few rows: about a fifth of a SmolLM2 bf16 decode step on two cores. The kernel visits only
each row's real slots and splits the (row, kv head) pairs over XLA's intra-op threads.

The source (`kernels/*.cc`) is compiled once per machine with the system C++ compiler
(`$CXX`, else `c++`) and `-march=native`, into a cache keyed by the source, the flags, jaxlib's
version and the CPU's model and feature flags (`$XINST_JAX_KERNEL_CACHE`, else
`$XDG_CACHE_HOME/xinst_jax/kernels`, else `~/.cache/xinst_jax/kernels`). Without a compiler the
engine keeps XLA's attention (`available()` says why). Only the CPU backend runs these kernels.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "kernels" / "decode_attention.cc"
FLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-std=c++17", "-shared", "-fPIC")
TARGETS = {jnp.dtype(jnp.bfloat16): ("xinst_decode_attention_bf16", "XinstDecodeAttentionBf16"),
           jnp.dtype(jnp.float32): ("xinst_decode_attention_f32", "XinstDecodeAttentionF32")}

_lock = threading.Lock()
_state: dict = {}  # "library" (ctypes.CDLL) or "error" (str), once tried
_registered: list[ctypes.CDLL] = []  # the library whose handlers XLA holds (at most one per process)


def cache_dir() -> Path:
    if os.environ.get("XINST_JAX_KERNEL_CACHE"):
        return Path(os.environ["XINST_JAX_KERNEL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "xinst_jax" / "kernels"


def _cpu_signature() -> str:
    """The CPU's model and feature flags: a -march=native build must not run on another CPU."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    keep = [ln for ln in lines if ln.split(":")[0].strip() in ("model name", "flags", "Features", "CPU part")]
    return "\n".join(sorted(set(keep))) or platform.machine()


def _library_path(compiler: str) -> Path:
    key = hashlib.sha256("\0".join([SOURCE.read_text(), compiler, " ".join(FLAGS), jaxlib.__version__,
                                    platform.machine(), _cpu_signature()]).encode()).hexdigest()[:16]
    return cache_dir() / f"decode_attention-{key}.so"


def _build() -> ctypes.CDLL:
    compiler = os.environ.get("CXX") or "c++"
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler ({compiler!r} not on PATH; set $CXX)")
    path = _library_path(compiler)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        # Build beside the target and rename: processes that build at once each install a whole file.
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
        os.close(fd)
        cmd = [compiler, *FLAGS, "-isystem", jax.ffi.include_dir(), str(SOURCE), "-o", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            os.unlink(tmp)
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
        os.replace(tmp, path)
        log.info("built %s", path)
    library = ctypes.cdll.LoadLibrary(str(path))
    if not _registered:  # XLA keeps the first handlers registered under a name for the process
        for target, symbol in TARGETS.values():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
        _registered.append(library)
    return library


def available() -> str | None:
    """None when the kernels are built and registered (building them on first call); else why not."""
    with _lock:
        if not _state:
            try:
                _state["library"] = _build()
            except (OSError, RuntimeError) as e:
                _state["error"] = str(e)
                log.warning("native CPU kernels unavailable, using XLA's attention: %s", e)
        return _state.get("error")


def decode_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, first: jnp.ndarray,
                     last: jnp.ndarray) -> jnp.ndarray:
    """q [B, 1, H, D] float32, k/v caches [B, KV, S, D] (float32 or bfloat16), first [B], last []
    -> [B, 1, H, D] float32: row b attends to slots [first[b], last] (the same math as
    `decode_model._attention` under that mask). Call `available()` first."""
    b, t, h, d = q.shape
    kv = k.shape[1]
    if t != 1 or h % kv or k.shape != v.shape or k.shape[0] != b or k.shape[3] != d or k.dtype != v.dtype:
        raise ValueError(f"decode_attention: q {q.shape} needs one token per row and k = v [B, KV, S, D] "
                         f"with KV dividing the heads; got k {k.shape} {k.dtype}, v {v.shape} {v.dtype}")
    if k.dtype not in TARGETS:
        raise ValueError(f"decode_attention: cache dtype {k.dtype} (float32 or bfloat16 only)")
    out = jax.ffi.ffi_call(TARGETS[k.dtype][0], jax.ShapeDtypeStruct((b, kv, h // kv, d), jnp.float32))(
        q.astype(jnp.float32).reshape(b, kv, h // kv, d), k, v, first.astype(jnp.int32),
        jnp.reshape(last, (1,)).astype(jnp.int32))
    return out.reshape(b, 1, h, d)
