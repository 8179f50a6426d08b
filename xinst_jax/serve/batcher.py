"""One thread owns the engine; HTTP handlers hand it work through a bounded queue.

Requests waiting together are run together: the worker takes the first waiting request, waits up
to `batch_wait_s` for more, and runs every waiting request with the same sampling settings as one
`engine.generate` call (each row with its own max_tokens limit), up to the engine's batch size in
rows per call round. Scoring requests (echo + logprobs) are batched the same way. A full queue
refuses at once (`QueueFull`: the server answers 503), so a burst never hangs its clients.

Streaming: a Work with `on_tokens` hears its rows' tokens as the engine produces them (the
engine's `progress`, called after every decode chunk of the continuous schedule). A batch holding
a streamed request decodes `stream_chunk_steps` steps between returns to the host instead of the
engine's `chunk_steps`: the first text goes out sooner, at a host round trip per chunk; the tokens
are the same either way.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import itertools
import queue
import threading
import time
from typing import Any, Callable, Optional

from xinst_jax.infer.sampling import SamplingSettings


class QueueFull(Exception):
    pass


@dataclasses.dataclass
class Work:
    kind: str  # "generate" | "score"
    rows: list[list[int]]  # prompts (generate) or whole sequences to score (score)
    settings: SamplingSettings | None = None
    limits: list[int] | None = None  # per-row max new tokens
    row_ids: list[int] | None = None
    # (row of this work, its tokens so far, finish reason or None), on the engine's thread
    on_tokens: Optional[Callable[[int, list[int], Optional[str]], None]] = None
    future: concurrent.futures.Future = dataclasses.field(default_factory=concurrent.futures.Future)

    def key(self):
        return (self.kind, self.settings)


class Batcher:
    def __init__(self, engine: Any, max_queue: int, batch_wait_s: float, stream_chunk_steps: int = 4):
        self.engine = engine
        self.stream_chunk_steps = stream_chunk_steps
        self.queue: queue.Queue[Work] = queue.Queue(maxsize=max_queue)
        self.batch_wait_s = batch_wait_s
        self.stopping = threading.Event()
        self.unseeded = itertools.count(1 << 20)  # row ids for requests without a seed: all different
        self.batches = 0
        self.rows_per_batch: list[int] = []
        self.thread = threading.Thread(target=self._loop, name="xinst-engine", daemon=True)
        self.thread.start()

    # ---- producer side (HTTP handlers)

    def submit(self, work: Work) -> concurrent.futures.Future:
        if self.stopping.is_set():
            raise QueueFull("the server is shutting down")
        try:
            self.queue.put_nowait(work)
        except queue.Full:
            raise QueueFull(f"{self.queue.maxsize} requests are waiting") from None
        return work.future

    def fresh_row_ids(self, n: int) -> list[int]:
        return [next(self.unseeded) % (1 << 32) for _ in range(n)]

    def close(self, timeout: float = 600) -> None:
        """Finish what is queued, then stop the worker."""
        self.stopping.set()
        self.thread.join(timeout)

    # ---- the worker

    def _loop(self) -> None:
        pending: collections.deque[Work] = collections.deque()
        while True:
            if not pending:
                try:
                    pending.append(self.queue.get(timeout=0.1))
                except queue.Empty:
                    if self.stopping.is_set():
                        return
                    continue
            deadline = time.monotonic() + self.batch_wait_s
            while True:  # gather what arrives within the wait
                left = deadline - time.monotonic()
                try:
                    pending.append(self.queue.get(timeout=max(left, 0)) if left > 0 else self.queue.get_nowait())
                except queue.Empty:
                    break
            first = pending[0]
            group = [w for w in pending if w.key() == first.key()]
            for w in group:
                pending.remove(w)
            self._run(group)

    def _run(self, group: list[Work]) -> None:
        self.batches += 1
        self.rows_per_batch.append(sum(len(w.rows) for w in group))
        try:
            if group[0].kind == "generate":
                prompts = [r for w in group for r in w.rows]
                limits = [m for w in group for m in w.limits]
                ids = [i for w in group for i in w.row_ids]
                streamed = any(w.on_tokens is not None for w in group)
                out = self.engine.generate(prompts, group[0].settings, row_ids=ids, max_new_tokens=limits,
                                           progress=_route_progress(group) if streamed else None,
                                           chunk_steps=self.stream_chunk_steps if streamed else None)
                start = 0
                for w in group:
                    n = len(w.rows)
                    w.future.set_result([(out.tokens[i], out.finish_reasons[i], out.prompt_lengths[i],
                                          out.truncated[i]) for i in range(start, start + n)])
                    start += n
            else:
                seqs = [r for w in group for r in w.rows]
                out = self.engine.score([s[:1] for s in seqs], [s[1:] for s in seqs])
                start = 0
                for w in group:
                    n = len(w.rows)
                    w.future.set_result([(out.token_logprobs[i], out.top_tokens[i], out.top_logprobs[i])
                                         for i in range(start, start + n)])
                    start += n
        except Exception as e:  # noqa: BLE001 (every waiting request learns what went wrong)
            for w in group:
                if not w.future.done():
                    w.future.set_exception(e)


def _route_progress(group: list[Work]) -> Callable[[int, list[int], Optional[str]], None]:
    """The engine's progress over the group's rows -> each streamed work's own rows."""
    owners = [(w, j) for w in group for j in range(len(w.rows))]

    def progress(i: int, tokens: list[int], finish: Optional[str]) -> None:
        work, row = owners[i]
        if work.on_tokens is not None:
            work.on_tokens(row, tokens, finish)

    return progress
