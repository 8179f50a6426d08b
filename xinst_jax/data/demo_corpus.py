"""Ground-truth data for the pipeline demo (job `pipeline_demo`), built from Unicode CLDR (shipped
inside the `babel` package): no download, deterministic in a seed, real native-script strings
with known English meaning in all ten languages.

A *document* is a run of CLDR strings on one known topic, 420-620 characters (inside the
candidates filters' length window, 400-3000, and short enough for a 512-token row with a prompt
template), with a reference English instruction it answers:

  topic         document (lines of CLDR strings)                   reference instruction
  countries     "<country> — <its official languages>" for some    Name some countries of <region> and
                countries of one region (Africa, the Americas,     their official languages.
                Asia, Europe, Oceania: the tz database's areas)
  languages     language names                                     List the names of some of the
                                                                   world's languages.
  currencies    currency names                                     List the names of some world currencies.
  timezones     time-zone names (generic long names)               List the names of some time zones.
  measurements  values 2-99 with spelled-out units ("5 kilometres  Write some measurements with their
                per hour")                                         units spelled out.

List lines join 3-6 items with the locale's list pattern ("A, B na C"): the conjunction makes
lists of names in Latin-script languages identifiable to py3langid. The reference names what a
reader of the document can tell (the topic, and the region of the countries), not the answer's
language: the sft template adds "Answer in {Language}." as the released models were trained.

`build_demo_data` writes, per language:

  seed_pairs.jsonl   English instruction -> native output: short CLDR pairs (demo_data.py: "What
                     is the country X called?", dates, numbers) and document pairs (reference ->
                     document), the generator's and the evaluator's training data
  corpus.jsonl       documents {id, lang, text}: clean ones, in an uneven topic mix (so that an even
                     draw across clusters differs from a random one), and planted bad ones
  truth.jsonl        per corpus document: `truth` (clean, exact_duplicate, near_duplicate,
                     wrong_lang, too_short: the filter reason it should get, none for clean),
                     topic, region, reference instruction, source_id (what it duplicates)
  heldout_pairs.jsonl  document pairs seen by no stage (generator chrF, final-model loss)
  heldout_rated.jsonl  the held-out pairs as the evaluator should rate them: true -> best,
                     truncated output -> flawed, mismatched instruction -> worst, output in
                     another language -> worst
  manifest.json      counts per set, language and topic or truth

Every clean document (seed, corpus or held-out) passes a `CorpusFilter` screen with the filters'
settings before it is kept -- the length window, language id (py3langid must name its language)
and no near duplicate of any other document of any set -- so held-out documents are no
near-duplicates of training ones, and the corpus filters' figures measure the planted documents.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import random
from pathlib import Path
from typing import Optional, Sequence

from xinst_jax.config import LANGUAGES, CorpusFilterConfig
from xinst_jax.data.templates import language_name

TOPICS = ("countries", "languages", "currencies", "timezones", "measurements")
# The corpus's topic mix: uneven on purpose (a random draw follows it; an even draw across
# instruction clusters should flatten it). Seed and held-out pairs take the topics in turn.
CORPUS_TOPIC_WEIGHTS = {"countries": 0.45, "languages": 0.25, "currencies": 0.12, "timezones": 0.10,
                        "measurements": 0.08}
# tz database area -> region (a territory takes the area most of its zones are in)
TZ_REGIONS = {"Africa": "Africa", "America": "the Americas", "Asia": "Asia", "Europe": "Europe",
              "Pacific": "Oceania", "Australia": "Oceania"}
REGIONS = ("Africa", "the Americas", "Asia", "Europe", "Oceania")
TRUTHS = ("clean", "exact_duplicate", "near_duplicate", "wrong_lang", "too_short")
DOC_CHARS = (420, 620)  # a clean document's length is drawn in this range (filters keep 400..3000)
SHORT_CHARS = (120, 360)  # planted over-short documents
LINE_ITEMS = (3, 6)  # items per line, joined by the locale's list pattern ("A, B and C")
UNIT_KINDS = ("acceleration", "angle", "area", "consumption", "duration", "electric", "energy", "force",
              "frequency", "length", "light", "mass", "power", "pressure", "speed", "temperature", "torque",
              "volume")

# The instruction does not name the answer's language: the sft template adds "Answer in
# {Language}." (as the released models were trained), so the generator learns the topic.
REFERENCES = {
    "countries": "Name some countries of {region} and their official languages.",
    "languages": "List the names of some of the world's languages.",
    "currencies": "List the names of some world currencies.",
    "timezones": "List the names of some time zones.",
    "measurements": "Write some measurements with their units spelled out.",
}


@dataclasses.dataclass
class Doc:
    lang: str
    topic: str
    text: str
    instruction: str  # the reference English instruction
    region: str = ""  # countries: the region


@dataclasses.dataclass
class DemoSizes:
    """Per language: seed document pairs, short CLDR seed pairs per kind (demo_data.py), clean corpus
    documents, each planted kind, held-out document pairs."""

    seed_docs: int = 25
    seed_short_per_kind: int = 2
    corpus_clean: int = 40
    planted: int = 3  # of each: exact_duplicate, near_duplicate, wrong_lang, too_short
    heldout: int = 6


# --------------------------------------------------------------------------- CLDR pools


def _regions_of_territories() -> dict[str, str]:
    from babel.core import get_global

    votes: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for zone, territory in sorted(get_global("zone_territories").items()):
        region = TZ_REGIONS.get(zone.split("/")[0])
        if region and territory.isalpha():
            votes[territory][region] += 1
    return {t: max(sorted(c), key=lambda r: c[r]) for t, c in votes.items()}


class CldrPools:
    """One language's CLDR strings by topic (sorted, so that draws depend only on the seed)."""

    def __init__(self, lang: str):
        from babel import Locale, dates, lists
        from babel.core import get_global

        self.lang = lang
        self.language = language_name(lang)
        native, en = Locale.parse(lang), Locale.parse("en")
        self.locale = native
        regions = _regions_of_territories()
        official = get_global("territory_languages")
        self.countries: dict[str, list[str]] = {r: [] for r in REGIONS}
        for code in sorted(regions):
            if code not in native.territories or len(code) != 2:
                continue
            langs = [(info.get("population_percent", 0.0), c) for c, info in official.get(code, {}).items()
                     if info.get("official_status") in ("official", "de_facto_official") and c in native.languages]
            names = [native.languages[c] for _, c in sorted(langs, reverse=True)[:3]]
            if names:
                self.countries[regions[code]].append(
                    f"{native.territories[code]} — {lists.format_list(names, locale=native)}")
        self.languages = sorted({native.languages[c] for c in native.languages
                                 if c.isalpha() and c.islower() and c in en.languages})
        self.currencies = sorted({native.currencies[c] for c in native.currencies
                                  if c in en.currencies and not any(ch.isdigit() for ch in native.currencies[c])})
        names = set()
        for zone in sorted(get_global("meta_zones")):
            try:
                names.add(dates.get_timezone_name(zone, "long", zone_variant="generic", locale=native))
            except Exception:  # noqa: BLE001 (a zone CLDR cannot name in this locale)
                continue
        self.timezones = sorted(n for n in names if n and not any(ch.isdigit() for ch in n))
        patterns = native._data["unit_patterns"]
        self.units = sorted(u for u in patterns if u.split("-")[0] in UNIT_KINDS and "long" in patterns[u]
                            and u in en._data["unit_patterns"])

    def _lines(self, items: Sequence[str], rng: random.Random, target: int) -> Optional[str]:
        """Lines of LINE_ITEMS items joined by the list pattern until `target` characters (None when
        the items run out first)."""
        from babel import lists

        lines, size, i = [], 0, 0
        while size < target:
            if i >= len(items):
                return None
            k = rng.randint(*LINE_ITEMS)
            line = lists.format_list(list(items[i:i + k]), locale=self.locale)
            i += k
            lines.append(line)
            size += len(line) + 1
        return "\n".join(lines)

    def document(self, topic: str, rng: random.Random, target: int) -> Optional[Doc]:
        """A document of about `target` characters on `topic`, or None when the drawn pool is too
        small for it."""
        fmt = {"language": self.language}
        if topic == "countries":
            region = rng.choice(REGIONS)
            pool = rng.sample(self.countries[region], len(self.countries[region]))
            lines, size = [], 0
            for line in pool:
                lines.append(line)
                size += len(line) + 1
                if size >= target:
                    return Doc(self.lang, topic, "\n".join(lines), REFERENCES[topic].format(region=region, **fmt),
                               region)
            return None
        if topic == "measurements":
            from babel import units

            chosen = rng.sample(self.units, min(len(self.units), 80))
            items = [units.format_unit(rng.randint(2, 99), u, length="long", locale=self.locale) for u in chosen]
            items = [x for x in items if "[" not in x]
        else:
            pool = {"languages": self.languages, "currencies": self.currencies, "timezones": self.timezones}[topic]
            items = rng.sample(pool, len(pool))
        text = self._lines(items, rng, target)
        return None if text is None else Doc(self.lang, topic, text, REFERENCES[topic].format(**fmt))


