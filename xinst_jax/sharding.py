"""Device mesh (data, fsdp, tensor; DCN data across slices), logical-axis rules, shardings."""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from xinst_jax.config import ConfigError, MeshConfig

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")
Rules = list[tuple[str, tuple[str, ...]]]


def mesh_shape(mesh_cfg: MeshConfig, num_devices: int) -> tuple[int, int, int]:
    """Resolve -1 entries; the product must equal the device count."""
    if mesh_cfg.dcn_data < 1:
        raise ConfigError(f"mesh.dcn_data: expected a slice count >= 1, got {mesh_cfg.dcn_data}")
    sizes = {"data": mesh_cfg.data * mesh_cfg.dcn_data, "fsdp": mesh_cfg.fsdp, "tensor": mesh_cfg.tensor}
    if mesh_cfg.data == -1:
        sizes["data"] = -1
    fill = [k for k, v in sizes.items() if v == -1]
    if len(fill) > 1:
        raise ConfigError(f"mesh: only one axis may be -1, got {', '.join(fill)}")
    known = math.prod(v for v in sizes.values() if v != -1)
    if any(v == 0 or v < -1 for v in sizes.values()):
        raise ConfigError(f"mesh: axis sizes must be positive or -1, got {sizes}")
    if fill:
        if num_devices % known:
            raise ConfigError(f"mesh: fixed axes multiply to {known}, which does not divide the "
                              f"{num_devices} available devices")
        sizes[fill[0]] = num_devices // known
    if sizes["data"] % mesh_cfg.dcn_data:
        raise ConfigError(f"mesh: the data axis ({sizes['data']}) is not divisible by mesh.dcn_data={mesh_cfg.dcn_data} "
                          "slices")
    product = math.prod(sizes.values())
    if product != num_devices:
        shape = "x".join(f"{k}={v}" for k, v in sizes.items())
        raise ConfigError(f"mesh: {shape} needs {product} devices but {num_devices} are available")
    return sizes["data"], sizes["fsdp"], sizes["tensor"]


def make_mesh(mesh_cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    if mesh_cfg.num_devices < 0:
        raise ConfigError(f"mesh.num_devices: expected 0 (all devices) or a positive count, got {mesh_cfg.num_devices}")
    if mesh_cfg.num_devices > len(devices):
        raise ConfigError(f"mesh.num_devices={mesh_cfg.num_devices} but only {len(devices)} devices exist "
                          f"({devices[0].platform}, {jax.process_count()} process(es))")
    if mesh_cfg.num_devices > 0:
        devices = devices[:mesh_cfg.num_devices]
    shape = mesh_shape(mesh_cfg, len(devices))
    if mesh_cfg.dcn_data > 1 and hasattr(devices[0], "slice_index"):
        from jax.experimental import mesh_utils

        per_slice = (shape[0] // mesh_cfg.dcn_data, shape[1], shape[2])
        grid = mesh_utils.create_hybrid_device_mesh(per_slice, (mesh_cfg.dcn_data, 1, 1), devices)
    elif devices[0].platform == "tpu":
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh(shape, devices)
    else:
        grid = np.asarray(devices).reshape(shape)
    # Explicit Mesh(...) keeps classic GSPMD (Auto) axes on every jax version.
    return Mesh(grid, MESH_AXES)


def parse_rules(raw: list[list[Any]]) -> Rules:
    rules: Rules = []
    for i, item in enumerate(raw):
        if not (isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], str)):
            raise ConfigError(f"mesh.rules[{i}]: expected [logical_name, mesh_axis | [mesh_axes] | null], got {item!r}")
        target = item[1]
        if target is not None and not isinstance(target, (str, list, tuple)):
            raise ConfigError(f"mesh.rules[{i}]: expected [logical_name, mesh_axis | [mesh_axes] | null], got {item!r}")
        axes = () if target is None else (target,) if isinstance(target, str) else tuple(target)
        for axis in axes:
            if axis not in MESH_AXES:
                raise ConfigError(f"mesh.rules[{i}]: unknown mesh axis '{axis}' (mesh axes: {', '.join(MESH_AXES)})")
        if len(set(axes)) != len(axes):
            raise ConfigError(f"mesh.rules[{i}]: mesh axis repeated in {item!r} (each mesh axis shards an array once)")
        rules.append((item[0], axes))
    return rules


