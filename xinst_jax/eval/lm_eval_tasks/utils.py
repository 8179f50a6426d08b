"""XCOPA for lm-evaluation-harness from local files (`../shared/data/xcopa` in this project's
tests), prompted by lm-eval's own xcopa task functions, so that a run through our server is
scored exactly as lm-eval's `xcopa_<lang>` task scores it -- on the split the files hold (the
validation split: what eval_xinst scores; lm-eval's task would score the test split).

The directory comes from the task metadata: `metadata={"xcopa_dir": ...}` in
`lm_eval.simple_evaluate` / `TaskManager`, or `--metadata '{"xcopa_dir": "..."}'` on the command
line. It holds lm-eval's layout `<lang>/<split>.<lang>.jsonl` (`xcopa_split`, default "val").
"""

# lm-eval's own prompt (premise without its final character + connector) and choices (first letter
# lower-cased): imported, not restated, so the comparison tests lm-eval's format.
from lm_eval.tasks.xcopa.utils import (
    doc_to_choice,
    doc_to_text_id,
    doc_to_text_sw,
    doc_to_text_ta,
    doc_to_text_th,
    doc_to_text_tr,
    doc_to_text_vi,
)

from xinst_jax.eval.benchmarks import read_xcopa, xcopa_file

__all__ = ["doc_to_choice", "doc_to_text_id", "doc_to_text_sw", "doc_to_text_ta", "doc_to_text_th", "doc_to_text_tr",
           "doc_to_text_vi", "local_xcopa"]


def local_xcopa(lang: str, xcopa_dir: str = "", xcopa_split: str = "val", **_metadata) -> dict:
    """lm-eval's `custom_dataset` hook: {"validation": the items of <xcopa_dir>/<lang>/<split>.<lang>.jsonl}."""
    import datasets

    if not xcopa_dir:
        raise ValueError("xinst_xcopa: set the task metadata xcopa_dir (lm-eval's --metadata) to the XCOPA directory")
    # eval_xinst's own reader: the same file layout, checks and errors (file:line, field), gs:// too
    docs = read_xcopa(xcopa_file(xcopa_dir, lang, xcopa_split), lang, key="xinst_xcopa metadata xcopa_dir")
    return {"validation": datasets.Dataset.from_list(docs)}
