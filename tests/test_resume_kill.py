"""Exact resume with real processes: `kill -9` at a random step, SIGTERM preemption, and a rerun
of the same command that must end bitwise identical to an uninterrupted run.

Every run is `python launch/tpu_run.py --config tiny_synthetic ...` in its own process (2 fake CPU devices,
so restored arrays must come back sharded). A persistent XLA compilation cache private to this
module keeps the reruns from recompiling; the uninterrupted baseline compiles from scratch.

The kill step is a seeded random choice; set XINST_KILL_SEED to explore other steps.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from xinst_jax.checkpoint import load_params_for_export
from xinst_jax.config import load_config

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
STEPS = 40
EVERY = 5
RUN_TIMEOUT = 240  # seconds for any one training process
SEED = int(os.environ.get("XINST_KILL_SEED", "20240611"))


def overrides(run_dir: Path, **extra) -> list[str]:
    sets = {"run_dir": str(run_dir), "train.steps": STEPS, "checkpoint.every": EVERY, "checkpoint.keep": 3,
            "checkpoint.async_save": "true", "train.export_at_end": "false", "distributed.num_cpu_devices": 2,
            "train.batch_size": 8, "train.seq_len": 128, **extra}
    return [f"{k}={v}" for k, v in sets.items()]


def command(run_dir: Path, **extra) -> list[str]:
    cmd = [sys.executable, str(REPO / "launch" / "tpu_run.py"), "--config", "tiny_synthetic"]
    for item in overrides(run_dir, **extra):
        cmd += ["--set", item]
    return cmd


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    cache = tmp_path_factory.mktemp("xla_cache")
    return {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "2",
            "JAX_COMPILATION_CACHE_DIR": str(cache), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def run_to_end(run_dir: Path, env: dict, **extra) -> subprocess.CompletedProcess:
    proc = subprocess.run(command(run_dir, **extra), env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=RUN_TIMEOUT)
    assert proc.returncode == 0, f"training failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written while we look
            break
    return records


def finalized_steps(ckpt_dir: Path) -> list[int]:
    """Step dirs orbax has committed (in-flight saves live under a temporary name)."""
    if not ckpt_dir.exists():
        return []
    return sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit())


def load_state(step_dir: Path) -> dict:
    """The whole train state of a checkpoint step as numpy arrays (params, opt_state, step, rng)."""
    checkpointer = ocp.PyTreeCheckpointer()
    tree = checkpointer.metadata(step_dir / "state").item_metadata.tree
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return checkpointer.restore(step_dir / "state", args=ocp.args.PyTreeRestore(restore_args=restore_args))


def assert_bitwise_equal(actual, expected, what: str) -> None:
    a_leaves, a_def = jax.tree.flatten_with_path(actual)
    e_leaves, e_def = jax.tree.flatten_with_path(expected)
    assert a_def == e_def, f"{what}: tree structures differ"
    assert len(a_leaves) > 0
    for (path, a), (_, e) in zip(a_leaves, e_leaves):
        a, e = np.asarray(a), np.asarray(e)
        assert a.dtype == e.dtype and a.shape == e.shape, f"{what}{jax.tree_util.keystr(path)}: {a.dtype}{a.shape}"
        if not np.array_equal(a, e):
            diff = np.max(np.abs(a.astype(np.float64) - e.astype(np.float64)))
            raise AssertionError(f"{what}{jax.tree_util.keystr(path)} differs (max abs diff {diff:g})")


def assert_losses_match(records: list[dict], reference: dict[int, dict], what: str) -> None:
    """Every logged step (including steps logged twice around an interruption) has exactly the
    reference run's loss and grad norm for that step."""
    for r in records:
        ref = reference[r["step"]]
        assert (r["loss"], r["grad_norm"]) == (ref["loss"], ref["grad_norm"]), (
            f"{what}: step {r['step']} loss {r['loss']!r} grad_norm {r['grad_norm']!r}; uninterrupted run: "
            f"{ref['loss']!r} {ref['grad_norm']!r}")


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, env) -> dict:
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    run_to_end(run_dir, env)
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert records[-1]["loss"] < records[0]["loss"] - 0.5, "the tiny model should learn the synthetic data"
    return {"run_dir": run_dir, "metrics": {r["step"]: r for r in records},
            "state": load_state(run_dir / "checkpoints" / str(STEPS))}


