"""One config schema: dataclasses, YAML files with `base:` inheritance, `--set a.b=c` overrides.

Every error a user can cause here is a `ConfigError` whose message is one line naming the key
and the file (or `--set`) it came from; the entry point turns it into exit code 2.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A user-facing configuration problem (exit code 2)."""


# --------------------------------------------------------------------------- schema


@dataclass
class RopeScalingConfig:
    """Llama-3 style frequency scaling; `type: none` keeps plain RoPE."""

    type: Literal["none", "llama3"] = "none"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass
class ModelConfig:
    preset: Optional[str] = None  # values of a named preset (model/presets.py) sit under explicit keys
    vocab_size: int = 256
    embed_dim: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    mlp_dim: int = 128
    rope_theta: float = 10000.0
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    max_seq_len: int = 2048
    dtype: Literal["float32", "bfloat16"] = "float32"  # compute dtype
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    scan_layers: bool = True
    remat: Literal["none", "dots_saveable", "full"] = "none"
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: Optional[int] = None
    init_std: float = 0.02


@dataclass
class ExportConfig:
    checkpoint: str = ""  # a trainer checkpoint step dir; empty: export the job's own params
    hf_source: str = ""  # import these HF weights when there is no checkpoint
    out: str = ""  # empty: <run_dir>/hf
    dtype: Literal["float32", "bfloat16"] = "bfloat16"
    max_shard_bytes: int = 5_000_000_000
    tokenizer_dir: str = ""  # tokenizer files copied into the export when set


@dataclass
class Config:
    job: str = "demo"
    name: str = ""  # the config's name; filled from the file name
    run_dir: str = ""  # empty: runs/<name>
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    def resolved_run_dir(self) -> Path:
        return Path(self.run_dir or os.path.join("runs", self.name or "default"))


# --------------------------------------------------------------------------- loading


def _merge(dst: dict, src: dict, origin: dict, source: str, prefix: str = "") -> None:
    """Deep-merge `src` into `dst`, recording for each dotted key which file set it."""
    for key, value in src.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(dst.get(key), dict):
            _merge(dst[key], value, origin, source, dotted + ".")
        else:
            dst[key] = value
            origin[dotted] = source
            if isinstance(value, dict):
                for sub in _dotted_keys(value, dotted + "."):
                    origin[sub] = source


def _dotted_keys(d: dict, prefix: str) -> list[str]:
    out = []
    for k, v in d.items():
        out.append(prefix + str(k))
        if isinstance(v, dict):
            out.extend(_dotted_keys(v, prefix + str(k) + "."))
    return out


def resolve_config_path(name: str) -> Path:
    """`demo` -> configs/demo.yaml; an existing path is taken as it is."""
    candidate = Path(name)
    if candidate.suffix in (".yaml", ".yml") and candidate.exists():
        return candidate
    path = CONFIG_DIR / f"{name}.yaml"
    if not path.exists():
        known = ", ".join(available_configs())
        raise ConfigError(f"unknown config '{name}': no file {path.name} in configs/ (known: {known})")
    return path


def available_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def _read_yaml(path: Path, origin: dict, chain: tuple[Path, ...] = ()) -> dict:
    """Read a YAML config and, first, the files named by its `base:` key (path relative to it)."""
    if path in chain:
        raise ConfigError(f"{path.name}: `base:` forms a cycle through {' -> '.join(p.name for p in chain)}")
    if not path.exists():
        where = f" (named by `base:` in {chain[-1].name})" if chain else ""
        raise ConfigError(f"config file not found: {path}{where}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{path.name}{line}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path.name}: top level must be a mapping, got {type(data).__name__}")
    bases = data.pop("base", None) or []
    merged: dict = {}
    for base in [bases] if isinstance(bases, str) else bases:
        _merge(merged, _read_yaml(path.parent / base, origin, chain + (path,)), origin, "")
    _merge(merged, data, origin, path.name)
    return merged


def parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set model.num_layers=4")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _nest(key: str, value: Any) -> dict:
    out: dict = {}
    node = out
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def load_config(name: str, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    path = resolve_config_path(name)
    origin: dict[str, str] = {}
    raw = _read_yaml(path, origin)
    for item in overrides:
        key, value = parse_override(item)
        _merge(raw, _nest(key, value), origin, "--set")
    raw.setdefault("name", path.stem)
    _apply_model_preset(raw, origin)
    return from_dict(Config, raw, origin)


def _apply_model_preset(raw: dict, origin: dict) -> None:
    model = raw.get("model")
    if not isinstance(model, dict) or not model.get("preset"):
        return
    from xinst_jax.model.presets import PRESETS

    name = model["preset"]
    if name not in PRESETS:
        src = origin.get("model.preset", "?")
        raise ConfigError(f"{src}: model.preset: unknown preset '{name}' (known: {', '.join(sorted(PRESETS))})")
    merged: dict = {}
    _merge(merged, PRESETS[name], {}, "")
    _merge(merged, model, {}, "")
    raw["model"] = merged


# --------------------------------------------------------------------------- validation


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(tp: Any, value: Any, key: str, source: str, origin: dict) -> Any:
    bad = ConfigError(f"{source}: {key}: expected {_type_name(tp)}, got {value!r}")
    torigin = typing.get_origin(tp)
    if torigin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key, source, origin)
            except ConfigError:
                pass
        raise bad
    if torigin is Literal:
        if value not in typing.get_args(tp):
            raise bad
        return value
    if torigin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise bad
        args = typing.get_args(tp)
        item_tp = args[0] if args else Any
        items = [_coerce(item_tp, v, f"{key}[{i}]", source, origin) for i, v in enumerate(value)]
        return items if torigin is list else tuple(items)
    if torigin is dict:
        if not isinstance(value, dict):
            raise bad
        _, val_tp = typing.get_args(tp) or (str, Any)
        return {str(k): _coerce(val_tp, v, f"{key}.{k}", source, origin) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise bad
        return from_dict(tp, value, origin, key + ".")
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise bad
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if tp is str:
        if value is None or isinstance(value, (dict, list)):
            raise bad
        return str(value)
    raise bad


def from_dict(cls: type, data: dict, origin: dict | None = None, prefix: str = "") -> Any:
    """Validate a nested dict into dataclass `cls`; unknown keys and wrong types raise ConfigError."""
    origin = origin or {}
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        source = origin.get(dotted, "config")
        if key not in names:
            raise ConfigError(f"{source}: unknown key '{dotted}' (valid keys here: {', '.join(sorted(names))})")
        kwargs[key] = _coerce(hints[key], value, dotted, source, origin)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)


def save_resolved(cfg: Config, run_dir: Path | None = None) -> Path:
    """Write the resolved config into the run directory (every run does this)."""
    run_dir = Path(run_dir or cfg.resolved_run_dir())
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.yaml"
    path.write_text(dump_yaml(cfg))
    return path
