"""Tasks: record -> (prompt, target, loss weights) for every template and tokenizer kind, and the
contract that matters: for every template, the prompt tokens the generate job feeds the engine
for a record are the prompt part that prepare wrote for the same record (read back from the
TFRecord shards)."""

from __future__ import annotations

import json

import pytest

from data_helpers import LANGS, cldr_pairs, train_small_tokenizer, write_jsonl
from xinst_jax.config import TEMPLATES, Config, DataConfig, DataInputConfig, GenerateConfig, load_config
from xinst_jax.data import templates as T
from xinst_jax.data.records import DataError, import_tf
from xinst_jax.data.tokenizer import load_tokenizer
from xinst_jax.tasks import Task

RECORD = {"id": "r1", "lang": "ur", "instruction": "Give three tips for staying healthy.",
          "output": "صحت مند رہنے کے لیے تین مشورے۔\nپانی پیئیں۔", "label": "flawed", "text": "ایک دستاویز۔"}
PAIR_TEMPLATES = [t for t in TEMPLATES if t != "raw"]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """Our SentencePiece and tokenizer.json kinds on the same trained files (BOS added), a
    byte-level BPE tokenizer.json without BOS, and the byte tokenizer."""
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
            "bytelevel": load_tokenizer(str(bdir)), "bytes": load_tokenizer("bytes")}


