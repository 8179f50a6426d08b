"""Language fidelity: is each answer written in the language the prompt asked for?

Per answer:
  predicted     py3langid's best language (xinst_jax.curate.filters.language_scores, the full
                140-language model, normalised probabilities), with the labels of a language
                group merged, their probabilities summed, as the curation filters do
                (filters.LANGID_GROUPS: Malay `ms` counts as Indonesian `id`). An empty answer
                is predicted "(empty)".
  faithful      predicted == requested language
  scripts       letters (Unicode categories L* and M*: vowel signs and diacritics belong to their
                script) counted per script, the script read from the character's Unicode name
                (LATIN, THAI, BENGALI, DEVANAGARI, TAMIL, ARABIC, CJK -> Han, ...); combining
                marks shared by all scripts (U+0300..) and modifier letters are not counted
  mixed_script  the second most frequent script holds more than MIXED_SCRIPT_SHARE of the
                letters (e.g. a Thai answer with an English sentence in it)
  wrong_script  the most frequent script is not the language's own (EXPECTED_SCRIPT)

The Latin-script languages (fi, id, sw, tr, vi, and English) share one script: an Indonesian
answer to a Swahili prompt is neither mixed nor wrong by script, only language id catches it;
an English answer to a Thai prompt is both wrong by script and unfaithful.

Per language: answers, faithful, fidelity (= faithful / answers; empty answers count as
unfaithful), mixed_script and wrong_script counts and shares, empty answers; the confusion
table is requested language -> predicted label -> count, with every label py3langid gave.
"""

from __future__ import annotations

import unicodedata
from collections import Counter
from typing import Iterable, Optional, Sequence

from xinst_jax.curate.filters import LANGID_GROUPS, language_scores

MIXED_SCRIPT_SHARE = 0.2  # not yet a config key
EMPTY = "(empty)"

EXPECTED_SCRIPT = {
    "bn": "Bengali", "fi": "Latin", "hi": "Devanagari", "id": "Latin", "sw": "Latin", "ta": "Tamil",
    "th": "Thai", "tr": "Latin", "ur": "Arabic", "vi": "Latin", "en": "Latin",
}

# First word(s) of a Unicode character name -> script, where the first word is not the script.
_NAME_PREFIX = {"CJK": "Han", "FULLWIDTH": None, "HALFWIDTH": None, "COMBINING": "", "MODIFIER": ""}


def script_of(ch: str) -> Optional[str]:
    """The script of a letter or mark (None for anything else, or for marks shared by all
    scripts): from the first word of its Unicode name, title-cased."""
    cat = unicodedata.category(ch)
    if not (cat.startswith("L") or cat.startswith("M")):
        return None
    name = unicodedata.name(ch, "")
    if not name:
        return "Unknown"
    words = name.split()
    first = words[0]
    mapped = _NAME_PREFIX.get(first, first)
    if mapped is None:  # FULLWIDTH LATIN CAPITAL LETTER A -> Latin
        first = words[1] if len(words) > 1 else first
        mapped = _NAME_PREFIX.get(first, first)
    if mapped == "":
        return None
    return mapped if mapped == "Han" else mapped.capitalize()


def script_counts(text: str) -> Counter:
    counts: Counter = Counter()
    for ch in text:
        s = script_of(ch)
        if s:
            counts[s] += 1
    return counts


def script_profile(text: str, lang: str, mixed_share: float = MIXED_SCRIPT_SHARE) -> dict:
    """{scripts: {script: letters}, dominant, second_share, mixed, wrong_script}."""
    counts = script_counts(text)
    total = sum(counts.values())
    ranked = counts.most_common()
    dominant = ranked[0][0] if ranked else None
    second_share = ranked[1][1] / total if len(ranked) > 1 else 0.0
    expected = EXPECTED_SCRIPT.get(lang)
    return {"scripts": dict(ranked), "dominant": dominant, "second_share": round(second_share, 4),
            "mixed": second_share > mixed_share,
            "wrong_script": bool(dominant and expected and dominant != expected)}


