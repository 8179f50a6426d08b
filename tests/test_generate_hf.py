"""The inference engine against transformers (torch, CPU, float32).

- Sampling filters: no-repeat-ngram, temperature, top-k, top-p against HF's logits processors on
  random logits (same surviving tokens, same processed scores).
- Greedy decoding: token for token against `generate(do_sample=False)`, for a random tiny GQA
  Llama (fast) and for SmolLM2-135M-Instruct's real weights on 8 prompts in 8 languages (slow).
  Where the two ever diverge, the reference's top-2 logit gap at that step must be a near-tie
  (< 1e-3); any other divergence fails.
- Scoring: per-token log-probabilities of continuations against HF's log_softmax, within 1e-3.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import GenerationConfig
from transformers.generation.logits_process import (LogitsProcessorList, NoRepeatNGramLogitsProcessor,
                                                    TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

import jax.numpy as jnp
from hf_reference import load_smollm2, make_hf_llama, save_hf
from xinst_jax.convert.hf import import_hf
from xinst_jax.infer.generate import Engine
from xinst_jax.infer.sampling import SamplingSettings, candidate_scores, ngram_banned_mask, process_logits_full

NEAR_TIE = 1e-3
SCORE_TOL = 1e-4  # per-token log-prob against transformers
NEW_TOKENS = 32

PROMPTS = {
    "english": "The quick brown fox jumps over the lazy dog. Translate this sentence into French:",
    "thai": "กรุงเทพมหานครเป็นเมืองหลวงของประเทศไทย และมีประชากรมากที่สุดในประเทศ",
    "swahili": "Habari ya asubuhi! Ningependa kujifunza jinsi ya kupika wali na maharagwe.",
    "urdu": "پاکستان کا دارالحکومت اسلام آباد ہے اور یہ ایک خوبصورت شہر ہے۔",
    "hindi": "भारत की राजधानी नई दिल्ली है और यह एक विशाल शहर है।",
    "tamil": "தமிழ் உலகின் மிகப் பழமையான மொழிகளில் ஒன்றாகும்.",
    "chinese": "长城是中国古代的军事防御工程，",
    "spanish": "Había una vez un pequeño pueblo en las montañas donde",
}
# Scored after the prompts: plausible but not the model's own greedy text.
CONTINUATIONS = {
    "english": " Le renard brun rapide saute par-dessus le chien paresseux.",
    "thai": " ประชากรประมาณสิบล้านคน",
    "swahili": " Kwanza, osha mchele vizuri.",
    "urdu": " یہاں بہت سے پارک ہیں۔",
    "hindi": " यहाँ बहुत सारे लोग रहते हैं।",
    "tamil": " இது இந்தியாவில் பேசப்படுகிறது.",
    "chinese": "全长两万多公里。",
    "spanish": " vivía una familia de pastores.",
}


# --------------------------------------------------------------------------- logits processors


def hf_chain(settings: SamplingSettings) -> LogitsProcessorList:
    """What transformers' generate builds for these settings (do_sample=True, one beam)."""
    procs = LogitsProcessorList()
    if settings.no_repeat_ngram > 0:
        procs.append(NoRepeatNGramLogitsProcessor(settings.no_repeat_ngram))
    if settings.temperature != 1.0:
        procs.append(TemperatureLogitsWarper(settings.temperature))
    if settings.top_k > 0:
        procs.append(TopKLogitsWarper(top_k=settings.top_k))
    if settings.top_p < 1.0:
        procs.append(TopPLogitsWarper(top_p=settings.top_p))
    return procs


