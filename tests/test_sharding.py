"""Mesh resolution, sharding-rule parsing, and sharded training on 8 fake CPU devices.

Training on any (data, fsdp, tensor) mesh must give the 1-device losses; under fsdp each device
must hold 1/8 of the params; every large param (and its Adam moments) must be sharded exactly as
the default rules say. One module-scoped fixture trains each mesh once (4 steps) and the tests
read its results, so the file compiles five train steps in all.
"""

from __future__ import annotations

import re
from collections import defaultdict

import jax
import numpy as np
import optax
import pytest

from xinst_jax.config import ConfigError, MeshConfig, load_config
from xinst_jax.sharding import make_mesh, mesh_shape, parse_rules
from xinst_jax.train.loop import run_training

# Every matrix has >= 64K elements (L=2, E=256, H=KV=8, D=16, M=256, V=512) and every sharded
# dimension divides by 8, so no rule falls back to replication.
MODEL = ["model.vocab_size=512", "model.embed_dim=256", "model.num_heads=8", "model.num_kv_heads=8",
         "model.head_dim=16", "model.mlp_dim=256", "model.num_layers=2", "model.tie_embeddings=false"]
LARGE = 64 * 1024
STEPS = 4
MESHES = [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 4, 2)]
REL_TOL = 1e-5


def cfg_for(run_dir, mesh, num_devices=0, *extra):
    data, fsdp, tensor = mesh
    return load_config("tiny_synthetic", overrides=[
        f"run_dir={run_dir}", *MODEL, f"train.steps={STEPS}", "train.batch_size=8", "train.seq_len=32",
        "train.warmup_steps=0", "train.learning_rate=3e-3", "train.export_at_end=false", "train.log_every=1000",
        "checkpoint.every=100000", "checkpoint.resume=false", "data.source=synthetic",
        f"mesh.data={data}", f"mesh.fsdp={fsdp}", f"mesh.tensor={tensor}", f"mesh.num_devices={num_devices}",
        *extra])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """mesh -> TrainResult; (1, 1, 1) is the 1-device reference (mesh.num_devices=1)."""
    out = {}
    for mesh in [(1, 1, 1), *MESHES]:
        run_dir = tmp_path_factory.mktemp("mesh_" + "x".join(map(str, mesh)))
        out[mesh] = run_training(cfg_for(run_dir, mesh, 1 if mesh == (1, 1, 1) else 0))
    return out


# --------------------------------------------------------------------------- mesh shape


@pytest.mark.parametrize("mesh_kwargs, devices, expected", [
    (dict(data=1, fsdp=-1, tensor=1), 8, (1, 8, 1)),
    (dict(data=2, fsdp=-1, tensor=2), 8, (2, 2, 2)),
    (dict(data=-1, fsdp=2, tensor=1), 8, (4, 2, 1)),
    (dict(data=2, fsdp=2, tensor=-1), 8, (2, 2, 2)),
    (dict(data=1, fsdp=-1, tensor=1), 1, (1, 1, 1)),
    (dict(data=2, fsdp=-1, tensor=1, dcn_data=2), 8, (4, 2, 1)),  # the data axis spans the slices
    (dict(data=2, fsdp=4, tensor=1), 8, (2, 4, 1)),
])
def test_mesh_shape_resolves_fill(mesh_kwargs, devices, expected):
    assert mesh_shape(MeshConfig(**mesh_kwargs), devices) == expected


def test_mesh_shape_product_mismatch_names_sizes_and_counts():
    with pytest.raises(ConfigError) as e:
        mesh_shape(MeshConfig(data=2, fsdp=2, tensor=1), 8)
    msg = str(e.value)
    assert "data=2" in msg and "fsdp=2" in msg and "tensor=1" in msg
    assert re.search(r"\b4\b", msg) and re.search(r"\b8\b", msg), msg  # needs 4, 8 available

    with pytest.raises(ConfigError) as e:
        mesh_shape(MeshConfig(data=4, fsdp=4, tensor=1), 8)
    assert re.search(r"\b16\b", str(e.value)) and re.search(r"\b8\b", str(e.value)), str(e.value)

    with pytest.raises(ConfigError) as e:  # the fixed axes do not divide the device count
        mesh_shape(MeshConfig(data=3, fsdp=-1, tensor=1), 8)
    assert re.search(r"\b3\b", str(e.value)) and re.search(r"\b8\b", str(e.value)), str(e.value)


