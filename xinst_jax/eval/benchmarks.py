"""Log-likelihood benchmarks through the engine's scoring (`Engine.score`: batched and bucketed
like generation, rows split over the mesh's data axis): XCOPA as lm-evaluation-harness runs it,
and perplexity per language on held-out text as lm-evaluation-harness's `loglikelihood_rolling`
computes it. Every item's log-likelihoods are kept, so a run of lm-eval against our `serve`
endpoint can be compared item for item.

XCOPA (lm-eval `lm_eval/tasks/xcopa/`: utils.py and default_<lang>.yaml, task version 1.0):

    context       premise.strip()[:-1] + " " + connector[question]   (the final period dropped)
    connector     per language, cause / effect (XCOPA_CONNECTORS, lm-eval's table): id karena /
                  maka, sw kwa sababu / kwa hiyo, ta காரணமாக / எனவே, th เพราะ / ดังนั้น,
                  tr çünkü / bu yüzden, vi bởi vì / vì vậy (and et ht it qu zh)
    choices       choice1, choice2 with the first letter lower-cased
    continuation  target_delimiter " " + choice
    prediction    argmax over the two sums of continuation log-probabilities (ties: the first)
    metric        acc (mean of correct), with lm-eval's standard error sqrt(var_sample / n)

Tokenisation is lm-eval's `_encode_pair` for causal models: context_ids = encode(context),
whole = encode(context + continuation), continuation_ids = whole[len(context_ids):]; lm-eval adds
no BOS (`add_bos_token` defaults to False) and neither do we by default (`add_bos`; pass
`add_bos_token=True` to lm-eval when comparing a run with add_bos=True). Data: the files in
lm-eval's layout <dir>/<lang>/val.<lang>.jsonl (or test.<lang>.jsonl); lm-eval's xcopa task
scores the *test* split when it has one, so compare against lm-eval run on the same split.

Perplexity (lm-eval `loglikelihood_rolling`, as its wikitext task): each document's tokens
(encode without special tokens) are cut into disjoint windows of at most `max_seq_len`
predicted tokens; the first window is predicted from the prefix token (BOS, else EOS), each
later one from the `max_seq_len` tokens before it reaching back as far as the window allows
(context_len 1: lm-eval's default). `max_seq_len` defaults to the engine's largest score
bucket - 1. Per language: documents, tokens, bytes (UTF-8), words (whitespace-separated: Thai
has few, so its word perplexity is not comparable), the summed log-likelihood, and

    token_perplexity  exp(-ll / tokens)    (depends on the tokenizer)
    byte_perplexity   exp(-ll / bytes)
    bits_per_byte     -ll / bytes / ln 2    (comparable across tokenizers)
    word_perplexity   exp(-ll / words)
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from xinst_jax import paths
from xinst_jax.config import ConfigError
from xinst_jax.data.records import json_objects

XCOPA_CONNECTORS: dict[str, dict[str, str]] = {
    "et": {"cause": "sest", "effect": "seetõttu"},
    "ht": {"cause": "poukisa", "effect": "donk sa"},
    "it": {"cause": "perché", "effect": "quindi"},
    "id": {"cause": "karena", "effect": "maka"},
    "qu": {"cause": "imataq", "effect": "chaymi"},
    "sw": {"cause": "kwa sababu", "effect": "kwa hiyo"},
    "zh": {"cause": "因为", "effect": "所以"},
    "ta": {"cause": "காரணமாக", "effect": "எனவே"},
    "th": {"cause": "เพราะ", "effect": "ดังนั้น"},
    "tr": {"cause": "çünkü", "effect": "bu yüzden"},
    "vi": {"cause": "bởi vì", "effect": "vì vậy"},
}
TARGET_DELIMITER = " "  # lm-eval's default for multiple_choice tasks
# lm-eval task files for XCOPA over local files with lm-eval's own xcopa prompts (`--include_path`):
# lm-eval's local-completions against our `serve` scores them as score_xcopa does, item for item.
LM_EVAL_TASKS = Path(__file__).resolve().parent / "lm_eval_tasks"
XCOPA_SPLITS = ("val", "test")  # file stems lm-eval's layout uses: <lang>/<split>.<lang>.jsonl
XCOPA_FIELDS = ("premise", "choice1", "choice2", "question", "label")


# --------------------------------------------------------------------------- XCOPA


def convert_choice(choice: str) -> str:
    return choice[0].lower() + choice[1:]


def xcopa_context(doc: dict, lang: str) -> str:
    return doc["premise"].strip()[:-1] + f" {XCOPA_CONNECTORS[lang][doc['question']]}"


def xcopa_choices(doc: dict) -> list[str]:
    return [convert_choice(doc["choice1"]), convert_choice(doc["choice2"])]


def xcopa_file(root: Any, lang: str, split: str = "val") -> Any:
    """<root>/<lang>/<split>.<lang>.jsonl; root local or gs:// (the path layer)."""
    return paths.as_path(paths.join(root, lang, f"{split}.{lang}.jsonl"))


