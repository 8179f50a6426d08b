"""The inference engine on tiny random models (fast): generation against a naive full-forward
reference, bucketing without recompilation, independent stopping, sampling filters, seeding,
sharded == single device (8 fake CPU devices), and scoring."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xinst_jax.config import MeshConfig, ModelConfig
from xinst_jax.infer.buckets import pick_bucket
from xinst_jax.infer.generate import Engine, decode_segments
from xinst_jax.infer.sampling import (SamplingSettings, candidate_scores, choose_tokens, ngram_banned_mask,
                                      process_logits_full, row_keys)
from xinst_jax.model.kv_cache import init_cache
from xinst_jax.model.llama import (bind, default_positions_and_segments, forward, init_params, merge_lora,
                                    unstack_layers)
from xinst_jax.sharding import make_mesh, parse_rules

NEAR_TIE = 1e-4  # fp32 on both sides: only a genuine tie may flip an argmax


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=96, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64,
                max_seq_len=256, init_std=0.3, tie_embeddings=False)
    return ModelConfig(**{**base, **kw})


def tiny_params(cfg: ModelConfig, seed: int = 0) -> dict:
    """init_params with norm scales off 1 (a swapped norm must not hide)."""
    params = init_params(cfg, jax.random.PRNGKey(seed))
    key = jax.random.PRNGKey(seed + 100)
    for path in (("layers", "attn_norm"), ("layers", "mlp_norm"), ("final_norm",)):
        node = params
        for k in path:
            node = node[k]
        key, sub = jax.random.split(key)
        node["scale"] = node["scale"] + 0.2 * jax.random.normal(sub, node["scale"].shape)
    return params


def random_prompts(vocab: int, lengths, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, size=n).tolist() for n in lengths]


_fwd_cache: dict = {}


def full_logits_ref(params, cfg, seq: list[int], width: int = 64) -> np.ndarray:
    """llama.forward over one unpadded sequence (right-padded to `width` with segment 0, which
    causal attention never sees: one compile serves every length)."""
    key = id(cfg)
    if key not in _fwd_cache:
        _fwd_cache[key] = jax.jit(lambda p, t, pos, seg: forward(p, t, pos, seg, cfg))
    assert len(seq) <= width
    t = np.zeros((1, width), np.int32)
    t[0, :len(seq)] = seq
    pos, _ = default_positions_and_segments(jnp.asarray(t))
    seg = (np.arange(width) < len(seq)).astype(np.int32)[None]
    return np.asarray(_fwd_cache[key](params, jnp.asarray(t), pos, jnp.asarray(seg)))[0, :len(seq)]


def greedy_reference(params, cfg, prompt: list[int], n: int, stop: tuple = (), min_new: int = 0
                     ) -> tuple[list[int], list[float]]:
    """Naive greedy: a full forward over the whole sequence for every new token (stop tokens
    banned for the first `min_new`). Returns the tokens and the top-2 logit gap at each step."""
    seq, gaps = list(prompt), []
    for step in range(n):
        logits = full_logits_ref(params, cfg, seq)[-1].copy()
        if step < min_new:
            logits[list(stop)] = -np.inf
        top2 = np.sort(logits)[-2:]
        gaps.append(float(top2[1] - top2[0]))
        seq.append(int(np.argmax(logits)))
        if seq[-1] in stop:
            break
    return seq[len(prompt):], gaps


def assert_same_or_near_tie(got: list[int], want: list[int], gaps: list[float], what: str) -> int:
    """Token-for-token equality; where they first differ the reference must have had a near-tie."""
    for i, (a, b) in enumerate(zip(got, want)):
        if a != b:
            assert gaps[i] < NEAR_TIE, f"{what}: step {i}: got {a}, reference {b}, reference top-2 gap {gaps[i]:.2e}"
            return i
    assert len(got) == len(want), f"{what}: {len(got)} tokens vs reference {len(want)}"
    return len(got)


@pytest.fixture(scope="module")
def model():
    cfg = tiny_cfg()
    return cfg, tiny_params(cfg)


# --------------------------------------------------------------------------- generation


def test_greedy_matches_naive_full_forward(model):
    cfg, params = model
    prompts = random_prompts(cfg.vocab_size, [1, 5, 9, 16, 3, 12, 7])  # 7 rows, batch 4: a padded last batch
    engine = Engine(params, cfg, batch_size=4, buckets=(8, 16))
    out = engine.generate(prompts, SamplingSettings(max_new_tokens=12, temperature=0.0, no_repeat_ngram=0))
    for i, prompt in enumerate(prompts):
        want, gaps = greedy_reference(params, cfg, prompt, 12)
        assert_same_or_near_tie(out.tokens[i], want, gaps, f"prompt {i}")
        assert out.finish_reasons[i] == "length" and len(out.tokens[i]) == 12
    assert out.prompt_lengths == [len(p) for p in prompts] and not any(out.truncated)


def cached_model(params, cfg, batch: int, length: int, kv_dtype=jnp.float32):
    """The model in its inference layout (one module per layer) and an empty KV cache."""
    model = bind(unstack_layers(params, cfg), cfg, stack_layers=False)
    return model, init_cache(cfg.num_layers, batch, length, cfg.num_kv_heads, cfg.head_dim, kv_dtype)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("kv_heads", [1, 2, 4], ids=["mqa", "gqa", "mha"])
def test_prefill_and_decode_match_training_forward(tied, kv_heads):
    """The model's prefill (a left-padded prompt into the cache) and decode steps (one token at a
    time through the cache) reproduce its training-mode logits (fp32), tied or untied embeddings,
    MQA/GQA/MHA: three modes of one module."""
    cfg = tiny_cfg(tie_embeddings=tied, num_kv_heads=kv_heads)
    params = tiny_params(cfg, seed=int(tied))
    seq = random_prompts(cfg.vocab_size, [20], seed=3)[0]
    ref = full_logits_ref(params, cfg, seq)
    p, pad = 12, 4  # prompt = first 8 tokens, left-padded by 4 into a bucket of 12
    tokens = np.zeros((1, p), np.int32)
    tokens[0, pad:] = seq[:p - pad]
    segments = (np.arange(p) >= pad).astype(np.int32)[None]
    positions = np.maximum(np.arange(p) - pad, 0)[None]
    model, cache = cached_model(params, cfg, 1, p + 12)
    logits, cache = model(jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(segments), cache)
    got = [np.asarray(logits[0, -1])]
    for i in range(p - pad, len(seq) - 1):
        logits, cache = model(jnp.asarray([[seq[i]]], jnp.int32), jnp.asarray([[i]], jnp.int32),
                              jnp.ones((1, 1), jnp.int32), cache)
        got.append(np.asarray(logits[0, 0]))
    assert int(cache.index) == pad + len(seq) - 1
    np.testing.assert_allclose(np.stack(got), ref[p - pad - 1:len(seq) - 1], atol=2e-5, rtol=0)
    assert np.abs(ref).max() > 1.0  # O(1) logits: the bound is meaningful


def test_mixed_length_prefill_then_decode_match_forward():
    """Prompts of different lengths (one empty row) left-padded into one bucket, then decoded a
    few steps: every real row's logits equal the training forward over its own sequence (fp32)."""
    cfg = tiny_cfg()
    params = tiny_params(cfg, seed=5)
    lengths, p, steps = [5, 1, 0, 9], 10, 3
    seqs = random_prompts(cfg.vocab_size, [n + steps for n in lengths], seed=7)
    tokens = np.zeros((4, p), np.int32)
    for b, n in enumerate(lengths):
        tokens[b, p - n:] = seqs[b][:n]
    first = np.asarray([p - n for n in lengths])[:, None]
    slot = np.arange(p)[None]
    model, cache = cached_model(params, cfg, 4, p + steps)
    logits, cache = model(jnp.asarray(tokens), jnp.asarray(np.maximum(slot - first, 0)),
                          jnp.asarray((slot >= first).astype(np.int32)), cache)
    got = [np.asarray(logits[:, -1])]
    for i in range(steps - 1):
        tok = jnp.asarray([[s[n + i] if n else 0] for s, n in zip(seqs, lengths)], jnp.int32)
        pos = jnp.asarray([[n + i] for n in lengths], jnp.int32)
        logits, cache = model(tok, pos, jnp.ones((4, 1), jnp.int32), cache)
        got.append(np.asarray(logits[:, 0]))
    for b, n in enumerate(lengths):
        if n == 0:
            continue
        ref = full_logits_ref(params, cfg, seqs[b])[n - 1:n - 1 + steps]
        np.testing.assert_allclose(np.stack([g[b] for g in got]), ref, atol=2e-5, rtol=0, err_msg=f"row {b}")


