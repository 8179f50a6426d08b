"""The judge over a real HTTP socket: a local server speaking OpenAI's chat-completions JSON with
canned verdicts, 429s and 5xx. Asserts both answer orders are asked, the win / tie / loss rule,
unparseable verdicts counted (never scored), retries with backoff, the cache (a second run sends
no request), and token counts."""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from xinst_jax.eval.judge import (EVAL_PROMPT, SYSTEM_PROMPT, ChatClient, EndpointError, Judge, PairItem, ReplyCache,
                                  combine, judge_messages, parse_score, parse_scores, summarize)

PROMPT_TOKENS, COMPLETION_TOKENS = 100, 7


def _answers(content: str) -> tuple[str, str]:
    a1 = re.search(r"<answer1>\n(.*?)\n</answer1>", content, re.DOTALL).group(1)
    a2 = re.search(r"<answer2>\n(.*?)\n</answer2>", content, re.DOTALL).group(1)
    return a1, a2


def canned_score(answer: str, position: int) -> int:
    """GOOD 9, OKAY 5, BAD 2; SLY scores 9 as answer 1 and 5 as answer 2 (a position-sensitive answer)."""
    if answer.startswith("SLY"):
        return 9 if position == 1 else 5
    words = answer.split()
    return {"GOOD": 9, "OKAY": 5, "BAD": 2}.get(words[0] if words else "", 5)


def canned_review(content: str) -> str:
    """What the fake judge says about a judging prompt."""
    if "<answer1>" not in content:  # an opponent request: answer something in the language
        return "Jibu la mpinzani."
    a1, a2 = _answers(content)
    if "GARBLE" in a1 + a2:
        return "Answer 1 is clearly better, I would give it a nine."  # no tags: unparseable
    if "HALF" in a1 + a2:
        return "<score1>7</score1> and answer 2 gets <score2>ten</score2>"
    if "BIASED" in a1 + a2:  # a judge that always prefers the first answer
        return "<score1>8</score1><score2>3</score2>"
    return f"<score1> {canned_score(a1, 1)} </score1>\n<score2>{canned_score(a2, 2)}</score2>"


class FakeOpenAI:
    """A threaded HTTP server on 127.0.0.1 answering POST /v1/chat/completions. `fail` is a queue of
    HTTP statuses answered (in order) before any canned reply; 429s carry Retry-After."""

    def __init__(self, retry_after: str = "0.05"):
        self.bodies: list[dict] = []  # every request body received (failed attempts too)
        self.fail: list[int] = []
        self.retry_after = retry_after
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake.lock:
                    fake.bodies.append(body)
                    status = fake.fail.pop(0) if fake.fail else 200
                if self.path != "/v1/chat/completions":
                    status = 404
                if status != 200:
                    data = json.dumps({"error": {"message": f"canned {status}", "type": "test"}}).encode()
                    self.send_response(status)
                    if status == 429:
                        self.send_header("Retry-After", fake.retry_after)
                else:
                    content = canned_review(body["messages"][-1]["content"])
                    data = json.dumps({
                        "id": "chatcmpl-1", "object": "chat.completion", "model": body["model"],
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                     "finish_reason": "stop"}],
                        "usage": {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": COMPLETION_TOKENS,
                                  "total_tokens": PROMPT_TOKENS + COMPLETION_TOKENS}}).encode()
                    self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "FakeOpenAI":
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def judge_requests(self) -> list[dict]:
        return [b for b in self.bodies if "<answer1>" in b["messages"][-1]["content"]]


def assert_has(row: dict, **expected) -> None:
    assert {k: row[k] for k in expected} == expected


@pytest.fixture
def fake():
    with FakeOpenAI() as server:
        yield server


ITEMS = [
    PairItem("win", "sw", "Describe rain.", "GOOD mvua", "BAD mvua"),  # won both orders
    PairItem("loss", "sw", "Describe sun.", "BAD jua", "GOOD jua"),  # lost both
    PairItem("tie", "th", "Describe wind.", "OKAY ลม", "OKAY ลมแรง"),  # tied both
    PairItem("bias", "th", "Describe snow.", "BIASED หิมะ", "GOOD หิมะ"),  # won one order, lost the other
    PairItem("garbled", "th", "Describe ice.", "GARBLE น้ำแข็ง", "GOOD น้ำแข็ง"),  # no score tags
    PairItem("half", "sw", "Describe fog.", "HALF ukungu", "GOOD ukungu"),  # score2 not a number
    PairItem("win_tie", "sw", "Describe hail.", "GOOD mvua ya mawe", "SLY mvua ya mawe"),  # won one, tied one
    PairItem("tie_loss", "sw", "Describe dew.", "SLY umande", "GOOD umande"),  # tied one, lost one
]
EXPECTED = {"win": "win", "loss": "loss", "tie": "tie", "bias": "tie", "garbled": "unparseable",
            "half": "unparseable", "win_tie": "win", "tie_loss": "loss"}


