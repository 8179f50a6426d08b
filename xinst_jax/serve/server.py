"""Job `serve`: an OpenAI-compatible HTTP server over the inference engine.

    python launch/tpu_run.py --config serve_xinst --set generate.hf_dir=runs/sft_xinst/hf \\
        --set generate.tokenizer=runs/sft_xinst/hf --set serve.port=8000

Endpoints (FastAPI on uvicorn):

  GET  /health                 {"status": "ok"} once the engine is loaded
  GET  /v1/models              the one model, named serve.model_name
  POST /v1/completions         prompt: a text, a list of texts, a list of token ids or a list of
                               those; max_tokens, temperature, top_p, top_k, stop, seed, n,
                               stream; echo with logprobs (log-likelihood clients: the prompt's
                               tokens come back with their log-probabilities and top tokens)
  POST /v1/chat/completions    the last user message prompted as the model was trained: the
                               X-Instruction `sft` Task (`sft_assistant` with data.sft_assistant_style)
                               with "Answer in {Language}." when the request names a `language` (an
                               extra body field, ISO 639-1), the same prompt without the language
                               otherwise; stream
  GET  /tokenizer_info         the tokenizer's special token names (vLLM's endpoints, which
  POST /tokenize, /detokenize  lm-evaluation-harness's `tokenizer_backend=remote` uses: a client
                               then counts tokens exactly as this server does)

Texts are prompted as the `raw` Task does (the tokenizer's BOS, then the text); token-id prompts
are used as given. Streaming (`stream: true`, serve/streaming.py) sends server-sent events as the
engine decodes: every few decode steps each choice's new text (whole characters, never past a
stop string), then its finish reason, optionally usage (`stream_options.include_usage`), then
`data: [DONE]`; the streamed text equals the plain answer. (That is the continuous schedule, the
default; with generate.schedule=static a choice's text comes when its batch ends.) A streamed
completion with `logprobs` is the exception: its events are cut from the finished response.
`logprobs.tokens` are each token's share of the text (a token that only starts a character has
""), so `text_offset` points into the returned text. One greedy token with logprobs (lm-eval's
log-likelihood request) is read off the scoring pass: `next_token_choices`.
Concurrent requests are batched together in the engine, and a request that arrives while a batch
decodes joins it at the next chunk boundary when its sampling settings match (any seed:
serve/batcher.py); `GET /health` counts engine batches and such admissions. The queue is bounded
(`serve.max_queue`): a full queue answers 503 at once. Bad requests get a 4xx with an OpenAI-style
error body naming the field. SIGTERM stops accepting connections, lets the requests in flight
finish, then exits.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import signal
import threading
import time
import uuid
from typing import TYPE_CHECKING, Any, Optional, Sequence

from fastapi import Request  # at module level: the handlers' annotations are resolved from here

from xinst_jax.config import Config, ConfigError
from xinst_jax.jobs import register_job
from xinst_jax.serve.detok import token_pieces
from xinst_jax.tasks import Task

if TYPE_CHECKING:
    from xinst_jax.serve.batcher import Work

log = logging.getLogger(__name__)


class RequestError(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.status, self.kind = message, param, status, kind


def error_body(message: str, param: str | None, kind: str) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


# --------------------------------------------------------------------------- the model side


@dataclasses.dataclass
class Service:
    """The engine, its tokenizer and the defaults requests fill in."""

    cfg: Config
    engine: Any
    tokenizer: Any
    model: Any  # ModelConfig
    batcher: Any
    base_settings: Any  # SamplingSettings with the stop tokens

    def settings_for(self, body: dict) -> Any:
        temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
        top_p = _number(body, "top_p", 1.0, 0.0, 1.0, exclusive_low=True)
        top_k = int(_number(body, "top_k", 0, 0, 1 << 20))
        seed = body.get("seed")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise RequestError("seed must be an integer", "seed")
        return dataclasses.replace(self.base_settings, temperature=temperature, top_p=top_p, top_k=top_k,
                                   no_repeat_ngram=0, seed=(seed or 0) % (1 << 31),
                                   max_new_tokens=self.cfg.serve.max_tokens_limit)

    def text_tokens(self, text: str) -> list[int]:
        """What a text prompt feeds the model: the raw Task, as `generate` and `prepare` prompt it."""
        return Task("raw", self.tokenizer).prompt_tokens({"prompt": text}) if text else []

    def prompt_tokens(self, prompt: Any, param: str) -> list[int]:
        if isinstance(prompt, str):
            ids = self.text_tokens(prompt)
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                         for t in prompt):
            ids = list(prompt)
            bad = [t for t in ids if not 0 <= t < self.model.vocab_size]
            if bad:
                raise RequestError(f"token id {bad[0]} is outside the vocabulary (0..{self.model.vocab_size - 1})",
                                   param)
        else:
            raise RequestError("expected a string or a non-empty list of token ids", param)
        if not ids:
            raise RequestError("the prompt encodes to no tokens", param)
        return ids


def _number(body: dict, key: str, default: float, low: float, high: float, exclusive_low: bool = False) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(f"{key} must be a number", key)
    if value < low or value > high or (exclusive_low and value == low):
        raise RequestError(f"{key} must be in {'(' if exclusive_low else '['}{low}, {high}], got {value}", key)
    return float(value)


def _max_tokens(service: Service, body: dict, default: int) -> int:
    value = body.get("max_tokens", default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise RequestError("max_tokens must be a non-negative integer", "max_tokens")
    if value > service.cfg.serve.max_tokens_limit:
        raise RequestError(f"max_tokens {value} is above this server's limit {service.cfg.serve.max_tokens_limit}",
                           "max_tokens")
    return value


def _stops(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > 4:
        raise RequestError("stop must be a non-empty string or a list of up to 4 of them", "stop")
    return stops


def _n(body: dict) -> int:
    n = body.get("n", 1)
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 16:
        raise RequestError("n must be an integer from 1 to 16", "n")
    return n


def last_user_message(body: dict) -> str:
    """The content of a chat request's last user message (the instruction the model answers)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list", "messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") or \
                not isinstance(m.get("content"), str):
            raise RequestError("each message needs a role (system, user, assistant) and a string content",
                               f"messages[{i}]")
    users = [m["content"] for m in messages if m["role"] == "user"]
    if not users:
        raise RequestError("messages hold no user message", "messages")
    return users[-1]


