"""Continuous batching (Engine.generate(schedule="continuous")) on a tiny random model (fast):
the same tokens and finish reasons as static batches for the same seeds (greedy, no-repeat-ngram,
the paper's sampling settings), per-row max_new_tokens, stop tokens / sequences / min_new_tokens
mid-way, bounded compilation, and 8 fake CPU devices (tensor parallel) == 1 device."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from test_generate import has_repeated_ngram, random_prompts, tiny_cfg, tiny_params
from xinst_jax.config import MeshConfig
from xinst_jax.infer.generate import Engine
from xinst_jax.infer.sampling import SamplingSettings
from xinst_jax.sharding import make_mesh, parse_rules

CAP = 20
GREEDY_NGRAM = SamplingSettings(max_new_tokens=CAP, temperature=0.0, no_repeat_ngram=2)
PAPER = SamplingSettings(max_new_tokens=CAP, temperature=0.7, top_p=0.9, top_k=50, no_repeat_ngram=6, seed=7)


@pytest.fixture(scope="module")
def setup():
    """17 prompts of 1-16 tokens (two buckets), each with its own limit, for 4 slots."""
    cfg = tiny_cfg()
    params = tiny_params(cfg, seed=2)
    rng = np.random.default_rng(0)
    prompts = random_prompts(cfg.vocab_size, rng.integers(1, 17, size=17).tolist(), seed=1)
    limits = rng.integers(1, CAP + 6, size=17).tolist()  # some above the cap: capped at CAP
    limits[3] = 1  # a row that is done on its prefill token
    engine = Engine(params, cfg, batch_size=4, buckets=(8, 16), refill_size=2, chunk_steps=8)
    return cfg, params, prompts, limits, engine


def both(engine, prompts, settings, limits=None, row_ids=None):
    static = engine.generate(prompts, settings, row_ids=row_ids, max_new_tokens=limits, schedule="static")
    cont = engine.generate(prompts, settings, row_ids=row_ids, max_new_tokens=limits, schedule="continuous")
    return static, cont


@pytest.fixture(scope="module")
def free(setup):
    """Static greedy tokens (no-repeat-ngram 2), no limits, no stops: the reference the stop test
    cuts."""
    _, _, prompts, _, engine = setup
    return engine.generate(prompts, GREEDY_NGRAM, schedule="static").tokens


@pytest.mark.parametrize("settings", [GREEDY_NGRAM, PAPER], ids=["greedy-ngram2", "paper-sampling"])
def test_continuous_equals_static(setup, settings):
    """More prompts than slots, mixed prompt buckets and per-row limits: every row's tokens and
    finish reason equal the static batches', and each row stops at its own limit."""
    cfg, params, prompts, limits, engine = setup
    row_ids = [100 + 3 * i for i in range(len(prompts))]
    static, cont = both(engine, prompts, settings, limits, row_ids)
    assert cont.tokens == static.tokens
    assert cont.finish_reasons == static.finish_reasons
    assert cont.prompt_lengths == static.prompt_lengths and cont.truncated == static.truncated
    for toks, limit, reason in zip(cont.tokens, limits, cont.finish_reasons):
        assert len(toks) == min(limit, CAP) and reason == "length"
    timing = engine.timings[-1]
    assert timing.schedule == "continuous" and timing.new_tokens == sum(len(t) for t in cont.tokens)
    assert timing.refills == 9  # ceil(17 / 2): the slots were refilled as rows finished
    # fewer decode steps than static batches that wait on their longest row
    assert timing.steps < sum(t.steps for t in engine.timings[-1 - 5:-1])  # the 5 static batches of 4
    if settings is GREEDY_NGRAM:
        assert not any(has_repeated_ngram(p + t, 2) for p, t in zip(prompts, cont.tokens))
        # the ban had work to do: without it greedy decoding repeats bigrams
        plain = engine.generate(prompts[:4], dataclasses.replace(GREEDY_NGRAM, no_repeat_ngram=0), schedule="static")
        assert any(has_repeated_ngram(p + t, 2) for p, t in zip(prompts, plain.tokens))
    if settings is PAPER:  # sampling is seeded by row id: other ids, other samples
        other = engine.generate(prompts, settings, max_new_tokens=limits, schedule="continuous")
        assert other.tokens != cont.tokens


def test_stops_mid_way_refill_the_slots(setup, free):
    """Stop tokens (banned for min_new_tokens steps) and a stop sequence end rows mid-way; their
    slots are refilled, and tokens and reasons equal static batching and the free run cut at the
    stop."""
    cfg, params, prompts, limits, engine = setup
    stop_tok = free[0][4]
    seq = tuple(free[5][6:8])
    st = dataclasses.replace(GREEDY_NGRAM, stop_token_ids=(stop_tok,), stop_sequences=(seq,), min_new_tokens=2)
    static, cont = both(engine, prompts, st)
    assert cont.tokens == static.tokens and cont.finish_reasons == static.finish_reasons
    n_stop = 0
    for row, toks in enumerate(free):
        if stop_tok in toks[:2]:
            continue  # min_new_tokens bans it there: the row takes another path (static == continuous above)
        ends = [i + 1 for i, t in enumerate(toks) if t == stop_tok and i >= 2]
        ends += [i + 2 for i in range(len(toks) - 1) if tuple(toks[i:i + 2]) == seq]
        if ends:
            assert cont.tokens[row] == toks[:min(ends)] and cont.finish_reasons[row] == "stop", row
            n_stop += 1
        else:
            assert cont.tokens[row] == toks and cont.finish_reasons[row] == "length", row
    assert n_stop >= 2 and any(len(t) < CAP for t in cont.tokens)
    assert all(len(t) >= 2 for t in cont.tokens)  # min_new_tokens held the stop token back


