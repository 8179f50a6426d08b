"""Length buckets shared by generation and scoring: few distinct shapes, so few compiles."""

from __future__ import annotations

from typing import Sequence

DEFAULT_BUCKETS = (32, 64, 128, 256, 512)


def pick_bucket(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds `length` (the largest when none does: callers truncate)."""
    for b in sorted(buckets):
        if length <= b:
            return b
    return max(buckets)
