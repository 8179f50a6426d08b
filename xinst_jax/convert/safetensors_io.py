"""Minimal streaming safetensors reader/writer (numpy + ml_dtypes; no torch).

The writer puts the header first and then each tensor's bytes as it is produced, so a shard
never needs all of its tensors in memory at once; the reader memory-maps the file.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Callable, Iterable, Iterator

import ml_dtypes
import numpy as np

from xinst_jax import paths

_TO_NUMPY = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_FROM_NUMPY = {v: k for k, v in _TO_NUMPY.items()}


def dtype_tag(dtype: np.dtype) -> str:
    return _FROM_NUMPY[np.dtype(dtype)]


def read_header(path: Path) -> tuple[dict, int]:
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    return header, 8 + length


class SafetensorsFile:
    """Memory-mapped access to one .safetensors file: `names()`, `shape(name)`, `get(name)`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.header, self._data_start = read_header(self.path)
        self.header.pop("__metadata__", None)
        self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")

    def names(self) -> list[str]:
        return list(self.header)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def get(self, name: str) -> np.ndarray:
        info = self.header[name]
        start, end = info["data_offsets"]
        raw = self._mmap[self._data_start + start:self._data_start + end]
        return raw.view(_TO_NUMPY[info["dtype"]]).reshape(info["shape"])


def write_streaming(path: str | Path, entries: Iterable[tuple[str, tuple[int, ...], np.dtype]],
                    produce: Callable[[str], np.ndarray], metadata: dict | None = None) -> int:
    """Write tensors whose shapes are known up front; `produce(name)` is called one at a time."""
    entries = list(entries)
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, shape, dtype in entries:
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {"dtype": dtype_tag(dtype), "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # tensors start 8-byte aligned
    with paths.open(path, "wb") as f:  # local, or gs:// streamed through the path layer
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape, dtype in entries:
            array = np.ascontiguousarray(produce(name), dtype=dtype)
            if array.shape != tuple(shape):
                raise ValueError(f"{name}: produced shape {array.shape}, planned {tuple(shape)}")
            f.write(memoryview(array.reshape(-1).view(np.uint8)))  # bytes view: works for bfloat16 too
            del array
    return offset


def iter_checkpoint_files(directory: str | Path) -> Iterator[Path]:
    """The .safetensors files of a HF model directory (single file or sharded with an index)."""
    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        for name in sorted(set(weight_map.values())):
            yield directory / name
    elif (directory / "model.safetensors").exists():
        yield directory / "model.safetensors"
    else:
        raise FileNotFoundError(f"{directory}: no model.safetensors or model.safetensors.index.json")