KINDS = ["sentencepiece", "hf", "bytelevel", "bytes"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("template", PAIR_TEMPLATES)
def test_targets_join_without_separator_and_only_they_are_trained(tokenizers, kind, template):
    tok = tokenizers[kind]
    task = Task(template, tok)
    for lang in LANGS:
        for output in (RECORD["output"], " leading space", "ภาษาไทย"):
            rec = dict(RECORD, lang=lang, output=output)
            rendered = task.render(rec)
            ex = task.encode(rec)
            assert ex.tokens == ex.prompt + ex.target and len(ex.tokens) == len(ex.loss_weights)
            # the whole sequence decodes to prompt + completion, nothing between them
            assert tok.decode(ex.tokens) == rendered.prompt + rendered.completion
            # the prompt part is exactly what the tokenizer gives for the prompt string (transformers'
            # tokenizer(prompt)["input_ids"]), and what the task feeds for generation
            assert ex.prompt == tok.encode(rendered.prompt)
            prompt_only = {k: v for k, v in rec.items() if k not in ({"sft": "output", "sft_assistant": "output",
                                                                      "revgen": "instruction"}.get(template, "label"),
                                                                     "label")}
            assert task.prompt_tokens(prompt_only) == ex.prompt
            # loss: 0 on the prompt, 1 on completion + EOS, one contiguous run to the end
            assert ex.loss_weights == [0] * len(ex.prompt) + [1] * len(ex.target)
            assert ex.target[-1] == tok.eos_id
            assert tok.decode(ex.target[:-1]).lstrip(" ") == rendered.completion.lstrip(" ")
    if kind == "bytelevel":
        assert tok.prefix_ids == () and ex.tokens[0] != tok.eos_id  # no BOS in this tokenizer's files
    else:
        assert tok.prefix_ids == (tok.bos_id,) and ex.tokens[0] == tok.bos_id and ex.tokens.count(tok.bos_id) == 1


@pytest.mark.parametrize("kind", KINDS)
def test_raw_trains_every_token_after_the_prefix(tokenizers, kind):
    tok = tokenizers[kind]
    task = Task("raw", tok, join=" // ")
    assert (task.kind, task.trains) == ("documents", "all")
    for rec, text in [({"text": "ภาษาไทย document"}, "ภาษาไทย document"),
                      ({"instruction": "Summarise.", "text": "The cat."}, "Summarise. // The cat."),
                      ({"prompt": "p first", "text": "ignored"}, "p first")]:
        ex = task.encode(rec)
        n_prefix = len(tok.prefix_ids)
        assert ex.prompt == tok.encode(text) and ex.target == [tok.eos_id]
        assert ex.loss_weights == [0] * n_prefix + [1] * (len(ex.tokens) - n_prefix)
        assert tok.decode(ex.tokens) == text
        assert task.prompt_tokens(rec) == ex.prompt  # generation continues the text


def test_data_config_names_the_task(tokenizers):
    tok = tokenizers["bytes"]
    assert Task.from_data_config(DataConfig(template="sft", sft_assistant_style=True), tok).name == "sft_assistant"
    assert Task.from_data_config(DataConfig(template="revgen"), tok).describe() == {
        "name": "revgen", "version": T.TEMPLATE_VERSION, "kind": "pairs", "trains": "targets"}
    assert Task.from_generate_config(GenerateConfig(template="raw", join="|"), tok).join == "|"
    with pytest.raises(DataError, match="unknown template 'chat'"):
        Task("chat", tok)
    assert Task("evaluator", tok).reader_fields(training=True) == {
        "required": ("instruction", "output", "label"), "any_of": (), "allowed": {"label": T.EVALUATOR_LABELS}}
    assert Task("evaluator", tok).reader_fields(training=False)["required"] == ("instruction", "output")


def test_no_eos_is_an_error(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    bl = Tokenizer(models.BPE())
    bl.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bl.train_from_iterator(["abc"], trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bl.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text("{}")
    tok = load_tokenizer(str(tmp_path))
    assert tok.eos_id is None
    for template in TEMPLATES:
        with pytest.raises(DataError, match="no EOS"):
            Task(template, tok).encode(RECORD)


# --------------------------------------------------------------------------- prepare == generate


def read_prepared(directory) -> dict[str, tuple[list[int], list[int]]]:
    from xinst_jax.data.prepare import shard_paths

    tf = import_tf()
    out = {}
    for path in shard_paths(str(directory)):
        for raw in tf.data.TFRecordDataset(path):
            f = tf.train.Example.FromString(raw.numpy()).features.feature
            out[f["id"].bytes_list.value[0].decode()] = (list(f["tokens"].int64_list.value),
                                                         list(f["loss_mask"].int64_list.value))
    return out


def prompt_part(template: str, tokens: list[int], loss_mask: list[int]) -> list[int]:
    """What prepare wrote before the target: up to the first trained token; raw: all but the EOS."""
    if template == "raw":
        return tokens[:-1]
    return tokens[:loss_mask.index(1)]


@pytest.fixture(scope="module")
def pair_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    rows = []
    for i, r in enumerate(cldr_pairs(langs=["th", "ur", "sw", "fi"], per_lang=2)):
        rows.append(dict(r, label=T.EVALUATOR_LABELS[i % 3], text=r["output"][::-1]))
    rows[1]["id"] = 17  # an integer id: generate copies it as it is, prepare writes "17"
    texts = [t for r in rows for t in (r["instruction"], r["output"], r["text"])]
    tok = train_small_tokenizer(root / "tok", texts + [T.SFT_PROMPT, T.REVGEN_PROMPT, T.EVALUATOR_PROMPT],
                                vocab_size=480)
    return root, write_jsonl(root / "pairs.jsonl", rows), rows, tok


@pytest.mark.parametrize("template", TEMPLATES)
def test_generate_feeds_the_prompt_prepare_wrote(pair_file, tmp_path, monkeypatch, template):
    from xinst_jax.data.prepare import run_prepare
    from xinst_jax.infer import generate as engine_module
    from xinst_jax.infer.job import run_generate

    root, path, rows, tok_dir = pair_file
    prepared = tmp_path / "prepared"
    run_prepare(Config(run_dir=str(tmp_path / "run"), data=DataConfig(
        inputs=[DataInputConfig(path=str(path))], template=template, tokenizer=str(tok_dir),
        prepared_dir=str(prepared), num_shards=2, num_workers=1)))
    wrote = read_prepared(prepared)
    assert sorted(wrote) == sorted(str(r["id"]) for r in rows)

    fed: list[list[int]] = []
    real_generate = engine_module.Engine.generate

    def spy(self, prompts, settings, row_ids=None, **kw):  # the real engine, its inputs recorded
        fed.extend(list(p) for p in prompts)
        return real_generate(self, prompts, settings, row_ids=row_ids, **kw)

    monkeypatch.setattr(engine_module.Engine, "generate", spy)
    cfg = load_config("generate_demo", [
        f"run_dir={tmp_path / 'run'}", f"generate.input={path}", f"generate.output={tmp_path / 'gen'}",
        f"generate.template={template}", f"generate.tokenizer={tok_dir}", "model.vocab_size=512",
        "generate.max_new_tokens=2", "generate.batch_size=8", "generate.shard_size=8",
        "generate.prompt_buckets=[256]", "generate.progress=false", "mesh.num_devices=1"])
    report = run_generate(cfg)
    assert report["records"] == len(rows) and report["bad_lines"] == 0 and report["template"] == template
    assert len(fed) == len(rows)
    tok = load_tokenizer(str(tok_dir))
    for row, prompt in zip(rows, fed):
        tokens, mask = wrote[str(row["id"])]
        assert prompt == prompt_part(template, tokens, mask), (template, row["id"])
        assert prompt[0] == tok.bos_id and prompt.count(tok.bos_id) == 1  # BOS once, as prepare wrote it
    out = [json.loads(line) for line in (tmp_path / "gen" / "output.jsonl").read_text().splitlines()]
    assert [o["id"] for o in out] == [r["id"] for r in rows]  # 17 stays an integer
    assert [o["prompt_tokens"] for o in out] == [len(p) for p in fed]
