"""Per-language counts of a curation stage: what came in, what was kept, what was dropped and
why. Every stage's manifest holds them and they add up: in == kept + sum(dropped), per language.
"""

from __future__ import annotations

import collections
from typing import Mapping


class StageCounts:
    """`counts.add(lang)` for a kept item, `counts.add(lang, reason)` for a dropped one."""

    def __init__(self) -> None:
        self.kept: collections.Counter = collections.Counter()
        self.dropped: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)

    def add(self, lang: str, reason: str | None = None, n: int = 1) -> None:
        if reason is None:
            self.kept[lang] += n
        else:
            self.dropped[lang][reason] += n

    def merge(self, other: "StageCounts | Mapping") -> "StageCounts":
        other = other if isinstance(other, StageCounts) else StageCounts.from_dict(other)
        self.kept.update(other.kept)
        for lang, reasons in other.dropped.items():
            self.dropped[lang].update(reasons)
        return self

    def languages(self) -> list[str]:
        return sorted(set(self.kept) | {lang for lang, r in self.dropped.items() if r})

    def total_in(self, lang: str | None = None) -> int:
        langs = [lang] if lang else self.languages()
        return sum(self.kept[x] + sum(self.dropped[x].values()) for x in langs)

    def total_kept(self) -> int:
        return sum(self.kept.values())

    def _row(self, langs: list[str]) -> dict:
        dropped: collections.Counter = collections.Counter()
        for lang in langs:
            dropped.update(self.dropped[lang])
        dropped = {k: v for k, v in sorted(dropped.items()) if v}
        kept = sum(self.kept[lang] for lang in langs)
        return {"in": kept + sum(dropped.values()), "kept": kept, "dropped": dropped}

    def to_dict(self) -> dict:
        """{lang: {"in", "kept", "dropped": {reason: n}}} plus "all", in == kept + dropped."""
        langs = self.languages()
        out = {lang: self._row([lang]) for lang in langs}
        if langs:
            out["all"] = self._row(langs)
        return out

    @classmethod
    def from_dict(cls, data: Mapping) -> "StageCounts":
        counts = cls()
        for lang, row in data.items():
            if lang == "all":
                continue
            counts.kept[lang] += int(row.get("kept", 0))
            for reason, n in row.get("dropped", {}).items():
                counts.dropped[lang][reason] += int(n)
        return counts

    def summary(self) -> str:
        """One line per language: `bn: 120 in, 97 kept, 23 dropped (too_short 20, near_duplicate 3)`."""
        lines = []
        for lang, row in self.to_dict().items():
            reasons = ", ".join(f"{k} {v}" for k, v in row["dropped"].items())
            dropped = sum(row["dropped"].values())
            lines.append(f"  {lang}: {row['in']} in, {row['kept']} kept, {dropped} dropped" +
                         (f" ({reasons})" if reasons else ""))
        return "\n".join(lines)