def check_final(run_dir: Path, baseline: dict) -> None:
    state = load_state(run_dir / "checkpoints" / str(STEPS))
    assert int(state["step"]) == STEPS
    assert_bitwise_equal(state["params"], baseline["state"]["params"], "params")
    assert_bitwise_equal(state["opt_state"], baseline["state"]["opt_state"], "opt_state")
    assert_bitwise_equal(state["rng"], baseline["state"]["rng"], "rng")
    # The export path reads the same params.
    model_cfg = load_config("tiny_synthetic", overrides(run_dir)).model
    assert_bitwise_equal(load_params_for_export(run_dir / "checkpoints", model_cfg),
                         load_params_for_export(baseline["run_dir"] / "checkpoints", model_cfg), "export params")


def in_flight(ckpt_dir: Path) -> list[str]:
    return sorted(p.name for p in ckpt_dir.iterdir() if not p.name.isdigit()) if ckpt_dir.exists() else []


def start_and_wait_for(run_dir: Path, env: dict, target: int, log_path: Path, mid_save: bool = False,
                       **extra) -> subprocess.Popen:
    """Start training; return once metrics.jsonl has reached `target` and a checkpoint is committed.
    With `mid_save`, return after that with the process stopped (SIGSTOP) while an async save of a
    later step is still being written."""
    log = open(log_path, "w")
    proc = subprocess.Popen(command(run_dir, **extra), env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                            text=True)
    ckpt_dir = run_dir / "checkpoints"
    deadline = time.monotonic() + RUN_TIMEOUT
    reached = False
    try:
        while True:
            if not reached:
                records = read_metrics(run_dir)
                reached = bool(records and records[-1]["step"] >= target and (
                    extra.get("checkpoint.every", EVERY) > STEPS or finalized_steps(ckpt_dir)))
                if reached and not mid_save:
                    return proc
            elif in_flight(ckpt_dir):
                proc.send_signal(signal.SIGSTOP)  # freeze every thread, then check the save is still open
                time.sleep(0.05)
                if in_flight(ckpt_dir):
                    return proc
                proc.send_signal(signal.SIGCONT)
            if proc.poll() is not None:
                pytest.fail(f"training exited ({proc.returncode}) before the kill point (step {target}"
                            f"{', mid-save' if mid_save else ''}):\n{log_path.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"training did not reach step {target} in {RUN_TIMEOUT}s")
            time.sleep(0.002)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        log.close()


@pytest.mark.parametrize("mid_save", [False, True], ids=["random-step", "mid-async-save"])
def test_kill9_then_rerun_is_bitwise_identical(tmp_path, env, baseline, mid_save):
    target = random.Random(SEED + 2 * mid_save).randint(8, 30 - EVERY * mid_save)
    run_dir = tmp_path / "run"
    proc = start_and_wait_for(run_dir, env, target, tmp_path / "killed.log", mid_save=mid_save)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL, "the run finished before it could be killed"

    before = read_metrics(run_dir)
    killed_at = before[-1]["step"]
    committed = finalized_steps(run_dir / "checkpoints")
    leftovers = in_flight(run_dir / "checkpoints")
    print(f"kill -9 aimed at step {target}{' (mid-save)' if mid_save else ''}: last logged step {killed_at}, "
          f"committed checkpoints {committed}, in flight: {leftovers}")
    assert target <= killed_at < STEPS
    assert committed and max(committed) <= killed_at
    if mid_save:
        assert leftovers, "the kill should have interrupted an async save"
    assert_losses_match(before, baseline["metrics"], "killed run")

    rerun = run_to_end(run_dir, env)
    after = read_metrics(run_dir)[len(before):]
    resumed_from = after[0]["step"] - 1
    print(f"rerun resumed from step {resumed_from}: {rerun.stdout.strip().splitlines()[-1]}")
    # It resumes from the newest committed checkpoint (never a half-written one) and redoes only
    # the steps after it.
    assert resumed_from == max(committed), (resumed_from, committed)
    assert [r["step"] for r in after] == list(range(resumed_from + 1, STEPS + 1))
    assert_losses_match(after, baseline["metrics"], "resumed run")
    check_final(run_dir, baseline)


def test_sigterm_saves_and_rerun_is_bitwise_identical(tmp_path, env, baseline):
    target = random.Random(SEED + 1).randint(8, 30)
    run_dir = tmp_path / "run"
    # No periodic checkpoints: the preemption checkpoint is the only one to resume from.
    proc = start_and_wait_for(run_dir, env, target, tmp_path / "preempted.log", **{"checkpoint.every": 1000})
    proc.send_signal(signal.SIGTERM)
    try:
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    output = (tmp_path / "preempted.log").read_text()
    assert rc == 0, f"preempted run exited {rc}:\n{output[-3000:]}"
    match = re.search(r"preempted at step (\d+)", output)
    assert match, output[-3000:]
    stopped = int(match.group(1))
    before = read_metrics(run_dir)
    print(f"SIGTERM aimed at step {target}: preempted at step {stopped}")
    assert target <= stopped < STEPS
    assert before[-1]["step"] == stopped, "every step up to the preemption checkpoint is logged"
    assert finalized_steps(run_dir / "checkpoints") == [stopped]
    data_state = json.loads((run_dir / "checkpoints" / str(stopped) / "data" / "process_0.json").read_text())
    assert data_state["index"] == stopped
    assert int(load_state(run_dir / "checkpoints" / str(stopped))["step"]) == stopped
    assert_losses_match(before, baseline["metrics"], "preempted run")

    run_to_end(run_dir, env, **{"checkpoint.every": 1000})
    after = read_metrics(run_dir)[len(before):]
    assert [r["step"] for r in after] == list(range(stopped + 1, STEPS + 1))
    assert_losses_match(after, baseline["metrics"], "resumed run")
    check_final(run_dir, baseline)


class SigtermAt:
    """A batch source that sends this process SIGTERM while it hands out batch `index`."""

    def __init__(self, source, index: int):
        self.source, self.index = source, index

    def __iter__(self):
        return self

    def __next__(self):
        if self.source.index == self.index:
            os.kill(os.getpid(), signal.SIGTERM)
        return next(self.source)

    def get_state(self):
        return self.source.get_state()

    def set_state(self, state):
        self.source.set_state(state)


def test_sigterm_right_after_a_periodic_checkpoint(tmp_path):
    """SIGTERM during the step whose end writes a periodic checkpoint: the preemption save then
    finds that step already saved, and must stop cleanly instead of failing to save it twice."""
    from xinst_jax.data.synthetic import SyntheticSource
    from xinst_jax.train.loop import run_training

    # In this process: conftest's 8 CPU devices (fsdp=8).
    cfg = load_config("tiny_synthetic", overrides(tmp_path / "run", **{"train.steps": 12, "distributed.num_cpu_devices": 0,
                                                             "train.batch_size": 8, "train.seq_len": 32}))
    source = SyntheticSource(cfg.data.synthetic, cfg.model.vocab_size, cfg.train.batch_size, cfg.train.seq_len,
                             cfg.seed)
    previous = signal.getsignal(signal.SIGTERM)
    result = run_training(cfg, source=SigtermAt(source, index=2 * EVERY - 1))
    assert signal.getsignal(signal.SIGTERM) == previous, "the trainer restores the SIGTERM handler"
    assert result.preempted and result.final_step == 2 * EVERY
    assert finalized_steps(tmp_path / "run" / "checkpoints") == [EVERY, 2 * EVERY]
    assert [h["step"] for h in result.history] == list(range(1, 2 * EVERY + 1))
