"""Orbax checkpoints: one step dir holds the train state, every process's data-iterator state,
the resolved config and the checksums of all of it. Async saves, keep-K, auto-resume from the
latest step that restores, restoring onto any mesh (arrays come back with the shardings the
caller asks for).

Checksums (a restore must never hand back bytes other than those saved; a flipped byte in an
orbax data file usually restores silently as a wrong value):
  state   one 64-bit digest per array of the train state, over its logical content (every
          element's bits at its global position), computed on the devices in one jitted pass
          that save() only dispatches (orbax's background commit fetches the result). It does
          not depend on the mesh or on how many processes hold the array, so a 2-process save
          and a 1-process save of the same values agree, and a restore onto another mesh
          verifies every array. Written as the step's `checksums` item (process 0).
  data    each process writes `data/process_<i>.sha256` beside its iterator-state file.
Both are written inside the step while orbax saves it, so they commit with it atomically.
On restore every array and this process's iterator file are checked. A mismatch or a read error
makes the step unrestorable: process 0 moves it aside to `<dir>/<step>.unrestorable` (moved, not
deleted), every process logs one line naming the step and the array or file, and the previous
step is tried; with none left the run starts from step 0, said in the log. A step without
checksum files (saved before they existed) restores unverified, with a warning, and so does one
whose digests were made by another algorithm version.

Readers outside training (load_params_for_export: export_hf, generate, serve, eval, the curation
stages) verify the params they read with the same check_state. A mismatch there is an error
naming the step directory and the array, with no fallback and nothing moved (see
load_params_for_export).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax import lax
from jax.experimental import multihost_utils
from orbax.checkpoint import args as ocp_args

from xinst_jax.config import CheckpointConfig, ConfigError, ModelConfig, check_same_architecture

log = logging.getLogger(__name__)

CHECKSUMS_FILE = "checksums.json"  # in <step>/checksums/
DIGEST_ALGORITHM = "xinst-fmix32-sum-v1"  # recorded with the digests: a future change is detected


class CorruptCheckpoint(Exception):
    """A checkpoint's bytes differ from those saved (its checksums say so)."""


class UnreadableCheckpoint(ConfigError):
    """A checkpoint a reader (not the trainer) was given fails its checksums or does not restore:
    one line naming the step directory, exit code 2 at the entry point."""


# --------------------------------------------------------------------------- array digests
#
# Per 32-bit word w at row-major position i: k = fmix32(i * golden + seed), v = fmix32(w ^ k);
# digest = (sum v, sum v * (k | 1)) mod 2^32. fmix32 (MurmurHash3's finaliser) is a bijection,
# so a change to any one word always changes the first sum; several changes cancel in both sums
# with probability about 2^-64. Sums are order-free: any sharding or reduction order gives the
# same digest. Not a cryptographic hash: it guards against storage faults, not against tampering.
# The cost is a few integer ops per element in one pass: memory-bound on TPU/GPU, ~0.3 ns per
# element on a 2-core CPU (dispatched, not awaited, at save).

_U32 = jnp.uint32


def _fmix32(h: jax.Array) -> jax.Array:
    h = h ^ (h >> 16)
    h = h * _U32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * _U32(0xC2B2AE35)
    return h ^ (h >> 16)


def _words(x: jax.Array) -> jax.Array:
    """The array's bits as uint32 words (narrower elements widened, 8-byte ones split in two)."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}
    size = x.dtype.itemsize
    if size in unsigned:
        return lax.bitcast_convert_type(x, unsigned[size]).astype(_U32)
    if size == 8:
        return lax.bitcast_convert_type(x, _U32)  # adds a trailing axis of 2
    raise TypeError(f"no checksum for dtype {x.dtype}")


def _positions(shape: tuple[int, ...]) -> jax.Array:
    """Each word's row-major position in the whole array (mod 2^32), built per axis so that every
    device computes only its own shard's positions."""
    position = jnp.zeros(shape, _U32)
    stride = 1
    for axis in reversed(range(len(shape))):
        position = position + lax.broadcasted_iota(_U32, shape, axis) * _U32(stride % 2**32)
        stride *= shape[axis]
    return position


