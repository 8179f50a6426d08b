"""Job `pipeline_demo`: the whole X-Instruction pipeline on CPU on real text in ten languages, with
ground truth, and five figures each against a baseline computed in the same run.

    python launch/tpu_run.py --config pipeline_demo          # or: make pipeline-demo

1. Data (xinst_jax/data/demo_corpus.py, Unicode CLDR from the `babel` package, no download):
   seed pairs, a corpus of documents with known topics and planted bad documents (exact and near
   duplicates, wrong-language, over-short), held-out pairs no stage sees, and the held-out pairs as
   the evaluator should rate them. Written once into <run_dir>/data (deterministic in `seed`).
2. The `pipeline` job (xinst_jax/curate/pipeline.py) on them: tokenizer -> revgen -> candidates
   -> ratings -> evaluator -> refine -> diversify -> sft, each stage resumable. Three stages get
   their inputs set through `pipeline.stages.<stage>.set` (demo_pipeline_config): the tokenizer
   also reads the prompt templates' English, the evaluator also the true pairs once more (a
   lenient judge: write_best_pairs says why), the final model every diversified language file.
3. Figures, each with its baseline (`results.json`, `report.md`, and a table on stdout):

   filters     precision / recall of the candidates stage's corpus filters per planted kind
               (exact_duplicate, near_duplicate, wrong_lang, too_short) and of keeping the clean
               documents; baseline: a naive filter (length window + raw-text dedupe)
   generator   chrF (character n-grams 1..6, beta 2, sacreBLEU's corpus-level definition) of the
               instructions the trained reverse generator writes for the held-out documents
               against their reference instructions; baseline: the same architecture untrained
               (random init), same prompts and sampling
   evaluator   precision / recall for `best` and `worst` (and 3-label accuracy) on held-out pairs
               with planted flaws (true -> best, truncated output -> flawed, mismatched
               instruction or output in another language -> worst); baseline: an output-length-
               only rater whose two thresholds and three labels are fitted for accuracy on the
               evaluator's rating set
   diversity   topic coverage (topics drawn / topics in the language's refined pool) and topic
               entropy (bits) of the diversify stage's draw, averaged over languages; baseline:
               a uniform random draw of the same size from the same refined pairs (fixed seed).
               The corpus's topic mix is uneven on purpose (demo_corpus.CORPUS_TOPIC_WEIGHTS)
   final model held-out loss (mean negative log-likelihood per answer token, sft prompt) on the
               held-out pairs' target-language answers; baseline: the base model (random init of
               the same architecture and tokenizer: the pipeline trains from scratch)

The filter figures take the kept documents from the candidates stage's documents.jsonl and the
drop reasons from replaying its (deterministic) filter, checked against the stage's counts. The
held-out documents are screened against every other document (no duplicate or near duplicate of
a seed or corpus document), so no stage has seen them.

Stage timings and counts per language at every stage come from the stages' manifests and
done-markers. A rerun skips the finished stages (the pipeline's markers) and recomputes the figures.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import math
import random
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from xinst_jax.config import LANGUAGES, Config, ConfigError, DataInputConfig, PipelineStageConfig
from xinst_jax.curate.pipeline import Pipeline, inputs_value
from xinst_jax.jobs import register_job

log = logging.getLogger(__name__)

PLANTED = ("exact_duplicate", "near_duplicate", "wrong_lang", "too_short")
RESULTS_VERSION = 1


# --------------------------------------------------------------------------- chrF


def char_ngrams(text: str, n: int) -> collections.Counter:
    return collections.Counter(text[i:i + n] for i in range(len(text) - n + 1))


def chrf_statistics(hypothesis: str, reference: str, order: int = 6) -> list[int]:
    """[hyp n-grams, ref n-grams, matched] per order 1..order, whitespace removed (sacreBLEU)."""
    hyp, ref = "".join(hypothesis.split()), "".join(reference.split())
    stats = []
    for n in range(1, order + 1):
        h, r = char_ngrams(hyp, n), char_ngrams(ref, n)
        stats += [sum(h.values()), sum(r.values()), sum((h & r).values())]
    return stats


def chrf_from_statistics(stats: Sequence[int], order: int = 6, beta: float = 2.0) -> float:
    """sacreBLEU 2's chrF (default, no eps smoothing): precision and recall averaged over the
    orders with n-grams on both sides, then F-beta; 0..100."""
    precision = recall = 0.0
    effective = 0
    for i in range(order):
        n_hyp, n_ref, n_match = stats[3 * i:3 * i + 3]
        if n_hyp > 0 and n_ref > 0:
            precision += n_match / n_hyp
            recall += n_match / n_ref
            effective += 1
    if effective == 0:
        return 0.0
    precision, recall = precision / effective, recall / effective
    if precision + recall == 0:
        return 0.0
    b2 = beta ** 2
    return 100.0 * (1 + b2) * precision * recall / (b2 * precision + recall)


def corpus_chrf(hypotheses: Sequence[str], references: Sequence[str], order: int = 6, beta: float = 2.0) -> float:
    """Corpus-level chrF: statistics summed over the sentence pairs, then one score."""
    total = [0] * (3 * order)
    for h, r in zip(hypotheses, references, strict=True):
        for i, v in enumerate(chrf_statistics(h, r, order)):
            total[i] += v
    return chrf_from_statistics(total, order, beta)


# --------------------------------------------------------------------------- small metrics


def precision_recall(predicted: Iterable[bool], actual: Iterable[bool]) -> dict[str, Any]:
    """Precision and recall of a binary decision; 0.0 when nothing is predicted (or nothing is
    actual), with the counts beside them."""
    pred, act = np.asarray(list(predicted), bool), np.asarray(list(actual), bool)
    tp = int((pred & act).sum())
    return {"precision": tp / int(pred.sum()) if pred.any() else 0.0,
            "recall": tp / int(act.sum()) if act.any() else 0.0,
            "predicted": int(pred.sum()), "actual": int(act.sum()), "true_positives": tp}


def entropy_bits(counts: Iterable[int]) -> float:
    c = np.asarray([x for x in counts if x > 0], np.float64)
    if c.size == 0:
        return 0.0
    p = c / c.sum()
    return float(-(p * np.log2(p)).sum())


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


# --------------------------------------------------------------------------- the data


def demo_sizes(cfg: Config, sizes=None):
    from xinst_jax.data.demo_corpus import DemoSizes

    return sizes or DemoSizes()


def write_data(cfg: Config, data_dir: Path, filters, sizes) -> dict:
    """The demo data in `data_dir`, built unless a build with the same settings is there (it is
    deterministic: a rebuild gives the same bytes); a build with other settings is refused."""
    from xinst_jax.data.demo_corpus import build_demo_data

    wanted = json.loads(json.dumps({"seed": cfg.seed, "languages": list(cfg.data.languages),
                                    "sizes": dataclasses.asdict(sizes)}))
    manifest_path = data_dir / "manifest.json"
    if manifest_path.exists():
        have = json.loads(manifest_path.read_text(encoding="utf-8"))
        if {k: have.get(k) for k in wanted} == wanted and all(
                (data_dir / f).exists() for f in ("seed_pairs.jsonl", "corpus.jsonl", "truth.jsonl",
                                                  "heldout_pairs.jsonl", "heldout_rated.jsonl")):
            print(f"pipeline_demo: data in {data_dir} (built before)", flush=True)
            return have
        raise ConfigError(f"pipeline_demo: {data_dir} holds demo data built with other settings "
                          f"({ {k: have.get(k) for k in wanted} }); use another run_dir")
    start = time.perf_counter()
    manifest = build_demo_data(data_dir, cfg.data.languages, cfg.seed, sizes, filters)
    corpus = sum(sum(v.values()) for v in manifest["corpus"].values())
    seeds = sum(sum(v.values()) for v in manifest["seed_pairs"].values())
    print(f"pipeline_demo: data from Unicode CLDR in {len(cfg.data.languages)} languages -> {data_dir}: {seeds} seed "
          f"pairs, {corpus} corpus documents ({sum(v.get('clean', 0) for v in manifest['corpus'].values())} clean), "
          f"{sum(sum(v.values()) for v in manifest['heldout_pairs'].values())} held-out pairs "
          f"({time.perf_counter() - start:.1f} s)", flush=True)
    return manifest


def write_template_text(data_dir: Path, languages: Sequence[str]) -> Path:
    """The prompt templates' English (sft, revgen, evaluator, per language, with the evaluator's
    labels), once per seed pair of the language: the tokenizer stage reads it beside the seed
    pairs and the corpus, so that a tokenizer trained from scratch has pieces for the words every
    training row and prompt starts with (without it, the templates' English falls apart into
    characters: ~210 tokens for the evaluator's prompt instead of ~60)."""
    from xinst_jax.data.templates import EVALUATOR_LABELS, render_prompt

    seeds = collections.Counter(r["lang"] for r in read_jsonl(data_dir / "seed_pairs.jsonl"))
    path = data_dir / "templates.jsonl"
    lines = []
    for lang in languages:
        empty = {"instruction": "", "output": "", "text": "", "lang": lang}
        texts = [render_prompt(name, empty) for name in ("sft", "revgen", "evaluator")] + [" ".join(EVALUATOR_LABELS)]
        for k in range(seeds[lang]):
            for j, text in enumerate(texts):
                lines.append(json.dumps({"id": f"template-{lang}-{k}-{j}", "lang": "en", "text": text},
                                        ensure_ascii=False))
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def demo_pipeline_config(cfg: Config, data_dir: Path) -> Config:
    """`cfg` with the pipeline pointed at the demo's data, and three stages' inputs set through
    `pipeline.stages.<stage>.set` (applied after the pipeline's wiring):

      tokenizer  the seed pairs and the corpus, and the prompt templates' English (write_template_text)
      evaluator  its rating set, and the true pairs once more (write_best_pairs)
      sft        every language file diversify wrote (the wiring names one file per language, and a
                 language whose candidates refine all dropped has none)
    """
    root = Path(cfg.pipeline.dir or cfg.resolved_run_dir())
    seed = [DataInputConfig(path=str(data_dir / "seed_pairs.jsonl"))]
    corpus = [DataInputConfig(path=str(data_dir / "corpus.jsonl"))]
    inputs = {
        "tokenizer": {"data.inputs": inputs_value(seed + corpus) + [{"path": str(data_dir / "templates.jsonl"),
                                                                     "lang": "en"}],
                      "data.languages": list(cfg.data.languages) + ["en"]},
        "evaluator": {"data.inputs": [{"path": str(root / "ratings" / "ratings.jsonl")},
                                      {"path": str(data_dir / "seed_best.jsonl")}]},
        "sft": {"data.inputs": [{"path": str(root / "diversify" / "*.jsonl")}]},
    }
    stages = dict(cfg.pipeline.stages)
    for stage, values in inputs.items():
        spec = stages.get(stage, PipelineStageConfig())
        stages[stage] = dataclasses.replace(spec, set={**values, **spec.set})  # the config's own set wins
    pipeline = dataclasses.replace(cfg.pipeline, dir=str(root), seed_pairs=seed, corpus=corpus, stages=stages)
    return dataclasses.replace(cfg, pipeline=pipeline)


def write_best_pairs(data_dir: Path) -> Path:
    """The seed pairs labelled `best`, a second time beside the rating set (so the evaluator trains
    on best : flawed : worst = 2 : 1 : 1). The rating set holds each response under all three
    labels, so an evaluator that has not learnt to read the instruction against the response can
    only tell truncated responses apart, and for the others best and worst tie (each 3/8 of the
    full responses). A tiny evaluator trained for a few CPU minutes is that evaluator: the tie broke
    towards worst in some runs and refine dropped every candidate. Oversampling the true pairs
    breaks the tie towards best (a lenient judge that still drops what looks truncated); what it
    learnt of the instruction shows in the evaluator's figures against the length-only rater."""
    path = data_dir / "seed_best.jsonl"
    lines = [json.dumps({"id": f"{r['id']}/best-again", "lang": r["lang"], "instruction": r["instruction"],
                         "output": r["output"], "label": "best"}, ensure_ascii=False)
             for r in read_jsonl(data_dir / "seed_pairs.jsonl")]
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


class _DemoPipeline(Pipeline):
    """The pipeline, announcing each stage as [i/n] (a stage's own progress: the trainer's bar,
    candidates' and refine's shard lines)."""

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self._started = time.perf_counter()

    def stage_config(self, stage: str) -> Config:
        i = self.stages.index(stage) + 1
        print(f"\npipeline_demo: [{i}/{len(self.stages)}] {stage}  (+{time.perf_counter() - self._started:.0f} s)",
              flush=True)
        return super().stage_config(stage)


# --------------------------------------------------------------------------- figures


def filter_figures(cfg_candidates: Config, root: Path, data_dir: Path) -> dict:
    """The candidates stage's filter decisions against the planted truth. Kept documents come from
    the stage's documents.jsonl; drop reasons from replaying its (deterministic) filter over the
    corpus in the same order, checked against the stage's counts."""
    from xinst_jax.curate.candidates import read_corpus
    from xinst_jax.curate.filters import CorpusFilter

    truth = {t["id"]: t for t in read_jsonl(data_dir / "truth.jsonl")}
    kept_ids = {d["id"] for d in read_jsonl(root / "candidates" / "documents.jsonl")}
    manifest = json.loads((root / "candidates" / "manifest.json").read_text())
    _, records = read_corpus(cfg_candidates)
    replay = CorpusFilter(cfg_candidates.curate.filters, cfg_candidates.data.languages)
    reasons, naive, seen_raw = {}, {}, set()
    lo, hi = cfg_candidates.curate.filters.min_chars, cfg_candidates.curate.filters.max_chars
    for rec in records:
        reasons[rec["id"]] = replay.check(rec)
        n = len(rec["text"].strip())
        if n < lo:
            naive[rec["id"]] = "too_short"
        elif n > hi:
            naive[rec["id"]] = "too_long"
        elif rec["text"] in seen_raw:
            naive[rec["id"]] = "exact_duplicate"
        else:
            naive[rec["id"]] = None
            seen_raw.add(rec["text"])
    replay_kept = {i for i, r in reasons.items() if r is None}
    if replay_kept != kept_ids:
        raise ConfigError(f"pipeline_demo: replaying the corpus filters kept {len(replay_kept)} documents, the "
                          f"candidates stage {len(kept_ids)}: the corpus or the filter settings changed under it")
    for lang, row in manifest["documents"].items():
        if lang != "all" and row["kept"] != sum(1 for i in replay_kept if truth[i]["lang"] == lang):
            raise ConfigError(f"pipeline_demo: filter counts for {lang} differ from the candidates manifest")
    ids = sorted(truth)

    def figures(decisions: dict) -> dict:
        out = {kind: precision_recall((decisions[i] == kind for i in ids), (truth[i]["truth"] == kind for i in ids))
               for kind in PLANTED}
        out["clean_kept"] = precision_recall((decisions[i] is None for i in ids),
                                             (truth[i]["truth"] == "clean" for i in ids))
        return out

    confusion: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for i in ids:
        confusion[truth[i]["truth"]][reasons[i] or "kept"] += 1
    return {"pipeline": figures(reasons), "baseline": figures(naive),
            "baseline_name": "naive filter: length window + raw-text dedupe",
            "confusion": {k: dict(v) for k, v in sorted(confusion.items())}, "documents": len(ids)}


def _engine_for(cfg: Config, hf_dir: str):
    """(engine, model config, source) for `hf_dir`, or for a random init of cfg.model when empty."""
    from xinst_jax.convert.sources import load_params
    from xinst_jax.infer.job import build_engine

    model, params, source = load_params(cfg.model, checkpoint="", hf_dir=hf_dir, seed=cfg.seed,
                                        keys=("pipeline_demo checkpoint", "pipeline_demo hf_dir"))
    return build_engine(cfg, model, params), model, source


def generator_figures(cfg_gen: Config, heldout: list[dict]) -> dict:
    """chrF of the trained generator's instructions for the held-out documents vs the untrained one."""
    from xinst_jax.data.tokenizer import load_tokenizer
    from xinst_jax.infer.job import output_text, sampling_settings
    from xinst_jax.tasks import Task

    tokenizer = load_tokenizer(cfg_gen.generate.tokenizer, key="generate.tokenizer")
    task = Task("revgen", tokenizer)
    prompts = [task.prompt_tokens(r) for r in heldout]
    refs = [r["instruction"] for r in heldout]
    out, samples = {}, {}
    for name, hf_dir in (("trained", cfg_gen.generate.hf_dir), ("untrained", "")):
        engine, model, source = _engine_for(cfg_gen, hf_dir)
        settings = sampling_settings(cfg_gen, model, tokenizer)
        t0 = time.perf_counter()
        result = engine.generate(prompts, settings, row_ids=list(range(len(prompts))))
        texts = [output_text(tokenizer, toks, finish, settings, cfg_gen.generate.stop_strings)[0].strip()
                 for toks, finish in zip(result.tokens, result.finish_reasons)]
        by_lang = collections.defaultdict(list)
        for r, t in zip(heldout, texts):
            by_lang[r["lang"]].append((t, r["instruction"]))
        out[name] = {"chrf": corpus_chrf(texts, refs), "source": source,
                     "exact_match": float(np.mean([t == r for t, r in zip(texts, refs)])),
                     "per_language": {lang: corpus_chrf([a for a, _ in v], [b for _, b in v])
                                      for lang, v in sorted(by_lang.items())},
                     "seconds": round(time.perf_counter() - t0, 1)}
        samples[name] = [{"id": r["id"], "reference": r["instruction"], "generated": t}
                         for r, t in list(zip(heldout, texts))[:: max(1, len(heldout) // 6)]]
        print(f"pipeline_demo: generator ({name}): chrF {out[name]['chrf']:.1f} on {len(texts)} held-out documents",
              flush=True)
    return {**out, "samples": samples, "pairs": len(heldout)}


def fit_length_rater(ratings: list[dict], labels: Sequence[str]) -> dict:
    """Two thresholds on the output's length (characters) and a label per interval, fitted for
    accuracy on `ratings` (the evaluator's training set): the length-only baseline."""
    lengths = np.asarray([len(r["output"]) for r in ratings], np.float64)
    truth = np.asarray([labels.index(r["label"]) for r in ratings])
    cuts = np.unique(np.quantile(lengths, np.linspace(0, 1, 41)))
    cuts = np.concatenate([[-np.inf], cuts, [np.inf]])
    best = (-1.0, None)
    onehot = np.eye(len(labels))[truth]  # [n, labels]
    for a in range(len(cuts)):
        for b in range(a, len(cuts)):
            interval = np.where(lengths < cuts[a], 0, np.where(lengths < cuts[b], 1, 2))
            correct = 0.0
            assign = []
            for k in range(3):  # each interval takes its most frequent label
                votes = onehot[interval == k].sum(axis=0)
                assign.append(int(np.argmax(votes)) if votes.sum() else 0)
                correct += votes.max() if votes.sum() else 0.0
            acc = correct / len(ratings)
            if acc > best[0]:
                best = (acc, (float(cuts[a]), float(cuts[b]), [labels[k] for k in assign]))
    acc, (t1, t2, assign) = best
    return {"thresholds": [round(t1, 1), round(t2, 1)], "labels": assign, "train_accuracy": float(acc)}


def apply_length_rater(rater: dict, records: list[dict]) -> list[str]:
    t1, t2 = rater["thresholds"]
    return [rater["labels"][0 if len(r["output"]) < t1 else 1 if len(r["output"]) < t2 else 2] for r in records]


def evaluator_figures(cfg_refine: Config, root: Path, rated: list[dict]) -> dict:
    from xinst_jax.curate.evaluator import load_evaluator
    from xinst_jax.data.templates import EVALUATOR_LABELS

    t0 = time.perf_counter()
    evaluator = load_evaluator(cfg_refine)
    ratings = evaluator.rate(rated)
    predicted = [r.label for r in ratings]
    train = read_jsonl(root / "ratings" / "ratings.jsonl")
    rater = fit_length_rater(train, EVALUATOR_LABELS)
    baseline = apply_length_rater(rater, rated)
    truth = [r["label"] for r in rated]

    def figures(pred: list[str]) -> dict:
        out = {label: precision_recall((p == label for p in pred), (t == label for t in truth))
               for label in ("best", "worst")}
        out["accuracy"] = float(np.mean([p == t for p, t in zip(pred, truth)]))
        confusion = collections.defaultdict(collections.Counter)
        for p, r in zip(pred, rated):
            confusion[r["meta"]["kind"]][p] += 1
        out["by_kind"] = {k: dict(v) for k, v in sorted(confusion.items())}
        return out

    result = {"evaluator": figures(predicted), "baseline": figures(baseline), "length_rater": rater,
              "pairs": len(rated), "source": evaluator.source, "seconds": round(time.perf_counter() - t0, 1)}
    print(f"pipeline_demo: evaluator: accuracy {result['evaluator']['accuracy']:.2f} (length-only "
          f"{result['baseline']['accuracy']:.2f}) on {len(rated)} held-out ratings", flush=True)
    return result


def diversity_figures(root: Path, data_dir: Path, languages: Sequence[str], seed: int) -> dict:
    from xinst_jax.data.demo_corpus import TOPICS

    truth = {t["id"]: t for t in read_jsonl(data_dir / "truth.jsonl")}
    refined = read_jsonl(root / "refine" / "refined.jsonl")
    pool: dict[str, list[str]] = collections.defaultdict(list)
    for r in refined:
        pool[r["lang"]].append(truth[r["source_id"]]["topic"])
    rows, rng = {}, random.Random(f"pipeline-demo-random-draw-{seed}")
    for lang in languages:
        path = root / "diversify" / f"{lang}.jsonl"
        drawn = [truth[r["source_id"]]["topic"] for r in read_jsonl(path)] if path.exists() else []
        random_draw = rng.sample(pool[lang], len(drawn)) if drawn else []
        present = set(pool[lang])

        def stats(topics: list[str]) -> dict:
            c = collections.Counter(topics)
            return {"coverage": len(set(topics)) / len(present) if present else 0.0,
                    "entropy": entropy_bits(c.values()), "topics": {t: c.get(t, 0) for t in TOPICS}}

        rows[lang] = {"pool": len(pool[lang]), "drawn": len(drawn), "pool_topics": stats(pool[lang])["topics"],
                      "diversified": stats(drawn), "random": stats(random_draw)}
    use = [lang for lang in languages if rows[lang]["drawn"]]

    def mean(key: str, what: str) -> float:
        return float(np.mean([rows[lang][key][what] for lang in use])) if use else 0.0

    summary = {name: {"coverage": mean(name, "coverage"), "entropy": mean(name, "entropy")}
               for name in ("diversified", "random")}
    summary["max_entropy"] = math.log2(len(TOPICS))
    summary["pool_entropy"] = float(np.mean([entropy_bits(collections.Counter(pool[lang]).values()) for lang in use])) \
        if use else 0.0
    return {**summary, "per_language": rows, "languages_drawn": use}


def final_model_figures(cfg_sft: Config, root: Path, heldout: list[dict]) -> dict:
    from xinst_jax.data.tokenizer import load_tokenizer
    from xinst_jax.infer.score import score_records
    from xinst_jax.tasks import Task

    tokenizer = load_tokenizer(cfg_sft.data.tokenizer, key="data.tokenizer")
    task = Task("sft", tokenizer)
    out = {}
    for name, hf_dir in (("final", str(root / "sft" / "hf")), ("base", "")):
        engine, _, source = _engine_for(cfg_sft, hf_dir)
        scored = score_records(engine, task, heldout)
        by_lang = collections.defaultdict(lambda: [0.0, 0])
        for r, s, n in zip(heldout, scored.sum_logprob, scored.num_tokens):
            by_lang[r["lang"]][0] -= float(s)
            by_lang[r["lang"]][1] += int(n)
        total = -float(np.sum(scored.sum_logprob)) / float(np.sum(scored.num_tokens))
        out[name] = {"loss": total, "source": source, "tokens": int(np.sum(scored.num_tokens)),
                     "truncated_prompts": int(np.sum(scored.truncated)),
                     "per_language": {lang: v[0] / v[1] for lang, v in sorted(by_lang.items())}}
        print(f"pipeline_demo: final model ({name}): held-out loss {total:.3f} per answer token", flush=True)
    return out


# --------------------------------------------------------------------------- counts and timings


def stage_counts(root: Path, data_dir: Path, languages: Sequence[str]) -> dict[str, dict[str, int]]:
    """Per language, what each stage took in and passed on (from the stages' manifests)."""

    def load(*parts):
        path = root.joinpath(*parts)
        return json.loads(path.read_text()) if path.exists() else {}

    seed = collections.Counter(r["lang"] for r in read_jsonl(data_dir / "seed_pairs.jsonl"))
    ratings = load("ratings", "manifest.json").get("labels", {})
    cand = load("candidates", "manifest.json")
    refine = load("refine", "manifest.json").get("rounds", {})
    div = load("diversify", "manifest.json").get("languages", {})
    sft = load("sft", "data", "manifest.json").get("languages", {})
    table = {}
    for lang in list(languages) + ["all"]:
        def pick(d, key):
            return d.get(lang, {}).get(key, 0)

        refined = sum(r.get(lang, {}).get("best", 0) + r.get(lang, {}).get("fixed", 0) for r in refine.values())
        row = {
            "seed pairs": seed[lang] if lang != "all" else sum(seed.values()),
            "ratings": sum(ratings.get(lang, {}).values()),
            "corpus": pick(cand.get("documents", {}), "in"),
            "docs kept": pick(cand.get("documents", {}), "kept"),
            "candidates": pick(cand.get("instructions", {}), "kept"),
            "refined": refined,
            "diversified": div.get(lang, {}).get("kept", 0) if lang != "all" else
            sum(v.get("kept", 0) for v in div.values()),
            "sft examples": sft.get(lang, {}).get("examples", 0) if lang != "all" else
            sum(v.get("examples", 0) for v in sft.values()),
        }
        table[lang] = row
    return table


def stage_timings(pipe: Pipeline) -> dict[str, float]:
    out = {}
    for stage in pipe.stages:
        marker = pipe.marker(stage)
        if marker.exists():
            out[stage] = float(json.loads(marker.read_text()).get("seconds", 0.0))
    return out


# --------------------------------------------------------------------------- report


def _pct(x: float) -> str:
    return f"{x:.2f}"


def summary_rows(results: dict) -> list[tuple[str, str, str, str]]:
    """(figure, pipeline, baseline, baseline name) rows of the main table."""
    rows = []
    f = results["filters"]
    for kind in PLANTED + ("clean_kept",):
        p, b = f["pipeline"][kind], f["baseline"][kind]
        rows.append((f"filters: {kind} P / R", f"{_pct(p['precision'])} / {_pct(p['recall'])}",
                     f"{_pct(b['precision'])} / {_pct(b['recall'])}", "length window + raw dedupe"))
    g = results["generator"]
    rows.append(("generator: chrF vs reference", f"{g['trained']['chrf']:.1f}", f"{g['untrained']['chrf']:.1f}",
                 "untrained (random init)"))
    e = results["evaluator"]
    for label in ("best", "worst"):
        p, b = e["evaluator"][label], e["baseline"][label]
        rows.append((f"evaluator: {label} P / R", f"{_pct(p['precision'])} / {_pct(p['recall'])}",
                     f"{_pct(b['precision'])} / {_pct(b['recall'])}", "output length only"))
    rows.append(("evaluator: accuracy (3 labels)", _pct(e["evaluator"]["accuracy"]), _pct(e["baseline"]["accuracy"]),
                 "output length only"))
    d = results["diversity"]
    rows.append(("diversity: topic coverage", _pct(d["diversified"]["coverage"]), _pct(d["random"]["coverage"]),
                 "random draw, same size"))
    rows.append(("diversity: topic entropy (bits)", _pct(d["diversified"]["entropy"]), _pct(d["random"]["entropy"]),
                 f"random draw (max {d['max_entropy']:.2f})"))
    m = results["final_model"]
    rows.append(("final model: held-out loss", f"{m['final']['loss']:.3f}", f"{m['base']['loss']:.3f}",
                 "base model (random init)"))
    return rows


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]], align: str = "") -> list[str]:
    align = align or "l" + "r" * (len(header) - 1)
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"]
    out += ["| " + " | ".join(str(x) for x in row) + " |" for row in rows]
    return out


def text_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    cells = [list(map(str, header))] + [list(map(str, r)) for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def write_report(path: Path, results: dict) -> str:
    counts = results["counts"]
    count_keys = list(next(iter(counts.values())).keys())
    timings = results["timings"]
    lines = [
        "# Pipeline demo", "",
        f"Unicode CLDR text (babel) in {len(results['languages'])} languages: {', '.join(results['languages'])}; "
        f"seed {results['seed']}. Every figure against its baseline, computed in this run "
        "(xinst_jax/curate/pipeline_demo.py says how).", "",
        "## Figures", "",
        *markdown_table(("figure", "pipeline", "baseline", "baseline is"), summary_rows(results), "lrrl"), "",
        "## Stage timings (s)", "",
        *markdown_table(("stage", "seconds"), [(k, f"{v:.1f}") for k, v in timings.items()]), "",
        "## Counts per language and stage", "",
        *markdown_table(["lang"] + count_keys, [[lang] + [row[k] for k in count_keys] for lang, row in counts.items()]),
        "",
        "## Filters: planted truth -> filter decision", "",
        *markdown_table(("truth", "decisions"), [(k, ", ".join(f"{r} {n}" for r, n in sorted(v.items())))
                                                 for k, v in results["filters"]["confusion"].items()], "ll"),
        "",
        "## Evaluator: planted kind -> label (evaluator | length-only)", "",
        *markdown_table(("kind", "evaluator", "length only"),
                        [(k, ", ".join(f"{lb} {n}" for lb, n in sorted(v.items())),
                          ", ".join(f"{lb} {n}" for lb, n in
                                    sorted(results["evaluator"]["baseline"]["by_kind"].get(k, {}).items())))
                         for k, v in results["evaluator"]["evaluator"]["by_kind"].items()], "lll"),
        "",
        f"Length-only rater fitted on the evaluator's training ratings: thresholds "
        f"{results['evaluator']['length_rater']['thresholds']} characters -> labels "
        f"{results['evaluator']['length_rater']['labels']} (training accuracy "
        f"{results['evaluator']['length_rater']['train_accuracy']:.2f}).", "",
        "## Generator: per language chrF (trained | untrained)", "",
        *markdown_table(("lang", "trained", "untrained"),
                        [(lang, f"{v:.1f}", f"{results['generator']['untrained']['per_language'][lang]:.1f}")
                         for lang, v in results["generator"]["trained"]["per_language"].items()]),
        "",
        "Samples (reference | trained | untrained):", "",
    ]
    for a, b in zip(results["generator"]["samples"]["trained"], results["generator"]["samples"]["untrained"]):
        lines.append(f"- `{a['id']}`: {a['reference']} | {a['generated']!r} | {b['generated'][:80]!r}")
    d = results["diversity"]
    lines += ["", "## Diversity: topics per language (pool -> diversified | random)", "",
              *markdown_table(("lang", "pool", "drawn", "diversified topics", "random topics"),
                              [(lang, r["pool"], r["drawn"],
                                " ".join(f"{t[:4]} {n}" for t, n in r["diversified"]["topics"].items()),
                                " ".join(f"{t[:4]} {n}" for t, n in r["random"]["topics"].items()))
                               for lang, r in d["per_language"].items()], "lrrll"),
              "", f"Mean topic entropy of the refined pool: {d['pool_entropy']:.2f} bits.", "",
              "## Final model: held-out loss per language (final | base)", "",
              *markdown_table(("lang", "final", "base"),
                              [(lang, f"{v:.3f}", f"{results['final_model']['base']['per_language'][lang]:.3f}")
                               for lang, v in results["final_model"]["final"]["per_language"].items()]), ""]
    text = "\n".join(lines)
    path.write_text(text, encoding="utf-8")
    return text


def print_tables(results: dict) -> None:
    rows = summary_rows(results)
    print("\n" + "\n".join(text_table(("figure", "pipeline", "baseline", "baseline is"), rows)), flush=True)
    counts = results["counts"]
    keys = list(next(iter(counts.values())).keys())
    print("\ncounts per language and stage:\n" + "\n".join(
        text_table(["lang"] + keys, [[lang] + [row[k] for k in keys] for lang, row in counts.items()])), flush=True)
    print("\nstage timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in results["timings"].items()), flush=True)


# --------------------------------------------------------------------------- the job


def run_pipeline_demo(cfg: Config, sizes=None) -> dict:
    """Data -> pipeline -> figures; returns the results (also <run_dir>/results.json, report.md).
    `sizes` (data.demo_corpus.DemoSizes): the data's size per language (tests pass smaller ones)."""
    start = time.perf_counter()
    unknown = [lang for lang in cfg.data.languages if lang not in LANGUAGES]
    if unknown:
        raise ConfigError(f"data.languages: the demo's data covers {', '.join(LANGUAGES)}; not {', '.join(unknown)}")
    run_dir = cfg.resolved_run_dir()
    data_dir = run_dir / "data"
    sizes = demo_sizes(cfg, sizes)
    pcfg = demo_pipeline_config(cfg, data_dir)
    plain = Pipeline(pcfg)
    filters = plain.stage_config("candidates").curate.filters
    write_data(cfg, data_dir, filters, sizes)
    write_template_text(data_dir, cfg.data.languages)
    write_best_pairs(data_dir)
    data_seconds = time.perf_counter() - start

    t0 = time.perf_counter()
    _DemoPipeline(pcfg).run()
    pipeline_seconds = time.perf_counter() - t0

    print("\npipeline_demo: figures ...", flush=True)
    t0 = time.perf_counter()
    root = plain.root
    heldout = read_jsonl(data_dir / "heldout_pairs.jsonl")
    rated = read_jsonl(data_dir / "heldout_rated.jsonl")
    results: dict[str, Any] = {"version": RESULTS_VERSION, "languages": list(cfg.data.languages), "seed": cfg.seed,
                               "sizes": dataclasses.asdict(sizes)}
    results["filters"] = filter_figures(plain.stage_config("candidates"), root, data_dir)
    results["generator"] = generator_figures(plain.stage_config("candidates"), heldout)
    results["evaluator"] = evaluator_figures(plain.stage_config("refine"), root, rated)
    results["diversity"] = diversity_figures(root, data_dir, cfg.data.languages, cfg.seed)
    results["final_model"] = final_model_figures(plain.stage_config("sft"), root, heldout)
    results["counts"] = stage_counts(root, data_dir, cfg.data.languages)
    timings = {"data": round(data_seconds, 1), **stage_timings(plain)}
    timings["figures"] = round(time.perf_counter() - t0, 1)
    results["timings"] = timings
    results["pipeline_seconds_this_run"] = round(pipeline_seconds, 1)
    results["seconds_this_run"] = round(time.perf_counter() - start, 1)
    (run_dir / "results.json").write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    write_report(run_dir / "report.md", results)
    print_tables(results)
    print(f"\npipeline_demo: finished in {results['seconds_this_run']:.0f} s; {run_dir / 'report.md'}, "
          f"{run_dir / 'results.json'}", flush=True)
    return results


@register_job("pipeline_demo")
def pipeline_demo_job(cfg: Config) -> None:
    run_pipeline_demo(cfg)
