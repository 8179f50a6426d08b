"""One Task from record to tokens (SeqIO's Task is the model): a record kind, a template, a
tokenizer and what the loss trains, bound together so that `prepare` (training data) and
`generate` / scoring (prompts) tokenise a record the same way. A model is prompted exactly as it
was trained.

    task = Task("sft", load_tokenizer(path))
    ex = task.encode(record)          # prepare: Example(prompt, target, loss_weights)
    ids = task.prompt_tokens(record)  # generate / score: == ex.prompt, token for token

Token layout (`tokenizer.prefix_ids` is what transformers adds in front of a text: BOS for
Llama tokenizers, nothing for some others):

  template      prompt                                     target                         loss
  sft, ...      prefix_ids + encode(prompt string)         encode_continuation(completion) + [eos]   target
  raw           prefix_ids + encode(text)                  [eos]                          text + eos

So the prompt's ids are exactly `tokenizer(prompt)["input_ids"]` as the released inference code
builds them, and `decode(prompt + target) == prompt string + completion`. The completion is
encoded as a continuation (no SentencePiece dummy prefix), so no space appears between prompt and
completion and no token straddles the boundary: the loss covers exactly the completion and EOS.
`raw` trains every token after the prefix (documents, language-model style); generating with it
continues the text, which is what `prepare` wrote before the EOS.

Data config: `data.template` + `data.sft_assistant_style` name one Task (`sft` with the style is
`sft_assistant`); the generate job's `generate.template` names the same choices.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from xinst_jax.config import TEMPLATES, DataConfig, GenerateConfig
from xinst_jax.data.records import DataError
from xinst_jax.data.templates import (COMPLETION_SEPARATOR, DEFAULT_JOIN, TEMPLATE_VERSION, Rendered, TemplateSpec,
                                      render, render_prompt, spec, template_name)

__all__ = ["TEMPLATES", "Example", "Task"]


@dataclass(frozen=True)
class Example:
    """One training example: what prepare writes (tokens = prompt + target, loss_mask = loss_weights)."""

    prompt: list[int]  # prefix_ids + the prompt: what generation and scoring feed the model
    target: list[int]  # the completion and EOS
    loss_weights: list[int]  # one per token of prompt + target; 1 = a trained target token

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.target


class Task:
    """A template bound to a tokenizer (module docstring). `join` only matters for `raw`."""

    def __init__(self, template: str, tokenizer, join: str = DEFAULT_JOIN):
        self.spec: TemplateSpec = spec(template)
        self.tokenizer = tokenizer
        self.join = join

    @classmethod
    def from_data_config(cls, data: DataConfig, tokenizer) -> "Task":
        return cls(template_name(data.template, data.sft_assistant_style), tokenizer)

    @classmethod
    def from_generate_config(cls, gen: GenerateConfig, tokenizer) -> "Task":
        return cls(gen.template, tokenizer, gen.join)

    @classmethod
    def for_answers(cls, data: DataConfig, gen: GenerateConfig, tokenizer) -> "Task":
        """The Task a fine-tuned model is asked to answer with (serve's chat route, eval): `sft`,
        or `sft_assistant` when it was trained with data.sft_assistant_style or generate.template
        names that template."""
        return cls(template_name("sft", data.sft_assistant_style or gen.template == "sft_assistant"), tokenizer)

    # ---- what the task is

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def kind(self) -> str:
        return self.spec.kind

    @property
    def trains(self) -> str:
        return self.spec.trains

    def describe(self) -> dict:
        return {"name": self.name, "version": TEMPLATE_VERSION, "kind": self.kind, "trains": self.trains}

    def reader_fields(self, training: bool) -> dict:
        """RecordReader arguments (required, any_of, allowed) for training records or for prompts."""
        s = self.spec
        if training:
            return {"required": s.train_fields, "any_of": s.train_any_of, "allowed": dict(s.allowed)}
        return {"required": s.prompt_fields, "any_of": s.prompt_any_of, "allowed": {}}

    def record_fields(self, training: bool) -> tuple[str, ...]:
        """The record fields the task reads (id and lang besides): what workers need of a record."""
        f = self.reader_fields(training)
        return ("id", "lang") + tuple(f["required"]) + tuple(x for x in f["any_of"] if x not in f["required"])

    # ---- record -> strings -> tokens

    def render(self, record: dict) -> Rendered:
        return render(self.name, record, self.join)

    def prompt_text(self, record: dict) -> str:
        return render_prompt(self.name, record, self.join)

    def prompt_tokens(self, record: dict) -> list[int]:
        """The prompt part of `encode(record)`, built from the prompt's fields alone."""
        tok = self.tokenizer
        return list(tok.prefix_ids) + tok.encode(self.prompt_text(record), add_special_tokens=False)

    def encode(self, record: dict, eos_id: Optional[int] = None) -> Example:
        """prompt + completion + EOS with loss weights as `trains` says (module docstring)."""
        tok = self.tokenizer
        eos = tok.eos_id if eos_id is None else eos_id
        if eos is None:
            raise DataError(f"tokenizer {tok.path}: no EOS token; every example ends with one")
        rendered = self.render(record)
        prompt = list(tok.prefix_ids) + tok.encode(rendered.prompt, add_special_tokens=False)
        if self.trains == "all":
            target = [eos]
            weights = [0] * len(tok.prefix_ids) + [1] * (len(prompt) - len(tok.prefix_ids) + 1)
        else:
            tok.check_continuation()
            target = tok.encode_continuation(COMPLETION_SEPARATOR + rendered.completion) + [eos]
            weights = [0] * len(prompt) + [1] * len(target)
        return Example(prompt=prompt, target=target, loss_weights=weights)
