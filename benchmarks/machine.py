"""What machine a benchmark ran on: printed beside every figure."""

from __future__ import annotations

import os
import platform


def _cpuinfo_field(name: str) -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(name):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    return _cpuinfo_field("model name") or platform.processor() or platform.machine()


def cpu_flags() -> str:
    """The vector/matrix extensions that decide CPU matmul speed."""
    flags = set((_cpuinfo_field("flags") or "").split())
    return " ".join(sorted(f for f in flags if f.startswith(("avx512f", "avx512_bf16", "amx", "avx2")))) or "?"


def machine_summary() -> str:
    import jax

    return (f"{cpu_model()}, {os.cpu_count()} cores ({cpu_flags()}), jax {jax.__version__}, "
            f"{jax.devices()[0].platform} x{jax.device_count()}")