def logical_to_spec(logical: Sequence[str | None], shape: Sequence[int], rules: Rules, mesh: Mesh,
                    name: str = "") -> PartitionSpec:
    """Map logical axis names to a PartitionSpec: first matching rule wins, each mesh axis used
    once, size-1 mesh axes dropped. A dimension that the mesh axes do not divide is replicated
    with a warning (tests assert that large params never end up that way)."""
    table = dict()
    for logical_name, axes in rules:
        table.setdefault(logical_name, axes)
    used: set[str] = set()
    spec: list[Any] = []
    for dim, logical_name in zip(shape, logical):
        axes = tuple(a for a in table.get(logical_name, ()) if a not in used and mesh.shape[a] > 1)
        size = math.prod(mesh.shape[a] for a in axes)
        if axes and dim % size:
            log.warning("%s: dimension %s=%d not divisible by mesh axes %s (size %d): replicated",
                        name, logical_name, dim, axes, size)
            axes = ()
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


def tree_shardings(logical_tree: Any, shape_tree: Any, rules: Rules, mesh: Mesh) -> Any:
    """NamedSharding for every leaf of `shape_tree`, given a same-structured tree of logical axes."""
    def one(path, logical, shaped):
        name = jax.tree_util.keystr(path)
        return NamedSharding(mesh, logical_to_spec(logical, shaped.shape, rules, mesh, name))

    return jax.tree_util.tree_map_with_path(one, logical_tree, shape_tree,
                                            is_leaf=lambda x: isinstance(x, tuple))


def batch_sharding(mesh: Mesh, rules: Rules, ndim: int = 2) -> NamedSharding:
    """Rows split over the `batch` rule's mesh axes; the length axis unsplit."""
    axes = tuple(a for a in dict(rules).get("batch", ()) if mesh.shape[a] > 1)
    lead = None if not axes else axes if len(axes) > 1 else axes[0]
    return NamedSharding(mesh, PartitionSpec(lead, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def state_shardings_like_params(abstract_state: Any, param_shardings: Any, mesh: Mesh) -> Any:
    """Shard optimizer moments exactly like the params they track; everything else replicated.

    Optimizer state leaves (Adam's mu/nu) end their key path with the param's path; matching on
    that suffix and the shape finds them without knowing optax's internal layout.
    """
    by_path: dict[tuple, tuple] = {}
    for path, sharding in jax.tree_util.tree_flatten_with_path(param_shardings)[0]:
        by_path[_dict_keys(path)] = sharding

    def one(path, leaf):
        keys = _dict_keys(path)
        for start in range(len(keys)):
            sharding = by_path.get(keys[start:])
            if sharding is not None and len(sharding.spec) <= len(leaf.shape):
                return sharding
        return replicated(mesh)

    return jax.tree_util.tree_map_with_path(one, abstract_state)


def _dict_keys(path) -> tuple:
    return tuple(p.key for p in path if isinstance(p, jax.tree_util.DictKey))


# --------------------------------------------------------------------------- activations

_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("activation_sharding", default=None)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: Rules):
    """While tracing inside this context, `constrain` pins activations to the rules' layout."""
    token = _ACTIVE.set((mesh, rules))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active_mesh_and_rules() -> tuple[Mesh, Rules] | None:
    """The (mesh, rules) of the enclosing `activation_sharding`, if any."""
    return _ACTIVE.get()


def compile_platform() -> str:
    """The platform being traced for: the active mesh's devices (a TPU topology when compiling
    ahead of time on a CPU host), else the default backend."""
    active = _ACTIVE.get()
    return active[0].devices.flat[0].platform if active else jax.default_backend()


def constrain(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
    """Sharding constraint from logical axis names; a no-op outside `activation_sharding`."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(logical, x.shape, rules, mesh)))
