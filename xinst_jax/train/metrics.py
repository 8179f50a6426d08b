"""Per-step metrics: metrics.jsonl, TensorBoard events (tensorboardX) and a progress bar, on
process 0 only."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import jax

log = logging.getLogger(__name__)

TB_FLUSH_SECS = 10  # metrics.jsonl is the durable record (flushed every step); TensorBoard may lag


class MetricsLogger:
    def __init__(self, run_dir: Path, total_steps: int, start_step: int):
        self.enabled = jax.process_index() == 0
        self._bar = None
        self._jsonl = None
        self._tb = None
        if not self.enabled:
            return
        from tqdm import tqdm

        run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(run_dir / "metrics.jsonl", "a")
        try:
            from tensorboardX import SummaryWriter  # no TensorFlow; imported only where it writes
        except ImportError:  # a hand-assembled environment (setup.py installs it): train anyway
            log.warning("tensorboardX is not installed: no TensorBoard events (metrics.jsonl has every step)")
        else:
            # The file name has the time in seconds: the start step keeps a quick resume from
            # reusing (and truncating) the previous run's file.
            self._tb = SummaryWriter(logdir=str(run_dir / "tensorboard"), flush_secs=TB_FLUSH_SECS,
                                     filename_suffix=f".from{start_step}")
        # Redraw at most every 10 s into logs (no TTY), live on a terminal.
        self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, desc="train",
                         mininterval=0.1 if sys.stderr.isatty() else 10.0)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": time.time(), **metrics}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for tag, value in metrics.items():
                self._tb.add_scalar(tag, value, step)
        self._bar.set_postfix(loss=f"{metrics['loss']:.4f}", mfu=f"{metrics.get('mfu', 0):.1%}")
        self._bar.update(step - self._bar.n)

    def write(self, message: str) -> None:
        if self._bar is not None:
            self._bar.write(message)
        elif self.enabled:
            print(message, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
