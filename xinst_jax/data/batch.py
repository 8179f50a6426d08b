"""The Batch interface between any data producer and the trainer (no TensorFlow here)."""

from __future__ import annotations

from typing import Iterator, Protocol

import numpy as np

BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_weights")


class BatchSource(Protocol):
    """Yields this host's rows of each global batch as numpy arrays [rows, seq_len] and can
    save/restore its position exactly (the state goes into the checkpoint)."""

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]: ...

    def __next__(self) -> dict[str, np.ndarray]: ...

    def get_state(self) -> dict: ...

    def set_state(self, state: dict) -> None: ...


def empty_rows(rows: int, seq_len: int) -> dict[str, np.ndarray]:
    batch = {key: np.zeros((rows, seq_len), np.int32) for key in BATCH_KEYS}
    batch["loss_weights"] = np.zeros((rows, seq_len), np.float32)
    return batch
