"""Job `diversify` (X-Instruction stage 4): embed the kept English instructions, cluster them per
language with k-means, draw evenly across clusters, up to curate.diversify.per_language per language.

    python launch/tpu_run.py --config diversify_xinst
    python launch/tpu_run.py --config diversify_xinst --set curate.diversify.input=runs/xinst/refine/refined.jsonl

Input: curate.diversify.input (a JSONL file, a refine directory, a directory or glob of JSONL /
Parquet files), else `<curate.out or run_dir>/refine/refined.jsonl`: pairs {id, lang, instruction
(English), output, score, round, source_id, ...} read by the one records reader (id, lang,
instruction and output required; a bad line is skipped and counted, or an error with data.strict;
outputs over data.max_chars are skipped as sft's prepare would).

Per language:
  1. embed every instruction (curate/embed.py: all-MiniLM-L6-v2 in JAX, or the project's model);
  2. k-means (curate/kmeans.py: k-means++ then Lloyd, cosine, points sharded over the mesh's
     data axes) into k = curate.diversify.clusters clusters, or, when 0, ceil(sqrt(n / 2)) capped
     at MAX_AUTO_CLUSTERS (and always at n); the best (lowest inertia) of curate.diversify.restarts runs. The PRNG
     key is (seed, crc32(lang)): a language clusters the same whatever other languages the input
     holds;
  3. draw round-robin: round r takes the r-th best pair (highest evaluator score; ties and pairs
     without a score after, in input order) of every cluster that still has one, the round's
     pairs in score order; rounds go on until per_language pairs are drawn. Every cluster gives
     min(its size, m) or m + 1 pairs for some m: the draw is as even as the clusters allow, and
     each cluster gives its best. The rest are dropped as `over_quota`.

Output, `<curate.out or run_dir>/diversify/`:

    <lang>.jsonl       the X-Instruction data, one file per language, in draw order (the first m
                       lines are the even draw of m): {id, lang, instruction, output, score, round,
                       cluster, source_id}. sft_xinst reads them as they are:
                       --set 'data.inputs=[{path: runs/xinst/diversify}]'
    manifest.json      settings (embedder, k-means, quota, input sha256); per language: in, kept,
                       dropped by reason (in == kept + dropped), cluster sizes, pairs kept per
                       cluster, clusters drawn from, inertia; `counts` (StageCounts), unreadable
                       input lines by reason, each file's records and sha256, `done`
    report.md          per language: the clusters with their sizes, most frequent leading verbs
                       and nouns (the paper's instruction-verb chart) and best instruction; the
                       language's top verb -> noun pairs
    <lang>_clusters.png  2-D PCA projection of the embeddings coloured by cluster

Leading verb and noun (report.md): a heuristic, no tagger. The instruction is lower-cased and
split into words (letters, apostrophes, hyphens); polite openings (POLITE_PREFIXES: "please",
"kindly", "can you", "could you", "would you", "i want you to", ...) are stripped; the leading
verb is the first word left; the noun is the first word after it that is not in NOT_NOUNS
(determiners, pronouns, prepositions, conjunctions, auxiliaries, numerals and a few frequent
adjectives and adverbs such as "short", "brief", "following", "main"). "Please write a short poem
about the sea." -> (write, poem); "What are the main causes of inflation?" -> (what, causes).

Resume: a rerun with the same settings and input whose manifest says done (and whose files match
their sha256) does nothing; another input or other settings in the same directory are refused
(the manifest), as in every stage. The stage is one step (no shards): an interrupted run is
redone whole.

Processes: every process reads the input and embeds all instructions on its own devices; k-means
runs over the whole mesh (mesh.*: points split over the data and fsdp axes); process 0 writes.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import math
import re
import time
import zlib
from typing import Any

import numpy as np

from xinst_jax import paths
from xinst_jax.config import Config, ConfigError, DataInputConfig
from xinst_jax.curate.candidates import stage_dir
from xinst_jax.curate.counts import StageCounts
from xinst_jax.data.records import RecordReader, glob_files
from xinst_jax.jobs import register_job
from xinst_jax.shards import check_manifest, file_sha256, write_atomic, write_json

log = logging.getLogger(__name__)

MAX_AUTO_CLUSTERS = 1000  # clusters=0: ceil(sqrt(n / 2)), at most this many
PLOT_POINTS = 20000  # at most this many points drawn per PNG (a fixed random subset)
DRAW = "round-robin over clusters, best score first within a cluster, input order on ties"  # in the manifest
OUTPUT_FIELDS = ("id", "lang", "instruction", "output", "score", "round", "cluster", "source_id")

POLITE_PREFIXES = (("please",), ("kindly",), ("can", "you"), ("could", "you"), ("would", "you"), ("will", "you"),
                   ("i", "want", "you", "to"), ("i", "would", "like", "you", "to"), ("i'd", "like", "you", "to"))
NOT_NOUNS = frozenset("""
    a an the this that these those some any each every all both either neither no another other such
    i me my mine you your yours he him his she her hers it its we us our ours they them their theirs
    myself yourself itself ourselves themselves someone something anything everything one ones what which who
    whom whose how why when where whether if then than so as
    about above across after against along among around at before behind below between beyond by down during
    for from in inside into like near of off on onto out outside over per since through throughout to toward
    towards under until up upon via with within without
    and or but nor yet also not just only very too more most less least much many few several
    is are was were be been being am do does did done have has had can could will would shall should may
    might must there here
    two three four five six seven eight nine ten first second third one-sentence
    short brief detailed new simple following given main key important good best different common basic
    quick concise clear possible top own same certain specific general complete full whole
    briefly clearly simply quickly carefully
