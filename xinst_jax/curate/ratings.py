"""Job `ratings`: a three-level rating set (best / flawed / worst) built from seed pairs, the
training data of the evaluator (configs/evaluator_xinst.yaml) that the refine stage uses.

    python launch/tpu_run.py --config evaluator_xinst --set job=ratings \\
        --set 'curate.seed_pairs=[{path: seed_pairs/*.jsonl}]' --set curate.out=curate/

Input: `curate.seed_pairs`, records {id, lang, instruction (English), output (target language)}
read by the one records reader (xinst_jax/data/records.py: `data.languages`, `data.max_chars`,
`data.strict`); bad lines are skipped and counted by reason. A pair repeating an earlier pair
(same lang, instruction and output) is dropped as `duplicate_pair`, one reusing an earlier id as
`duplicate_id` (a rating's id is its pair's id plus its label).

The scheme (`build_ratings`, SCHEME_VERSION): every seed pair gives exactly three ratings, one
per label, so each label is 1/3 of every language and the evaluator sees the same response under
each verdict (it cannot learn a verdict from the response alone):

  best    true_pair               the seed pair as it is
  flawed  near_instruction        the instruction of the pair's nearest other pair of the same
                                  language (most similar instruction: related, but not this text's)
          generic_instruction     an over-generic English instruction (GENERIC_INSTRUCTIONS) that
                                  fits any text and asks for none of this one
          truncated_output        the response cut to 25-60% of its characters at a word or
                                  sentence boundary (`truncate_output`)
  worst   mismatched_instruction  the instruction of a random non-near pair of the same language
          other_language_output   the response replaced by a random pair's response in another
                                  language (the prompt still names the pair's language)

Instruction similarity is the Jaccard index of character 4-gram shingles of the normalised
English instructions (casefolded, non-alphanumerics to spaces), computed exactly with a sparse
matrix product in blocks of rows. "Near" is the most similar other pair; "non-near" excludes
the most similar quarter of the other pairs (the nearest at least) when the language has two or
more others. Pairs with the very same normalised instruction are never donors.

Which flaw (and which worst kind) a pair gets: each language's pairs are shuffled with a
generator seeded by (`seed`, the language) and take the kinds in turn (flawed: near, generic,
truncated; worst: mismatched, other language), so the kinds are balanced within a label. A kind
that cannot be built for a pair (a text with no boundary in the 25-60% window, a language with
one other pair, a seed set of one language) passes to the next kind in the cycle; a language
whose pairs all share one instruction and no other language to borrow from is a ConfigError.
Everything depends only on the pairs (in input order) and `seed`: the same input and seed give
the same file, byte for byte.

Output: `<curate.out or run_dir>/ratings/`

    ratings.jsonl   {id: "<pair id>/<label>", lang, instruction, output, label,
                     meta: {scheme, source_id, donor_id (the pair that lent a field, when one did)}}
    manifest.json   input lines (in == kept + skipped by reason), pairs per language (in == kept +
                    dropped by reason), ratings per language per label and per scheme
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import math
import re
import time
import zlib
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from xinst_jax import paths
from xinst_jax.config import Config, ConfigError
from xinst_jax.curate.counts import StageCounts
from xinst_jax.data.records import RecordReader
from xinst_jax.data.templates import EVALUATOR_LABELS
from xinst_jax.jobs import register_job
from xinst_jax.shards import write_atomic, write_json

log = logging.getLogger(__name__)

SCHEME_VERSION = 1
SCHEMES: dict[str, tuple[str, ...]] = {
    "best": ("true_pair",),
    "flawed": ("near_instruction", "generic_instruction", "truncated_output"),
    "worst": ("mismatched_instruction", "other_language_output"),
}
assert tuple(SCHEMES) == EVALUATOR_LABELS
SCHEME_LABEL = {scheme: label for label, kinds in SCHEMES.items() for scheme in kinds}

# Instructions that fit any text and ask for nothing in particular.
GENERIC_INSTRUCTIONS = (
    "Write something.",
    "Write a text.",
    "Tell me about it.",
    "Write a paragraph.",
    "Give me some information.",
    "Say something interesting.",
    "Write about a topic of your choice.",
    "Explain this.",
    "Describe something.",
    "Answer the question.",
    "Write a few sentences.",
    "Tell me something.",
)
TRUNCATE_SHARE = (0.25, 0.60)  # a truncated response keeps this share of the characters
SHINGLE_CHARS = 4  # character shingles of the instructions (similarity)
NEAR_SHARE = 0.25  # the most similar share of the other pairs is "near": never a mismatched donor
SIMILARITY_BLOCK = 1024  # rows per block of the similarity product (bounds memory at n x 1024)
# Ends of sentences in the ten languages' scripts: Latin, Devanagari/Bengali danda, Urdu full
# stop, Arabic question mark, Thai has no sentence mark (spaces), CJK for good measure.
SENTENCE_END = ".!?\u0964\u0965\u06d4\u061f\u3002\uff01\uff1f"
MAX_LISTED_BAD = 20
MAX_KEPT_BAD = 10000


# --------------------------------------------------------------------------- text helpers


def normalize_instruction(text: str) -> str:
    """Casefolded, every run of non-alphanumeric characters one space."""
    return " ".join(re.sub(r"[\W_]+", " ", text.casefold()).split())


def shingles(text: str, k: int = SHINGLE_CHARS) -> set[str]:
    """Character k-grams of the normalised text with a space at both ends (short texts: whole)."""
    t = f" {normalize_instruction(text)} "
    if len(t) <= k:
        return {t}
    return {t[i:i + k] for i in range(len(t) - k + 1)}


def _shingle_matrix(instructions: Sequence[str]):
    """Binary [n, shingles] CSR matrix of the instructions' shingle sets, and the set sizes."""
    from scipy import sparse

    vocab: dict[str, int] = {}
    indptr, indices = [0], []
    for text in instructions:
        cols = sorted({vocab.setdefault(s, len(vocab)) for s in shingles(text)})
        indices.extend(cols)
        indptr.append(len(indices))
    x = sparse.csr_matrix((np.ones(len(indices), np.float64), indices, indptr),
                          shape=(len(instructions), max(len(vocab), 1)))
    return x, np.asarray(x.sum(axis=1)).ravel()


