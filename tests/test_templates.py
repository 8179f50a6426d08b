"""Templates: the released X-Instruction prompt strings, the joining rule, loss masks, BOS/EOS."""

from __future__ import annotations

import json

import pytest

from data_helpers import LANGS, cldr_pairs, train_small_tokenizer
from xinst_jax.data import templates as T
from xinst_jax.data.records import DataError
from xinst_jax.data.tokenizer import load_tokenizer

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
    aug = T.render("sft", rec, assistant_style=True)
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


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """Our two kinds on the same trained files, plus a byte-level BPE tokenizer.json without BOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    records = cldr_pairs(per_lang=6)
    texts = [t for r in records for t in (r["instruction"], r["output"])] + [RECORD["output"], RECORD["instruction"]]
    d = train_small_tokenizer(tmp_path_factory.mktemp("tok"), texts + [T.SFT_PROMPT, T.REVGEN_PROMPT])
    bl = Tokenizer(models.BPE())
    bl.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bl.decoder = decoders.ByteLevel()
    bl.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bdir = tmp_path_factory.mktemp("bytelevel")
    bl.save(str(bdir / "tokenizer.json"))
    (bdir / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    return {"sentencepiece": load_tokenizer(str(d / "tokenizer.model")), "hf": load_tokenizer(str(d)),
            "bytelevel": load_tokenizer(str(bdir))}


@pytest.mark.parametrize("kind", ["sentencepiece", "hf", "bytelevel"])
@pytest.mark.parametrize("template", T.TEMPLATES)
def test_tokens_join_without_separator_and_mask_the_completion(tokenizers, kind, template):
    tok = tokenizers[kind]
    for lang in LANGS:
        rec = dict(RECORD, lang=lang)
        for output in (RECORD["output"], " leading space", "ภาษาไทย"):
            rendered = T.render(template, dict(rec, output=output))
            ex = T.tokenize_example(tok, rendered)
            assert len(ex.tokens) == len(ex.loss_mask)
            # the whole sequence decodes to prompt + completion, nothing between them
            assert tok.decode(ex.tokens) == rendered.prompt + rendered.completion
            # the prompt part is exactly what the tokenizer gives for the prompt at inference
            assert ex.tokens[:ex.prompt_len] == tok.encode(rendered.prompt)
            # loss: 0 on the prompt, 1 on completion + EOS, one contiguous run to the end
            assert ex.loss_mask == [0] * ex.prompt_len + [1] * (len(ex.tokens) - ex.prompt_len)
            assert ex.tokens[-1] == tok.eos_id
            trained = [t for t, m in zip(ex.tokens, ex.loss_mask) if m]
            assert tok.decode(trained[:-1]) .lstrip(" ") == rendered.completion.lstrip(" ")
            assert tok.decode(ex.tokens[ex.prompt_len:]) .lstrip(" ") == rendered.completion.lstrip(" ")
    if kind == "bytelevel":
        assert tok.prefix_ids == () and ex.tokens[0] != tok.eos_id  # no BOS in this tokenizer's files
    else:
        assert tok.prefix_ids == (tok.bos_id,) and ex.tokens[0] == tok.bos_id and ex.tokens.count(tok.bos_id) == 1


def test_no_eos_is_an_error(tokenizers, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    bl = Tokenizer(models.BPE())
    bl.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bl.train_from_iterator(["abc"], trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bl.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text("{}")
    tok = load_tokenizer(str(tmp_path))
    assert tok.eos_id is None
    with pytest.raises(DataError, match="no EOS"):
        T.tokenize_example(tok, T.render("sft", RECORD))