def test_bf16_weights_and_cache_stay_close(model):
    cfg, params = model
    prompts = random_prompts(cfg.vocab_size, [10, 6], seed=4)
    outs = {}
    for dtype in ("float32", "bfloat16"):
        engine = Engine(params, cfg, batch_size=2, buckets=(16,), weight_dtype=dtype)
        assert engine.params["layers"][0]["mlp"]["w_gate"].dtype == jnp.dtype(dtype)
        assert engine.kv_dtype == jnp.dtype(dtype)
        outs[dtype] = engine.score(prompts, [[5, 6, 7], [8, 9]])
    f32, bf16 = outs["float32"].sum_logprob, outs["bfloat16"].sum_logprob
    err = np.abs(bf16 - f32).max()
    assert 0 < err < 0.03 * np.abs(f32).max(), (err, f32)  # bf16 rounds (err > 0) but ~3 significant digits survive


def test_lora_adapters_are_merged_for_inference(model):
    """An engine over LoRA params generates and scores as one over the merged weights."""
    cfg, params = model
    lora_cfg = dataclasses.replace(cfg, lora_rank=4)
    lora = init_params(lora_cfg, jax.random.PRNGKey(1))
    lora = {**lora, **{k: v for k, v in params.items() if k != "layers"}}
    for name, w in params["layers"]["attn"].items():
        lora["layers"]["attn"][name] = w
        b = lora["layers"]["attn"][name + "_lora"]["b"]
        lora["layers"]["attn"][name + "_lora"]["b"] = b + 0.05
    for name, w in params["layers"]["mlp"].items():
        lora["layers"]["mlp"][name] = w
    for name in ("attn_norm", "mlp_norm"):
        lora["layers"][name] = params["layers"][name]
    prompts = random_prompts(cfg.vocab_size, [5, 7], seed=21)
    st = SamplingSettings(max_new_tokens=8, temperature=0.0, no_repeat_ngram=0)
    merged = Engine(merge_lora(lora, lora_cfg), cfg, batch_size=2, buckets=(8,))
    adapted = Engine(lora, lora_cfg, batch_size=2, buckets=(8,))
    assert adapted.generate(prompts, st).tokens == merged.generate(prompts, st).tokens
    assert adapted.generate(prompts, st).tokens != Engine(params, cfg, batch_size=2, buckets=(8,)).generate(
        prompts, st).tokens  # the adapters change the model
    conts = [[3, 4], [5]]
    np.testing.assert_allclose(adapted.score(prompts, conts).sum_logprob, merged.score(prompts, conts).sum_logprob,
                               atol=1e-5, rtol=0)


