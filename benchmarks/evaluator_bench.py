"""The evaluator against a length-only baseline and chance, per language, on held-out pairs with
planted bad ones -- the project's own ratings job, tokenizer, trainer and scorer end to end.

1. Seed pairs per language from ../shared/data (README there):
     FLORES-200   an English sentence wrapped as an instruction ("Say in one sentence: ...")
                  -> its human translation (all ten languages; train split = FLORES train,
                  held out = FLORES dev)
     UDHR         "What does Article N of the UDHR say? It begins: ..." (English opening words)
                  -> the article in the target language (all ten; articles held out by a hash)
     XQuAD        the English question -> the target-language paragraph (hi, th, tr, vi; the
                  first question of each paragraph; paragraphs held out by a hash)
   Held-out items share no FLORES sentence, UDHR article or XQuAD paragraph with training, in
   any language. Responses longer than --max-chars are left out (they would not fit a row).
2. Training: the `ratings` job (xinst_jax/curate/ratings.py) on the training pairs, a SentencePiece
   tokenizer from the `train_tokenizer` job (on the pairs plus the evaluator prompt's scaffold),
   then the `finetune` job of configs/evaluator_xinst.yaml -- all through launch/tpu_run.py --
   with a small Llama (2 layers x 128) trained from scratch on this CPU. --pretrain-steps first
   trains it as a language model on the training text (template raw) and starts the evaluator
   from that export; on this budget it did not help (200 LM + 400 evaluator steps: accuracy 0.44,
   AUC 0.57 against 0.48 / 0.64 for 600 evaluator steps), so the default spends every step on
   the evaluator.
3. Held-out test set: every held-out pair four times -- true (expected best), its instruction
   swapped for a non-near held-out pair's of the same language (mismatched: worst), its response
   swapped for a held-out response in another language (wrong language: worst), its response
   truncated as the ratings job truncates (flawed; when the text has a boundary in the window).
4. Three raters, precision and recall of `best` and of `worst`, per language and overall:
     evaluator  `load_evaluator` on the trained checkpoint: argmax of the label probabilities
     length     a depth-2 decision tree on (log response characters, log response/instruction
                characters) fitted per language on the training ratings (length only)
     chance     labels drawn from the training label prior, independent of the item: expected
                precision = the label's share of the test set, recall = its prior
   plus accuracy and AUC of P(best) for best vs the rest, and what the evaluator said per
   planted kind.

    python benchmarks/evaluator_bench.py [--steps 600] [--json results.json] [--work DIR]

About 10 minutes on 2 quiet cores (600 steps at ~0.8 s); other processes on the cores stretch it.

Prints the table and the machine, writes JSON (--json; default <work>/evaluator_bench.json).

Measured (defaults, AMD EPYC 2 cores shared with other jobs, load 3-8: 25.6 min, 2.4 s/step),
all ten languages together, 1,591 held-out items (400 true, 400 mismatched, 400 wrong language,
391 truncated):

    rater        best P  best R  worst P  worst R  accuracy
    evaluator     0.31    0.55    0.56     0.36     0.476   (AUC of P(best), best vs rest: 0.636)
    length-only   0.50    0.79    0.76     0.35     0.574
    chance        0.25    0.33    0.50     0.33     0.333

The tiny from-scratch evaluator learned truncation (252 of 391 truncated items flawed, against
35 of 400 true ones) but neither mismatch: it calls mismatched and wrong-language items best as
often as true ones (208, 209, 218 of 400). It beats chance on best and worst precision and loses
to the length-only tree, which sees truncation just as well. Telling a response in the wrong
language or on another topic needs a model that knows the languages: a pretrained base.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

SHARED = REPO.parent / "shared" / "data"
LANGS = ["bn", "fi", "hi", "id", "sw", "ta", "th", "tr", "ur", "vi"]
FLORES_DIRS = {"bn": "ben_Beng", "fi": "fin_Latn", "hi": "hin_Deva", "id": "ind_Latn", "sw": "swh_Latn",
               "ta": "tam_Taml", "th": "tha_Thai", "tr": "tur_Latn", "ur": "urd_Arab", "vi": "vie_Latn"}
XQUAD_LANGS = ["hi", "th", "tr", "vi"]
FLORES_WRAPS = ("Say in one sentence: {}", "Write one sentence that says: {}", "Express this in one sentence: {}")
LABELS = ("best", "flawed", "worst")
PLANTED = {"true": "best", "mismatched": "worst", "wrong_language": "worst", "truncated": "flawed"}


def held_out_by_hash(key: str, share: int) -> bool:
    return zlib.crc32(key.encode("utf-8")) % share == 0


# --------------------------------------------------------------------------- seed pairs


def read_tsv(path: Path) -> dict[str, str]:
    rows = {}
    with open(path, encoding="utf-8") as f:
        next(f)
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) >= 3:
                rows[parts[0]] = parts[2]
    return rows


def flores_pairs(lang: str, split: str) -> list[dict]:
    en = read_tsv(SHARED / "flores_sib200" / "eng_Latn" / f"{split}.tsv")
    tgt = read_tsv(SHARED / "flores_sib200" / FLORES_DIRS[lang] / f"{split}.tsv")
    out = []
    for idx in sorted(set(en) & set(tgt), key=int):
        wrap = FLORES_WRAPS[zlib.crc32(idx.encode()) % len(FLORES_WRAPS)]
        out.append({"id": f"flores-{lang}-{idx}", "lang": lang, "instruction": wrap.format(en[idx]),
                    "output": tgt[idx]})
    return out


def udhr_pairs() -> dict[str, list[tuple[bool, dict]]]:
    rows = [json.loads(line) for line in open(SHARED / "udhr" / "udhr_articles.jsonl", encoding="utf-8")]
    english = {str(r["article"]): r for r in rows if r["lang"] == "en"}
    out: dict[str, list[tuple[bool, dict]]] = collections.defaultdict(list)
    for r in rows:
        art = str(r["article"])
        if r["lang"] not in LANGS or art not in english:
            continue
        en = english[art]
        name = "the Preamble" if art == "preamble" else en["heading"]
        opening = " ".join(en["text"].split()[:10])
        instruction = f'What does {name} of the Universal Declaration of Human Rights say? It begins: "{opening} ..."'
        pair = {"id": f"udhr-{r['lang']}-{art}", "lang": r["lang"], "instruction": instruction, "output": r["text"]}
        out[r["lang"]].append((held_out_by_hash(f"udhr-{art}", 4), pair))
    return out


def xquad_pairs() -> dict[str, list[tuple[bool, dict]]]:
    def paragraphs(lang):
        data = json.load(open(SHARED / "xquad" / f"xquad.{lang}.json", encoding="utf-8"))
        return [p for a in data["data"] for p in a["paragraphs"]]

    en = paragraphs("en")
    out: dict[str, list[tuple[bool, dict]]] = collections.defaultdict(list)
    for lang in XQUAD_LANGS:
        for k, (pe, pt) in enumerate(zip(en, paragraphs(lang))):
            question = pe["qas"][0]["question"].strip()
            context = pt["context"].replace("\ufeff", "").strip()
            pair = {"id": f"xquad-{lang}-{k}", "lang": lang, "instruction": question, "output": context}
            out[lang].append((held_out_by_hash(f"xquad-{k}", 5), pair))
    return out


def seed_pairs(train_flores: int, max_chars: int) -> tuple[list[dict], list[dict]]:
    """(training pairs, held-out pairs), every language; responses over max_chars left out."""
    udhr, xquad = udhr_pairs(), xquad_pairs()
    train, held = [], []
    for lang in LANGS:
        train += flores_pairs(lang, "train")[:train_flores]
        held += flores_pairs(lang, "dev")
        for is_held, pair in udhr[lang] + xquad.get(lang, []):
            (held if is_held else train).append(pair)
    keep = lambda ps: [p for p in ps if len(p["output"]) <= max_chars]  # noqa: E731
    return keep(train), keep(held)


# --------------------------------------------------------------------------- planted test set


def planted_items(held: list[dict], per_lang: int, seed: int) -> list[dict]:
    from xinst_jax.curate.ratings import NEAR_SHARE, normalize_instruction, similarity_matrix, truncate_output

    rng = np.random.default_rng(seed)
    by_lang: dict[str, list[dict]] = collections.defaultdict(list)
    for p in held:
        by_lang[p["lang"]].append(p)
    chosen = {}
    for lang, ps in by_lang.items():
        idx = rng.permutation(len(ps))[:per_lang] if per_lang else np.arange(len(ps))
        chosen[lang] = [ps[i] for i in sorted(idx)]
    items = []
    for lang in sorted(chosen):
        ps = chosen[lang]
        sims = similarity_matrix([p["instruction"] for p in ps])
        others = [c for c in sorted(chosen) if c != lang]
        for i, p in enumerate(ps):
            base = {"lang": lang, "source_id": p["id"]}
            items.append(dict(base, kind="true", instruction=p["instruction"], output=p["output"]))
            own = normalize_instruction(p["instruction"])
            cand = [j for j in range(len(ps)) if j != i and normalize_instruction(ps[j]["instruction"]) != own]
            order = sorted(cand, key=lambda j: (-sims[i, j], j))
            far = order[max(1, math.ceil(NEAR_SHARE * len(order))):] or order
            j = far[int(rng.integers(len(far)))]
            items.append(dict(base, kind="mismatched", instruction=ps[j]["instruction"], output=p["output"]))
            pool = chosen[others[int(rng.integers(len(others)))]]
            items.append(dict(base, kind="wrong_language", instruction=p["instruction"],
                              output=pool[int(rng.integers(len(pool)))]["output"]))
            cut = truncate_output(p["output"], rng)
            if cut is not None:
                items.append(dict(base, kind="truncated", instruction=p["instruction"], output=cut))
    for k, it in enumerate(items):
        it["id"] = f"item-{k}"
        it["expected"] = PLANTED[it["kind"]]
    return items


# --------------------------------------------------------------------------- length-only baseline


def length_features(records: list[dict]) -> np.ndarray:
    out = np.array([len(r["output"]) for r in records], np.float64)
    ins = np.array([len(r["instruction"]) for r in records], np.float64)
    return np.stack([np.log(out), np.log(out / ins)], axis=1)


class LengthTree:
    """Depth-2 decision tree on the length features, thresholds at training quantiles, chosen
    exhaustively for training accuracy."""

    QUANTILES = np.linspace(0.05, 0.95, 19)

    def fit(self, x: np.ndarray, y: np.ndarray) -> "LengthTree":
        self.thresholds = [np.unique(np.quantile(x[:, f], self.QUANTILES)) for f in range(x.shape[1])]
        self.tree = self._best(x, y, depth=2)[1]
        return self

    def _leaf(self, y: np.ndarray):
        counts = np.bincount(y, minlength=len(LABELS))
        return int(counts.max()), ("leaf", int(np.argmax(counts)))

    def _best(self, x, y, depth):
        best = self._leaf(y)
        if depth == 0 or len(y) < 2:
            return best
        for f, ts in enumerate(self.thresholds):
            for t in ts:
                left = x[:, f] <= t
                if left.all() or not left.any():
                    continue
                lc, lt = self._best(x[left], y[left], depth - 1)
                rc, rt = self._best(x[~left], y[~left], depth - 1)
                if lc + rc > best[0]:
                    best = (lc + rc, ("split", f, float(t), lt, rt))
        return best

    def predict(self, x: np.ndarray) -> np.ndarray:
        def one(row, node):
            while node[0] == "split":
                node = node[3] if row[node[1]] <= node[2] else node[4]
            return node[1]

        return np.array([one(row, self.tree) for row in x], np.int64)


# --------------------------------------------------------------------------- metrics


def pr(pred: list[str], gold: list[str], label: str) -> tuple[float, float]:
    pred, gold = np.asarray(pred), np.asarray(gold)
    tp = float(((pred == label) & (gold == label)).sum())
    npred, ngold = float((pred == label).sum()), float((gold == label).sum())
    return (tp / npred if npred else float("nan")), (tp / ngold if ngold else float("nan"))


def auc(scores: np.ndarray, positive: np.ndarray) -> float:
    pos, neg = scores[positive], scores[~positive]
    if not len(pos) or not len(neg):
        return float("nan")
    ranks = np.argsort(np.argsort(np.concatenate([pos, neg]), kind="stable"), kind="stable").astype(np.float64)
    # average ranks of ties
    allv = np.concatenate([pos, neg])
    for v in np.unique(allv):
        m = allv == v
        if m.sum() > 1:
            ranks[m] = ranks[m].mean()
    return float((ranks[:len(pos)].sum() - len(pos) * (len(pos) - 1) / 2) / (len(pos) * len(neg)))


def metrics(items: list[dict], pred: list[str], prior: dict[str, float] | None = None) -> dict:
    gold = [it["expected"] for it in items]
    out = {"n": len(items)}
    if prior is not None:  # chance: expected values of a prior-drawn guess
        share = {lb: float(np.mean([g == lb for g in gold])) for lb in LABELS}
        for lb in ("best", "worst"):
            out[f"{lb}_precision"], out[f"{lb}_recall"] = share[lb], prior[lb]
        out["accuracy"] = float(sum(share[lb] * prior[lb] for lb in LABELS))
        return out
    for lb in ("best", "worst"):
        out[f"{lb}_precision"], out[f"{lb}_recall"] = pr(pred, gold, lb)
    out["accuracy"] = float(np.mean([p == g for p, g in zip(pred, gold)]))
    return out


# --------------------------------------------------------------------------- the run


def tpu_run(*sets: str, log: Path) -> float:
    cmd = [sys.executable, str(REPO / "launch" / "tpu_run.py"), "--config", "evaluator_xinst"]
    for s in sets:
        cmd += ["--set", s]
    env = {k: v for k, v in os.environ.items() if not k.startswith("XINST_")}
    env.update(JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")
    t = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{log.read_text()[-3000:]}")
    return time.perf_counter() - t


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="", help="working directory (default: a temporary one)")
    p.add_argument("--json", default="", help="results JSON (default <work>/evaluator_bench.json)")
    p.add_argument("--train-flores", type=int, default=300, help="FLORES training sentences per language")
    p.add_argument("--eval-per-lang", type=int, default=40, help="held-out pairs per language (0: all)")
    p.add_argument("--max-chars", type=int, default=900, help="longest response kept")
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--pretrain-steps", type=int, default=0,
                   help="raw LM steps on the training text first; the evaluator starts from their export (0: none)")
    p.add_argument("--steps", type=int, default=600, help="evaluator finetune steps")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--lr", type=float, default=6e-3)
    p.add_argument("--embed", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if not SHARED.is_dir():
        sys.exit(f"{SHARED} not found: this benchmark reads FLORES, UDHR and XQuAD from ../shared/data")

    from machine import machine_summary

    start = time.perf_counter()
    load_start = os.getloadavg()[0]
    work = Path(args.work or tempfile.mkdtemp(prefix="evaluator_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    timings = {}

    train_pairs, held_pairs = seed_pairs(args.train_flores, args.max_chars)
    items = planted_items(held_pairs, args.eval_per_lang, args.seed)
    write_jsonl(work / "train_pairs.jsonl", train_pairs)
    print(f"seed pairs: {len(train_pairs)} training, {len(held_pairs)} held out; test items: {len(items)} "
          f"({dict(collections.Counter(it['kind'] for it in items))})", flush=True)

    # 1. the ratings job
    out = work / "curate"
    timings["ratings_s"] = tpu_run("job=ratings", f"run_dir={work / 'runs' / 'ratings'}",
                                   f"curate.seed_pairs=[{{path: {work / 'train_pairs.jsonl'}}}]",
                                   f"curate.out={out}", f"seed={args.seed}", log=work / "ratings.log")
    ratings_path = out / "ratings" / "ratings.jsonl"
    ratings = [json.loads(line) for line in ratings_path.read_text(encoding="utf-8").splitlines()]
    manifest = json.loads((out / "ratings" / "manifest.json").read_text())
    print(f"ratings: {len(ratings)} ({manifest['schemes']['all']}) in {timings['ratings_s']:.0f}s", flush=True)

    # 2. tokenizer: the pairs' text plus the evaluator prompt's scaffold (so its words are pieces)
    from xinst_jax.data.templates import EVALUATOR_PROMPT, language_name

    scaffold = [{"id": f"scaffold-{lang}-{k}", "lang": "en",
                 "text": EVALUATOR_PROMPT.format(instruction="", output="", output_lang=language_name(lang)) + lb}
                for lang in LANGS for k, lb in enumerate(LABELS * 10)]
    write_jsonl(work / "scaffold.jsonl", scaffold)
    tok_dir = work / "tokenizer"
    timings["tokenizer_s"] = tpu_run("job=train_tokenizer", f"run_dir={work / 'runs' / 'tokenizer'}",
                                     f"data.tokenizer={tok_dir}", f"data.tokenizer_vocab_size={args.vocab}",
                                     f"data.inputs=[{{path: {work / 'train_pairs.jsonl'}}}, "
                                     f"{{path: {work / 'scaffold.jsonl'}}}]", log=work / "tokenizer.log")
    from xinst_jax.data.tokenizer import load_tokenizer

    tok = load_tokenizer(str(tok_dir))
    print(f"tokenizer: {tok.vocab_size} pieces in {timings['tokenizer_s']:.0f}s", flush=True)

    # 3. the evaluator: a small Llama from scratch, first a language model on the training pairs'
    #    text (the `raw` template: every token trained; what a pretrained base brings), then the
    #    finetune job of evaluator_xinst on the ratings from it (train.init_from: its HF export)
    heads = max(2, args.embed // 32)
    model_sets = ["model.preset=tiny", f"model.vocab_size={tok.vocab_size}", f"model.bos_token_id={tok.bos_id}",
                  f"model.eos_token_id={tok.eos_id}", f"model.embed_dim={args.embed}",
                  f"model.num_layers={args.layers}",
                  f"model.num_heads={heads}", f"model.num_kv_heads={heads}", "model.head_dim=32",
                  f"model.mlp_dim={args.embed * 3}", f"model.max_seq_len={args.seq_len}", "model.dtype=float32",
                  "model.remat=none", "model.scan_layers=false", "mesh.num_devices=1"]
    common = [f"seed={args.seed}", f"data.tokenizer={tok_dir}", "data.num_shards=2", "data.shuffle_buffer=4000",
              "data.mix_log_every=0", f"train.batch_size={args.batch}", f"train.seq_len={args.seq_len}",
              f"train.learning_rate={args.lr}", "train.warmup_steps=20", "train.min_lr_ratio=0.1", "train.log_every=50",
              "checkpoint.async_save=false"]
    init_from: list[str] = []
    if args.pretrain_steps:
        docs = [{"id": f"{p_['id']}/{f_}", "lang": "en" if f_ == "instruction" else p_["lang"], "text": p_[f_]}
                for p_ in train_pairs for f_ in ("instruction", "output")]
        write_jsonl(work / "pretrain_docs.jsonl", docs)
        pre_dir = work / "runs" / "pretrain"
        timings["pretrain_s"] = tpu_run(*model_sets, *common, "job=finetune", "data.template=raw",
                                        f"run_dir={pre_dir}", f"data.inputs=[{{path: {work / 'pretrain_docs.jsonl'}}}]",
                                        f"data.prepared_dir={work / 'prepared_lm'}",
                                        f"train.steps={args.pretrain_steps}",
                                        "train.export_at_end=true", "export.dtype=float32",
                                        f"checkpoint.every={args.pretrain_steps}", log=work / "pretrain.log")
        lm = [json.loads(line)["loss"] for line in (pre_dir / "metrics.jsonl").read_text().splitlines()]
        print(f"pretrain (raw LM on the training pairs' text): {args.pretrain_steps} steps in "
              f"{timings['pretrain_s']:.0f}s; loss {np.mean(lm[:10]):.3f} -> {np.mean(lm[-20:]):.3f}", flush=True)
        init_from = [f"train.init_from={pre_dir / 'hf'}"]
    run_dir = work / "runs" / "evaluator"
    train_sets = [*common, f"run_dir={run_dir}", f"data.inputs=[{{path: {ratings_path}}}]",
                  f"data.prepared_dir={work / 'prepared'}", f"train.steps={args.steps}", "train.export_at_end=false",
                  f"checkpoint.every={args.steps}", *init_from]
    timings["finetune_s"] = tpu_run(*model_sets, *train_sets, log=work / "finetune.log")
    losses = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    first, last = np.mean([m["loss"] for m in losses[:10]]), np.mean([m["loss"] for m in losses[-20:]])
    print(f"finetune: {args.steps} steps in {timings['finetune_s']:.0f}s; loss {first:.3f} (first 10) -> "
          f"{last:.3f} (last 20; uninformed: ln 3 / 2 = 0.549 per label + EOS token)", flush=True)

    # 4. rate the held-out items
    from xinst_jax.config import load_config
    from xinst_jax.curate.evaluator import load_evaluator

    cfg = load_config("evaluator_xinst", model_sets + [
        f"run_dir={run_dir}", f"train.seq_len={args.seq_len}", f"curate.evaluator_checkpoint={run_dir / 'checkpoints'}",
        f"generate.tokenizer={tok_dir}", "generate.batch_size=16",
        f"generate.prompt_buckets=[128, 256, {args.seq_len}]"])
    t = time.perf_counter()
    evaluator = load_evaluator(cfg)
    rated = evaluator.rate(items)
    timings["rate_s"] = time.perf_counter() - t
    n_trunc = sum(r.truncated for r in rated)
    print(f"rated {len(items)} items in {timings['rate_s']:.0f}s ({n_trunc} prompts truncated)", flush=True)

    # 5. baselines and metrics
    train_by_lang: dict[str, list[dict]] = collections.defaultdict(list)
    for r in ratings:
        train_by_lang[r["lang"]].append(r)
    prior = {lb: float(np.mean([r["label"] == lb for r in ratings])) for lb in LABELS}
    length_pred: dict[str, str] = {}
    for lang, rs in train_by_lang.items():
        tree = LengthTree().fit(length_features(rs), np.array([LABELS.index(r["label"]) for r in rs]))
        test = [it for it in items if it["lang"] == lang]
        for it, y in zip(test, tree.predict(length_features(test))):
            length_pred[it["id"]] = LABELS[y]

    results = {"languages": {}, "by_kind": {}}
    eval_pred = {it["id"]: r.label for it, r in zip(items, rated)}
    score = {it["id"]: r.score for it, r in zip(items, rated)}
    for lang in LANGS + ["all"]:
        sub = [it for it in items if lang == "all" or it["lang"] == lang]
        if not sub:
            continue
        row = {"evaluator": metrics(sub, [eval_pred[it["id"]] for it in sub]),
               "length": metrics(sub, [length_pred[it["id"]] for it in sub]),
               "chance": metrics(sub, [], prior=prior)}
        row["evaluator"]["best_auc"] = auc(np.array([score[it["id"]] for it in sub]),
                                           np.array([it["expected"] == "best" for it in sub]))
        results["languages"][lang] = row
    for kind in PLANTED:
        sub = [it for it in items if it["kind"] == kind]
        results["by_kind"][kind] = {"expected": PLANTED[kind], "n": len(sub),
                                    "evaluator": dict(collections.Counter(eval_pred[it["id"]] for it in sub)),
                                    "length": dict(collections.Counter(length_pred[it["id"]] for it in sub))}

    # 6. report
    def f(x):
        return "  -  " if x != x else f"{x:5.2f}"

    load_end = os.getloadavg()[0]
    print(f"\nmachine: {machine_summary()}; load average {load_start:.1f} at the start, {load_end:.1f} at the end "
          "(other processes share these cores)")
    print(f"model: {args.layers} layers x {args.embed} from scratch, {tok.vocab_size}-piece SentencePiece; "
          f"{args.pretrain_steps} LM + {args.steps} evaluator steps x {args.batch} rows x {args.seq_len} tokens; "
          f"{len(ratings)} training ratings")
    print("\nprecision / recall of best and worst on held-out items (P = precision, R = recall)")
    head = f"{'lang':5s} {'n':>5s} | " + " | ".join(f"{name:^27s}" for name in ("evaluator", "length-only", "chance"))
    sub = f"{'':5s} {'':>5s} | " + " | ".join("bestP bestR worstP worstR" + "  " for _ in range(3))
    print(head)
    print(sub)
    for lang, row in results["languages"].items():
        cells = []
        for name in ("evaluator", "length", "chance"):
            m = row[name]
            cells.append(f"{f(m['best_precision'])} {f(m['best_recall'])} {f(m['worst_precision'])} "
                         f"{f(m['worst_recall'])}  ")
        print(f"{lang:5s} {row['evaluator']['n']:5d} | " + " | ".join(cells))
    a = results["languages"]["all"]
    print(f"\naccuracy (3 labels): evaluator {a['evaluator']['accuracy']:.3f}, "
          f"length-only {a['length']['accuracy']:.3f}, chance {a['chance']['accuracy']:.3f}; "
          f"evaluator AUC of P(best), best vs rest: {a['evaluator']['best_auc']:.3f}")
    print("\nwhat each rater said per planted kind (counts)")
    for kind, row in results["by_kind"].items():
        print(f"  {kind:15s} expected {row['expected']:6s} n={row['n']:4d}  evaluator {row['evaluator']}  "
              f"length {row['length']}")
    timings["total_s"] = time.perf_counter() - start
    print("\ntimings: " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))

    report = {"machine": machine_summary(), "load_average": [load_start, load_end], "args": vars(args),
              "timings": timings, "prior": prior,
              "train_pairs": len(train_pairs), "held_out_pairs": len(held_pairs), "items": len(items),
              "ratings_schemes": manifest["schemes"], "loss_first10": float(first), "loss_last20": float(last),
              "truncated_prompts": n_trunc, **results}
    path = Path(args.json or work / "evaluator_bench.json")
    path.write_text(json.dumps(report, indent=2, ensure_ascii=False))
    print(f"results: {path}")


if __name__ == "__main__":
    main()
