"""One path layer for local paths and URLs (`gs://`, `s3://`, ...): every job opens, lists,
makes, writes and copies the paths a config names through these functions, so a key that takes
a local path takes a bucket path too.

    as_path(p)            pathlib.Path for a local path, etils.epath.Path for a URL
    exists / isdir / isfile / listdir / glob / size / makedirs / remove / replace / join / absolute
    open(p, mode)         a file object (URL files accept numpy buffers as local ones do)
    write_atomic(p, data) all of `data` or nothing at `p`
    read_once(files)      local paths and sha256s of files, each URL downloaded once
    local_copy(url)       a local file or directory holding the URL's bytes, copied once
    check_dir(key, p)     a job's check of a directory it reads, naming the key
    config_path_problems  config.validate's offline check of every path key

Local paths keep the standard library's behaviour exactly (`open`, `os.replace`, `glob.glob`).
URLs go through etils.epath, which reads `gs://` through tf.io.gfile when TensorFlow is installed
(as on TPU VMs) and through fsspec (gcsfs) otherwise; TensorFlow is imported only for a URL.
Config checks never contact a bucket (they must work offline, on any worker): a URL is taken as
given there and a missing object surfaces where it is read, with the key in the message.
"""

from __future__ import annotations

import builtins
import contextlib
import glob as _glob
import hashlib
import json
import os
import pathlib
import shutil
import tempfile
from typing import IO, Any, Iterator, Sequence

from xinst_jax.config import ConfigError

AnyPath = Any  # pathlib.Path for a local path, etils.epath.Path for a URL
CACHE_ENV = "XINST_CACHE_DIR"  # where local_copy keeps copies of URLs (default: <tmp>/xinst_jax_cache)
_GLOB_CHARS = "*?["
_LISTING = ".listing.json"  # beside a cached copy: the remote names and sizes it was made from


