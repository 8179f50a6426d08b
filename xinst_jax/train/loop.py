"""The training loop: a `Trainer` that runs the jitted step over batches, and hooks that run
every N steps (as Levanter's `Trainer.add_hook`): metrics, held-out loss, checkpoints,
preemption, profiling, Hugging Face export. `run_training` wires them for a config.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import numpy as np
from jax.experimental import multihost_utils

from xinst_jax import paths
from xinst_jax.checkpoint import Checkpointer
from xinst_jax.config import (Config, ConfigError, architecture_is_default, check_same_architecture, to_dict,
                              validate)
from xinst_jax.data.batch import BatchSource, empty_rows
from xinst_jax.jobs import register_job
from xinst_jax.model.llama import count_params
from xinst_jax.runtime import setup_runtime
from xinst_jax.train.flops import peak_flops_per_device, training_flops_per_step
from xinst_jax.train.metrics import MetricsLogger
from xinst_jax.train.program import TrainProgram, build_train_program, load_pretrained
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


# --------------------------------------------------------------------------- the loop


@dataclass
class StepInfo:
    step: int  # optimizer steps done
    metrics: dict[str, float]  # this step's values, on the host
    state: dict | None  # the train state after `step`; None when the hooks run a step late
    last: bool = False  # the run's last step: its end, or the step at which a stop was requested


@dataclass
class _Hook:
    fn: Callable[[StepInfo], None]
    every: int
    needs_state: bool
    at_end: bool

    def periodic(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0


class Trainer:
    """`state = step_fn(state, batch)` from `start_step` to `end_step`; after each step, the hooks
    due at it, in the order they were added.

    Hooks that read only metrics run one step late, while the device computes the next step, so
    the host never stalls the device queue. At a step where a hook needs the state (a checkpoint,
    the export), the last step, or after a stop request, the step's hooks run before the next
    step is dispatched (the step donates the state it is given)."""

    def __init__(self, step_fn: Callable, next_batch: Callable[[], dict], state: dict, start_step: int,
                 end_step: int):
        self.step_fn, self.next_batch, self.state = step_fn, next_batch, state
        self.start_step, self.end_step = start_step, end_step
        self.step = start_step  # optimizer steps done
        self.hooks: list[_Hook] = []
        self.stop_requested = False

    def add_hook(self, fn: Callable[[StepInfo], None], every: int = 1, *, needs_state: bool = False,
                 at_end: bool = False) -> None:
        """Run `fn(StepInfo)` after every `every`-th step (0: not periodically); with `at_end`,
        also after the run's last step. `needs_state`: `fn` reads `info.state`."""
        self.hooks.append(_Hook(fn, every, needs_state, at_end))

    def request_stop(self) -> None:
        """End the run after the current step's hooks (the at_end hooks run for it)."""
        self.stop_requested = True

    def run(self) -> dict:
        late = None  # (step, device metrics) whose hooks wait until the next step is dispatched
        for step in range(self.start_step + 1, self.end_step + 1):
            self.state, metrics = self.step_fn(self.state, self.next_batch())
            self.step = step
            if late is not None:
                self._run_hooks(*late)  # the previous step's, while this one computes
            late = (step, metrics)
            if self.stop_requested or step == self.end_step or self._needs_state(step):
                self._run_hooks(*late, state=self.state)  # before the next step takes the state
                late = None
            if self.stop_requested:
                break
        return self.state

    def _needs_state(self, step: int) -> bool:
        return any(h.needs_state and h.periodic(step) for h in self.hooks)

    def _run_hooks(self, step: int, device_metrics: Any, state: dict | None = None) -> None:
        info = StepInfo(step, {k: float(v) for k, v in jax.device_get(device_metrics).items()}, state)
        for hook in self.hooks:
            # `last` only where the state is at hand: late (metrics-only) runs are never the last step.
            info.last = state is not None and (step == self.end_step or self.stop_requested)
            if hook.periodic(step) or (hook.at_end and info.last):
                hook.fn(info)


# --------------------------------------------------------------------------- hooks


class CheckFinite:
    """First hook: a non-finite loss or grad norm stops the run before anything saves that step."""

    def __init__(self, checkpoints: "SaveCheckpoint"):
        self.checkpoints = checkpoints

    def __call__(self, info: StepInfo) -> None:
        loss, grad_norm = info.metrics["loss"], info.metrics["grad_norm"]
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            saved = self.checkpoints.saved_at
            good = f"last good checkpoint is step {saved}" if saved is not None else "no checkpoint yet"
            raise TrainingDiverged(f"non-finite loss ({loss}) or grad norm ({grad_norm}) at step {info.step}; "
                                   f"{good} in {self.checkpoints.checkpointer.directory}")


