"""Templates: the released X-Instruction prompt strings, what each template needs from a record,
and the one name list shared with the config. Tokens and loss weights: test_tasks.py."""

from __future__ import annotations

import pytest

from data_helpers import LANGS
from xinst_jax.config import TEMPLATES, ConfigError, DataConfig, load_config
from xinst_jax.data import templates as T
from xinst_jax.data.records import DataError

# ZNLP/X-Instruction utils/inference.py PROMPT_DICT, as released (the reference, typed from it).
OFFICIAL = {
    "xres_prompt_no_input": (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction} Answer in {output_lang}. \n\n### Response:"
    ),
    "xres_aug_prompt_no_input": (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction} Answer in {output_lang} and the style of an AI assistant. \n\n### Response:"
    ),
    "xins_prompt_no_input": (
        "Below is a text that describes a candidate output. "
        "Write an English instruction that can take the given text as an appropriate answer.\n\n"
        "### Text:\n{instruction}\n\n### English Instruction:"
    ),
}
NAMES = {"bn": "Bengali", "fi": "Finnish", "hi": "Hindi", "id": "Indonesian", "sw": "Swahili", "ta": "Tamil",
         "th": "Thai", "tr": "Turkish", "ur": "Urdu", "vi": "Vietnamese"}
RECORD = {"id": "r1", "lang": "ur", "instruction": "Give three tips for staying healthy.",
          "output": "صحت مند رہنے کے لیے تین مشورے۔\nپانی پیئیں۔", "label": "flawed"}


def test_prompts_are_the_released_ones():
    assert T.SFT_PROMPT == OFFICIAL["xres_prompt_no_input"]
    assert T.SFT_ASSISTANT_PROMPT == OFFICIAL["xres_aug_prompt_no_input"]
    assert T.REVGEN_PROMPT == OFFICIAL["xins_prompt_no_input"]
    assert isinstance(T.TEMPLATE_VERSION, int) and T.TEMPLATE_VERSION >= 1
    assert T.COMPLETION_SEPARATOR == ""


@pytest.mark.parametrize("lang", LANGS)
def test_sft_render_matches_official_format_map(lang):
    rec = dict(RECORD, lang=lang)
    r = T.render("sft", rec)
    assert T.language_name(lang) == NAMES[lang]
    assert r.prompt == OFFICIAL["xres_prompt_no_input"].format_map(
        {"instruction": rec["instruction"], "output_lang": NAMES[lang]})
    assert r.prompt.endswith(f"{rec['instruction']} Answer in {NAMES[lang]}. \n\n### Response:")
    assert r.completion == rec["output"]
    aug = T.render("sft_assistant", rec)
    assert aug.prompt == OFFICIAL["xres_aug_prompt_no_input"].format_map(
        {"instruction": rec["instruction"], "output_lang": NAMES[lang]})


def test_revgen_and_evaluator_render():
    r = T.render("revgen", RECORD)
    assert r.prompt == OFFICIAL["xins_prompt_no_input"].format_map({"instruction": RECORD["output"]})
    assert r.completion == RECORD["instruction"]  # loss on the English instruction
    e = T.render("evaluator", RECORD)
    assert RECORD["instruction"] in e.prompt and RECORD["output"] in e.prompt and "Urdu" in e.prompt
    assert e.prompt.endswith("### Rating:")
    assert e.completion == "flawed" and set(T.EVALUATOR_LABELS) == {"best", "flawed", "worst"}
    for label in T.EVALUATOR_LABELS:
        assert label in e.prompt  # the judge is told the labels it may answer
    assert T.render_prompt("revgen", {"lang": "th", "output": "ข้อความ"}).endswith("ข้อความ\n\n### English Instruction:")
    with pytest.raises(DataError, match="unknown template"):
        T.render("chat", RECORD)
    with pytest.raises(DataError, match="no English name"):
        T.render("sft", dict(RECORD, lang="zz-notalang"))


def test_raw_text_and_revgen_on_documents():
    assert T.render("raw", {"prompt": "p", "text": "t"}) == T.Rendered("p", "")  # the prompt wins
    assert T.render_prompt("raw", {"prompt": "", "instruction": "i", "text": "t"}) == "i\n\nt"
    assert T.render_prompt("raw", {"instruction": "i", "text": "t"}, join=" | ") == "i | t"
    assert T.render_prompt("raw", {"text": "เอกสาร"}) == "เอกสาร"
    # revgen prompts with the target-language text: a pair's output, else a document's text
    assert T.render_prompt("revgen", {"text": "ข้อความ"}) == T.render_prompt("revgen", {"output": "ข้อความ"})
    assert T.render_prompt("revgen", {"output": "a", "text": "b"}).endswith("### Text:\na\n\n### English Instruction:")


def test_one_name_list_for_config_and_templates():
    assert tuple(T.SPECS) == TEMPLATES == ("sft", "sft_assistant", "revgen", "evaluator", "raw")
    assert T.template_name("sft", assistant_style=True) == "sft_assistant"
    assert T.template_name("sft_assistant", assistant_style=True) == "sft_assistant"
    for name in TEMPLATES:
        assert T.template_name(name) == name
    with pytest.raises(DataError, match="sft_assistant_style: applies to template sft only"):
        T.template_name("revgen", assistant_style=True)
    assert DataConfig().template == "sft"
    assert load_config("generate_demo").generate.template == "raw"  # the plain completion job, as before
    for key in ("data.template", "generate.template"):
        with pytest.raises(ConfigError, match=f"{key}: expected 'sft' \\| 'sft_assistant'"):
            load_config("generate_demo", [f"{key}=chat"])


def test_specs_say_what_each_template_reads_and_trains():
    assert {n: (s.kind, s.trains) for n, s in T.SPECS.items()} == {
        "sft": ("pairs", "targets"), "sft_assistant": ("pairs", "targets"), "revgen": ("pairs", "targets"),
        "evaluator": ("pairs", "targets"), "raw": ("documents", "all")}
    assert T.SPECS["evaluator"].allowed == {"label": T.EVALUATOR_LABELS}
    assert [n for n, s in T.SPECS.items() if s.needs_lang] == ["sft", "sft_assistant", "evaluator"]
    # the prompt fields are enough to render each prompt (generation has no completion)
    record = {"lang": "sw", "instruction": "Say hi.", "output": "Habari", "text": "Habari"}
    for name, s in T.SPECS.items():
        any_of = tuple(f for f in s.prompt_any_of if f in record)
        prompt_only = {f: record[f] for f in ("lang",) + s.prompt_fields + any_of}
        assert T.render_prompt(name, prompt_only) == T.render(name, dict(record, label="best")).prompt


def test_prompts_without_language_drop_only_the_language():
    plain = T.prompt_without_language("sft", "Name a fruit.")
    assert plain == OFFICIAL["xres_prompt_no_input"].replace(" Answer in {output_lang}. ", "").format_map(
        {"instruction": "Name a fruit."})
    assert plain.endswith("### Instruction:\nName a fruit.\n\n### Response:")
    styled = T.prompt_without_language("sft_assistant", "Name a fruit.")
    assert styled.endswith("### Instruction:\nName a fruit. Answer in the style of an AI assistant. \n\n### Response:")
    with pytest.raises(DataError, match="revgen"):
        T.prompt_without_language("revgen", "x")
