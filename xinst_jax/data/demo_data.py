"""Cross-lingual demo pairs from Unicode CLDR (shipped inside the `babel` package).

No download: Babel carries each locale's names of countries, languages, currencies, months and
weekdays, and its date and number formats, all with known English meaning. Each pair is an
English instruction and a native-script answer, in X-Instruction's record schema. They are
short and formulaic — right for a demo that must run offline in minutes, not for model quality.
"""

from __future__ import annotations

import datetime
import json
import random
from pathlib import Path

from xinst_jax.config import LANGUAGES


def _pairs_for(lang: str, rng: random.Random, per_kind: int) -> list[tuple[str, str, str]]:
    from babel import Locale, dates, numbers

    en, native = Locale.parse("en"), Locale.parse(lang)
    pairs: list[tuple[str, str, str]] = []

    def sample(table_en: dict, table_native: dict, code_ok) -> list[str]:
        codes = sorted(c for c in table_en if c in table_native and code_ok(c))
        return rng.sample(codes, min(per_kind, len(codes)))

    for code in sample(en.territories, native.territories, lambda c: c.isalpha() and len(c) == 2):
        pairs.append(("country", f"What is the country {en.territories[code]} called?",
                      native.territories[code]))
    for code in sample(en.languages, native.languages, lambda c: c.isalpha() and len(c) == 2):
        pairs.append(("language", f"What is the {en.languages[code]} language called?", native.languages[code]))
    for code in sample(en.currencies, native.currencies, lambda c: c.isalpha()):
        pairs.append(("currency", f"What is the currency {en.currencies[code]} called?", native.currencies[code]))
    months = native.months["format"]["wide"]
    days = native.days["format"]["wide"]
    pairs.append(("months", "List the twelve months of the year, starting with January.",
                  ", ".join(months[i] for i in range(1, 13))))
    pairs.append(("weekdays", "List the days of the week, starting with Monday.",
                  ", ".join(days[i] for i in range(7))))
    for _ in range(per_kind):
        day = datetime.date(1950, 1, 1) + datetime.timedelta(days=rng.randrange(40000))
        pairs.append(("date", f"Write the date {day.isoformat()} in full, with the weekday.",
                      dates.format_date(day, "full", locale=lang)))
    for _ in range(per_kind):
        value = round(rng.uniform(0, 10 ** rng.randint(2, 9)), rng.randint(0, 3))
        pairs.append(("number", f"Write the number {value!r} with the usual digit grouping.",
                      numbers.format_decimal(value, locale=lang)))
    return pairs


def write_demo_pairs(path: str | Path, languages: list[str] | None = None, per_kind: int = 60,
                     seed: int = 0) -> dict[str, int]:
    """Write JSONL pair records for every language; returns the count per language."""
    languages = languages or list(LANGUAGES)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    with open(path, "w", encoding="utf-8") as f:
        for lang in languages:
            rng = random.Random(f"{seed}-{lang}")
            pairs = _pairs_for(lang, rng, per_kind)
            for i, (kind, instruction, output) in enumerate(pairs):
                record = {"id": f"cldr-{lang}-{i:05d}", "lang": lang, "instruction": instruction, "output": output,
                          "meta": {"source": "cldr", "kind": kind}}
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
            counts[lang] = len(pairs)
    return counts
