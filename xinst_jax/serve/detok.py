"""Text of a token stream, piece by piece: what streaming and `logprobs.tokens` send.

A token need not hold whole characters (a byte tokenizer, byte-fallback pieces of a Thai or
Tamil letter), and a SentencePiece decoder drops the leading space of the first piece it sees,
so text is never cut from single-token decodes. `IncrementalDecoder` decodes a short window that
reaches back to the previous release and releases the new text only once it no longer ends in an
incomplete character (U+FFFD): the pieces join to `tokenizer.decode(all tokens)`.

`StopText` then holds back any tail that may be the start of a stop string, so a streamed answer
is cut exactly where the whole answer is cut (both by `infer.job.first_stop`).
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

from xinst_jax.infer.job import first_stop

REPLACEMENT = "\ufffd"  # what an incomplete UTF-8 sequence decodes to


class IncrementalDecoder:
    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.window = 0  # first id of the decoding window: the start of the previous release
        self.released = 0  # ids whose text went out
        self.text = ""  # everything released

    def push(self, ids: Iterable[int]) -> str:
        """Add tokens; returns the text they complete ("" while a character is unfinished)."""
        self.ids.extend(int(i) for i in ids)
        if len(self.ids) == self.released:
            return ""
        before = self.tokenizer.decode(self.ids[self.window:self.released])
        after = self.tokenizer.decode(self.ids[self.window:])
        if after.endswith(REPLACEMENT) or not after.startswith(before):
            return ""  # wait for the rest of the character
        self.window, self.released = self.released, len(self.ids)
        return self._release(after[len(before):])

    def flush(self) -> str:
        """The text still held back (an unfinished character at the end decodes as U+FFFD)."""
        whole = self.tokenizer.decode(self.ids)
        self.window = self.released = len(self.ids)
        return self._release(whole[len(self.text):] if whole.startswith(self.text) else "")

    def _release(self, piece: str) -> str:
        self.text += piece
        return piece


def token_pieces(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """Each token's share of decode(ids): the text it completes, "" for a token that only starts
    a character. The pieces join to decode(ids), so their offsets point into that text."""
    decoder = IncrementalDecoder(tokenizer)
    pieces = [decoder.push([t]) for t in ids]
    if pieces:
        pieces[-1] += decoder.flush()
    return pieces


class StopText:
    """Text released in order, cut before the first stop string."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.text = ""  # all text seen
        self.sent = 0  # characters of it released
        self.stopped = False

    def add(self, piece: str, last: bool = False) -> str:
        """The next text safe to release; `last` releases what was held back. After a stop string
        nothing more is released (`stopped`)."""
        if self.stopped:
            return ""
        self.text += piece
        cut = first_stop(self.text, self.stops, self.sent)
        pending = len(self.text) if last else len(self.text) - self._held()
        if cut is not None and cut <= pending:  # no longer stop string can still start before it
            self.stopped = True
            return self._release(cut)
        return self._release(pending)

    def _held(self) -> int:
        """The longest tail of the text that a stop string starts with (it may yet become one)."""
        return max([k for s in self.stops for k in range(1, len(s)) if self.text.endswith(s[:k])], default=0)

    def _release(self, end: int) -> str:
        end = max(end, self.sent)
        piece, self.sent = self.text[self.sent:end], end
        return piece
