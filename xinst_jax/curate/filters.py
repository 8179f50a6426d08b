"""Filters of X-Instruction's curation stages: web documents (candidates) and generated English
instructions (candidates, refine). Every drop has one reason, so stage manifests count drops per
language and reason.

`CorpusFilter.check(record)` tests a document `{id, lang, text, ...}`; the first failing check
names the drop (`REASONS`, in order of evaluation):

    too_short, too_long   stripped character count outside [min_chars, max_chars]
    short_lines           share of characters in lines shorter than min_line_chars
                          above max_short_line_share (menus, bylines, buttons, tag lists)
    boilerplate_chars     share of the non-space characters that are neither letters nor marks
                          (digits, punctuation, symbols) above max_non_letter_share
    repeated_lines        share of the non-empty lines repeating an earlier line of the same
                          document above max_repeated_line_share
    wrong_lang            py3langid's best language is not the record's `lang` (check_lang), or
                          `lang` is not one of the filter's `languages` (always checked)
    low_lang_confidence   py3langid's probability of the record's `lang` below min_lang_confidence
    exact_duplicate       the normalised text was kept before, in any language
    near_duplicate        a kept document's character shingles overlap above
                          near_duplicate_threshold (MinHash LSH estimate of the Jaccard index)

The cheap checks come first, language id (one py3langid pass per document) next, and the
duplicate checks last, so that only documents that pass everything else enter the duplicate
indexes: a document is remembered only when it is kept, and the first one seen wins. The
filter is deterministic in its input order: a resumed stage replays the earlier shards' records
through `check` to rebuild the same state.

Why the defaults (`CorpusFilterConfig`) are what they are:

- Length window 400..3000 characters. The paper keeps web texts that can serve as responses;
  its curated pairs' responses average about 1,000-1,300 characters. The window keeps that range
  with room on both sides: under ~400 characters a text is rarely a complete answer (a caption,
  a teaser, a navigation block), and above ~3000 a response no longer fits a 2k-token training
  row in the scripts that tokenise worst (Tamil, Bengali, Thai take several tokens per word).
- Short lines (20 characters, half of the characters): pages whose text is mostly short lines
  are menus, tag clouds, tables of links; running prose puts almost all its characters in long
  lines in every script here (a Thai or Tamil sentence is longer than 20 characters too).
- Non-letter share 0.3. Letters are Unicode categories L* and marks M*: the vowel signs of Thai,
  Tamil, Bengali, Devanagari and Urdu's diacritics are marks (Mn/Mc), so they count as letters;
  digits, punctuation and symbols do not. Prose in the ten languages stays well under 10%;
  tables of numbers, code, URLs and price lists go above 30%.
- Repeated lines 0.3: boilerplate repeated down a page ("Read more", "Share"); prose repeats
  almost no line.
- Language: the full py3langid model (140 languages, normalised probabilities), not one
  restricted to the ten, so that an English or Chinese page labelled `sw` is caught.
  Indonesian and Malay are one macrolanguage in practice and py3langid splits formal Indonesian
  (e.g. the UDHR) roughly evenly between `id` and `ms`: for `id` the two codes count as one
  (`LANGID_GROUPS`), their probabilities summed. min_lang_confidence 0.5: a document whose own
  language holds less than half of the probability is mixed or code-switched text.
  `check_lang: false` turns off wrong_lang only; min_lang_confidence 0 turns off
  low_lang_confidence (with both off, py3langid is not run).
- Exact duplicates on normalised text (NFKC, casefold, punctuation removed, whitespace
  collapsed): the same page crawled twice differs in spacing, case or quotes.
- Near duplicates: MinHash (128 permutations) over shingles of 5 *characters* of the
  normalised text, not words: Thai writes no spaces between words, and word shingles would make
  a whole Thai paragraph one or two "words". Five characters is about one word in the Latin
  scripts and a syllable or two in the Brahmic ones. Threshold 0.8 on the Jaccard index catches
  mirrors, reposts with a changed header or footer, and reordered paragraphs, but not two
  articles on one topic (those share well under half of their shingles). LSH candidates are
  confirmed by their estimated Jaccard, so the banding's false positives are not dropped.
  0 turns the check off.

`InstructionFilter.check(instruction, document)` tests a generated English instruction for a
document (`INSTRUCTION_REASONS`): too_short, too_long, template_residue (the prompt template
leaked into the output), not_english (py3langid's best language not `en`, or below
min_english_confidence), copies_document (the instruction copies the text it should ask for:
share of its 5-character shingles found in the document above max_copy_share).
"""

from __future__ import annotations

import functools
import hashlib
import unicodedata
import zlib
from collections import Counter, defaultdict
from typing import Iterable, Optional, Sequence

import numpy as np

from xinst_jax.config import CorpusFilterConfig, InstructionFilterConfig