def _jaccard_rows(x, sizes: np.ndarray, rows: slice) -> np.ndarray:
    inter = (x[rows] @ x.T).toarray()
    return inter / np.maximum(sizes[rows][:, None] + sizes[None, :] - inter, 1.0)


def similarity_matrix(instructions: Sequence[str]) -> np.ndarray:
    """Jaccard index of the instructions' character-shingle sets, [n, n] float64."""
    x, sizes = _shingle_matrix(instructions)
    return _jaccard_rows(x, sizes, slice(0, len(instructions)))


def _cut_points(text: str) -> list[int]:
    """Where a text may be cut (the kept prefix is text[:i]): before whitespace that follows a
    non-space (a word boundary; also every sentence end followed by a space) and after a sentence
    mark that is followed by a non-space (a sentence end written without a space)."""
    cuts = []
    for i in range(1, len(text)):
        prev, ch = text[i - 1], text[i]
        if ch.isspace() and not prev.isspace():
            cuts.append(i)
        elif prev in SENTENCE_END and not ch.isspace() and ch not in SENTENCE_END:
            cuts.append(i)
    return cuts


def truncate_output(text: str, rng: np.random.Generator) -> Optional[str]:
    """The text cut at the word or sentence boundary nearest to a uniformly drawn share in
    TRUNCATE_SHARE of its (right-stripped) length, or None when no boundary lies in that window."""
    body = text.rstrip()
    n = len(body)
    lo, hi = math.ceil(TRUNCATE_SHARE[0] * n), math.floor(TRUNCATE_SHARE[1] * n)
    target = rng.uniform(*TRUNCATE_SHARE) * n
    cuts = [i for i in _cut_points(body) if lo <= len(body[:i].rstrip()) <= hi and body[:i].strip()]
    if not cuts:
        return None
    best = min(cuts, key=lambda i: (abs(i - target), i))
    return body[:best].rstrip()


