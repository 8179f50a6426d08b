"""Language fidelity: py3langid's verdict per answer, scripts counted per letter, mixed scripts
flagged, counts and the confusion table per language; the real UDHR text in all ten languages
is judged faithful (skipped without ../shared)."""

from __future__ import annotations

import json

import pytest

from data_helpers import LANGS, SHARED_DATA
from xinst_jax.eval import fidelity
from xinst_jax.eval.fidelity import (EMPTY, EXPECTED_SCRIPT, answer_fidelity, confusion_columns, confusion_row,
                                     fidelity_table, predicted_language, script_counts, script_of, script_profile)

TEXT = {  # first sentences of UDHR article 1
    "th": "มนุษย์ทั้งหลายเกิดมามีอิสระและเสมอภาคกันในเกียรติศักดิ์และสิทธิ ต่างมีเหตุผลและมโนธรรม",
    "sw": "Watu wote wamezaliwa huru, hadhi na haki zao ni sawa. Wote wamejaliwa akili na dhamiri.",
    "id": "Semua orang dilahirkan merdeka dan mempunyai martabat dan hak-hak yang sama.",
    "hi": "सभी मनुष्यों को गौरव और अधिकारों के मामले में जन्मजात स्वतन्त्रता और समानता प्राप्त है।",
    "en": "All human beings are born free and equal in dignity and rights.",
}


def test_script_of_letters_and_marks():
    assert [script_of(c) for c in "aéŞđ"] == ["Latin"] * 4
    assert script_of("ก") == script_of("\u0e34") == "Thai"  # consonant and vowel mark (Mn)
    assert script_of("क") == script_of("\u093f") == "Devanagari"  # letter and vowel sign (Mc)
    assert script_of("ক") == "Bengali" and script_of("க") == "Tamil" and script_of("ب") == "Arabic"
    assert script_of("\u064e") == "Arabic"  # fatha
    assert script_of("中") == "Han" and script_of("Ａ") == "Latin"  # fullwidth Latin is Latin
    for c in "1.?! \n٣\u0301":  # digits, punctuation, space, Arabic-Indic digit, combining acute: no script
        assert script_of(c) is None
    assert script_counts("e\u0301 ก1") == {"Latin": 1, "Thai": 1}


def test_every_language_has_its_script():
    assert set(LANGS) <= set(EXPECTED_SCRIPT)
    latin = sorted(lang for lang, s in EXPECTED_SCRIPT.items() if s == "Latin")
    assert latin == ["en", "fi", "id", "sw", "tr", "vi"]


def test_mixed_and_wrong_script():
    pure = script_profile(TEXT["th"], "th")
    assert pure["dominant"] == "Thai" and not pure["mixed"] and not pure["wrong_script"]
    mixed = answer_fidelity(TEXT["th"] + " " + TEXT["en"], "th")  # 85 Thai letters, 51 Latin: 37.5%
    assert mixed["mixed"] and mixed["dominant"] == "Thai" and mixed["second_share"] == pytest.approx(51 / 136, 1e-3)
    assert mixed["faithful"]  # still Thai to language id: mixing is flagged separately
    few = script_profile(TEXT["th"] + " OK", "th")  # 2 Latin letters: below the 20% threshold
    assert not few["mixed"]
    assert script_profile(TEXT["th"] + " OK", "th", mixed_share=0.01)["mixed"]

    english_for_thai = answer_fidelity(TEXT["en"], "th")
    assert english_for_thai["predicted"] == "en" and not english_for_thai["faithful"]
    assert english_for_thai["wrong_script"] and not english_for_thai["mixed"]


def test_latin_languages_share_a_script():
    """Indonesian written for a Swahili prompt: unfaithful by language id, invisible to scripts."""
    v = answer_fidelity(TEXT["id"], "sw")
    assert v["predicted"] == "id" and not v["faithful"]
    assert not v["mixed"] and not v["wrong_script"] and v["dominant"] == "Latin"


def test_malay_counts_as_indonesian(monkeypatch):
    monkeypatch.setattr(fidelity, "language_scores", lambda text: {"ms": 0.4, "jv": 0.35, "id": 0.25})
    assert predicted_language("x", "id") == ("id", pytest.approx(0.65))
    assert predicted_language("x", "sw")[0] == "id"  # ms is reported as id whatever was asked
    monkeypatch.setattr(fidelity, "language_scores", lambda text: {"jv": 0.45, "ms": 0.3, "id": 0.25})
    assert predicted_language("x", "id") == ("id", pytest.approx(0.55))  # jv is first alone, second to id + ms


def test_empty_answer():
    v = answer_fidelity("   \n", "th")
    assert v["predicted"] == EMPTY and v["empty"] and not v["faithful"] and v["dominant"] is None


def test_table_counts_and_confusion():
    rows = [("th", answer_fidelity(TEXT["th"], "th")),
            ("th", answer_fidelity(TEXT["en"], "th")),
            ("th", answer_fidelity(TEXT["th"] + " " + TEXT["en"], "th")),
            ("th", answer_fidelity("", "th")),
            ("sw", answer_fidelity(TEXT["sw"], "sw")),
            ("sw", answer_fidelity(TEXT["id"], "sw"))]
    t = fidelity_table(rows)
    th, sw = t["per_language"]["th"], t["per_language"]["sw"]
    assert th == {"answers": 4, "faithful": 2, "mixed_script": 1, "wrong_script": 1, "empty": 1, "fidelity": 0.5,
                  "mixed_script_share": 0.25, "wrong_script_share": 0.25}
    assert sw["answers"] == 2 and sw["faithful"] == 1 and sw["fidelity"] == 0.5
    assert t["all"]["answers"] == 6 and t["all"]["faithful"] == 3 and t["all"]["fidelity"] == 0.5
    assert t["confusion"] == {"sw": {"sw": 1, "id": 1}, "th": {"th": 2, "en": 1, EMPTY: 1}}
    cols = confusion_columns(t["confusion"], ["sw", "th"])
    assert cols[:3] == ["sw", "th", "en"] and cols[-1] == EMPTY and "id" in cols
    counts, other = confusion_row(t["confusion"]["th"], ["th"])
    assert counts == [2] and other == 2
    assert sum(sum(row.values()) for row in t["confusion"].values()) == t["all"]["answers"]


@pytest.mark.skipif(not (SHARED_DATA / "udhr").is_dir(), reason="../shared/data/udhr not present")
def test_udhr_is_faithful_in_all_ten_languages():
    texts = []
    with open(SHARED_DATA / "udhr" / "udhr_articles.jsonl", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            if r["lang"] in LANGS and r["article"] in ("1", "2", "3"):
                texts.append((r["lang"], r["text"]))
    t = fidelity_table([(lang, answer_fidelity(text, lang)) for lang, text in texts])
    assert sorted(t["per_language"]) == sorted(LANGS)
    for lang, row in t["per_language"].items():
        assert row["answers"] == 3 and row["fidelity"] == 1.0, (lang, t["confusion"][lang])
        assert row["mixed_script"] == 0 and row["wrong_script"] == 0, lang
    # asked for Thai (or Hindi), every other language's text is unfaithful, and in the wrong script
    for lang, text in texts:
        other = "hi" if lang == "th" else "th"
        v = answer_fidelity(text, other)
        assert not v["faithful"] and v["predicted"] == lang and v["wrong_script"], (lang, v)
