"""Tokenizers behind one interface: SentencePiece `.model` files, Hugging Face `tokenizer.json`,
and `bytes` (UTF-8 bytes, no files: the offline demos and tests). The one tokenizer stack of the
project: prepare, train_tokenizer and the generate job all load tokenizers here.

    tok = load_tokenizer(path)       # a .model, a tokenizer.json, a directory holding one, or "bytes"
    tok.encode(text)                 # what transformers' `tokenizer(text)["input_ids"]` gives
    tok.encode(text, add_special_tokens=False)
    tok.encode_continuation(text)    # text that continues a previous encode (no prefix space)
    tok.decode(ids)                  # special tokens skipped: decode(encode(x)) == x
    tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id, tok.vocab_size
    tok.prefix_ids, tok.suffix_ids   # the special ids encode() adds around a text, e.g. (bos,), ()

BOS/EOS: `encode(text)` adds exactly what transformers (5.x) adds when it loads the same files:
for a tokenizer.json its post-processor decides (transformers drops the config's add_bos_token /
add_eos_token when a tokenizer.json exists); for a SentencePiece `.model` the `add_bos_token` /
`add_eos_token` of the `tokenizer_config.json` beside it decide, each False when absent -- so a
bare `.model` gets no BOS, as in transformers 5 (our `train_tokenizer` writes a post-processor
that adds BOS and `add_bos_token: true`). Token names (bos_token, eos_token, pad_token) come from
tokenizer_config.json / special_tokens_map.json; a tokenizer.json without either file has its
usual names looked up (<s>, </s>, <|endoftext|>, ...). Tasks (`xinst_jax.tasks`) build
`prefix_ids + prompt + completion + [eos_id]`.

Literal special-token strings inside a text (a record containing "</s>") are encoded as plain
text, never as control ids, for both kinds: transformers with `split_special_tokens=True`.

A directory holding both files is read through tokenizer.json (as transformers does). `pad_id` is
the pad token when the files define one, else `eos_id` (padding is masked by segment ids anyway).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import tempfile
from typing import Any, Optional, Sequence

from xinst_jax import paths
from xinst_jax.data.records import DataError, is_remote, open_binary

BYTES = "bytes"  # load_tokenizer's name for ByteTokenizer
SP_FILE = "tokenizer.model"
HF_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_MAP_FILE = "special_tokens_map.json"
# Probes for the continuation check: decode(prompt + continuation) must give the joined text.
_CONT_PROBES = ("x", " x", "  x y", "\nx", "x\n", "ไทย", " اردو")


class Tokenizer:
    """The common interface (see the module docstring)."""

    kind: str = ""
    path: str = ""
    files: tuple[str, ...] = ()
    vocab_size: int = 0
    bos_id: Optional[int] = None
    eos_id: Optional[int] = None
    unk_id: Optional[int] = None
    pad_token_id: Optional[int] = None
    prefix_ids: tuple[int, ...] = ()
    suffix_ids: tuple[int, ...] = ()

    # ---- to implement

    def _encode_plain(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_continuation(self, text: str) -> list[int]:
        """Ids of `text` when it directly continues earlier text: no dummy prefix / prefix space,
        so that decode(encode(a, False) + encode_continuation(b)) == a + b."""
        raise NotImplementedError

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        raise NotImplementedError

    # ---- shared

    def _read(self, file: str) -> bytes:
        """The tokenizer file's bytes; records it (and its tokenizer_config.json) as this tokenizer's files."""
        self.path = file
        self.files = tuple(f for f in (file, _beside(file, CONFIG_FILE)) if _exists(f))
        with open_binary(file) as f:
            return f.read()

    @property
    def pad_id(self) -> Optional[int]:
        return self.pad_token_id if self.pad_token_id is not None else self.eos_id

    @property
    def add_bos(self) -> bool:
        return self.bos_id is not None and self.bos_id in self.prefix_ids

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self._encode_plain(text)
        if add_special_tokens:
            ids = list(self.prefix_ids) + ids + list(self.suffix_ids)
        return ids

    def sha256(self) -> str:
        h = hashlib.sha256()
        for f in self.files:
            with open_binary(f) as fh:
                h.update(os.path.basename(f).encode() + b"\0" + fh.read() + b"\0")
        return h.hexdigest()

    def describe(self) -> dict:
        return {"path": self.path, "kind": self.kind, "files": [os.path.basename(f) for f in self.files],
                "vocab_size": self.vocab_size, "bos_id": self.bos_id, "eos_id": self.eos_id,
                "pad_id": self.pad_id, "unk_id": self.unk_id, "prefix_ids": list(self.prefix_ids),
                "suffix_ids": list(self.suffix_ids), "sha256": self.sha256()}

    def check_continuation(self) -> None:
        """Raise unless decode(encode(a) + encode_continuation(b)) == a + b on probe strings
        (templates call it once before joining prompt and completion)."""
        if getattr(self, "_continuation_ok", False):
            return
        for probe in _CONT_PROBES:
            head = "Response:"
            ids = self._encode_plain(head) + self.encode_continuation(probe)
            if self.decode(ids) != head + probe:
                raise DataError(f"tokenizer {self.path}: {head!r} + {probe!r} does not survive encode/decode "
                                f"(decodes as {self.decode(ids)!r}); its pre-tokenizer or decoder is not supported")
        self._continuation_ok = True

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r}, vocab_size={self.vocab_size}, bos={self.bos_id}, eos={self.eos_id})"


# --------------------------------------------------------------------------- bytes


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes shifted by 3: ids 0, 1, 2 are pad, bos, eos; byte b is id b + 3 (vocab 259).
    encode() adds BOS in front, as a Llama tokenizer does."""

    kind = "bytes"
    path = BYTES
    offset = 3
    vocab_size = 256 + offset
    pad_token_id, bos_id, eos_id = 0, 1, 2
    prefix_ids = (1,)

    def _encode_plain(self, text: str) -> list[int]:
        return [b + self.offset for b in text.encode("utf-8")]

    def encode_continuation(self, text: str) -> list[int]:
        return self._encode_plain(text)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        data = bytes(int(i) - self.offset for i in ids if self.offset <= int(i) < self.vocab_size)
        return data.decode("utf-8", errors="replace")

    def sha256(self) -> str:
        return hashlib.sha256(b"xinst_jax bytes tokenizer: utf-8 + 3").hexdigest()


