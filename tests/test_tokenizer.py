"""Tokenizers: SentencePiece and tokenizer.json behind one interface, the same ids and BOS/EOS as
transformers loading the same files, lossless round trips, and the train_tokenizer job."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from data_helpers import EDGE_TEXTS, REPO, all_texts, cldr_pairs, train_small_tokenizer, write_jsonl
from xinst_jax.data.records import DataError
from xinst_jax.data.tokenizer import ByteTokenizer, HFTokenizer, SentencePieceTokenizer, load_tokenizer

RECORDS = cldr_pairs(per_lang=12)
TEXTS = all_texts(RECORDS)
# Texts that do not start with whitespace and hold no literal special-token strings.
EDGES = [t for t in EDGE_TEXTS if "<" not in t]
PLAIN = TEXTS + [t for t in EDGES if t and not t[0].isspace()]
SPECIALS = [t for t in EDGE_TEXTS if "<" in t] + ["</s>", "<s>x</s>", "a <unk> b"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return train_small_tokenizer(tmp_path_factory.mktemp("tok"), TEXTS + EDGE_TEXTS)


@pytest.fixture(scope="module")
def transformers_auto():
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    return transformers.AutoTokenizer


def test_interface_and_kinds(trained):
    sp = load_tokenizer(str(trained / "tokenizer.model"))
    hf = load_tokenizer(str(trained))  # a directory: tokenizer.json first, as transformers reads it
    assert isinstance(sp, SentencePieceTokenizer) and isinstance(hf, HFTokenizer)
    for tok in (sp, hf):
        assert (tok.bos_id, tok.eos_id, tok.unk_id) == (1, 2, 0)
        assert tok.pad_id == tok.eos_id  # no pad token in the files: padding falls back to EOS
        assert tok.vocab_size == sp.vocab_size > 300
        assert tok.prefix_ids == (1,) and tok.suffix_ids == () and tok.add_bos
        x = "ภาษาไทย"
        assert tok.encode(x) == [1] + tok.encode(x, add_special_tokens=False)
        assert tok.decode(tok.encode(x)) == x
        assert tok.decode(tok.encode(x), skip_special_tokens=False).startswith("<s>")
        d = tok.describe()
        assert d["vocab_size"] == tok.vocab_size and d["bos_id"] == 1 and len(d["sha256"]) == 64


def test_sentencepiece_and_tokenizer_json_give_the_same_ids(trained):
    sp = load_tokenizer(str(trained / "tokenizer.model"))
    hf = load_tokenizer(str(trained / "tokenizer.json"))
    for text in TEXTS + EDGE_TEXTS + SPECIALS:
        ids = sp.encode(text)
        assert hf.encode(text) == ids, text
        assert sp.decode(ids) == text and hf.decode(ids) == text, text
        assert sp.unk_id not in ids  # byte fallback: no character becomes <unk>
        for head in ("### Response:", "x"):
            joined = sp.encode(head, add_special_tokens=False) + sp.encode_continuation(text)
            assert hf.encode(head, add_special_tokens=False) + hf.encode_continuation(text) == joined
            assert sp.decode(joined) == head + text, (head, text)


def test_transformers_auto_tokenizer_reproduces_our_ids(trained, transformers_auto):
    ours_hf = load_tokenizer(str(trained))
    ours_sp = load_tokenizer(str(trained / "tokenizer.model"))
    ref = transformers_auto.from_pretrained(str(trained))
    assert (ref.bos_token_id, ref.eos_token_id) == (ours_hf.bos_id, ours_hf.eos_id)
    for text in TEXTS + EDGES:
        expected = ref(text)["input_ids"]
        assert ours_hf.encode(text) == expected, text
        assert ours_sp.encode(text) == expected, text
        assert ref.decode(expected, skip_special_tokens=True) == ours_hf.decode(expected) == text
    split = transformers_auto.from_pretrained(str(trained), split_special_tokens=True)
    for text in SPECIALS:  # literal "</s>" in a text is text for us: transformers' split_special_tokens
        assert ours_hf.encode(text) == split(text)["input_ids"] == ours_sp.encode(text), text
        assert ours_hf.encode(text).count(ours_hf.eos_id) == 0


def _variant(trained, tmp_path, config, files=("tokenizer.model",)):
    d = tmp_path / "variant"
    d.mkdir()
    for f in files:
        shutil.copy(trained / f, d / f)
    if config is not None:
        (d / "tokenizer_config.json").write_text(json.dumps(config))
    return d


@pytest.mark.parametrize("config, prefix, suffix", [
    (None, (), ()),  # a bare .model: transformers 5 adds nothing
    ({"tokenizer_class": "LlamaTokenizer"}, (), ()),
    ({"tokenizer_class": "LlamaTokenizer", "add_bos_token": True}, (1,), ()),
    ({"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": True}, (1,), (2,)),
    ({"tokenizer_class": "LlamaTokenizer", "add_bos_token": False, "add_eos_token": True}, (), (2,)),
], ids=["bare", "config-no-flags", "bos", "bos+eos", "eos"])
def test_sentencepiece_bos_eos_as_transformers(trained, tmp_path, transformers_auto, config, prefix, suffix):
    d = _variant(trained, tmp_path, config)
    ours = load_tokenizer(str(d))
    assert isinstance(ours, SentencePieceTokenizer)
    assert (ours.prefix_ids, ours.suffix_ids) == (prefix, suffix)
    ref = transformers_auto.from_pretrained(str(d))
    for text in PLAIN:
        assert ours.encode(text) == ref(text)["input_ids"], text


FAST = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>"}


@pytest.mark.parametrize("config, post_processor, prefix, suffix", [
    (FAST, True, (1,), ()),  # the tokenizer.json's own post-processor adds BOS
    ({**FAST, "add_bos_token": False, "add_eos_token": True}, True, (1,), ()),  # ignored beside a tokenizer.json
    ({"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": True,
      "bos_token": "<s>", "eos_token": "</s>"}, True, (1,), ()),
    ({**FAST, "add_bos_token": True}, False, (), ()),  # no post-processor: nothing added
], ids=["post-processor", "flags-ignored", "llama-class", "no-post-processor"])
def test_tokenizer_json_bos_eos_as_transformers(trained, tmp_path, transformers_auto, config, post_processor,
                                                prefix, suffix):
    d = _variant(trained, tmp_path, config, files=("tokenizer.json",))
    if not post_processor:
        spec = json.loads((d / "tokenizer.json").read_text())
        spec["post_processor"] = None
        (d / "tokenizer.json").write_text(json.dumps(spec))
    ours = load_tokenizer(str(d))
    assert (ours.prefix_ids, ours.suffix_ids) == (prefix, suffix)
    assert (ours.bos_id, ours.eos_id) == (1, 2)
    ref = transformers_auto.from_pretrained(str(d))
    for text in PLAIN:
        assert ours.encode(text) == ref(text)["input_ids"], text


def test_byte_level_tokenizer_json(tmp_path, transformers_auto):
    """A GPT-2 style byte-level BPE (the SmolLM2 / Llama-3 family) with its own BOS post-processor."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=800, special_tokens=["<|bos|>", "<|eos|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<|bos|> $A", special_tokens=[("<|bos|>", 0)])
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|bos|>", "eos_token": "<|eos|>"}))
    ours = load_tokenizer(str(tmp_path))
    ref = transformers_auto.from_pretrained(str(tmp_path))
    assert (ours.bos_id, ours.eos_id, ours.prefix_ids) == (0, 1, (0,))
    for text in TEXTS + EDGES:
        ids = ours.encode(text)
        assert ids == ref(text)["input_ids"], text
        assert ours.decode(ids) == text
        joined = ours.encode("### Response:", False) + ours.encode_continuation(text)
        assert ours.decode(joined) == "### Response:" + text