def test_compilation_is_bounded(setup):
    """One decode chunk per (slots, cache length, settings, largest running bucket), one refill
    per prompt bucket: new prompts, limits, row ids and chunk lengths reuse them all."""
    cfg, params, prompts, limits, engine = setup
    first = engine.generate(prompts, PAPER, max_new_tokens=limits, schedule="continuous")
    traced = dict(engine.trace_counts)
    engine.chunk_steps = 1  # a return to the host after every step: the chunk's step bound is a runtime value
    try:
        again = engine.generate(prompts, PAPER, max_new_tokens=limits, schedule="continuous")
    finally:
        engine.chunk_steps = 8
    assert again.tokens == first.tokens and engine.timings[-1].chunks > engine.timings[-2].chunks
    rng = np.random.default_rng(5)
    engine.generate(random_prompts(cfg.vocab_size, rng.integers(9, 17, size=11).tolist(), seed=9), PAPER,
                    max_new_tokens=rng.integers(1, CAP, size=11).tolist(), row_ids=range(50, 61),
                    schedule="continuous")
    assert dict(engine.trace_counts) == traced  # nothing traced again
    assert all(v == 1 for v in engine.trace_counts.values()), engine.trace_counts
    kinds = sorted(k[0] for k in engine.trace_counts if k[0] in ("chunk", "refill") and k[-1] == PAPER.without_seed())
    assert kinds == ["chunk", "chunk", "refill", "refill"]  # chunks and refills: buckets 8 and 16
    assert sum(k[0] == "init_slots" for k in engine.trace_counts) == 1  # one slot layout for every settings


def test_sharded_equals_single_device(setup):
    """8 fake devices: rows over data and fsdp, weights and the slots' KV cache over tensor. The
    continuous schedule's outputs equal the single-device static ones, and streamed (progress)
    its reads of each chunk's new tokens off the sharded history join to them."""
    assert jax.device_count() == 8
    cfg, params, prompts, limits, engine = setup
    mesh_cfg = MeshConfig(data=2, fsdp=2, tensor=2)
    sharded = Engine(params, cfg, mesh=make_mesh(mesh_cfg), rules=parse_rules(mesh_cfg.rules), batch_size=8,
                     buckets=(8, 16), refill_size=4, chunk_steps=8)
    long = [i for i, p in enumerate(prompts) if len(p) > 8]  # one bucket: one sharded refill to compile
    assert len(long) > 8  # more prompts than slots
    rows, row_limits = [prompts[i] for i in long], [limits[i] for i in long]
    want = engine.generate(rows, PAPER, max_new_tokens=row_limits, schedule="static")
    streamed: dict[int, list[int]] = {i: [] for i in range(len(rows))}
    got = sharded.generate(rows, PAPER, max_new_tokens=row_limits, schedule="continuous", chunk_steps=3,
                           progress=lambda i, new, finish: streamed[i].extend(new))
    assert got.tokens == want.tokens and got.finish_reasons == want.finish_reasons
    assert [streamed[i] for i in range(len(rows))] == want.tokens
    assert 4 in {k[-1] for k in sharded.trace_counts if k[0] == "read_tokens"}  # a chunk's window per row
    layer = sharded.params["layers"][0]
    assert tuple(layer["attn"]["wk"].sharding.spec)[1] == "tensor"  # tensor parallel over KV heads
    state = sharded._init_slots(rows=8, length=8, width=8)
    spec = tuple(state["cache"].k[0].sharding.spec)  # [slots, kv_heads, length, head_dim]
    assert spec[:2] == (("data", "fsdp"), "tensor"), spec
    assert tuple(state["history"].sharding.spec)[0] == ("data", "fsdp")


def test_per_row_limits_and_arguments(setup):
    cfg, params, prompts, limits, engine = setup
    out = engine.generate(prompts[:3], GREEDY_NGRAM, max_new_tokens=[1, 2, 30], schedule="static")
    assert [len(t) for t in out.tokens] == [1, 2, CAP] and set(out.finish_reasons) == {"length"}
    unlimited = engine.generate(prompts[:3], GREEDY_NGRAM, schedule="static").tokens  # the cap for all
    assert [t[:len(o)] for t, o in zip(unlimited, out.tokens)] == out.tokens
    assert engine.generate([], GREEDY_NGRAM, schedule="continuous").tokens == []
    with pytest.raises(ValueError, match="schedule"):
        engine.generate(prompts, GREEDY_NGRAM, schedule="dynamic")
    with pytest.raises(ValueError, match="max_new_tokens"):
        engine.generate(prompts[:2], GREEDY_NGRAM, max_new_tokens=[3])
    with pytest.raises(ValueError, match=">= 1"):
        engine.generate(prompts[:2], GREEDY_NGRAM, max_new_tokens=[3, 0])
    with pytest.raises(ValueError, match="refill_size"):
        Engine(params, cfg, batch_size=4, refill_size=5)