def _digest(x: jax.Array) -> jax.Array:
    words = _words(x)
    key = _fmix32(_positions(words.shape) * _U32(0x9E3779B9) + _U32(0x2545F491))
    mixed = _fmix32(words ^ key)
    # One variadic reduction: both sums in one pass over the array (two jnp.sums materialise the
    # mixed words and read them twice: 7x slower on XLA:CPU).
    sums = lax.reduce((mixed, mixed * (key | 1)), (_U32(0), _U32(0)),
                      lambda a, b: (a[0] + b[0], a[1] + b[1]), tuple(range(words.ndim)))
    return jnp.stack(sums)


@functools.lru_cache(maxsize=8)
def _digest_fn(out_sharding: Any) -> Any:
    return jax.jit(lambda leaves: jnp.stack([_digest(x) for x in leaves]), out_shardings=out_sharding)


def _replicated(leaves: list[Any]) -> Any:
    """A replicated sharding on the arrays' mesh, so that every process can read the digests."""
    for x in leaves:
        sharding = getattr(x, "sharding", None)
        if isinstance(sharding, jax.sharding.NamedSharding):
            return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
    return None


@dataclasses.dataclass
class PendingDigests:
    """Digests dispatched to the devices and not yet fetched: a save does not wait for them."""

    names: list[str]
    dtypes: list[str]
    shapes: list[list[int]]
    values: Any  # (arrays, 2) uint32, replicated

    def resolve(self) -> dict[str, Any]:
        """The `checksums` item: {algorithm, arrays: {path: {digest, dtype, shape}}}."""
        out = self.values
        values = np.asarray(out.addressable_data(0)) if isinstance(out, jax.Array) else np.asarray(out)
        arrays = {name: {"digest": f"{int(a):08x}{int(b):08x}", "dtype": dtype, "shape": shape}
                  for name, dtype, shape, (a, b) in zip(self.names, self.dtypes, self.shapes, values)}
        return {"algorithm": DIGEST_ALGORITHM, "arrays": arrays}


def _dispatch(names: list[str], leaves: list[Any]) -> PendingDigests:
    values = _digest_fn(_replicated(leaves))(leaves) if leaves else np.zeros((0, 2), np.uint32)
    return PendingDigests(names, [str(_dtype(x)) for x in leaves], [list(np.shape(x)) for x in leaves], values)


def _named_leaves(state: Any) -> tuple[list[str], list[Any]]:
    named = jax.tree_util.tree_flatten_with_path(state)[0]
    return [_path_name(path) for path, _ in named], [x for _, x in named]


def dispatch_digests(state: Any) -> PendingDigests:
    """Start the digests of every array of `state` (a collective when the arrays span processes:
    every process calls this at the same point). Later donation of `state`'s buffers waits for them."""
    return _dispatch(*_named_leaves(state))


def state_digests(state: Any) -> dict[str, dict[str, Any]]:
    """{array path: {digest, dtype, shape}}; every process gets the same, whatever the mesh.
    Arrays on the devices are digested in one pass; host (numpy) arrays one at a time, so that of a
    model read into host memory (export) only one array is on the device at once."""
    names, leaves = _named_leaves(state)
    if all(isinstance(x, jax.Array) for x in leaves):
        return _dispatch(names, leaves).resolve()["arrays"]
    digests: dict[str, dict[str, Any]] = {}
    for name, x in zip(names, leaves):
        digests.update(_dispatch([name], [x]).resolve()["arrays"])
    return digests


def _dtype(x: Any) -> Any:
    return x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype


def check_state(state: Any, saved: Optional[Mapping[str, Any]], where: str) -> None:
    """The one verification of restored arrays (the trainer's restore and every reader's): raise
    CorruptCheckpoint naming the arrays of `state` (the whole train state or a part of it, e.g.
    the params) whose digest differs from `saved` (a `checksums` item). No `saved` (a step written
    before checksums existed) restores unverified with a warning. An array whose dtype changed
    since (a cast on restore) is not comparable: it is skipped with a warning, as are all of them
    when another algorithm made the digests."""
    if saved is None:
        log.warning("%s has no checksums/%s (saved before checksums were added): restoring it unverified", where,
                    CHECKSUMS_FILE)
        return
    if saved.get("algorithm") != DIGEST_ALGORITHM:
        log.warning("%s: checksums made by '%s', this version checks %s: restoring it unverified", where,
                    saved.get("algorithm"), DIGEST_ALGORITHM)
        return
    recorded, actual = saved.get("arrays", {}), state_digests(state)
    unchecked = sorted(name for name, now in actual.items()
                       if name not in recorded or recorded[name]["dtype"] != now["dtype"])
    if unchecked:
        log.warning("%s: %d array(s) restored unverified (no checksum of that dtype saved): %s",
                    where, len(unchecked), ", ".join(unchecked[:3]))
    bad = sorted(name for name, now in actual.items()
                 if name not in unchecked and recorded[name]["digest"] != now["digest"])
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise CorruptCheckpoint(f"state array {bad[0]}{more} does not match its checksum")


