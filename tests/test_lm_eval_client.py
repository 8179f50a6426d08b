"""A peer's client as the test of the scoring path: lm-evaluation-harness's `local-completions`
model against our real server on loopback scores XCOPA (local files, lm-eval's own xcopa prompts:
xinst_jax/eval/lm_eval_tasks) exactly as our eval_xinst XCOPA does on the same model, item for
item. lm-eval counts tokens with our server's tokenizer (`tokenizer_backend=remote`: /tokenize),
so both sides split context and continuation into the same tokens. Also: the endpoints lm-eval's
remote tokenizer needs, echo logprobs lined up with the text, and the one-token fast path."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import numpy as np
import pytest

lm_eval = pytest.importorskip("lm_eval")

from data_helpers import SHARED_DATA, tiny_hf_model  # noqa: E402
from test_serve import start_server  # noqa: E402
from xinst_jax.data.tokenizer import ByteTokenizer  # noqa: E402

XCOPA = SHARED_DATA / "xcopa" / "data"
LANGS = ("id", "th")  # a Latin-script language, and Thai: three bytes per letter, no spaces
LIMIT = 20
TEXT = "ผู้ชายเปิดก๊อกน้ำ, Kiswahili 🙂"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_hf_model(tmp_path_factory.mktemp("scored") / "hf", seed=5)


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    proc, url = start_server(model_dir, tmp_path_factory.mktemp("serve"))
    yield url
    proc.terminate()
    proc.wait(timeout=60)


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def test_lm_eval_finds_and_uses_our_tokenizer(server):
    from lm_eval.utils import RemoteTokenizer, check_remote_tokenizer_support

    base = server + "/v1/completions"
    assert check_remote_tokenizer_support(base)  # lm-eval's default backend ("auto") picks "remote"
    remote, tok = RemoteTokenizer(base), ByteTokenizer()
    assert (remote.bos_token_id, remote.eos_token_id) == (tok.bos_id, tok.eos_id)
    assert remote.encode(TEXT) == tok.encode(TEXT, add_special_tokens=False)
    assert remote.encode("</s> x") == tok.encode("</s> x", add_special_tokens=False)  # only a bare name is special
    # with special tokens: exactly what a completion with this text as its prompt feeds the model
    assert post(server + "/tokenize", {"prompt": TEXT})["tokens"] == tok.encode(TEXT)
    assert remote.decode(tok.encode(TEXT)) == TEXT
    with pytest.raises(urllib.error.HTTPError) as e:
        post(server + "/detokenize", {"tokens": [999999]})
    assert e.value.code == 400 and json.loads(e.value.read())["error"]["param"] == "tokens"


def test_echo_logprobs_line_up_with_the_text(server):
    out = post(server + "/v1/completions", {"prompt": TEXT, "max_tokens": 0, "echo": True, "logprobs": 1})
    choice = out["choices"][0]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(ByteTokenizer().encode(TEXT))  # BOS, then one token per byte
    assert "".join(lp["tokens"]) == choice["text"] == TEXT and "\ufffd" not in "".join(lp["tokens"])
    for i, piece in enumerate(lp["tokens"]):
        assert TEXT[lp["text_offset"][i]:lp["text_offset"][i] + len(piece)] == piece
    assert lp["token_logprobs"][0] is None and all(x < 0 for x in lp["token_logprobs"][1:])


def test_one_greedy_token_comes_from_the_scoring_pass(server):
    """max_tokens 1 + logprobs (lm-eval's request) takes the argmax of the scoring pass; with
    max_tokens 2 the engine generates: the first token and every log p agree."""
    for prompt in ([1, 72, 105, 33], ByteTokenizer().encode(TEXT)):
        ask = {"prompt": prompt, "echo": True, "logprobs": 1, "temperature": 0}
        fast = post(server + "/v1/completions", dict(ask, max_tokens=1))["choices"][0]["logprobs"]
        slow = post(server + "/v1/completions", dict(ask, max_tokens=2))["choices"][0]["logprobs"]
        n = len(prompt) + 1
        for a, b in zip(fast["top_logprobs"][1:], slow["top_logprobs"][1:n], strict=True):
            assert a.keys() == b.keys() and list(a.values()) == pytest.approx(list(b.values()), abs=1e-5)
        # [1:n] ends with the generated token: the engine's greedy choice has the scoring pass's log p
        np.testing.assert_allclose(fast["token_logprobs"][1:], slow["token_logprobs"][1:n], rtol=1e-5, atol=1e-5)


def test_each_xcopa_task_reads_its_own_language(tmp_path):
    """The six task files share one template (`include:`) and set only their task name, language
    and prompt: each task must read its own language's file and prompt with that language's
    connectors (lm-eval's xcopa_<lang> functions), with the template's settings."""
    from lm_eval.tasks import TaskManager, get_task_dict
    from lm_eval.tasks.xcopa import utils as xcopa_utils

    from xinst_jax.eval.benchmarks import LM_EVAL_TASKS, XCOPA_CONNECTORS

    langs = ("id", "sw", "ta", "th", "tr", "vi")
    for lang in langs:  # one cause and one effect item per language, each naming its language
        (tmp_path / lang).mkdir()
        (tmp_path / lang / f"val.{lang}.jsonl").write_text("".join(
            json.dumps({"premise": f"Premise {lang} {q}.", "choice1": "Alpha", "choice2": "Beta", "question": q,
                        "label": label}) + "\n" for q, label in (("cause", 0), ("effect", 1))))
    tasks = TaskManager(include_defaults=False, include_path=str(LM_EVAL_TASKS), metadata={"xcopa_dir": str(tmp_path)})
    (group,) = get_task_dict(["xinst_xcopa"], tasks).values()
    assert sorted(group) == [f"xinst_xcopa_{lang}" for lang in langs]
    for lang in langs:
        task = group[f"xinst_xcopa_{lang}"]
        docs = list(task.validation_docs())
        assert [d["premise"] for d in docs] == [f"Premise {lang} cause.", f"Premise {lang} effect."], lang
        prompts = [task.doc_to_text(d) for d in docs]
        assert prompts == [getattr(xcopa_utils, f"doc_to_text_{lang}")(d) for d in docs], lang
        assert [p.rsplit(" ", 1)[-1] for p in prompts] == [XCOPA_CONNECTORS[lang][q].rsplit(" ", 1)[-1]
                                                           for q in ("cause", "effect")], lang
        assert [task.doc_to_choice(d) for d in docs] == [["alpha", "beta"]] * 2
        assert [task.doc_to_target(d) for d in docs] == [0, 1]
        c = task.config
        assert (c.output_type, c.validation_split, [m["metric"] for m in c.metric_list]) == (
            "multiple_choice", "validation", ["acc"])


@pytest.mark.skipif(not XCOPA.is_dir(), reason="../shared/data/xcopa not present")
def test_lm_eval_on_our_server_scores_xcopa_as_we_do(server, model_dir, monkeypatch):
    import lm_eval.evaluator
    from lm_eval.tasks import TaskManager

    from xinst_jax.config import model_preset
    from xinst_jax.convert.hf import import_hf
    from xinst_jax.eval.benchmarks import LM_EVAL_TASKS, read_xcopa, score_xcopa, xcopa_summary
    from xinst_jax.eval.job import XCOPA_ADD_BOS
    from xinst_jax.infer.generate import Engine

    # simple_evaluate records the environment (imports torch, runs its collect_env: seconds here);
    # nothing compared below reads it.
    monkeypatch.setattr(lm_eval.evaluator, "add_env_info", lambda results: None)
    assert not XCOPA_ADD_BOS  # as lm-eval's remote tokenizer: contexts without BOS
    tasks = TaskManager(include_defaults=False, include_path=str(LM_EVAL_TASKS), metadata={"xcopa_dir": str(XCOPA)})
    theirs = lm_eval.simple_evaluate(
        model="local-completions", tasks=[f"xinst_xcopa_{lang}" for lang in LANGS], task_manager=tasks,
        model_args=f"model=xinst,base_url={server}/v1/completions,tokenizer_backend=remote,batch_size=8,"
                   "max_retries=1",
        limit=LIMIT, log_samples=True, torch_random_seed=None, bootstrap_iters=0)
    cfg, params = import_hf(model_dir, model_preset("tiny"))
    engine = Engine(params, cfg, batch_size=8)
    for lang in LANGS:
        docs = read_xcopa(XCOPA / lang / f"val.{lang}.jsonl", lang)[:LIMIT]
        ours = score_xcopa(engine, ByteTokenizer(), docs, lang, XCOPA_ADD_BOS)
        samples = sorted(theirs["samples"][f"xinst_xcopa_{lang}"], key=lambda s: s["doc_id"])
        assert [s["doc_id"] for s in samples] == list(range(LIMIT))
        for sample, item in zip(samples, ours):
            # lm-eval's prompt and choices (its own xcopa functions) are the ones benchmarks.py writes
            assert [tuple(a) for a in sample["arguments"]] == [(item["context"], " " + c) for c in item["choices"]]
            lls = [resp[0] for resp in sample["filtered_resps"]]
            np.testing.assert_allclose(lls, item["loglikelihoods"], rtol=1e-5, atol=1e-3)
            assert int(np.argmax(lls)) == item["pred"] and sample["acc"] == item["acc"]
        acc = theirs["results"][f"xinst_xcopa_{lang}"]["acc,none"]
        print(f"\nXCOPA {lang}, first {LIMIT} validation items: lm-eval via serve {acc:.2f}, "
              f"our score_xcopa {xcopa_summary(ours)['acc']:.2f}")
        assert acc == pytest.approx(xcopa_summary(ours)["acc"], abs=1e-9)
