"""The baseline in its own process, driven over stdin/stdout as JSON lines.

Two thread pools in one process (XLA's and torch's OpenMP) on few cores spin against each other
and slow torch down several-fold; in its own process torch runs as it would alone, and it sits
idle (blocked on stdin) while ours runs, and vice versa. A benchmark script starts itself with
`--hf-worker`; that process answers each request with `reply`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Iterator

PREFIX = "HFW "  # marks the worker's answers among whatever else it prints


def reply(obj: dict) -> None:
    """Worker side: answer one request."""
    print(PREFIX + json.dumps(obj), flush=True)


def requests() -> Iterator[dict]:
    """Worker side: the parent's requests, until it says quit (answered here)."""
    for line in sys.stdin:
        msg = json.loads(line)
        if msg["cmd"] == "quit":
            reply({})
            return
        yield msg


class WorkerProcess:
    """Parent side: `script --hf-worker` in a child process; `call` sends a request and waits."""

    def __init__(self, script: str, cwd: str, init: dict):
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(script), "--hf-worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, cwd=cwd)
        self.info = self.call(init)

    def call(self, msg: dict) -> dict:
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"transformers worker exited (rc={self.proc.wait()})")
            if line.startswith(PREFIX):
                return json.loads(line[len(PREFIX):])

    def close(self) -> None:
        try:
            self.call(dict(cmd="quit"))
        except (RuntimeError, BrokenPipeError):
            pass
        self.proc.wait(timeout=60)