@pytest.mark.parametrize("settings", [
    SamplingSettings(),  # X-Instruction's released defaults: T 0.7, top-p 0.9, top-k 50, no-repeat 6
    SamplingSettings(temperature=1.0, top_k=5, top_p=1.0, no_repeat_ngram=2),
    SamplingSettings(temperature=0.5, top_k=0, top_p=0.6, no_repeat_ngram=3),
    SamplingSettings(temperature=1.7, top_k=200, top_p=0.95, no_repeat_ngram=1),
    SamplingSettings(temperature=0.9, top_k=3, top_p=0.3, no_repeat_ngram=0),
], ids=["defaults", "k5_ngram2", "p0.6_ngram3", "hot_k200", "k3_p0.3"])
def test_filters_match_hf_logits_processors(settings):
    rng = np.random.default_rng(hash(settings) % 2**32)
    b, t, v = 6, 40, 300
    for trial in range(5):
        scale = [0.5, 2.0, 5.0][trial % 3]
        logits = (rng.normal(size=(b, v)) * scale).astype(np.float32)
        # few distinct ids so that n-grams repeat and the ban fires
        history = rng.integers(0, 8 if trial % 2 else v, size=(b, t)).astype(np.int64)
        want = hf_chain(settings)(torch.from_numpy(history), torch.from_numpy(logits.copy())).numpy()

        banned = ngram_banned_mask(jnp.asarray(history, jnp.int32), jnp.zeros((b,), jnp.int32), jnp.int32(t),
                                   settings.no_repeat_ngram, v) if settings.no_repeat_ngram else None
        got = np.asarray(process_logits_full(jnp.asarray(logits), settings, banned))
        alive_want, alive_got = np.isfinite(want), np.isfinite(got)
        for row in range(b):
            assert set(np.flatnonzero(alive_got[row])) == set(np.flatnonzero(alive_want[row])), (trial, row)
        np.testing.assert_allclose(got[alive_got], want[alive_want], rtol=1e-6, atol=1e-6)
        assert 0 < alive_want.sum(-1).min() and alive_want.sum(-1).max() < v  # something was filtered, not all

        values, ids, _ = candidate_scores(jnp.asarray(logits), settings, banned)  # what the decode loop samples
        scattered = np.full((b, v), -np.inf, np.float32)
        np.put_along_axis(scattered, np.asarray(ids), np.asarray(values), axis=-1)
        np.testing.assert_array_equal(np.isfinite(scattered), alive_want)
        np.testing.assert_allclose(scattered[alive_want], want[alive_want], rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- greedy + scoring helpers


def hf_greedy(model, prompt: list[int], n: int, eos: int) -> tuple[list[int], np.ndarray]:
    """HF greedy generate of one unpadded prompt: (new tokens, raw logits per step [steps, V])."""
    gc = GenerationConfig(do_sample=False, max_new_tokens=n, eos_token_id=eos, pad_token_id=eos,
                          output_logits=True, return_dict_in_generate=True, num_beams=1)
    with torch.inference_mode():
        out = model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt),
                                                                                         dtype=torch.long),
                             generation_config=gc)
    tokens = out.sequences[0, len(prompt):].tolist()
    return tokens, torch.stack(out.logits)[:, 0].float().numpy()


def compare_greedy(name: str, ours: list[int], theirs: list[int], their_logits: np.ndarray) -> dict:
    """Token-for-token; at the first divergence the reference must have had a near-tie."""
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if a != b:
            top2 = np.sort(their_logits[i])[-2:]
            gap = float(top2[1] - top2[0])
            assert gap < NEAR_TIE, (f"{name}: diverged at step {i} (ours {a}, transformers {b}) but the reference's "
                                    f"top-2 logit gap there is {gap:.3e} >= {NEAR_TIE}: not a near-tie")
            return {"matched": i, "diverged_at": i, "gap": gap}
    assert len(ours) == len(theirs), f"{name}: {len(ours)} tokens vs transformers' {len(theirs)}"
    return {"matched": len(ours), "diverged_at": None, "gap": None}


def hf_token_logprobs(model, prompt: list[int], cont: list[int]) -> np.ndarray:
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([prompt + cont]), use_cache=False).logits[0].float()
    logp = torch.log_softmax(logits.double(), dim=-1).numpy()
    return np.array([logp[len(prompt) - 1 + j, c] for j, c in enumerate(cont)])


