"""Packing variable-length examples into rows of `seq_len` tokens (numpy only, no TensorFlow).

An example is the full templated token sequence (BOS + prompt + completion + EOS) with a
same-length `loss_mask` (1 on the tokens that are trained). In a row it becomes one segment of
`len(tokens) - 1` positions: inputs = tokens[:-1], targets = tokens[1:], loss_weights =
loss_mask[1:], positions 0.. and a segment id 1.. (0 is padding), so that attention (which
never crosses segments) and the loss see every example exactly as if it were alone.

`PoolPacker` is best-fit decreasing over a window of examples into a pool of open rows (Levanter
packs first-fit over a pool of open rows; sorting a lookahead window longest-first is what lets
the short examples fill the holes the long ones leave): see its docstring. Next-fit (SeqIO's
`trim_and_pack`, which closes the current row as soon as one example does not fit) is kept here
only as the benchmark baseline.

The packer is deterministic and its whole state (open rows, closed rows not yet handed out) is
saved by `get_state` / restored by `set_state`, so a restored pipeline packs the same rows.
"""

from __future__ import annotations

import base64
import bisect
import io
from collections import deque
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import numpy as np

from xinst_jax.data.batch import empty_rows


@dataclass
class Segment:
    """One example (or one piece of a split one): tokens and loss_mask of equal length >= 2."""

    tokens: np.ndarray  # int32 [n + 1]
    loss_mask: np.ndarray  # int8 [n + 1]
    lang: int = 0  # index into the pipeline's language list (for the realised-mix report)

    @property
    def length(self) -> int:
        """Positions the segment takes in a row (inputs are tokens[:-1])."""
        return len(self.tokens) - 1


@dataclass
class OverlongStats:
    truncated: int = 0  # examples cut to seq_len positions
    split: int = 0  # examples cut into several segments
    split_pieces: int = 0  # segments those produced
    dropped_tokens: int = 0  # tokens lost to truncation
    too_short: int = 0  # examples with < 2 tokens (nothing to predict), skipped


def fit_example(tokens: np.ndarray, loss_mask: np.ndarray, lang: int, seq_len: int, overlong: str,
                stats: OverlongStats) -> list[Segment]:
    """The segments one example becomes: itself, or (when longer than `seq_len` positions) its
    first `seq_len` positions (`truncate`) or consecutive pieces of `seq_len` positions that
    share their boundary token as the last target / first input (`split`)."""
    n = len(tokens) - 1
    if n < 1:
        stats.too_short += 1
        return []
    if n <= seq_len:
        return [Segment(tokens, loss_mask, lang)]
    if overlong == "truncate":
        stats.truncated += 1
        stats.dropped_tokens += n - seq_len
        return [Segment(tokens[:seq_len + 1], loss_mask[:seq_len + 1], lang)]
    if overlong != "split":
        raise ValueError(f"data.overlong: expected 'truncate' or 'split', got {overlong!r}")
    pieces = []
    for start in range(0, n, seq_len):
        end = min(start + seq_len, n) + 1
        if end - start >= 2:
            pieces.append(Segment(tokens[start:end], loss_mask[start:end], lang))
    stats.split += 1
    stats.split_pieces += len(pieces)
    return pieces


class PoolPacker:
    """Best-fit-decreasing packing of windows of segments into a pool of open rows.

    `add_window(segments)` takes the segments of a window of consecutive examples, longest first
    (ties in arrival order), and puts each into the open row whose free space is the smallest
    that still holds it, opening a row when none does. Then the pool is trimmed back to
    `pool_size` open rows by closing the fullest ones; the emptiest rows stay open for the short
    segments of later windows. Rows closed in a window are shuffled (seeded by the window's
    number, so packing stays a pure function of the segment stream) so that a batch does not
    hold only the long-example rows of a window, then queue up for `pop_rows`. `flush()`
    closes every open row (end of data). A window of one segment is online best-fit.
    """

    def __init__(self, seq_len: int, pool_size: int, seed: int | None = None):
        if seq_len < 1 or pool_size < 1:
            raise ValueError(f"packing needs seq_len >= 1 and pool_size >= 1, got {seq_len}, {pool_size}")
        self.seq_len, self.pool_size, self.seed = seq_len, pool_size, seed
        # Open rows sorted by (free space, creation number): bisect finds the best fit, the
        # first entry is the fullest row, ties go to the older row.
        self._keys: list[tuple[int, int]] = []
        self._rows: dict[int, list[Segment]] = {}
        self._next_id = 0
        self.windows = 0
        self.ready: deque[list[Segment]] = deque()

    def add_window(self, segments: Sequence[Segment]) -> None:
        closed: list[list[Segment]] = []
        for seg in sorted(segments, key=lambda s: -s.length):  # stable: ties keep arrival order
            self._place(seg, closed)
        while len(self._keys) > self.pool_size:
            _, rid = self._keys.pop(0)
            closed.append(self._rows.pop(rid))
        if self.seed is not None and len(closed) > 1:
            order = np.random.default_rng([self.seed, self.windows]).permutation(len(closed))
            closed = [closed[i] for i in order]
        self.ready.extend(closed)
        self.windows += 1

    def _place(self, seg: Segment, closed: list[list[Segment]]) -> None:
        n = seg.length
        if not 1 <= n <= self.seq_len:
            raise ValueError(f"segment of {n} positions does not fit rows of {self.seq_len}")
        i = bisect.bisect_left(self._keys, (n, -1))
        if i < len(self._keys):
            free, rid = self._keys.pop(i)
        else:
            free, rid = self.seq_len, self._next_id
            self._next_id += 1
            self._rows[rid] = []
        self._rows[rid].append(seg)
        free -= n
        if free == 0:
            closed.append(self._rows.pop(rid))
        else:
            bisect.insort(self._keys, (free, rid))

    def flush(self) -> None:
        self.ready.extend(self._rows.pop(rid) for _, rid in self._keys)
        self._keys.clear()

    @property
    def open_rows(self) -> int:
        return len(self._keys)

    def pop_rows(self, k: int) -> list[list[Segment]]:
        return [self.ready.popleft() for _ in range(min(k, len(self.ready)))]

    # ----------------------------------------------------------------- exact state

    def get_state(self) -> dict:
        """JSON-able: the open rows (with their free space and ids) and the closed rows queued."""
        groups = [self._rows[rid] for _, rid in self._keys] + list(self.ready)
        return {"seq_len": self.seq_len, "pool_size": self.pool_size, "next_id": self._next_id,
                "windows": self.windows, "open_keys": [list(k) for k in self._keys], "num_ready": len(self.ready),
                "segments": encode_rows(groups)}

    def set_state(self, state: dict) -> None:
        if state["seq_len"] != self.seq_len or state["pool_size"] != self.pool_size:
            raise ValueError(f"packer state is for seq_len={state['seq_len']}, pool={state['pool_size']}; this "
                             f"packer has seq_len={self.seq_len}, pool={self.pool_size}")
        groups = decode_rows(state["segments"])
        keys = [tuple(k) for k in state["open_keys"]]
        if len(groups) != len(keys) + state["num_ready"]:
            raise ValueError("packer state is inconsistent: row counts do not match")
        self._keys = keys
        self._rows = {rid: groups[j] for j, (_, rid) in enumerate(keys)}
        self.ready = deque(groups[len(keys):])
        self._next_id = int(state["next_id"])
        self.windows = int(state["windows"])


