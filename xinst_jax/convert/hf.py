"""Hugging Face Llama <-> xinst_jax params, with no torch at run time.

Our q/k weights already use HF's rotate-half RoPE layout (model/rope.py), so every mapping is a
transpose and a reshape. Export streams tensor by tensor into safetensors shards: the host never
holds more than one tensor beyond the params themselves.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable

import jax
import numpy as np

from xinst_jax import paths
from xinst_jax.config import (ConfigError, ModelConfig, RopeScalingConfig, architecture_is_default,
                              check_same_architecture, with_architecture_of)
from xinst_jax.convert.safetensors_io import SafetensorsFile, iter_checkpoint_files, write_streaming
from xinst_jax.model.llama import DTYPES, Params, merge_lora, param_shapes

SUPPORTED_MODEL_TYPES = ("llama",)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json")
# X-Instruction's released sampling settings, written into generation_config.json.
GENERATION_DEFAULTS = dict(do_sample=True, temperature=0.7, top_p=0.9, top_k=50, no_repeat_ngram_size=6)


# --------------------------------------------------------------------------- config mapping


def config_from_hf(hf: dict, source: str = "config.json") -> ModelConfig:
    """Map a HF LlamaConfig dict to ours; refuse what the model cannot represent."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(f"{source}: model_type '{model_type}' is not supported (supported: llama)")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise ConfigError(f"{source}: {flag}=true is not supported by the xinst_jax Llama")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{source}: hidden_act '{hf['hidden_act']}' is not supported (only silu)")
    rope = dict(hf.get("rope_parameters") or {})
    legacy = hf.get("rope_scaling") or {}
    rope = {**legacy, **rope}
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "default":
        scaling = RopeScalingConfig()
    elif rope_type == "llama3":
        scaling = RopeScalingConfig(
            type="llama3", factor=float(rope["factor"]), low_freq_factor=float(rope["low_freq_factor"]),
            high_freq_factor=float(rope["high_freq_factor"]),
            original_max_position_embeddings=int(rope["original_max_position_embeddings"]))
    else:
        raise ConfigError(f"{source}: rope type '{rope_type}' is not supported (default, llama3)")
    heads = hf["num_attention_heads"]
    eos = hf.get("eos_token_id", 2)
    return ModelConfig(
        vocab_size=hf["vocab_size"], embed_dim=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
        num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads, mlp_dim=hf["intermediate_size"],
        rope_theta=float(theta), rope_scaling=scaling, norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_seq_len=hf.get("max_position_embeddings", 2048), bos_token_id=hf.get("bos_token_id") or 1,
        eos_token_id=eos[0] if isinstance(eos, list) else eos, pad_token_id=hf.get("pad_token_id"),
    )


def config_to_hf(cfg: ModelConfig, dtype: str) -> dict:
    rope: dict = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling.type == "llama3":
        s = cfg.rope_scaling
        rope.update(rope_type="llama3", factor=s.factor, low_freq_factor=s.low_freq_factor,
                    high_freq_factor=s.high_freq_factor,
                    original_max_position_embeddings=s.original_max_position_embeddings)
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.embed_dim, "intermediate_size": cfg.mlp_dim,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "rope_parameters": rope, "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
        "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id,
        "dtype": dtype, "use_cache": True,
    }


# --------------------------------------------------------------------------- weight mapping


@dataclasses.dataclass(frozen=True)
class TensorMap:
    """One HF tensor <-> one slice of one of our params."""

    hf_name: str
    path: tuple[str, ...]  # key path into our params tree
    layer: int | None  # index into the stacked `layers` axis, or None
    to_hf: Callable[[np.ndarray], np.ndarray]
    from_hf: Callable[[np.ndarray], np.ndarray]


def _linear(out_shape: tuple[int, ...]):
    """HF nn.Linear weight [out, in] <-> ours [in, *out_shape]."""
    def to_hf(x):
        return x.reshape(x.shape[0], -1).T

    def from_hf(w):
        return w.T.reshape(w.shape[1], *out_shape)

    return to_hf, from_hf