def run_comparison(hf_model, engine: Engine, prompts: dict[str, list[int]], conts: dict[str, list[int]], eos: int,
                   label: str) -> dict:
    names = list(prompts)
    settings = SamplingSettings(max_new_tokens=NEW_TOKENS, temperature=0.0, no_repeat_ngram=0,
                                stop_token_ids=(eos,), pad_id=eos)
    ours = engine.generate([prompts[n] for n in names], settings)  # all prompts in one bucketed batch
    assert not any(ours.truncated)
    results = {}
    for i, name in enumerate(names):
        theirs, their_logits = hf_greedy(hf_model, prompts[name], NEW_TOKENS, eos)
        results[name] = compare_greedy(f"{label}/{name}", ours.tokens[i], theirs, their_logits)
        results[name]["tokens"] = len(theirs)
    # scoring: a given continuation per prompt, all rows in one call
    scored = engine.score([prompts[n] for n in names], [conts[n] for n in names])
    assert not scored.truncated.any()
    worst = 0.0
    for i, name in enumerate(names):
        want = hf_token_logprobs(hf_model, prompts[name], conts[name])
        diff = float(np.abs(scored.token_logprobs[i] - want).max())
        worst = max(worst, diff)
        assert diff <= SCORE_TOL, f"{label}/{name}: per-token log-prob max |d| {diff:.2e} > {SCORE_TOL}"
        assert abs(scored.mean_logprob[i] - want.mean()) <= SCORE_TOL
        assert scored.num_tokens[i] == len(want)
        results[name]["score_max_diff"] = diff
    for name, r in results.items():
        print(f"[{label}] {name:8s} matched {r['matched']:2d}/{r['tokens']:2d}"
              + (f" (near-tie at step {r['diverged_at']}: gap {r['gap']:.2e})" if r["diverged_at"] is not None else "")
              + f"; score max|d| {r['score_max_diff']:.2e}")
    print(f"[{label}] worst per-token log-prob |d| = {worst:.2e}")
    return results


# --------------------------------------------------------------------------- tiny random GQA model


def test_tiny_gqa_greedy_and_scores_match_transformers(tmp_path):
    hf_model = make_hf_llama(dict(num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                  num_hidden_layers=3), seed=21)
    save_hf(hf_model, tmp_path / "hf")
    cfg, params = import_hf(tmp_path / "hf")
    assert cfg.num_kv_heads < cfg.num_heads
    rng = np.random.default_rng(0)
    prompts = {f"p{i}": rng.integers(3, 128, size=n).tolist() for i, n in enumerate([3, 11, 7, 20, 1, 15, 9, 5])}
    conts = {name: rng.integers(3, 128, size=n).tolist() for name, n in zip(prompts, [5, 1, 9, 3, 12, 4, 7, 2])}
    engine = Engine(params, cfg, batch_size=8, buckets=(16, 32))
    results = run_comparison(hf_model, engine, prompts, conts, eos=cfg.eos_token_id, label="tiny-gqa")
    assert sum(r["matched"] for r in results.values()) >= 0.9 * sum(r["tokens"] for r in results.values())


# --------------------------------------------------------------------------- SmolLM2 real weights


@pytest.mark.slow
def test_smollm2_greedy_and_scores_match_transformers():
    smol = load_smollm2()
    cfg, params = import_hf(smol.directory)
    def encode(text):
        return smol.tokenizer(text, add_special_tokens=False)["input_ids"]

    prompts = {name: encode(text) for name, text in PROMPTS.items()}
    conts = {name: encode(text) for name, text in CONTINUATIONS.items()}
    assert {"english", "thai", "swahili", "urdu"} <= set(prompts) and set(conts) == set(prompts)
    engine = Engine(params, cfg, batch_size=8, buckets=(32, 64, 128), score_buckets=(64, 128, 256))
    results = run_comparison(smol.model, engine, prompts, conts, eos=cfg.eos_token_id, label="smollm2")
    assert sum(r["matched"] for r in results.values()) >= 0.9 * sum(r["tokens"] for r in results.values())
