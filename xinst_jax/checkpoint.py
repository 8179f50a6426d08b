"""Orbax checkpoints: one step dir holds the train state, every process's data-iterator state and
the resolved config. Async saves, keep-K, auto-resume from the latest step that restores,
restoring onto any mesh (arrays come back with the shardings the caller asks for).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from etils import epath
from orbax.checkpoint import args as ocp_args

from xinst_jax.config import CheckpointConfig, ConfigError, ModelConfig, check_same_architecture

log = logging.getLogger(__name__)


class ProcessLocalJsonHandler(ocp.JsonCheckpointHandler):
    """Every process writes its own `process_<i>.json` (iterator states differ per host, as in T5X)."""

    def __init__(self):
        super().__init__(filename="process_0.json")

    async def _save_fn(self, x, directory):
        (directory / f"process_{jax.process_index()}.json").write_text(json.dumps(x))

    def restore(self, directory: epath.Path, item: Any = None, args: Any = None) -> Mapping[str, Any]:
        path = directory / f"process_{jax.process_index()}.json"
        if not path.exists():
            raise FileNotFoundError(f"{path} not found")
        state = json.loads(path.read_text())
        saved = state.get("process_count", 1)
        if saved != jax.process_count():
            raise ConfigError(f"{directory}: data-iterator state was saved by {saved} processes; restoring with "
                              f"{jax.process_count()} would repeat or drop examples. Resume with {saved} "
                              "processes, or start the data afresh (checkpoint.resume=false and import the params).")
        return state


@ocp_args.register_with_handler(ProcessLocalJsonHandler, for_save=True)
@dataclasses.dataclass
class ProcessLocalJsonSave(ocp_args.CheckpointArgs):
    item: Mapping[str, Any]


@ocp_args.register_with_handler(ProcessLocalJsonHandler, for_restore=True)
@dataclasses.dataclass
class ProcessLocalJsonRestore(ocp_args.CheckpointArgs):
    item: Optional[bytes] = None


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
                           "config": ocp.JsonCheckpointHandler()})

    def save(self, step: int, state: Any, data_state: dict, config: dict, force: bool = False) -> bool:
        data_state = {**data_state, "process_count": jax.process_count()}
        return self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ProcessLocalJsonSave(data_state),
            config=ocp.args.JsonSave(config)), force=force)

    def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict, dict] | None:
        """Restore the newest step that restores cleanly; a broken newer step is removed with a
        warning (a kill mid-write or a corrupt file must not block the run). A step whose saved
        tree or shapes differ from `abstract_state` is a config change, not corruption: that raises
        ConfigError and deletes nothing."""
        for step in sorted(self.manager.all_steps(), reverse=True):
            mismatch = self._mismatch(step, abstract_state)
            if mismatch is not None:
                raise ConfigError(f"checkpoint step {step} in {self.directory} was written by another model or "
                                  f"optimizer config ({mismatch}); resume with the config it was saved with, or "
                                  "use a fresh checkpoint.dir / run_dir (or checkpoint.resume=false)")
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), data=ProcessLocalJsonRestore(),
                    config=ocp.args.JsonRestore()))
            except ConfigError:
                raise
            except Exception as e:  # noqa: BLE001 - any failure to read means this step is unusable
                aside = self.directory / f"{step}.unrestorable"
                log.warning("checkpoint step %d in %s does not restore (%s: %s); moved aside to %s, using the "
                            "previous one", step, self.directory, type(e).__name__,
                            str(e).splitlines()[0][:200], aside.name)
                # Moved, not deleted: a transient storage error must not destroy a good checkpoint.
                if jax.process_index() == 0:
                    if aside.exists():
                        aside.rmtree()
                    (self.directory / str(step)).rename(aside)
                multihost_utils.sync_global_devices(f"checkpoint-aside-{step}")
                self.manager.reload()
                continue
            return step, restored["state"], dict(restored["data"]), dict(restored["config"])
        return None

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
    steps = sorted((int(p.name) for p in path.iterdir() if p.name.isdigit() and (p / "state").exists()))
    if not steps:
        raise ConfigError(f"export.checkpoint: {path} holds no checkpoint step")
    return path / str(steps[-1])


def load_params_for_export(path: str | Path, model_cfg: ModelConfig) -> Any:
    """Only the params of a checkpoint (optimizer state is never read), as host-backed arrays."""
    step_dir = resolve_step_dir(path)
    config_file = step_dir / "config" / "metadata"
    if config_file.exists():
        check_same_architecture(model_cfg, json.loads(config_file.read_text()).get("model", {}), str(step_dir))
    from xinst_jax.model.llama import param_shapes

    target = {"params": param_shapes(model_cfg)}
    # numpy, not jax.Arrays: the saved shardings name the training run's devices, which the
    # exporting process (fewer devices, another host) need not have.
    restore_args = jax.tree.map(lambda s: ocp.RestoreArgs(restore_type=np.ndarray, dtype=s.dtype), target)
    restored = ocp.PyTreeCheckpointer().restore(
        step_dir / "state", args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args,
                                                        partial_restore=True))
    return restored["params"]
