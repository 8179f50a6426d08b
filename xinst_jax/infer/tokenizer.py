"""Tokenizers for the inference engine: a small protocol and two implementations.

Anything with `encode(str) -> list[int]` and `decode(list[int]) -> str` works (the engine itself
only sees token ids). `ByteTokenizer` needs no files (the offline demo); `HFTokenizer` reads a
Hugging Face `tokenizer.json` with the `tokenizers` library (no transformers at run time).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

from xinst_jax.config import ConfigError


@runtime_checkable
class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes shifted by 3: ids 0, 1, 2 are pad, bos, eos; byte b is id b + 3 (vocab 259)."""

    pad_id, bos_id, eos_id = 0, 1, 2
    offset = 3
    vocab_size = 256 + offset

    def encode(self, text: str) -> list[int]:
        return [b + self.offset for b in text.encode("utf-8")]

    def decode(self, ids: list[int]) -> str:
        data = bytes(i - self.offset for i in ids if self.offset <= i < self.vocab_size)
        return data.decode("utf-8", errors="replace")


class HFTokenizer:
    """A `tokenizer.json` (the fast-tokenizer file every HF model directory ships)."""

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer as _Tok

        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise ConfigError(f"generate.tokenizer: {path} not found (expected a tokenizer.json or a directory "
                              "holding one, or `bytes`)")
        self.path = path
        self._tok = _Tok.from_file(str(path))
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)


def load_tokenizer(spec: str) -> Tokenizer:
    """`bytes` (or empty) -> ByteTokenizer; anything else is a tokenizer.json path or a directory."""
    if spec in ("", "bytes"):
        return ByteTokenizer()
    return HFTokenizer(spec)