class EvalLoss:
    """The held-out loss: the token-weighted mean cross-entropy of the current params over the same
    global batches every time (kept on the devices), added to the step's metrics as `eval_loss`
    and `eval_tokens` before LogMetrics logs them. Every batch is dispatched before any result is
    fetched; the sums are divided once, as the train step normalises its loss."""

    def __init__(self, eval_fn: Callable, batches: list[dict]):
        self.eval_fn, self.batches = eval_fn, batches

    def __call__(self, info: StepInfo) -> None:
        sums = jax.device_get([self.eval_fn(info.state["params"], batch) for batch in self.batches])
        loss, tokens = (float(sum(x)) for x in zip(*sums))
        info.metrics["eval_loss"] = loss / max(tokens, 1.0)
        info.metrics["eval_tokens"] = tokens


def eval_batches(cfg: Config, program: TrainProgram) -> list[dict]:
    """train.eval_batches global batches of held-out data, placed like the train batches: the first
    of the prepared held-out shards (Config.held_out) read once (one epoch), or of a synthetic
    stream of another seed. A host whose share runs out pads with empty rows (no loss tokens), so
    that every host places the same number of batches (each placement is a collective)."""
    held_out = cfg.held_out()
    data = dataclasses.replace(held_out.data, num_epochs=1, mix_log_every=0)
    source = make_source(dataclasses.replace(held_out, data=data, seed=cfg.seed + 1), program.host_rows)
    host = list(itertools.islice(source, cfg.train.eval_batches))
    if not host and jax.process_count() == 1:
        raise ConfigError(f"data.eval_prepared_dir: {data.prepared_dir} holds no examples")
    host += [empty_rows(program.host_rows, cfg.train.seq_len)] * (cfg.train.eval_batches - len(host))
    place = device_batches(iter(host), program.batch_sharding)
    return [place() for _ in host]


class LogMetrics:
    """Throughput and MFU added to the step's metrics; every step to metrics.jsonl, TensorBoard
    and `history`; every `log_every` steps one plain summary line (pod logs have no progress bar)."""

    def __init__(self, cfg: Config, logger: MetricsLogger):
        self.logger, self.log_every = logger, cfg.train.log_every
        self.tokens_per_step = cfg.train.batch_size * cfg.train.seq_len
        self.flops_per_step = training_flops_per_step(cfg.model, cfg.train.batch_size, cfg.train.seq_len)
        self.peak, self.peak_source = peak_flops_per_device()
        self.history: list[dict] = []
        self._last_time = time.perf_counter()

    def __call__(self, info: StepInfo) -> None:
        now = time.perf_counter()
        step_time, self._last_time = now - self._last_time, now
        m = dict(info.metrics, step_time=step_time, tokens_per_s=self.tokens_per_step / step_time,
                 real_tokens_per_s=info.metrics["real_tokens"] / step_time,
                 mfu=self.flops_per_step / step_time / (self.peak * jax.device_count()))
        self.history.append({"step": info.step, **m})
        self.logger.log(info.step, m)
        if self.log_every > 0 and info.step % self.log_every == 0:
            self.logger.write(f"step {info.step}: loss {m['loss']:.4f} | grad norm {m['grad_norm']:.3f} | "
                              f"lr {m['learning_rate']:.3g} | {m['tokens_per_s']:.0f} tok/s "
                              f"({m['real_tokens_per_s']:.0f} real) | step {step_time * 1e3:.0f} ms | "
                              f"MFU {m['mfu']:.1%}")

    def summary(self) -> str | None:
        """The run's one closing line."""
        if not self.history:
            return None
        first, last = self.history[0], self.history[-1]
        return f"train: steps {first['step']}..{last['step']}: loss {first['loss']:.4f} -> {last['loss']:.4f}"


class SaveCheckpoint:
    """State + this process's data-iterator state + the config, at most once per step."""

    def __init__(self, checkpointer: Checkpointer, source: BatchSource, config: dict, saved_at: int | None):
        self.checkpointer, self.source, self.config = checkpointer, source, config
        self.saved_at = saved_at  # the newest step with a checkpoint (the restored one, at first)

    def __call__(self, info: StepInfo) -> None:
        if info.step != self.saved_at:  # a stop right after a periodic save: already saved
            self.checkpointer.save(info.step, info.state, self.source.get_state(), self.config, force=True)
            self.saved_at = info.step