REASONS = (
    "too_short",
    "too_long",
    "short_lines",
    "boilerplate_chars",
    "repeated_lines",
    "wrong_lang",
    "low_lang_confidence",
    "exact_duplicate",
    "near_duplicate",
)

INSTRUCTION_REASONS = (
    "too_short",
    "too_long",
    "template_residue",
    "not_english",
    "copies_document",
)

# Record language -> the py3langid labels that count as that language (probabilities summed).
# Indonesian and Malay: py3langid splits formal Indonesian between the two (see module docstring).
LANGID_GROUPS: dict[str, tuple[str, ...]] = {"id": ("id", "ms")}

INSTRUCTION_SHINGLE_CHARS = 5
_MINHASH_SEED = 1


# --------------------------------------------------------------------------- language id


@functools.lru_cache(maxsize=1)
def _identifier():
    """The full py3langid model with normalised probabilities, loaded once per process (~0.5 s)."""
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def langid_labels() -> list[str]:
    """The language codes py3langid knows."""
    return list(_identifier().labels)


def language_of(text: str) -> tuple[str, float]:
    """py3langid's best language for `text` and its normalised probability."""
    code, prob = _identifier().classify(text)
    return str(code), float(prob)


def language_scores(text: str) -> dict[str, float]:
    """Normalised py3langid probability of every language, best first (one pass over the text)."""
    return {str(code): float(p) for code, p in _identifier().rank(text)}


def langid_group(lang: str) -> tuple[str, ...]:
    """The py3langid labels that count as record language `lang`."""
    return LANGID_GROUPS.get(lang, (lang,))


# --------------------------------------------------------------------------- text helpers