def _linear_in(in_shape: tuple[int, ...]):
    """HF o_proj weight [out, heads*head_dim] <-> ours [heads, head_dim, out]."""
    def to_hf(x):
        return x.reshape(-1, x.shape[-1]).T

    def from_hf(w):
        return w.T.reshape(*in_shape, w.shape[0])

    return to_hf, from_hf


def _same():
    return (lambda x: x), (lambda w: w)


def tensor_maps(cfg: ModelConfig) -> list[TensorMap]:
    H, KV, D, M, E = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim, cfg.embed_dim
    maps = [TensorMap("model.embed_tokens.weight", ("embed", "embedding"), None, *_same())]
    per_layer = [
        ("input_layernorm.weight", ("attn_norm", "scale"), _same()),
        ("self_attn.q_proj.weight", ("attn", "wq"), _linear((H, D))),
        ("self_attn.k_proj.weight", ("attn", "wk"), _linear((KV, D))),
        ("self_attn.v_proj.weight", ("attn", "wv"), _linear((KV, D))),
        ("self_attn.o_proj.weight", ("attn", "wo"), _linear_in((H, D))),
        ("post_attention_layernorm.weight", ("mlp_norm", "scale"), _same()),
        ("mlp.gate_proj.weight", ("mlp", "w_gate"), _linear((M,))),
        ("mlp.up_proj.weight", ("mlp", "w_up"), _linear((M,))),
        ("mlp.down_proj.weight", ("mlp", "w_down"), _linear((E,))),
    ]
    for i in range(cfg.num_layers):
        for suffix, sub, (to_hf, from_hf) in per_layer:
            maps.append(TensorMap(f"model.layers.{i}.{suffix}", ("layers",) + sub, i, to_hf, from_hf))
    maps.append(TensorMap("model.norm.weight", ("final_norm", "scale"), None, *_same()))
    if not cfg.tie_embeddings:
        maps.append(TensorMap("lm_head.weight", ("lm_head", "kernel"), None, *_linear((cfg.vocab_size,))))
    return maps