def test_no_recompilation_within_a_bucket(model):
    cfg, params = model
    engine = Engine(params, cfg, batch_size=4, buckets=(8, 16))
    settings = SamplingSettings(max_new_tokens=6)
    for seed in range(3):  # three batches of different prompts and lengths, all in bucket 8
        engine.generate(random_prompts(cfg.vocab_size, [2 + seed, 8, 5, 1], seed=seed), settings)
    engine.generate(random_prompts(cfg.vocab_size, [3], seed=9), settings)  # a short batch: padded rows
    # The prefill and the decode loop compile once per bucket.
    assert engine._decode._cache_size() == 1 and engine._prefill._cache_size() == 1
    assert all(v == 1 for v in engine.trace_counts.values())
    engine.generate(random_prompts(cfg.vocab_size, [12, 3], seed=5), settings)  # bucket 16: one more of each
    assert engine._prefill._cache_size() == 2 and engine._decode._cache_size() == 2
    assert all(v == 1 for v in engine.trace_counts.values())
    assert len(engine.timings) == 5 and all(t.steps <= 6 for t in engine.timings)


def test_decode_segment_plan():
    assert decode_segments(1, 4, 32) == []  # the only token comes from the prefill
    assert decode_segments(20, 4, 32) == [20]  # too few steps to split
    assert decode_segments(129, 4, 32) == [33, 65, 97, 129]
    assert decode_segments(12, 4, 2) == [3, 6, 9, 12]  # 11 steps: 2 + 3 + 3 + 3
    assert decode_segments(12, 4, 3) == [4, 8, 12]  # at least 3 steps each: 3 + 4 + 4
    for n in range(1, 40):
        ends = decode_segments(n, 5, 2)
        assert ends == sorted(set(ends)) and (not ends or (ends[-1] == n and ends[0] > 1))


