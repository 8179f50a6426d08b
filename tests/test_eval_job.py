"""The `eval_xinst` job end to end on a tiny random Llama (exported to a Hugging Face directory):
answers in three languages, fidelity, judging against a reference set over a local
OpenAI-compatible server (tests/test_judge.py's), XCOPA and perplexity, report.md + plots +
results.json, whose numbers are checked against the per-item files; a rerun reuses the answers
and pays the judge nothing; a second endpoint as the opponent; bad input as one-line errors.
Inputs come from ../shared/data when it is there (en_seed, XCOPA, UDHR), else from small files
written here."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from data_helpers import SHARED_DATA, tiny_hf_model, write_jsonl
from test_judge import PROMPT_TOKENS, FakeOpenAI
from xinst_jax.config import ConfigError, load_config
from xinst_jax.eval.fidelity import answer_fidelity
from xinst_jax.eval.job import read_prompts, run_eval

LANGS = ["th", "sw", "id"]
N_PROMPTS = 3
PNG = b"\x89PNG\r\n\x1a\n"

FALLBACK_PROMPTS = [
    {"id": "p1", "instruction": "Give three tips for staying healthy."},
    {"id": "p2", "instruction": "Describe the water cycle.", "input": ""},
    {"id": "p3", "instruction": "Summarise the text.", "input": "Rain falls, rivers flow, the sea evaporates."},
]
FALLBACK_XCOPA = {
    "id": {"premise": "Lelaki itu telah menyalakan keran.", "choice1": "Toilet itu telah terisi dengan air.",
           "choice2": "Air telah mengalir dari cerat keran tersebut.", "question": "effect", "label": 1},
    "sw": {"premise": "Mwanamke alistaafu.", "choice1": "Alipata pensheni yake.", "choice2": "Alilipa rehani yake.",
           "question": "effect", "label": 0},
    "th": {"premise": "ผู้ชายเปิดก๊อกนํ้า", "choice1": "ห้องนํ้าเต็มไปด้วยนํ้า", "choice2": "นํ้าไหลออกมาจากพวย",
           "question": "effect", "label": 1},
}
FALLBACK_TEXT = {"th": "มนุษย์ทั้งหลายเกิดมามีอิสระและเสมอภาคกันในเกียรติศักดิ์และสิทธิ",
                 "sw": "Watu wote wamezaliwa huru, hadhi na haki zao ni sawa.",
                 "id": "Semua orang dilahirkan merdeka dan mempunyai martabat dan hak-hak yang sama."}
# reference answers by prompt position: the fake judge scores ours (random text) 5, these 2 / 9 / 5
REFERENCE_WORDS = ["BAD", "GOOD", "OKAY"]  # -> win, loss, tie
EXPECTED = ["win", "loss", "tie"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_hf_model(tmp_path_factory.mktemp("model") / "hf", seed=5)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    """prompts, xcopa dir (4 items per language), held-out text, reference answers, metrics.jsonl."""
    root = tmp_path_factory.mktemp("inputs")
    seed = SHARED_DATA / "en_seed" / "seed_tasks.jsonl"
    prompts = seed if seed.is_file() else write_jsonl(root / "prompts.jsonl", FALLBACK_PROMPTS)
    xcopa = root / "xcopa"
    for lang in LANGS:
        real = SHARED_DATA / "xcopa" / "data" / lang / f"val.{lang}.jsonl"
        rows = ([json.loads(x) for x in real.read_text(encoding="utf-8").splitlines()[:4]] if real.is_file()
                else [dict(FALLBACK_XCOPA[lang], idx=i, label=i % 2) for i in range(4)])
        (xcopa / lang).mkdir(parents=True)
        write_jsonl(xcopa / lang / f"val.{lang}.jsonl", rows)
    udhr = SHARED_DATA / "udhr" / "udhr_articles.jsonl"
    if udhr.is_file():
        held = [r for r in map(json.loads, udhr.read_text(encoding="utf-8").splitlines())
                if r["lang"] in LANGS and r["article"] in ("1", "2")]
        held = [{"id": f"{r['lang']}-{r['article']}", "lang": r["lang"], "text": r["text"][:300]} for r in held]
    else:
        held = [{"id": f"{lang}-{i}", "lang": lang, "text": FALLBACK_TEXT[lang]} for lang in LANGS for i in (1, 2)]
    heldout = write_jsonl(root / "heldout.jsonl", held)
    ids = [p["id"] for p in read_prompts(prompts, N_PROMPTS)]
    reference = write_jsonl(root / "reference.jsonl",
                            [{"id": pid, "lang": lang, "output": f"{REFERENCE_WORDS[i]} jibu {lang}"}
                             for lang in LANGS for i, pid in enumerate(ids)])
    metrics = write_jsonl(root / "metrics.jsonl", [{"step": s, "loss": 5.0 / s} for s in range(1, 21)])
    return {"prompts": prompts, "xcopa": xcopa, "heldout": heldout, "reference": reference, "metrics": metrics,
            "ids": ids, "held": held}


def overrides(tmp_path: Path, model_dir: Path, inputs: dict, *extra: str) -> list[str]:
    return [f"run_dir={tmp_path / 'run'}", f"generate.hf_dir={model_dir}", "generate.tokenizer=bytes",
            "model.dtype=float32", "model.param_dtype=float32", "generate.weight_dtype=", "generate.kv_dtype=",
            "mesh.num_devices=1", "mesh.data=1", "generate.batch_size=4", "generate.max_new_tokens=12",
            "generate.min_new_tokens=4", "generate.prompt_buckets=[256, 512]", "generate.decode_segments=1",
            f"eval.prompts={inputs['prompts']}", f"eval.max_prompts={N_PROMPTS}", f"eval.languages=[{', '.join(LANGS)}]",
            f"eval.metrics={inputs['metrics']}", *extra]


def test_eval_job_end_to_end(tmp_path, model_dir, inputs):
    with FakeOpenAI() as judge:
        judge.fail = [429, 502]  # two retries along the way
        args = overrides(tmp_path, model_dir, inputs, f"eval.reference={inputs['reference']}",
                         f"eval.judge.base_url={judge.base_url}", "eval.judge.backoff_s=0.01",
                         f"eval.xcopa={inputs['xcopa']}", f"eval.perplexity=[{{path: {inputs['heldout']}}}]")
        cfg = load_config("eval_xinst", args)
        results = run_eval(cfg)
        first_requests = len(judge.bodies)
        out = tmp_path / "run" / "eval"
        saved = json.loads((out / "results.json").read_text())
        assert saved["judge"]["per_language"] == results["judge"]["per_language"]

        # ---- answers: every language, every prompt, with the sft prompt
        assert saved["template"] == "sft" and saved["prompts"]["count"] == N_PROMPTS
        answers = {lang: [json.loads(x) for x in (out / "answers" / f"{lang}.jsonl").read_text().splitlines()]
                   for lang in LANGS}
        for lang in LANGS:
            assert [a["id"] for a in answers[lang]] == inputs["ids"]
            assert saved["answers"][lang]["answers"] == N_PROMPTS
            assert all(4 <= a["output_tokens"] <= 12 for a in answers[lang])

        # ---- fidelity: the numbers are what answer_fidelity says of the answers written
        fid = saved["fidelity"]
        for lang in LANGS:
            verdicts = [answer_fidelity(a["output"], lang) for a in answers[lang]]
            row = fid["per_language"][lang]
            assert row["answers"] == N_PROMPTS
            assert row["faithful"] == sum(v["faithful"] for v in verdicts)
            assert row["fidelity"] == round(row["faithful"] / N_PROMPTS, 4)
            assert row["mixed_script"] == sum(v["mixed"] for v in verdicts)
            assert sum(fid["confusion"][lang].values()) == N_PROMPTS
        assert fid["all"]["answers"] == N_PROMPTS * len(LANGS)

        # ---- judge: ours (random text, scored 5) against BAD / GOOD / OKAY references
        jr = saved["judge"]
        for lang in LANGS:
            row = jr["per_language"][lang]
            assert (row["win"], row["loss"], row["tie"], row["unparseable"], row["failed"]) == (1, 1, 1, 0, 0)
            assert row["win_rate"] == row["loss_rate"] == row["tie_rate"] == round(1 / 3, 4)
        verdicts = [json.loads(x) for x in (out / "judge.jsonl").read_text().splitlines()]
        assert len(verdicts) == N_PROMPTS * len(LANGS)
        for v in verdicts:
            assert v["outcome"] == EXPECTED[inputs["ids"].index(v["id"])]
        pairs = N_PROMPTS * len(LANGS)
        usage = jr["usage"]
        assert usage["replies"] == 2 * pairs and usage["requests"] == 2 * pairs + 2 and usage["retries"] == 2
        assert usage["prompt_tokens"] == PROMPT_TOKENS * 2 * pairs and usage["cache_hits"] == 0
        assert first_requests == 2 * pairs + 2
        assert jr["endpoint"]["model"] == "gpt-4" and "api_key" not in json.dumps(jr["endpoint"])

        # ---- XCOPA: acc is the mean of the per-item results, items in the lm-eval format
        items = [json.loads(x) for x in (out / "xcopa.jsonl").read_text().splitlines()]
        assert len(items) == 4 * len(LANGS)
        for lang in LANGS:
            mine = [it for it in items if it["lang"] == lang]
            xr = saved["xcopa"]["per_language"][lang]
            assert xr["n"] == 4 and xr["acc"] == round(sum(it["acc"] for it in mine) / 4, 4)
            for it in mine:
                assert it["pred"] == int(it["loglikelihoods"][1] > it["loglikelihoods"][0])
                assert all(ll < 0 for ll in it["loglikelihoods"])
        assert saved["xcopa"]["split"] == "val" and saved["xcopa"]["add_bos"] is False
        assert saved["xcopa"]["average_acc"] == pytest.approx(
            sum(r["acc"] for r in saved["xcopa"]["per_language"].values()) / len(LANGS), abs=1e-4)

        # ---- perplexity per language from the per-document log-likelihoods
        docs = [json.loads(x) for x in (out / "perplexity.jsonl").read_text().splitlines()]
        assert len(docs) == len(inputs["held"])
        for lang in LANGS:
            mine = [d for d in docs if d["lang"] == lang]
            pr = saved["perplexity"]["per_language"][lang]
            ll, toks = sum(d["loglikelihood"] for d in mine), sum(d["tokens"] for d in mine)
            assert pr["documents"] == len(mine) and pr["tokens"] == toks
            assert pr["token_perplexity"] == pytest.approx(math.exp(-ll / toks), rel=1e-4)
            assert 1.0 < pr["token_perplexity"] < 2 * 512  # a random model: near the vocabulary size, not below 1

        # ---- report and plots
        assert set(saved["plots"]) == {"win_tie_loss", "fidelity", "xcopa", "loss"}
        for name in saved["plots"].values():
            assert (out / name).read_bytes()[:8] == PNG
        report = (out / "report.md").read_text()
        assert "## Judge" in report and "## Language fidelity" in report and "## XCOPA" in report
        assert "| th | 3 | 1 | 1 | 1 |" in report and "![win/tie/loss](win_tie_loss.png)" in report

        # ---- rerun: answers reused, every judge reply from the cache, the same numbers
        again = run_eval(load_config("eval_xinst", args))
        assert len(judge.bodies) == first_requests  # zero requests
        assert sorted(again["answers_reused"]) == sorted(LANGS)
        assert again["judge"]["usage"]["requests"] == 0 and again["judge"]["usage"]["cache_hits"] == 2 * pairs
        assert again["judge"]["usage"]["cached_prompt_tokens"] == PROMPT_TOKENS * 2 * pairs
        assert again["judge"]["per_language"] == saved["judge"]["per_language"]
        assert again["fidelity"] == saved["fidelity"] and again["xcopa"] == saved["xcopa"]

        # ---- other sampling settings in the same directory are refused, naming the key
        with pytest.raises(ConfigError, match="eval.out: .* holds shards of another run"):
            run_eval(load_config("eval_xinst", args + ["generate.temperature=0.5"]))


def test_second_endpoint_as_opponent(tmp_path, model_dir, inputs):
    with FakeOpenAI() as server:
        args = overrides(tmp_path, model_dir, inputs, f"eval.opponent_base_url={server.base_url}",
                         "eval.opponent_model=chatgpt-test", f"eval.judge.base_url={server.base_url}",
                         "eval.languages=[sw]", "eval.xcopa=", "eval.perplexity=[]")
        results = run_eval(load_config("eval_xinst", args))
        out = tmp_path / "run" / "eval"
        opp = [json.loads(x) for x in (out / "answers_opponent" / "sw.jsonl").read_text().splitlines()]
        assert [o["output"] for o in opp] == ["Jibu la mpinzani."] * N_PROMPTS
        asked = [b for b in server.bodies if "<answer1>" not in b["messages"][-1]["content"]]
        assert len(asked) == N_PROMPTS and all(b["model"] == "chatgpt-test" for b in asked)
        assert asked[0]["messages"][-1]["content"].startswith("Given an instruction in English, please generate a "
                                                              "response in Swahili.")
        row = results["judge"]["per_language"]["sw"]
        assert row["tie"] == N_PROMPTS and row["judged"] == N_PROMPTS  # both scored 5 by the fake judge
        assert results["judge"]["opponent"] == f"chatgpt-test at {server.base_url}"
        assert results["judge"]["opponent_usage"]["replies"] == N_PROMPTS
        assert "xcopa" not in results and "perplexity" not in results
        n = len(server.bodies)
        run_eval(load_config("eval_xinst", args))
        assert len(server.bodies) == n  # opponent answers and verdicts both cached


def test_prompt_files(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", FALLBACK_PROMPTS + [{"question_id": 9, "text": "Vicuna style?"}])
    got = read_prompts(path)
    assert got[2]["instruction"] == "Summarise the text.\n\nRain falls, rivers flow, the sea evaporates."
    assert got[1]["instruction"] == "Describe the water cycle." and got[3] == {"id": "9", "instruction": "Vicuna style?"}
    assert len(read_prompts(path, 2)) == 2
    as_list = tmp_path / "p.json"
    as_list.write_text(json.dumps([{"instruction": "A?"}, {"instruction": "B?", "output": "x"}]))
    assert read_prompts(as_list) == [{"id": "1", "instruction": "A?"}, {"id": "2", "instruction": "B?"}]
    seed = SHARED_DATA / "en_seed" / "seed_tasks.jsonl"
    if seed.is_file():
        tasks = read_prompts(seed)
        assert len(tasks) == 175 and tasks[0]["id"] == "seed_task_0"
        with_input = [t for t in tasks if "\n\n" in t["instruction"]]
        assert len(with_input) >= 100
    alpaca = SHARED_DATA / "en_seed" / "alpaca_eval_805_text_davinci_003.json"
    if alpaca.is_file():
        assert len(read_prompts(alpaca)) == 805


@pytest.mark.parametrize("extra, message", [
    (["eval.prompts=/nonexistent/prompts.jsonl"], r"^eval\.prompts: /nonexistent/prompts\.jsonl not found$"),
    (["eval.prompts=BAD"], r"^eval\.prompts: .*bad\.jsonl:2: instruction: missing or empty"),
    (["eval.reference=REF", "eval.opponent_base_url=http://127.0.0.1:9/v1"], r"^eval\.reference and "
                                                                             r"eval\.opponent_base_url: set one"),
    (["eval.reference=REF"], r"^eval\.judge\.base_url: empty, but eval\.reference is set"),
    (["eval.reference=REF", "eval.judge.base_url=https://api.example.com/v1",
      "eval.judge.api_key_env=XINST_TEST_NO_SUCH_KEY"], r"^eval\.judge\.api_key_env: the environment variable "
                                                        r"XINST_TEST_NO_SUCH_KEY is not set"),
    (["eval.opponent_base_url=http://127.0.0.1:9/v1", "eval.judge.base_url=http://127.0.0.1:9/v1"],
     r"^eval\.opponent_model: empty"),
    (["eval.xcopa=EMPTYDIR"], r"^eval\.xcopa: .*: no <lang>/val\.<lang>\.jsonl .* for th, sw, id$"),
    (["eval.languages=[th, xx]"], r"^eval\.languages: .*'xx'"),
    (["eval.prompts=", "eval.xcopa="], r"^eval: nothing to evaluate"),
    (["eval.metrics=/nonexistent/metrics.jsonl"], r"^eval\.metrics: /nonexistent/metrics\.jsonl not found$"),
])
def test_bad_input_is_one_line(tmp_path, inputs, extra, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1, "instruction": "ok"}\n{"id": 2, "instruction": ""}\n')
    (tmp_path / "empty").mkdir()
    subst = {"BAD": str(bad), "REF": str(inputs["reference"]), "EMPTYDIR": str(tmp_path / "empty")}
    extra = [x.split("=", 1)[0] + "=" + subst[x.split("=", 1)[1]] if x.split("=", 1)[1] in subst else x
             for x in extra]
    args = [f"run_dir={tmp_path / 'run'}", f"eval.prompts={inputs['prompts']}", "eval.xcopa=",
            "eval.perplexity=[]", f"eval.languages=[{', '.join(LANGS)}]"] + extra
    with pytest.raises(ConfigError) as e:
        run_eval(load_config("eval_xinst", args))
    assert "\n" not in str(e.value)
    assert re.search(message, str(e.value)), str(e.value)
