"""Exact resume with real processes: `kill -9` at a random step, SIGTERM preemption, and a rerun
of the same command that must end bitwise identical to an uninterrupted run.

Every run is `python launch/tpu_run.py --config demo ...` in its own process (2 fake CPU devices,
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
    cmd = [sys.executable, str(REPO / "launch" / "tpu_run.py"), "--config", "demo"]
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
    model_cfg = load_config("demo", overrides(run_dir)).model
    assert_bitwise_equal(load_params_for_export(run_dir / "checkpoints", model_cfg),
                         load_params_for_export(baseline["run_dir"] / "checkpoints", model_cfg), "export params")


def start_and_wait_for(run_dir: Path, env: dict, target: int, log_path: Path, **extra) -> subprocess.Popen:
    """Start training and return once metrics.jsonl has reached `target` and a checkpoint is committed."""
    log = open(log_path, "w")
    proc = subprocess.Popen(command(run_dir, **extra), env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                            text=True)
    deadline = time.monotonic() + RUN_TIMEOUT
    try:
        while True:
            records = read_metrics(run_dir)
            if records and records[-1]["step"] >= target and (
                    extra.get("checkpoint.every", EVERY) > STEPS or finalized_steps(run_dir / "checkpoints")):
                return proc
            if proc.poll() is not None:
                pytest.fail(f"training exited ({proc.returncode}) before step {target}:\n{log_path.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"training did not reach step {target} in {RUN_TIMEOUT}s")
            time.sleep(0.002)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        log.close()


def test_kill9_then_rerun_is_bitwise_identical(tmp_path, env, baseline):
    target = random.Random(SEED).randint(8, 30)
    run_dir = tmp_path / "run"
    proc = start_and_wait_for(run_dir, env, target, tmp_path / "killed.log")
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL, "the run finished before it could be killed"

    before = read_metrics(run_dir)
    killed_at = before[-1]["step"]
    committed = finalized_steps(run_dir / "checkpoints")
    print(f"kill -9 aimed at step {target}: last logged step {killed_at}, committed checkpoints {committed}, "
          f"in flight: {sorted(p.name for p in (run_dir / 'checkpoints').iterdir() if not p.name.isdigit())}")
    assert target <= killed_at < STEPS
    assert committed and max(committed) <= killed_at
    assert_losses_match(before, baseline["metrics"], "killed run")

    rerun = run_to_end(run_dir, env)
    after = read_metrics(run_dir)[len(before):]
    resumed_from = after[0]["step"] - 1
    print(f"rerun resumed from step {resumed_from}: {rerun.stdout.strip().splitlines()[-1]}")
    # It resumes from the newest committed checkpoint, and redoes only the steps after it.
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
