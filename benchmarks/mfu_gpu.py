#!/usr/bin/env python
"""MFU of the trainer's own train step on one GPU, against a matmul-peak probe in the same run.

    python benchmarks/mfu_gpu.py                          # llama3_2_1b, 8 x 2048 tokens, bf16, ~4 min on an H200
    python benchmarks/mfu_gpu.py --attention cudnn --batch 16 --remat dots_saveable

What runs: `build_train_program(cfg).step_fn` -- forward, backward, global-norm clipping, AdamW,
the state donated -- exactly as train/loop.py runs it, on synthetic packed rows (no TensorFlow, no
data on disk). Parameters and optimizer state are float32, compute bfloat16 (mixed precision, as
MaxText trains). Per attention implementation (`--attention`, comma-separated) it compiles, warms
up, then times `--steps` steps dispatched back to back and waits once at the end.

MFU is MaxText's: model FLOPs per step (`training_flops_per_step`: 6 x params-in-matmuls x tokens
plus causal attention) / step time / peak. Two peaks: the vendor's dense bf16 figure for the chip,
and a bf16 8192^3 matmul measured in this run (what the chip gives a plain GEMM here).

Before timing, the cuDNN kernel is checked against the XLA reference on packed bf16 rows (outputs
and gradients), so a fast wrong kernel cannot pass.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from xinst_jax.config import load_config  # noqa: E402
from xinst_jax.data.synthetic import SyntheticSource  # noqa: E402
from xinst_jax.model.attention import gqa_attention, sdpa_attention, segment_bias, segment_causal_mask  # noqa: E402
from xinst_jax.model.llama import count_params  # noqa: E402
from xinst_jax.train.flops import device_peak_flops, training_flops_per_step  # noqa: E402
from xinst_jax.train.program import build_train_program  # noqa: E402
from xinst_jax.train.step import init_state  # noqa: E402


def matmul_peak(size: int = 8192, repeats: int = 20) -> float:
    """bf16 FLOP/s of a square matmul on random data (zeros run faster than real data do)."""
    a = jax.random.normal(jax.random.key(0), (size, size), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(1), (size, size), jnp.bfloat16)
    matmul = jax.jit(lambda x, y: x @ y)
    for _ in range(3):
        matmul(a, b).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times)


def check_cudnn(batch: int = 2, length: int = 2048, heads: int = 32, kv_heads: int = 8, head_dim: int = 64) -> str:
    """cuDNN flash attention vs the float32 XLA reference on packed bf16 rows: relative errors of
    the output and of the gradients (real tokens only, as the loss sees them)."""
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(batch, length, heads, head_dim)), jnp.bfloat16)
    k = jnp.asarray(rng.normal(size=(batch, kv_heads, length, head_dim)), jnp.bfloat16)
    v = jnp.asarray(rng.normal(size=(batch, kv_heads, length, head_dim)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
    seg = np.zeros((batch, length), np.int32)
    bounds = np.sort(rng.choice(np.arange(1, length), size=6, replace=False))
    for i, (lo, hi) in enumerate(zip([0, *bounds], [*bounds, length - 100])):
        seg[:, lo:max(lo, hi)] = i + 1  # documents, then 100 padding slots
    seg = jnp.asarray(seg)
    real = (seg != 0)[:, :, None, None]
    index = jnp.broadcast_to(jnp.arange(length), (batch, length))
    mask = segment_causal_mask(seg, seg, index, index)

    def reference(q, k, v):
        f32 = [x.astype(jnp.float32) for x in (q, k, v)]
        return gqa_attention(*f32, mask)

    def cudnn(q, k, v):
        return sdpa_attention(q, k, v, segment_bias(seg, q.dtype), implementation="cudnn").astype(jnp.float32)

    def rel(a, b):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        return float(np.linalg.norm(a - b) / np.linalg.norm(b))

    lines = []
    for name, fn in (("cudnn", cudnn),):
        out = jax.jit(fn)(q, k, v)
        ref = jax.jit(reference)(q, k, v)
        err = rel(jnp.where(real, out, 0), jnp.where(real, ref, 0))
        loss = lambda f: (lambda q, k, v: jnp.sum(jnp.where(real, f(q, k, v) * w, 0.0)))  # noqa: E731
        grads = jax.jit(jax.grad(loss(fn), argnums=(0, 1, 2)))(q, k, v)
        ref_grads = jax.jit(jax.grad(loss(reference), argnums=(0, 1, 2)))(q, k, v)
        gerr = [rel(g.astype(jnp.float32), r) for g, r in zip(grads, ref_grads)]
        ok = err < 1e-2 and max(gerr) < 2e-2 and np.isfinite(np.asarray(out)).all()
        lines.append(f"  {name} vs float32 reference, packed bf16 rows [{batch}, {length}, {heads}/{kv_heads} heads, "
                     f"{head_dim}]: output rel err {err:.2e}, grads dq {gerr[0]:.2e} dk {gerr[1]:.2e} "
                     f"dv {gerr[2]:.2e} -> {'OK' if ok else 'FAIL'}")
        if not ok:
            raise SystemExit("\n".join(lines))
    return "\n".join(lines)


def time_train_step(args, attention: str) -> dict:
    cfg = load_config("tiny_synthetic", overrides=[
        f"model.preset={args.preset}", "model.dtype=bfloat16", "model.param_dtype=float32",
        f"model.attention={attention}", f"model.remat={args.remat}", f"model.scan_layers={args.scan}",
        f"train.batch_size={args.batch}", f"train.seq_len={args.seq}", "train.warmup_steps=0", "train.learning_rate=3e-4",
        "data.source=synthetic", "data.synthetic.min_doc_len=256", "data.synthetic.max_doc_len=2048",
        "mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1", "mesh.num_devices=1", *args.set])
    program = build_train_program(cfg)
    state = jax.jit(functools.partial(init_state, cfg.model, program.optimizer),
                    out_shardings=program.state_sharding)(jax.random.key(cfg.seed))
    source = SyntheticSource(cfg.data.synthetic, cfg.model.vocab_size, args.batch, args.seq, cfg.seed)
    batches = [jax.device_put(source.batch_at(i), program.batch_sharding) for i in range(4)]
    start = time.perf_counter()
    compiled = program.step_fn.lower(state, batches[0]).compile()
    compile_s = time.perf_counter() - start
    for i in range(args.warmup):
        state, metrics = compiled(state, batches[i % 4])
    first_loss = float(metrics["loss"])
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        for i in range(args.steps):
            state, metrics = compiled(state, batches[i % 4])
        last_loss = float(metrics["loss"])  # waits for the last step
        times.append((time.perf_counter() - start) / args.steps)
    if args.trace:  # two more steps under the profiler (Perfetto trace.json.gz under args.trace)
        with jax.profiler.trace(args.trace):
            for i in range(2):
                state, metrics = compiled(state, batches[i % 4])
            float(metrics["loss"])
    stats = jax.devices()[0].memory_stats() or {}
    return {"attention": attention, "step_s": statistics.median(times), "compile_s": compile_s,
            "flops": training_flops_per_step(cfg.model, args.batch, args.seq), "params": count_params(cfg.model),
            "peak_gib": stats.get("peak_bytes_in_use", 0) / 2**30, "loss": (first_loss, last_loss)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="llama3_2_1b")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=10, help="steps per timed repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--attention", default="cudnn,xla", help="comma-separated: cudnn, xla, auto")
    parser.add_argument("--remat", default="none", choices=["none", "dots_saveable", "full"])
    parser.add_argument("--scan", default="true", choices=["true", "false"], help="model.scan_layers")
    parser.add_argument("--matmul-size", type=int, default=8192, help="side of the peak-probe matmul")
    parser.add_argument("--skip-check", action="store_true", help="skip the cuDNN-vs-reference check")
    parser.add_argument("--trace", default="", help="write a profile of two steps to this directory")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more config overrides")
    args = parser.parse_args()

    device = jax.devices()[0]
    print(f"machine: {device.device_kind} ({device.platform}), jax {jax.__version__}, "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}", flush=True)
    vendor = device_peak_flops(device)
    measured = matmul_peak(args.matmul_size)
    print(f"peak: vendor dense bf16 {vendor / 1e12 if vendor else float('nan'):.0f} TFLOP/s; "
          f"measured bf16 {args.matmul_size}^3 matmul {measured / 1e12:.0f} TFLOP/s", flush=True)
    if device.platform == "gpu" and "cudnn" in args.attention and not args.skip_check:
        print(check_cudnn(), flush=True)

    rows = []
    for attention in args.attention.split(","):
        try:
            r = time_train_step(args, attention)
        except Exception as e:  # one variant failing (e.g. a kernel this jax lacks) must not lose the others
            print(f"  {attention}: FAILED {type(e).__name__}: {str(e).splitlines()[0][:300]}", flush=True)
            continue
        achieved = r["flops"] / r["step_s"]
        r["mfu_vendor"] = achieved / vendor if vendor else float("nan")
        r["mfu_measured"] = achieved / measured
        rows.append(r)
        print(f"  {attention}: {r['step_s'] * 1e3:.1f} ms/step, {achieved / 1e12:.0f} TFLOP/s, "
              f"MFU {r['mfu_vendor']:.1%} of vendor peak ({r['mfu_measured']:.1%} of measured), "
              f"compile {r['compile_s']:.0f} s, peak memory {r['peak_gib']:.1f} GiB, "
              f"loss {r['loss'][0]:.3f} -> {r['loss'][1]:.3f}", flush=True)

    if not rows:
        raise SystemExit("no variant ran")
    tokens = args.batch * args.seq
    print(f"\n{args.preset} ({rows[0]['params'] / 1e9:.2f}B params), {args.batch} x {args.seq} tokens/step, "
          f"bf16 compute, fp32 params + AdamW, remat={args.remat}, scan_layers={args.scan}, "
          f"{rows[0]['flops'] / 1e12:.1f} model TFLOP/step (MaxText formula), {device.device_kind}")
    print("| attention | ms/step | tokens/s | TFLOP/s | MFU (vendor peak) | MFU (measured matmul) | peak GiB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['attention']} | {r['step_s'] * 1e3:.1f} | {tokens / r['step_s']:,.0f} | "
              f"{r['flops'] / r['step_s'] / 1e12:.0f} | {r['mfu_vendor']:.1%} | {r['mfu_measured']:.1%} | "
              f"{r['peak_gib']:.1f} |")


if __name__ == "__main__":
    main()
