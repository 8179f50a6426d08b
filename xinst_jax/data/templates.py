"""Prompt templates, versioned: a record -> (prompt, completion) -> tokens + loss mask.

`revgen` and `sft` reproduce the prompt formats of the released X-Instruction models exactly
(ZNLP/X-Instruction, utils/inference.py, PROMPT_DICT):

  sft        "xres_prompt_no_input"       English instruction + " Answer in {Language}." -> output
  sft        "xres_aug_prompt_no_input"   (data.sft_assistant_style) "... Answer in {Language} and
                                          the style of an AI assistant." -> output
  revgen     "xins_prompt_no_input"       target-language text -> English instruction
  evaluator  ours (below)                 (instruction, output) -> best | flawed | worst

Joining rule (Alpaca-style, as the released models were trained): the completion follows the
prompt directly, with no separator -- the prompt ends in "### Response:" (or
"### English Instruction:", "### Rating:") and the completion's first character comes next;
the EOS token follows the completion. Token by token:

  tokens    = tokenizer.prefix_ids + encode(prompt) + encode_continuation(completion) + [eos_id]
  loss_mask =        0 ...                0 ...             1 ...                      1

`tokenizer.prefix_ids` is what transformers adds in front of a text (BOS for Llama tokenizers),
so the prompt's ids are exactly `tokenizer(prompt)["input_ids"]` as the released inference code
builds them, and `decode(tokens) == prompt + completion`. The completion is encoded as a
continuation (no SentencePiece dummy prefix), so no space appears between prompt and
completion and no token straddles the boundary: the loss covers exactly the completion and EOS.

TEMPLATE_VERSION changes whenever any of the strings or the joining rule change (prepared data
records it in its manifest).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from xinst_jax.data.records import DataError

TEMPLATE_VERSION = 1
TEMPLATES = ("revgen", "sft", "evaluator")
COMPLETION_SEPARATOR = ""  # between prompt and completion (Alpaca: none)

SFT_PROMPT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction} Answer in {output_lang}. \n\n### Response:"
)
SFT_ASSISTANT_PROMPT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction} Answer in {output_lang} and the style of an AI assistant. \n\n### Response:"
)
REVGEN_PROMPT = (
    "Below is a text that describes a candidate output. "
    "Write an English instruction that can take the given text as an appropriate answer.\n\n"
    "### Text:\n{instruction}\n\n### English Instruction:"
)
# Ours: the refinement stage's judge. It sees the English instruction and the target-language
# response and answers with one label word.
EVALUATOR_PROMPT = (
    "Below is an English instruction and a candidate response written in {output_lang}. "
    "Rate how well the response answers the instruction: best (it answers the instruction well), "
    "flawed (it is related to the instruction but incomplete or partly wrong) or worst (it does not "
    "answer the instruction).\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n{output}\n\n### Rating:"
)
EVALUATOR_LABELS = ("best", "flawed", "worst")

# ISO 639-1 -> the English language name used in "Answer in {Language}."
LANGUAGE_NAMES = {
    "bn": "Bengali", "fi": "Finnish", "hi": "Hindi", "id": "Indonesian", "sw": "Swahili",
    "ta": "Tamil", "th": "Thai", "tr": "Turkish", "ur": "Urdu", "vi": "Vietnamese", "en": "English",
}

# Record fields each template needs (records.RecordReader validates them).
REQUIRED_FIELDS = {
    "revgen": ("instruction", "output"),
    "sft": ("instruction", "output"),
    "evaluator": ("instruction", "output", "label"),
}
ALLOWED_VALUES = {"evaluator": {"label": EVALUATOR_LABELS}}


def language_name(code: str) -> str:
    """English name of an ISO 639-1 code: the paper's ten and English built in, others from
    Babel's CLDR data when it is installed."""
    if code in LANGUAGE_NAMES:
        return LANGUAGE_NAMES[code]
    try:
        from babel import Locale

        return Locale.parse(code).get_language_name("en")
    except Exception:  # noqa: BLE001 (babel missing or an unknown code)
        raise DataError(f"no English name for language code {code!r}; add it to templates.LANGUAGE_NAMES") from None


@dataclass(frozen=True)
class Rendered:
    prompt: str
    completion: str

    @property
    def text(self) -> str:
        return self.prompt + COMPLETION_SEPARATOR + self.completion


def render(template: str, record: dict, assistant_style: bool = False) -> Rendered:
    """The prompt and completion strings of one record (fields as RecordReader returns them)."""
    if template == "sft":
        fmt = SFT_ASSISTANT_PROMPT if assistant_style else SFT_PROMPT
        prompt = fmt.format_map({"instruction": record["instruction"], "output_lang": language_name(record["lang"])})
        return Rendered(prompt, record["output"])
    if template == "revgen":
        return Rendered(REVGEN_PROMPT.format_map({"instruction": record["output"]}), record["instruction"])
    if template == "evaluator":
        prompt = EVALUATOR_PROMPT.format_map({"instruction": record["instruction"], "output": record["output"],
                                              "output_lang": language_name(record["lang"])})
        return Rendered(prompt, record["label"])
    raise DataError(f"data.template: unknown template {template!r} (known: {', '.join(TEMPLATES)})")


def render_prompt(template: str, record: dict, assistant_style: bool = False) -> str:
    """The prompt alone (generation and scoring): the record needs only the prompt's fields."""
    filled = dict(record)
    filled.setdefault("label", "")
    filled.setdefault("instruction", "")
    return render(template, filled, assistant_style).prompt


@dataclass
class TokenizedExample:
    tokens: list[int]
    loss_mask: list[int]
    prompt_len: int  # tokens before the completion (prefix + prompt)


def tokenize_example(tokenizer, rendered: Rendered, eos_id: Optional[int] = None) -> TokenizedExample:
    """prefix_ids + prompt + completion + EOS, loss on the completion and EOS (module docstring)."""
    eos = tokenizer.eos_id if eos_id is None else eos_id
    if eos is None:
        raise DataError(f"tokenizer {tokenizer.path}: no EOS token; templates end every example with one")
    tokenizer.check_continuation()
    prompt = list(tokenizer.prefix_ids) + tokenizer.encode(rendered.prompt, add_special_tokens=False)
    completion = tokenizer.encode_continuation(COMPLETION_SEPARATOR + rendered.completion) + [eos]
    return TokenizedExample(tokens=prompt + completion, loss_mask=[0] * len(prompt) + [1] * len(completion),
                            prompt_len=len(prompt))