@pytest.mark.parametrize("mesh_kwargs, pattern", [
    (dict(data=-1, fsdp=-1, tensor=1), r"only one axis may be -1"),
    (dict(data=0, fsdp=-1, tensor=1), r"positive"),
    (dict(data=1, fsdp=-2, tensor=1), r"positive"),
    (dict(data=1, fsdp=2, tensor=1, dcn_data=-1), r"dcn_data"),  # not a second fill
    (dict(data=1, fsdp=2, tensor=1, dcn_data=0), r"dcn_data"),
    (dict(data=-1, fsdp=2, tensor=1, dcn_data=3), r"dcn_data=3"),  # 4 data rows over 3 slices
])
def test_mesh_shape_invalid(mesh_kwargs, pattern):
    with pytest.raises(ConfigError, match=pattern):
        mesh_shape(MeshConfig(**mesh_kwargs), 8)


def test_num_devices_selects_first_devices():
    mesh = make_mesh(MeshConfig(data=1, fsdp=-1, tensor=1, num_devices=4))
    assert dict(mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 1}
    assert list(mesh.devices.flat) == jax.devices()[:4]
    with pytest.raises(ConfigError, match=r"needs 8 devices but 4 are available"):
        make_mesh(MeshConfig(data=8, fsdp=1, tensor=1, num_devices=4))
    with pytest.raises(ConfigError, match=r"mesh\.num_devices"):
        make_mesh(MeshConfig(num_devices=-1))


def test_more_devices_than_exist_fails_before_compiling(tmp_path, monkeypatch):
    assert jax.device_count() == 8

    def no_compiling(*args, **kwargs):
        raise AssertionError("jax.jit called before the mesh was validated")

    monkeypatch.setattr(jax, "jit", no_compiling)
    run_dir = tmp_path / "run"
    with pytest.raises(ConfigError) as e:
        run_training(cfg_for(run_dir, (1, -1, 1), 16))
    msg = str(e.value)
    assert "mesh.num_devices=16" in msg and re.search(r"\b8\b", msg), msg
    assert not run_dir.exists()  # nothing written either


# --------------------------------------------------------------------------- rules


def test_parse_rules_valid():
    rules = parse_rules([["batch", ["data", "fsdp"]], ["vocab", "tensor"], ["norm", None], ["x", []]])
    assert rules == [("batch", ("data", "fsdp")), ("vocab", ("tensor",)), ("norm", ()), ("x", ())]


@pytest.mark.parametrize("raw, pattern", [
    ([["embed", "fsdp", "extra"]], r"mesh\.rules\[0\]: expected \[logical_name"),
    ([["embed", "fsdp"], "embed"], r"mesh\.rules\[1\]: expected"),
    ([[3, "fsdp"]], r"mesh\.rules\[0\]: expected"),
    ([["embed", 5]], r"mesh\.rules\[0\]: expected"),
    ([["embed", "model"]], r"mesh\.rules\[0\]: unknown mesh axis 'model' \(mesh axes: data, fsdp, tensor\)"),
    ([["batch", ["data", "fdsp"]]], r"unknown mesh axis 'fdsp'"),
    ([["batch", ["data", "data"]]], r"mesh\.rules\[0\]: mesh axis repeated"),
])
def test_parse_rules_errors(raw, pattern):
    with pytest.raises(ConfigError, match=pattern):
        parse_rules(raw)


def test_bad_rules_from_config_fail_in_run_training(tmp_path):
    cfg = cfg_for(tmp_path / "run", (1, -1, 1), 0, "mesh.rules=[[embed, fsdp], [mlp, tensr]]")
    with pytest.raises(ConfigError, match=r"mesh\.rules\[1\]: unknown mesh axis 'tensr'"):
        run_training(cfg)


# --------------------------------------------------------------------------- sharded training


@pytest.mark.parametrize("mesh", MESHES, ids=lambda m: "x".join(map(str, m)))
def test_mesh_matches_single_device_loss(runs, mesh):
    ref = [h["loss"] for h in runs[(1, 1, 1)].history]
    got = [h["loss"] for h in runs[mesh].history]
    assert len(ref) == len(got) == STEPS
    assert ref[-1] < ref[0] - 1e-3  # the params moved: the last loss is after 3 updates
    rels = [abs(g - r) / abs(r) for g, r in zip(got, ref)]
    print(f"\nmesh {mesh}: losses {got}\n1 device      {ref}\nmax rel diff {max(rels):.2e}")
    assert max(rels) <= REL_TOL, (mesh, got, ref)
    assert dict(runs[mesh].state["params"]["lm_head"]["kernel"].sharding.mesh.shape) == dict(
        zip(("data", "fsdp", "tensor"), mesh))