# --------------------------------------------------------------------------- the scheme


@dataclasses.dataclass
class _Language:
    """One language's pairs and their instruction neighbourhoods."""

    pairs: list[dict]
    nearest: list[Optional[int]]  # most similar other pair with a different instruction
    far: list[list[int]]  # non-near others with a different instruction (mismatched donors)


def _neighbourhoods(pairs: list[dict]) -> _Language:
    instructions = [p["instruction"] for p in pairs]
    norm_ids: dict[str, int] = {}
    norm = np.array([norm_ids.setdefault(normalize_instruction(t), len(norm_ids)) for t in instructions], np.int64)
    n = len(pairs)
    x, sizes = _shingle_matrix(instructions)
    positions = np.arange(n)
    nearest: list[Optional[int]] = []
    far: list[list[int]] = []
    for start in range(0, n, SIMILARITY_BLOCK):
        block = _jaccard_rows(x, sizes, slice(start, min(start + SIMILARITY_BLOCK, n)))
        for r, sims in enumerate(block):
            others = np.flatnonzero(norm != norm[start + r])  # never itself, never the same instruction
            if len(others) == 0:
                nearest.append(None)
                far.append([])
                continue
            # most similar first; ties by position, so the order is a pure function of the input
            order = others[np.lexsort((positions[others], -sims[others]))]
            nearest.append(int(order[0]))
            n_near = max(1, math.ceil(NEAR_SHARE * len(order))) if len(order) >= 2 else 0
            far.append(sorted(int(j) for j in order[n_near:]))
    return _Language(pairs, nearest, far)


def _lang_rng(seed: int, lang: str, stream: int) -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(lang.encode("utf-8")), stream])


def _rating(pair: dict, label: str, scheme: str, instruction: str, output: str, donor: Optional[dict]) -> dict:
    meta = {"scheme": scheme, "source_id": pair["id"]}
    if donor is not None:
        meta["donor_id"] = donor["id"]
    return {"id": f"{pair['id']}/{label}", "lang": pair["lang"], "instruction": instruction, "output": output,
            "label": label, "meta": meta}


def _flawed(lang: _Language, i: int, kind: str, rng: np.random.Generator) -> Optional[dict]:
    pair = lang.pairs[i]
    if kind == "near_instruction":
        # with a single other pair, that pair is the mismatched donor: near needs two others
        j = lang.nearest[i]
        if j is None or not any(k != j for k in lang.far[i]):
            return None
        return _rating(pair, "flawed", kind, lang.pairs[j]["instruction"], pair["output"], lang.pairs[j])
    if kind == "generic_instruction":
        own = normalize_instruction(pair["instruction"])
        choices = [g for g in GENERIC_INSTRUCTIONS if normalize_instruction(g) != own]
        return _rating(pair, "flawed", kind, choices[int(rng.integers(len(choices)))], pair["output"], None)
    if kind == "truncated_output":
        cut = truncate_output(pair["output"], rng)
        return None if cut is None else _rating(pair, "flawed", kind, pair["instruction"], cut, None)
    raise AssertionError(kind)


def _worst(lang: _Language, i: int, kind: str, rng: np.random.Generator,
           others: dict[str, list[dict]]) -> Optional[dict]:
    pair = lang.pairs[i]
    if kind == "mismatched_instruction":
        donors = lang.far[i] or ([lang.nearest[i]] if lang.nearest[i] is not None else [])
        if not donors:
            return None
        donor = lang.pairs[donors[int(rng.integers(len(donors)))]]
        return _rating(pair, "worst", kind, donor["instruction"], pair["output"], donor)
    if kind == "other_language_output":
        if not others:
            return None
        codes = sorted(others)
        pool = others[codes[int(rng.integers(len(codes)))]]
        donor = pool[int(rng.integers(len(pool)))]
        return _rating(pair, "worst", kind, pair["instruction"], donor["output"], donor)
    raise AssertionError(kind)


