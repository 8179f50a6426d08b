"""Log-likelihood benchmarks: XCOPA in lm-evaluation-harness's format (contexts, connectors,
choices, the tokenisation split, accuracy by argmax, stderr), lm-eval's rolling windows for
perplexity, and both scored through the engine: per-item log-likelihoods equal a plain forward
pass, whatever the batch size and the mesh. Real XCOPA is skipped without ../shared."""

from __future__ import annotations

import math
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data_helpers import SHARED_DATA
from xinst_jax.config import ConfigError, MeshConfig, ModelConfig
from xinst_jax.data.tokenizer import ByteTokenizer
from xinst_jax.eval.benchmarks import (XCOPA_CONNECTORS, PerplexityDoc, encode_pair, mean_stderr,
                                       perplexity_summary, read_xcopa, rolling_windows, score_perplexity, score_xcopa,
                                       xcopa_choices, xcopa_context, xcopa_requests, xcopa_summary)
from xinst_jax.infer.generate import Engine
from xinst_jax.model.llama import forward, init_params
from xinst_jax.sharding import make_mesh, parse_rules

DOC_ID = {"premise": "Lelaki itu telah menyalakan keran.", "choice1": "Toilet itu telah terisi dengan air.",
          "choice2": "Air telah mengalir dari cerat keran tersebut.", "question": "effect", "label": 1, "idx": 0}
DOC_TH = {"premise": "ผู้หญิงคนนั้นเกษียณแล้ว", "choice1": "เธอได้รับเงินบำนาญ", "choice2": "เธอจ่ายค่าจำนองบ้าน",
          "question": "effect", "label": 0, "idx": 3}
DOC_SW = {"premise": "Mwanamke alistaafu.", "choice1": "Alipata pensheni yake.", "choice2": "Alilipa rehani yake.",
          "question": "cause", "label": 0, "idx": 7}

CFG = ModelConfig(vocab_size=259, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64,
                  init_std=0.2, max_seq_len=512)


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, jax.random.key(7))


REF_LEN = 256
_forward = jax.jit(lambda p, t, pos, seg: jax.nn.log_softmax(forward(p, t, pos, seg, CFG), axis=-1))


def reference_loglik(params, prompt: list[int], cont: list[int]) -> float:
    """Sum of log p(continuation | prompt) from one plain forward pass (right-padded to one
    length, so it compiles once: attention is causal, the padding comes after every target)."""
    seq = prompt + cont
    tokens = np.zeros((1, REF_LEN), np.int32)
    tokens[0, :len(seq)] = seq
    pos = np.arange(REF_LEN, dtype=np.int32)[None]
    logp = np.asarray(_forward(params, jnp.asarray(tokens), jnp.asarray(pos), jnp.ones((1, REF_LEN), jnp.int32)))
    targets = np.asarray(seq[1:])
    picked = logp[0, np.arange(len(seq) - 1), targets]
    return float(picked[len(prompt) - 1:].sum())


# --------------------------------------------------------------------------- format


def test_xcopa_format_is_lm_evals():
    assert xcopa_context(DOC_ID, "id") == "Lelaki itu telah menyalakan keran maka"
    assert xcopa_choices(DOC_ID) == ["toilet itu telah terisi dengan air.", "air telah mengalir dari cerat keran "
                                                                            "tersebut."]
    assert xcopa_context(DOC_SW, "sw") == "Mwanamke alistaafu kwa sababu"
    # Thai premises have no final period: lm-eval drops the last character all the same
    assert xcopa_context(DOC_TH, "th") == "ผู้หญิงคนนั้นเกษียณแล้" + " ดังนั้น"
    assert set(XCOPA_CONNECTORS) == {"et", "ht", "it", "id", "qu", "sw", "zh", "ta", "th", "tr", "vi"}
    for lang in ("id", "sw", "ta", "th", "tr", "vi"):
        assert set(XCOPA_CONNECTORS[lang]) == {"cause", "effect"}
    assert XCOPA_CONNECTORS["tr"] == {"cause": "çünkü", "effect": "bu yüzden"}
    assert XCOPA_CONNECTORS["vi"] == {"cause": "bởi vì", "effect": "vì vậy"}


