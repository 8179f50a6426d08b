"""Synthetic packed batches, a pure function of (seed, step, global row): learnable, resumable, no TF.

Row r of global batch `step` depends only on (seed, step, r), never on how many hosts share the
batch: host i of n takes the contiguous rows [i * rows, (i + 1) * rows), which is the slice its
devices hold in the data-parallel mesh, so 1 process x 4 devices and 2 processes x 2 devices see
the same global batch.

Each document is an arithmetic progression of token ids (start and stride random), so after two
tokens the next is determined: a tiny model's loss visibly falls within a few dozen steps.
"""

from __future__ import annotations

import numpy as np

from xinst_jax.config import SyntheticDataConfig
from xinst_jax.data.batch import empty_rows

FIRST_ORDINARY_ID = 3  # 0 pad, 1 bos, 2 eos stay out of synthetic documents


class SyntheticSource:
    def __init__(self, cfg: SyntheticDataConfig, vocab_size: int, rows: int, seq_len: int, seed: int,
                 process_index: int = 0, process_count: int = 1):
        if not 1 <= cfg.min_doc_len <= cfg.max_doc_len:
            raise ValueError(f"data.synthetic: need 1 <= min_doc_len <= max_doc_len, got {cfg}")
        if not 0 <= process_index < process_count:
            raise ValueError(f"data.synthetic: process_index {process_index} not in [0, {process_count})")
        self.cfg, self.vocab_size, self.rows, self.seq_len = cfg, vocab_size, rows, seq_len
        self.seed, self.process_index, self.process_count = seed, process_index, process_count
        self.index = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = self.batch_at(self.index)
        self.index += 1
        return batch

    def get_state(self) -> dict:
        return {"index": self.index}

    def set_state(self, state: dict) -> None:
        self.index = int(state["index"])

    def batch_at(self, index: int) -> dict[str, np.ndarray]:
        """This host's rows of global batch `index` (global rows process_index * rows + r)."""
        batch = empty_rows(self.rows, self.seq_len)
        span = self.vocab_size - FIRST_ORDINARY_ID
        first = self.process_index * self.rows
        for row in range(self.rows):
            rng = np.random.default_rng([self.seed, index, first + row])
            pos, segment = 0, 1
            while self.seq_len - pos >= self.cfg.min_doc_len:
                n = int(rng.integers(self.cfg.min_doc_len, min(self.cfg.max_doc_len, self.seq_len - pos) + 1))
                start, stride = rng.integers(0, span), rng.integers(1, 6)
                doc = (start + stride * np.arange(n + 1)) % span + FIRST_ORDINARY_ID
                sl = slice(pos, pos + n)
                batch["inputs"][row, sl] = doc[:-1]
                batch["targets"][row, sl] = doc[1:]
                batch["segment_ids"][row, sl] = segment
                batch["positions"][row, sl] = np.arange(n)
                batch["loss_weights"][row, sl] = 1.0
                pos, segment = pos + n, segment + 1
        return batch
