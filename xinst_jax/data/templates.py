"""Prompt templates, versioned: a record -> (prompt, completion) strings. `xinst_jax.tasks.Task`
turns them into tokens and loss weights; prepare, generate and scoring all go through it.

`sft`, `sft_assistant` and `revgen` reproduce the prompt formats of the released X-Instruction
models exactly (ZNLP/X-Instruction, utils/inference.py, PROMPT_DICT):

  sft            "xres_prompt_no_input"      English instruction + " Answer in {Language}." -> output
  sft_assistant  "xres_aug_prompt_no_input"  "... Answer in {Language} and the style of an AI
                                             assistant." -> output (data.sft_assistant_style)
  revgen         "xins_prompt_no_input"      target-language text -> English instruction
  evaluator      ours (below)                (instruction, output) -> best | flawed | worst
  raw            no template                 a document's text, trained whole (no prompt string)

Joining rule (Alpaca-style, as the released models were trained): the completion follows the
prompt directly, with no separator -- the prompt ends in "### Response:" (or
"### English Instruction:", "### Rating:") and the completion's first character comes next.
`tasks.py` describes the token layout (BOS, EOS, loss weights).

TEMPLATE_VERSION changes whenever any of the strings or the joining rule change (prepared data
records it in its manifest).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from xinst_jax.config import TEMPLATES
from xinst_jax.data.records import DataError

TEMPLATE_VERSION = 1
COMPLETION_SEPARATOR = ""  # between prompt and completion (Alpaca: none)
DEFAULT_JOIN = "\n\n"  # raw: between `instruction` and `text`

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


@dataclass(frozen=True)
class TemplateSpec:
    """What a template needs from a record (records.RecordReader validates it) and what it trains."""

    name: str
    kind: Literal["pairs", "documents"]
    train_fields: tuple[str, ...]  # every one required to build a training example
    prompt_fields: tuple[str, ...] = ()  # every one required to build the prompt alone
    prompt_any_of: tuple[str, ...] = ()  # at least one of these required for the prompt
    train_any_of: tuple[str, ...] = ()
    needs_lang: bool = False  # the prompt names the record's language
    trains: Literal["targets", "all"] = "targets"  # what the loss covers
    allowed: dict[str, tuple[str, ...]] = field(default_factory=dict)


SPECS = {
    "sft": TemplateSpec("sft", "pairs", ("instruction", "output"), ("instruction",), needs_lang=True),
    "sft_assistant": TemplateSpec("sft_assistant", "pairs", ("instruction", "output"), ("instruction",),
                                  needs_lang=True),
    # revgen prompts with the target-language text: a pair's `output`, or a document's `text`
    "revgen": TemplateSpec("revgen", "pairs", ("instruction", "output"), prompt_any_of=("output", "text")),
    "evaluator": TemplateSpec("evaluator", "pairs", ("instruction", "output", "label"), ("instruction", "output"),
                              needs_lang=True, allowed={"label": EVALUATOR_LABELS}),
    # raw: `prompt`, else `instruction` and/or `text` joined (documents are `{text}`); loss on all of it
    "raw": TemplateSpec("raw", "documents", (), train_any_of=("prompt", "instruction", "text"),
                        prompt_any_of=("prompt", "instruction", "text"), trains="all"),
}
assert tuple(SPECS) == TEMPLATES, "config.TEMPLATES and SPECS name the same templates"


def spec(template: str) -> TemplateSpec:
    if template not in SPECS:
        raise DataError(f"unknown template {template!r} (known: {', '.join(TEMPLATES)})")
    return SPECS[template]


def template_name(template: str, assistant_style: bool = False) -> str:
    """data.template + data.sft_assistant_style -> one template name (`sft` + style = `sft_assistant`)."""
    spec(template)
    if assistant_style:
        if template not in ("sft", "sft_assistant"):
            raise DataError(f"data.sft_assistant_style: applies to template sft only, not {template!r}")
        return "sft_assistant"
    return template


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


def raw_text(record: dict, join: str = DEFAULT_JOIN) -> str:
    """The raw template's text: `prompt` when non-empty, else `instruction` and `text` joined."""
    if record.get("prompt"):
        return record["prompt"]
    return join.join(record[f] for f in ("instruction", "text") if record.get(f))


def render_prompt(template: str, record: dict, join: str = DEFAULT_JOIN) -> str:
    """The prompt string alone (generation and scoring): needs only the template's prompt fields."""
    if template in ("sft", "sft_assistant"):
        fmt = SFT_ASSISTANT_PROMPT if template == "sft_assistant" else SFT_PROMPT
        return fmt.format_map({"instruction": record["instruction"], "output_lang": language_name(record["lang"])})
    if template == "revgen":
        return REVGEN_PROMPT.format_map({"instruction": record.get("output") or record["text"]})
    if template == "evaluator":
        return EVALUATOR_PROMPT.format_map({"instruction": record["instruction"], "output": record["output"],
                                            "output_lang": language_name(record["lang"])})
    if template == "raw":
        return raw_text(record, join)
    spec(template)  # raises: unknown
    raise AssertionError(template)


# What `sft` / `sft_assistant` drop from their prompt when no language is named: the released
# strings with the language taken out (the assistant style keeps its style sentence).
NO_LANGUAGE_PROMPTS = {
    "sft": SFT_PROMPT.replace(" Answer in {output_lang}. ", ""),
    "sft_assistant": SFT_ASSISTANT_PROMPT.replace("{output_lang} and ", ""),
}


def prompt_without_language(template: str, instruction: str) -> str:
    """The `sft` / `sft_assistant` prompt of an instruction that names no answer language (chat
    requests without one): `sft` loses " Answer in {Language}.", `sft_assistant` keeps
    " Answer in the style of an AI assistant."."""
    if template not in NO_LANGUAGE_PROMPTS:
        raise DataError(f"only sft and sft_assistant prompts can leave the language out, not {template!r}")
    return NO_LANGUAGE_PROMPTS[template].format_map({"instruction": instruction})


def render(template: str, record: dict, join: str = DEFAULT_JOIN) -> Rendered:
    """The prompt and completion strings of one training record (fields as RecordReader returns
    them). `raw` has no completion string: its text is the prompt, and the loss covers it all."""
    prompt = render_prompt(template, record, join)
    completion = {"sft": "output", "sft_assistant": "output", "revgen": "instruction", "evaluator": "label"}.get(template)
    return Rendered(prompt, record[completion] if completion else "")
