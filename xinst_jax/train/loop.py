"""The training loop: sharded state, auto-resume, async checkpoints, preemption, metrics."""

from __future__ import annotations

import functools
import logging
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from xinst_jax.checkpoint import Checkpointer, check_same_architecture
from xinst_jax.config import Config, ConfigError, to_dict
from xinst_jax.data.batch import BatchSource
from xinst_jax.jobs import register_job
from xinst_jax.model.llama import count_params, logical_axes, param_shapes
from xinst_jax.runtime import setup_runtime
from xinst_jax.sharding import (activation_sharding, batch_sharding, make_mesh, parse_rules, replicated,
                                state_shardings_like_params, tree_shardings)
from xinst_jax.train.flops import peak_flops_per_device, training_flops_per_step
from xinst_jax.train.metrics import MetricsLogger
from xinst_jax.train.optimizer import learning_rate_schedule, make_optimizer
from xinst_jax.train.program import build_train_program, load_pretrained
from xinst_jax.train.step import init_state

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    pass


@dataclass
class TrainResult:
    final_step: int
    state: Any
    history: list[dict]
    preempted: bool = False


class PreemptionWatcher:
    """SIGTERM (how TPU VMs are preempted) or jax's preemption sync point -> save and stop.

    Across hosts the decision is all-gathered so every process saves the same step together.
    """

    def __init__(self):
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum, frame):
        self.requested = True

    def should_stop(self, step: int) -> bool:
        stop = self.requested
        try:
            stop = stop or multihost_utils.reached_preemption_sync_point(step)
        except Exception:  # noqa: BLE001 - no preemption service (single process, CPU)
            pass
        if jax.process_count() > 1:
            stop = bool(np.any(multihost_utils.process_allgather(np.int32(stop))))
        return stop

    def close(self):
        signal.signal(signal.SIGTERM, self._previous)


def make_source(cfg: Config, rows: int) -> BatchSource:
    if cfg.data.source == "synthetic":
        from xinst_jax.data.synthetic import SyntheticSource

        return SyntheticSource(cfg.data.synthetic, cfg.model.vocab_size, rows, cfg.train.seq_len, cfg.seed,
                               jax.process_index(), jax.process_count())
    if cfg.data.source == "tfrecord":
        from xinst_jax.data.pipeline import make_pipeline_source

        return make_pipeline_source(cfg, rows, jax.process_index(), jax.process_count())
    raise ConfigError(f"data.source: unknown source '{cfg.data.source}'")


