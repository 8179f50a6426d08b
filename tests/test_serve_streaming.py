"""Streaming as the engine decodes (`stream: true`): text released in whole characters and cut at
stop strings exactly where the whole answer is cut (serve/detok.py), then the real server on
loopback through the `openai` client: many content chunks, the first long before the answer is
done, the chunks joining to the plain answer, concurrent streams batched together."""

from __future__ import annotations

import concurrent.futures
import itertools
import json
import random
import time
import urllib.request

import pytest

openai = pytest.importorskip("openai")

from data_helpers import EDGE_TEXTS, train_small_tokenizer  # noqa: E402
from test_serve import client, start_server  # noqa: E402
from xinst_jax.data.tokenizer import ByteTokenizer, load_tokenizer  # noqa: E402
from xinst_jax.infer.job import output_text  # noqa: E402
from xinst_jax.infer.sampling import SamplingSettings  # noqa: E402
from xinst_jax.serve.detok import IncrementalDecoder, StopText, token_pieces  # noqa: E402

MIXED = "ภาษาไทย 🙂 Kiswahili தமிழ் Tiếng Việt"


def cut_at_stops(text: str, stops: list[str]) -> str:
    """The whole answer's rule, restated here as the reference: cut before the earliest stop string."""
    return text[:min([text.find(s) for s in stops if s in text], default=len(text))]

GREEDY = SamplingSettings(max_new_tokens=8, temperature=0.0)


# --------------------------------------------------------------------------- text, piece by piece


def test_byte_tokens_are_released_in_whole_characters():
    tok = ByteTokenizer()
    decoder = IncrementalDecoder(tok)
    pieces = [decoder.push([t]) for t in tok.encode(MIXED, add_special_tokens=False)] + [decoder.flush()]
    assert "".join(pieces) == MIXED and not any("\ufffd" in p for p in pieces)
    assert len([p for p in pieces if p]) == len(MIXED)  # each character goes out with its last byte
    rng = random.Random(0)  # a random model's bytes, invalid UTF-8 included: the pieces still join to decode()
    ids = [rng.randrange(0, 259) for _ in range(300)]
    assert "".join(token_pieces(tok, ids)) == tok.decode(ids)


def test_sentencepiece_pieces_join_to_the_decoded_text(tmp_path):
    tok = load_tokenizer(str(train_small_tokenizer(tmp_path / "tok", EDGE_TEXTS * 20 + [MIXED] * 20, 400)))
    for text in [MIXED, " leading space", "two  spaces", *EDGE_TEXTS[:20]]:
        ids = tok.encode(text, add_special_tokens=False)
        assert "".join(token_pieces(tok, ids)) == tok.decode(ids), text
        for size in (2, 3):  # pushed a few tokens at a time, as decode chunks arrive
            decoder = IncrementalDecoder(tok)
            got = "".join(decoder.push(ids[i:i + size]) for i in range(0, len(ids), size)) + decoder.flush()
            assert got == tok.decode(ids), text


@pytest.mark.parametrize("text, stops", [
    ("hello world, bye", ["wor"]), ("xyw", ["xyz", "y"]), ("xyz", ["xyz", "y"]), ("aaab", ["aab"]),
    ("no stop here", ["zz", "q"]), ("ends with a partial st", ["stop"]), ("ภาษาไทย🙂x", ["🙂"]),
])
def test_streamed_text_is_cut_where_the_whole_answer_is(text, stops):
    want = cut_at_stops(text, stops)
    assert output_text(ByteTokenizer(), ByteTokenizer().encode(text, add_special_tokens=False), "length",
                       GREEDY, stops) == (want, "stop" if want != text else "length")
    for cut_points in itertools.combinations(range(1, len(text)), min(3, len(text) - 1)):
        bounds = [0, *cut_points, len(text)]
        stop = StopText(stops)
        parts = [stop.add(text[a:b], last=b == len(text)) for a, b in zip(bounds, bounds[1:])]
        assert "".join(parts) == want, (bounds, parts)


