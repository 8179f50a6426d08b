"""Corpus and instruction filters (xinst_jax/curate/filters.py).

Acceptance (real text, ../shared/data): ten languages, ten scripts — per language, a planted
near-duplicate, a wrong-language document and an over-short document are dropped with the right
reason, and every real document is kept. The unit tests below use synthetic text and run
without ../shared."""

from __future__ import annotations

import dataclasses
import json

import pytest

from data_helpers import LANGS, SHARED_DATA
from xinst_jax.config import CorpusFilterConfig, InstructionFilterConfig
from xinst_jax.curate.filters import (
    INSTRUCTION_REASONS,
    REASONS,
    CorpusFilter,
    InstructionFilter,
    char_shingles,
    langid_labels,
    language_of,
    normalize_text,
)

UDHR = SHARED_DATA / "udhr" / "udhr_articles.jsonl"
needs_data = pytest.mark.skipif(not UDHR.exists(), reason=f"real text not found at {SHARED_DATA}")

# Hand-written English prose, each paragraph over 400 characters.
EN = [
    "The river runs through the old town and past the market, where farmers sell vegetables, fish and bread "
    "every morning before the sun gets too hot. Children walk along the bank on their way to school, and in the "
    "evening families sit near the water to talk about the day. In the rainy season the river rises quickly, so "
    "the town built a stone wall that protects the houses closest to the water from the floods.",
    "Learning to cook at home saves money and gives you control over what you eat. Start with a few simple "
    "dishes, such as soup, rice with vegetables or an omelette, and cook each of them several times until you "
    "feel confident. Buy fresh ingredients in small amounts, keep a short list of spices you like, and clean as you "
    "go so that the kitchen never becomes a mess that makes you want to order food instead.",
    "A good night of sleep helps the body recover and the mind stay focused. Doctors recommend going to bed at "
    "the same time every evening, keeping the bedroom dark and quiet, and avoiding screens for an hour before "
    "sleeping. Coffee in the afternoon can keep many people awake, and a heavy meal late at night often makes "
    "it harder to rest. A short walk during the day improves sleep for people of every age.",
]
ID = ("Sungai itu mengalir melalui kota tua dan melewati pasar, tempat para petani menjual sayuran, ikan dan roti "
      "setiap pagi sebelum matahari terlalu panas. Anak-anak berjalan di sepanjang tepi sungai menuju sekolah, dan "
      "pada sore hari keluarga duduk di dekat air untuk berbicara tentang hari mereka. Pada musim hujan air sungai "
      "naik dengan cepat, sehingga kota membangun tembok batu untuk melindungi rumah-rumah dari banjir.")

CFG = CorpusFilterConfig()


def doc(text: str, lang: str = "en", id: str = "d") -> dict:
    return {"id": id, "lang": lang, "text": text}


def fresh(**overrides) -> CorpusFilter:
    return CorpusFilter(dataclasses.replace(CFG, **overrides), LANGS + ["en"])


# --------------------------------------------------------------------------- real text, ten scripts


