"""Process-level setup: multi-host initialisation and fake CPU devices, before jax is used."""

from __future__ import annotations

import logging
import os

import jax

from xinst_jax.config import ConfigError, DistributedConfig

log = logging.getLogger(__name__)
_initialized = False


def is_multi_host_tpu() -> bool:
    """A TPU slice of several hosts, or several slices: launch/tpu_vm.py says so (XINST_TPU_POD),
    multi-slice sets MEGASCALE_NUM_SLICES, and some images export the worker list."""
    return (os.environ.get("XINST_TPU_POD") == "1" or int(os.environ.get("MEGASCALE_NUM_SLICES", "1") or 1) > 1
            or os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0)


def setup_runtime(cfg: DistributedConfig) -> None:
    """Call once per process before touching devices.

    Coordinator, process count and id come from the config, else XINST_* environment variables;
    on a TPU pod with none given, jax discovers them. Heartbeats make a process whose peer died
    exit with an error instead of hanging in a collective.
    """
    global _initialized
    if _initialized:
        return
    if cfg.num_cpu_devices > 0:
        jax.config.update("jax_num_cpu_devices", cfg.num_cpu_devices)
    coordinator = cfg.coordinator or os.environ.get("XINST_COORDINATOR", "")
    num_processes = cfg.num_processes or int(os.environ.get("XINST_NUM_PROCESSES", "0"))
    process_id = cfg.process_id if cfg.process_id >= 0 else int(os.environ.get("XINST_PROCESS_ID", "-1"))
    timeouts = dict(initialization_timeout=cfg.initialization_timeout,
                    heartbeat_timeout_seconds=cfg.heartbeat_timeout)
    if coordinator or num_processes > 1:
        if not coordinator or num_processes < 1 or process_id < 0:
            raise ConfigError("distributed: multi-process runs need coordinator, num_processes and process_id "
                              f"(got {coordinator!r}, {num_processes}, {process_id}); set distributed.* or "
                              "XINST_COORDINATOR / XINST_NUM_PROCESSES / XINST_PROCESS_ID")
        log.info("joining %s as process %d of %d", coordinator, process_id, num_processes)
        jax.distributed.initialize(coordinator, num_processes, process_id, **timeouts)
    elif is_multi_host_tpu():
        jax.distributed.initialize(**timeouts)  # jax finds the workers (TPU metadata, MEGASCALE_*)
    _initialized = True