def read_xcopa(path: Any, lang: str, key: str = "eval.xcopa") -> list[dict]:
    """XCOPA items of one file; any bad line is a ConfigError naming file:line and field."""
    if lang not in XCOPA_CONNECTORS:
        raise ConfigError(f"{key}: XCOPA has no language {lang!r} (known: {', '.join(sorted(XCOPA_CONNECTORS))})")
    docs = []
    for where, doc in json_objects(path, key):
        for fld in XCOPA_FIELDS:
            if fld not in doc:
                raise ConfigError(f"{where}: {fld}: missing")
        for fld in ("premise", "choice1", "choice2"):
            if not isinstance(doc[fld], str) or not doc[fld].strip():
                raise ConfigError(f"{where}: {fld}: expected a non-empty string")
        if doc["question"] not in ("cause", "effect"):
            raise ConfigError(f"{where}: question: expected 'cause' or 'effect', got {doc['question']!r}")
        if doc["label"] not in (0, 1) or isinstance(doc["label"], bool):
            raise ConfigError(f"{where}: label: expected 0 or 1, got {doc['label']!r}")
        doc.setdefault("idx", len(docs))
        docs.append(doc)
    if not docs:
        raise ConfigError(f"{key}: {path}: no items")
    return docs


def encode_pair(tokenizer, context: str, continuation: str, add_bos: bool = False) -> tuple[list[int], list[int]]:
    """lm-eval's `_encode_pair` for causal models (trailing spaces of the context move to the
    continuation; the continuation's ids are the whole string's ids after the context's)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tokenizer.encode(context + continuation, add_special_tokens=add_bos)
    ctx = tokenizer.encode(context, add_special_tokens=add_bos)
    return ctx, whole[len(ctx):]


def prefix_token(tokenizer) -> int:
    """lm-eval's prefix_token_id: BOS when the tokenizer has one, else EOS."""
    tok = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
    if tok is None:
        raise ValueError(f"tokenizer {tokenizer.path}: neither BOS nor EOS; no prefix token for scoring")
    return int(tok)


def xcopa_requests(tokenizer, docs: Sequence[dict], lang: str, add_bos: bool = False
                   ) -> tuple[list[list[int]], list[list[int]]]:
    """(contexts, continuations): two requests per item, choice1 then choice2."""
    prompts, conts = [], []
    for doc in docs:
        ctx = xcopa_context(doc, lang)
        for choice in xcopa_choices(doc):
            p, c = encode_pair(tokenizer, ctx, TARGET_DELIMITER + choice, add_bos)
            if not p:  # lm-eval: an empty context is the prefix token
                p = [prefix_token(tokenizer)]
            prompts.append(p)
            conts.append(c)
    return prompts, conts


def mean_stderr(values: Sequence[float]) -> Optional[float]:
    """lm-eval's mean_stderr: sample standard deviation / sqrt(n)."""
    n = len(values)
    if n < 2:
        return None
    mu = sum(values) / n
    return math.sqrt(sum((v - mu) ** 2 for v in values) / (n - 1)) / math.sqrt(n)


def xcopa_items(docs: Sequence[dict], lang: str, sums: Sequence[float], greedy: Sequence[bool],
                num_tokens: Sequence[int], truncated: Sequence[bool]) -> list[dict]:
    """Per item: the two choices' log-likelihoods, prediction and correctness."""
    items = []
    for i, doc in enumerate(docs):
        ll = [float(sums[2 * i]), float(sums[2 * i + 1])]
        pred = int(np.argmax(ll))
        items.append({"idx": doc.get("idx", i), "lang": lang, "question": doc["question"], "label": int(doc["label"]),
                      "context": xcopa_context(doc, lang), "choices": xcopa_choices(doc), "loglikelihoods": ll,
                      "is_greedy": [bool(greedy[2 * i]), bool(greedy[2 * i + 1])],
                      "num_tokens": [int(num_tokens[2 * i]), int(num_tokens[2 * i + 1])],
                      "truncated": bool(truncated[2 * i] or truncated[2 * i + 1]),
                      "pred": pred, "acc": int(pred == int(doc["label"]))})
    return items