def _get(tree: dict, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


# --------------------------------------------------------------------------- import


def load_hf_config(directory: str | Path) -> ModelConfig:
    """config.json of a HF directory, local or gs:// (read in place: no copy for one small file)."""
    path = paths.as_path(paths.join(directory, "config.json"))
    if not path.exists():
        raise ConfigError(f"{directory}: no config.json (not a Hugging Face model directory)")
    return config_from_hf(json.loads(path.read_text()), source=str(path))


def model_for_hf_dir(model: ModelConfig, directory: str | Path) -> ModelConfig:
    """The model config to load the weights in `directory` with: the run's own, unless its
    architecture is left at the schema defaults (model.preset null, no architecture key set);
    then config.json's architecture with the run's other choices (dtype, scan, remat, LoRA).
    A set architecture is never replaced: import_hf then checks that it fits the weights."""
    if not architecture_is_default(model):
        return model
    return with_architecture_of(model, load_hf_config(directory))


def import_hf(directory: str | Path, cfg: ModelConfig | None = None,
              shardings: dict | None = None) -> tuple[ModelConfig, Params]:
    """Read a HF Llama directory into our params (param_dtype of `cfg`, placed by `shardings`).

    `cfg` defaults to the one mapped from config.json; when given, its architecture numbers must
    agree with the checkpoint (compute settings such as dtype, scan and remat are ours to pick).
    """
    hf_cfg = load_hf_config(directory)
    cfg = cfg or hf_cfg
    check_same_architecture(cfg, hf_cfg, f"{directory}/config.json")
    tensors: dict[str, SafetensorsFile] = {}
    for file in iter_checkpoint_files(paths.local_copy(directory)):  # memory maps need local files
        st = SafetensorsFile(file)
        for name in st.names():
            tensors[name] = st
    dtype = np.dtype(DTYPES[cfg.param_dtype])
    shapes = param_shapes(cfg)
    maps = tensor_maps(cfg)
    missing = [m.hf_name for m in maps if m.hf_name not in tensors]
    if missing:
        raise ConfigError(f"{directory}: checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
    expected = {m.hf_name for m in maps} | {"lm_head.weight"}
    unexpected = sorted(n for n in tensors if n not in expected and "rotary_emb" not in n)
    if unexpected:
        raise ConfigError(f"{directory}: unexpected tensors not in a Llama, e.g. {unexpected[:3]}")

    by_path: dict[tuple[str, ...], list[TensorMap]] = {}
    for m in maps:
        by_path.setdefault(m.path, []).append(m)
    params: dict = {}
    for path, group in by_path.items():
        shape = _get(shapes, path).shape
        host = np.empty(shape, dtype)  # one leaf at a time on the host
        for m in group:
            value = m.from_hf(np.asarray(tensors[m.hf_name].get(m.hf_name), np.float32)).astype(dtype)
            if m.layer is None:
                host[...] = value
            else:
                host[m.layer] = value
        sharding = _get(shardings, path) if shardings is not None else None
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = jax.device_put(host, sharding) if sharding is not None else jax.numpy.asarray(host)
        del host
    return cfg, params


# --------------------------------------------------------------------------- export


def plan_shards(entries: list[tuple[str, tuple[int, ...], np.dtype]], max_shard_bytes: int) -> list[list]:
    shards: list[list] = [[]]
    size = 0
    for entry in entries:
        nbytes = int(np.prod(entry[1], dtype=np.int64)) * np.dtype(entry[2]).itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    return shards


def _fetch(params: Params, m: TensorMap) -> np.ndarray:
    """One tensor to host memory: only the slice for its layer leaves the device. Arrays spread
    over several hosts are all-gathered, so every process must call this in the same order."""
    leaf = _get(params, m.path)
    value = leaf[m.layer] if m.layer is not None else leaf
    if isinstance(value, jax.Array) and not value.is_fully_addressable:
        from jax.experimental import multihost_utils

        return m.to_hf(np.asarray(multihost_utils.process_allgather(value, tiled=True)))
    return m.to_hf(np.asarray(jax.device_get(value)))


def export_hf(params: Params, cfg: ModelConfig, out_dir: str | Path, dtype: str = "bfloat16",
              max_shard_bytes: int = 5_000_000_000, tokenizer_dir: str | Path | None = None) -> Path:
    """Write `out_dir` loadable by transformers.AutoModelForCausalLM.from_pretrained. LoRA adapters
    (model.lora_rank > 0) are merged into their weights first: the export is a plain Llama."""
    if cfg.lora_rank > 0:
        params = jax.jit(lambda p: merge_lora(p, cfg))(params)
    out = paths.as_path(out_dir)  # a local directory or a gs:// URL: written through the path layer
    out.mkdir(parents=True, exist_ok=True)
    np_dtype = np.dtype(DTYPES[dtype])
    maps = {m.hf_name: m for m in tensor_maps(cfg)}
    entries = []
    for name, m in maps.items():
        shape = _get(params, m.path).shape
        shape = shape[1:] if m.layer is not None else shape
        hf_shape = m.to_hf(np.empty(shape, np.bool_)).shape  # shape only: a zero-cost dry run
        entries.append((name, tuple(hf_shape), np_dtype))
    shards = plan_shards(entries, max_shard_bytes)
    if jax.process_index() != 0:  # take part in the gathers; process 0 writes
        for name, _, _ in entries:
            _fetch(params, maps[name])
        return out
    # config.json goes first and comes back last: an export cut short is never loadable (the
    # trainer re-exports when a rerun finds the run finished).
    for old in [out / "config.json", *out.glob("model*.safetensors*")]:
        old.unlink(missing_ok=True)
    weight_map = {}
    total = 0
    for i, shard in enumerate(shards):
        fname = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        total += write_streaming(out / fname, shard, lambda name: _fetch(params, maps[name]))
        weight_map.update({name: fname for name, _, _ in shard})
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    generation = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, **GENERATION_DEFAULTS}
    if cfg.pad_token_id is not None:
        generation["pad_token_id"] = cfg.pad_token_id
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))
    if tokenizer_dir:
        for name in TOKENIZER_FILES:
            src = paths.join(tokenizer_dir, name)
            if paths.exists(src) and paths.absolute(src) != paths.absolute(out / name):
                paths.copy_file(src, out / name)
    (out / "config.json").write_text(json.dumps(config_to_hf(cfg, dtype), indent=2))
    return out