# --------------------------------------------------------------------------- the engine's progress


def test_engine_reports_each_token_once_as_it_decodes():
    """generate(progress=...): after every chunk each running row's new tokens (none twice, none
    dropped: the calls join to the row's output), the last call with the finish reason; a smaller
    chunk_steps for the call gives the same tokens. The continuous schedule reads only the new
    tokens off the device (windows a chunk wide, not the history). Static batches report each row
    once, with all its tokens."""
    import numpy as np

    from test_generate import random_prompts, tiny_cfg, tiny_params
    from xinst_jax.infer.generate import Engine

    cfg = tiny_cfg()
    engine = Engine(tiny_params(cfg, seed=2), cfg, batch_size=4, buckets=(8,), refill_size=2, schedule="continuous")
    prompts = random_prompts(cfg.vocab_size, [3, 8, 5, 7, 2, 6], seed=1)
    settings = SamplingSettings(max_new_tokens=24, temperature=0.0, no_repeat_ngram=0)
    limits = np.random.default_rng(0).integers(4, 25, size=len(prompts)).tolist()
    calls: dict[int, list] = {i: [] for i in range(len(prompts))}
    out = engine.generate(prompts, settings, max_new_tokens=limits, chunk_steps=3,
                          progress=lambda i, new, finish: calls[i].append((list(new), finish)))
    widths = {k[-1] for k in engine.trace_counts if k[0] == "read_tokens"}
    assert widths == {4}, widths  # read off the device: a chunk's window per row, never the history
    assert out.tokens == engine.generate(prompts, settings, max_new_tokens=limits).tokens  # chunk 64: same
    for i, seen in calls.items():
        assert [t for new, _ in seen for t in new] == out.tokens[i]  # each token exactly once, in order
        assert [finish for _, finish in seen] == [None] * (len(seen) - 1) + [out.finish_reasons[i]]
        assert all(1 <= len(new) <= 4 for new, _ in seen)  # one chunk's tokens (3 steps; +1 from the refill)
    assert max(len(seen) for seen in calls.values()) >= 4  # reported while decoding, not only at the end
    calls = {i: [] for i in range(len(prompts))}
    engine.generate(prompts, settings, max_new_tokens=limits, schedule="static",
                    progress=lambda i, new, finish: calls[i].append((list(new), finish)))
    assert calls == {i: [(out.tokens[i], out.finish_reasons[i])] for i in calls}


# --------------------------------------------------------------------------- over the server


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from data_helpers import tiny_hf_model

    model_dir = tiny_hf_model(tmp_path_factory.mktemp("streamed") / "hf", seed=5)
    proc, url = start_server(model_dir, tmp_path_factory.mktemp("serve"), "serve.batch_wait_ms=50")
    yield url
    proc.terminate()
    proc.wait(timeout=60)


def timed_stream(stream, chat: bool) -> tuple[list[tuple[float, str, int]], dict, list]:
    """[(seconds since the call, text, choice index)] per content chunk, finish reason per choice,
    usage chunks."""
    t0 = time.perf_counter()
    chunks, finish, usage = [], {}, []
    for event in stream:
        if getattr(event, "usage", None):
            usage.append(event.usage)
        for ch in event.choices:
            text = (ch.delta.content if chat else ch.text) or ""
            if text:
                chunks.append((time.perf_counter() - t0, text, ch.index))
            if ch.finish_reason:
                finish[ch.index] = ch.finish_reason
    return chunks, finish, usage


def joined(chunks: list[tuple[float, str, int]]) -> dict[int, str]:
    texts: dict[int, str] = {}
    for _, text, index in chunks:
        texts[index] = texts.get(index, "") + text
    return texts


