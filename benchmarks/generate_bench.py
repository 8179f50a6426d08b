#!/usr/bin/env python
"""Generation throughput on CPU: our engine vs transformers' `generate` (torch), SmolLM2-135M.

    python benchmarks/generate_bench.py                        # batch 8, exactly 128 new tokens, greedy
    python benchmarks/generate_bench.py --new-tokens 32 --repeats 1 --no-breakdown   # quick look

Both sides decode the same 8 prompts greedily and produce exactly --new-tokens tokens per row:
min_new_tokens = max_new_tokens on both sides (EOS is banned, as transformers'
MinNewTokensLengthLogitsProcessor does, so the greedy tokens are comparable too). One run measures both on the
same CPU: the timed repeats alternate ours/transformers so that load from other processes hits
both alike; the best (min) and median are reported. Reported separately: compile time (ours),
prefill time, and decode tokens/s (tokens after the first / decode time).

Prompts are left-padded to the next multiple of 16 (the engine's bucket; HF pads to the longest
prompt). Both sides run at both precisions, and the ratios that count are same precision:
- float32: our float32 weights + KV cache vs transformers' float32 model (the same numbers; the
  greedy tokens must agree, and do);
- bfloat16: our bfloat16 weights, compute and KV cache (`weight_dtype=bfloat16`) vs
  transformers' bfloat16 model, which is what transformers 5 runs by default for this checkpoint
  (`from_pretrained` takes the dtype named in its config.json, bfloat16 for SmolLM2).
transformers runs in its own process (two thread pools in one process fight over the cores) and
gets its best thread count: before every timed run a short probe at 1 thread and at all cores
picks one (on busy cores OpenMP's spin-waiting threads can crawl).

The last section relates each side's decode step time to the bytes a step must read (weights +
KV cache): batch-8 decoding is memory-bound, so bytes/step is what a dtype change buys. For
transformers it also times torch's F.linear over the same weights with nothing around it.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))  # hf_reference: the SmolLM2 loader shared with the tests

PROMPTS = [
    "The quick brown fox jumps over the lazy dog. Translate this sentence into French:",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Habari ya asubuhi! Ningependa kujifunza jinsi ya kupika wali na maharagwe.",
    "กรุงเทพมหานครเป็นเมืองหลวงของประเทศไทย",
    "پاکستان کا دارالحکومت اسلام آباد ہے۔",
    "Explain in simple terms why the sky is blue.",
    "List three advantages of learning a second language:",
    "Había una vez un pequeño pueblo en las montañas donde",
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2, help="timed generate calls per configuration")
    p.add_argument("--dtypes", default="float32,bfloat16", help="our weight (and KV-cache) dtypes to run")
    p.add_argument("--no-hf-bf16", dest="hf_bf16", action="store_false",
                   help="skip transformers' bfloat16 model (its default dtype for SmolLM2)")
    p.add_argument("--torch-threads", default="auto", help="'auto' (probe 1 and all cores) or a number")
    p.add_argument("--no-breakdown", action="store_true", help="skip the per-piece decode-step timing")
    p.add_argument("--xla-flags", default=None, help="XLA_FLAGS for this process (default: environment)")
    p.add_argument("--json", default="", help="also write the results here")
    p.add_argument("--hf-worker", action="store_true", help=argparse.SUPPRESS)  # the transformers side
    return p.parse_args(argv)


ARGS = parse_args()
if ARGS.xla_flags is not None:
    os.environ["XLA_FLAGS"] = ARGS.xla_flags

import jax  # noqa: E402

from xinst_jax.convert.hf import import_hf  # noqa: E402
from xinst_jax.infer.generate import Engine  # noqa: E402
from xinst_jax.infer.sampling import SamplingSettings  # noqa: E402
from machine import cpu_flags, cpu_model  # noqa: E402  (benchmarks/machine.py)
from worker_process import WorkerProcess, reply, requests  # noqa: E402


def mem_total_gb() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("nan")


def loadavg() -> str:
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except OSError:
        return "?"


class Measure:
    """Wall and process-CPU seconds of one call."""

    def __init__(self):
        self.wall = self.cpu = 0.0

    def __enter__(self):
        self._w, self._c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self._w
        self.cpu = time.process_time() - self._c


# --------------------------------------------------------------------------- the two sides


class Ours:
    def __init__(self, name, params, cfg, dtype, batch, n_new):
        self.name = name
        self.engine = Engine(params, cfg, batch_size=batch, buckets=tuple(range(16, 257, 16)), weight_dtype=dtype,
                             kv_dtype=dtype)
        # exactly n_new tokens, as transformers' min_new_tokens = max_new_tokens: EOS banned throughout
        self.settings = SamplingSettings(max_new_tokens=n_new, temperature=0.0, no_repeat_ngram=0,
                                         stop_token_ids=(cfg.eos_token_id,), min_new_tokens=n_new,
                                         pad_id=cfg.eos_token_id)
        self.weight_bytes = sum(x.nbytes for x in jax.tree.leaves(self.engine.params))
        self.runs: list[dict] = []

    def run(self, prompts) -> tuple[dict, list[list[int]]]:
        self.engine.timings.clear()
        with Measure() as m:
            out = self.engine.generate(prompts, self.settings)
        t = self.engine.timings
        rec = dict(wall=m.wall, cpu=m.cpu, prefill=sum(x.prefill_s for x in t), decode=sum(x.decode_s for x in t),
                   tokens=sum(len(x) for x in out.tokens), steps=max(x.steps for x in t), bucket=t[0].bucket)
        return rec, out.tokens


class HFWorker(WorkerProcess):
    """transformers in its own process (see worker_process.py), one side per precision."""

    def __init__(self, texts, n_new, eos, bf16: bool, threads: str):
        super().__init__(__file__, ROOT, dict(cmd="init", texts=texts, n=n_new, eos=eos, bf16=bf16, threads=threads))
        self.sides = [HFSide(self, "transformers fp32", "float32", self.info["weight_bytes"])]
        if bf16:
            self.sides.append(HFSide(self, "transformers bf16", "bfloat16", self.info["weight_bytes"] // 2))


class HFSide:
    def __init__(self, worker: HFWorker, name: str, dtype: str, weight_bytes: int):
        self.worker, self.name, self.dtype, self.weight_bytes = worker, name, dtype, weight_bytes
        self.runs: list[dict] = []

    def run(self, prompts=None) -> tuple[dict, list[list[int]]]:
        out = self.worker.call(dict(cmd="run", dtype=self.dtype))
        return out["rec"], out["tokens"]


def hf_worker() -> None:
    """The --hf-worker process: load SmolLM2 in torch, answer init/run/quit requests."""
    import torch
    from transformers import GenerationConfig

    from hf_reference import load_smollm2

    models, enc, n_new, eos = {}, None, 0, 0

    def generate(dtype, n):
        gc = GenerationConfig(do_sample=False, max_new_tokens=n, min_new_tokens=n, eos_token_id=eos, pad_token_id=eos,
                              num_beams=1)
        with torch.inference_mode():
            return models[dtype].generate(**enc, generation_config=gc)

    def probe_threads() -> dict:
        """8 new tokens at 1 thread and at all cores: which is faster right now (with other
        processes on the cores, OpenMP's spin-waiting threads can make 2 threads 10x slower)."""
        probe = {}
        for threads in sorted({1, os.cpu_count() or 1}):
            torch.set_num_threads(threads)
            generate("float32", 2)
            with Measure() as m:
                generate("float32", 8)
            probe[threads] = m.wall
        return probe

    def linear_chain_ms(model, batch: int, repeats: int = 5) -> float:
        """torch's own kernels on one decode step's weight matmuls (every nn.Linear of the model,
        in order, at [batch, in]; no attention or Python framework around them): min ms."""
        linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
        xs = {n: torch.ones(batch, n, dtype=linears[0].weight.dtype) for n in {m.in_features for m in linears}}
        best = float("inf")
        with torch.inference_mode():
            for i in range(repeats + 1):
                with Measure() as m:
                    for lin in linears:
                        torch.nn.functional.linear(xs[lin.in_features], lin.weight)
                best = min(best, m.wall) if i else best
        return 1e3 * best

    auto = False
    for msg in requests():
        if msg["cmd"] == "init":
            smol = load_smollm2()
            n_new, eos = msg["n"], msg["eos"]
            tok = smol.tokenizer
            tok.padding_side = "left"
            prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in msg["texts"]]
            enc = tok(msg["texts"], return_tensors="pt", padding=True, add_special_tokens=False)
            models["float32"] = smol.model.eval()
            if msg["bf16"]:
                models["bfloat16"] = copy.deepcopy(smol.model).to(torch.bfloat16).eval()
            auto = msg["threads"] == "auto"
            probe = probe_threads() if auto else {}
            threads = min(probe, key=probe.get) if auto else int(msg["threads"])
            torch.set_num_threads(threads)
            for dtype in models:
                generate(dtype, 2)  # warm-up
            reply(dict(prompts=prompts, threads=threads, probe=probe, directory=str(smol.directory),
                       weight_bytes=sum(p.numel() * p.element_size() for p in smol.model.parameters()),
                       torch=torch.__version__))
        elif msg["cmd"] == "chain":
            reply(dict(ms=linear_chain_ms(models[msg["dtype"]], msg["batch"])))
        elif msg["cmd"] == "run":
            dtype = msg["dtype"]
            probe = {}
            if auto:  # the load changes: choose the thread count again before every timed run
                probe = probe_threads()
                torch.set_num_threads(min(probe, key=probe.get))
            with Measure() as pre:
                generate(dtype, 1)
            with Measure() as m:
                out = generate(dtype, n_new)
            tokens = out[:, enc["input_ids"].shape[1]:].tolist()
            reply(dict(rec=dict(wall=m.wall, cpu=m.cpu, prefill=pre.wall, decode=max(m.wall - pre.wall, 1e-9),
                                tokens=sum(len(t) for t in tokens), threads=torch.get_num_threads(),
                                probe=probe), tokens=tokens))