class PreemptionWatcher:
    """SIGTERM (how TPU VMs and most schedulers preempt) or jax's preemption sync point -> stop.

    All hosts must stop after the same step and save together. jax's sync point already answers
    the same on every host. A SIGTERM can reach hosts at different steps, so with several
    processes the local flag counts only at agreed steps (every `sync_every` steps and at
    checkpoint steps), where one all-gather tells every host whether any was signalled: one
    collective per `sync_every` steps, not per step. One process acts on it at once."""

    def __init__(self, trainer: Trainer, sync_every: int, checkpoint_every: int):
        self.trainer, self.sync_every, self.checkpoint_every = trainer, sync_every, checkpoint_every
        self.signalled = False  # this process got SIGTERM
        self._sync_point_service = True
        self._previous = signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.signalled = True

    def __call__(self, info: StepInfo) -> None:
        # Once stopping, every host is (they decided at the same step): no further collectives.
        if not self.trainer.stop_requested and self._should_stop(info.step):
            self.trainer.request_stop()

    def _should_stop(self, step: int) -> bool:
        if self._reached_sync_point(step):
            return True
        if jax.process_count() == 1:
            return self.signalled
        if step % self.sync_every and step % self.checkpoint_every:
            return False
        return bool(np.any(multihost_utils.process_allgather(np.int32(self.signalled))))

    def _reached_sync_point(self, step: int) -> bool:
        if not self._sync_point_service:
            return False
        try:
            return multihost_utils.reached_preemption_sync_point(step)
        except Exception:  # noqa: BLE001 - no preemption service (one process, CPU, GPU): stop asking
            self._sync_point_service = False
            return False

    def close(self) -> None:
        signal.signal(signal.SIGTERM, self._previous)


class Profile:
    """Trace `steps` steps, after two warm-up steps, into <run_dir>/profile (process 0)."""

    def __init__(self, directory: Path, start_step: int, steps: int):
        self.directory, self.first, self.steps = directory, start_step + 2, steps
        self.active = False

    def __call__(self, info: StepInfo) -> None:
        if jax.process_index() != 0:
            return
        if info.step == self.first and not info.last:
            jax.profiler.start_trace(str(self.directory))
            self.active = True
        elif self.active and (info.step >= self.first + self.steps or info.last):
            jax.profiler.stop_trace()
            self.active = False


class ExportHF:
    """Write <run_dir>/hf (or export.out), with the data's tokenizer unless export names one."""

    def __init__(self, cfg: Config, logger: MetricsLogger):
        self.cfg, self.logger = cfg, logger

    def __call__(self, info: StepInfo) -> None:
        self.export(info.state["params"])

    def export(self, params) -> None:
        from xinst_jax.convert.hf import export_hf

        cfg = self.cfg
        tokenizer = cfg.export.tokenizer_dir or cfg.data.tokenizer
        tokenizer_dir = tokenizer if not tokenizer or paths.isdir(tokenizer) else os.path.dirname(tokenizer)
        out = export_hf(params, cfg.model, cfg.export.out or cfg.resolved_run_dir() / "hf",
                        dtype=cfg.export.dtype, max_shard_bytes=cfg.export.max_shard_bytes,
                        tokenizer_dir=tokenizer_dir or None)
        self.logger.write(f"exported Hugging Face model to {out}")


# --------------------------------------------------------------------------- a run


def make_source(cfg: Config, rows: int) -> BatchSource:
    if cfg.data.source == "synthetic":
        from xinst_jax.data.synthetic import SyntheticSource

        return SyntheticSource(cfg.data.synthetic, cfg.model.vocab_size, rows, cfg.train.seq_len, cfg.seed,
                               jax.process_index(), jax.process_count())
    if cfg.data.source == "tfrecord":  # the only path that imports TensorFlow
        from xinst_jax.data.pipeline import make_pipeline_source

        return make_pipeline_source(cfg, rows, jax.process_index(), jax.process_count())
    raise ConfigError(f"data.source: unknown source '{cfg.data.source}'")


def resolve_model(cfg: Config) -> Config:
    """With train.init_from and the model left at the schema defaults, the architecture is the
    checkpoint's config.json (as for export and generate)."""
    if not (cfg.train.init_from and architecture_is_default(cfg.model)):
        return cfg
    from xinst_jax.convert.hf import model_for_hf_dir

    paths.check_dir("train.init_from", cfg.train.init_from)
    try:
        cfg = dataclasses.replace(cfg, model=model_for_hf_dir(cfg.model, cfg.train.init_from))
    except ConfigError as e:
        raise ConfigError(f"train.init_from: {e}") from None
    validate(cfg)  # train.seq_len against the checkpoint's max_seq_len
    return cfg