def test_encode_pair_splits_like_lm_eval():
    tok = ByteTokenizer()
    ctx, cont = encode_pair(tok, "Air mengalir maka", " air.")
    assert ctx == tok.encode("Air mengalir maka", add_special_tokens=False)  # no BOS: lm-eval's default
    assert cont == tok.encode(" air.", add_special_tokens=False)
    ctx_bos, cont_bos = encode_pair(tok, "Air mengalir maka", " air.", add_bos=True)
    assert ctx_bos == [tok.bos_id] + ctx and cont_bos == cont
    # trailing spaces of the context move to the continuation
    ctx2, cont2 = encode_pair(tok, "Air mengalir maka ", "air.")
    assert (ctx2, cont2) == (ctx, cont)
    prompts, conts = xcopa_requests(tok, [DOC_ID, DOC_SW], "id")
    assert len(prompts) == 4 and prompts[0] == prompts[1]
    assert tok.decode(conts[1]) == " air telah mengalir dari cerat keran tersebut."


def test_accuracy_is_argmax_of_summed_loglik():
    """With a stub engine: the prediction is the choice with the larger sum; a tie goes to choice1."""
    sums = {0: [-5.0, -3.0], 1: [-2.0, -9.0], 2: [-4.0, -4.0]}

    class Stub:
        def score(self, prompts, conts):
            flat = [s for i in range(len(prompts) // 2) for s in sums[i]]
            n = len(prompts)
            return SimpleNamespace(sum_logprob=np.asarray(flat), is_greedy=np.zeros(n, bool),
                                   num_tokens=np.asarray([len(c) for c in conts]), truncated=np.zeros(n, bool))

    docs = [dict(DOC_ID, label=1, idx=0), dict(DOC_ID, label=1, idx=1), dict(DOC_ID, label=0, idx=2)]
    items = score_xcopa(Stub(), ByteTokenizer(), docs, "id")
    assert [it["pred"] for it in items] == [1, 0, 0]
    assert [it["acc"] for it in items] == [1, 0, 1]
    assert items[0]["loglikelihoods"] == [-5.0, -3.0]
    s = xcopa_summary(items)
    assert s["n"] == 3 and s["acc"] == round(2 / 3, 4)
    assert s["acc_stderr"] == round(math.sqrt((2 * (1 / 3) ** 2 + (2 / 3) ** 2) / 2) / math.sqrt(3), 4)
    assert mean_stderr([1.0]) is None


def test_bad_xcopa_lines_name_file_and_line(tmp_path):
    path = tmp_path / "val.id.jsonl"
    path.write_text('{"premise": "A.", "choice1": "B", "choice2": "C", "question": "effect", "label": 0}\n'
                    '{"premise": "A.", "choice1": "B", "choice2": "C", "question": "why", "label": 0}\n')
    with pytest.raises(ConfigError, match=r"val\.id\.jsonl:2: question:"):
        read_xcopa(path, "id")
    path.write_text('{"premise": "A.", "choice1": "B", "question": "effect", "label": 0}\n')
    with pytest.raises(ConfigError, match=r"val\.id\.jsonl:1: choice2: missing"):
        read_xcopa(path, "id")
    path.write_text("not json\n")
    with pytest.raises(ConfigError, match=r":1: not a JSON line"):
        read_xcopa(path, "id")
    with pytest.raises(ConfigError, match="XCOPA has no language 'fi'"):
        read_xcopa(path, "fi")


def test_rolling_windows_are_lm_evals():
    toks = list(range(1, 11))
    wins = rolling_windows(toks, prefix=0, max_seq_len=4)
    assert wins == [([0], [1, 2, 3, 4]), ([4], [5, 6, 7, 8]), ([6, 7, 8], [9, 10])]
    assert [t for _, c in wins for t in c] == toks
    assert all(len(a) + len(b) <= 5 for a, b in wins)
    assert rolling_windows([5, 6], prefix=1, max_seq_len=8) == [([1], [5, 6])]
    assert rolling_windows([], prefix=1, max_seq_len=8) == []


# --------------------------------------------------------------------------- through the engine


def test_xcopa_loglik_equals_a_plain_forward_on_any_batch_and_mesh(params):
    tok = ByteTokenizer()
    docs = [DOC_ID, dict(DOC_ID, question="cause", idx=1), dict(DOC_ID, label=0, idx=2)]
    prompts, conts = xcopa_requests(tok, docs, "id")
    one = score_xcopa(Engine(params, CFG, batch_size=8, buckets=(128,)), tok, docs, "id")
    for i, it in enumerate(one):
        for j in range(2):
            ref = reference_loglik(params, prompts[2 * i + j], conts[2 * i + j])
            assert it["loglikelihoods"][j] == pytest.approx(ref, rel=1e-5, abs=1e-4)
            assert it["num_tokens"][j] == len(conts[2 * i + j])
    mesh = make_mesh(MeshConfig(data=2, fsdp=1, tensor=1, num_devices=2))
    sharded = Engine(params, CFG, batch_size=2, buckets=(64, 128), mesh=mesh, rules=parse_rules(MeshConfig().rules))
    two = score_xcopa(sharded, tok, docs, "id")
    for a, b in zip(one, two):
        np.testing.assert_allclose(a["loglikelihoods"], b["loglikelihoods"], rtol=1e-5, atol=1e-4)
        assert a["pred"] == b["pred"]


def test_perplexity_rolling_covers_every_token(params):
    tok = ByteTokenizer()
    docs = [PerplexityDoc("a", "sw", "Watu wote wamezaliwa huru, hadhi na haki zao ni sawa."),
            PerplexityDoc("b", "th", "มนุษย์ทั้งหลายเกิดมามีอิสระ"), PerplexityDoc("c", "sw", "Kila mtu ana haki.")]
    engine = Engine(params, CFG, batch_size=4, buckets=(32, 128))
    small = score_perplexity(engine, tok, docs, max_seq_len=16)  # several windows per document
    whole = score_perplexity(engine, tok, docs)  # one window each (the largest bucket - 1 = 127 tokens)
    for s, w, d in zip(small, whole, docs):
        n = len(d.text.encode("utf-8"))
        assert s["tokens"] == w["tokens"] == n and s["bytes"] == n
        assert w["windows"] == 1 and s["windows"] == math.ceil(n / 16)
        toks = tok.encode(d.text, add_special_tokens=False)
        assert w["loglikelihood"] == pytest.approx(reference_loglik(params, [tok.bos_id], toks), rel=1e-5)
        assert s["loglikelihood"] < 0
    summary = perplexity_summary(whole)
    sw = summary["sw"]
    ll = whole[0]["loglikelihood"] + whole[2]["loglikelihood"]
    assert sw["documents"] == 2 and sw["tokens"] == whole[0]["tokens"] + whole[2]["tokens"]
    assert sw["token_perplexity"] == pytest.approx(math.exp(-ll / sw["tokens"]), rel=1e-5)
    assert sw["bits_per_byte"] == pytest.approx(-ll / sw["bytes"] / math.log(2), rel=1e-5)
    assert sw["words"] == 10 + 4 and summary["th"]["words"] == 1  # Thai writes no spaces between words


@pytest.mark.skipif(not (SHARED_DATA / "xcopa").is_dir(), reason="../shared/data/xcopa not present")
def test_real_xcopa_scored_in_six_languages(params):
    tok = ByteTokenizer()
    engine = Engine(params, CFG, batch_size=32, buckets=(128, 512))
    for lang in ("id", "sw", "ta", "th", "tr", "vi"):
        docs = read_xcopa(SHARED_DATA / "xcopa" / "data" / lang / f"val.{lang}.jsonl", lang)
        assert len(docs) == 100
        items = score_xcopa(engine, tok, docs[:10] if lang != "id" else docs, lang)
        assert len(items) == (100 if lang == "id" else 10)
        assert all(all(ll < 0 and math.isfinite(ll) for ll in it["loglikelihoods"]) for it in items)
        assert not any(it["truncated"] for it in items)
        s = xcopa_summary(items)
        assert 0.0 <= s["acc"] <= 1.0 and s["acc"] == pytest.approx(np.mean([it["acc"] for it in items]), abs=1e-4)
        assert all(it["context"].endswith(tuple(XCOPA_CONNECTORS[lang].values())) for it in items)
