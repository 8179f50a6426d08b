"""The continuous schedule's host side: rows enter device slots between decode chunks.

`ContinuousSchedule` drives the Engine's compiled pieces (`_init_slots`, `_refill`, `_chunk`,
generate.py): `add` queues rows, `step` moves queued rows into free slots (prefilled
`refill_size` at a time), runs one decode chunk and reports what it produced. Rows may be added
between any two steps -- that is how the server admits a request into a running batch -- and
`Engine.generate(schedule="continuous")` is the same loop with every row added up front.

Each row brings its own PRNG key (`row_keys(seed, row id)` of its own seed) and limit; the
compiled pieces see the settings without the seed, so rows of different seeds share a schedule
and a row's tokens are the ones it gets alone (same key, same prompt slots, same step counter).
"""

from __future__ import annotations

import collections
import dataclasses
import time
from typing import TYPE_CHECKING, Callable, Iterable, Optional, Sequence

import jax
import numpy as np

from xinst_jax.infer.buckets import pick_bucket
from xinst_jax.infer.generate import FINISH_NAMES, BatchTiming, Progress
from xinst_jax.infer.sampling import SamplingSettings, row_keys

if TYPE_CHECKING:
    from xinst_jax.infer.generate import Engine

# (the row's tokens new since its last report, its finish reason once it finished, else None); on
# the schedule's thread. A row's reports join to its tokens, each token reported once.
Report = Callable[[list[int], Optional[str]], None]
# (row index, all its tokens, its finish reason): once per row, when it finishes
Finished = Callable[[int, list[int], str], None]


@dataclasses.dataclass
class SlotRow:
    """One prompt for a continuous schedule."""

    prompt: Sequence[int]
    key: np.ndarray  # [2] uint32: row_keys(the row's seed, its row id)
    limit: int  # max new tokens (capped at the settings' max_new_tokens)
    report: Report  # called when it finishes; also after every chunk that gave it tokens when `stream`
    stream: bool = False


def slot_rows(prompts: Sequence[Sequence[int]], limits: Sequence[int], seed: int, row_ids: Sequence[int],
              finished: Finished, progress: Optional[Progress] = None) -> list[SlotRow]:
    """One SlotRow per prompt, in order, with the PRNG key static batching gives it (seed, row id)
    and a report that gathers its tokens: `progress(i, new tokens, finish)` hears every report (the
    row then streams), `finished(i, tokens, finish)` the whole row once, after the last."""
    keys = np.asarray(row_keys(seed, np.asarray(row_ids, np.int64).astype(np.uint32)))

    def report_to(i: int) -> Report:
        tokens: list[int] = []

        def report(new: list[int], finish: Optional[str]) -> None:
            tokens.extend(new)
            if progress is not None:
                progress(i, new, finish)
            if finish is not None:
                finished(i, tokens, finish)
        return report

    return [SlotRow(prompt, keys[i], limit, report_to(i), stream=progress is not None)
            for i, (prompt, limit) in enumerate(zip(prompts, limits))]


