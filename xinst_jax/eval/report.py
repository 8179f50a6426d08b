"""results.json -> report.md and PNG plots (matplotlib's object API on the Agg canvas, no pyplot),
written through the path layer (eval.out may be gs://):

    win_tie_loss.png   judge outcomes per language, stacked bars (share of the judged pairs)
    fidelity.png       language fidelity per language, with the mixed-script share beside it
    xcopa.png          XCOPA accuracy per language, chance (0.5) marked
    loss.png           training loss by step from a run's metrics.jsonl
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from typing import Any, Iterator, Optional, Sequence

from xinst_jax import paths
from xinst_jax.eval.fidelity import confusion_columns, confusion_row

COLORS = {"win": "#2e7d32", "tie": "#9e9e9e", "loss": "#c62828", "fidelity": "#1565c0", "mixed": "#ef6c00", "wrong": "#8d6e63",
          "xcopa": "#6a1b9a", "loss_curve": "#37474f"}


@contextlib.contextmanager
def png_figure(path: Any, title: str, width: float = 7.0, height: float = 4.0) -> Iterator[Any]:
    """One titled axes on an Agg figure, saved to `path` (local or gs://, through the path layer)
    as PNG when the block ends. Every plot of the project is drawn this way (eval, diversify)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    yield ax
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png")
    paths.write_atomic(path, png.getvalue())


def _bar_width(n: int, least: float = 5.0) -> float:
    return max(least, 0.7 * n + 2.5)


def plot_win_tie_loss(path: Any, per_language: dict, title: str) -> bool:
    langs = [lang for lang in per_language if lang != "all" and per_language[lang]["judged"]]
    if not langs:
        return False
    with png_figure(path, title, _bar_width(len(langs))) as ax:
        bottom = [0.0] * len(langs)
        for k in ("win", "tie", "loss"):
            vals = [per_language[lang][f"{k}_rate"] or 0.0 for lang in langs]
            ax.bar(langs, vals, bottom=bottom, color=COLORS[k], label=k)
            bottom = [b + v for b, v in zip(bottom, vals)]
        for i, lang in enumerate(langs):
            row = per_language[lang]
            note = f"n={row['judged']}"
            if row["unparseable"] or row["failed"]:
                note += f"\n+{row['unparseable']}u {row['failed']}f"
            ax.text(i, 1.01, note, ha="center", va="bottom", fontsize=7)
        ax.set_ylim(0, 1.18)
        ax.set_ylabel("share of judged pairs")
        ax.legend(loc="upper right", fontsize=8, ncol=3)
    return True


def plot_fidelity(path: Any, per_language: dict) -> bool:
    langs = list(per_language)
    if not langs:
        return False
    with png_figure(path, "Language fidelity (py3langid)", _bar_width(len(langs))) as ax:
        xs = list(range(len(langs)))
        w = 0.27
        for shift, key, color, label in ((-w, "fidelity", COLORS["fidelity"], "in the requested language"),
                                         (0.0, "mixed_script_share", COLORS["mixed"], "mixed scripts"),
                                         (w, "wrong_script_share", COLORS["wrong"], "wrong script")):
            ax.bar([x + shift for x in xs], [per_language[lang][key] or 0.0 for lang in langs], w, color=color,
                   label=label)
        ax.set_xticks(xs)
        ax.set_xticklabels(langs)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("share of answers")
        ax.legend(fontsize=8)
    return True


def plot_xcopa(path: Any, per_language: dict) -> bool:
    langs = list(per_language)
    if not langs:
        return False
    with png_figure(path, "XCOPA (log-likelihood, lm-eval format)", _bar_width(len(langs), least=4.0)) as ax:
        accs = [per_language[lang]["acc"] or 0.0 for lang in langs]
        errs = [per_language[lang]["acc_stderr"] or 0.0 for lang in langs]
        ax.bar(langs, accs, yerr=errs, color=COLORS["xcopa"], capsize=3)
        ax.axhline(0.5, color="black", linestyle="--", linewidth=1, label="chance")
        ax.set_ylim(0, 1)
        ax.set_ylabel("accuracy")
        ax.legend(fontsize=8)
    return True


def read_loss_curve(metrics: Any) -> tuple[list[int], list[float]]:
    """(steps, losses) from a metrics.jsonl; unreadable lines are skipped (a run may be writing)."""
    steps, losses = [], []
    with paths.open(metrics, "rb") as f:
        for raw in f:
            try:
                rec = json.loads(raw)
                step, loss = int(rec["step"]), float(rec["loss"])
            except (ValueError, KeyError, TypeError):
                continue
            if math.isfinite(loss):
                steps.append(step)
                losses.append(loss)
    return steps, losses


def plot_loss(path: Any, metrics: Any) -> bool:
    steps, losses = read_loss_curve(metrics)
    if not steps:
        return False
    with png_figure(path, f"Training loss ({metrics.parent.name}/{metrics.name})") as ax:
        ax.plot(steps, losses, color=COLORS["loss_curve"], linewidth=1)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
    return True


def _fmt(v, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isfinite(v) and v != 0 and not 1e-3 <= abs(v) < 1e6:
            return f"{v:.{digits}e}"
        return f"{v:.{digits}f}"
    return str(v)


def _table(header: Sequence[str], rows: Sequence[Sequence]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return out


def write_report(out: Any, results: dict, plots: dict[str, str]) -> Any:
    """report.md in `out` from results.json's content; `plots`: name -> file name."""
    lines = ["# X-Instruction evaluation", ""]
    lines += [f"- model: `{results.get('model', '-')}`", f"- template: `{results.get('template', '-')}`",
              f"- languages: {', '.join(results.get('languages', []))}"]
    if results.get("prompts"):
        p = results["prompts"]
        lines.append(f"- prompts: {p['count']} from `{p['path']}`")
    lines.append("")

    fid = results.get("fidelity")
    if fid:
        lines += ["## Language fidelity", "",
                  "Share of answers that py3langid puts in the requested language; *mixed*: a second script "
                  f"holds more than {fid['mixed_script_threshold']:.0%} of the letters; *wrong script*: the main "
                  "script is not the language's own (the Latin-script languages fi id sw tr vi cannot be told "
                  "apart by script).", ""]
        rows = [[lang, r["answers"], r["fidelity"], r["mixed_script"], r["wrong_script"], r["empty"]]
                for lang, r in fid["per_language"].items()]
        a = fid["all"]
        rows.append(["**all**", a["answers"], a["fidelity"], a["mixed_script"], a["wrong_script"], a["empty"]])
        lines += _table(["lang", "answers", "fidelity", "mixed script", "wrong script", "empty"], rows)
        if "fidelity" in plots:
            lines += ["", f"![fidelity]({plots['fidelity']})"]
        cols = confusion_columns(fid["confusion"], list(fid["per_language"]))
        lines += ["", "Confusion (rows: requested, columns: py3langid's label):", ""]
        crow = []
        for lang, row in fid["confusion"].items():
            counts, other = confusion_row(row, cols)
            crow.append([lang] + counts + [other])
        lines += _table(["requested"] + cols + ["other"], crow)
        lines.append("")

    judge = results.get("judge")
    if judge:
        lines += ["## Judge", "",
                  f"Ours against {judge['opponent']}; judge `{judge['endpoint']['model']}` at "
                  f"`{judge['endpoint']['base_url']}` with the released X-Instruction prompt, each pair in both "
                  f"orders. Rule: {judge['rule']}.", ""]
        rows = []
        for lang, r in judge["per_language"].items():
            rows.append([f"**{lang}**" if lang == "all" else lang, r["pairs"], r["win"], r["tie"], r["loss"],
                         r["win_rate"], r["tie_rate"], r["loss_rate"], r["unparseable"], r["failed"],
                         r["mean_score_ours"], r["mean_score_theirs"]])
        lines += _table(["lang", "pairs", "win", "tie", "loss", "win rate", "tie rate", "loss rate", "unparseable",
                         "failed", "score ours", "score theirs"], rows)
        u = judge["usage"]
        lines += ["", f"Requests: {u['requests']} sent ({u['retries']} retries, errors {u['http_errors'] or 'none'}), "
                  f"{u['cache_hits']} answered from the cache. Tokens billed this run: {u['prompt_tokens']} prompt + "
                  f"{u['completion_tokens']} completion; from the cache: {u['cached_prompt_tokens']} + "
                  f"{u['cached_completion_tokens']}."]
        if "win_tie_loss" in plots:
            lines += ["", f"![win/tie/loss]({plots['win_tie_loss']})"]
        lines.append("")

    xcopa = results.get("xcopa")
    if xcopa:
        lines += ["## XCOPA", "",
                  f"lm-evaluation-harness's xcopa format, accuracy by the summed log-likelihood of each choice "
                  f"(split `{xcopa['split']}`, BOS {'added' if xcopa['add_bos'] else 'not added, as lm-eval'}); "
                  "per-item log-likelihoods in xcopa.jsonl.", ""]
        rows = [[lang, r["n"], r["acc"], r["acc_stderr"]] for lang, r in xcopa["per_language"].items()]
        rows.append(["**average**", sum(r["n"] for r in xcopa["per_language"].values()), xcopa["average_acc"], None])
        lines += _table(["lang", "items", "acc", "stderr"], rows)
        if "xcopa" in plots:
            lines += ["", f"![xcopa]({plots['xcopa']})"]
        lines.append("")

    ppl = results.get("perplexity")
    if ppl:
        lines += ["## Perplexity", "",
                  f"Held-out text, lm-eval's rolling log-likelihood (windows of {ppl['max_seq_len']} tokens).", ""]
        rows = [[lang, r["documents"], r["tokens"], r["token_perplexity"], r["bits_per_byte"], r["word_perplexity"]]
                for lang, r in ppl["per_language"].items()]
        lines += _table(["lang", "docs", "tokens", "token ppl", "bits/byte", "word ppl"], rows)
        lines.append("")

    if "loss" in plots:
        lines += ["## Training loss", "", f"![loss]({plots['loss']})", ""]
    path = out / "report.md"
    paths.write_atomic(path, ("\n".join(lines) + "\n").encode("utf-8"))
    return path


def make_plots(out: Any, results: dict, metrics: Optional[Any]) -> dict[str, str]:
    """Every plot the results allow; returns name -> file name (relative to `out`)."""
    made = {}
    judge = results.get("judge")
    if judge and plot_win_tie_loss(out / "win_tie_loss.png", judge["per_language"],
                                   f"Ours vs {judge['opponent']} (judge {judge['endpoint']['model']})"):
        made["win_tie_loss"] = "win_tie_loss.png"
    fid = results.get("fidelity")
    if fid and plot_fidelity(out / "fidelity.png", fid["per_language"]):
        made["fidelity"] = "fidelity.png"
    xcopa = results.get("xcopa")
    if xcopa and plot_xcopa(out / "xcopa.png", xcopa["per_language"]):
        made["xcopa"] = "xcopa.png"
    if metrics is not None and metrics.is_file() and plot_loss(out / "loss.png", metrics):
        made["loss"] = "loss.png"
    return made