def test_tokens_stream_while_the_answer_is_decoded(server):
    c = client(server)
    ask = dict(model="xinst", prompt="Habari ya asubuhi", max_tokens=400, temperature=0)
    plain = c.completions.create(**ask)  # also compiles what the streamed request runs
    assert plain.usage.completion_tokens == 400  # this model does not stop early on this prompt
    t0 = time.perf_counter()
    chunks, finish, _ = timed_stream(c.completions.create(**ask, stream=True), chat=False)
    total = time.perf_counter() - t0
    assert joined(chunks) == {0: plain.choices[0].text}
    assert finish == {0: plain.choices[0].finish_reason}
    assert len(chunks) > 10, len(chunks)  # a chunk every few decode steps, not one at the end
    first = chunks[0][0]
    print(f"\n400 tokens streamed: first chunk after {first * 1000:.0f} ms, done after {total * 1000:.0f} ms, "
          f"{len(chunks)} chunks")
    assert first < 0.5 * total, (first, total)


def test_streamed_chat_with_usage_equals_the_plain_answer(server):
    c = client(server)
    ask = dict(model="xinst", messages=[{"role": "user", "content": "Eleza soko la Kariakoo."}], max_tokens=48,
               temperature=0, extra_body={"language": "sw"})
    plain = c.chat.completions.create(**ask)
    stream = c.chat.completions.create(**ask, stream=True, stream_options={"include_usage": True})
    chunks, finish, usage = timed_stream(stream, chat=True)
    assert joined(chunks) == {0: plain.choices[0].message.content}
    assert finish == {0: plain.choices[0].finish_reason}
    assert len(usage) == 1 and usage[0].prompt_tokens == plain.usage.prompt_tokens
    assert usage[0].completion_tokens == plain.usage.completion_tokens


def test_stream_stops_where_the_plain_answer_stops(server):
    c = client(server)
    ask = dict(model="xinst", prompt="Kila mtu ana haki", max_tokens=64, temperature=0)
    text = c.completions.create(**ask).choices[0].text
    stop = next(text[i:i + 2] for i in range(8, len(text) - 2) if "\ufffd" not in text[i:i + 2])
    plain = c.completions.create(**ask, stop=[stop])
    chunks, finish, _ = timed_stream(c.completions.create(**ask, stop=[stop], stream=True), chat=False)
    assert joined(chunks) == {0: plain.choices[0].text} and plain.choices[0].text == cut_at_stops(text, [stop])
    assert finish == {0: "stop"} and plain.choices[0].finish_reason == "stop"
    # echo: the prompt goes out first
    echoed, _, _ = timed_stream(c.completions.create(**ask, echo=True, stream=True), chat=False)
    assert echoed[0][1] == "Kila mtu ana haki" and joined(echoed) == {0: "Kila mtu ana haki" + text}


def test_concurrent_streams_are_batched_together(server):
    c = client(server)
    asks = [dict(model="xinst", prompt=f"swali la {i}", max_tokens=40, temperature=0.8, seed=7, n=1 + (i == 0))
            for i in range(4)]
    with urllib.request.urlopen(server + "/health", timeout=10) as r:
        before = json.loads(r.read())["batches"]
    with concurrent.futures.ThreadPoolExecutor(len(asks)) as pool:
        streamed = list(pool.map(lambda a: timed_stream(c.completions.create(**a, stream=True), chat=False), asks))
    with urllib.request.urlopen(server + "/health", timeout=10) as r:
        batches = json.loads(r.read())["batches"] - before
    assert batches < len(asks), f"{len(asks)} concurrent streams ran in {batches} engine batches"
    for ask, (chunks, finish, _) in zip(asks, streamed):  # each choice: the seeded answer, asked plainly
        plain = c.completions.create(**ask)
        assert finish == {ch.index: ch.finish_reason for ch in plain.choices}
        assert {i: joined(chunks).get(i, "") for i in finish} == {ch.index: ch.text for ch in plain.choices}
