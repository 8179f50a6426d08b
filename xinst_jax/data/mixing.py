"""Language mixing: target sampling probabilities and the realised-mix report (no TensorFlow).

Temperature sampling (T5/mT5, SeqIO mixtures): p_l ∝ n_l^(1/T) over the example counts n_l, so
T = 1 samples in proportion to the data and a large T tends to uniform. Explicit weights are
normalised as given; a language without a weight (or with weight 0) is left out.
"""

from __future__ import annotations

import math
from typing import Mapping

from xinst_jax.config import ConfigError

COUNT_KEYS = ("examples", "num_examples", "count", "kept", "n")


def mixing_probabilities(counts: Mapping[str, int], mixing: str, temperature: float,
                         weights: Mapping[str, float]) -> dict[str, float]:
    """{lang: probability} over the languages that are sampled (sorted by language code)."""
    present = {lang: int(n) for lang, n in sorted(counts.items()) if int(n) > 0}
    if not present:
        raise ConfigError("data: the prepared data holds no examples (every language count is 0)")
    if mixing == "temperature":
        if not temperature > 0 or not math.isfinite(temperature):
            raise ConfigError(f"data.temperature: expected a finite number > 0, got {temperature}")
        # n^(1/T) computed in log space relative to the largest count (no overflow for tiny T)
        top = max(present.values())
        raw = {lang: math.exp(math.log(n / top) / temperature) for lang, n in present.items()}
    elif mixing == "weights":
        if not weights:
            raise ConfigError("data.weights: mixing=weights needs at least one language weight")
        for lang, w in weights.items():
            if not w >= 0 or not math.isfinite(w):
                raise ConfigError(f"data.weights.{lang}: expected a finite weight >= 0, got {w}")
            if w > 0 and lang not in present:
                raise ConfigError(f"data.weights.{lang}: no '{lang}' examples in the prepared data "
                                  f"(it has {', '.join(present) or 'none'})")
        raw = {lang: float(weights.get(lang, 0.0)) for lang in present if weights.get(lang, 0.0) > 0}
        if not raw:
            raise ConfigError("data.weights: every weight is 0")
    else:
        raise ConfigError(f"data.mixing: expected 'temperature' or 'weights', got {mixing!r}")
    total = sum(raw.values())
    return {lang: w / total for lang, w in raw.items()}


def language_counts(manifest: dict, where: str) -> dict[str, int]:
    """Per-language example counts of a prepared directory's manifest.json (`where` names it).

    The prepare job writes {"languages": {lang: {"examples": n, ...}}}; {"languages": {lang: n}}
    (also under `lang_counts`, `counts`, `per_language`, `examples_per_lang`) is accepted, and
    so are per-shard counts {"shards": [{"languages": {lang: n}}, ...]}, which are summed.
    """
    counts = _counts_in(manifest)
    if counts is None and isinstance(manifest.get("shards"), list):
        summed: dict[str, int] = {}
        for shard in manifest["shards"]:
            part = _counts_in(shard) if isinstance(shard, dict) else None
            if part is None:
                summed = {}
                break
            for lang, n in part.items():
                summed[lang] = summed.get(lang, 0) + n
        counts = summed or None
    if counts is None:
        raise ConfigError(f"{where}: no per-language example counts (expected a 'languages' mapping "
                          f"lang -> count; top-level keys are {', '.join(sorted(manifest)) or 'none'})")
    return counts


def _counts_in(d: dict) -> dict[str, int] | None:
    for key in ("languages", "lang_counts", "counts", "per_language", "examples_per_lang"):
        value = d.get(key)
        if not isinstance(value, dict) or not value:
            continue
        out = {}
        for lang, v in value.items():
            if isinstance(v, bool):
                return None
            if isinstance(v, (int, float)):
                out[lang] = int(v)
            elif isinstance(v, dict) and any(isinstance(v.get(k), int) for k in COUNT_KEYS):
                out[lang] = int(next(v[k] for k in COUNT_KEYS if isinstance(v.get(k), int)))
            else:
                return None
        return out
    return None


def format_mix(target: Mapping[str, float], realised: Mapping[str, Mapping[str, int]]) -> str:
    """One log line: realised share of segments per language against its target probability."""
    total = sum(r["examples"] for r in realised.values()) or 1
    return " ".join(f"{lang} {100 * realised.get(lang, {}).get('examples', 0) / total:.1f}%"
                    f" (target {100 * p:.1f}%)" for lang, p in target.items())
