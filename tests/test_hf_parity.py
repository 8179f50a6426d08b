"""Logit parity with transformers' LlamaForCausalLM, both directions, on random tiny configs.

(a) HF random model -> save_pretrained -> import_hf -> our forward   vs  HF logits
(b) our init_params -> export_hf -> AutoModelForCausalLM.from_pretrained -> HF logits  vs  ours

All in float32; the random weights are scaled so logits are O(1) (checked), which makes the
1e-4 bound a real test of every transpose, reshape, norm and RoPE frequency.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, LlamaForCausalLM, MistralConfig, MistralForCausalLM

from hf_reference import capture_transformers_warnings, hf_llama_config, hf_logits, make_hf_llama, save_hf
from xinst_jax.config import ConfigError, ModelConfig, RopeScalingConfig
from xinst_jax.convert.hf import export_hf, import_hf
from xinst_jax.model.llama import default_positions_and_segments, forward, init_params
from xinst_jax.model.rope import inverse_frequencies

TOL = 1e-4

LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                   high_freq_factor=4.0, original_max_position_embeddings=64)

# HF config values (over hf_reference.TINY_DEFAULTS). Together they cover GQA, MQA and MHA,
# tied and untied embeddings, Llama-3 rope scaling, non-default rope_theta, head_dim != hidden/heads.
HF_CASES = {
    "gqa_untied_llama3rope_headdim24": dict(
        num_attention_heads=4, num_key_value_heads=2, head_dim=24, tie_word_embeddings=False,
        rope_parameters=dict(LLAMA3_ROPE)),
    "mha_tied_default_rope": dict(
        num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True,
        rope_parameters=dict(rope_type="default", rope_theta=10000.0)),
    "mqa_tied_theta1e6_headdim32": dict(
        num_attention_heads=4, num_key_value_heads=1, head_dim=32, tie_word_embeddings=True,
        rms_norm_eps=1e-6, num_hidden_layers=3, rope_parameters=dict(rope_type="default", rope_theta=1e6)),
    "mha_untied_llama3rope_theta5e5": dict(
        num_attention_heads=8, num_key_value_heads=8, head_dim=8, tie_word_embeddings=False,
        rope_parameters=dict(LLAMA3_ROPE, factor=32.0, original_max_position_embeddings=32)),
}

# Our ModelConfig values for direction (b): the same coverage from our side.
OUR_CASES = {
    "gqa_untied_llama3rope_headdim24": dict(
        num_heads=4, num_kv_heads=2, head_dim=24, tie_embeddings=False, rope_theta=500000.0,
        rope_scaling=RopeScalingConfig(type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                       original_max_position_embeddings=64)),
    "mha_tied_default_rope": dict(num_heads=4, num_kv_heads=4, head_dim=16, tie_embeddings=True),
    "mqa_tied_theta1e6_headdim32": dict(
        num_heads=4, num_kv_heads=1, head_dim=32, tie_embeddings=True, rope_theta=1e6, norm_eps=1e-6,
        num_layers=3),
    "mha_untied_llama3rope_theta5e5": dict(
        num_heads=8, num_kv_heads=8, head_dim=8, tie_embeddings=False, rope_theta=500000.0,
        rope_scaling=RopeScalingConfig(type="llama3", factor=32.0, original_max_position_embeddings=32)),
}

BATCH, SEQ = 2, 48


def our_cfg(**values) -> ModelConfig:
    base = dict(vocab_size=128, embed_dim=64, num_layers=2, mlp_dim=96, max_seq_len=256, init_std=0.125)
    return ModelConfig(**{**base, **values})


def random_params(cfg: ModelConfig, seed: int) -> dict:
    """init_params, with norm scales perturbed off 1 so a swapped/missing norm cannot hide."""
    params = init_params(cfg, jax.random.PRNGKey(seed))
    keys = iter(jax.random.split(jax.random.PRNGKey(seed + 1000), 3))
    for path in (("layers", "attn_norm"), ("layers", "mlp_norm"), ("final_norm",)):
        node = params
        for k in path:
            node = node[k]
        node["scale"] = node["scale"] + 0.1 * jax.random.normal(next(keys), node["scale"].shape)
    return params


def our_logits(params, cfg: ModelConfig, tokens: np.ndarray) -> np.ndarray:
    tokens = jnp.asarray(tokens, jnp.int32)
    positions, segments = default_positions_and_segments(tokens)
    fn = jax.jit(lambda p, t, pos, seg: forward(p, t, pos, seg, cfg))
    return np.asarray(fn(params, tokens, positions, segments))


def random_tokens(vocab: int, seed: int, batch: int = BATCH, seq: int = SEQ) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=(batch, seq), dtype=np.int64)


def max_diff(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))


def load_hf_checked(directory, **kwargs):
    """from_pretrained, asserting no missing/unexpected/mismatched keys and no transformers warnings."""
    with capture_transformers_warnings() as logs:
        model, info = AutoModelForCausalLM.from_pretrained(directory, output_loading_info=True, **kwargs)
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        assert not info[key], f"{key}: {info[key]}"
    assert not logs.messages, f"transformers warned while loading our export: {logs.messages}"
    assert isinstance(model, LlamaForCausalLM)
    return model.eval()


def test_cases_cover_the_matrix():
    hf = [hf_llama_config(v) for v in HF_CASES.values()]
    assert any(c.num_key_value_heads < c.num_attention_heads for c in hf)
    assert any(c.num_key_value_heads == c.num_attention_heads for c in hf)
    assert {c.tie_word_embeddings for c in hf} == {True, False}
    assert any(c.head_dim != c.hidden_size // c.num_attention_heads for c in hf)
    assert any(c.rope_parameters["rope_type"] == "llama3" for c in hf)
    assert any(c.rope_parameters["rope_theta"] != 10000.0 for c in hf)
    ours = [our_cfg(**v) for v in OUR_CASES.values()]
    assert any(c.num_kv_heads < c.num_heads for c in ours) and any(c.num_kv_heads == c.num_heads for c in ours)
    assert {c.tie_embeddings for c in ours} == {True, False}
    assert any(c.head_dim != c.embed_dim // c.num_heads for c in ours)
    # The llama3 cases must actually rescale some (not all) frequencies, or they test nothing.
    for cfg in ours:
        if cfg.rope_scaling.type == "llama3":
            plain = inverse_frequencies(dataclasses.replace(cfg, rope_scaling=RopeScalingConfig()))
            scaled = inverse_frequencies(cfg)
            changed = ~np.isclose(plain, scaled, rtol=1e-6)
            assert changed.any() and not changed.all()


@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_hf_to_ours(case, tmp_path):
    hf_model = make_hf_llama(HF_CASES[case], seed=len(case))
    save_hf(hf_model, tmp_path / "hf")
    cfg, params = import_hf(tmp_path / "hf")
    assert cfg.tie_embeddings == hf_model.config.tie_word_embeddings
    assert ("lm_head" in params) == (not cfg.tie_embeddings)
    assert cfg.head_dim == hf_model.config.head_dim and cfg.num_kv_heads == hf_model.config.num_key_value_heads
    tokens = random_tokens(cfg.vocab_size, seed=1)
    ref = hf_logits(hf_model, tokens)
    assert np.abs(ref).max() > 1.0, "reference logits too small for the tolerance to mean anything"
    for scan in (True, False):
        got = our_logits(params, dataclasses.replace(cfg, scan_layers=scan), tokens)
        diff = max_diff(got, ref)
        print(f"[parity] hf->ours {case} scan={scan}: max|d|={diff:.2e} (max|logit|={np.abs(ref).max():.2f})")
        assert diff <= TOL, f"{case} scan={scan}: max |d| {diff:.3e} > {TOL}"


@pytest.mark.parametrize("case", sorted(OUR_CASES))
def test_ours_to_hf(case, tmp_path):
    cfg = our_cfg(**OUR_CASES[case])
    params = random_params(cfg, seed=len(case))
    out = export_hf(params, cfg, tmp_path / "export", dtype="float32")
    written = json.loads((out / "config.json").read_text())
    assert written["tie_word_embeddings"] == cfg.tie_embeddings
    hf_model = load_hf_checked(out, dtype=torch.float32)
    assert hf_model.config.tie_word_embeddings == cfg.tie_embeddings
    if cfg.tie_embeddings:
        assert hf_model.lm_head.weight.data_ptr() == hf_model.model.embed_tokens.weight.data_ptr()
    assert next(hf_model.parameters()).dtype == torch.float32
    tokens = random_tokens(cfg.vocab_size, seed=2)
    ref = hf_logits(hf_model, tokens)
    got = our_logits(params, cfg, tokens)
    assert np.abs(ref).max() > 1.0, "reference logits too small for the tolerance to mean anything"
    diff = max_diff(got, ref)
    print(f"[parity] ours->hf {case}: max|d|={diff:.2e} (max|logit|={np.abs(ref).max():.2f})")
    assert diff <= TOL, f"{case}: max |d| {diff:.3e} > {TOL}"

    # And back: import of our own export is bit-exact.
    cfg2, params2 = import_hf(out)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert jax.tree.structure(params) == jax.tree.structure(params2)
    assert (cfg2.rope_theta, cfg2.rope_scaling, cfg2.norm_eps) == (cfg.rope_theta, cfg.rope_scaling, cfg.norm_eps)


def test_bf16_export(tmp_path):
    cfg = our_cfg(**OUR_CASES["gqa_untied_llama3rope_headdim24"])
    params = random_params(cfg, seed=7)
    out = export_hf(params, cfg, tmp_path / "bf16", dtype="bfloat16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(out / "model.safetensors", framework="pt") as f:
        names = list(f.keys())
        assert names and all(f.get_tensor(n).dtype == torch.bfloat16 for n in names)
    # dtype="auto" keeps the checkpoint's dtype.
    hf_bf16 = load_hf_checked(out, dtype="auto")
    assert {p.dtype for p in hf_bf16.parameters()} == {torch.bfloat16}
    # Upcast in HF == our params rounded to bf16 and run in fp32: the rounding is the same.
    hf_fp32 = load_hf_checked(out, dtype=torch.float32)
    rounded = jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), params)
    tokens = random_tokens(cfg.vocab_size, seed=3)
    diff = max_diff(our_logits(rounded, cfg, tokens), hf_logits(hf_fp32, tokens))
    print(f"[parity] bf16 export (fp32 compute): max|d|={diff:.2e}")
    assert diff <= TOL
    # import_hf reads the bf16 file back to exactly the rounded values.
    _, back = import_hf(out)
    for a, b in zip(jax.tree.leaves(rounded), jax.tree.leaves(back)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_sharded_export(tmp_path):
    cfg = our_cfg(**OUR_CASES["gqa_untied_llama3rope_headdim24"])
    params = random_params(cfg, seed=11)
    total = sum(int(np.prod(x.shape)) * 4 for x in jax.tree.leaves(params))
    single = export_hf(params, cfg, tmp_path / "single", dtype="float32")
    sharded = export_hf(params, cfg, tmp_path / "sharded", dtype="float32", max_shard_bytes=total // 4)
    files = sorted(p.name for p in sharded.glob("model*.safetensors"))
    assert len(files) >= 3, files
    assert not (sharded / "model.safetensors").exists()
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == files
    assert index["metadata"]["total_size"] == total
    with safe_open(single / "model.safetensors", framework="pt") as f:
        assert set(index["weight_map"]) == set(f.keys())
    tokens = random_tokens(cfg.vocab_size, seed=4)
    ref = hf_logits(load_hf_checked(single, dtype=torch.float32), tokens)
    got = hf_logits(load_hf_checked(sharded, dtype=torch.float32), tokens)
    np.testing.assert_array_equal(got, ref)
    assert max_diff(our_logits(params, cfg, tokens), got) <= TOL
    _, back = import_hf(sharded)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(back)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _mistral_dir(tmp_path):
    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2, sliding_window=16)
    MistralForCausalLM(cfg).save_pretrained(tmp_path)
    return tmp_path


def _llama_dir(tmp_path, **values):
    save_hf(make_hf_llama(values, seed=0), tmp_path)
    return tmp_path


@pytest.mark.parametrize("maker, pattern", [
    (_mistral_dir, "model_type 'mistral'"),
    (lambda p: _llama_dir(p, attention_bias=True), "attention_bias"),
    (lambda p: _llama_dir(p, mlp_bias=True), "mlp_bias"),
    (lambda p: _llama_dir(p, hidden_act="gelu"), "hidden_act"),
    (lambda p: _llama_dir(p, rope_parameters=dict(rope_type="linear", factor=2.0, rope_theta=10000.0)), "rope"),
], ids=["mistral", "attention_bias", "mlp_bias", "gelu", "linear_rope"])
def test_import_refuses_unsupported(tmp_path, maker, pattern):
    directory = maker(tmp_path / "model")
    with pytest.raises(ConfigError) as err:
        import_hf(directory)
    message = str(err.value)
    assert str(directory / "config.json") in message, message
    assert pattern in message, message