def file_digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------- data-iterator state


class ProcessLocalJsonHandler(ocp.JsonCheckpointHandler):
    """Every process writes its own `process_<i>.json` (iterator states differ per host, as in T5X)
    and its sha256 in `process_<i>.sha256`."""

    def __init__(self):
        super().__init__(filename="process_0.json")

    async def _save_fn(self, x, directory):
        text = json.dumps(x)
        name = f"process_{jax.process_index()}"
        (directory / f"{name}.json").write_text(text)
        (directory / f"{name}.sha256").write_text(file_digest(text.encode()))

    def restore(self, directory: epath.Path, item: Any = None, args: Any = None) -> Mapping[str, Any]:
        name = f"process_{jax.process_index()}"
        path = directory / f"{name}.json"
        if not path.exists():
            raise FileNotFoundError(f"{path} not found")
        raw = path.read_bytes()
        _check_file(path, raw, directory / f"{name}.sha256")
        state = json.loads(raw)
        saved = state.get("process_count", 1)
        if saved != jax.process_count():
            raise ConfigError(f"{directory}: data-iterator state was saved by {saved} processes; restoring with "
                              f"{jax.process_count()} would repeat or drop examples. Resume with {saved} "
                              "processes, or start the data afresh (checkpoint.resume=false and import the params).")
        return state


def _check_file(path: epath.Path, raw: bytes, digest_path: epath.Path) -> None:
    if not digest_path.exists():
        log.warning("%s has no checksum file (saved before checksums were added): restoring it unverified", path)
        return
    if digest_path.read_text().strip() != file_digest(raw):
        raise CorruptCheckpoint(f"{path.parent.name}/{path.name} does not match its checksum")


@ocp_args.register_with_handler(ProcessLocalJsonHandler, for_save=True)
@dataclasses.dataclass
class ProcessLocalJsonSave(ocp_args.CheckpointArgs):
    item: Mapping[str, Any]


@ocp_args.register_with_handler(ProcessLocalJsonHandler, for_restore=True)
@dataclasses.dataclass
class ProcessLocalJsonRestore(ocp_args.CheckpointArgs):
    item: Optional[bytes] = None


class ChecksumsHandler(ocp.JsonCheckpointHandler):
    """The `checksums` item, written by process 0. The digests are fetched inside orbax's commit
    (a background thread for async saves), so save() returns as soon as they are dispatched."""

    def __init__(self):
        super().__init__(filename=CHECKSUMS_FILE)

    async def _save_fn(self, x, directory):
        if jax.process_index() == 0:
            checksums = await asyncio.to_thread(x.resolve) if isinstance(x, PendingDigests) else x
            (directory / CHECKSUMS_FILE).write_text(json.dumps(checksums))


@ocp_args.register_with_handler(ChecksumsHandler, for_save=True)
@dataclasses.dataclass
class ChecksumsSave(ocp_args.CheckpointArgs):
    item: PendingDigests | Mapping[str, Any]


@ocp_args.register_with_handler(ChecksumsHandler, for_restore=True)
@dataclasses.dataclass
class ChecksumsRestore(ocp_args.CheckpointArgs):
    item: Optional[bytes] = None


# --------------------------------------------------------------------------- the checkpointer