def _assign(lang: _Language, label: str, rng: np.random.Generator, build) -> list[dict]:
    """One rating of `label` per pair: shuffled, the kinds taken in turn; an impossible kind
    passes to the next one in the cycle."""
    kinds = SCHEMES[label]
    out: list[Optional[dict]] = [None] * len(lang.pairs)
    for k, i in enumerate(rng.permutation(len(lang.pairs))):
        i = int(i)
        for step in range(len(kinds)):
            rating = build(i, kinds[(k + step) % len(kinds)])
            if rating is not None:
                out[i] = rating
                break
        else:
            code = lang.pairs[i]["lang"]
            raise ConfigError(f"curate.seed_pairs: language {code}: cannot build a {label} rating for pair "
                              f"{lang.pairs[i]['id']!r} (every pair of {code} has the same instruction and no other "
                              "language lends a response)")
    return out  # type: ignore[return-value]


def build_ratings(pairs: list[dict], seed: int) -> list[dict]:
    """Three ratings (best, flawed, worst) per pair {id, lang, instruction, output}, in input
    order (module docstring). Pure: depends only on `pairs` and `seed`. A language with fewer
    than 2 pairs is a ConfigError naming it."""
    if not pairs:
        raise ConfigError("curate.seed_pairs: no pairs to build ratings from")
    by_lang: dict[str, list[dict]] = collections.defaultdict(list)
    for p in pairs:
        missing = [f for f in ("id", "lang", "instruction", "output") if not isinstance(p.get(f), str) or not p[f]]
        if missing:
            raise ConfigError(f"curate.seed_pairs: pair {p.get('id')!r}: missing or empty {', '.join(missing)}")
        by_lang[p["lang"]].append(p)
    few = sorted(code for code, ps in by_lang.items() if len(ps) < 2)
    if few:
        detail = ", ".join(f"{code} ({len(by_lang[code])} pair)" for code in few)
        raise ConfigError(f"curate.seed_pairs: every language needs at least 2 pairs to build ratings from; "
                          f"too few in {detail}")
    rated: dict[int, list[dict]] = {}
    for code in sorted(by_lang):
        lang = _neighbourhoods(by_lang[code])
        others = {c: ps for c, ps in by_lang.items() if c != code}
        flawed_rng, worst_rng = _lang_rng(seed, code, 1), _lang_rng(seed, code, 2)
        flawed = _assign(lang, "flawed", flawed_rng, lambda i, kind: _flawed(lang, i, kind, flawed_rng))
        worst = _assign(lang, "worst", worst_rng, lambda i, kind: _worst(lang, i, kind, worst_rng, others))
        for i, p in enumerate(lang.pairs):
            best = _rating(p, "best", "true_pair", p["instruction"], p["output"], None)
            rated[id(p)] = [best, flawed[i], worst[i]]
    return [r for p in pairs for r in rated[id(p)]]


# --------------------------------------------------------------------------- the job