def test_segmented_decode_equals_one_cache(model):
    """A decode loop split into segments whose caches grow between them gives exactly the tokens
    of one full-length cache: greedy, sampled with no-repeat-ngram, rows stopping early."""
    cfg, params = model
    prompts = random_prompts(cfg.vocab_size, [5, 3, 8, 6, 2, 7, 4], seed=21)
    whole = Engine(params, cfg, batch_size=4, buckets=(8,), max_segments=1)
    split = Engine(params, cfg, batch_size=4, buckets=(8,), max_segments=4, min_segment_steps=3)
    assert split.segment_ends(14) == [4, 7, 10, 14] and whole.segment_ends(14) == [14]
    stop = tuple(int(t) for t in np.unique(np.asarray(prompts[0]))[:3])
    for st in (SamplingSettings(max_new_tokens=14, temperature=0.0, no_repeat_ngram=0),
               SamplingSettings(max_new_tokens=14, seed=4, no_repeat_ngram=2, stop_token_ids=stop)):
        want, got = whole.generate(prompts, st), split.generate(prompts, st)
        assert got.tokens == want.tokens and got.finish_reasons == want.finish_reasons, st
    assert any(r == "stop" for r in want.finish_reasons)  # early stops crossed segment boundaries too
    assert all(v == 1 for v in split.trace_counts.values())  # segments live in one compiled loop


def test_bucket_choice_and_left_truncation(model):
    cfg, params = model
    assert [pick_bucket(n, (8, 16)) for n in (1, 8, 9, 16, 40)] == [8, 8, 16, 16, 16]
    engine = Engine(params, cfg, batch_size=2, buckets=(8,))
    long = random_prompts(cfg.vocab_size, [13], seed=6)[0]
    settings = SamplingSettings(max_new_tokens=5, temperature=0.0, no_repeat_ngram=0)
    out = engine.generate([long], settings)
    assert out.truncated == [True] and out.prompt_lengths == [8]
    assert out.tokens == engine.generate([long[-8:]], settings).tokens  # the last 8 tokens were used


def test_rows_stop_independently_and_loop_exits_early(model):
    cfg, params = model
    prompts = random_prompts(cfg.vocab_size, [4, 6, 3, 5], seed=7)
    base = SamplingSettings(max_new_tokens=16, temperature=0.0, no_repeat_ngram=0, pad_id=0)
    engine = Engine(params, cfg, batch_size=4, buckets=(8,))
    free = engine.generate(prompts, base).tokens
    stop = free[0][3]  # row 0 generates this at step 3
    out = engine.generate(prompts, SamplingSettings(**{**base.__dict__, "stop_token_ids": (stop,)}))
    for row, toks in enumerate(free):
        if stop in toks:
            cut = toks.index(stop) + 1
            assert out.tokens[row] == toks[:cut] and out.finish_reasons[row] == "stop", row
        else:
            assert out.tokens[row] == toks and out.finish_reasons[row] == "length", row
    assert len(out.tokens[0]) <= 4
    # every row stops on its first token: the loop runs only that one step
    firsts = tuple(sorted({t[0] for t in free}))
    engine.timings.clear()
    out = engine.generate(prompts, SamplingSettings(**{**base.__dict__, "stop_token_ids": firsts}))
    assert all(len(t) == 1 for t in out.tokens) and set(out.finish_reasons) == {"stop"}
    assert engine.timings[0].steps == 1
    # min_new_tokens: the stop tokens are banned for the first 5 steps, then stop the rows again
    out = engine.generate(prompts, SamplingSettings(**{**base.__dict__, "stop_token_ids": firsts,
                                                       "min_new_tokens": 5}))
    for row, prompt in enumerate(prompts):
        want, gaps = greedy_reference(params, cfg, prompt, 16, stop=firsts, min_new=5)
        assert_same_or_near_tie(out.tokens[row], want, gaps, f"row {row}")
        assert len(out.tokens[row]) >= 5 and not set(out.tokens[row][:5]) & set(firsts)