def run_training(cfg: Config, source: BatchSource | None = None, stop_after: int | None = None) -> TrainResult:
    """Train `cfg.train.steps` steps (resuming when a checkpoint exists). `stop_after` ends the run
    early after that many steps of this invocation (tests)."""
    setup_runtime(cfg.distributed)
    program = build_train_program(cfg)
    mesh, optimizer, state_sh, batch_sh = program.mesh, program.optimizer, program.state_sharding, \
        program.batch_sharding
    run_dir = cfg.resolved_run_dir()
    rng = jax.random.key(cfg.seed)

    source = source or make_source(cfg, program.host_rows)
    checkpointer = Checkpointer(cfg.checkpoint.dir or run_dir / "checkpoints", cfg.checkpoint)
    restored = None
    if cfg.checkpoint.resume:
        restored = checkpointer.restore_latest(program.abstract_state)
    if restored is not None:
        start_step, state, data_state, saved_config = restored
        check_same_architecture(saved_config, cfg.model, str(checkpointer.directory / str(start_step)))
        source.set_state(data_state)
        log.info("resumed from step %d", start_step)
    else:
        start_step = 0
        if cfg.train.init_from:
            state = load_pretrained(cfg, rng, optimizer, state_sh)
        else:
            state = jax.jit(functools.partial(init_state, cfg.model, optimizer), out_shardings=state_sh)(rng)

    step_fn = program.step_fn
    flops_per_step = training_flops_per_step(cfg.model, cfg.train.batch_size, cfg.train.seq_len)
    peak, peak_source = peak_flops_per_device()
    tokens_per_step = cfg.train.batch_size * cfg.train.seq_len
    logger = MetricsLogger(run_dir, cfg.train.steps, start_step)
    logger.write(f"model {count_params(cfg.model) / 1e6:.2f}M params | mesh {dict(mesh.shape)} | "
                 f"{jax.device_count()} {jax.devices()[0].platform} devices, {jax.process_count()} process(es) | "
                 f"MFU against {peak / 1e12:.3g} TFLOP/s per device ({peak_source})")
    config_dict = to_dict(cfg)
    watcher = PreemptionWatcher()
    history: list[dict] = []
    pending: tuple[int, Any] | None = None
    last_time = time.perf_counter()
    last_saved = start_step
    saved_at = start_step if restored is not None else None  # the newest step this run has a checkpoint of
    preempted = False
    end = cfg.train.steps if stop_after is None else min(cfg.train.steps, start_step + stop_after)

    def finish_step(step: int, device_metrics: Any) -> None:
        nonlocal last_time
        metrics = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
        if not math.isfinite(metrics["loss"]) or not math.isfinite(metrics["grad_norm"]):
            raise TrainingDiverged(f"non-finite loss ({metrics['loss']}) or grad norm ({metrics['grad_norm']}) "
                                   f"at step {step}; last good checkpoint is step {last_saved} in "
                                   f"{checkpointer.directory}")
        now = time.perf_counter()
        step_time, last_time = now - last_time, now
        metrics.update(step_time=step_time, tokens_per_s=tokens_per_step / step_time,
                       real_tokens_per_s=metrics["real_tokens"] / step_time,
                       mfu=flops_per_step / step_time / (peak * jax.device_count()))
        history.append({"step": step, **metrics})
        logger.log(step, metrics)
        logger.advance()
        if cfg.train.log_every > 0 and step % cfg.train.log_every == 0:  # a plain line for pod logs
            logger.write(f"step {step}: loss {metrics['loss']:.4f} | grad norm {metrics['grad_norm']:.3f} | "
                         f"lr {metrics['learning_rate']:.3g} | {metrics['tokens_per_s']:.0f} tok/s "
                         f"({metrics['real_tokens_per_s']:.0f} real) | step {step_time * 1e3:.0f} ms | "
                         f"MFU {metrics['mfu']:.1%}")

    try:
        for step in range(start_step, end):
            if watcher.should_stop(step):
                if pending is not None:
                    finish_step(*pending)
                    pending = None
                if step != saved_at:  # a periodic save (or the restore) may already hold this step
                    checkpointer.save(step, state, source.get_state(), config_dict, force=True)
                checkpointer.wait()
                logger.write(f"preempted at step {step}: checkpoint saved; rerun the same command to resume")
                preempted = True
                break
            _maybe_profile(cfg, run_dir, step, start_step)
            local = next(source)
            batch = {k: jax.make_array_from_process_local_data(batch_sh, v) for k, v in local.items()}
            state, metrics = step_fn(state, batch)
            if pending is not None:  # one step behind: the host never stalls the device queue
                finish_step(*pending)
            pending = (step + 1, metrics)
            done = step + 1
            if done % cfg.checkpoint.every == 0 or done == cfg.train.steps:
                finish_step(*pending)  # never checkpoint a step whose loss was not checked
                pending = None
                checkpointer.save(done, state, source.get_state(), config_dict, force=True)
                last_saved = saved_at = done
        if pending is not None:
            finish_step(*pending)
    except TrainingDiverged as e:
        logger.write(f"error: {e}")
        raise
    finally:  # any exit: restore the SIGTERM handler, finish in-flight saves, flush metrics
        watcher.close()
        logger.close()
        checkpointer.close()
    final_step = int(jax.device_get(state["step"]))
    if cfg.train.export_at_end and not preempted and final_step == cfg.train.steps:
        from xinst_jax.convert.hf import export_hf

        # The export carries the tokenizer the data was prepared with unless another is named.
        tokenizer = cfg.export.tokenizer_dir or cfg.data.tokenizer
        tokenizer_dir = tokenizer if not tokenizer or os.path.isdir(tokenizer) else os.path.dirname(tokenizer)
        out = export_hf(state["params"], cfg.model, cfg.export.out or run_dir / "hf", dtype=cfg.export.dtype,
                        max_shard_bytes=cfg.export.max_shard_bytes, tokenizer_dir=tokenizer_dir or None)
        logger.write(f"exported Hugging Face model to {out}")
    return TrainResult(final_step, state, history, preempted)


_profiling = False


def _maybe_profile(cfg: Config, run_dir: Path, step: int, start_step: int) -> None:
    """Trace `train.profile_steps` steps after two warm-up steps into <run_dir>/profile."""
    global _profiling
    n = cfg.train.profile_steps
    if n <= 0 or jax.process_index() != 0:
        return
    if step == start_step + 2:
        jax.profiler.start_trace(str(run_dir / "profile"))
        _profiling = True
    elif _profiling and step == start_step + 2 + n:
        jax.profiler.stop_trace()
        _profiling = False


@register_job("train")
def train_job(cfg: Config) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = run_training(cfg)
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    if result.history:
        first, last = result.history[0], result.history[-1]
        print(f"steps {first['step']}..{last['step']}: loss {first['loss']:.4f} -> {last['loss']:.4f}", flush=True)