class ContinuousSchedule:
    """`engine.batch_size` slots on the device for rows of one sampling setting (seed aside)."""

    def __init__(self, engine: "Engine", settings: SamplingSettings, *, bucket: int, chunk_steps: int,
                 stream_chunk_steps: int | None = None, eager: bool = False, reuse_slots: bool = False):
        """`bucket`: the longest prompt bucket a row may have. The slot layout (KV cache and history
        width: bucket + max_new_tokens) is fixed for the schedule's life, since growing it would
        copy every slot and compile another chunk, so a row whose prompt needs a larger bucket
        cannot enter. `chunk_steps` (or `stream_chunk_steps` while a streamed row runs): decode
        steps between returns to the host. `eager`: also return as soon as any row finishes (its
        owner hears at once, and the slot is free for the next arrival) instead of when enough
        slots for the next waiting group are done. `reuse_slots`: start from the slots a closed
        schedule of the same layout left (`close`) instead of new zeroed ones: a server opening one
        schedule after another does not allocate and zero its KV cache each time."""
        settings.validate()
        if bucket not in engine.buckets:
            raise ValueError(f"bucket {bucket} is not one of the engine's prompt buckets {engine.buckets}")
        self.engine, self.bucket, self.eager = engine, bucket, eager
        self.settings = settings.without_seed()  # one compile for every seed: keys come per row
        self.chunk_steps = int(chunk_steps)
        self.stream_chunk_steps = int(stream_chunk_steps or chunk_steps)
        self.rows, self.group = engine.batch_size, engine.refill_size
        cap = settings.max_new_tokens
        # slot bucket + cap - 1 is the last a row ever writes; the history has one spare slot
        layout = dict(rows=self.rows, length=engine.cache_length(bucket, cap), width=bucket + cap + 1)
        spare, engine.spare_slots = engine.spare_slots, None  # dropped first when it does not fit: no two at once
        if reuse_slots and spare is not None and _layout(spare) == layout:
            self.state = spare  # every slot free (done); a refill rewrites all a slot's row reads
        else:
            del spare
            self.state = engine._init_slots(**layout)
        self.reuse_slots = reuse_slots
        self.waiting: collections.deque[SlotRow] = collections.deque()
        self.free = list(range(self.rows))
        self.running: dict[int, SlotRow] = {}  # slot -> row
        self.buckets = [bucket] * self.rows  # slot -> the prompt bucket of its row (its tokens start there)
        self.reported = [0] * self.rows  # slot -> its row's tokens already reported
        # Reports read windows of the history this wide: streamed rows' tokens of one chunk (a new
        # row's first token comes from the refill), else whole rows (finished ones' tokens); two
        # fixed widths, so neither a row's length nor chunk_steps compiles another read.
        self.stream_width, self.row_width = min(self.stream_chunk_steps + 1, cap), cap
        self.refills = self.chunks = self.steps = self.new_tokens = self.added = 0
        self.started = time.perf_counter()

    # ---- rows in

    def add(self, rows: Iterable[SlotRow]) -> None:
        """Queue rows; they enter free slots at the next `step`, in this order."""
        rows = list(rows)
        for row in rows:
            if len(row.prompt) == 0:
                raise ValueError("a prompt is empty (add a BOS token)")
            if row.limit < 1:
                raise ValueError(f"max_new_tokens must be >= 1, got {row.limit}")
            need = pick_bucket(min(len(row.prompt), self.engine.buckets[-1]), self.engine.buckets)
            if need > self.bucket:
                raise ValueError(f"a prompt of {len(row.prompt)} tokens needs bucket {need}; this schedule's slots "
                                 f"hold prompts up to {self.bucket}")
        self.waiting.extend(rows)
        self.added += len(rows)

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def has_room(self) -> bool:
        """More free slots than rows waiting for one: a row added now starts at the next step."""
        return len(self.free) > len(self.waiting)

    # ---- one round

    def step(self) -> bool:
        """Fill free slots with waiting rows, run one decode chunk, report. False when no row was
        left to run (then nothing ran: rows added later start a fresh round with another step)."""
        self._fill()
        if not self.running:
            return False
        e, rows = self.engine, self.rows
        if self.waiting:
            threshold = min(self.group, len(self.waiting))  # enough free slots for the next group
        else:
            threshold = rows - len(self.running) + 1 if self.eager else rows
        streamed = any(r.stream for r in self.running.values())
        max_steps = self.stream_chunk_steps if streamed else self.chunk_steps
        live = max(self.buckets[slot] for slot in self.running)  # the chunk runs on what these rows use
        ran, self.state = e._chunk(e.params, self.state, np.int32(threshold), np.int32(max_steps),
                                   settings=self.settings, live=live)
        done, count, finish, ran = jax.device_get((self.state["done"], self.state["step"], self.state["finish"], ran))
        self.chunks += 1
        self.steps += int(ran)
        finished = [slot for slot in self.running if done[slot]]
        streaming = [slot for slot, row in self.running.items() if row.stream and not done[slot]
                     and count[slot] > self.reported[slot]]
        if finished or streaming:
            new = self._read_new(finished + streaming, count)
            for slot in finished:
                row = self.running.pop(slot)
                self.new_tokens += int(count[slot])
                row.report(new[slot], FINISH_NAMES[int(finish[slot])])
            for slot in streaming:
                self.running[slot].report(new[slot], None)
            self.free = sorted(self.free + finished)
        return True

    def _read_new(self, slots: list[int], count: np.ndarray) -> dict[int, list[int]]:
        """Each slot's tokens since its last report, in one device-to-host read of a window per
        slot (not the whole history: a streamed row's host work stays linear in its length)."""
        e = self.engine
        need = max(int(count[s]) - self.reported[s] for s in slots)
        streamed = all(self.running[s].stream for s in slots)
        width = self.stream_width if streamed and need <= self.stream_width else self.row_width
        history_width = self.state["history"].shape[1]
        index = np.zeros((self.rows,), np.int32)  # a fixed shape: one compile per width
        starts = np.zeros((self.rows,), np.int32)
        index[:len(slots)] = slots
        starts[:len(slots)] = [self.buckets[s] + self.reported[s] for s in slots]
        windows = jax.device_get(e._read_tokens(self.state["history"], e._put(index), e._put(starts), width=width))
        new = {}
        for i, slot in enumerate(slots):
            shift = int(starts[i]) - min(int(starts[i]), history_width - width)  # where dynamic_slice clamped
            new[slot] = windows[i, shift:shift + int(count[slot]) - self.reported[slot]].tolist()
            self.reported[slot] = int(count[slot])
        return new

    def _fill(self) -> None:
        """Prefill waiting rows, a group of `refill_size` at a time (each group in its own bucket),
        into free slots."""
        e, group = self.engine, self.group
        while self.waiting and len(self.free) >= min(group, len(self.waiting)):
            batch = [self.waiting.popleft() for _ in range(min(group, len(self.waiting)))]
            max_bucket = e.buckets[-1]
            bucket = pick_bucket(max(min(len(r.prompt), max_bucket) for r in batch), e.buckets)
            tokens = np.full((group, bucket), self.settings.pad_id, np.int32)
            lengths = np.zeros((group,), np.int32)
            slots = np.full((group,), self.rows, np.int32)  # `rows`: a padding entry (dropped)
            limits = np.ones((group,), np.int32)
            keys = np.zeros((group, 2), np.uint32)
            for r, row in enumerate(batch):
                prompt = list(row.prompt)[-bucket:]
                tokens[r, bucket - len(prompt):] = prompt
                lengths[r] = len(prompt)
                slots[r] = self.free.pop(0)
                limits[r] = min(row.limit, self.settings.max_new_tokens)
                keys[r] = row.key
                self.running[int(slots[r])] = row
                self.buckets[int(slots[r])] = bucket
                self.reported[int(slots[r])] = 0
            self.state = e._refill(e.params, self.state, e._put(tokens), e._put(lengths), e._put(slots),
                                   e._put(limits), e._put(keys), settings=self.settings)
            self.refills += 1

    def close(self) -> None:
        """The schedule is over; with `reuse_slots` its slots (all free once it drained) stay with
        the engine for the next schedule."""
        if self.reuse_slots and not self.busy and self.state is not None:
            self.engine.spare_slots = self.state
        self.state = None

    def timing(self) -> BatchTiming:
        """The schedule as one timing record (prefills run between the chunks: all in decode_s)."""
        return BatchTiming(bucket=self.bucket, rows=self.added, prefill_s=0.0,
                           decode_s=time.perf_counter() - self.started, steps=self.steps,
                           new_tokens=self.new_tokens, schedule="continuous", refills=self.refills,
                           chunks=self.chunks)


def _layout(state: dict) -> dict:
    rows, width = state["history"].shape
    return dict(rows=rows, length=state["cache"].length, width=width)