# --------------------------------------------------------------------------- SentencePiece


class SentencePieceTokenizer(Tokenizer):
    kind = "sentencepiece"

    def __init__(self, model_file: str, config: Optional[dict] = None):
        import sentencepiece as spm
        from sentencepiece import sentencepiece_model_pb2 as sp_pb2

        data = self._read(model_file)
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=data)
        except Exception as e:  # noqa: BLE001 (sentencepiece raises RuntimeError/OSError)
            raise DataError(f"{model_file}: not a SentencePiece model ({e})") from None
        proto = sp_pb2.ModelProto()
        proto.ParseFromString(data)
        proto.normalizer_spec.add_dummy_prefix = False  # same pieces, no leading "▁"
        self._sp_cont = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
        self.vocab_size = self._sp.get_piece_size()
        cfg = config or {}

        def special(key: str, default: int) -> Optional[int]:
            name = _token_name(cfg.get(key))
            if name is not None:
                i = self._sp.piece_to_id(name)
                if i != self._sp.unk_id() or name == self._sp.id_to_piece(self._sp.unk_id()):
                    return i
                return None
            return default if default >= 0 else None

        self.bos_id = special("bos_token", self._sp.bos_id())
        self.eos_id = special("eos_token", self._sp.eos_id())
        self.unk_id = special("unk_token", self._sp.unk_id())
        self.pad_token_id = special("pad_token", self._sp.pad_id())
        self.prefix_ids = (self.bos_id,) if cfg.get("add_bos_token", False) and self.bos_id is not None else ()
        self.suffix_ids = (self.eos_id,) if cfg.get("add_eos_token", False) and self.eos_id is not None else ()
        self._special = {i for i in range(self.vocab_size) if self._sp.is_control(i)}

    def _encode_plain(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_continuation(self, text: str) -> list[int]:
        return self._sp_cont.encode(text)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            return self._sp.decode([i for i in ids if i not in self._special])
        out, run = [], []
        for i in ids:
            if i in self._special:
                out.append(self._sp.decode(run) + self._sp.id_to_piece(i))
                run = []
            else:
                run.append(i)
        return "".join(out) + self._sp.decode(run)


# --------------------------------------------------------------------------- Hugging Face tokenizer.json


class HFTokenizer(Tokenizer):
    kind = "hf"

    def __init__(self, json_file: str, config: Optional[dict] = None):
        from tokenizers import Tokenizer as RustTokenizer

        text = self._read(json_file).decode("utf-8")
        try:
            spec = json.loads(text)
            self._tok = RustTokenizer.from_str(text)
        except Exception as e:  # noqa: BLE001 (json or tokenizers errors)
            raise DataError(f"{json_file}: not a Hugging Face tokenizer.json ({e})") from None
        cfg = config if config is not None else {}
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

        def special(key: str, guesses: Sequence[str]) -> Optional[int]:
            name = _token_name(cfg.get(key))
            if name is None and not config:  # no config at all: the usual names, if present
                name = next((g for g in guesses if self._tok.token_to_id(g) is not None), None)
            return self._tok.token_to_id(name) if name is not None else None

        self.bos_id = special("bos_token", ("<s>", "<|begin_of_text|>", "<bos>"))
        self.eos_id = special("eos_token", ("</s>", "<|end_of_text|>", "<eos>", "<|endoftext|>"))
        self.unk_id = special("unk_token", ("<unk>",))
        self.pad_token_id = special("pad_token", ())
        # transformers (5.x) ignores add_bos_token / add_eos_token when a tokenizer.json exists:
        # its post-processor alone decides what encode() adds.
        self._tok.encode_special_tokens = True  # literal "</s>" in a text is text
        probe = "a"
        plain = self._tok.encode(probe, add_special_tokens=False).ids
        full = self._tok.encode(probe, add_special_tokens=True).ids
        at = next((i for i in range(len(full) - len(plain) + 1) if full[i:i + len(plain)] == plain), None)
        if at is None:
            raise DataError(f"{json_file}: cannot tell which special tokens the post-processor adds")
        self.prefix_ids, self.suffix_ids = tuple(full[:at]), tuple(full[at + len(plain):])
        cont_spec = copy.deepcopy(spec)
        for key in ("normalizer", "pre_tokenizer"):
            cont_spec[key] = _without_prefix_space(cont_spec.get(key))
        self._cont = RustTokenizer.from_str(json.dumps(cont_spec))
        self._cont.encode_special_tokens = True

    def _encode_plain(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_continuation(self, text: str) -> list[int]:
        return self._cont.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)


def _without_prefix_space(node: Any) -> Any:
    """A normalizer / pre-tokenizer spec that adds no leading "▁" or space: Metaspace prepends
    never, ByteLevel adds no prefix space, Prepend normalizers and start-anchored Replace
    normalizers (which only exist to cooperate with a prepended "▁") are dropped."""
    if isinstance(node, list):
        return [n for n in (_without_prefix_space(x) for x in node) if n is not None]
    if not isinstance(node, dict):
        return node
    kind = node.get("type")
    if kind == "Prepend":
        return None
    if kind == "Replace":
        pattern = node.get("pattern", {})
        if "Regex" in pattern and str(pattern["Regex"]).startswith(("\\A", "^")):
            return None
    out = {k: _without_prefix_space(v) if isinstance(v, (dict, list)) else v for k, v in node.items()}
    if kind == "Metaspace":
        if "prepend_scheme" in out:
            out["prepend_scheme"] = "never"
        if "add_prefix_space" in out:
            out["add_prefix_space"] = False
    if kind == "ByteLevel" and "add_prefix_space" in out:
        out["add_prefix_space"] = False
    if kind == "Sequence":
        for key in ("normalizers", "pretokenizers"):
            if key in out and not out[key]:
                return None
    return out


# --------------------------------------------------------------------------- loading


def _exists(path: str) -> bool:
    return paths.exists(path)


def _isdir(path: str) -> bool:
    return paths.isdir(path)


def _beside(path: str, name: str) -> str:
    return os.path.join(os.path.dirname(path.rstrip("/")), name)


def _token_name(value: Any) -> Optional[str]:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def read_tokenizer_config(directory: str) -> Optional[dict]:
    """tokenizer_config.json over special_tokens_map.json (as transformers merges them); None when
    neither exists."""
    found = False
    cfg: dict = {}
    for name in (SPECIAL_MAP_FILE, CONFIG_FILE):
        path = os.path.join(directory, name)
        if _exists(path):
            found = True
            with open_binary(path) as f:
                try:
                    data = json.loads(f.read().decode("utf-8"))
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise DataError(f"{path}: invalid JSON ({e})") from None
            if isinstance(data, dict):
                cfg.update(data)
    return cfg if found else None


def resolve_tokenizer_file(path: str, key: str = "data.tokenizer") -> str:
    if not path:
        raise DataError(f"{key}: not set (a SentencePiece .model, a tokenizer.json, or a directory with one)")
    if _isdir(path):
        for name in (HF_FILE, SP_FILE):
            candidate = os.path.join(path, name)
            if _exists(candidate):
                return candidate
        raise DataError(f"{key}: {path} holds neither {HF_FILE} nor {SP_FILE}")
    if not _exists(path):
        raise DataError(f"{key}: {path} does not exist")
    return path


def load_tokenizer(path: str, key: str = "data.tokenizer") -> Tokenizer:
    """A SentencePiece .model, a tokenizer.json, a directory holding one (tokenizer.json first),
    or "bytes" (ByteTokenizer). `key` names the config key in errors."""
    if path == BYTES:
        return ByteTokenizer()
    file = resolve_tokenizer_file(path, key)
    config = read_tokenizer_config(os.path.dirname(file.rstrip("/")) or ".")
    if file.endswith(".json"):
        return HFTokenizer(file, config)
    if file.endswith(".model"):
        return SentencePieceTokenizer(file, config)
    raise DataError(f"{key}: {file}: unknown tokenizer file type (expected .model or tokenizer.json)")


# --------------------------------------------------------------------------- SentencePiece -> tokenizer.json


def sentencepiece_to_hf(model_file: str, add_bos: bool = True, add_eos: bool = False):
    """The `tokenizers` equivalent of a SentencePiece BPE model with byte fallback, identity
    normalisation and a dummy prefix (what `train_tokenizer` trains): same ids for every text.

    Layout (the Llama-2 tokenizer.json layout): normalizer Prepend("▁") + Replace(" ", "▁"), no
    pre-tokenizer, BPE with byte fallback whose merges rank pieces by their SentencePiece score,
    decoder "▁" -> " ", byte fallback, fuse, strip one leading space."""
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2
    from tokenizers import AddedToken, decoders, models, normalizers, processors
    from tokenizers import Tokenizer as RustTokenizer

    proto = sp_pb2.ModelProto()
    with open_binary(model_file) as f:
        proto.ParseFromString(f.read())
    spec, norm = proto.trainer_spec, proto.normalizer_spec
    if spec.model_type != sp_pb2.TrainerSpec.BPE:
        raise DataError(f"{model_file}: only SentencePiece BPE models convert (got model_type {spec.model_type})")
    if norm.remove_extra_whitespaces or (norm.name not in ("identity", "") and norm.precompiled_charsmap):
        raise DataError(f"{model_file}: only identity normalisation without whitespace removal converts exactly")
    piece_type = sp_pb2.ModelProto.SentencePiece
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    mergeable = {p.piece for p in proto.pieces if p.type in (piece_type.NORMAL, piece_type.USER_DEFINED)}
    ranked = []
    for i, p in enumerate(proto.pieces):
        if p.type != piece_type.NORMAL or len(p.piece) < 2:
            continue
        for k in range(1, len(p.piece)):
            left, right = p.piece[:k], p.piece[k:]
            if left in mergeable and right in mergeable:
                ranked.append((-p.score, i, vocab[left], vocab[right], left, right))
    ranked.sort()
    merges = [(left, right) for *_, left, right in ranked]
    unk = proto.pieces[spec.unk_id].piece
    tok = RustTokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    specials = [p.piece for p in proto.pieces if p.type in (piece_type.CONTROL, piece_type.UNKNOWN)]
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    prefix = "▁" if norm.add_dummy_prefix else ""
    tok.normalizer = normalizers.Sequence(([normalizers.Prepend(prefix)] if prefix else [])
                                          + [normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = None
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
                                    + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    bos = proto.pieces[spec.bos_id].piece if spec.bos_id >= 0 else None
    eos = proto.pieces[spec.eos_id].piece if spec.eos_id >= 0 else None
    single = ([f"{bos}:0"] if add_bos and bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos and eos else [])
    pair = single + ([f"{bos}:1"] if add_bos and bos else []) + ["$B:1"] + ([f"{eos}:1"] if add_eos and eos else [])
    special_ids = ([(bos, spec.bos_id)] if add_bos and bos else []) + ([(eos, spec.eos_id)] if add_eos and eos else [])
    tok.post_processor = processors.TemplateProcessing(single=" ".join(single), pair=" ".join(pair),
                                                       special_tokens=special_ids)
    return tok


def save_tokenizer_files(model_file: str, out_dir: str, add_bos: bool = True, add_eos: bool = False) -> list[str]:
    """Write tokenizer.model, tokenizer.json, tokenizer_config.json and special_tokens_map.json
    into `out_dir`: the files a Hugging Face export carries. `AutoTokenizer.from_pretrained(out_dir)`
    gives the ids `load_tokenizer(out_dir)` gives. The config names PreTrainedTokenizerFast so that
    transformers uses tokenizer.json as it is (its LlamaTokenizer class rebuilds the pre-tokenizer
    and would drop a text's leading space)."""
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    if is_remote(out_dir):  # `tokenizers` saves to local files only: made in a temporary directory, then copied
        with tempfile.TemporaryDirectory() as tmp:
            made = save_tokenizer_files(model_file, tmp, add_bos, add_eos)
            paths.makedirs(out_dir)
            for local in made:
                paths.copy_file(local, paths.join(out_dir, os.path.basename(local)))
        return [paths.join(out_dir, os.path.basename(local)) for local in made]
    os.makedirs(out_dir, exist_ok=True)
    target = os.path.join(out_dir, SP_FILE)
    with open_binary(model_file) as f:
        data = f.read()
    if os.path.abspath(model_file) != os.path.abspath(target):
        with open(target, "wb") as f:
            f.write(data)
    proto = sp_pb2.ModelProto()
    proto.ParseFromString(data)
    spec = proto.trainer_spec

    def piece(i: int) -> Optional[str]:
        return proto.pieces[i].piece if i >= 0 else None

    tok = sentencepiece_to_hf(target, add_bos=add_bos, add_eos=add_eos)
    tok.save(os.path.join(out_dir, HF_FILE))
    special = {"bos_token": piece(spec.bos_id), "eos_token": piece(spec.eos_id), "unk_token": piece(spec.unk_id),
               "pad_token": piece(spec.pad_id)}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": add_bos, "add_eos_token": add_eos,
              **special, "clean_up_tokenization_spaces": False, "model_max_length": 1_000_000}
    with open(os.path.join(out_dir, CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
        f.write("\n")
    with open(os.path.join(out_dir, SPECIAL_MAP_FILE), "w", encoding="utf-8") as f:
        json.dump({k: v for k, v in special.items() if v is not None}, f, indent=2, ensure_ascii=False)
        f.write("\n")
    return [os.path.join(out_dir, n) for n in (SP_FILE, HF_FILE, CONFIG_FILE, SPECIAL_MAP_FILE)]