def chat_prompt_tokens(service: Service, body: dict) -> list[int]:
    """A chat request's prompt: token for token the prompt the chat Task's training examples
    start with (`Task.for_answers`, as eval's), or, when the request names no `language`, that template
    without the language (templates.prompt_without_language), tokenized the same way."""
    from xinst_jax.data.templates import LANGUAGE_NAMES, prompt_without_language

    instruction = last_user_message(body)
    task = Task.for_answers(service.cfg.data, service.cfg.generate, service.tokenizer)
    lang = body.get("language")
    if lang is None:
        return service.text_tokens(prompt_without_language(task.name, instruction))
    if lang not in LANGUAGE_NAMES:
        raise RequestError(f"unknown language {lang!r} (known: {', '.join(sorted(LANGUAGE_NAMES))})", "language")
    return task.prompt_tokens({"instruction": instruction, "lang": lang})


def generate_work(service: Service, prompts: list[list[int]], n: int, settings, max_tokens: int,
                  seeded: bool) -> Work:
    """The batcher's work for `n` samples of each prompt (rows prompt by prompt): a seeded request's
    rows are numbered 0.. (its samples repeat with the seed), an unseeded one's are fresh ids."""
    from xinst_jax.serve.batcher import Work

    rows = [p for p in prompts for _ in range(n)]
    ids = list(range(len(rows))) if seeded else service.batcher.fresh_row_ids(len(rows))
    return Work("generate", rows, settings, [max(max_tokens, 1)] * len(rows), ids)


async def run_generate(service: Service, prompts: list[list[int]], n: int, settings, max_tokens: int,
                       seeded: bool) -> list[list[tuple]]:
    """[prompt][sample] -> (tokens, finish, prompt_len, truncated)."""
    work = generate_work(service, prompts, n, settings, max_tokens, seeded)
    result = await asyncio.wrap_future(service.batcher.submit(work))
    return [result[i * n:(i + 1) * n] for i in range(len(prompts))]