def normalize_text(text: str) -> str:
    """NFKC, casefold, punctuation (Unicode P*) removed, whitespace collapsed to one space.
    Marks (Thai, Brahmic vowel signs) and symbols stay."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = "".join(" " if ch.isspace() else ch for ch in text
                   if not unicodedata.category(ch).startswith("P"))
    return " ".join(text.split())


def char_shingles(normalized: str, k: int) -> set[str]:
    """Overlapping substrings of `k` characters; a text shorter than k is its own shingle."""
    if not normalized:
        return set()
    if len(normalized) <= k:
        return {normalized}
    return {normalized[i:i + k] for i in range(len(normalized) - k + 1)}


def _is_letter(ch: str) -> bool:
    cat = unicodedata.category(ch)
    return cat[0] in "LM"


def non_letter_share(text: str) -> float:
    """Share of the non-space characters that are not letters (L*) or marks (M*)."""
    total = bad = 0
    for ch in text:
        if ch.isspace():
            continue
        total += 1
        if not _is_letter(ch):
            bad += 1
    return bad / total if total else 0.0


def short_line_share(text: str, min_line_chars: int) -> float:
    """Share of the characters (in stripped, non-empty lines) that sit in lines shorter than
    `min_line_chars`."""
    total = short = 0
    for line in text.splitlines():
        n = len(line.strip())
        total += n
        if 0 < n < min_line_chars:
            short += n
    return short / total if total else 0.0


def repeated_line_share(text: str) -> float:
    """Share of the non-empty (stripped) lines that repeat an earlier line of the text."""
    seen: set[str] = set()
    lines = repeats = 0
    for line in text.splitlines():
        line = " ".join(line.split())
        if not line:
            continue
        lines += 1
        if line in seen:
            repeats += 1
        else:
            seen.add(line)
    return repeats / lines if lines else 0.0


def _crc32(b: bytes) -> int:
    # datasketch's default is SHA-1 per shingle; CRC-32 is ~5x faster, and datasketch's affine32
    # scheme mixes every input hash (murmur3 fmix) before permuting, so its linearity is harmless.
    return zlib.crc32(b)


# --------------------------------------------------------------------------- corpus filter


class CorpusFilter:
    """Stateful document filter: `check(record)` -> None (kept) or the reason (one of REASONS).

    Order-dependent: duplicates are judged against the documents kept before them, in any
    language; the first one seen wins. `counts[lang]` tallies `in`, `kept` and each reason.
    """

    def __init__(self, cfg: CorpusFilterConfig, languages: Sequence[str]):
        self.cfg = cfg
        self.languages = tuple(languages)
        self._use_langid = bool(cfg.check_lang or cfg.min_lang_confidence > 0)
        if self._use_langid:
            known = set(langid_labels())
            unknown = [lang for lang in self.languages if not set(langid_group(lang)) & known]
            if unknown:
                raise ValueError(f"py3langid does not know language(s) {unknown}; turn off "
                                 "check_lang and set min_lang_confidence: 0 to filter them")
        if cfg.shingle_chars < 1:
            raise ValueError(f"shingle_chars must be >= 1, got {cfg.shingle_chars}")
        self._exact: set[bytes] = set()
        self._lsh = None
        self._signatures: list[np.ndarray] = []
        self._permutations = None
        if cfg.near_duplicate_threshold > 0:
            from datasketch import MinHash, MinHashLSH

            self._lsh = MinHashLSH(threshold=cfg.near_duplicate_threshold, num_perm=cfg.minhash_permutations)
            self._permutations = MinHash(num_perm=cfg.minhash_permutations, seed=_MINHASH_SEED,
                                         hashfunc=_crc32).permutations  # shared by every MinHash
        self.counts: dict[str, Counter] = defaultdict(Counter)

    # ---- the checks

    def check(self, record: dict) -> Optional[str]:
        lang = record.get("lang", "")
        reason = self._check(record.get("text") or "", lang)
        counts = self.counts[lang]
        counts["in"] += 1
        counts[reason or "kept"] += 1
        return reason

    def _check(self, text: str, lang: str) -> Optional[str]:
        cfg = self.cfg
        stripped = text.strip()
        n = len(stripped)
        if n < cfg.min_chars:
            return "too_short"
        if n > cfg.max_chars:
            return "too_long"
        if short_line_share(stripped, cfg.min_line_chars) > cfg.max_short_line_share:
            return "short_lines"
        if non_letter_share(stripped) > cfg.max_non_letter_share:
            return "boilerplate_chars"
        if repeated_line_share(stripped) > cfg.max_repeated_line_share:
            return "repeated_lines"
        if self.languages and lang not in self.languages:
            return "wrong_lang"  # labelled with a language this run does not curate
        if self._use_langid:
            scores = language_scores(stripped)
            group = langid_group(lang)
            if cfg.check_lang and next(iter(scores)) not in group:
                return "wrong_lang"
            if sum(scores.get(code, 0.0) for code in group) < cfg.min_lang_confidence:
                return "low_lang_confidence"
        normalized = normalize_text(stripped)
        digest = hashlib.blake2b(normalized.encode("utf-8"), digest_size=16).digest()
        if digest in self._exact:
            return "exact_duplicate"
        minhash = None
        if self._lsh is not None:
            minhash = self._minhash(normalized)
            if self._is_near_duplicate(minhash):
                return "near_duplicate"
        self._remember(digest, minhash)
        return None

    # ---- duplicate state

    def _minhash(self, normalized: str):
        from datasketch import MinHash

        m = MinHash(num_perm=self.cfg.minhash_permutations, seed=_MINHASH_SEED, hashfunc=_crc32,
                    permutations=self._permutations, scheme="affine32")
        m.update_batch(s.encode("utf-8") for s in char_shingles(normalized, self.cfg.shingle_chars))
        return m

    def _is_near_duplicate(self, minhash) -> bool:
        threshold = self.cfg.near_duplicate_threshold
        for key in self._lsh.query(minhash):
            # confirm LSH's candidate by its estimated Jaccard (banding lets lower ones through)
            if float(np.mean(self._signatures[key] == minhash.hashvalues)) >= threshold:
                return True
        return False

    def _remember(self, digest: bytes, minhash) -> None:
        self._exact.add(digest)
        if minhash is not None:
            key = len(self._signatures)
            self._signatures.append(minhash.hashvalues.copy())
            self._lsh.insert(key, minhash)

    def filter(self, records: Iterable[dict]):
        """Yield the kept records (convenience over `check`)."""
        for record in records:
            if self.check(record) is None:
                yield record


# --------------------------------------------------------------------------- instruction filter


class InstructionFilter:
    """Stateless filter on a generated English instruction for `document`:
    `check(instruction, document)` -> None (kept) or the reason (one of INSTRUCTION_REASONS)."""

    def __init__(self, cfg: InstructionFilterConfig):
        self.cfg = cfg
        self.counts: Counter = Counter()

    def check(self, instruction: str, document: str) -> Optional[str]:
        reason = self._check(instruction or "", document or "")
        self.counts["in"] += 1
        self.counts[reason or "kept"] += 1
        return reason

    def _check(self, instruction: str, document: str) -> Optional[str]:
        cfg = self.cfg
        text = instruction.strip()
        if len(text) < cfg.min_chars:
            return "too_short"
        if len(text) > cfg.max_chars:
            return "too_long"
        if any(marker and marker in text for marker in cfg.residue):
            return "template_residue"
        if cfg.check_english:
            code, prob = language_of(text)
            if code != "en" or prob < cfg.min_english_confidence:
                return "not_english"
        if copy_share(text, document) > cfg.max_copy_share:
            return "copies_document"
        return None


def copy_share(instruction: str, document: str, k: int = INSTRUCTION_SHINGLE_CHARS) -> float:
    """Share of the instruction's k-character shingles (normalised text) found in the document."""
    ins = char_shingles(normalize_text(instruction), k)
    if not ins:
        return 0.0
    doc = char_shingles(normalize_text(document), k)
    return len(ins & doc) / len(ins)