# --------------------------------------------------------------------------- the builder


class _Screen:
    """Every clean document passes the corpus filters (a CorpusFilter over all sets, so no clean
    document is a duplicate or near duplicate of another)."""

    def __init__(self, filters: CorpusFilterConfig, languages: Sequence[str]):
        from xinst_jax.curate.filters import CorpusFilter

        self.filter = CorpusFilter(filters, languages)
        self.rejected: collections.Counter = collections.Counter()

    def admit(self, doc: Doc) -> bool:
        reason = self.filter.check({"lang": doc.lang, "text": doc.text})
        if reason is not None:
            self.rejected[(doc.lang, doc.topic, reason)] += 1
        return reason is None


def _draw(pools: CldrPools, topic: str, rng: random.Random, screen: _Screen, tries: int = 40) -> Doc:
    for _ in range(tries):
        doc = pools.document(topic, rng, rng.randint(*DOC_CHARS))
        if doc is not None and screen.admit(doc):
            return doc
    raise RuntimeError(f"demo corpus: no {topic} document for {pools.lang} passed the corpus filters in {tries} "
                       f"tries (rejections: {dict(screen.rejected)})")


def _weighted_topics(n: int, rng: random.Random) -> list[str]:
    """n topics in the CORPUS_TOPIC_WEIGHTS mix (largest remainders, then shuffled): exact shares."""
    raw = {t: w * n for t, w in CORPUS_TOPIC_WEIGHTS.items()}
    counts = {t: int(v) for t, v in raw.items()}
    for t in sorted(raw, key=lambda t: (counts[t] - raw[t], TOPICS.index(t)))[:n - sum(counts.values())]:
        counts[t] += 1
    out = [t for t in TOPICS for _ in range(counts[t])]
    rng.shuffle(out)
    return out


