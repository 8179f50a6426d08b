"""Evaluation of X-Instruction models (job `eval_xinst`, xinst_jax/eval/job.py):

    judge.py       pairwise judging over an OpenAI-compatible endpoint (the released prompt),
                   both answer orders, win / tie / loss, retries, a reply cache, token counts
    fidelity.py    share of answers in the requested language (py3langid), confusion table,
                   script mixing
    benchmarks.py  log-likelihood benchmarks through the engine's scoring: XCOPA as
                   lm-evaluation-harness runs it, perplexity per language on held-out text
    report.py      results.json -> report.md and PNG plots
"""