def score_xcopa(engine, tokenizer, docs: Sequence[dict], lang: str, add_bos: bool = False) -> list[dict]:
    """Score one language's items with the engine (one batched call for both choices of all)."""
    if not docs:
        return []
    prompts, conts = xcopa_requests(tokenizer, docs, lang, add_bos)
    out = engine.score(prompts, conts)
    return xcopa_items(docs, lang, out.sum_logprob, out.is_greedy, out.num_tokens, out.truncated)


def xcopa_summary(items: Sequence[dict]) -> dict:
    accs = [it["acc"] for it in items]
    n = len(accs)
    err = mean_stderr(accs)
    return {"n": n, "acc": round(sum(accs) / n, 4) if n else None,
            "acc_stderr": round(err, 4) if err is not None else None,
            "truncated": sum(int(it["truncated"]) for it in items)}


# --------------------------------------------------------------------------- perplexity


def rolling_windows(tokens: Sequence[int], prefix: int, max_seq_len: int, context_len: int = 1
                    ) -> list[tuple[list[int], list[int]]]:
    """lm-eval's get_rolling_token_windows + make_disjoint_window: (context, continuation) pairs
    whose continuations cover `tokens` exactly once, each row at most max_seq_len + 1 tokens."""
    if not 1 <= context_len <= max_seq_len:
        raise ValueError(f"context_len must be in [1, max_seq_len={max_seq_len}], got {context_len}")
    tokens = list(tokens)
    if not tokens:
        return []
    pred_len = max_seq_len - context_len + 1
    windows = []
    first = min(max_seq_len, len(tokens))
    windows.append(([prefix] + tokens[:first - 1], tokens[:first]))
    predicted = first
    while predicted < len(tokens):
        n = min(len(tokens) - predicted, pred_len)
        end = predicted + n
        windows.append((tokens[max(0, end - max_seq_len - 1):end - 1], tokens[end - n:end]))
        predicted += n
    # make_disjoint_window: the context is what comes before the continuation
    return [(a[:len(a) - (len(b) - 1)], b) for a, b in windows]


@dataclasses.dataclass
class PerplexityDoc:
    id: str
    lang: str
    text: str


def score_perplexity(engine, tokenizer, docs: Sequence[PerplexityDoc], max_seq_len: Optional[int] = None
                     ) -> list[dict]:
    """Per document: {id, lang, loglikelihood, tokens, bytes, words, windows}; all windows of all
    documents go to the engine in one batched call."""
    if max_seq_len is None:
        max_seq_len = engine.score_buckets[-1] - 1
    prefix = prefix_token(tokenizer)
    prompts, conts, owner = [], [], []
    per_doc = []
    for d, doc in enumerate(docs):
        toks = tokenizer.encode(doc.text, add_special_tokens=False)
        wins = rolling_windows(toks, prefix, max_seq_len)
        for ctx, cont in wins:
            prompts.append(ctx)
            conts.append(cont)
            owner.append(d)
        per_doc.append({"id": doc.id, "lang": doc.lang, "tokens": len(toks), "bytes": len(doc.text.encode("utf-8")),
                        "words": len(re.split(r"\s+", doc.text)), "windows": len(wins), "loglikelihood": 0.0})
    if prompts:
        out = engine.score(prompts, conts)
        for d, s in zip(owner, out.sum_logprob):
            per_doc[d]["loglikelihood"] += float(s)
    return per_doc


def perplexity_summary(per_doc: Sequence[dict]) -> dict:
    """Per language over its documents (module docstring)."""
    langs: dict[str, list[dict]] = {}
    for d in per_doc:
        langs.setdefault(d["lang"], []).append(d)
    out = {}
    for lang, ds in sorted(langs.items()):
        ll = sum(d["loglikelihood"] for d in ds)
        tokens, nbytes, words = (sum(d[k] for d in ds) for k in ("tokens", "bytes", "words"))
        out[lang] = {"documents": len(ds), "tokens": tokens, "bytes": nbytes, "words": words,
                     "loglikelihood": round(ll, 4),
                     "token_perplexity": _exp(-ll / tokens) if tokens else None,
                     "byte_perplexity": _exp(-ll / nbytes) if nbytes else None,
                     "bits_per_byte": round(-ll / nbytes / math.log(2), 6) if nbytes else None,
                     "word_perplexity": _exp(-ll / words) if words else None}
    return out


def _exp(x: float) -> Any:
    try:
        return round(math.exp(x), 6)
    except OverflowError:
        return float("inf")