def summarize(side, batch, n_new) -> dict:
    runs = side.runs
    best = min(runs, key=lambda r: r["wall"])
    med = statistics.median(r["wall"] for r in runs)
    dec_tokens = batch * (n_new - 1)
    return dict(name=side.name, tok_s=best["tokens"] / best["wall"], tok_s_median=best["tokens"] / med,
                prefill_s=min(r["prefill"] for r in runs), decode_tok_s=dec_tokens / min(r["decode"] for r in runs),
                wall_s=best["wall"], cpu_s=best["cpu"], weight_mb=side.weight_bytes / 1e6,
                step_ms=1e3 * min(r["decode"] for r in runs) / (n_new - 1), runs=runs)


def matched_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


# --------------------------------------------------------------------------- breakdown


def main(args) -> None:
    if args.hf_worker:
        hf_worker()
        return
    from importlib.metadata import version

    wall0 = time.perf_counter()
    cores = os.cpu_count() or 1
    b, n = args.batch, args.new_tokens
    texts = (PROMPTS * (b // len(PROMPTS) + 1))[:b]
    # transformers first (its worker also converts the GGUF on a first run); it then sleeps on stdin
    worker = HFWorker(texts, n, eos=2, bf16=args.hf_bf16, threads=args.torch_threads)
    info = worker.info
    print("== machine ==")
    print(f"cpu: {cpu_model()} | {cores} logical cores | {cpu_flags()} | {mem_total_gb():.0f} GiB RAM")
    print(f"python {platform.python_version()} | jax {jax.__version__} ({jax.devices()[0].platform}, "
          f"{jax.device_count()} device) | torch {info['torch']} (own process) | "
          f"transformers {version('transformers')}")
    print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r} | OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')} | "
          f"load average at start: {loadavg()} (other processes share these cores)")
    if info["probe"]:
        print("torch thread probe (8 new tokens): " + ", ".join(f"{k} thread(s) {v:.2f}s" for k, v in
                                                                info["probe"].items()) + f" -> using {info['threads']}")
    else:
        print(f"torch threads: {info['threads']}")

    cfg, params = import_hf(info["directory"])
    assert cfg.eos_token_id == 2
    prompts = info["prompts"]  # token ids from the HF tokenizer: both sides see the same tokens
    print(f"\nmodel: SmolLM2-135M-Instruct real weights | batch {b}, prompt lengths {[len(p) for p in prompts]}, "
          f"exactly {n} new tokens per row, greedy")
    sides_hf = worker.sides
    hf32 = sides_hf[0]

    # ---- ours: build + compile (first call) per dtype
    print("\n== compile (ours; first call = compile + one run) ==")
    ours = []
    for dtype in [d for d in args.dtypes.split(",") if d]:
        side = Ours(f"ours {'fp32' if dtype == 'float32' else 'bf16'} (weights+KV {dtype})", params, cfg, dtype, b, n)
        with Measure() as first:
            side.run(prompts)
        steady, _ = side.run(prompts)
        side.compile_s = max(first.wall - steady["wall"], 0.0)
        print(f"{side.name:36s} first call {first.wall:6.1f}s, steady {steady['wall']:6.1f}s -> compile ~"
              f"{side.compile_s:.1f}s (prefill + decode loop, bucket {steady['bucket']})")
        ours.append(side)
    # ---- timed, alternating
    print(f"\n== timed: {args.repeats} repeat(s), alternating ours / transformers (load avg {loadavg()}) ==")
    tokens = {}
    for r in range(args.repeats):
        for side in ours + sides_hf:
            rec, toks = side.run(prompts)
            side.runs.append(rec)
            tokens[side.name] = toks
            threads = f"  torch threads {rec['threads']}" if "threads" in rec else ""
            print(f"  [{r}] {side.name:36s} {rec['tokens'] / rec['wall']:7.1f} tok/s  wall {rec['wall']:6.2f}s "
                  f"(prefill {rec['prefill']:.2f}s)  cpu {rec['cpu']:6.2f}s  load {loadavg()}{threads}", flush=True)
            assert rec["tokens"] == b * n, (side.name, rec["tokens"])

    results = [summarize(s, b, n) for s in ours + sides_hf]
    print(f"\n== results (best of {args.repeats}; batch {b}, {n} new tokens/row) ==")
    print(f"  {'':36s} {'tok/s':>8s} {'(median)':>9s} {'prefill s':>10s} {'decode tok/s':>13s} {'ms/step':>8s} "
          f"{'cpu s':>7s} {'weights MB':>11s}")
    for res in results:
        print(f"  {res['name']:36s} {res['tok_s']:8.1f} {res['tok_s_median']:9.1f} {res['prefill_s']:10.3f} "
              f"{res['decode_tok_s']:13.1f} {res['step_ms']:8.1f} {res['cpu_s']:7.1f} {res['weight_mb']:11.0f}")
    print("\n== ratios (generated tokens/s, best vs best) ==")
    for o in results[:len(ours)]:
        for h in results[len(ours):]:
            same = "  <- same precision" if o["name"].split()[1] == h["name"].split()[1] else ""
            print(f"  {o['name']:36s} / {h['name']:20s} = {o['tok_s'] / h['tok_s']:.2f}x   "
                  f"(decode {o['decode_tok_s'] / h['decode_tok_s']:.2f}x, "
                  f"median {o['tok_s_median'] / h['tok_s_median']:.2f}x){same}")

    ref = tokens[hf32.name]
    print("\n== greedy agreement with transformers fp32 (matched prefix per row, of %d) ==" % n)
    for side in ours:
        m = [matched_prefix(a, c) for a, c in zip(tokens[side.name], ref)]
        print(f"  {side.name:36s} {m}")

    if not args.no_breakdown:
        print("\n== bytes a decode step must read (weights + KV cache at the last step) ==")
        slots = ours[0].runs[0]["bucket"] + n
        for o, side in zip(results, ours):
            kv_bytes = 2 * cfg.num_layers * b * cfg.num_kv_heads * slots * cfg.head_dim * side.engine.kv_dtype.itemsize
            print(f"  {side.name}: weights {side.weight_bytes / 1e6:.0f} MB + KV cache <= {kv_bytes / 1e6:.0f} MB "
                  f"per step -> {(side.weight_bytes + kv_bytes) / o['step_ms'] / 1e6:.2f} GB/s at "
                  f"{o['step_ms']:.1f} ms/step (decode average)")
        for h, side in zip(results[len(ours):], sides_hf):
            chain = worker.call(dict(cmd="chain", dtype=side.dtype, batch=b))["ms"]
            print(f"  {h['name']}: weights {h['weight_mb']:.0f} MB per step -> "
                  f"{h['weight_mb'] / h['step_ms']:.2f} GB/s at {h['step_ms']:.1f} ms/step (decode average)")
            print(f"    {'torch F.linear alone over the same weights':44s} {chain:8.1f}")
    worker.close()
    print(f"\nload average at end: {loadavg()} | total wall time {time.perf_counter() - wall0:.0f}s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(results=results, torch_threads=info["threads"], batch=b, new_tokens=n, cpu=cpu_model(),
                           cores=cores), f, indent=2, default=str)


if __name__ == "__main__":
    main(ARGS)