class Checkpointer:
    """Thin policy layer over ocp.CheckpointManager."""

    def __init__(self, directory: str | Path, cfg: CheckpointConfig):
        directory = str(directory)
        # orbax wants absolute paths; run_dir defaults to the relative runs/<name>.
        self.directory = epath.Path(directory if "://" in directory else os.path.abspath(directory))
        options = ocp.CheckpointManagerOptions(max_to_keep=cfg.keep, enable_async_checkpointing=cfg.async_save,
                                               create=True)
        self.manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(), "data": ProcessLocalJsonHandler(),
                           "config": ocp.JsonCheckpointHandler(),
                           "checksums": ChecksumsHandler()})

    def save(self, step: int, state: Any, data_state: dict, config: dict, force: bool = False) -> bool:
        if not (force or self.manager.should_save(step)):
            return False
        data_state = {**data_state, "process_count": jax.process_count()}
        return self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ProcessLocalJsonSave(data_state),
            config=ocp.args.JsonSave(config), checksums=ChecksumsSave(dispatch_digests(state))), force=force)

    def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict, dict] | None:
        """Restore the newest step that restores and matches its checksums; an unrestorable newer
        step is moved aside with a warning (a kill mid-write or a corrupt file must not block the
        run). A step whose saved tree or shapes differ from `abstract_state` is a config change, not
        corruption: that raises ConfigError and moves nothing."""
        moved = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            mismatch = self._mismatch(step, abstract_state)
            if mismatch is not None:
                raise ConfigError(f"checkpoint step {step} in {self.directory} was written by another model or "
                                  f"optimizer config ({mismatch}); resume with the config it was saved with, or "
                                  "use a fresh checkpoint.dir / run_dir (or checkpoint.resume=false)")
            restored, problem = self._restore_verified(step, abstract_state)
            if problem is None:
                return step, restored["state"], dict(restored["data"]), dict(restored["config"])
            self._move_aside(step, problem)
            moved.append(step)
        if moved:
            log.warning("no checkpoint step in %s restores (moved aside: %s): starting from step 0", self.directory,
                        ", ".join(f"{s}.unrestorable" for s in moved))
        return None

    def _restore_verified(self, step: int, abstract_state: Any) -> tuple[dict | None, str | None]:
        """(the restored items, None), or (None, why the step is unusable): the same answer on
        every process."""
        has_checksums = _checksums_file(self.directory / str(step)).exists()
        items = dict(state=ocp.args.StandardRestore(abstract_state), data=ProcessLocalJsonRestore(),
                     config=ocp.args.JsonRestore())
        if has_checksums:
            items["checksums"] = ChecksumsRestore()
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        except ConfigError:
            raise
        except Exception as e:  # noqa: BLE001 - any failure to read means this step is unusable
            problem = _one_line(e)
        else:
            problem = None
        # The iterator files differ per process: agree before the digests' collective.
        problem = _agree(problem)
        if problem is not None:
            return None, problem
        try:  # the digests are replicated: every process reaches the same verdict
            check_state(restored["state"], restored.get("checksums"), f"checkpoint step {step} in {self.directory}")
        except CorruptCheckpoint as e:
            return None, str(e)
        return restored, None

    def _move_aside(self, step: int, problem: str) -> None:
        """Moved, not deleted: a transient storage error must not destroy a good checkpoint."""
        aside = self.directory / f"{step}.unrestorable"
        log.warning("checkpoint step %d in %s does not restore (%s); moved aside to %s, trying the previous one",
                    step, self.directory, problem, aside.name)
        if jax.process_index() == 0:
            if aside.exists():
                aside.rmtree()
            (self.directory / str(step)).rename(aside)
        multihost_utils.sync_global_devices(f"checkpoint-aside-{step}")
        self.manager.reload()

    def _mismatch(self, step: int, abstract_state: Any) -> str | None:
        """How the state saved at `step` differs in entries or shapes from `abstract_state`, or None
        (also when its metadata cannot be read: restoring then fails and the step counts as broken)."""
        try:
            saved = self.manager.item_metadata(step)["state"]
        except Exception:  # noqa: BLE001 - unreadable metadata: let the restore attempt decide
            return None
        if saved is None:
            return None

        def flat(tree: Any) -> dict[str, Any]:
            return {_path_name(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}

        want, have = flat(abstract_state), flat(saved)
        missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
        if missing or extra:
            return (f"not in the checkpoint: {', '.join(missing[:3]) or '-'}; only in the checkpoint: "
                    f"{', '.join(extra[:3]) or '-'}")
        for name, leaf in want.items():
            if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
                continue  # keys are stored as their raw uint32 data
            saved_shape = tuple(getattr(have[name], "shape", ()) or ())
            if saved_shape != tuple(leaf.shape):
                return f"{name} has shape {saved_shape} in the checkpoint, {tuple(leaf.shape)} in this run"
        return None

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _one_line(e: Exception) -> str:
    if isinstance(e, CorruptCheckpoint):
        return str(e)
    first = (str(e).splitlines() or [""])[0][:200]
    return f"{type(e).__name__}: {first}"


def _agree(problem: str | None) -> str | None:
    """This process's problem, or, when only another process had one, a note saying so."""
    if jax.process_count() == 1:
        return problem
    anyone = bool(np.any(multihost_utils.process_allgather(np.int32(problem is not None))))
    return problem if problem is not None or not anyone else "another process could not restore it (see its log)"


def _path_name(path: Any) -> str:
    """`opt_state/1/0/mu/embed/embedding`: dict keys, sequence indices and named-tuple fields alike
    (orbax metadata turns named tuples into dicts)."""
    parts = []
    for p in path:
        for attr in ("key", "name", "idx"):
            if hasattr(p, attr):
                parts.append(str(getattr(p, attr)))
                break
        else:
            parts.append(str(p))
    return "/".join(parts)


def resolve_step_dir(path: str | Path) -> epath.Path:
    """A step dir (has `state/`), or a checkpoints root whose latest step is taken."""
    path = epath.Path(path)
    if (path / "state").exists():
        return path
    if not path.exists():
        raise ConfigError(f"export.checkpoint: {path} does not exist")
    steps = _restorable_steps(path)
    if not steps:
        raise ConfigError(f"export.checkpoint: {path} holds no checkpoint step")
    return path / str(steps[-1])


def _restorable_steps(root: epath.Path) -> list[int]:
    """The step numbers under a checkpoints root that hold a `state/`, ascending."""
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit() and (p / "state").exists())