def test_stop_sequence(model):
    cfg, params = model
    prompts = random_prompts(cfg.vocab_size, [5, 7], seed=8)
    base = SamplingSettings(max_new_tokens=12, temperature=0.0, no_repeat_ngram=0)
    engine = Engine(params, cfg, batch_size=2, buckets=(8,))
    free = engine.generate(prompts, base).tokens
    seq = tuple(free[1][4:6])
    out = engine.generate(prompts, SamplingSettings(**{**base.__dict__, "stop_sequences": (seq,)}))
    for row, toks in enumerate(free):
        ends = [i + 2 for i in range(len(toks) - 1) if tuple(toks[i:i + 2]) == seq]
        want = toks[:ends[0]] if ends else toks
        assert out.tokens[row] == want, row
    assert out.finish_reasons[1] == "stop" and len(out.tokens[1]) <= 6


def has_repeated_ngram(seq: list[int], n: int) -> bool:
    grams = [tuple(seq[i:i + n]) for i in range(len(seq) - n + 1)]
    return len(grams) != len(set(grams))


def test_no_repeat_ngram_holds_in_outputs():
    cfg = tiny_cfg(vocab_size=24)  # a small vocabulary: greedy decoding loops quickly
    params = tiny_params(cfg, seed=1)
    prompts = random_prompts(cfg.vocab_size, [4, 6, 2, 5], seed=2)
    engine = Engine(params, cfg, batch_size=4, buckets=(8,))
    free = engine.generate(prompts, SamplingSettings(max_new_tokens=40, temperature=0.0, no_repeat_ngram=0))
    assert any(has_repeated_ngram(p + t, 3) for p, t in zip(prompts, free.tokens))  # the ban has work to do
    for settings in (SamplingSettings(max_new_tokens=40, temperature=0.0, no_repeat_ngram=3),
                     SamplingSettings(max_new_tokens=40, temperature=1.0, top_k=0, top_p=1.0, no_repeat_ngram=3)):
        out = engine.generate(prompts, settings)
        for p, t in zip(prompts, out.tokens):
            assert len(t) == 40 and not has_repeated_ngram(p + t, 3), (p, t)


# --------------------------------------------------------------------------- sampling pieces


def ngram_banned_reference(seq: list[int], n: int) -> set[int]:
    """HF NoRepeatNGramLogitsProcessor for one row, written out plainly."""
    if len(seq) < n:
        return set()
    prefix = tuple(seq[len(seq) - n + 1:])
    return {seq[j + n - 1] for j in range(len(seq) - n + 1) if tuple(seq[j:j + n - 1]) == prefix}


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_ngram_mask_matches_reference(n):
    rng = np.random.default_rng(n)
    b, s, v = 6, 24, 5  # few symbols: many repeats
    hist = rng.integers(0, v, size=(b, s)).astype(np.int32)
    first = np.array([0, 3, 10, 15, 20, 21], np.int32)
    for cur in (21, 22, 24):
        got = np.asarray(ngram_banned_mask(jnp.asarray(hist), jnp.asarray(first), jnp.int32(cur), n, v))
        for row in range(b):
            seq = hist[row, first[row]:cur].tolist()
            want = ngram_banned_reference(seq, n)
            assert set(np.flatnonzero(got[row]).tolist()) == want, (row, cur, seq)
    got = ngram_banned_mask(jnp.asarray(hist), jnp.asarray(first), jnp.int32(24), n, v)
    assert bool(got.any())  # the case is not vacuous