def restore_or_init(cfg: Config, program: TrainProgram, checkpointer: Checkpointer,
                    source: BatchSource) -> tuple[int, dict, bool]:
    """(start step, state, restored): the latest checkpoint that restores (with the data
    iterator's position), else step 0 from train.init_from or a random init."""
    restored = checkpointer.restore_latest(program.abstract_state) if cfg.checkpoint.resume else None
    if restored is not None:
        step, state, data_state, saved_config = restored
        check_same_architecture(cfg.model, saved_config.get("model", {}), str(checkpointer.directory / str(step)))
        source.set_state(data_state)
        log.info("resumed from step %d", step)
        return step, state, True
    rng = jax.random.key(cfg.seed)
    if cfg.train.init_from:
        return 0, load_pretrained(cfg, rng, program.optimizer, program.state_sharding), False
    init = jax.jit(lambda key: init_state(cfg.model, program.optimizer, key), out_shardings=program.state_sharding)
    return 0, init(rng), False


def device_batches(source: Iterator[dict[str, np.ndarray]], sharding: Any) -> Callable[[], dict]:
    """This host's rows of the next batch -> global jax.Arrays."""
    return lambda: {k: jax.make_array_from_process_local_data(sharding, v) for k, v in next(source).items()}


def run_training(cfg: Config, source: BatchSource | None = None, stop_after: int | None = None) -> TrainResult:
    """Train `cfg.train.steps` steps (resuming when a checkpoint exists). `stop_after` ends the run
    early after that many steps of this invocation (tests)."""
    setup_runtime(cfg.distributed)
    cfg = resolve_model(cfg)
    program = build_train_program(cfg)
    run_dir = cfg.resolved_run_dir()
    source = source or make_source(cfg, program.host_rows)
    checkpointer = Checkpointer(cfg.checkpoint.dir or run_dir / "checkpoints", cfg.checkpoint)
    logger = watcher = None
    try:
        start, state, restored = restore_or_init(cfg, program, checkpointer, source)
        end = cfg.train.steps if stop_after is None else min(cfg.train.steps, start + stop_after)
        trainer = Trainer(program.step_fn, device_batches(source, program.batch_sharding), state, start, end)
        logger = MetricsLogger(run_dir, cfg.train.steps, start)
        metrics = LogMetrics(cfg, logger)
        save = SaveCheckpoint(checkpointer, source, to_dict(cfg), saved_at=start if restored else None)
        watcher = PreemptionWatcher(trainer, cfg.checkpoint.preemption_sync_every, cfg.checkpoint.every)
        trainer.add_hook(CheckFinite(save))  # first: no other hook sees a diverged step
        if cfg.train.eval_every > 0:  # before the metrics: its figures join the step's record
            trainer.add_hook(EvalLoss(program.eval_fn, eval_batches(cfg, program)), cfg.train.eval_every,
                             needs_state=True, at_end=True)
        trainer.add_hook(metrics)
        trainer.add_hook(watcher)  # before the save, so that a stop makes this step's save the last
        trainer.add_hook(save, cfg.checkpoint.every, needs_state=True, at_end=True)
        if cfg.train.profile_steps > 0:
            trainer.add_hook(Profile(run_dir / "profile", start, cfg.train.profile_steps), at_end=True)
        export = ExportHF(cfg, logger) if cfg.train.export_at_end else None
        if export is not None:
            trainer.add_hook(export, cfg.train.steps, needs_state=True)
        logger.write(f"model {count_params(cfg.model) / 1e6:.2f}M params | mesh {dict(program.mesh.shape)} | "
                     f"{jax.device_count()} {jax.devices()[0].platform} devices, {jax.process_count()} "
                     f"process(es) | MFU against {metrics.peak / 1e12:.3g} TFLOP/s per device "
                     f"({metrics.peak_source})")
        try:
            state = trainer.run()
        except TrainingDiverged as e:
            logger.write(f"error: {e}")
            raise
        if export is not None and start == end == cfg.train.steps:
            export.export(state["params"])  # a rerun of a finished run: its export may have been cut short
        if trainer.stop_requested:
            logger.write(f"preempted at step {trainer.step}: checkpoint saved; rerun the same command to resume")
        summary = metrics.summary()
        if summary:
            logger.write(summary)
    finally:  # any exit: restore the SIGTERM handler, finish in-flight saves, flush metrics
        if watcher is not None:
            watcher.close()
        if logger is not None:
            logger.close()
        checkpointer.close()
    final_step = int(jax.device_get(state["step"]))
    return TrainResult(final_step, state, metrics.history, preempted=trainer.stop_requested)


@register_job("train")
def train_job(cfg: Config) -> None:
    try:
        run_training(cfg)
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
