"""An offline `gs://` for tests: etils.epath's gs:// backend pointed at fsspec's in-memory
filesystem, so code given gs:// URLs runs through the path layer (xinst_jax/paths.py) exactly as
on a bucket, without network. TensorFlow-native readers (tf.data, TFRecordWriter) do not see it."""

from __future__ import annotations

import contextlib
from typing import Iterator
from unittest import mock


def _memory_backend():
    import fsspec
    from etils.epath import backend

    class MemoryBackend(backend._FileSystemSpecBackend):  # noqa: SLF001 (epath's own fsspec backend)
        def fs(self, path):
            return fsspec.filesystem("memory")

        def glob(self, path):
            return list(self.fs(path).glob(str(path)))  # keys already carry gs://

    return MemoryBackend()


@contextlib.contextmanager
def memory_gcs() -> Iterator[object]:
    """Inside: gs://... lives in memory (emptied on exit). Yields the fsspec filesystem."""
    import fsspec
    from etils.epath import gpath

    fs = fsspec.filesystem("memory")
    table = {**gpath._PREFIX_TO_BACKEND, "gs": _memory_backend()}  # noqa: SLF001
    # epath caches whether it uses TensorFlow the first time any gs:// path is touched in the process
    # (an earlier test may have done so), so the cached answer is replaced too, not only the variable.
    with mock.patch.dict("os.environ", {"EPATH_USE_TF": "false"}), \
            mock.patch.object(gpath, "_is_tf_installed", lambda: False), \
            mock.patch.object(gpath, "_PREFIX_TO_BACKEND", table):
        try:
            yield fs
        finally:
            fs.store.clear()
            fs.pseudo_dirs[:] = [""]