def test_candidates_equal_full_processing():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(5, 200)).astype(np.float32) * 3)
    banned = jnp.asarray(rng.random((5, 200)) < 0.1)
    tied = np.asarray(logits).copy()
    tied[:, 10:14] = 30.0  # rows 1-4: four tokens tie at the top; top_k=2 must keep all four, as HF does
    tied[0, 20:25] = 40.0 + np.arange(5)  # row 0: the 5 best are distinct
    unbanned = banned.at[:, 10:25].set(False)
    cases = [(logits, st) for st in (SamplingSettings(), SamplingSettings(temperature=1.3, top_k=7, top_p=0.5),
                                     SamplingSettings(top_k=0, top_p=0.8), SamplingSettings(top_k=20, top_p=1.0))]
    cases += [(jnp.asarray(tied), SamplingSettings(top_k=2, top_p=1.0)), (jnp.asarray(tied), SamplingSettings(top_k=2))]
    for logits, st in cases:
        if st.top_k == 2:
            banned = unbanned
        full = np.asarray(process_logits_full(logits, st, banned))
        if st.top_k == 2 and st.top_p == 1.0:
            assert (np.isfinite(full).sum(axis=1) == [2, 4, 4, 4, 4]).all()  # the reference keeps the ties
        values, ids, cut = candidate_scores(logits, st, banned)
        assert cut is None or not np.asarray(cut).any()
        scattered = np.full_like(full, -np.inf)
        np.put_along_axis(scattered, np.asarray(ids), np.asarray(values), axis=-1)
        np.testing.assert_array_equal(np.isfinite(scattered), np.isfinite(full))
        np.testing.assert_allclose(scattered[np.isfinite(full)], full[np.isfinite(full)], rtol=1e-6)


def test_ties_beyond_the_candidates_use_the_full_chain():
    """20 tokens tie for the top with top_k=2: transformers keeps all 20 (k + 8 candidates cannot
    hold them). The row is marked cut and sampling draws from all 20, uniformly; a row without
    such ties keeps the fast path's candidates."""
    logits = np.full((2, 64), -5.0, np.float32)
    logits[0, 30:50] = 3.0  # row 0: 20 ties
    logits[1, [7, 9]] = [4.0, 3.0]  # row 1: two clear winners
    st = SamplingSettings(temperature=1.0, top_k=2, top_p=1.0, no_repeat_ngram=0)
    values, ids, cut = candidate_scores(jnp.asarray(logits), st)
    assert np.asarray(cut).tolist() == [True, False]
    assert np.isfinite(np.asarray(process_logits_full(jnp.asarray(logits), st))).sum(axis=1).tolist() == [20, 2]
    n = 4000
    draws = np.asarray(jax.jit(jax.vmap(lambda k: choose_tokens(jnp.asarray(logits), st, jnp.stack([k, k]),
                                                                 jnp.int32(0))))(row_keys(5, np.arange(n))))
    freq = np.bincount(draws[:, 0], minlength=64) / n
    assert set(np.flatnonzero(freq)) == set(range(30, 50))
    np.testing.assert_allclose(freq[30:50], 1 / 20, atol=0.02)  # ~6 sigma at n=4000
    assert set(draws[:, 1].tolist()) == {7, 9}


def test_sampling_frequencies_follow_processed_distribution():
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(size=(1, 12)).astype(np.float32) * 2)
    st = SamplingSettings(temperature=0.8, top_k=6, top_p=0.85, no_repeat_ngram=0)
    probs = np.asarray(jax.nn.softmax(process_logits_full(logits, st)))[0]
    n = 40000
    keys = row_keys(123, np.arange(n))
    draws = np.asarray(jax.jit(jax.vmap(lambda k: choose_tokens(logits, st, k[None], jnp.int32(0))[0]))(keys))
    freq = np.bincount(draws, minlength=12) / n
    assert set(np.flatnonzero(freq)) <= set(np.flatnonzero(probs))  # never a filtered token
    np.testing.assert_allclose(freq, probs, atol=0.012)  # ~5 sigma at n=40000
    assert (probs > 0).sum() >= 2  # a real choice was made


def test_sampling_is_seeded_and_row_local(model):
    cfg, params = model
    prompts = random_prompts(cfg.vocab_size, [5, 3, 7, 6], seed=11)
    engine = Engine(params, cfg, batch_size=4, buckets=(8,))
    st = SamplingSettings(max_new_tokens=10, temperature=1.0, top_k=0, top_p=1.0, no_repeat_ngram=0, seed=5)
    a = engine.generate(prompts, st, row_ids=[10, 11, 12, 13]).tokens
    assert engine.generate(prompts, st, row_ids=[10, 11, 12, 13]).tokens == a
    b = engine.generate(prompts, SamplingSettings(**{**st.__dict__, "seed": 6}), row_ids=[10, 11, 12, 13]).tokens
    assert b != a
    # a row's sample depends on its id, not on its batch neighbours or order
    order = [2, 0, 3, 1]
    c = engine.generate([prompts[i] for i in order], st, row_ids=[10 + i for i in order]).tokens
    assert [c[order.index(i)] for i in range(4)] == a
    alone = engine.generate([prompts[2]], st, row_ids=[12]).tokens
    assert alone[0] == a[2]