def test_parse_scores_as_released():
    assert parse_scores("<score1>8</score1><score2>3</score2>") == (8, 3)
    assert parse_scores("<score1> 7.9 </score1> <score2>10</score2>") == (7, 10)  # int(float(x)) as released
    assert parse_scores("<score1>\n6\n</score1><score2>0</score2>") == (6, 0)
    assert parse_scores("Answer 1 is better.") is None
    assert parse_scores("<score1>8</score1>") is None  # score2 missing
    assert parse_score("<score1>eight</score1>", 1) is None
    assert parse_score("<score1>11</score1>", 1) is None and parse_score("<score1>-1</score1>", 1) is None
    assert parse_score("<score1>nan</score1>", 1) is None


def test_combine_rule():
    # (ours, theirs) with ours first; (theirs, ours) with theirs first
    assert combine((9, 2), (2, 9)) == "win"  # both won
    assert combine((9, 5), (9, 9)) == "win"  # won one, tied one
    assert combine((5, 5), (2, 9)) == "win"
    assert combine((2, 9), (9, 2)) == "loss"
    assert combine((5, 5), (9, 5)) == "loss"  # tied one, lost one
    assert combine((5, 5), (5, 5)) == "tie"
    assert combine((8, 3), (8, 3)) == "tie"  # the judge picked the first answer both times
    assert combine(None, (2, 9)) == "unparseable" and combine((9, 2), None) == "unparseable"


def test_prompt_is_the_released_one():
    msgs = judge_messages("Name a fruit.", "th", "กล้วย", "ส้ม")
    assert msgs[0] == {"role": "system", "content": SYSTEM_PROMPT}
    user = msgs[1]["content"]
    assert user.startswith("Given the question and the answer in Thai language. You are a helpful and precise "
                           "assistant for checking the quality of the answer in Thai.\n\n<question>\nName a fruit.\n"
                           "</question>\n<answer1>\nกล้วย\n</answer1>\n<answer2>\nส้ม\n</answer2>\n\n")
    assert "wrapped by <score1> and </score1>" in user and "wrapped by <score2> and </score2>" in user
    assert user == EVAL_PROMPT.format(lang="Thai", instruction="Name a fruit.", output1="กล้วย", output2="ส้ม")


def test_judge_over_http_orders_rule_retries_and_tokens(fake, tmp_path):
    fake.fail = [429, 500, 503]  # the first request fails three times, then succeeds
    sleeps: list[float] = []
    client = ChatClient(fake.base_url, "gpt-4", "sk-test", retries=5, backoff_s=0.01, sleep=sleeps.append,
                        cache=ReplyCache(tmp_path / "cache.jsonl"))
    verdicts = Judge(client, max_tokens=64, concurrency=1).judge(ITEMS)
    assert {v.id: v.outcome for v in verdicts} == EXPECTED
    assert [v.id for v in verdicts] == [it.id for it in ITEMS]

    # both orders were asked for every pair: ours as answer 1 once, theirs as answer 1 once
    asked = [_answers(b["messages"][-1]["content"]) for b in fake.judge_requests()]
    for it in ITEMS:
        assert (it.ours, it.theirs) in asked and (it.theirs, it.ours) in asked
    assert all(b["model"] == "gpt-4" and b["temperature"] == 0.0 and b["top_p"] == 1.0 and b["max_tokens"] == 64
               for b in fake.bodies)
    # retries: 429 (Retry-After 0.05 beats backoff 0.01), then 500 and 503 with doubling backoff
    assert sleeps == pytest.approx([0.05, 0.02, 0.04])
    s = client.stats
    assert s.requests == 2 * len(ITEMS) + 3 and s.retries == 3 and s.replies == 2 * len(ITEMS)
    assert dict(s.http_errors) == {429: 1, 500: 1, 503: 1} and s.failed == 0
    assert s.prompt_tokens == PROMPT_TOKENS * 2 * len(ITEMS)
    assert s.completion_tokens == COMPLETION_TOKENS * 2 * len(ITEMS)

    # unparseable verdicts are counted and keep their raw text, with no score
    garbled = next(v for v in verdicts if v.id == "garbled")
    assert garbled.ours_first is None and garbled.theirs_first is None and "nine" in garbled.review_ours_first
    half = next(v for v in verdicts if v.id == "half")
    assert half.ours_first is None and half.theirs_first is None

    summary = summarize(verdicts)
    assert_has(summary["sw"], win=2, loss=2, tie=0, unparseable=1, failed=0, pairs=5, judged=4, win_rate=0.5,
               loss_rate=0.5, unparseable_verdicts=2)
    assert_has(summary["th"], win=0, tie=2, loss=0, unparseable=1, judged=2, tie_rate=1.0)
    a = summary["all"]
    assert (a["win"], a["tie"], a["loss"], a["unparseable"], a["judged"]) == (2, 2, 2, 2, 6)
    assert a["win_rate"] == round(2 / 6, 4)
    # mean scores over both orders of the parseable pairs: win 9/2 twice, loss 2/9 twice, ...
    assert a["mean_score_ours"] is not None and a["mean_score_theirs"] is not None


