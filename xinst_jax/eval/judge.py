"""Pairwise judging, as X-Instruction did it: a judge model (GPT-4 in the paper's setting; any
OpenAI-compatible chat endpoint, our own `serve` in tests) scores two answers to one English
question, each pair in both answer orders, and the two verdicts make one win / tie / loss.

The prompt is the released one, word for word: ZNLP/X-Instruction, utils/gpt4_eval.py, the
active `_EVAL_PROMPT` ("Prompt_2, without outputing justification") with its system prompt, and
the released request settings (temperature 0, top_p 1.0, max_tokens from scripts/evaluate.sh's
example, 512). It asks for integer scores 0-10 inside <score1></score1> and <score2></score2>.
The released script judged answer files in both orders (scripts/evaluate.sh runs gpt4_eval.py
twice, the answer files swapped) but ships no rule that combines the two; ours is below.

Score extraction is the released `extract_score`: the first `<scoreN>(.*?)</scoreN>`, read as
`int(float(...))` (so 7.5 counts as 7). Where the released code wrote -1 for a missing tag (and
crashed on a non-number), a verdict here is *unparseable*: no tag, not a number, or outside
0..10. Unparseable verdicts are counted and kept with their raw text; they never become a score.

The win / tie / loss rule (`combine`). For each order, the verdict is the sign of
(our score - their score): +1 we won that order, 0 tie, -1 we lost. The pair's outcome is the
sign of the sum of the two verdicts:

    win   both orders won, or one won and the other tied
    loss  both orders lost, or one lost and the other tied
    tie   both tied, or one won and one lost (the judge followed the position, not the answers)
    unparseable  either order's verdict is unparseable (no half-verdicts: the pair is left out
                 of the rates, and counted)
    failed       the endpoint kept failing after every retry (not cached: a rerun asks again)

Rates per language: win / tie / loss over the judged pairs (win + tie + loss).

HTTP: plain `urllib` (no client library), POST `<base_url>/chat/completions` with a Bearer key
from the environment variable `eval.judge.api_key_env`. 429 and 5xx answers, connection errors
and timeouts are retried `retries` times with exponential backoff (`backoff_s` * 2^attempt,
at most MAX_BACKOFF_S, longer when the server sends Retry-After); other 4xx answers (a wrong
key, model or URL) stop the run at once with one line naming the endpoint and the status.

Cache: every reply is kept as a JSONL line (`eval.judge.cache`: a local file appended to, or on
gs:// numbered part objects beside that path; ReplyCache), keyed by the sha256 of (base_url,
model, messages, max_tokens, temperature, top_p). A rerun finds every reply it has already paid
for there and sends no request for it; a line cut short by a kill is skipped.
Token counts: the `usage` of every reply, split into billed this run and served from the cache.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import email.utils
import hashlib
import http.client
import json
import logging
import math
import os
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from typing import Any, Callable, Optional, Sequence

from xinst_jax import paths
from xinst_jax.data.templates import language_name

log = logging.getLogger(__name__)

PROMPT_SOURCE = "ZNLP/X-Instruction utils/gpt4_eval.py (_EVAL_PROMPT, Prompt_2; system prompt; extract_score)"

# The released system prompt and judging prompt, verbatim (ZNLP/X-Instruction utils/gpt4_eval.py).
SYSTEM_PROMPT = ("We would like to request your feedback on the performance of AI assistant in response to the "
                 "instruction and the given input displayed following.")
EVAL_PROMPT = (
    "Given the question and the answer in {lang} language. You are a helpful and precise assistant for checking the "
    "quality of the answer in {lang}.\n\n"
    "<question>\n"
    "{instruction}\n"
    "</question>\n"
    "<answer1>\n"
    "{output1}\n"
    "</answer1>\n"
    "<answer2>\n"
    "{output2}\n"
    "</answer2>\n\n"
    "Suppose the user only speaks the language of the question, please evaluate both answers with your "
    "justification, and only provide a score ranging from 0 to 10 after your justifications, the score must be an "
    "integer. When evaluating the answers, you should consider the helpfulness, relevance, accuracy, level of "
    "details of the answers. The score for answer 1 should be wrapped by <score1> and </score1>, and the score for "
    "answer 2 should be wrapped by <score2> and </score2>.\n\n"
    "Please only output the scores for the answers, and do not output the justification and any other "
    "information.\n\n"
)
JUDGE_TOP_P = 1.0  # released: --top-p 1.0
SCORE_RANGE = (0, 10)

# The released ChatGPT answer generation (utils/chatgpt_generation.py): how a second endpoint is
# asked for its answers (system prompt as above, temperature 0.7, top_p 1.0).
OPPONENT_PROMPT = ("Given an instruction in English, please generate a response in {lang}.\n\n"
                   "Instruction: {instruction}\n\n"
                   "### Response:")
OPPONENT_TEMPERATURE = 0.7
OPPONENT_TOP_P = 1.0

# Not (yet) config keys: requests in flight at once, and the longest wait between retries.
JUDGE_CONCURRENCY = 8
MAX_BACKOFF_S = 60.0
MAX_RETRY_AFTER_S = 300.0

OUTCOMES = ("win", "tie", "loss", "unparseable", "failed")


class EndpointError(RuntimeError):
    """An endpoint answered with an error we do not retry (4xx but 429), or kept failing.
    `fatal`: retrying later will not help (wrong key, model or URL)."""

    def __init__(self, message: str, status: Optional[int] = None, fatal: bool = False):
        super().__init__(message)
        self.status = status
        self.fatal = fatal


# --------------------------------------------------------------------------- prompts and parsing


def judge_messages(instruction: str, lang: str, answer1: str, answer2: str) -> list[dict]:
    """The released request: system prompt + the judging prompt for (answer1, answer2)."""
    prompt = EVAL_PROMPT.format(lang=language_name(lang), instruction=instruction, output1=answer1, output2=answer2)
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": prompt}]


def opponent_messages(instruction: str, lang: str) -> list[dict]:
    """The released way of asking a chat model for an answer in `lang`."""
    prompt = OPPONENT_PROMPT.format(lang=language_name(lang), instruction=instruction)
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": prompt}]


_SCORE_RE = {k: re.compile(rf"<score{k}>(.*?)</score{k}>", re.DOTALL) for k in (1, 2)}


def parse_score(review: str, k: int) -> Optional[int]:
    """Score k (1 or 2) of a review as the released extract_score reads it (int(float(x)));
    None when the tag is missing, not a number or outside 0..10."""
    m = _SCORE_RE[k].search(review or "")
    if not m:
        return None
    try:
        value = float(m.group(1).strip())
    except ValueError:
        return None
    if not math.isfinite(value) or not SCORE_RANGE[0] <= value <= SCORE_RANGE[1]:
        return None
    return int(value)


def parse_scores(review: str) -> Optional[tuple[int, int]]:
    """(score1, score2), or None when either is unparseable."""
    s1, s2 = parse_score(review, 1), parse_score(review, 2)
    return None if s1 is None or s2 is None else (s1, s2)


def _sign(x: float) -> int:
    return (x > 0) - (x < 0)


def combine(ours_first: Optional[tuple[int, int]], theirs_first: Optional[tuple[int, int]]) -> str:
    """The pair's outcome from the two orders' scores (module docstring): `ours_first` is
    (our score, their score) with our answer as answer 1; `theirs_first` is (their score, our
    score) with theirs as answer 1."""
    if ours_first is None or theirs_first is None:
        return "unparseable"
    v = _sign(ours_first[0] - ours_first[1]) + _sign(theirs_first[1] - theirs_first[0])
    return "win" if v > 0 else "loss" if v < 0 else "tie"


# --------------------------------------------------------------------------- HTTP client


@dataclasses.dataclass
class Reply:
    content: str
    usage: dict  # prompt_tokens, completion_tokens (as the endpoint reported them; 0 when absent)
    cached: bool = False


@dataclasses.dataclass
class ClientStats:
    requests: int = 0  # HTTP attempts sent
    retries: int = 0  # attempts after a retryable failure
    http_errors: Counter = dataclasses.field(default_factory=Counter)  # status (or "connection") -> count
    replies: int = 0  # successful replies from the endpoint (billed)
    cache_hits: int = 0
    prompt_tokens: int = 0  # billed this run
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0  # served from the cache: paid for on an earlier run
    cached_completion_tokens: int = 0
    failed: int = 0  # requests given up after every retry

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["http_errors"] = {str(k): v for k, v in sorted(self.http_errors.items(), key=lambda kv: str(kv[0]))}
        d["total_tokens"] = self.prompt_tokens + self.completion_tokens
        return d


def _retry_after(headers) -> Optional[float]:
    value = headers.get("Retry-After") if headers is not None else None
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
            return max(0.0, when.timestamp() - time.time())
        except (TypeError, ValueError):
            return None


class ChatClient:
    """A minimal OpenAI-compatible chat-completions client (urllib), with retries and a cache."""

    def __init__(self, base_url: str, model: str, api_key: str = "", *, timeout_s: float = 120.0,
                 retries: int = 5, backoff_s: float = 1.0, cache: Optional["ReplyCache"] = None,
                 sleep: Callable[[float], None] = time.sleep, name: str = "eval.judge"):
        if not base_url:
            raise ValueError("base_url is empty")
        self.base_url = base_url.rstrip("/")
        self.url = self.base_url + "/chat/completions"
        self.model = model
        self.api_key = api_key
        self.timeout_s = float(timeout_s)
        self.retries = int(retries)
        self.backoff_s = float(backoff_s)
        self.cache = cache
        self.sleep = sleep
        self.name = name  # the config key prefix named in errors
        self.stats = ClientStats()
        self._lock = threading.Lock()

    def request_body(self, messages: Sequence[dict], max_tokens: int, temperature: float, top_p: float) -> dict:
        return {"model": self.model, "messages": list(messages), "max_tokens": int(max_tokens),
                "temperature": float(temperature), "top_p": float(top_p)}

    def cache_key(self, body: dict) -> str:
        blob = json.dumps({"base_url": self.base_url, **body}, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def chat(self, messages: Sequence[dict], *, max_tokens: int, temperature: float, top_p: float = 1.0) -> Reply:
        body = self.request_body(messages, max_tokens, temperature, top_p)
        key = self.cache_key(body)
        if self.cache is not None:
            hit = self.cache.get(key)
            if hit is not None:
                usage = hit.get("usage") or {}
                with self._lock:
                    self.stats.cache_hits += 1
                    self.stats.cached_prompt_tokens += int(usage.get("prompt_tokens") or 0)
                    self.stats.cached_completion_tokens += int(usage.get("completion_tokens") or 0)
                return Reply(hit["content"], usage, cached=True)
        reply = self._post_with_retries(body)
        if self.cache is not None:
            self.cache.put(key, {"model": self.model, "base_url": self.base_url, "content": reply.content,
                                 "usage": reply.usage, "time": round(time.time(), 3)})
        return reply

    def _post_with_retries(self, body: dict) -> Reply:
        data = json.dumps(body, ensure_ascii=False).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last = ""
        for attempt in range(self.retries + 1):
            with self._lock:
                self.stats.requests += 1
                if attempt:
                    self.stats.retries += 1
            wait = min(self.backoff_s * (2 ** attempt), MAX_BACKOFF_S)
            try:
                req = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                    raw = resp.read()
                reply = self._parse(raw)
                if reply is not None:
                    with self._lock:
                        self.stats.replies += 1
                        self.stats.prompt_tokens += int(reply.usage.get("prompt_tokens") or 0)
                        self.stats.completion_tokens += int(reply.usage.get("completion_tokens") or 0)
                    return reply
                last = "a reply without choices[0].message.content"
                self._count("bad_reply")
            except urllib.error.HTTPError as e:
                status = e.code
                detail = _error_detail(e)
                self._count(status)
                if status != 429 and status < 500:
                    raise EndpointError(f"{self.name}: {self.url} answered HTTP {status} ({detail}); check "
                                        f"{self.name}.base_url, {self.name}.model and the API key", status,
                                        fatal=True) from None
                last = f"HTTP {status} ({detail})"
                after = _retry_after(e.headers)
                if after is not None:
                    wait = max(wait, min(after, MAX_RETRY_AFTER_S))
            except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError,
                    http.client.HTTPException) as e:
                self._count("connection")
                last = " ".join(f"{type(e).__name__}: {getattr(e, 'reason', e)}".split())
            if attempt < self.retries:
                self.sleep(wait)
        with self._lock:
            self.stats.failed += 1
        raise EndpointError(f"{self.name}: {self.url}: gave up after {self.retries + 1} attempts ({last})")

    def _count(self, what) -> None:
        with self._lock:
            self.stats.http_errors[what] += 1

    @staticmethod
    def _parse(raw: bytes) -> Optional[Reply]:
        try:
            obj = json.loads(raw.decode("utf-8"))
            content = obj["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            return None
        if not isinstance(content, str):
            return None
        usage = obj.get("usage") or {}
        usage = {k: int(usage.get(k) or 0) for k in ("prompt_tokens", "completion_tokens")}
        return Reply(content, usage)


def _error_detail(e: urllib.error.HTTPError) -> str:
    try:
        body = e.read().decode("utf-8", "replace")
        obj = json.loads(body)
        msg = obj.get("error", {}).get("message") if isinstance(obj.get("error"), dict) else obj.get("error")
        text = str(msg or body)
    except Exception:  # noqa: BLE001 (any body: the status is what matters)
        text = e.reason if isinstance(e.reason, str) else str(e.code)
    return " ".join(text.split())[:200]  # one line


# --------------------------------------------------------------------------- cache


class ReplyCache:
    """Replies by request key, as JSONL lines ({"key", "content", "usage", ...}; a later line for a
    key wins). Loaded whole on open; a line cut short (a kill mid-write) is skipped.

    A local path is one append-only file: each reply is appended and fsynced as it comes.

    On a bucket (gs://, through xinst_jax/paths.py) objects cannot be appended to, and rewriting
    the whole file on every flush would upload a quadratic number of bytes. So every
    REMOTE_SAVE_EVERY new replies, and at save() (which the judging code calls when it ends), only
    the new replies go up, as the next numbered part `<path>.parts/part-000000.jsonl`, ...; a kill
    loses at most the replies not yet in a part (asked again on the rerun). Loading reads `<path>`
    itself first (a single-object cache from before parts existed), then the parts in number order.
    One run writes a cache at a time (two at once could both write the same next part)."""

    REMOTE_SAVE_EVERY = 32
    PARTS = ".parts"  # suffix of the parts' directory beside the cache path
    _PART_RE = re.compile(r"part-(\d+)\.jsonl$")

    def __init__(self, path: Any):
        self.path = paths.as_path(str(path))
        self._remote = paths.is_remote(str(path))
        self._pending: list[dict] = []  # replies not yet in a part on the bucket
        self._entries: dict[str, dict] = {}
        self._lock = threading.Lock()
        self._upload_lock = threading.Lock()  # one part upload at a time, parts numbered in order
        self.skipped_lines = 0
        parts = self._part_files()
        self._next_part = parts[-1][0] + 1 if parts else 0
        for source in [str(self.path)] + [f for _, f in parts]:
            if paths.exists(source):
                self._load(source)
        if self.skipped_lines:
            log.warning("%s: skipped %d unreadable line(s)", self.path, self.skipped_lines)
        self.loaded = len(self._entries)

    def _part_files(self) -> list[tuple[int, str]]:
        """(number, path) of the bucket parts, by number; none for a local cache."""
        if not self._remote:
            return []
        found = ((self._PART_RE.search(f), f) for f in paths.glob(paths.join(f"{self.path}{self.PARTS}", "part-*")))
        return sorted((int(m.group(1)), f) for m, f in found if m)

    def _part_path(self, number: int) -> str:
        return paths.join(f"{self.path}{self.PARTS}", f"part-{number:06d}.jsonl")

    def _load(self, source: str) -> None:
        with paths.open(source, "rb") as f:
            for line in f:
                try:
                    entry = json.loads(line.decode("utf-8"))
                    self._entries[entry["key"]] = entry
                except (ValueError, KeyError, TypeError):
                    self.skipped_lines += 1

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> Optional[dict]:
        with self._lock:
            return self._entries.get(key)

    def entries(self) -> list[dict]:
        """Every cached reply, one per key (a snapshot)."""
        with self._lock:
            return list(self._entries.values())

    def put(self, key: str, entry: dict) -> None:
        entry = {"key": key, **entry}
        if self._remote:
            with self._lock:
                self._entries[key] = entry
                self._pending.append(entry)
                due = len(self._pending) >= self.REMOTE_SAVE_EVERY
            if due:
                self._upload(self.REMOTE_SAVE_EVERY)
            return
        with self._lock:
            self._entries[key] = entry
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "ab") as f:
                if f.tell() and not self._ends_with_newline():
                    f.write(b"\n")  # a line cut short by a kill: start afresh on the next line
                f.write(_jsonl([entry]))
                f.flush()
                os.fsync(f.fileno())

    def save(self) -> None:
        """Put the replies the bucket still lacks there (a local file is always complete)."""
        self._upload(1)

    def _upload(self, at_least: int) -> None:
        """The pending replies as the next part, when there are `at_least` of them (threads that all
        saw a full batch do not each write a part of the few replies added since). The upload runs
        outside the entries' lock, so other judge threads keep reading and adding."""
        with self._upload_lock:
            with self._lock:
                if len(self._pending) < at_least:
                    return
                batch, self._pending = self._pending, []
            try:
                paths.write_atomic(self._part_path(self._next_part), _jsonl(batch))
            except BaseException:
                with self._lock:
                    self._pending[:0] = batch  # not on the bucket: the next upload carries them
                raise
            self._next_part += 1

    def _ends_with_newline(self) -> bool:
        with open(self.path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            return f.read(1) == b"\n"


def _jsonl(entries: Sequence[dict]) -> bytes:
    return "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in entries).encode("utf-8")


# --------------------------------------------------------------------------- judging


@dataclasses.dataclass
class PairItem:
    """One question in one language: our answer against theirs (a reference or another model)."""

    id: str
    lang: str
    instruction: str  # the English question, as the judge sees it
    ours: str
    theirs: str


@dataclasses.dataclass
class PairVerdict:
    id: str
    lang: str
    outcome: str  # OUTCOMES
    ours_first: Optional[list[int]]  # [our score, their score] with our answer as answer 1
    theirs_first: Optional[list[int]]  # [their score, our score] with theirs as answer 1
    review_ours_first: Optional[str]  # the judge's raw replies (None: the request failed)
    review_theirs_first: Optional[str]
    cached: int = 0  # how many of the two replies came from the cache
    error: str = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class Judge:
    """Judges PairItems in both orders over a ChatClient (module docstring)."""

    def __init__(self, client: ChatClient, *, max_tokens: int = 512, temperature: float = 0.0,
                 top_p: float = JUDGE_TOP_P, concurrency: int = JUDGE_CONCURRENCY):
        self.client = client
        self.max_tokens = int(max_tokens)
        self.temperature = float(temperature)
        self.top_p = float(top_p)
        self.concurrency = max(1, int(concurrency))

    def _ask(self, messages: list[dict]) -> tuple[Optional[Reply], str]:
        try:
            return self.client.chat(messages, max_tokens=self.max_tokens, temperature=self.temperature,
                                    top_p=self.top_p), ""
        except EndpointError as e:
            if e.fatal:
                raise
            return None, str(e)

    def judge_one(self, item: PairItem) -> PairVerdict:
        a, err_a = self._ask(judge_messages(item.instruction, item.lang, item.ours, item.theirs))
        b, err_b = self._ask(judge_messages(item.instruction, item.lang, item.theirs, item.ours))
        cached = int(bool(a and a.cached)) + int(bool(b and b.cached))
        if a is None or b is None:
            return PairVerdict(item.id, item.lang, "failed", None, None, a and a.content, b and b.content, cached,
                               err_a or err_b)
        sa, sb = parse_scores(a.content), parse_scores(b.content)
        return PairVerdict(item.id, item.lang, combine(sa, sb), list(sa) if sa else None, list(sb) if sb else None,
                           a.content, b.content, cached)

    def judge(self, items: Sequence[PairItem], progress: Optional[Callable[[int], None]] = None) -> list[PairVerdict]:
        """Verdicts in the order of `items`; `concurrency` pairs in flight at once."""
        if not items:
            return []
        out: list[Optional[PairVerdict]] = [None] * len(items)
        with concurrent.futures.ThreadPoolExecutor(self.concurrency) as pool:
            futures = {pool.submit(self.judge_one, item): i for i, item in enumerate(items)}
            try:
                for fut in concurrent.futures.as_completed(futures):
                    out[futures[fut]] = fut.result()
                    if progress is not None:
                        progress(1)
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
        return out  # type: ignore[return-value]


def summarize(verdicts: Sequence[PairVerdict]) -> dict:
    """Counts and rates per language and over all: {lang: {win, tie, loss, unparseable, failed,
    pairs, judged, win_rate, tie_rate, loss_rate, unparseable_verdicts, mean_score_ours,
    mean_score_theirs}, ..., "all": {...}}. Rates are over judged pairs (win + tie + loss);
    mean scores over both orders of the parseable pairs."""
    groups: dict[str, list[PairVerdict]] = {}
    for v in verdicts:
        groups.setdefault(v.lang, []).append(v)
    out = {lang: _summary(vs) for lang, vs in sorted(groups.items())}
    out["all"] = _summary(list(verdicts))
    return out


def _summary(vs: Sequence[PairVerdict]) -> dict:
    c = Counter(v.outcome for v in vs)
    judged = c["win"] + c["tie"] + c["loss"]
    ours, theirs = [], []
    bad_verdicts = 0
    for v in vs:
        if v.outcome == "failed":
            continue
        bad_verdicts += (v.ours_first is None) + (v.theirs_first is None)
        if v.ours_first is not None and v.theirs_first is not None:
            ours += [v.ours_first[0], v.theirs_first[1]]
            theirs += [v.ours_first[1], v.theirs_first[0]]
    row = {k: c[k] for k in OUTCOMES}
    row.update(pairs=len(vs), judged=judged, unparseable_verdicts=bad_verdicts)
    for k in ("win", "tie", "loss"):
        row[f"{k}_rate"] = round(c[k] / judged, 4) if judged else None
    row["mean_score_ours"] = round(sum(ours) / len(ours), 3) if ours else None
    row["mean_score_theirs"] = round(sum(theirs) / len(theirs), 3) if theirs else None
    return row


def rule_text() -> str:
    return ("per order: sign(our score - their score); pair: sign of the sum of both orders' verdicts "
            "(win: won both, or won one and tied the other; loss: the mirror; tie: tied both, or won one and "
            "lost one); a pair with an unparseable verdict in either order is counted as unparseable and left "
            "out of the rates; rates are over win + tie + loss")


def api_key_from_env(env: str) -> str:
    return os.environ.get(env, "") if env else ""


def is_local_url(url: str) -> bool:
    from urllib.parse import urlparse

    host = (urlparse(url).hostname or "").lower()
    return host in ("localhost", "127.0.0.1", "::1", "0.0.0.0") or host.endswith(".local")


def judge_endpoint_config(judge_cfg: Any) -> dict:
    """What identifies the judge in results.json (never the key)."""
    return {"base_url": judge_cfg.base_url, "model": judge_cfg.model, "max_tokens": judge_cfg.max_tokens,
            "temperature": judge_cfg.temperature, "top_p": JUDGE_TOP_P, "prompt": PROMPT_SOURCE}