async def run_score(service: Service, sequences: list[list[int]]) -> list[tuple]:
    from xinst_jax.serve.batcher import Work

    work = Work("score", sequences)
    return await asyncio.wrap_future(service.batcher.submit(work))


def start_stream(service: Service, prompts: list[list[int]], n: int, settings, max_tokens: int, seeded: bool,
                 stops: list[str], body: dict, chat: bool, heads: Sequence[str] = ()):
    """A streamed generation's response (streaming.py); raises QueueFull before it starts."""
    from fastapi.responses import StreamingResponse

    from xinst_jax.serve.streaming import RowText, Stream, stream_events, submit_streamed

    include_usage = _include_usage(body)
    work = generate_work(service, prompts, n, settings, max_tokens, seeded)
    events, future = submit_streamed(service.batcher, work)
    texts = [RowText(service.tokenizer, stops, service.base_settings.stop_token_ids) for _ in work.rows]
    stream = Stream(service.cfg.serve.model_name, chat, texts, sum(len(p) for p in prompts), include_usage)
    return StreamingResponse(stream_events(stream, events, future, heads), media_type="text/event-stream")


def _include_usage(body: dict) -> bool:
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise RequestError("stream_options must be an object", "stream_options")
    return bool(options.get("include_usage", False))


def answer_text(service: Service, tokens: list[int], finish: str, stops: list[str]) -> tuple[str, str]:
    """(text, finish reason) of generated tokens, as the generate job writes them."""
    from xinst_jax.infer.job import output_text

    return output_text(service.tokenizer, tokens, finish, service.base_settings, stops)


# --------------------------------------------------------------------------- the app


def build_app(service: Service):
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse

    from xinst_jax.serve.batcher import QueueFull

    app = FastAPI(title="xinst_jax")
    name = service.cfg.serve.model_name

    @app.exception_handler(RequestError)
    async def request_error(_, e: RequestError):
        return JSONResponse(error_body(e.message, e.param, e.kind), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        param = ".".join(str(x) for x in first.get("loc", ())[1:]) or None
        return JSONResponse(error_body(first.get("msg", "invalid request"), param, "invalid_request_error"), 400)

    async def json_body(request: Request) -> dict:
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError):
            raise RequestError("the body is not valid JSON") from None
        if not isinstance(body, dict):
            raise RequestError("the body must be a JSON object")
        model = body.get("model")
        if model is not None and model != name:
            raise RequestError(f"the model '{model}' does not exist (this server serves '{name}')", "model", 404,
                               "model_not_found")
        return body

    def overloaded(e: Exception):
        return JSONResponse(error_body(f"the server is overloaded: {e}; retry later", None, "server_overloaded"), 503)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": name, "batches": service.batcher.batches,
                "admitted": service.batcher.admitted}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "xinst_jax"}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await json_body(request)
        prompt = body.get("prompt")
        if prompt is None:
            raise RequestError("prompt is required", "prompt")
        if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
            prompts = [service.prompt_tokens(p, f"prompt[{i}]") for i, p in enumerate(prompt)]
        else:
            prompts = [service.prompt_tokens(prompt, "prompt")]
        n, stops = _n(body), _stops(body)
        max_tokens = _max_tokens(service, body, 16)
        logprobs = body.get("logprobs")
        if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, int) or
                                     not 0 <= logprobs <= 5):
            raise RequestError("logprobs must be an integer from 0 to 5", "logprobs")
        echo = bool(body.get("echo", False))
        settings = service.settings_for(body)
        seeded = body.get("seed") is not None
        if body.get("stream") and logprobs is None and max_tokens > 0:
            heads = [head for head in map(service.tokenizer.decode, prompts) for _ in range(n)] if echo else []
            try:
                return start_stream(service, prompts, n, settings, max_tokens, seeded, stops, body, chat=False,
                                    heads=heads)
            except QueueFull as e:
                return overloaded(e)
        try:
            if logprobs is not None and one_token_from_scoring(service, prompts, settings, max_tokens):
                choices = await next_token_choices(service, prompts, n, stops, echo)
            else:
                choices = await completion_choices(service, prompts, n, settings, max_tokens, seeded, stops, echo,
                                                   logprobs is not None)
        except QueueFull as e:
            return overloaded(e)
        except ValueError as e:
            raise RequestError(str(e), "prompt") from None
        usage_prompt = sum(len(p) for p in prompts)
        usage_completion = sum(len(t) for _, _, t in choices)
        response = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                    "model": name, "choices": [c for c, _, _ in choices],
                    "usage": {"prompt_tokens": usage_prompt, "completion_tokens": usage_completion,
                              "total_tokens": usage_prompt + usage_completion}}
        if body.get("stream"):  # with logprobs: the finished response, as events
            return StreamingResponse(response_events(response), media_type="text/event-stream")
        return response

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await json_body(request)
        prompt = chat_prompt_tokens(service, body)
        n = _n(body)
        max_tokens = _max_tokens(service, body, service.cfg.serve.default_max_tokens)
        if max_tokens == 0:
            raise RequestError("max_tokens must be at least 1", "max_tokens")
        stops = _stops(body)
        settings = service.settings_for(body)
        seeded = body.get("seed") is not None
        try:
            if body.get("stream"):
                return start_stream(service, [prompt], n, settings, max_tokens, seeded, stops, body, chat=True,
                                    heads=[""] * n)
            generated = await run_generate(service, [prompt], n, settings, max_tokens, seeded)
        except QueueFull as e:
            return overloaded(e)
        choices, completion = [], 0
        for j, (tokens, finish, _, _) in enumerate(generated[0]):
            text, finish = answer_text(service, list(tokens), finish, stops)
            completion += len(tokens)
            choices.append({"index": j, "message": {"role": "assistant", "content": text}, "finish_reason": finish})
        response = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                    "model": name, "choices": choices,
                    "usage": {"prompt_tokens": len(prompt), "completion_tokens": completion,
                              "total_tokens": len(prompt) + completion}}
        return response

    add_tokenizer_routes(app, service, json_body)
    return app


