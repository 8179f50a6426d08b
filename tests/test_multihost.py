"""Multi-host training on one machine: 2 processes x 2 CPU devices joined by jax.distributed
(localhost coordinator, gloo collectives) against 1 process x 4 devices.

* The two layouts see the same global batch (the synthetic source generates rows by global row
  index) and the same mesh (fsdp=4), so their losses agree to float tolerance.
* Both processes save one checkpoint together (each writes its own data-iterator file) and a second
  launch with more steps resumes together, matching the 1-process run continued the same way.
* A worker killed with SIGKILL makes its peer exit non-zero within a bounded time (heartbeats)
  instead of hanging in a collective.

Every subprocess runs under a deadline and is killed in a `finally`. A persistent XLA compilation
cache private to this module lets the second launch of each layout skip compilation.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from xinst_jax.checkpoint import CHECKSUMS_FILE, state_digests

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
FIRST_STEPS, MORE_STEPS = 6, 10
RTOL = 1e-5
LAUNCH_TIMEOUT = 240  # seconds for one launch (all its processes)
HEARTBEAT_S = 10
DEAD_PEER_EXIT_S = 60  # the survivor must be gone this long after its peer was killed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    cache = tmp_path_factory.mktemp("xla_cache")
    base = {k: v for k, v in os.environ.items() if not k.startswith("XINST_")}
    return {**base, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "2",
            "JAX_COMPILATION_CACHE_DIR": str(cache), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def command(run_dir: Path, steps: int, **extra) -> list[str]:
    # A constant learning rate after warm-up: the compiled step does not depend on train.steps, so
    # every launch of a layout after the first loads it from the compilation cache, and raising
    # train.steps to continue a run does not change the schedule of the steps already taken.
    sets = {"run_dir": str(run_dir), "train.steps": steps, "train.schedule": "constant",
            "checkpoint.every": 1000, "checkpoint.async_save": "true",
            "train.export_at_end": "false", "train.batch_size": 8, "train.seq_len": 64,
            "train.eval_every": 3, "train.eval_batches": 2, **extra}
    cmd = [sys.executable, str(REPO / "launch" / "tpu_run.py"), "--config", "tiny_synthetic"]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={v}"]
    return cmd


def start(cmd: list[str], env: dict, log_path: Path, extra_env: dict | None = None) -> subprocess.Popen:
    log = open(log_path, "w")
    try:
        return subprocess.Popen(cmd, env={**env, **(extra_env or {})}, cwd=REPO, stdout=log,
                                stderr=subprocess.STDOUT)
    finally:
        log.close()  # the child holds its own descriptor


def kill_all(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass


def wait_all(procs: list[subprocess.Popen], logs: list[Path], timeout: float) -> None:
    """Every process exits 0 within `timeout` seconds, else fail with the logs."""
    deadline = time.monotonic() + timeout
    try:
        for p, log in zip(procs, logs):
            try:
                rc = p.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pytest.fail(f"{log.name}: still running after {timeout}s:\n{log.read_text()[-3000:]}")
            assert rc == 0, f"{log.name}: exit {rc}:\n{log.read_text()[-4000:]}"
    finally:
        kill_all(procs)


def single_launch(run_dir: Path, steps: int, env: dict, log_dir: Path) -> tuple[list, list]:
    log = log_dir / f"single_{steps}.log"
    return [start(command(run_dir, steps, **{"distributed.num_cpu_devices": 4}), env, log)], [log]


def multi_launch(run_dir: Path, steps: int, env: dict, log_dir: Path, via_env: bool = False,
                 **extra) -> tuple[list, list]:
    """Both processes of a 2 x 2-device job; rank via --set, or via the XINST_* variables."""
    coordinator = f"127.0.0.1:{free_port()}"
    procs, logs = [], []
    for rank in range(2):
        log = log_dir / f"multi_{steps}_p{rank}.log"
        sets = {"distributed.num_cpu_devices": 2, **extra}
        extra_env = None
        if via_env:
            extra_env = {"XINST_COORDINATOR": coordinator, "XINST_NUM_PROCESSES": "2", "XINST_PROCESS_ID": str(rank)}
        else:
            sets.update({"distributed.coordinator": coordinator, "distributed.num_processes": 2,
                         "distributed.process_id": rank})
        procs.append(start(command(run_dir, steps, **sets), env, log, extra_env))
        logs.append(log)
    return procs, logs


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    records = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written while we look
            break
    return records


def load_params(step_dir: Path) -> dict:
    checkpointer = ocp.PyTreeCheckpointer()
    tree = checkpointer.metadata(step_dir / "state").item_metadata.tree
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return checkpointer.restore(step_dir / "state", args=ocp.args.PyTreeRestore(restore_args=restore_args))["params"]


def compare_losses(multi: list[dict], single: list[dict], steps: list[int]) -> float:
    assert [r["step"] for r in multi] == steps, [r["step"] for r in multi]
    assert [r["step"] for r in single] == steps, [r["step"] for r in single]
    worst = 0.0
    for m, s in zip(multi, single):
        assert ("eval_loss" in m) == ("eval_loss" in s) == (m["step"] % 3 == 0 or m["step"] == steps[-1])
        for key in ("loss", "grad_norm") + (("eval_loss",) if "eval_loss" in m else ()):
            rel = abs(m[key] - s[key]) / abs(s[key])
            worst = max(worst, rel)
            assert math.isclose(m[key], s[key], rel_tol=RTOL), (
                f"step {m['step']} {key}: 2 processes {m[key]!r}, 1 process {s[key]!r} (rel {rel:.2e})")
        assert m["loss_tokens"] == s["loss_tokens"], "the two layouts must see the same global batch"
    return worst


def test_synthetic_rows_do_not_depend_on_the_host_split():
    """The premise of the comparison below: host i of n gets rows [i*r, (i+1)*r) of one global batch."""
    from xinst_jax.config import SyntheticDataConfig
    from xinst_jax.data.synthetic import SyntheticSource

    cfg = SyntheticDataConfig()
    whole = SyntheticSource(cfg, 512, 8, 64, seed=3).batch_at(5)
    for n in (2, 4):
        parts = [SyntheticSource(cfg, 512, 8 // n, 64, 3, i, n).batch_at(5) for i in range(n)]
        for key, value in whole.items():
            np.testing.assert_array_equal(np.concatenate([part[key] for part in parts]), value)
    assert not np.array_equal(whole["inputs"][:4], whole["inputs"][4:]), "hosts must not get the same rows"
    other_step = SyntheticSource(cfg, 512, 8, 64, seed=3).batch_at(6)
    assert not np.array_equal(whole["inputs"], other_step["inputs"])
    with pytest.raises(ValueError):
        SyntheticSource(cfg, 512, 4, 64, 3, 2, 2)


def test_two_processes_match_one_and_resume_together(tmp_path, env):
    single_dir, multi_dir = tmp_path / "single", tmp_path / "multi"
    procs: list[subprocess.Popen] = []
    try:
        # Launch 1: 6 steps, one checkpoint at the end. The 1-process reference runs alongside.
        p1, l1 = multi_launch(multi_dir, FIRST_STEPS, env, tmp_path)
        p2, l2 = single_launch(single_dir, FIRST_STEPS, env, tmp_path)
        procs = p1 + p2
        wait_all(procs, l1 + l2, LAUNCH_TIMEOUT)
        assert "2 process(es)" in l1[0].read_text() and "4 cpu devices" in l1[0].read_text()
        assert "1 process(es)" in l2[0].read_text() and "4 cpu devices" in l2[0].read_text()
        multi_1, single_1 = read_metrics(multi_dir), read_metrics(single_dir)
        worst = compare_losses(multi_1, single_1, list(range(1, FIRST_STEPS + 1)))

        ckpts = multi_dir / "checkpoints"
        assert sorted(p.name for p in ckpts.iterdir()) == [str(FIRST_STEPS)], "one checkpoint, saved together"
        for rank in range(2):
            data = json.loads((ckpts / str(FIRST_STEPS) / "data" / f"process_{rank}.json").read_text())
            assert data == {"index": FIRST_STEPS, "process_count": 2}, data
            assert (ckpts / str(FIRST_STEPS) / "data" / f"process_{rank}.sha256").is_file()
        # The digests the 2 processes saved are those one process computes from the saved params.
        saved = json.loads((ckpts / str(FIRST_STEPS) / "checksums" / CHECKSUMS_FILE).read_text())["arrays"]
        here = state_digests({"params": load_params(ckpts / str(FIRST_STEPS))})
        assert here == {name: d for name, d in saved.items() if name.startswith("params/")}

        # Launch 2: raise train.steps; both processes resume from step 6 (rank via XINST_* this time).
        p1, l1 = multi_launch(multi_dir, MORE_STEPS, env, tmp_path, via_env=True)
        p2, l2 = single_launch(single_dir, MORE_STEPS, env, tmp_path)
        procs = p1 + p2
        wait_all(procs, l1 + l2, LAUNCH_TIMEOUT)
        for log in l1:  # both processes verified the checksums of step 6 and kept it
            assert "does not restore" not in log.read_text() and "unverified" not in log.read_text()
        multi_2, single_2 = read_metrics(multi_dir)[len(multi_1):], read_metrics(single_dir)[len(single_1):]
        worst = max(worst, compare_losses(multi_2, single_2, list(range(FIRST_STEPS + 1, MORE_STEPS + 1))))
        for rank in range(2):
            data = json.loads((ckpts / str(MORE_STEPS) / "data" / f"process_{rank}.json").read_text())
            assert data["index"] == MORE_STEPS

        multi_params = load_params(ckpts / str(MORE_STEPS))
        single_params = load_params(single_dir / "checkpoints" / str(MORE_STEPS))
        max_param_diff = max(float(np.max(np.abs(a - b))) for a, b in
                             zip(jax.tree.leaves(multi_params), jax.tree.leaves(single_params)))
        print(f"2x2 vs 1x4: worst relative loss/grad-norm diff {worst:.3g} over steps 1..{MORE_STEPS}, "
              f"max |param diff| after step {MORE_STEPS}: {max_param_diff:.3g}")
        for a, b in zip(jax.tree.leaves(multi_params), jax.tree.leaves(single_params)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    finally:
        kill_all(procs)


@pytest.mark.parametrize("victim", [1, 0], ids=["kill-worker", "kill-coordinator"])
def test_dead_peer_makes_the_other_exit(tmp_path, env, victim):
    run_dir = tmp_path / "run"
    procs, logs = multi_launch(run_dir, 100_000, env, tmp_path,
                               **{"distributed.heartbeat_timeout": HEARTBEAT_S})
    try:
        deadline = time.monotonic() + LAUNCH_TIMEOUT
        while len(read_metrics(run_dir)) < 2:  # training has started on both (a step needs both)
            for p, log in zip(procs, logs):
                if p.poll() is not None:
                    pytest.fail(f"{log.name}: exited {p.returncode} before training:\n{log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail("training did not start")
            time.sleep(0.05)
        procs[victim].send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        survivor = procs[1 - victim]
        try:
            rc = survivor.wait(timeout=DEAD_PEER_EXIT_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"process {1 - victim} still running {DEAD_PEER_EXIT_S}s after process {victim} was "
                        f"killed:\n{logs[1 - victim].read_text()[-3000:]}")
        elapsed = time.monotonic() - killed_at
        print(f"process {victim} killed after step {read_metrics(run_dir)[-1]['step']}: process {1 - victim} "
              f"exited with {rc} after {elapsed:.1f}s")
        assert procs[victim].wait(timeout=30) == -signal.SIGKILL
        assert rc != 0, f"survivor exited 0:\n{logs[1 - victim].read_text()[-3000:]}"
        assert read_metrics(run_dir)[-1]["step"] < 100_000
    finally:
        kill_all(procs)
