"""The `train_tokenizer` job: a SentencePiece BPE with byte fallback on the text of `data.inputs`.

    python launch/tpu_run.py --config NAME   (job: train_tokenizer)

Trains on every text field (`text`, `instruction`, `output`) of the records that `data.inputs`
yields (validated like prepare's, `data.languages` and `data.max_chars` apply), one line per
training sentence, and writes into `data.tokenizer` (a directory, local or gs://, written through
xinst_jax/paths.py; default `<run_dir>/tokenizer`; for gs:// the files are made and checked in a
local temporary directory, then uploaded):

  tokenizer.model          the SentencePiece model (unk 0, BOS <s> 1, EOS </s> 2, no pad)
  tokenizer.json           the same tokenizer for the `tokenizers` library (identical ids)
  tokenizer_config.json    add_bos_token: true, add_eos_token: false (Llama convention)
  special_tokens_map.json

`export.tokenizer_dir` pointed at that directory puts these files into the Hugging Face export.

Model choices (the demo's tokenizer): BPE, byte fallback (no character is ever <unk>), identity
normalisation and no whitespace collapsing (decode(encode(x)) == x for every text), a dummy
prefix as Llama's, digits split, `data.tokenizer_vocab_size` pieces (at most: a small corpus can
give fewer), `data.tokenizer_character_coverage` of the characters as pieces (the rest via
bytes). With more than `data.tokenizer_max_sentences` lines a seeded sample is used.
"""

from __future__ import annotations

import io
import logging
import os
import random
import tempfile
import time

from xinst_jax import paths
from xinst_jax.config import Config, ConfigError
from xinst_jax.data.records import TEXT_FIELDS, DataError, RecordReader
from xinst_jax.data.tokenizer import SP_FILE, Tokenizer, load_tokenizer, save_tokenizer_files
from xinst_jax.jobs import register_job

log = logging.getLogger(__name__)


def tokenizer_out_dir(cfg: Config) -> str:
    path = cfg.data.tokenizer or paths.join(cfg.resolved_run_dir(), "tokenizer")
    if path.endswith((".model", ".json")):
        raise ConfigError(f"data.tokenizer: train_tokenizer writes a directory; got the file name {path!r}")
    return path


def collect_sentences(cfg: Config) -> tuple[list[str], RecordReader]:
    data = cfg.data
    if not data.inputs:
        raise DataError("data.inputs: empty; train_tokenizer needs text to train on")
    reader = RecordReader(data.languages, data.max_chars, data.strict, required=(), any_of=TEXT_FIELDS)
    sentences = []
    for record in reader.read(data.inputs):
        for f in TEXT_FIELDS:
            for line in record.get(f, "").split("\n"):
                if line.strip():
                    sentences.append(line)
    if not sentences:
        raise DataError("data.inputs: no text to train a tokenizer on (every record skipped?)")
    if data.tokenizer_max_sentences and len(sentences) > data.tokenizer_max_sentences:
        keep = sorted(random.Random(cfg.seed).sample(range(len(sentences)), data.tokenizer_max_sentences))
        sentences = [sentences[i] for i in keep]
    return sentences, reader


def train_sentencepiece(sentences: list[str], vocab_size: int, character_coverage: float = 0.9995,
                        num_threads: int = 0) -> bytes:
    """Serialized SentencePiece BPE model trained on `sentences` (see the module docstring)."""
    import sentencepiece as spm

    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences), model_writer=model, model_type="bpe", vocab_size=vocab_size,
            byte_fallback=True, character_coverage=character_coverage, normalization_rule_name="identity",
            remove_extra_whitespaces=False, add_dummy_prefix=True, split_digits=True,
            allow_whitespace_only_pieces=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            input_sentence_size=0, shuffle_input_sentence=False, max_sentence_length=1 << 17,
            hard_vocab_limit=False, num_threads=num_threads or min(os.cpu_count() or 1, 16), minloglevel=2)
    except RuntimeError as e:
        raise ConfigError(f"data.tokenizer_vocab_size: SentencePiece training failed with vocab_size {vocab_size}: "
                          f"{e}") from None
    return model.getvalue()


def run_train_tokenizer(cfg: Config) -> str:
    out_dir = tokenizer_out_dir(cfg)
    start = time.time()
    sentences, reader = collect_sentences(cfg)
    model = train_sentencepiece(sentences, cfg.data.tokenizer_vocab_size, cfg.data.tokenizer_character_coverage)
    # the files are made and checked locally; a bucket directory gets them uploaded, never read back
    remote = paths.is_remote(out_dir)
    with tempfile.TemporaryDirectory(prefix="xinst_jax_tokenizer-") as tmp:
        local_dir = tmp if remote else out_dir
        made = write_tokenizer(model, local_dir)
        sp = check_tokenizer(local_dir, sentences)
        if remote:
            upload(made, out_dir)
    totals = reader.totals()
    log.info("train_tokenizer: %d sentences from %d records (%d skipped) in %.1fs", len(sentences), totals["kept"],
             totals["skipped_total"], time.time() - start)
    print(f"tokenizer: vocab {sp.vocab_size} (bos {sp.bos_id}, eos {sp.eos_id}) trained on {len(sentences)} lines "
          f"-> {out_dir}", flush=True)
    return out_dir


def write_tokenizer(model: bytes, out_dir: str) -> list[str]:
    """The SentencePiece model and the Hugging Face files beside it in a local directory; their paths."""
    os.makedirs(out_dir, exist_ok=True)
    model_file = os.path.join(out_dir, SP_FILE)
    paths.write_atomic(model_file, model)
    return save_tokenizer_files(model_file, out_dir, add_bos=True, add_eos=False)


def check_tokenizer(tok_dir: str, sentences: list[str]) -> Tokenizer:
    """The SentencePiece tokenizer of `tok_dir`, after checking that its tokenizer.json gives the same
    ids on a sample of the training lines (a warning when not)."""
    sp, hf = load_tokenizer(os.path.join(tok_dir, SP_FILE)), load_tokenizer(tok_dir)
    sample = sentences[:: max(1, len(sentences) // 2000)]
    mismatches = sum(sp.encode(s) != hf.encode(s) for s in sample)
    if mismatches:
        log.warning("tokenizer.json differs from tokenizer.model on %d of %d sample sentences", mismatches, len(sample))
    return sp


def upload(files: list[str], out_dir: str) -> None:
    paths.makedirs(out_dir)
    for f in files:
        paths.copy_file(f, paths.join(out_dir, os.path.basename(f)))


@register_job("train_tokenizer", log_level=logging.INFO)
def train_tokenizer_job(cfg: Config) -> None:
    run_train_tokenizer(cfg)
