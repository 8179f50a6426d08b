"""Test-wide setup: 8 fake CPU devices (sharding tests), quiet TensorFlow, repo on sys.path."""

import os
import shutil
import sys
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
# torch (the numerical reference) on one thread, here and in subprocesses: its OpenMP threads slow
# down many times over when another test process shares the cores (`make test` runs two).
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# One persistent XLA compilation cache for the whole run, shared by both `make test` processes and
# every subprocess a test starts (they inherit the environment): the same tiny train step, decode
# loop and export compile once per run instead of once per process. Created by the first process
# to load this file (the xdist controller, before it starts the workers) and removed at the end.
# Modules that need their own cache (test_resume_kill, test_multihost) still set theirs.
_OWN_JIT_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_JIT_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="xinst_jax_test_jit_cache-")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# The longest files as measured (pytest --durations), longest first.
LONGEST_FIRST = ("test_xinst_pipeline.py", "test_generate_hf.py", "test_pipeline_demo.py", "test_generate_job.py",
                 "test_demo.py", "test_candidates.py")


def pytest_collection_modifyitems(config, items):
    """The longest files first, then the other files holding a slow test, then the rest (stable
    otherwise): under `pytest -n 2 --dist loadfile` the long end-to-end runs start at once instead
    of last, so the two workers finish together."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}

    def rank(item) -> tuple[int, int]:
        if item.path.name in LONGEST_FIRST:
            return 0, LONGEST_FIRST.index(item.path.name)
        return (1 if item.path in slow_files else 2), 0

    items.sort(key=rank)


def pytest_unconfigure(config):
    if _OWN_JIT_CACHE:
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