def test_cache_second_run_pays_nothing(fake, tmp_path):
    cache_path = tmp_path / "cache.jsonl"
    first = ChatClient(fake.base_url, "gpt-4", cache=ReplyCache(cache_path), backoff_s=0.0)
    v1 = Judge(first, concurrency=4).judge(ITEMS)
    sent = len(fake.bodies)
    assert sent == 2 * len(ITEMS) and len(cache_path.read_text().splitlines()) == sent
    with open(cache_path, "ab") as f:  # a line cut short by a kill is skipped, not fatal
        f.write(b'{"key": "abc", "content": "half a li')

    second = ChatClient(fake.base_url, "gpt-4", cache=ReplyCache(cache_path), backoff_s=0.0)
    assert second.cache.skipped_lines == 1
    v2 = Judge(second, concurrency=4).judge(ITEMS)
    assert len(fake.bodies) == sent  # zero requests on the rerun
    assert [v.to_dict() | {"cached": 0} for v in v2] == [v.to_dict() for v in v1]
    assert all(v.cached == 2 for v in v2)
    s = second.stats
    assert s.requests == 0 and s.cache_hits == 2 * len(ITEMS) and s.prompt_tokens == 0
    assert s.cached_prompt_tokens == PROMPT_TOKENS * 2 * len(ITEMS)
    assert s.cached_completion_tokens == COMPLETION_TOKENS * 2 * len(ITEMS)

    # another judge model, or another endpoint, is not served from this cache
    third = ChatClient(fake.base_url, "gpt-4o", cache=ReplyCache(cache_path), backoff_s=0.0)
    Judge(third).judge(ITEMS[:1])
    assert len(fake.bodies) == sent + 2
    # and the cache file stays readable after the torn line: the new lines start on a fresh line
    assert len(ReplyCache(cache_path)) == 2 * len(ITEMS) + 2


def test_gives_up_after_retries_and_stops_on_client_errors(fake, tmp_path):
    fake.fail = [500] * 3
    cache = ReplyCache(tmp_path / "cache.jsonl")
    client = ChatClient(fake.base_url, "gpt-4", cache=cache, retries=2, backoff_s=0.0)
    (v,) = Judge(client, concurrency=1).judge(ITEMS[:1])
    assert v.outcome == "failed" and "gave up after 3 attempts" in v.error and "HTTP 500" in v.error
    assert client.stats.failed == 1
    # the failure was not cached: a rerun asks again (and now gets answers)
    again = ChatClient(fake.base_url, "gpt-4", cache=cache, retries=2, backoff_s=0.0)
    (v,) = Judge(again, concurrency=1).judge(ITEMS[:1])
    assert v.outcome == "win" and again.stats.cache_hits == 1 and again.stats.replies == 1

    fake.fail = [401]
    bad_key = ChatClient(fake.base_url, "gpt-4", retries=5, backoff_s=0.0)
    with pytest.raises(EndpointError) as e:
        Judge(bad_key, concurrency=1).judge(ITEMS[1:2])
    assert e.value.fatal and e.value.status == 401 and "\n" not in str(e.value)
    assert "HTTP 401" in str(e.value) and "eval.judge.base_url" in str(e.value)
    assert bad_key.stats.requests == 1  # never retried

    wrong_path = ChatClient(fake.base_url.replace("/v1", "/v2"), "gpt-4", retries=5, backoff_s=0.0)
    with pytest.raises(EndpointError, match="HTTP 404"):
        wrong_path.chat([{"role": "user", "content": "hi"}], max_tokens=4, temperature=0.0)


def test_connection_refused_is_retried_then_failed():
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sleeps: list[float] = []
    client = ChatClient(f"http://127.0.0.1:{port}/v1", "gpt-4", retries=2, backoff_s=0.5, sleep=sleeps.append,
                        timeout_s=2)
    (v,) = Judge(client).judge(ITEMS[:1])
    assert v.outcome == "failed" and client.stats.http_errors["connection"] >= 3
    assert sleeps[:2] == [0.5, 1.0]
