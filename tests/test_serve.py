"""The `serve` job, started for real on loopback and spoken to with the `openai` client: plain,
streamed, concurrent (batched together), echo + logprobs against the engine's own scoring,
malformed requests (4xx naming the field), a full queue (503 at once), SIGTERM draining."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

openai = pytest.importorskip("openai")

from data_helpers import tiny_hf_model  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
ENTRY = REPO / "launch" / "tpu_run.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_hf_model(tmp_path_factory.mktemp("served") / "hf", seed=5)


def start_server(model_dir: Path, tmp: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    args = [sys.executable, str(ENTRY), "--config", "serve_xinst", "--set", f"run_dir={tmp / 'run'}",
            "--set", f"generate.hf_dir={model_dir}", "--set", "generate.tokenizer=bytes",
            "--set", "model.preset=tiny", "--set", f"serve.port={port}", "--set", "mesh.num_devices=1",
            "--set", "mesh.fsdp=1", "--set", "generate.batch_size=8", *[x for e in extra for x in ("--set", e)]]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(proc.stdout.read())
        try:
            with urllib.request.urlopen(url + "/health", timeout=1) as r:
                if json.loads(r.read())["status"] == "ok":
                    return proc, url
        except (urllib.error.URLError, ConnectionError, OSError):
            time.sleep(0.2)
    proc.kill()
    raise AssertionError("the server did not come up")


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    proc, url = start_server(model_dir, tmp_path_factory.mktemp("serve"), "serve.batch_wait_ms=200")
    yield url
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)


def client(url: str):
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def test_models_completions_and_chat(server):
    c = client(server)
    assert [m.id for m in c.models.list().data] == ["xinst"]
    r = c.completions.create(model="xinst", prompt="Habari ya asubuhi", max_tokens=8, temperature=0)
    assert len(r.choices) == 1 and r.usage.completion_tokens <= 8 and r.choices[0].finish_reason in ("stop", "length")
    again = c.completions.create(model="xinst", prompt="Habari ya asubuhi", max_tokens=8, temperature=0)
    assert again.choices[0].text == r.choices[0].text  # greedy: the same text
    seeded = [c.completions.create(model="xinst", prompt=["a", "b"], max_tokens=6, temperature=0.9, seed=3, n=2)
              for _ in range(2)]
    assert [x.text for x in seeded[0].choices] == [x.text for x in seeded[1].choices]
    assert len(seeded[0].choices) == 4 and sorted(x.index for x in seeded[0].choices) == [0, 1, 2, 3]
    ids = c.completions.create(model="xinst", prompt=[1, 72, 105], max_tokens=4, temperature=0)
    assert ids.usage.prompt_tokens == 3
    stop = c.completions.create(model="xinst", prompt="Habari ya asubuhi", max_tokens=8, temperature=0,
                                stop=[r.choices[0].text[2:4]]) if len(r.choices[0].text) >= 4 else None
    if stop is not None:
        assert stop.choices[0].text == r.choices[0].text[:2 + r.choices[0].text[2:].find(r.choices[0].text[2:4])]
        assert stop.choices[0].finish_reason == "stop"
    chat = c.chat.completions.create(model="xinst", messages=[{"role": "user", "content": "Describe Dar es Salaam."}],
                                     max_tokens=6, temperature=0, extra_body={"language": "sw"})
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens <= 6
    # the chat prompt is the sft template with the language sentence
    from xinst_jax.data.templates import render_prompt
    from xinst_jax.data.tokenizer import ByteTokenizer
    want = len(ByteTokenizer().encode(render_prompt("sft", {"instruction": "Describe Dar es Salaam.", "lang": "sw"})))
    assert chat.usage.prompt_tokens == want


def test_streaming_equals_the_plain_response(server):
    c = client(server)
    plain = c.chat.completions.create(model="xinst", messages=[{"role": "user", "content": "Sema kitu."}],
                                      max_tokens=10, temperature=0, extra_body={"language": "sw"})
    stream = c.chat.completions.create(model="xinst", messages=[{"role": "user", "content": "Sema kitu."}],
                                       max_tokens=10, temperature=0, stream=True, extra_body={"language": "sw"})
    pieces, finish = [], None
    for chunk in stream:
        for ch in chunk.choices:
            pieces.append(ch.delta.content or "")
            finish = ch.finish_reason or finish
    assert "".join(pieces) == plain.choices[0].message.content and finish == plain.choices[0].finish_reason
    raw = urllib.request.urlopen(urllib.request.Request(
        server + "/v1/completions", data=json.dumps({"prompt": "x", "max_tokens": 3, "stream": True}).encode(),
        headers={"Content-Type": "application/json"}), timeout=60).read().decode()
    assert raw.rstrip().endswith("data: [DONE]") and raw.count("data: ") >= 3


def test_concurrent_requests_are_batched_together(server):
    c = client(server)
    before = get_json(server + "/health")["batches"]
    prompts = [f"prompt number {i}" for i in range(6)]
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        outs = list(pool.map(lambda p: c.completions.create(model="xinst", prompt=p, max_tokens=5, temperature=0),
                             prompts))
    batches = get_json(server + "/health")["batches"] - before
    assert batches < len(prompts), f"{len(prompts)} concurrent requests ran in {batches} engine batches"
    alone = [c.completions.create(model="xinst", prompt=p, max_tokens=5, temperature=0) for p in prompts[:2]]
    assert [o.choices[0].text for o in outs[:2]] == [a.choices[0].text for a in alone]


def test_echo_logprobs_match_the_engine(server, model_dir):
    from xinst_jax.config import model_preset
    from xinst_jax.convert.hf import import_hf
    from xinst_jax.data.tokenizer import ByteTokenizer
    from xinst_jax.infer.generate import Engine

    c = client(server)
    text = "Kila mtu ana haki"
    r = c.completions.create(model="xinst", prompt=text, max_tokens=0, echo=True, logprobs=1, temperature=0)
    lp = r.choices[0].logprobs
    ids = ByteTokenizer().encode(text)
    assert len(lp.tokens) == len(ids) and lp.token_logprobs[0] is None and r.choices[0].text == text
    cfg, params = import_hf(model_dir, model_preset("tiny"))
    ref = Engine(params, cfg, batch_size=1).score([ids[:1]], [ids[1:]])
    np.testing.assert_allclose(lp.token_logprobs[1:], ref.token_logprobs[0], atol=1e-5)
    for tok_lp, top in zip(lp.token_logprobs[1:], lp.top_logprobs[1:]):
        assert max(top.values()) >= tok_lp - 1e-6


@pytest.mark.parametrize("body, status, param", [
    ({"prompt": "x", "temperature": 5}, 400, "temperature"),
    ({"prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ({"prompt": "x", "n": 0}, 400, "n"),
    ({"prompt": "x", "stop": [1]}, 400, "stop"),
    ({"prompt": [999999]}, 400, "prompt"),
    ({}, 400, "prompt"),
    ({"prompt": "x", "model": "gpt-5"}, 404, "model"),
])
def test_malformed_requests_name_the_field(server, body, status, param):
    req = urllib.request.Request(server + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    assert e.value.code == status
    err = json.loads(e.value.read())["error"]
    assert err["param"] == param and err["message"] and err["type"]


def test_malformed_chat_and_json(server):
    c = client(server)
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="xinst", messages=[{"role": "user", "content": "x"}],
                                  extra_body={"language": "xx"})
    assert e.value.body["param"] == "language"
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="xinst", messages=[{"role": "robot", "content": "x"}])
    assert e.value.body["param"] == "messages[0]"
    req = urllib.request.Request(server + "/v1/chat/completions", data=b"{not json",
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=30)
    assert err.value.code == 400


def test_full_queue_answers_503_and_sigterm_drains(model_dir, tmp_path):
    proc, url = start_server(model_dir, tmp_path, "serve.max_queue=1", "serve.batch_wait_ms=0",
                             "serve.max_tokens_limit=512")
    c = client(url)
    try:
        results: dict = {}

        def long_request():
            results["long"] = c.completions.create(model="xinst", prompt="long", max_tokens=400, temperature=0)

        t = threading.Thread(target=long_request)
        t.start()
        time.sleep(1.0)  # the long request is in the engine now
        statuses = []

        def short(i):  # other settings than the long request's: they cannot join it, so they queue
            try:
                c.completions.create(model="xinst", prompt=f"s{i}", max_tokens=2, temperature=0.5)
                statuses.append(200)
            except openai.APIStatusError as e:
                statuses.append(e.status_code)

        started = time.time()
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            list(pool.map(short, range(4)))
        assert 503 in statuses, statuses
        # SIGTERM while the long request may still run: it finishes, then the server exits cleanly
        t2 = threading.Thread(target=long_request)
        t2.start()
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        t2.join(timeout=300)
        t.join(timeout=300)
        assert results["long"].choices[0].text is not None and time.time() - started < 300
        assert proc.wait(timeout=120) == 0
    finally:
        proc.kill()


def test_our_server_as_the_judges_endpoint(server, tmp_path):
    """The judge (eval/judge.py) over our own server: both orders asked, replies that hold no
    scores (a random model) counted as unparseable, tokens counted, a rerun served from the cache."""
    from xinst_jax.eval.judge import ChatClient, Judge, PairItem, ReplyCache, summarize

    items = [PairItem("q1", "sw", "Describe a market.", "Soko ni mahali pa biashara.", "Soko."),
             PairItem("q2", "th", "Name a fruit.", "กล้วย", "ส้ม")]

    def run():
        client = ChatClient(server + "/v1", "xinst", "", retries=1, backoff_s=0.01,
                            cache=ReplyCache(tmp_path / "cache.jsonl"))
        return client, Judge(client, max_tokens=8, concurrency=2).judge(items)

    client, verdicts = run()
    assert [v.id for v in verdicts] == ["q1", "q2"]
    for v in verdicts:
        assert v.review_ours_first is not None and v.review_theirs_first is not None  # both orders answered
        if v.ours_first is None or v.theirs_first is None:
            assert v.outcome == "unparseable"
    stats = client.stats.to_dict()
    assert stats["requests"] == 4 and stats["completion_tokens"] > 0 and stats["prompt_tokens"] > 0
    summary = summarize(verdicts)
    assert summary["all"]["unparseable"] == sum(v.outcome == "unparseable" for v in verdicts)
    again_client, again = run()
    assert [v.outcome for v in again] == [v.outcome for v in verdicts]
    assert again_client.stats.to_dict()["requests"] == 0


@pytest.mark.parametrize("language", ["sw", None])
def test_chat_prompt_is_the_trainers_prompt_in_either_style(language):
    """The chat route prompts as the model was trained: for `data.sft_assistant_style` off and on,
    its tokens are the prompt part of the trainer Task's example for the same instruction and
    language (tokens, not text: BOS and tokenization included), and the two styles differ."""
    from xinst_jax.config import load_config
    from xinst_jax.data.templates import prompt_without_language
    from xinst_jax.data.tokenizer import ByteTokenizer
    from xinst_jax.serve.server import Service, chat_prompt_tokens
    from xinst_jax.tasks import Task

    tok = ByteTokenizer()
    instruction = "Describe Dar es Salaam."
    body = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "earlier"},
                         {"role": "assistant", "content": "ok"}, {"role": "user", "content": instruction}]}
    if language:
        body["language"] = language
    got = {}
    for style in (False, True):
        cfg = load_config("serve_xinst", [f"data.sft_assistant_style={str(style).lower()}", "generate.tokenizer=bytes"])
        service = Service(cfg, engine=None, tokenizer=tok, model=None, batcher=None, base_settings=None)
        got[style] = chat_prompt_tokens(service, body)
        trainer = Task.from_data_config(cfg.data, tok)
        if language:
            want = trainer.encode({"instruction": instruction, "output": "Jiji kubwa.", "lang": language}).prompt
        else:  # no language: the trainer's template without it, tokenized as the Task tokenizes prompts
            want = list(tok.prefix_ids) + tok.encode(prompt_without_language(trainer.name, instruction),
                                                     add_special_tokens=False)
        assert got[style] == want, style
    assert got[False] != got[True]
    assert "AI assistant" in tok.decode(got[True]) and "AI assistant" not in tok.decode(got[False])
    assert ("Answer in Swahili" in tok.decode(got[False])) == (language == "sw")

