"""Server-sent events as the engine decodes: `stream: true` on /v1/completions and
/v1/chat/completions.

The request goes to the batcher with an `on_tokens` callback (called on the engine's thread after
every decode chunk, batcher.py); the callback hands each row's new tokens to the event loop, where
`RowText` turns them into text (whole characters only, cut at the stop strings: detok.py) and the
response sends it at once. Each choice ends with an event holding its `finish_reason`; the stream
ends with `data: [DONE]`. The submit happens before the response starts, so a full queue is
still a plain 503, not a broken stream; an engine failure mid-stream is sent as an `error` event.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import time
import uuid
from typing import Any, AsyncIterator, Optional, Sequence

from xinst_jax.serve.batcher import Work
from xinst_jax.serve.detok import IncrementalDecoder, StopText


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


DONE = "data: [DONE]\n\n"


class RowText:
    """One choice's text as its tokens arrive."""

    def __init__(self, tokenizer: Any, stops: Sequence[str], stop_ids: Sequence[int]):
        self.decoder = IncrementalDecoder(tokenizer)
        self.stop = StopText(stops)
        self.stop_ids = set(stop_ids)
        self.finish: Optional[str] = None  # set once the choice is over for the client

    def update(self, new: list[int], finish: Optional[str]) -> tuple[str, Optional[str]]:
        """(new text, the choice's finish reason if this update ended it) from the row's tokens new
        since the last update; `finish`: the engine's reason once the row ended. Nothing more
        after the end."""
        if self.finish is not None:
            return "", None
        if finish == "stop" and new and new[-1] in self.stop_ids:
            new = new[:-1]  # the stop token is not text (as in the whole answer)
        piece = self.decoder.push(new) + (self.decoder.flush() if finish is not None else "")
        text = self.stop.add(piece, last=finish is not None)
        if self.stop.stopped or finish is not None:
            self.finish = "stop" if self.stop.stopped else finish
        return text, self.finish


class Stream:
    """One streamed request: its rows' texts and the event shapes of its endpoint."""

    def __init__(self, model: str, chat: bool, rows: list[RowText], prompt_tokens: int, include_usage: bool):
        self.chat, self.rows, self.include_usage = chat, rows, include_usage
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = [0] * len(rows)
        prefix = "chatcmpl" if chat else "cmpl"
        self.base = {"id": f"{prefix}-{uuid.uuid4().hex}", "object": "chat.completion.chunk" if chat else
                     "text_completion", "created": int(time.time()), "model": model}

    def chunk(self, index: int, text: Optional[str], finish: Optional[str] = None, role: bool = False) -> str:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            choice = {"index": index, "delta": delta, "finish_reason": finish}
        else:
            choice = {"text": text or "", "index": index, "logprobs": None, "finish_reason": finish}
        return sse({**self.base, "choices": [choice]})

    def usage(self) -> str:
        done = sum(self.completion_tokens)
        return sse({**self.base, "choices": [], "usage": {"prompt_tokens": self.prompt_tokens,
                                                          "completion_tokens": done,
                                                          "total_tokens": self.prompt_tokens + done}})


def submit_streamed(batcher: Any, work: Work) -> tuple[asyncio.Queue, concurrent.futures.Future]:
    """Submit `work` with a callback that queues (row, new tokens, finish) on this event loop; None is
    queued once the engine is done with it. Raises QueueFull before anything is sent."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()

    def put(item: Any) -> None:  # on the engine's thread
        try:
            loop.call_soon_threadsafe(events.put_nowait, item)
        except RuntimeError:  # the loop is closed: the server is gone, nobody listens
            pass

    work.on_tokens = lambda row, new, finish: put((row, list(new), finish))
    future = batcher.submit(work)
    future.add_done_callback(lambda _: put(None))  # after every progress call (same thread, FIFO)
    return events, future


async def stream_events(stream: Stream, events: asyncio.Queue, future: concurrent.futures.Future,
                        heads: Sequence[str] = ()) -> AsyncIterator[str]:
    """The events of one streamed request: an opening event per choice (the chat role, or the
    echoed prompt), its text as it is decoded, its finish, then usage (if asked) and [DONE]."""
    for i, head in enumerate(heads):
        yield stream.chunk(i, head, role=stream.chat)
    open_rows = len(stream.rows)
    while open_rows:
        item = await events.get()
        if item is None:  # the engine is done (or failed) and some row never finished
            if future.exception() is not None:
                yield sse({"error": {"message": str(future.exception()), "type": "server_error", "param": None,
                                     "code": None}})
            break
        row, new, finish = item
        if stream.rows[row].finish is not None:
            continue  # cut at a stop string earlier: the engine's later tokens are not sent
        text, ended = stream.rows[row].update(new, finish)
        stream.completion_tokens[row] += len(new)
        if text:
            yield stream.chunk(row, text)
        if ended is not None:
            open_rows -= 1
            yield stream.chunk(row, None, ended)
    if stream.include_usage:
        yield stream.usage()
    yield DONE
