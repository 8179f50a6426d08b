"""An offline `gs://` for tests: etils.epath's gs:// backend pointed at fsspec's in-memory
filesystem, so code given gs:// URLs runs through the path layer (xinst_jax/paths.py) exactly as
on a bucket, without network. TensorFlow-native readers (tf.data, TFRecordWriter) do not see it.

The bucket counts its traffic (`MemoryGCS.reads`, `.writes`): what a job downloads and uploads,
so tests can assert that a job reads an object once or uploads each byte once."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
from typing import Any, Iterator
from unittest import mock


@dataclasses.dataclass
class MemoryGCS:
    fs: Any  # the fsspec memory filesystem holding the objects
    reads: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # URL -> opens to read
    writes: list = dataclasses.field(default_factory=list)  # (URL, bytes written), one per object upload, in order


class _CountingWriter:
    """A file open for writing that records (URL, bytes written) when it is closed."""

    def __init__(self, f: Any, url: str, bucket: MemoryGCS):
        self._f, self._url, self._bucket, self._n = f, url, bucket, 0

    def write(self, data: Any) -> Any:
        self._n += len(data.encode("utf-8") if isinstance(data, str) else data)
        return self._f.write(data)

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()
            self._bucket.writes.append((self._url, self._n))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)

    def __enter__(self) -> "_CountingWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _memory_backend(bucket: MemoryGCS):
    import fsspec
    from etils.epath import backend

    class MemoryBackend(backend._FileSystemSpecBackend):  # noqa: SLF001 (epath's own fsspec backend)
        def fs(self, path):
            return fsspec.filesystem("memory")

        def glob(self, path):
            return list(self.fs(path).glob(str(path)))  # keys already carry gs://

        def open(self, path, mode):
            f = super().open(path, mode)
            if "r" in mode:
                bucket.reads[str(path)] += 1
                return f
            return _CountingWriter(f, str(path), bucket)

    return MemoryBackend()


@contextlib.contextmanager
def memory_gcs() -> Iterator[MemoryGCS]:
    """Inside: gs://... lives in memory (emptied on exit). Yields the bucket (filesystem and traffic)."""
    import fsspec
    from etils.epath import gpath

    bucket = MemoryGCS(fsspec.filesystem("memory"))
    table = {**gpath._PREFIX_TO_BACKEND, "gs": _memory_backend(bucket)}  # noqa: SLF001
    # epath caches whether it uses TensorFlow the first time any gs:// path is touched in the process
    # (an earlier test may have done so), so the cached answer is replaced too, not only the variable.
    with mock.patch.dict("os.environ", {"EPATH_USE_TF": "false"}), \
            mock.patch.object(gpath, "_is_tf_installed", lambda: False), \
            mock.patch.object(gpath, "_PREFIX_TO_BACKEND", table):
        try:
            yield bucket
        finally:
            bucket.fs.store.clear()
            bucket.fs.pseudo_dirs[:] = [""]