def encode_rows(rows: Sequence[Sequence[Segment]]) -> str:
    """Rows of segments -> base64 of one compressed npz (flat tokens, masks, lengths, langs)."""
    segs = [s for row in rows for s in row]
    arrays = {
        "row_sizes": np.array([len(r) for r in rows], np.int32),
        "lengths": np.array([len(s.tokens) for s in segs], np.int32),
        "langs": np.array([s.lang for s in segs], np.int32),
        "tokens": np.concatenate([s.tokens for s in segs]).astype(np.int32) if segs else np.zeros(0, np.int32),
        "loss_mask": np.concatenate([s.loss_mask for s in segs]).astype(np.int8) if segs else np.zeros(0, np.int8),
    }
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_rows(text: str) -> list[list[Segment]]:
    with np.load(io.BytesIO(base64.b64decode(text))) as z:
        row_sizes, lengths, langs, tokens, mask = (z[k] for k in ("row_sizes", "lengths", "langs", "tokens",
                                                                    "loss_mask"))
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    segs = [Segment(tokens[bounds[j]:bounds[j + 1]], mask[bounds[j]:bounds[j + 1]], int(langs[j]))
            for j in range(len(lengths))]
    rows, at = [], 0
    for size in row_sizes:
        rows.append(segs[at:at + size])
        at += size
    return rows


def rows_to_batch(rows: Sequence[Sequence[Segment]], num_rows: int, seq_len: int) -> dict[str, np.ndarray]:
    """Materialise rows of segments into the Batch arrays; rows beyond len(rows) are padding."""
    batch = empty_rows(num_rows, seq_len)
    for r, row in enumerate(rows):
        pos = 0
        for k, seg in enumerate(row):
            n = seg.length
            sl = slice(pos, pos + n)
            batch["inputs"][r, sl] = seg.tokens[:-1]
            batch["targets"][r, sl] = seg.tokens[1:]
            batch["segment_ids"][r, sl] = k + 1
            batch["positions"][r, sl] = np.arange(n)
            batch["loss_weights"][r, sl] = seg.loss_mask[1:]
            pos += n
    return batch


# --------------------------------------------------------------------------- whole-list helpers


def pack_pool(segments: Sequence[Segment], seq_len: int, pool_size: int, window: int = 1,
              seed: int | None = None) -> list[list[Segment]]:
    """All rows our packer makes from `segments` in windows of `window` (flushed at the end)."""
    packer = PoolPacker(seq_len, pool_size, seed)
    for start in range(0, len(segments), window):
        packer.add_window(segments[start:start + window])
    packer.flush()
    return list(packer.ready)


def pack_next_fit(segments: Iterable[Segment], seq_len: int) -> list[list[Segment]]:
    """SeqIO-style next-fit: one open row, closed as soon as the next example does not fit."""
    rows: list[list[Segment]] = []
    row: list[Segment] = []
    used = 0
    for seg in segments:
        if used + seg.length > seq_len and row:
            rows.append(row)
            row, used = [], 0
        row.append(seg)
        used += seg.length
    if row:
        rows.append(row)
    return rows


def real_token_rate(rows: Sequence[Sequence[Segment]], seq_len: int) -> float:
    """Non-padding positions / all positions of the rows."""
    if not rows:
        return 0.0
    return sum(s.length for row in rows for s in row) / (len(rows) * seq_len)


def iter_segments(batch: dict[str, np.ndarray]) -> Iterator[tuple[int, int, slice]]:
    """(row, segment id, slice) of every segment in a Batch (for tests and reports)."""
    seg_ids = batch["segment_ids"]
    for r in range(seg_ids.shape[0]):
        row = seg_ids[r]
        for sid in np.unique(row[row > 0]):
            where = np.nonzero(row == sid)[0]
            yield r, int(sid), slice(int(where[0]), int(where[-1]) + 1)