def import_tf():
    """TensorFlow, quiet and CPU only (the trainer's accelerators stay JAX's). Imported on first use."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    import tensorflow as tf

    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:
        pass  # already initialised: visible devices were fixed by the first user
    return tf


def is_remote(path: Any) -> bool:
    """A URL (scheme://...). Pass strings: pathlib.Path("gs://b") has already lost a slash."""
    return "://" in str(path)


def as_path(path: Any) -> AnyPath:
    if not is_remote(path):
        return pathlib.Path(path)
    _quiet_tensorflow()
    from etils import epath

    try:
        return epath.Path(str(path))
    except KeyError:
        raise ConfigError(f"{path}: unsupported URL scheme (local paths, gs://, s3://, az://, hf://)") from None


_tf_ready = False


def _quiet_tensorflow() -> None:
    """epath uses tf.io.gfile for URLs when TensorFlow is installed: import it our way first
    (quiet, GPUs hidden from TF), not epath's. EPATH_USE_TF=false turns epath's use off."""
    global _tf_ready
    if _tf_ready or os.environ.get("EPATH_USE_TF", "").lower() in ("false", "no", "f", "0"):
        return
    try:
        import_tf()
    except ImportError:
        pass  # no TensorFlow: epath uses fsspec
    _tf_ready = True


def join(base: Any, *names: str) -> str:
    return os.path.join(str(base), *names)


def absolute(path: Any) -> str:
    """How a manifest names a path from any working directory: resolved locally, a URL as given."""
    return str(path) if is_remote(path) else str(pathlib.Path(path).resolve())


def exists(path: Any) -> bool:
    return as_path(path).exists() if is_remote(path) else os.path.exists(path)


def isdir(path: Any) -> bool:
    return as_path(path).is_dir() if is_remote(path) else os.path.isdir(path)


def isfile(path: Any) -> bool:
    return as_path(path).is_file() if is_remote(path) else os.path.isfile(path)


def listdir(path: Any) -> list[str]:
    """Names in a directory, sorted."""
    if not is_remote(path):
        return sorted(os.listdir(path))
    return sorted(p.name for p in as_path(path).iterdir())


def glob(pattern: Any) -> list[str]:
    """Paths matching a pattern, sorted; a pattern without wildcards matches itself if it exists."""
    pattern = str(pattern)
    if not is_remote(pattern):
        return sorted(_glob.glob(pattern))
    cut = min((pattern.find(c) for c in _GLOB_CHARS if c in pattern), default=-1)
    if cut < 0:
        return [pattern] if exists(pattern) else []
    base = pattern[:pattern.rfind("/", 0, cut)]  # the directory above the first wildcard
    rest = pattern[len(base) + 1:]
    return sorted(str(p) for p in as_path(base).glob(rest))


def size(path: Any) -> int:
    return os.path.getsize(path) if not is_remote(path) else as_path(path).stat().length


def makedirs(path: Any) -> None:
    as_path(path).mkdir(parents=True, exist_ok=True)


def remove(path: Any) -> None:
    """Delete a file if it is there."""
    as_path(path).unlink(missing_ok=True)


def replace(src: Any, dst: Any) -> None:
    """Rename a file over `dst` (on a bucket: a copy, then a delete)."""
    if is_remote(src) or is_remote(dst):
        as_path(src).replace(as_path(dst))
    else:
        os.replace(src, dst)


def open(path: Any, mode: str = "rb", encoding: str | None = None) -> IO:  # noqa: A001 (the layer's open)
    if not is_remote(path):
        return builtins.open(path, mode, encoding=encoding)
    f = as_path(path).open(mode, encoding=encoding)
    return _BufferWriter(f) if "b" in mode and ("w" in mode or "a" in mode) else f


class _BufferWriter:
    """tf.io.gfile's files take bytes or str only; a numpy buffer (memoryview) becomes bytes."""

    def __init__(self, f: IO):
        self._f = f

    def write(self, data: Any) -> Any:
        return self._f.write(bytes(data) if isinstance(data, memoryview) else data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)

    def __enter__(self) -> "_BufferWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self._f.close()


def read_bytes(path: Any) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def read_text(path: Any) -> str:
    return read_bytes(path).decode("utf-8")


def write_atomic(path: Any, data: bytes) -> None:
    """All of `data` at `path` or nothing new there. Locally: a temporary file, fsync, rename. A
    URL: one object upload (a bucket shows an object only once its upload completes)."""
    if is_remote(path):
        with open(path, "wb") as f:
            f.write(data)
        return
    path = pathlib.Path(path)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    with builtins.open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def copy_file(src: Any, dst: Any) -> None:
    """Copy bytes between any two paths (local or URL, either side), streamed."""
    if not is_remote(src) and not is_remote(dst):
        shutil.copy(src, dst)
        return
    with open(src, "rb") as r, open(dst, "wb") as w:
        shutil.copyfileobj(r, w, 1 << 24)


@contextlib.contextmanager
def read_once(files: Sequence[Any]) -> Iterator[list[tuple[str, str]]]:
    """(a local path holding the file's bytes, the sha256 of those bytes) per file, for a job that
    fingerprints its input and then parses it: a URL is downloaded once, into a temporary directory
    removed on exit, and hashed on the way (not fetched once to hash and again to read). A local file
    is hashed and used in place (reading it twice costs no transfer)."""
    with tempfile.TemporaryDirectory(prefix="xinst_jax_input-") as tmp:
        yield [_hashed_copy(f, tmp) if is_remote(f) else (str(f), file_sha256(f)) for f in files]


def _hashed_copy(url: Any, tmp: str) -> tuple[str, str]:
    """The URL's bytes at <tmp>/<scheme>/<bucket>/<key> (messages that name the copy still show the
    object's name and suffix), and their sha256."""
    local = os.path.join(tmp, *str(url).split("://", 1))
    os.makedirs(os.path.dirname(local), exist_ok=True)
    with builtins.open(local, "wb") as sink:
        return local, file_sha256(url, sink)


def file_sha256(path: Any, sink: IO | None = None) -> str:
    """sha256 of a file's bytes, read in blocks; each block also written to `sink` when given."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
            if sink is not None:
                sink.write(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------- local copies of URLs


def cache_root() -> str:
    return os.environ.get(CACHE_ENV) or os.path.join(tempfile.gettempdir(), "xinst_jax_cache")


def _remote_listing(url: str) -> dict[str, int]:
    """{relative name: size} of every file under a URL ({"": size} for one file); {} if absent."""
    top = as_path(url)
    if not top.is_dir():
        return {"": top.stat().length} if top.exists() else {}
    out: dict[str, int] = {}
    stack = [(top, "")]
    while stack:
        node, prefix = stack.pop()
        for child in node.iterdir():
            name = f"{prefix}{child.name}"
            if child.is_dir():
                stack.append((child, name + "/"))
            else:
                out[name] = child.stat().length
    return out


@contextlib.contextmanager
def _locked(lock_file: str) -> Iterator[None]:
    """One process per machine copies a URL; the others wait and then reuse its copy."""
    import fcntl

    with builtins.open(lock_file, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def local_copy(path: Any, key: str = "") -> str:
    """A local path with `path`'s bytes, for readers that need a real file (safetensors memory
    maps, Hugging Face directories): `path` itself when local, else a copy of the file or
    directory tree under cache_root(), keyed by the URL and reused while the remote names and
    sizes are unchanged. `key` names the config key in the error for a missing URL."""
    if not is_remote(path):
        return str(path)
    url = str(path).rstrip("/")
    listing = _remote_listing(url)
    if not listing:
        raise ConfigError(f"{key + ': ' if key else ''}{url} not found")
    slot = os.path.join(cache_root(), hashlib.sha256(url.encode()).hexdigest()[:16])
    os.makedirs(slot, exist_ok=True)
    target = os.path.join(slot, os.path.basename(url) or "root")
    with _locked(os.path.join(slot, ".lock")):
        if _cached(target, listing):
            return target
        _download(url, listing, target)
        with builtins.open(os.path.join(slot, _LISTING), "w", encoding="utf-8") as f:
            json.dump(listing, f, sort_keys=True)
    return target


def _cached(target: str, listing: dict[str, int]) -> bool:
    marker = os.path.join(os.path.dirname(target), _LISTING)
    try:
        with builtins.open(marker, encoding="utf-8") as f:
            return json.load(f) == listing and os.path.exists(target)
    except (OSError, ValueError):
        return False


def _download(url: str, listing: dict[str, int], target: str) -> None:
    """Copy into a temporary sibling, then rename: a cut-short copy is never taken for done."""
    tmp = f"{target}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    for name in listing:
        dst = os.path.join(tmp, name) if name else tmp
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        copy_file(f"{url}/{name}" if name else url, dst)
    marker = os.path.join(os.path.dirname(target), _LISTING)
    if os.path.exists(marker):
        os.remove(marker)
    if os.path.isdir(target):
        shutil.rmtree(target)
    elif os.path.exists(target):
        os.remove(target)
    os.replace(tmp, target)


# --------------------------------------------------------------------------- config checks


def check_dir(key: str, value: str) -> str:
    """A local directory must exist; a URL is taken as given (read later, `key` in the errors)."""
    if not is_remote(value) and not os.path.isdir(value):
        raise ConfigError(f"{key}: {value} is not a directory{'' if os.path.exists(value) else ' (not found)'}")
    return value


# Config keys that name files or directories: each takes a local path or a URL.
PATH_KEYS = ("train.init_from", "data.tokenizer", "data.prepared_dir", "data.eval_prepared_dir", "checkpoint.dir",
             "export.out", "export.checkpoint", "export.hf_source", "export.tokenizer_dir", "generate.input",
             "generate.output", "generate.checkpoint", "generate.hf_dir", "generate.tokenizer", "curate.out", "curate.candidates",
             "curate.evaluator_checkpoint", "curate.evaluator_hf_dir", "curate.diversify.input",
             "curate.diversify.embedder_dir", "eval.out", "eval.prompts", "eval.reference", "eval.xcopa",
             "eval.metrics", "eval.judge.cache", "pipeline.base_model", "pipeline.tokenizer")
INPUT_LIST_KEYS = ("data.inputs", "data.eval_inputs", "curate.corpus", "curate.seed_pairs", "eval.perplexity",
                   "pipeline.seed_pairs", "pipeline.corpus")
LOCAL_ONLY_KEYS = {"run_dir": "metrics, TensorBoard events and the resolved config are written there on each "
                               "worker; put checkpoint.dir and export.out on the bucket instead"}
_SCHEMES = ("gs", "s3", "az", "hf")


def url_problem(value: str) -> str:
    """Why a path value is a broken URL ("" when it is fine): `gs:/bucket` (a slash lost, so a
    local relative path) or a URL without a bucket."""
    if "://" not in value and ":/" in value and value.split(":/", 1)[0] in _SCHEMES:
        return f"{value!r} is a local path; did you mean {value.replace(':/', '://', 1)!r}?"
    if "://" in value and not value.split("://", 1)[1].strip("/"):
        return f"{value!r} names no bucket"
    return ""


def config_path_problems(cfg: Any) -> list[tuple[str, str]]:
    """(key, problem) for every path key of a Config whose value cannot work; no bucket is
    contacted (config.validate runs this on every load, offline)."""
    values = [(key, _dotted(cfg, key)) for key in PATH_KEYS]
    for key in INPUT_LIST_KEYS:
        values += [(f"{key}[{i}].path", inp.path) for i, inp in enumerate(_dotted(cfg, key))]
    out = [(key, url_problem(v)) for key, v in values if v and url_problem(v)]
    out += [(key, f"{_dotted(cfg, key)!r} is a URL, but {key} must be local ({why})")
            for key, why in LOCAL_ONLY_KEYS.items() if is_remote(_dotted(cfg, key))]
    return out


def _dotted(obj: Any, key: str) -> Any:
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj
