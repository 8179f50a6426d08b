"""Where a job's params come from: a trainer checkpoint, else a Hugging Face Llama directory,
else a fresh random init (export_hf and generate share this)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from xinst_jax.config import ConfigError, ModelConfig
from xinst_jax.paths import is_remote, local_copy


def existing_dir(key: str, value: str) -> Path:
    """A local directory that exists, or a local copy of a gs:// one (xinst_jax.paths.local_copy)."""
    if is_remote(value):
        return Path(local_copy(value, key))
    path = Path(value)
    if not path.is_dir():
        raise ConfigError(f"{key}: directory {value} {'is not a directory' if path.exists() else 'not found'}")
    return path


def load_params(model: ModelConfig, *, checkpoint: str, hf_dir: str, seed: int,
                keys: tuple[str, str]) -> tuple[ModelConfig, Any, str]:
    """(model config, params, where they came from). `keys` name the checkpoint and HF settings in
    errors. A checkpoint restores with `model`'s architecture (checked against the saved config);
    a HF directory supplies the architecture when `model` leaves it at the defaults."""
    checkpoint_key, hf_key = keys
    if checkpoint:
        from xinst_jax.checkpoint import load_params_for_export

        if "://" not in checkpoint:  # gs:// is checked by the checkpoint layer
            existing_dir(checkpoint_key, checkpoint)
        return model, load_params_for_export(checkpoint, model), f"checkpoint {checkpoint}"
    if hf_dir:
        from xinst_jax.convert.hf import import_hf, model_for_hf_dir

        path = existing_dir(hf_key, hf_dir)
        if not (path / "config.json").is_file():
            raise ConfigError(f"{hf_key}: {path} is not a Hugging Face model directory (no config.json)")
        try:
            model, params = import_hf(path, model_for_hf_dir(model, path))
        except ConfigError as e:
            raise ConfigError(f"{hf_key}: {e} (set model.preset or model.* to the checkpoint's architecture, or "
                              "model.preset=null to take it from config.json)") from None
        return model, params, f"hf {hf_dir if is_remote(hf_dir) else path}"  # a URL, not its cache path
    import jax

    from xinst_jax.model.llama import init_params

    params = jax.jit(lambda k: init_params(model, k))(jax.random.PRNGKey(seed))
    return model, jax.block_until_ready(params), f"random init (seed {seed})"