def test_load_errors(tmp_path, trained):
    with pytest.raises(DataError, match="data.tokenizer: not set"):
        load_tokenizer("")
    with pytest.raises(DataError, match="does not exist"):
        load_tokenizer(str(tmp_path / "missing.model"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds neither tokenizer.json nor tokenizer.model"):
        load_tokenizer(str(tmp_path / "empty"))
    (tmp_path / "bad.model").write_bytes(b"not a model")
    with pytest.raises(DataError, match="not a SentencePiece model"):
        load_tokenizer(str(tmp_path / "bad.model"))


def test_load_errors_name_the_config_key(tmp_path):
    with pytest.raises(DataError, match=r"^generate.tokenizer: .*missing does not exist$"):
        load_tokenizer(str(tmp_path / "missing"), key="generate.tokenizer")


def test_byte_tokenizer_behind_the_same_interface():
    tok = load_tokenizer("bytes")
    assert isinstance(tok, ByteTokenizer) and tok.kind == "bytes"
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (0, 1, 2, 259)
    assert tok.prefix_ids == (1,) and tok.suffix_ids == () and tok.add_bos
    for text in ("hello", "กรุงเทพ", "Habari ya asubuhi", "پاکستان", "", *EDGE_TEXTS):
        plain = tok.encode(text, add_special_tokens=False)
        assert plain == [b + 3 for b in text.encode("utf-8")]
        assert tok.encode(text) == [1] + plain  # BOS in front, as the Llama tokenizers add it
        assert tok.encode_continuation(text) == plain
        assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode("ab") + [tok.eos_id, 0]) == "ab"  # specials are not text
    tok.check_continuation()
    d = tok.describe()
    assert d["kind"] == "bytes" and d["files"] == [] and d["sha256"] == load_tokenizer("bytes").sha256()


def test_tokenizer_json_without_post_processor_adds_nothing(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["the cat sat on the mat", "the dog sat on the log"] * 5,
                            trainers.BpeTrainer(vocab_size=60, special_tokens=["<pad>", "<s>", "</s>", "<unk>"]))
    tok.save(str(tmp_path / "tokenizer.json"))
    ours = load_tokenizer(str(tmp_path))  # a directory holding tokenizer.json, no config beside it
    assert isinstance(ours, HFTokenizer) and ours.prefix_ids == ()
    assert (ours.bos_id, ours.eos_id, ours.unk_id) == (1, 2, 3)  # the usual names, looked up
    ids = ours.encode("the cat sat")
    assert ids == tok.encode("the cat sat", add_special_tokens=False).ids
    assert ours.decode(ids) == tok.decode(ids)


def run_entry(*args, cwd, timeout=300):
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run([sys.executable, str(REPO / "launch" / "tpu_run.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_train_tokenizer_job(tmp_path, transformers_auto):
    data = write_jsonl(tmp_path / "pairs.jsonl", RECORDS + [{"lang": "xx", "text": "skipped"}])
    out = tmp_path / "tok"
    cfg = {"job": "train_tokenizer", "run_dir": str(tmp_path / "run"),
           "data": {"inputs": [{"path": str(data)}], "tokenizer": str(out), "tokenizer_vocab_size": 600}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    proc = run_entry("--config", str(tmp_path / "c.yaml"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "unknown_lang" in proc.stderr  # the bad record is reported, not silently used
    from xinst_jax.convert.hf import TOKENIZER_FILES

    assert {p.name for p in out.iterdir()} >= set(TOKENIZER_FILES)  # what the HF export copies
    ours = load_tokenizer(str(out))
    assert ours.vocab_size <= 600 and (ours.bos_id, ours.eos_id, ours.prefix_ids) == (1, 2, (1,))
    ref = transformers_auto.from_pretrained(str(out))
    sp = load_tokenizer(str(out / "tokenizer.model"))
    for text in TEXTS + EDGES:
        assert ours.encode(text) == ref(text)["input_ids"] == sp.encode(text), text
        assert ours.decode(ours.encode(text)) == text
    cfg["data"]["tokenizer"] = str(tmp_path / "x.model")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    proc = run_entry("--config", str(tmp_path / "c.yaml"), cwd=tmp_path)
    assert proc.returncode == 2 and "data.tokenizer" in proc.stderr and "Traceback" not in proc.stderr
