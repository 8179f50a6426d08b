"""One thread owns the engine; HTTP handlers hand it work through a bounded queue.

Requests waiting together start together: the worker takes the first waiting request, waits up
to `batch_wait_s` for more, and starts every waiting request with the same sampling settings. With
the engine's continuous schedule (the default) generate requests then run in a
`ContinuousSchedule` (infer/continuous.py) that stays open while it has rows: at every decode-chunk
boundary the worker admits newly queued generate requests with the same settings into it (the
seed aside: each row brings its own PRNG key), and each request is answered as soon as its own
rows finish. A waiting request that cannot join (other temperature / top_p / top_k / token cap,
or scoring) stops admission, so it waits only for the rows already running, never for later
arrivals. Rows wait in the bounded queue, not in the schedule: a request is admitted only while
the schedule has a free slot and no row waiting for one. Scoring requests (echo + logprobs), and
generate requests when the engine is static, run as one engine call per group. A full queue
refuses at once (`QueueFull`: the server answers 503), so a burst never hangs its clients.

Streaming: a Work with `on_tokens` hears its rows' new tokens as the engine produces them (after
every decode chunk), each token once. While a streamed row runs the schedule decodes
`stream_chunk_steps` steps between returns to the host instead of the engine's `chunk_steps`: the
first text goes out sooner, at a host round trip per chunk; the tokens are the same either way.
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
    # (row of this work, its tokens new since the last call, finish reason or None), on the engine's
    # thread; a row's calls join to its tokens
    on_tokens: Optional[Callable[[int, list[int], Optional[str]], None]] = None
    future: concurrent.futures.Future = dataclasses.field(default_factory=concurrent.futures.Future)

    def key(self, per_row_seeds: bool) -> tuple:
        """Works with equal keys can run together. A continuous schedule gives every row its own
        seed's key (`per_row_seeds`), so the seed is no part of it there; one static generate
        call has one seed."""
        if self.settings is not None and per_row_seeds:
            return self.kind, self.settings.without_seed()
        return self.kind, self.settings


class Batcher:
    def __init__(self, engine: Any, max_queue: int, batch_wait_s: float, stream_chunk_steps: int = 4):
        self.engine = engine
        self.stream_chunk_steps = stream_chunk_steps
        self.queue: queue.Queue[Work] = queue.Queue(maxsize=max_queue)
        self.batch_wait_s = batch_wait_s
        self.stopping = threading.Event()
        self.unseeded = itertools.count(1 << 20)  # row ids for requests without a seed: all different
        self.continuous = engine.schedule == "continuous"
        self.batches = 0  # engine runs started (a schedule, or a static / scoring call)
        self.admitted = 0  # requests that joined a schedule already running
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
            key = first.key(self.continuous)
            group = [w for w in pending if w.key(self.continuous) == key]
            for w in group:
                pending.remove(w)
            if first.kind == "generate" and self.continuous:
                self._run_schedule(group, pending)
            else:
                self._run(group)

    def _run_schedule(self, group: list[Work], pending: collections.deque[Work]) -> None:
        """Run `group` in a continuous schedule, admitting compatible arrivals between chunks until
        it drains. An arrival that cannot join goes to `pending` and closes admission (FIFO: later
        arrivals must not overtake it)."""
        self.batches += 1
        key = group[0].key(True)
        entered: list[Work] = list(group)  # until entered: a failure to open the schedule reaches them too
        schedule = None
        try:
            # Slots sized for the largest prompt bucket + the settings' token cap (the engine's
            # default): a request admitted later may bring any prompt, and the layout cannot grow
            # while rows run in it (each chunk only computes over what the running rows use).
            # eager: a finished row is answered at once and its slot is open to the next arrival.
            # reuse_slots: one schedule after another on the same layout, without zeroing a new one.
            schedule = self.engine.continuous(group[0].settings, stream_chunk_steps=self.stream_chunk_steps,
                                              eager=True, reuse_slots=True)
            entered = []
            for w in group:
                self._enter(schedule, w, entered)
            while True:
                while not pending and schedule.has_room:
                    try:
                        w = self.queue.get_nowait()
                    except queue.Empty:
                        break
                    if w.key(True) != key:
                        pending.append(w)
                        break
                    self.admitted += self._enter(schedule, w, entered)
                if not schedule.step():  # nothing ran: every row finished and nothing joined
                    schedule.close()
                    break
        except Exception as e:  # noqa: BLE001 (every request in the schedule learns what went wrong)
            for w in entered:
                if not w.future.done():
                    w.future.set_exception(e)
        if schedule is not None:
            self.rows_per_batch.append(schedule.added)
            self.engine.timings.append(schedule.timing())

    def _enter(self, schedule: Any, work: Work, entered: list[Work]) -> bool:
        """Queue `work`'s rows in `schedule`; its future is answered when the last one finishes.
        False when the work failed instead (its future holds the error)."""
        from xinst_jax.infer.continuous import slot_rows

        results: list[Optional[tuple]] = [None] * len(work.rows)
        left = [len(work.rows)]

        # called after the row's last on_tokens: a stream's last event precedes its end
        def finished(j: int, tokens: list[int], finish: str) -> None:
            results[j] = (tokens, finish, *self.engine.fit(work.rows[j]))
            left[0] -= 1
            if left[0] == 0:
                work.future.set_result(results)

        try:
            schedule.add(slot_rows(work.rows, work.limits, work.settings.seed, work.row_ids, finished,
                                   work.on_tokens))
        except Exception as e:  # noqa: BLE001 (this request alone fails: add checks before it queues)
            work.future.set_exception(e)
            return False
        entered.append(work)
        return True

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
                                           progress=_route_progress(group) if streamed else None)
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

    def progress(i: int, new: list[int], finish: Optional[str]) -> None:
        work, row = owners[i]
        if work.on_tokens is not None:
            work.on_tokens(row, new, finish)

    return progress