""".split())


# --------------------------------------------------------------------------- input


def input_sources(cfg: Config) -> tuple[str, list[str]]:
    """(the input as given or defaulted, its files): refine directory -> refined.jsonl. Local or
    gs://, through the path layer (glob_files)."""
    key = "curate.diversify.input"
    given = cfg.curate.diversify.input
    # absolute: the manifest names a local input the same way from any directory (a URL as given)
    path = paths.absolute(given or str(stage_dir(cfg, "refine") / "refined.jsonl"))
    if paths.isdir(path) and paths.isfile(paths.join(path, "refined.jsonl")):
        path = paths.join(path, "refined.jsonl")
    files = glob_files(path)
    if not files:
        hint = "run the refine job first, or point " if not given else "point "
        raise ConfigError(f"{key}: {path} not found ({hint}{key} at the refined pairs: a JSONL file, a directory "
                          "or a glob)")
    return path, files


def _number(value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return value


@dataclasses.dataclass
class Pairs:
    records: list[dict]  # {index, id, lang, instruction, output, score, round, source_id}, input order
    unreadable: dict  # {reason: n}: lines the reader skipped (no language: not in the per-language counts)
    lines: int  # non-blank input lines


def read_pairs(cfg: Config, path: str, files: list[str], copies: list[str]) -> Pairs:
    """The pairs of the input `path`: its `files`, read from `copies` (paths.read_once's)."""
    reader = RecordReader(cfg.data.languages, cfg.data.max_chars, cfg.data.strict, required=("instruction", "output"),
                          require_id=True, strict_key="data.strict", shown_as=dict(zip(copies, map(str, files))))
    out = []
    for rec in reader.read([DataInputConfig(path=f) for f in copies]):
        meta = rec["meta"]
        out.append({"index": len(out), "id": rec["id"], "lang": rec["lang"], "instruction": rec["instruction"],
                    "output": rec["output"], "score": _number(meta.get("score")), "round": meta.get("round"),
                    "source_id": meta.get("source_id", rec["id"])})
    totals = reader.totals()
    key = "curate.diversify.input"
    if totals["in"] == 0:
        raise ConfigError(f"{key}: {path} holds no pairs (empty input)")
    if not out:
        raise ConfigError(f"{key}: {path}: none of its {totals['in']} lines is a valid pair {{id, lang, instruction, "
                          f"output}} (skipped: {totals['skipped']})")
    return Pairs(out, totals["skipped"], totals["in"])


# --------------------------------------------------------------------------- clusters and the draw


def cluster_count(n: int, clusters: int) -> int:
    """k for n instructions: `clusters` when > 0, else ceil(sqrt(n / 2)) <= MAX_AUTO_CLUSTERS; never > n."""
    k = clusters if clusters > 0 else min(math.ceil(math.sqrt(n / 2)), MAX_AUTO_CLUSTERS)
    return max(1, min(k, n))


def draw_evenly(clusters: np.ndarray, scores: list, quota: int) -> list[int]:
    """Positions (into `clusters`/`scores`, which are in input order) of the pairs drawn, in draw
    order: round r takes the r-th best of every cluster (score descending, None last, input order on
    ties), the round's pairs by the same order; at most `quota`."""
    def best_first(i: int):
        s = scores[i]
        return (s is None, -(s if s is not None else 0.0), i)

    rank = np.zeros(len(scores), np.int64)
    members: dict[int, list[int]] = collections.defaultdict(list)
    for i, c in enumerate(clusters.tolist()):
        members[c].append(i)
    for items in members.values():
        for r, i in enumerate(sorted(items, key=best_first)):
            rank[i] = r
    order = sorted(range(len(scores)), key=lambda i: (rank[i], *best_first(i)))
    return order[:max(0, quota)]


# --------------------------------------------------------------------------- report


def leading_verb_noun(instruction: str) -> tuple[str | None, str | None]:
    """(leading verb, first noun-like word after it); module docstring."""
    words = re.findall(r"[a-z][a-z'\-]*", instruction.lower())
    stripped = True
    while stripped:
        stripped = False
        for prefix in POLITE_PREFIXES:
            if tuple(words[:len(prefix)]) == prefix:
                words = words[len(prefix):]
                stripped = True
    if not words:
        return None, None
    noun = next((w for w in words[1:] if w not in NOT_NOUNS and len(w) > 1), None)
    return words[0], noun


def _top(counter: collections.Counter, n: int) -> str:
    return ", ".join(f"{w} ({c})" for w, c in counter.most_common(n)) or "-"


def _cell(text: str, limit: int = 90) -> str:
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= limit else text[:limit - 1] + "…"


def language_report(lang: str, records: list[dict], assignments: np.ndarray, k: int, kept: set[int],
                    png: str | None) -> str:
    verbs = [collections.Counter() for _ in range(k)]
    nouns = [collections.Counter() for _ in range(k)]
    pairs: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    all_verbs: collections.Counter = collections.Counter()
    best: dict[int, dict] = {}
    for rec, c in zip(records, assignments.tolist()):
        verb, noun = leading_verb_noun(rec["instruction"])
        if verb:
            verbs[c][verb] += 1
            all_verbs[verb] += 1
        if noun:
            nouns[c][noun] += 1
            if verb:
                pairs[verb][noun] += 1
        score = rec["score"] if rec["score"] is not None else -math.inf
        if c not in best or score > (best[c]["score"] if best[c]["score"] is not None else -math.inf):
            best[c] = rec
    sizes = np.bincount(assignments, minlength=k)
    drawn = collections.Counter(int(assignments[i]) for i in kept)
    lines = [f"## {lang}: {len(records)} instructions, {k} clusters, {len(kept)} kept", ""]
    if png:
        lines += [f"![{lang} clusters]({png})", ""]
    lines += ["Top leading verbs (with their most frequent nouns): " + "; ".join(
        f"**{v}** {c} ({_top(pairs[v], 4)})" for v, c in all_verbs.most_common(20)), "",
        "| cluster | size | kept | leading verbs | nouns | best instruction |", "|---:|---:|---:|---|---|---|"]
    for c in sorted(range(k), key=lambda c: (-sizes[c], c)):
        example = _cell(best[c]["instruction"]) if c in best else ""
        lines.append(f"| {c} | {sizes[c]} | {drawn[c]} | {_top(verbs[c], 3)} | {_top(nouns[c], 3)} | {example} |")
    return "\n".join(lines) + "\n"


def plot_clusters(path: Any, lang: str, vectors: np.ndarray, assignments: np.ndarray, k: int, seed: int) -> None:
    """2-D PCA (numpy SVD of the centred embeddings) of at most PLOT_POINTS points, coloured by cluster."""
    import matplotlib

    from xinst_jax.eval.report import png_figure

    n = len(vectors)
    rows = np.sort(np.random.default_rng(seed).choice(n, PLOT_POINTS, replace=False)) if n > PLOT_POINTS \
        else np.arange(n)
    x = vectors[rows].astype(np.float64)
    mean = x.mean(axis=0)
    _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
    xy = (x - mean) @ vt[:2].T if len(s) >= 2 else np.pad((x - mean) @ vt[:1].T, ((0, 0), (0, 1)))
    explained = float((s[:2] ** 2).sum() / max((s ** 2).sum(), 1e-30))
    if k <= 20:  # one distinct colour per cluster, with a legend
        palette = matplotlib.colormaps["tab10" if k <= 10 else "tab20"]
        colours = [palette(c) for c in range(k)]
    else:  # many clusters: a continuous map, neighbouring ids in different hues
        palette = matplotlib.colormaps["turbo"]
        colours = [palette(((c * 0.618034) % 1.0)) for c in range(k)]
    labels = assignments[rows]
    size = 14 if len(rows) < 2000 else 4
    title = f"{lang}: {n} instructions, {k} clusters (PCA, {explained:.0%} of variance)"
    with png_figure(path, title, width=7.0, height=6.0) as ax:
        for c in range(k):
            mine = labels == c
            if mine.any():
                ax.scatter(xy[mine, 0], xy[mine, 1], color=colours[c], s=size, alpha=0.8, linewidths=0,
                           label=str(c) if k <= 20 else None)
        if k <= 20:
            ax.legend(title="cluster", fontsize=7, markerscale=1.5, loc="best", ncol=2 if k > 10 else 1)
        ax.set_xlabel("PC 1")
        ax.set_ylabel("PC 2")


# --------------------------------------------------------------------------- the job


def check_diversify_config(cfg: Config) -> None:
    div = cfg.curate.diversify
    if div.per_language < 1 or div.clusters < 0 or div.iterations < 0 or div.tolerance < 0:
        raise ConfigError(f"curate.diversify: per_language >= 1, clusters >= 0, iterations >= 0 and tolerance >= 0 "
                          f"required (got {div.per_language}, {div.clusters}, {div.iterations}, {div.tolerance})")
    if div.embedder not in ("minilm", "model"):
        raise ConfigError(f"curate.diversify.embedder: expected minilm or model, got {div.embedder!r}")


def embedder_settings(cfg: Config) -> dict:
    """What the embeddings depend on, without loading the embedder."""
    div = cfg.curate.diversify
    if div.embedder == "minilm":
        from xinst_jax.curate.embed import minilm_dir

        path = minilm_dir(cfg)
        # the directory as configured (a URL, not the machine's cache path of its copy)
        return {"embedder": "minilm", "dir": paths.absolute(div.embedder_dir or str(path)),
                "weights_sha256": file_sha256(path / "model.safetensors"), "max_tokens": div.embed_max_tokens}
    gen = cfg.generate
    return {"embedder": "model", "checkpoint": gen.checkpoint, "hf_dir": gen.hf_dir, "tokenizer": gen.tokenizer,
            "weight_dtype": gen.weight_dtype, "model": dataclasses.asdict(cfg.model), "seed": cfg.seed,
            "max_tokens": div.embed_max_tokens}


def finished(out: Any, settings: dict) -> dict | None:
    """The saved manifest when the stage is done with these settings and its files are intact."""
    try:
        saved = json.loads((out / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    if not saved.get("done") or saved.get("settings") != json.loads(json.dumps(settings)):
        return None
    for row in saved.get("languages", {}).values():
        path = out / row["file"]
        if not path.is_file() or file_sha256(path) != row["sha256"]:
            return None
    return saved


def run_diversify(cfg: Config) -> dict:
    import jax

    from xinst_jax.curate.embed import build_embedder
    from xinst_jax.curate.kmeans import kmeans
    from xinst_jax.runtime import setup_runtime
    from xinst_jax.sharding import make_mesh

    check_diversify_config(cfg)
    div = cfg.curate.diversify
    path, files = input_sources(cfg)
    setup_runtime(cfg.distributed)
    process = jax.process_index()
    out = stage_dir(cfg, "diversify")
    # each input file is read once: hashed (a changed input is never taken for done) as it is fetched
    with paths.read_once(files) as local:
        settings = {
            "stage": "diversify", "input": path, "input_sha256": [[f, sha] for f, (_, sha) in zip(files, local)],
            "languages": cfg.data.languages, "max_chars": cfg.data.max_chars, "embedder": embedder_settings(cfg),
            "clusters": div.clusters, "max_auto_clusters": MAX_AUTO_CLUSTERS, "metric": div.metric,
            "restarts": div.restarts, "iterations": div.iterations, "tolerance": div.tolerance,
            "per_language": div.per_language, "seed": cfg.seed, "draw": DRAW,
        }
        saved = finished(out, settings)
        if saved is not None:
            print(f"diversify: {out} is done with these settings and this input; nothing to do", flush=True)
            return {k: v for k, v in saved.items() if k != "settings"}
        check_manifest(out, {"settings": settings}, "curate.out", write=False)
        start = time.perf_counter()
        pairs = read_pairs(cfg, path, files, [copy for copy, _ in local])
    if process == 0:
        out.mkdir(parents=True, exist_ok=True)
        check_manifest(out, {"settings": settings}, "curate.out")

    t0 = time.perf_counter()
    embedder = build_embedder(cfg)
    vectors = embedder([r["instruction"] for r in pairs.records])
    embed_seconds = time.perf_counter() - t0
    del embedder

    mesh = make_mesh(cfg.mesh)
    by_lang: dict[str, list[int]] = collections.defaultdict(list)
    for r in pairs.records:
        by_lang[r["lang"]].append(r["index"])
    order = [lang for lang in cfg.data.languages if lang in by_lang]
    counts = StageCounts()
    languages: dict[str, dict] = {}
    outputs: dict[str, bytes] = {}
    sections, cluster_seconds = [], 0.0
    for lang in order:
        rows = by_lang[lang]
        records = [pairs.records[i] for i in rows]
        k = cluster_count(len(rows), div.clusters)
        t1 = time.perf_counter()
        key = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), zlib.crc32(lang.encode()) & 0x7FFFFFFF)
        result = kmeans(vectors[rows], k, key, iterations=div.iterations, tolerance=div.tolerance, metric=div.metric,
                        mesh=mesh, restarts=div.restarts)
        cluster_seconds += time.perf_counter() - t1
        drawn = draw_evenly(result.assignments, [r["score"] for r in records], div.per_language)
        counts.add(lang, None, len(drawn))
        counts.add(lang, "over_quota", len(rows) - len(drawn))
        lines = []
        for i in drawn:
            rec = records[i]
            lines.append(json.dumps({"id": rec["id"], "lang": lang, "instruction": rec["instruction"],
                                     "output": rec["output"], "score": rec["score"], "round": rec["round"],
                                     "cluster": int(result.assignments[i]), "source_id": rec["source_id"]},
                                    ensure_ascii=False))
        outputs[lang] = "".join(line + "\n" for line in lines).encode("utf-8")
        kept_per_cluster = np.bincount(result.assignments[drawn], minlength=k) if drawn else np.zeros(k, np.int64)
        row = counts.to_dict()[lang]
        languages[lang] = {
            "in": row["in"], "kept": row["kept"], "dropped": row["dropped"], "clusters": k,
            "cluster_sizes": result.sizes.tolist(), "kept_per_cluster": kept_per_cluster.tolist(),
            "clusters_drawn_from": int((kept_per_cluster > 0).sum()), "empty_clusters": int((result.sizes == 0).sum()),
            "inertia": round(result.inertia, 6), "iterations": result.iterations, "shift": result.shift,
            "reseeded": result.reseeded, "file": f"{lang}.jsonl", "records": len(lines),
        }
        if process == 0:
            png = f"{lang}_clusters.png"
            plot_clusters(out / png, lang, vectors[rows], result.assignments, k, cfg.seed)
            sections.append(language_report(lang, records, result.assignments, k, set(drawn), png))
        print(f"diversify: {lang}: {len(rows)} pairs, {k} clusters (sizes {min(result.sizes)}..{max(result.sizes)}, "
              f"{result.iterations} iterations) -> {len(drawn)} kept from {languages[lang]['clusters_drawn_from']} "
              "clusters", flush=True)

    report = {"output": str(out), "input_lines": pairs.lines, "unreadable_lines": pairs.unreadable,
              "languages": languages, "counts": counts.to_dict(), "kept": counts.total_kept(),
              "embedding_dim": int(vectors.shape[1]), "embed_seconds": round(embed_seconds, 3),
              "cluster_seconds": round(cluster_seconds, 3), "seconds": round(time.perf_counter() - start, 3)}
    if process == 0:
        for lang, data in outputs.items():
            write_atomic(out / f"{lang}.jsonl", data)
            languages[lang]["sha256"] = hashlib.sha256(data).hexdigest()  # the bytes just written
        head = [f"# Diversify: {path}", "",
                f"Embedder {div.embedder}; k-means ({div.metric}, best of {div.restarts} runs of k-means++ then at most "
                f"{div.iterations} Lloyd iterations); round-robin draw across clusters, best score first, up to "
                f"{div.per_language} per language. Leading verb / noun: a heuristic (no tagger), see "
                "xinst_jax/curate/diversify.py.", "",
                "| lang | in | kept | over quota | clusters | drawn from | sizes (min..max) |",
                "|---|---:|---:|---:|---:|---:|---|"]
        for lang, row in languages.items():
            sizes = row["cluster_sizes"]
            head.append(f"| {lang} | {row['in']} | {row['kept']} | {row['dropped'].get('over_quota', 0)} | "
                        f"{row['clusters']} | {row['clusters_drawn_from']} | {min(sizes)}..{max(sizes)} |")
        if pairs.unreadable:
            head += ["", f"Unreadable input lines skipped: {pairs.unreadable}"]
        write_atomic(out / "report.md", ("\n".join(head) + "\n\n" + "\n".join(sections)).encode("utf-8"))
        write_json(out / "manifest.json", {"settings": settings, **report, "done": True})
        print(f"diversify: per language:\n{counts.summary()}", flush=True)
        if pairs.unreadable:
            print(f"  unreadable lines skipped: {pairs.unreadable}", flush=True)
        print(f"diversify: {out}: {counts.total_kept()} pairs in {len(outputs)} language file(s), report.md, "
              "manifest.json", flush=True)
    return report


@register_job("diversify")
def diversify_job(cfg: Config) -> None:
    run_diversify(cfg)