def _udhr_docs() -> dict[str, list[str]]:
    """UDHR articles of each language, consecutive ones joined (one per line) into documents of
    600+ characters: 8-11 real documents per language, 800-2400 characters each."""
    articles: dict[str, list[str]] = {}
    with open(UDHR, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            articles.setdefault(row["lang"], []).append(row["text"].strip())
    docs: dict[str, list[str]] = {}
    for lang, texts in articles.items():
        out, cur = [], []
        for text in texts:
            cur.append(text)
            if sum(len(t) for t in cur) > 600:
                out.append("\n".join(cur))
                cur = []
        docs[lang] = out
    return docs


@pytest.fixture(scope="module")
def udhr_docs():
    return _udhr_docs()


def _near_copy(text: str) -> str:
    """A repost: the first two lines swapped and a 30-character span cut from the middle."""
    lines = text.split("\n")
    if len(lines) > 1:
        lines[0], lines[1] = lines[1], lines[0]
    text = "\n".join(lines)
    mid = len(text) // 2
    return text[:mid] + text[mid + 30:]


def _stream(lang: str, docs: dict[str, list[str]]) -> tuple[list[dict], dict[str, str]]:
    """The real documents of `lang` with three planted ones; returns (records, expected drops)."""
    real = [doc(t, lang, f"{lang}-{i}") for i, t in enumerate(docs[lang])]
    other = LANGS[(LANGS.index(lang) + 1) % len(LANGS)]
    short = doc(docs[lang][0][:150], lang, f"{lang}-short")
    wrong = doc(docs[other][1], lang, f"{lang}-wrong-{other}")
    near = doc(_near_copy(docs[lang][2]), lang, f"{lang}-near")
    # the planted ones among the real ones; the near copy comes after its original
    records = real[:2] + [short] + real[2:4] + [wrong] + real[4:6] + [near] + real[6:]
    expected = {short["id"]: "too_short", wrong["id"]: "wrong_lang", near["id"]: "near_duplicate"}
    return records, expected


@needs_data
@pytest.mark.parametrize("lang", LANGS)
def test_planted_drops_per_script(lang, udhr_docs):
    assert len(udhr_docs[lang]) >= 6
    records, expected = _stream(lang, udhr_docs)
    near, original = next(r for r in records if r["id"].endswith("-near")), udhr_docs[lang][2]
    assert near["text"] != original
    a, b = (char_shingles(normalize_text(t), CFG.shingle_chars) for t in (near["text"], original))
    assert len(a & b) / len(a | b) > CFG.near_duplicate_threshold + 0.05  # a real near-duplicate
    f = CorpusFilter(CFG, LANGS)
    dropped = {r["id"]: reason for r in records if (reason := f.check(r)) is not None}
    assert dropped == expected
    assert f.counts[lang]["kept"] == len(udhr_docs[lang])
    assert f.counts[lang]["in"] == len(records)


@needs_data
def test_ten_languages_through_one_filter(udhr_docs):
    """All ten streams interleaved through one filter (dedup state shared across languages)."""
    streams = [_stream(lang, udhr_docs) for lang in LANGS]
    expected = {k: v for _, exp in streams for k, v in exp.items()}
    f = CorpusFilter(CFG, LANGS)
    dropped = {}
    for i in range(max(len(recs) for recs, _ in streams)):
        for recs, _ in streams:
            if i < len(recs) and (reason := f.check(recs[i])) is not None:
                dropped[recs[i]["id"]] = reason
    assert dropped == expected
    # the same real document again, in any language's stream, is an exact duplicate
    again = dict(doc(udhr_docs["th"][3], "th"), text="  " + udhr_docs["th"][3].upper() + " ")
    assert f.check(again) == "exact_duplicate"


# --------------------------------------------------------------------------- corpus reasons, synthetic


def test_reasons_and_language_codes():
    assert REASONS == ("too_short", "too_long", "short_lines", "boilerplate_chars", "repeated_lines",
                       "wrong_lang", "low_lang_confidence", "exact_duplicate", "near_duplicate")
    assert INSTRUCTION_REASONS == ("too_short", "too_long", "template_residue", "not_english", "copies_document")
    assert set(LANGS + ["en"]) <= set(langid_labels())
    code, prob = language_of(EN[0])
    assert code == "en" and prob > 0.99


def test_english_prose_kept():
    f = fresh()
    assert [f.check(doc(t, id=str(i))) for i, t in enumerate(EN)] == [None, None, None]


def test_too_short_and_too_long():
    f = fresh()
    assert f.check(doc("   " + EN[0][:399] + "   \n")) == "too_short"  # counted after strip
    exact = EN[0][:CFG.min_chars - 1] + "s"
    assert len(exact) == CFG.min_chars and f.check(doc(exact)) is None
    long_text = " ".join(EN * 3)
    assert len(long_text) > CFG.max_chars
    assert f.check(doc(long_text)) == "too_long"
    assert fresh(max_chars=len(long_text)).check(doc(long_text)) is None


def test_short_lines():
    items = ("Home News Sport Weather Travel Culture Music Film Books Science Health Money Jobs Cars Food Style "
             "Games Video Photos Radio Podcasts Contact About Login Register Search Help Privacy Terms Cookies "
             "Careers Shop Events Blog Forum Archive Maps Tickets Newsletter").split()
    menu = "\n".join(items + [f"{item} page" for item in items])  # no line repeats
    text = EN[0] + "\n" + menu
    assert fresh().check(doc(text)) == "short_lines"
    assert fresh(max_short_line_share=0.9).check(doc(text)) is None


def test_boilerplate_chars():
    table = "\n".join(f"{i:04d} | {i * 37 % 1000:>6}.{i % 100:02d} USD | 2024-01-{i % 28 + 1:02d} | #{i}"
                      for i in range(12))
    assert fresh().check(doc(EN[1] + "\n" + table)) == "boilerplate_chars"
    assert fresh().check(doc(EN[1] + "\n" + table[:120])) is None  # a few numbers are fine


def test_marks_count_as_letters():
    from xinst_jax.curate.filters import non_letter_share

    # Thai, Tamil, Bengali, Devanagari vowel signs are Mn/Mc: not boilerplate
    for text in ("ภาษาไทยไม่มีช่องว่างระหว่างคำ", "தமிழ் எழுத்துக்கள்", "এটা বাংলা", "यह हिन्दी है", "یہ اردو ہے"):
        assert non_letter_share(text) == 0.0, text
    assert non_letter_share("abc 123") == 0.5


def test_repeated_lines():
    text = "\n".join([EN[2], "Share this article on social media", "Share this article on social media",
                      "Read more stories from our newsroom", "Share this article on social media",
                      "Read more stories from our newsroom", "Share this article on social media"])
    assert fresh().check(doc(text)) == "repeated_lines"
    assert fresh(max_repeated_line_share=0.9).check(doc(text)) is None


def test_wrong_lang():
    f = fresh()
    assert f.check(doc(EN[0], "sw")) == "wrong_lang"  # English labelled Swahili
    assert f.check(doc(EN[0], "de")) == "wrong_lang"  # a language this run does not curate
    assert f.check(doc(ID, "id")) is None
    assert fresh(check_lang=False, min_lang_confidence=0.0).check(doc(EN[0], "sw")) is None


def test_low_lang_confidence():
    # check_lang off: the labelled language's probability is still checked
    assert fresh(check_lang=False).check(doc(EN[0], "sw")) == "low_lang_confidence"
    # top language right, but it holds under the threshold: mixed English/Indonesian text
    mixed = EN[0] + "\n" + EN[2][:160] + "\n" + ID
    code, prob = language_of(mixed)
    assert code == "en" and 0.2 < prob < 0.9, (code, prob)
    assert fresh(min_lang_confidence=prob - 0.1).check(doc(mixed, "en")) is None
    assert fresh(min_lang_confidence=prob + 0.05).check(doc(mixed, "en")) == "low_lang_confidence"
    assert fresh(min_lang_confidence=0.99).check(doc(ID, "id")) is None  # id and ms count as one


def test_exact_duplicate_case_space_punctuation_any_language():
    f = fresh(check_lang=False, min_lang_confidence=0.0)
    assert f.check(doc(EN[0], "fi", "a")) is None
    variant = "\n\n  " + EN[0].upper().replace(" ", "   ").replace(",", "").replace(".", " !") + "\t"
    assert f.check(doc(variant, "sw", "b")) == "exact_duplicate"  # seen before in another language
    assert f.check(doc(EN[1], "fi", "c")) is None
    assert f.counts["sw"] == {"in": 1, "exact_duplicate": 1}


def test_near_duplicate_and_threshold_zero():
    near = EN[0].replace("vegetables, fish and bread", "vegetables and fish")
    for threshold, expected in ((0.8, "near_duplicate"), (0.0, None)):
        f = fresh(near_duplicate_threshold=threshold)
        assert f.check(doc(EN[0])) is None
        assert f.check(doc(near)) == expected
        assert f.check(doc(EN[0])) == "exact_duplicate"  # exact dedup stays on
        assert f.check(doc(EN[1])) is None  # a different text is never a near duplicate


def test_only_kept_documents_are_remembered():
    f = fresh()
    assert f.check(doc(EN[0], "sw")) == "wrong_lang"
    assert f.check(doc(EN[0], "en")) is None  # the dropped copy did not enter the indexes


def test_unknown_language_needs_langid_off():
    with pytest.raises(ValueError, match="xx"):
        CorpusFilter(CFG, ["xx"])
    f = CorpusFilter(dataclasses.replace(CFG, check_lang=False, min_lang_confidence=0.0), ["xx"])
    assert f.check(doc(EN[0], "xx")) is None


# --------------------------------------------------------------------------- instruction filter

GOOD = "Write a short essay explaining why the right to education matters for children in rural villages."


def test_instruction_kept_and_each_reason():
    f = InstructionFilter(InstructionFilterConfig())
    assert f.check(GOOD, ID) is None
    assert f.check("  Explain.  ", ID) == "too_short"
    assert f.check(" ".join([GOOD] * 10), ID) == "too_long"
    assert f.check("### Text: " + GOOD, ID) == "template_residue"
    assert f.check(GOOD + " Response:", ID) == "template_residue"
    assert f.check("Tuliskan sebuah esai tentang pentingnya pendidikan bagi anak-anak di desa.", ID) == "not_english"
    copy = "Describe this: " + EN[2][:200]
    assert f.check(copy, EN[2]) == "copies_document"
    assert f.check(copy, ID) is None  # the same instruction for another document copies nothing
    assert f.counts["kept"] == 2 and f.counts["in"] == 8


def test_instruction_thresholds_from_config():
    cfg = InstructionFilterConfig(min_chars=5, residue=[], max_copy_share=1.0, min_english_confidence=0.0)
    f = InstructionFilter(cfg)
    assert f.check("Explain this.", ID) is None
    assert f.check("### Text: " + GOOD, ID) is None
    assert f.check("Describe this: " + EN[2][:200], EN[2]) is None