async def completion_choices(service: Service, prompts: list[list[int]], n: int, settings, max_tokens: int,
                             seeded: bool, stops: list[str], echo: bool, logprobs: bool) -> list[tuple]:
    """(choice, prompt, generated tokens) per prompt and sample, in `index` order: generated, then
    (with logprobs) the prompt and tokens scored."""
    if max_tokens > 0:
        generated = await run_generate(service, prompts, n, settings, max_tokens, seeded)
    else:
        generated = [[([], "length", len(p), False)] * n for p in prompts]
    heads = [service.tokenizer.decode(p) if echo else "" for p in prompts]
    choices = []
    for i, p in enumerate(prompts):
        for j, (tokens, finish, _, _) in enumerate(generated[i]):
            tokens = list(tokens)[:max_tokens]
            text, finish = answer_text(service, tokens, finish, stops)
            choice = {"text": heads[i] + text, "index": i * n + j, "logprobs": None, "finish_reason": finish}
            choices.append((choice, p, tokens))
    if logprobs:
        scored = await run_score(service, [p + tokens for _, p, tokens in choices])
        pieces = [token_pieces(service.tokenizer, p) for p in prompts]  # once per prompt, not per sample
        for k, ((choice, _, tokens), (lps, tops, top_lps)) in enumerate(zip(choices, scored)):
            choice["logprobs"] = logprob_block(service, pieces[k // n], tokens, lps, tops, top_lps, echo)
    return choices


def one_token_from_scoring(service: Service, prompts: list[list[int]], settings, max_tokens: int) -> bool:
    """Whether `next_token_choices` gives what generating would: one greedy token, no
    min_new_tokens (it may hold a stop token back), and every prompt used whole (generate keeps
    only the end of a prompt longer than the largest bucket, `Engine.fit`; scoring would not)."""
    return (max_tokens == 1 and settings.greedy and not settings.min_new_tokens
            and not any(service.engine.fit(p)[1] for p in prompts))


async def next_token_choices(service: Service, prompts: list[list[int]], n: int, stops: list[str], echo: bool
                             ) -> list[tuple]:
    """`completion_choices` for one greedy token with logprobs -- what lm-eval's local-completions
    sends for every log-likelihood request (echo, max_tokens 1, temperature 0). The token is the
    argmax at the prompt's end in the scoring pass itself (a placeholder token appended: causal
    attention keeps it out of that prediction), so one forward answers instead of a prefill, a
    decode step and the scoring. Greedy decoding takes the same argmax (up to float near-ties
    between the KV-cache and the full forward), and the decode loop's stop rule (`ends_row`) says
    whether it finished the answer; `one_token_from_scoring` says when this applies."""
    from xinst_jax.infer.generate import ends_row

    settings = service.base_settings
    scored = await run_score(service, [p + [settings.pad_id] for p in prompts])
    choices = []
    for i, (p, (lps, tops, top_lps)) in enumerate(zip(prompts, scored)):
        token = int(tops[-1])
        lps = [*lps[:-1], top_lps[-1]]  # the placeholder's log p -> the chosen token's
        text, finish = answer_text(service, [token], "stop" if ends_row(p + [token], settings) else "length", stops)
        block = logprob_block(service, token_pieces(service.tokenizer, p), [token], lps, tops, top_lps, echo)
        head = service.tokenizer.decode(p) if echo else ""
        for j in range(n):
            choice = {"text": head + text, "index": i * n + j, "logprobs": block, "finish_reason": finish}
            choices.append((choice, p, [token]))
    return choices


def logprob_block(service: Service, prompt_pieces: list[str], tokens: list[int], lps, tops, top_lps,
                  echo: bool) -> dict:
    """OpenAI's completions `logprobs`: per token its text, log p, the most likely token with its
    log p (`top_logprobs`) and its character offset. With echo the prompt's tokens come first (the
    first has no log p). A token's text is its share of the decoded text (detok.token_pieces; the
    prompt's `prompt_pieces`, computed once per prompt), so the prompt's join to the echoed prompt
    and `text_offset` (counted from the prompt's start, as OpenAI does) points at each token's text
    even when tokens split characters."""
    first = 0 if echo else len(prompt_pieces)
    texts = prompt_pieces + token_pieces(service.tokenizer, tokens)
    token_lps: list[Optional[float]] = [None] + [float(x) for x in lps]
    top: list[Optional[dict]] = [None] + [{service.tokenizer.decode([int(t)]): float(v)} for t, v in zip(tops, top_lps)]
    offsets, at = [], 0
    for t in texts:
        offsets.append(at)
        at += len(t)
    return {"tokens": texts[first:], "token_logprobs": token_lps[first:], "top_logprobs": top[first:],
            "text_offset": offsets[first:]}


async def response_events(response: dict):
    """A finished completions response as server-sent events (a streamed request with logprobs):
    one event per choice's text and logprobs, then a finishing event per choice, then [DONE]."""
    from xinst_jax.serve.streaming import DONE, sse

    base = {"id": response["id"], "object": "text_completion", "created": response["created"],
            "model": response["model"]}
    for c in response["choices"]:
        yield sse({**base, "choices": [dict(c, finish_reason=None)]})
        yield sse({**base, "choices": [{"text": "", "index": c["index"], "logprobs": None,
                                        "finish_reason": c["finish_reason"]}]})
    yield DONE


# --------------------------------------------------------------------------- tokenizer endpoints


FALLBACK_NAMES = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}  # tokenizers without names


def special_tokens(tokenizer) -> dict[str, tuple[str, int]]:
    """bos/eos/pad token: (name, id), the name as the tokenizer spells it (a byte tokenizer has
    none: the usual Llama names stand in)."""
    out = {}
    for key, tok_id in (("bos_token", tokenizer.bos_id), ("eos_token", tokenizer.eos_id),
                        ("pad_token", tokenizer.pad_id)):
        if tok_id is not None:
            name = tokenizer.decode([tok_id], skip_special_tokens=False) or FALLBACK_NAMES[key]
            out[key] = (name, int(tok_id))
    return out


def tokenize_text(service: Service, text: str, add_special_tokens: bool) -> list[int]:
    """/tokenize: a text that is exactly a special token's name is that token, as vLLM's (and
    transformers') tokenizers have it -- lm-eval finds the EOS id by tokenizing its name. Any other
    text keeps such strings literal, as every prompt here does. With special tokens, the tokens a
    completion with this text as its prompt feeds the model."""
    by_name = {name: tok_id for name, tok_id in special_tokens(service.tokenizer).values()}
    if text in by_name:
        return [by_name[text]]
    if add_special_tokens:
        return service.text_tokens(text)
    return service.tokenizer.encode(text, add_special_tokens=False) if text else []


def add_tokenizer_routes(app, service: Service, json_body) -> None:
    """vLLM's tokenizer endpoints (outside /v1, where vLLM has them)."""

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        names = {key: name for key, (name, _) in special_tokens(service.tokenizer).items()}
        return {"tokenizer_class": type(service.tokenizer).__name__, "vocab_size": service.tokenizer.vocab_size,
                "model_max_length": service.engine.buckets[-1], **names}

    @app.post("/tokenize")
    async def tokenize(request: Request):
        body = await json_body(request)
        text = body.get("prompt")
        if not isinstance(text, str):
            raise RequestError("prompt must be a string", "prompt")
        add = body.get("add_special_tokens", True)
        if not isinstance(add, bool):
            raise RequestError("add_special_tokens must be a boolean", "add_special_tokens")
        ids = tokenize_text(service, text, add)
        return {"tokens": ids, "count": len(ids), "max_model_len": service.engine.buckets[-1]}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        body = await json_body(request)
        ids = body.get("tokens")
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise RequestError("tokens must be a list of token ids", "tokens")
        if any(not 0 <= t < service.model.vocab_size for t in ids):
            raise RequestError(f"token ids must be in 0..{service.model.vocab_size - 1}", "tokens")
        return {"prompt": service.tokenizer.decode(ids)}


# --------------------------------------------------------------------------- the job


def load_service(cfg: Config) -> Service:
    from xinst_jax.data.tokenizer import load_tokenizer
    from xinst_jax.infer.job import build_engine, check_tokenizer_fits, load_model, sampling_settings
    from xinst_jax.runtime import setup_runtime
    from xinst_jax.serve.batcher import Batcher

    setup_runtime(cfg.distributed)
    tokenizer = load_tokenizer(cfg.generate.tokenizer, key="generate.tokenizer")
    model, params, source = load_model(cfg)
    check_tokenizer_fits(tokenizer, model, "generate.tokenizer")
    engine = build_engine(cfg, model, params)
    base = sampling_settings(cfg, model, tokenizer)
    batcher = Batcher(engine, cfg.serve.max_queue, cfg.serve.batch_wait_ms / 1000.0)
    log.info("serving %s (%s)", cfg.serve.model_name, source)
    return Service(cfg, engine, tokenizer, model, batcher, base)


def run_server(cfg: Config) -> None:
    import uvicorn

    if cfg.serve.max_queue < 1:
        raise ConfigError(f"serve.max_queue: must be >= 1, got {cfg.serve.max_queue}")
    service = load_service(cfg)
    app = build_app(service)
    server = uvicorn.Server(uvicorn.Config(app, host=cfg.serve.host, port=cfg.serve.port, log_level="warning",
                                           timeout_graceful_shutdown=600))
    # uvicorn runs in a thread so that this (main) thread owns SIGTERM / SIGINT: they stop new
    # connections, the requests in flight finish, and the job returns (exit code 0).
    def stop(signum, _frame):
        print(f"serve: {signal.Signals(signum).name}: finishing the requests in flight", flush=True)
        server.should_exit = True

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    thread = threading.Thread(target=server.run, name="uvicorn")
    thread.start()
    print(f"serve: {cfg.serve.model_name} on http://{cfg.serve.host}:{cfg.serve.port}/v1", flush=True)
    try:
        while thread.is_alive():
            thread.join(0.5)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        service.batcher.close()
    print("serve: stopped", flush=True)


@register_job("serve")
def serve_job(cfg: Config) -> None:
    run_server(cfg)

