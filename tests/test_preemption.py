"""SIGTERM to one worker of a 2-process job (2 x 2 CPU devices, jax.distributed on localhost):
both processes stop after the same step, save one checkpoint together (each its own
data-iterator file), and exit 0; the hosts agree on the signal every
`checkpoint.preemption_sync_every` steps, never with a collective per step."""

from __future__ import annotations

import json
import re
import signal
import time

import pytest

from test_multihost import LAUNCH_TIMEOUT, env, kill_all, multi_launch, read_metrics  # noqa: F401 (env: fixture)

pytestmark = pytest.mark.slow

SYNC_EVERY = 4


def test_sigterm_to_one_worker_stops_both_at_the_same_step(tmp_path, env):  # noqa: F811
    run_dir = tmp_path / "run"
    procs, logs = multi_launch(run_dir, 100_000, env, tmp_path,
                               **{"checkpoint.preemption_sync_every": SYNC_EVERY})
    try:
        deadline = time.monotonic() + LAUNCH_TIMEOUT
        while len(read_metrics(run_dir)) < 3:  # both are training (a step needs both)
            for p, log in zip(procs, logs):
                if p.poll() is not None:
                    pytest.fail(f"{log.name}: exited {p.returncode} before training:\n{log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail("training did not start")
            time.sleep(0.05)
        procs[1].send_signal(signal.SIGTERM)  # only the second worker is told
        rcs = [p.wait(timeout=120) for p in procs]
    finally:
        kill_all(procs)
    outputs = [log.read_text() for log in logs]
    assert rcs == [0, 0], "\n".join(o[-2000:] for o in outputs)
    match = re.search(r"preempted at step (\d+)", outputs[0])
    assert match, outputs[0][-3000:]
    stopped = int(match.group(1))
    # Agreed in the hooks of a sync step, which run while the device computes the next step.
    assert stopped % SYNC_EVERY == 1, stopped
    assert read_metrics(run_dir)[-1]["step"] == stopped
    ckpts = run_dir / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == [str(stopped)], "one checkpoint, saved together"
    for rank in range(2):
        data = json.loads((ckpts / str(stopped) / "data" / f"process_{rank}.json").read_text())
        assert data == {"index": stopped, "process_count": 2}, data