def read_seed_pairs(cfg: Config) -> tuple[list[dict], RecordReader, StageCounts]:
    """Valid, de-duplicated pairs (input order), the reader (bad lines) and the per-language counts."""
    if not cfg.curate.seed_pairs:
        raise ConfigError("curate.seed_pairs: no inputs; set it to the seed pairs {id, lang, instruction, output}, "
                          "e.g. --set 'curate.seed_pairs=[{path: seed/*.jsonl}]'")
    data = cfg.data
    reader = RecordReader(data.languages, data.max_chars, data.strict, required=("instruction", "output"),
                          keep_bad=MAX_KEPT_BAD, log_first=0, strict_key="data.strict")
    counts = StageCounts()
    pairs: list[dict] = []
    seen_ids: set[str] = set()
    seen_pairs: set[tuple[str, str, str]] = set()
    for loc in reader.read_located(cfg.curate.seed_pairs, key="curate.seed_pairs"):
        r = loc.record
        key = (r["lang"], r["instruction"], r["output"])
        if key in seen_pairs:
            counts.add(r["lang"], "duplicate_pair")
            continue
        if r["id"] in seen_ids:
            counts.add(r["lang"], "duplicate_id")
            continue
        seen_pairs.add(key)
        seen_ids.add(r["id"])
        counts.add(r["lang"])
        pairs.append({"id": r["id"], "lang": r["lang"], "instruction": r["instruction"], "output": r["output"]})
    if not pairs:
        totals = reader.totals()
        reasons = ", ".join(f"{k} {v}" for k, v in totals["skipped"].items()) or "no records"
        raise ConfigError(f"curate.seed_pairs: no valid pairs in {', '.join(s.source for s in reader.stats)} "
                          f"({totals['in']} lines: {reasons})")
    return pairs, reader, counts


def tally(ratings: list[dict]) -> tuple[dict, dict]:
    """Ratings per language per label and per language per scheme, each with an `all` row."""
    labels: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    schemes: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for r in ratings:
        for lang in (r["lang"], "all"):
            labels[lang][r["label"]] += 1
            schemes[lang][r["meta"]["scheme"]] += 1
    order = sorted(k for k in labels if k != "all") + ["all"]
    return ({lang: {label: labels[lang][label] for label in EVALUATOR_LABELS} for lang in order if lang in labels},
            {lang: dict(sorted(schemes[lang].items())) for lang in order if lang in schemes})


def output_dir(cfg: Config) -> Path:
    return paths.as_path(cfg.curate.out or cfg.resolved_run_dir()) / "ratings"


def run_ratings(cfg: Config) -> dict:
    """The job body; returns the manifest (also <out>/ratings/manifest.json)."""
    start = time.perf_counter()
    pairs, reader, counts = read_seed_pairs(cfg)
    ratings = build_ratings(pairs, cfg.seed)
    out = output_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ratings).encode("utf-8")
    write_atomic(out / "ratings.jsonl", data)
    labels, schemes = tally(ratings)
    totals = reader.totals()
    manifest = {
        "stage": "ratings", "scheme_version": SCHEME_VERSION, "seed": cfg.seed,
        "inputs": [dataclasses.asdict(i) for i in cfg.curate.seed_pairs],
        "sources": [s.to_dict() for s in reader.stats],
        "input": totals,  # lines: in == kept + skipped_total
        "bad": list(reader.bad),
        "pairs": counts.to_dict(),  # per language: in == kept + dropped
        "ratings": len(ratings),
        "labels": labels,
        "schemes": schemes,
        "output": str(out / "ratings.jsonl"),
        "seconds": round(time.perf_counter() - start, 3),
    }
    write_json(out / "manifest.json", manifest)
    n_bad = totals["skipped_total"]
    if n_bad:
        reasons = ", ".join(f"{k} {v}" for k, v in totals["skipped"].items())
        print(f"ratings: skipped {n_bad} bad input line(s) ({reasons}):", flush=True)
        for line in reader.bad[:MAX_LISTED_BAD]:
            print(f"  {line}", flush=True)
        if n_bad > MAX_LISTED_BAD:
            print(f"  ... and {n_bad - MAX_LISTED_BAD} more (in {out / 'manifest.json'})", flush=True)
    print(f"ratings: {out / 'ratings.jsonl'}: {len(ratings)} ratings from {len(pairs)} pairs in "
          f"{len(labels) - 1} language(s) (best {labels['all']['best']}, flawed {labels['all']['flawed']}, "
          f"worst {labels['all']['worst']}); {n_bad} bad line(s) skipped\n{counts.summary()}", flush=True)
    return manifest


@register_job("ratings")
def ratings_job(cfg: Config) -> None:
    run_ratings(cfg)