# A planted near duplicate keeps at least this share of the source's character shingles: a clear
# mirror. (The filter's MinHash LSH, 9 bands of 13 rows for threshold 0.8, finds a candidate pair
# at Jaccard 0.95 with probability 0.998, at 0.9 with 0.93, at 0.85 with 0.69.)
NEAR_JACCARD = 0.95


def _near_copy(text: str, rng: random.Random, alone) -> str:
    """A near duplicate (a mirror with small edits): two lines swapped and one item dropped (a
    country line, or the first item of a list line; the swap alone when that is too much), keeping
    >= NEAR_JACCARD of the character shingles (exact Jaccard; the filter estimates it with MinHash
    and drops at 0.8).
    `alone(text)`: the copy passes every filter but the duplicate checks (a fresh filter keeps it)."""
    from xinst_jax.curate.filters import normalize_text

    lines = text.split("\n")
    for attempt in range(48):
        edited = list(lines)
        if len(edited) >= 2:
            i, j = rng.sample(range(len(edited)), 2)
            edited[i], edited[j] = edited[j], edited[i]
        k = rng.randrange(len(edited))
        if attempt >= 32:  # short documents: the swap alone
            pass
        elif ", " in edited[k]:
            edited[k] = edited[k].split(", ", 1)[1]
        elif len(edited) > 2:
            del edited[k]
        candidate = "\n".join(edited)
        if (char_jaccard(candidate, text) >= NEAR_JACCARD and normalize_text(candidate) != normalize_text(text)
                and alone(candidate)):
            return candidate
    raise RuntimeError("demo corpus: no near duplicate within the shingle budget")


def _exact_copy(text: str, alone) -> str:
    """The same normalised text (a re-crawl with other spacing and line breaks) that still passes
    every filter but the duplicate checks on its own (spacing can move language id); else the text
    with other surrounding whitespace."""
    for candidate in ("  " + text.replace(", ", " ,  ").replace("\n", " \n\n") + "  \n",
                      text.replace(", ", ",  ") + "\n"):
        if alone(candidate):
            return candidate
    return "\n " + text + " \n"


def _shorten(text: str, rng: random.Random) -> str:
    target = rng.randint(*SHORT_CHARS)
    cut = text[:target]
    for sep in ("\n", ", ", "; ", " "):
        k = cut.rfind(sep)
        if k > SHORT_CHARS[0] // 2:
            return cut[:k].rstrip(",; ")
    return cut


