"""Shared helpers of the data tests: small real multilingual text without ../shared (Babel's CLDR
strings: country and month names in the ten languages, with their English names), edge-case
strings, and a small SentencePiece tokenizer trained on them."""

from __future__ import annotations

import json
import os
import re
import shlex
import string
from pathlib import Path

LANGS = ["bn", "fi", "hi", "id", "sw", "ta", "th", "tr", "ur", "vi"]
REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"

# Strings that break careless tokenizers or readers.
EDGE_TEXTS = [
    "", " ", "  two  spaces  ", " leading space", "trailing space ", "tab\there", "line\nbreak\r\nwindows",
    "\ufeffBOM at start", "BOM \ufeff inside", "emoji 🙂👍🏽 and ℃ ﬁ", "combining e\u0301 vs é", "zero\u200bwidth",
    "RTL mark \u200f اردو \u200e", "literal </s> and <s> and <unk> strings", "line\u2028separator",
    "ภาษาไทยไม่มีช่องว่างระหว่างคำ", "தமிழ் எழுத்துக்கள்", "यह हिन्दी है।", "এটা বাংলা।", "یہ اردو ہے۔",
    "Tiếng Việt có dấu", "Türkçe ğüşıöç İı", "Suomen kieli: äö", "123 4567 89.5%",
]


def cldr_pairs(langs=LANGS, per_lang: int = 12) -> list[dict]:
    """Pair records (English instruction, target-language output) from CLDR strings."""
    from babel import Locale

    en = Locale.parse("en")
    records = []
    for lang in langs:
        loc = Locale.parse(lang)
        codes = [c for c in sorted(loc.territories) if c.isalpha() and c in en.territories][: per_lang * 3]
        months = list(loc.months["format"]["wide"].values())
        days = list(loc.days["format"]["wide"].values())
        for i in range(per_lang):
            chunk = codes[3 * i: 3 * i + 3]
            names = [loc.territories[c] for c in chunk]
            records.append({
                "id": f"cldr-{lang}-{i}",
                "lang": lang,
                "instruction": f"List {', '.join(en.territories[c] for c in chunk)}, then month {i % 12 + 1} "
                               f"and weekday {i % 7 + 1}.",
                "output": f"{'، '.join(names) if lang == 'ur' else ', '.join(names)}. {months[i % 12]} {days[i % 7]}",
            })
    return records


def all_texts(records: list[dict]) -> list[str]:
    return [r[f] for r in records for f in ("instruction", "output")]


def write_jsonl(path: Path, rows: list) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row, ensure_ascii=False)) + "\n")
    return path


def train_small_tokenizer(out_dir: Path, texts: list[str], vocab_size: int = 700) -> Path:
    """SentencePiece BPE + tokenizer.json + configs (the train_tokenizer job's files) in out_dir."""
    from xinst_jax.data.tokenizer import SP_FILE, save_tokenizer_files
    from xinst_jax.data.train_tokenizer import train_sentencepiece

    os.makedirs(out_dir, exist_ok=True)
    lines = [line for t in texts for line in t.split("\n") if line.strip()]
    model = train_sentencepiece(lines, vocab_size, num_threads=1)
    (out_dir / SP_FILE).write_bytes(model)
    save_tokenizer_files(str(out_dir / SP_FILE), str(out_dir))
    return out_dir


def tiny_hf_model(out: Path, seed: int) -> Path:
    """A tiny random-init Llama (the `tiny` preset) exported as a Hugging Face directory: the model
    of the curation, serving and evaluation tests, where what it writes does not matter."""
    import jax

    from xinst_jax.config import model_preset
    from xinst_jax.convert.hf import export_hf
    from xinst_jax.model.llama import init_params

    cfg = model_preset("tiny")
    export_hf(init_params(cfg, jax.random.PRNGKey(seed)), cfg, out, dtype="float32")
    return out


def readme_pod_commands() -> tuple[dict[str, str], list[list[str]]]:
    """The README's TPU pod section as a user would run it: its `export NAME=value` settings, and
    each `python launch/tpu_vm.py ...` command as argv (after the program name) with them filled in."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text[text.index("### On a TPU pod"):]
    section = section[:section.index("\n## ")]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    lines = "\n".join(blocks).replace("\\\n", " ").splitlines()
    env = dict(re.match(r"\s*export (\w+)=(\S+)$", line).groups() for line in lines
               if re.match(r"\s*export \w+=[^$(]+$", line))

    def filled(command: str) -> list[str]:
        return shlex.split(string.Template(command).safe_substitute(env))[2:]

    commands = [filled(line.strip()) for line in lines if line.strip().startswith("python launch/tpu_vm.py")]
    return env, commands


def run_sets(argv: list[str]) -> list[str]:
    """The `--set KEY=VALUE` overrides after `--` in a launcher command."""
    args = argv[argv.index("--") + 1:]
    return [args[i + 1] for i, a in enumerate(args) if a == "--set"]