# py3langid label -> the record language whose group holds it (ms -> id)
_CANONICAL = {label: lang for lang, labels in LANGID_GROUPS.items() for label in labels}


def predicted_language(text: str, lang: str) -> tuple[str, float]:
    """(label, probability) after merging language groups (filters.LANGID_GROUPS: Malay `ms`
    with Indonesian `id`, probabilities summed). `lang` is the requested language (unused by the
    label itself: a group's labels count as its language whatever was requested)."""
    if not text.strip():
        return EMPTY, 0.0
    grouped: Counter = Counter()
    for code, p in language_scores(text).items():
        grouped[_CANONICAL.get(code, code)] += p
    code, prob = grouped.most_common(1)[0]
    return code, float(prob)


def answer_fidelity(text: str, lang: str, mixed_share: float = MIXED_SCRIPT_SHARE) -> dict:
    """One answer's verdict: predicted, prob, faithful, empty, scripts, dominant, mixed, wrong_script."""
    pred, prob = predicted_language(text, lang)
    out = {"predicted": pred, "prob": round(prob, 4), "faithful": pred == lang, "empty": pred == EMPTY}
    out.update(script_profile(text, lang, mixed_share))
    return out


def fidelity_table(rows: Iterable[tuple[str, dict]], order: Optional[Sequence[str]] = None) -> dict:
    """(requested lang, answer_fidelity(...)) pairs -> {"per_language": {lang: counts and shares},
    "confusion": {lang: {predicted: n}}, "all": totals}; languages in `order` (default sorted)."""
    per: dict[str, Counter] = {}
    confusion: dict[str, Counter] = {}
    for lang, v in rows:
        c = per.setdefault(lang, Counter())
        c["answers"] += 1
        c["faithful"] += int(v["faithful"])
        c["mixed_script"] += int(v["mixed"])
        c["wrong_script"] += int(v["wrong_script"])
        c["empty"] += int(v["empty"])
        confusion.setdefault(lang, Counter())[v["predicted"]] += 1
    total: Counter = Counter()
    for c in per.values():
        total.update(c)
    langs = [lang for lang in order if lang in per] if order is not None else sorted(per)
    langs += sorted(set(per) - set(langs))
    return {"per_language": {lang: _shares(per[lang]) for lang in langs},
            "all": _shares(total),
            "confusion": {lang: dict(confusion[lang].most_common()) for lang in langs}}


def _shares(c: Counter) -> dict:
    n = c["answers"]
    out = {k: int(c[k]) for k in ("answers", "faithful", "mixed_script", "wrong_script", "empty")}
    out["fidelity"] = round(c["faithful"] / n, 4) if n else None
    out["mixed_script_share"] = round(c["mixed_script"] / n, 4) if n else None
    out["wrong_script_share"] = round(c["wrong_script"] / n, 4) if n else None
    return out


def confusion_columns(confusion: dict, languages: Iterable[str], max_columns: int = 14) -> list[str]:
    """Columns for a printed confusion table: the requested languages, English, then the most
    frequent other labels; the rest is lumped as "other" by `confusion_row`."""
    cols = [lang for lang in languages]
    if "en" not in cols:
        cols.append("en")
    others: Counter = Counter()
    for row in confusion.values():
        for label, n in row.items():
            if label not in cols and label != EMPTY:
                others[label] += n
    room = max(0, max_columns - len(cols))
    cols += [label for label, _ in others.most_common(room)]
    if any(EMPTY in row for row in confusion.values()):
        cols.append(EMPTY)
    return cols


def confusion_row(row: dict, columns: list[str]) -> tuple[list[int], int]:
    """Counts per column, and the count of labels outside the columns ("other")."""
    counts = [int(row.get(c, 0)) for c in columns]
    return counts, int(sum(row.values()) - sum(counts))
