"""Job `export_hf`: write params as a Hugging Face Llama directory (`configs/export_hf.yaml`).

    python launch/tpu_run.py --config export_hf --set export.checkpoint=runs/demo/checkpoints/100

Where the params come from, first match wins:

1. `export.checkpoint`: a trainer checkpoint step directory, restored by
   `xinst_jax.checkpoint.load_params_for_export` with the run's `model` config.
2. `export.hf_source`: a Hugging Face Llama directory, re-exported (to another dtype, other shard
   sizes, with a tokenizer added). Its architecture comes from `model`, and import_hf refuses a
   checkpoint that disagrees, naming the field. One exception: when `model` is left entirely at the
   schema defaults (`model.preset` null and no architecture key set, e.g. `--set model.preset=null`
   on top of base.yaml's preset), the checkpoint's config.json supplies the architecture, and the
   run's own choices (dtype, param_dtype, scan_layers, remat, LoRA) are kept
   (`convert.hf.model_for_hf_dir`, as for generate and train.init_from). A set architecture is
   never silently replaced: a run config that says 7B must not export whatever the directory holds.
3. Otherwise: fresh random params from `seed` (`init_params(model, PRNGKey(seed))`), e.g. to get
   a loadable HF directory for a new architecture.

The output goes to `export.out` (a local directory or a `gs://` URL, written through
xinst_jax/paths.py), or `<run_dir>/hf`. Export streams tensor by tensor, so the host
holds at most one tensor beyond the params themselves (see convert/hf.py). Single process: on a
multi-host pod, export from a checkpoint on one host.
"""

from __future__ import annotations

import time
from pathlib import Path

from xinst_jax import paths
from xinst_jax.config import Config, ConfigError
from xinst_jax.jobs import register_job


def load_export_params(cfg: Config):
    """(model config, params, a short description of the source) for `cfg.export`."""
    from xinst_jax.convert.sources import load_params

    return load_params(cfg.model, checkpoint=cfg.export.checkpoint, hf_dir=cfg.export.hf_source, seed=cfg.seed,
                       keys=("export.checkpoint", "export.hf_source"))


def export_out_dir(cfg: Config) -> Path:
    """export.out (local or gs://, as paths.as_path gives it), or <run_dir>/hf."""
    return paths.as_path(cfg.export.out) if cfg.export.out else cfg.resolved_run_dir() / "hf"


@register_job("export_hf")
def export_hf_job(cfg: Config) -> None:
    from xinst_jax.convert.hf import export_hf, tensor_maps

    export = cfg.export
    if export.max_shard_bytes <= 0:
        raise ConfigError(f"export.max_shard_bytes: must be > 0, got {export.max_shard_bytes}")
    if export.tokenizer_dir:
        paths.check_dir("export.tokenizer_dir", export.tokenizer_dir)
    out = export_out_dir(cfg)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"export.out: {out} exists and is not a directory")

    start = time.perf_counter()
    model, params, source = load_export_params(cfg)
    loaded = time.perf_counter()
    export_hf(params, model, out, dtype=export.dtype, max_shard_bytes=export.max_shard_bytes,
              tokenizer_dir=export.tokenizer_dir or None)
    done = time.perf_counter()

    shards = sorted(out.glob("model*.safetensors"))
    nbytes = sum(paths.size(f) for f in shards)
    n_tensors = len(tensor_maps(model))
    print(f"export_hf: wrote {out}: {n_tensors} tensors in {len(shards)} shard(s), {nbytes / 1e6:.1f} MB "
          f"{export.dtype}, from {source}; load {loaded - start:.1f}s, write {done - loaded:.1f}s", flush=True)