def _checksums_file(step_dir: epath.Path) -> epath.Path:
    return step_dir / "checksums" / CHECKSUMS_FILE


def read_checksums(step_dir: epath.Path) -> Optional[dict]:
    """A step's `checksums` item as saved, or None for a step saved before checksums existed."""
    path = _checksums_file(step_dir)
    return json.loads(path.read_text()) if path.exists() else None


def load_params_for_export(path: str | Path, model_cfg: ModelConfig) -> Any:
    """Only the params of a checkpoint (optimizer state is never read), as host-backed arrays,
    verified against the step's checksums (check_state, as the trainer's restore).

    A step that fails them, or does not restore, raises UnreadableCheckpoint naming the step
    directory and the array. Unlike the trainer's restore there is no fallback to the previous
    step: the trainer may fall back because it then retrains the lost steps, while a reader would
    hand back an older model under the newest one's name (an export labelled as the final model
    that is not). Nor is anything moved aside: readers are read-only (an export may run beside a
    live training run); the trainer moves the step at its next restore. The error names the
    earlier steps to ask for instead."""
    step_dir = resolve_step_dir(path)
    config_file = step_dir / "config" / "metadata"
    if config_file.exists():
        check_same_architecture(model_cfg, json.loads(config_file.read_text()).get("model", {}), str(step_dir))
    from xinst_jax.model.llama import param_shapes

    target = {"params": param_shapes(model_cfg)}
    # numpy, not jax.Arrays: the saved shardings name the training run's devices, which the
    # exporting process (fewer devices, another host) need not have.
    restore_args = jax.tree.map(lambda s: ocp.RestoreArgs(restore_type=np.ndarray, dtype=s.dtype), target)
    try:
        restored = ocp.PyTreeCheckpointer().restore(
            step_dir / "state", args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args,
                                                            partial_restore=True))
        check_state(restored, read_checksums(step_dir), f"checkpoint {step_dir}")
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure to read this step: one line naming it
        raise UnreadableCheckpoint(f"checkpoint {step_dir}: {_one_line(e)}{_earlier_steps(step_dir)}") from e
    return restored["params"]


def _earlier_steps(step_dir: epath.Path) -> str:
    if not step_dir.name.isdigit():
        return ""
    steps = [s for s in reversed(_restorable_steps(step_dir.parent)) if s < int(step_dir.name)]
    listed = ", ".join(str(step_dir.parent / str(s)) for s in steps[:3])
    return f"; earlier steps that may restore: {listed}" if steps else ""