def char_jaccard(a: str, b: str, k: int = 5) -> float:
    from xinst_jax.curate.filters import char_shingles, normalize_text

    x, y = char_shingles(normalize_text(a), k), char_shingles(normalize_text(b), k)
    return len(x & y) / max(len(x | y), 1)


def build_demo_data(out: str | Path, languages: Sequence[str] | None = None, seed: int = 0,
                    sizes: DemoSizes | None = None, filters: CorpusFilterConfig | None = None) -> dict:
    """Write the demo's data files into `out` (module docstring); returns the manifest."""
    from xinst_jax.curate.filters import CorpusFilter
    from xinst_jax.curate.ratings import similarity_matrix, truncate_output
    from xinst_jax.data.demo_data import write_demo_pairs

    import numpy as np

    languages = list(languages or LANGUAGES)
    sizes = sizes or DemoSizes()
    filters = filters or CorpusFilterConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    screen = _Screen(filters, languages)
    pools = {lang: CldrPools(lang) for lang in languages}
    seed_docs: dict[str, list[Doc]] = {}
    corpus_clean: dict[str, list[Doc]] = {}
    heldout: dict[str, list[Doc]] = {}
    foreign: dict[str, list[Doc]] = {}  # per language: documents planted in other languages' corpora
    for lang in languages:  # one pass per language in a fixed order: the screen is order-dependent
        rng = random.Random(f"pipeline-demo-{seed}-{lang}")
        seed_docs[lang] = [_draw(pools[lang], TOPICS[i % len(TOPICS)], rng, screen) for i in range(sizes.seed_docs)]
        heldout[lang] = [_draw(pools[lang], TOPICS[i % len(TOPICS)], rng, screen) for i in range(sizes.heldout)]
        corpus_clean[lang] = [_draw(pools[lang], t, rng, screen) for t in _weighted_topics(sizes.corpus_clean, rng)]
        foreign[lang] = [_draw(pools[lang], TOPICS[i % len(TOPICS)], rng, screen) for i in range(sizes.planted)]

    # ---- seed pairs: short CLDR pairs + document pairs
    short_path = out / "seed_short.jsonl"
    write_demo_pairs(short_path, languages, per_kind=sizes.seed_short_per_kind, seed=seed)
    seed_records = [json.loads(line) for line in short_path.read_text(encoding="utf-8").splitlines()]
    short_path.unlink()
    for lang in languages:
        for i, d in enumerate(seed_docs[lang]):
            seed_records.append({"id": f"seed-{lang}-{i:04d}", "lang": lang, "instruction": d.instruction,
                                 "output": d.text, "meta": {"source": "cldr-doc", "topic": d.topic}})
    _write_jsonl(out / "seed_pairs.jsonl", seed_records)

    # ---- corpus with planted documents, and its truth
    corpus, truth = [], []
    for li, lang in enumerate(languages):
        rng = random.Random(f"pipeline-demo-plant-{seed}-{lang}")
        clean = [(f"doc-{lang}-{i:04d}", d) for i, d in enumerate(corpus_clean[lang])]
        items = [{"id": i, "lang": lang, "text": d.text, "truth": "clean", "doc": d, "source_id": ""} for i, d in clean]
        sources = rng.sample(clean, min(2 * sizes.planted, len(clean)))
        planted = []
        def alone(text: str) -> bool:
            return CorpusFilter(filters, languages).check({"lang": lang, "text": text}) is None

        for k, (sid, d) in enumerate(sources[:sizes.planted]):
            planted.append({"id": f"dup-{lang}-{k}", "lang": lang, "text": _exact_copy(d.text, alone),
                            "truth": "exact_duplicate", "doc": d, "source_id": sid})
        for k, (sid, d) in enumerate(sources[sizes.planted:2 * sizes.planted]):
            text = _near_copy(d.text, rng, alone)
            planted.append({"id": f"near-{lang}-{k}", "lang": lang, "text": text, "truth": "near_duplicate",
                            "doc": d, "source_id": sid})
        others = [x for x in languages if x != lang] or [lang]
        for k in range(sizes.planted):
            other = others[(li + k) % len(others)]
            d = foreign[other][k] if other != lang else foreign[lang][k]
            if other == lang:  # one language only: no other language to plant
                break
            items.append({"id": f"wrong-{lang}-{k}", "lang": lang, "text": d.text, "truth": "wrong_lang", "doc": d,
                          "source_id": "", "text_lang": other})
        for k in range(sizes.planted):
            d = pools[lang].document(TOPICS[k % len(TOPICS)], rng, rng.randint(*DOC_CHARS))
            d = d or corpus_clean[lang][k]
            items.append({"id": f"short-{lang}-{k}", "lang": lang, "text": _shorten(d.text, rng), "truth": "too_short",
                          "doc": d, "source_id": ""})
        rng.shuffle(items)
        # a duplicate comes after its source (the filter keeps the first one seen)
        for p in planted:
            pos = next(i for i, it in enumerate(items) if it["id"] == p["source_id"])
            items.insert(rng.randint(pos + 1, len(items)), p)
        for it in items:
            d = it["doc"]
            corpus.append({"id": it["id"], "lang": lang, "text": it["text"]})
            truth.append({"id": it["id"], "lang": lang, "truth": it["truth"], "topic": d.topic, "region": d.region,
                          "instruction": d.instruction, "source_id": it["source_id"],
                          "text_lang": it.get("text_lang", lang), "chars": len(it["text"].strip())})
    _write_jsonl(out / "corpus.jsonl", corpus)
    _write_jsonl(out / "truth.jsonl", truth)

    # ---- held-out pairs and the evaluator's held-out ratings
    held, rated = [], []
    for li, lang in enumerate(languages):
        rng = random.Random(f"pipeline-demo-heldout-{seed}-{lang}")
        nrng = np.random.default_rng([seed, li])
        docs = heldout[lang]
        others = [x for x in languages if x != lang]
        for i, d in enumerate(docs):
            pid = f"heldout-{lang}-{i:04d}"
            held.append({"id": pid, "lang": lang, "instruction": d.instruction, "output": d.text,
                         "meta": {"topic": d.topic, "region": d.region}})
            rated.append({"id": f"{pid}/true", "lang": lang, "instruction": d.instruction, "output": d.text,
                          "label": "best", "meta": {"kind": "true_pair", "topic": d.topic}})
            cut = truncate_output(d.text, nrng)
            if cut:
                rated.append({"id": f"{pid}/truncated", "lang": lang, "instruction": d.instruction, "output": cut,
                              "label": "flawed", "meta": {"kind": "truncated_output", "topic": d.topic}})
            # a mismatched instruction is another topic's, and not the most similar one (the
            # ratings scheme calls the nearest other instruction "flawed", the far ones "worst")
            wrong_topic = sorted({x.instruction for x in docs if x.topic != d.topic})
            if wrong_topic:
                sim = similarity_matrix([d.instruction] + wrong_topic)[0, 1:]
                far = [ins for ins, v in zip(wrong_topic, sim) if v < sim.max()] or wrong_topic
                donor = Doc(lang, "", "", rng.choice(far))
                rated.append({"id": f"{pid}/mismatched", "lang": lang, "instruction": donor.instruction,
                              "output": d.text, "label": "worst",
                              "meta": {"kind": "mismatched_instruction", "topic": d.topic}})
            if others:
                other = others[(i + li) % len(others)]
                donor = heldout[other][i % len(heldout[other])]
                rated.append({"id": f"{pid}/other_language", "lang": lang, "instruction": d.instruction,
                              "output": donor.text, "label": "worst",
                              "meta": {"kind": "other_language_output", "topic": d.topic, "output_lang": other}})
    _write_jsonl(out / "heldout_pairs.jsonl", held)
    _write_jsonl(out / "heldout_rated.jsonl", rated)

    def per_lang(records, key=None):
        c: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        for r in records:
            c[r["lang"]][(r.get("meta") or {}).get(key, "") if key else "n"] += 1
        return {lang: dict(sorted(v.items())) for lang, v in sorted(c.items())}

    manifest = {
        "source": "Unicode CLDR via babel", "seed": seed, "languages": languages, "sizes": dataclasses.asdict(sizes),
        "seed_pairs": per_lang(seed_records, "source"),
        "corpus": {lang: dict(collections.Counter(t["truth"] for t in truth if t["lang"] == lang))
                   for lang in languages},
        "corpus_topics": {lang: dict(collections.Counter(t["topic"] for t in truth
                                                         if t["lang"] == lang and t["truth"] == "clean"))
                          for lang in languages},
        "heldout_pairs": per_lang(held, "topic"),
        "heldout_rated": {lang: dict(collections.Counter(r["label"] for r in rated if r["lang"] == lang))
                          for lang in languages},
        "screen_rejections": {f"{k[0]}/{k[1]}/{k[2]}": v for k, v in sorted(screen.rejected.items())},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return manifest


def _write_jsonl(path: Path, records: list[dict]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(path)