def _param_items(params):
    return [(jax.tree_util.keystr(p, simple=True, separator="/"), x)
            for p, x in jax.tree_util.tree_flatten_with_path(params)[0]]


def test_fsdp_shards_param_bytes(runs):
    params = runs[(1, 8, 1)].state["params"]
    total = sum(x.nbytes for _, x in _param_items(params))
    per_device: dict = defaultdict(int)
    for _, x in _param_items(params):
        for shard in x.addressable_shards:
            per_device[shard.device] += shard.data.nbytes
    assert len(per_device) == 8
    ratio = max(per_device.values()) / (total / 8)
    print(f"\nfsdp=8: {total} param bytes, per device max {max(per_device.values())} "
          f"(ratio to total/8: {ratio:.4f})")
    assert ratio <= 1.1
    # Unsharded params on every device would be 8x; the reference run really is unsharded.
    ref = runs[(1, 1, 1)].state["params"]
    assert all(x.sharding.is_fully_replicated for _, x in _param_items(ref))


def _expected_specs(mesh) -> dict[str, tuple]:
    """The default rules applied by hand: vocab/heads/kv_heads/mlp -> tensor, embed -> fsdp,
    layers/head_dim/norm unsharded; a size-1 mesh axis is no sharding."""
    _, fsdp, tensor = mesh
    F = "fsdp" if fsdp > 1 else None
    T = "tensor" if tensor > 1 else None
    return {
        "embed/embedding": (T, F),
        "lm_head/kernel": (F, T),
        "layers/attn/wq": (None, F, T, None),
        "layers/attn/wk": (None, F, T, None),
        "layers/attn/wv": (None, F, T, None),
        "layers/attn/wo": (None, T, None, F),
        "layers/mlp/w_gate": (None, F, T),
        "layers/mlp/w_up": (None, F, T),
        "layers/mlp/w_down": (None, T, F),
        "layers/attn_norm/scale": (None, None),
        "layers/mlp_norm/scale": (None, None),
        "final_norm/scale": (None,),
    }


def _normalise(spec, ndim: int) -> tuple:
    out = []
    for entry in tuple(spec) + (None,) * (ndim - len(spec)):
        if isinstance(entry, (tuple, list)):
            entry = entry[0] if len(entry) == 1 else tuple(entry) if entry else None
        out.append(entry)
    return tuple(out)


def _adam_state(opt_state):
    found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
             if isinstance(s, optax.ScaleByAdamState)]
    assert len(found) == 1
    return found[0]


@pytest.mark.parametrize("mesh", [(1, 8, 1), (2, 2, 2), (1, 4, 2)], ids=lambda m: "x".join(map(str, m)))
def test_large_params_and_moments_sharded_as_rules_say(runs, mesh):
    state = runs[mesh].state
    expected = _expected_specs(mesh)
    items = _param_items(state["params"])
    assert sorted(name for name, _ in items) == sorted(expected)
    adam = _adam_state(state["opt_state"])
    moments = {"mu": dict(_param_items(adam.mu)), "nu": dict(_param_items(adam.nu))}
    large = 0
    for name, x in items:
        spec = _normalise(x.sharding.spec, x.ndim)
        assert spec == expected[name], (mesh, name, spec)
        if x.size >= LARGE:
            large += 1
            assert not x.sharding.is_fully_replicated, (mesh, name)
            # each device holds exactly its fraction of the array
            shards = {int(np.prod(s.data.shape)) for s in x.addressable_shards}
            split = int(np.prod([dict(zip(("data", "fsdp", "tensor"), mesh))[a]
                                 for a in spec if a is not None]))
            assert shards == {x.size // split}, (name, shards)
        for kind, tree in moments.items():
            m = tree[name]
            assert m.shape == x.shape and m.dtype == x.dtype
            assert m.sharding.mesh == x.sharding.mesh, (kind, name)
            assert _normalise(m.sharding.spec, m.ndim) == spec, (kind, name, m.sharding.spec)
            assert m.sharding.is_equivalent_to(x.sharding, x.ndim), (kind, name)
    assert large == 9  # every matrix qualifies
    assert adam.count.sharding.is_fully_replicated
