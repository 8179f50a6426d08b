"""Stage directories: JSONL shards written atomically with done-markers, merged in order, and a
manifest that refuses to mix two runs' shards. Every sharded, resumable job uses these
(`generate`, `candidates`, `refine`): a shard is the unit of resume.

    part-00000.jsonl, part-00000.done, ...   a shard, then its marker (line count + sha256)
    manifest.json                            what the shards were made from
    output.jsonl                             all shards merged in order (when all are done)

A shard is written to a temporary file and renamed, then its marker is written, so a `kill -9`
at any point leaves either a finished shard (marker matches its bytes) or one that is redone.
`out` is a pathlib.Path or, for a `gs://` stage directory, an etils.epath.Path
(`xinst_jax.paths.as_path`): every read and write here goes through the path layer.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from xinst_jax import paths
from xinst_jax.paths import file_sha256  # noqa: F401 - the stages' fingerprint of an input file
from xinst_jax.config import ConfigError


def write_atomic(path: Any, data: bytes) -> None:
    paths.write_atomic(path, data)


def write_json(path: Any, obj) -> None:
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False).encode("utf-8"))


def shard_ranges(num_records: int, shard_size: int) -> list[tuple[int, int]]:
    return [(s, min(s + shard_size, num_records)) for s in range(0, num_records, shard_size)]


def shards_for_process(num_shards: int, process: int, count: int, split: str = "contiguous") -> list[int]:
    """Shard indices process `process` of `count` handles: a contiguous range or process::count."""
    if split == "strided":
        return list(range(process, num_shards, count))
    base, extra = divmod(num_shards, count)
    start = process * base + min(process, extra)
    return list(range(start, start + base + (1 if process < extra else 0)))


def shard_paths(out: Path, k: int) -> tuple[Path, Path]:
    return out / f"part-{k:05d}.jsonl", out / f"part-{k:05d}.done"


def read_done_marker(out: Path, k: int) -> dict | None:
    """The shard's marker when the shard's bytes match it, else None (not done)."""
    part, done = shard_paths(out, k)
    if not (part.exists() and done.exists()):
        return None
    try:
        marker = json.loads(done.read_text())
        data = part.read_bytes()
    except (OSError, ValueError):
        return None
    if marker.get("records") != data.count(b"\n") or marker.get("sha256") != hashlib.sha256(data).hexdigest():
        return None
    return marker


def shard_is_done(out: Path, k: int, expected: int | None = None) -> bool:
    """Shard k is finished (and holds `expected` lines, when given)."""
    marker = read_done_marker(out, k)
    return marker is not None and (expected is None or marker["records"] == expected)


def write_shard(out: Path, k: int, lines: list[str], extra: dict | None = None) -> None:
    """Write shard k's lines, then its marker (with `extra`, e.g. the shard's counts)."""
    part, done = shard_paths(out, k)
    if done.exists():
        done.unlink()
    data = "".join(line + "\n" for line in lines).encode("utf-8")
    write_atomic(part, data)
    marker = {"records": len(lines), "sha256": hashlib.sha256(data).hexdigest(), **(extra or {})}
    write_atomic(done, json.dumps(marker, ensure_ascii=False).encode("utf-8"))


def merge_shards(out: Path, num_shards: int, name: str = "output.jsonl") -> Path:
    target = out / name
    if paths.is_remote(target):  # one streamed upload: the object appears when it is complete
        with paths.open(target, "wb") as f:
            for k in range(num_shards):
                f.write(shard_paths(out, k)[0].read_bytes())
        return target
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        for k in range(num_shards):
            f.write(shard_paths(out, k)[0].read_bytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, target)
    return target


def check_manifest(out: Path, manifest: dict, key: str, write: bool = True) -> None:
    """Refuse to mix shards of different runs (`key`: the config key naming `out`): every key of
    `manifest` must equal the saved one (the saved manifest may hold more, e.g. the counts a
    finished stage adds). Write the manifest if there is none (and `write`)."""
    path = out / "manifest.json"
    manifest = json.loads(json.dumps(manifest))  # tuples -> lists, as read back
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except ValueError:
            old = None
        changed = sorted(k for k in manifest if old is not None and old.get(k) != manifest[k])
        if changed:
            raise ConfigError(f"{key}: {out} holds shards of another run ({', '.join(changed)} changed); use "
                              "another directory or delete that one")
        if old is not None:
            return
    if write:
        write_json(path, manifest)