# --------------------------------------------------------------------------- sharding


def padded_spec(x: jax.Array, n: int) -> tuple:
    spec = tuple(x.sharding.spec)
    return spec + (None,) * (n - len(spec))


@pytest.mark.parametrize("mesh_kw", [dict(data=4, fsdp=1, tensor=2), dict(data=1, fsdp=-1, tensor=1),
                                     dict(data=2, fsdp=2, tensor=2)])
def test_sharded_equals_single_device(model, mesh_kw):
    assert jax.device_count() == 8
    cfg, params = model
    mesh_cfg = MeshConfig(**mesh_kw)
    mesh = make_mesh(mesh_cfg)
    rules = parse_rules(mesh_cfg.rules)
    prompts = random_prompts(cfg.vocab_size, [5, 3, 8, 6, 2, 7, 4, 8, 1, 6], seed=12)
    segs = dict(max_segments=3, min_segment_steps=3)  # the cache grows twice while sharded
    single = Engine(params, cfg, batch_size=8, buckets=(8,), **segs)
    sharded = Engine(params, cfg, mesh=mesh, rules=rules, batch_size=8, buckets=(8,), **segs)
    assert sharded.segment_ends(10) == [4, 7, 10]
    layer = sharded.params["layers"][0]
    for w, axis in ((layer["attn"]["wk"], 1), (layer["mlp"]["w_gate"], 1), (layer["attn"]["wo"], 0)):
        assert len(w.sharding.device_set) == 8
        if mesh_kw["tensor"] > 1:  # tensor parallel over KV heads, heads and mlp units
            assert padded_spec(w, axis + 1)[axis] == "tensor", w.sharding.spec
    _, cache = sharded._prefill(sharded.params, sharded._put(np.ones((8, 8), np.int32)),
                                sharded._put(np.full((8,), 8, np.int32)), max_len=12)
    spec = padded_spec(cache.k[0], 4)  # [batch, kv_heads, length, head_dim]: rows over data, kv heads over tensor
    assert spec[1] == ("tensor" if mesh_kw["tensor"] > 1 else None) and spec[0] is not None, spec
    for st in (SamplingSettings(max_new_tokens=10, temperature=0.0, no_repeat_ngram=3),
               SamplingSettings(max_new_tokens=10, seed=3)):
        want = single.generate(prompts, st)
        got = sharded.generate(prompts, st)
        assert got.tokens == want.tokens and got.finish_reasons == want.finish_reasons, st
    conts = random_prompts(cfg.vocab_size, [3, 1, 4, 2, 5, 2, 3, 1, 2, 4], seed=13)
    np.testing.assert_allclose(sharded.score(prompts, conts).sum_logprob, single.score(prompts, conts).sum_logprob,
                               atol=1e-5, rtol=0)


def test_batch_must_split_over_data_parallel(model):
    cfg, params = model
    mesh_cfg = MeshConfig(data=8, fsdp=1, tensor=1)
    with pytest.raises(ValueError, match="not divisible"):
        Engine(params, cfg, mesh=make_mesh(mesh_cfg), rules=parse_rules(mesh_cfg.rules), batch_size=4)


# --------------------------------------------------------------------------- scoring


def test_score_matches_full_forward(model):
    cfg, params = model
    prompts = random_prompts(cfg.vocab_size, [3, 9, 1, 6, 12], seed=14)
    conts = random_prompts(cfg.vocab_size, [4, 1, 7, 3, 2], seed=15)
    engine = Engine(params, cfg, batch_size=2, buckets=(8, 16))
    out = engine.score(prompts, conts)
    for i, (p, c) in enumerate(zip(prompts, conts)):
        logits = full_logits_ref(params, cfg, p + c)
        logp = np.asarray(jax.nn.log_softmax(jnp.asarray(logits, jnp.float64 if jax.config.x64_enabled else
                                                          jnp.float32), axis=-1))
        want = np.array([logp[len(p) - 1 + j, c[j]] for j in range(len(c))])
        np.testing.assert_allclose(out.token_logprobs[i], want, atol=1e-5, rtol=0)
        assert out.num_tokens[i] == len(c)
        assert out.sum_logprob[i] == pytest.approx(want.sum(), abs=1e-4)
        assert out.mean_logprob[i] == pytest.approx(want.mean(), abs=1e-5)
        greedy = all(np.argmax(logits[len(p) - 1 + j]) == c[j] for j in range(len(c)))
        assert out.is_greedy[i] == greedy
    assert (out.sum_logprob < 0).all()


def test_score_chunks_the_lm_head():
    """Scoring in lm_head chunks of 5 positions (not dividing the bucket) gives the one-chunk
    results, and the compiled program's temporaries stay well under the whole logits tensor."""
    cfg = tiny_cfg(vocab_size=4096)
    params = tiny_params(cfg, seed=3)
    prompts = random_prompts(cfg.vocab_size, [9, 4, 30, 17], seed=8)
    conts = random_prompts(cfg.vocab_size, [6, 20, 3, 11], seed=9)
    position_bytes = 4 * cfg.vocab_size * 4  # one position's float32 logits over the batch of 4
    whole = Engine(params, cfg, batch_size=4, buckets=(8,), score_buckets=(48,), score_logits_bytes=47 * position_bytes)
    chunked = Engine(params, cfg, batch_size=4, buckets=(8,), score_buckets=(48,), score_logits_bytes=5 * position_bytes)
    a, b = whole.score(prompts, conts), chunked.score(prompts, conts)
    np.testing.assert_allclose(b.sum_logprob, a.sum_logprob, atol=1e-5, rtol=0)
    assert (b.is_greedy == a.is_greedy).all() and (b.num_tokens == a.num_tokens).all()
    args = [jnp.zeros((4, 48), jnp.int32), jnp.ones((4, 48), jnp.int32), jnp.ones((4, 48), bool)]

    def temp_bytes(engine):
        return engine._score.lower(engine.params, *args).compile().memory_analysis().temp_size_in_bytes

    logits_bytes = 4 * 47 * cfg.vocab_size * 4
    assert temp_bytes(whole) >= logits_bytes > 4 * temp_bytes(chunked), (temp_bytes(whole), temp_bytes(chunked))


def test_greedy_continuation_scores_as_greedy(model):
    cfg, params = model
    prompts = random_prompts(cfg.vocab_size, [4, 7], seed=16)
    engine = Engine(params, cfg, batch_size=2, buckets=(8, 16))
    conts = engine.generate(prompts, SamplingSettings(max_new_tokens=5, temperature=0.0, no_repeat_ngram=0)).tokens
    out = engine.score(prompts, conts)
    assert out.is_greedy.all()
    other = [[(c[0] + 1) % cfg.vocab_size] + c[1:] for c in conts]
    worse = engine.score(prompts, other)
    assert not worse.is_greedy.any() and (worse.sum_logprob < out.sum_logprob).all()


def test_score_truncates_long_prompts_from_the_left(model):
    cfg, params = model
    engine = Engine(params, cfg, batch_size=2, buckets=(8,), score_buckets=(16,))
    p = random_prompts(cfg.vocab_size, [20], seed=17)[0]
    c = [5, 6, 7]
    out = engine.score([p], [c])
    assert out.truncated.tolist() == [True]
    np.testing.assert_allclose(out.token_logprobs[0], engine.score([p[-13:]], [c]).token_logprobs[0], atol=1e-6)
    with pytest.raises(ValueError, match="continuation 0"):
        engine.score([p], [list(range(3, 20))])


def test_rejects_empty_prompts(model):
    cfg, params = model
    engine = Engine(params, cfg, batch_size=2, buckets=(8,))
    with pytest.raises(ValueError, match="empty"):
        engine.generate([[5], []], SamplingSettings())
    with pytest.raises(ValueError, match="empty"):
        engine.score([[]], [[4]])
