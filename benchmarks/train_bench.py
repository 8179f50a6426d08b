#!/usr/bin/env python
"""Train step against a torch eager train step of the same model, batch and optimizer; and MFU.

    python benchmarks/train_bench.py                              # smollm2_135m, 4 x 256 tokens, fp32
    python benchmarks/train_bench.py --preset tiny --batch 8 --seq 128 --steps 10
    python benchmarks/train_bench.py --set model.scan_layers=false --trace /tmp/trace

Ours: the trainer's own jitted step from the public API (`build_train_program(cfg).step_fn`, state
from `init_state` placed on the program's shardings, as train/loop.py does): forward, backward,
global-norm clipping and AdamW, state donated. Baseline: a torch eager step of the same shape:
`transformers.LlamaForCausalLM` (random init, HF's default attention, sdpa) given the same
packed-segment causal mask (4D) and positions, the same loss (token cross-entropy weighted by the
loss weights, divided by their sum), `clip_grad_norm_` to the same max norm and `torch.optim.AdamW`
with the same lr, betas, eps and weight decay, decay skipped on the same parameter-name substrings
(`train.weight_decay_exclude`). Both run fp32 on the same synthetic batch at a constant learning
rate (torch has no schedule; ours costs the same with one), so their losses should track each other.
On a CPU, torch gets as many intra-op threads as XLA:CPU uses (the cores this process may run on);
when jax runs on a GPU (JAX_PLATFORMS=cuda), torch runs on CUDA with TF32 matmuls, XLA's default.

After `--warmup` steps each (ours compiles first), the two steps run alternately `--steps` times,
so both see the same machine load; ratio = torch ms / ours ms (median, and best step), above 1
means ours is faster. Other work on the same cores slows torch's OpenMP threads much more than
XLA's pool, so the load average is printed: trust figures from a quiet machine. Model FLOPs follow
MaxText (`training_flops_per_step`), and the MFU uses the best fp32 matmul FLOP/s measured in this
run as the peak. `--trace DIR` runs one more step of ours under jax.profiler and sums its XLA ops
by category; `--breakdown` times our forward, forward+backward and optimizer update jitted apart.
"""

from __future__ import annotations

import argparse
import collections
import functools
import glob
import gzip
import json
import os
import platform
import re
import statistics
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from xinst_jax.config import load_config  # noqa: E402
from xinst_jax.data.synthetic import SyntheticSource  # noqa: E402
from xinst_jax.train.flops import measured_matmul_peak, training_flops_per_step  # noqa: E402
from xinst_jax.train.program import build_train_program  # noqa: E402
from xinst_jax.train.step import init_state  # noqa: E402
from machine import cpu_flags, cpu_model  # noqa: E402


def usable_cores() -> int:
    """Cores this process may run on: what XLA:CPU sizes its thread pool to, given to torch too."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def load_average() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "?"


# --------------------------------------------------------------------------- ours


def build_ours(cfg) -> dict:
    """The trainer's jitted step and its step-0 state, built as train/loop.py builds them."""
    program = build_train_program(cfg)
    state = jax.jit(functools.partial(init_state, cfg.model, program.optimizer),
                    out_shardings=program.state_sharding)(jax.random.key(cfg.seed))
    return {"program": program, "state": state}


def run_ours(ours: dict, batch) -> float:
    ours["state"], metrics = ours["program"].step_fn(ours["state"], batch)
    return float(jax.device_get(metrics["loss"]))  # waits for the step


# --------------------------------------------------------------------------- torch


def build_torch(cfg, threads: int, attn_impl: str | None, device: str) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(threads)
    if device == "cuda":  # XLA:GPU's default fp32 matmul precision uses TF32: let torch do the same
        torch.set_float32_matmul_precision("high")
    torch.manual_seed(cfg.seed)
    m = cfg.model
    if m.rope_scaling.type not in ("", "none", None):
        print(f"  note: the torch model uses plain RoPE (ours: {m.rope_scaling.type} scaling; same cost)")
    hf_cfg = LlamaConfig(
        vocab_size=m.vocab_size, hidden_size=m.embed_dim, intermediate_size=m.mlp_dim,
        num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads, num_key_value_heads=m.num_kv_heads,
        head_dim=m.head_dim, max_position_embeddings=m.max_seq_len, rms_norm_eps=m.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": m.rope_theta}, tie_word_embeddings=m.tie_embeddings,
        attention_bias=False, mlp_bias=False, hidden_act="silu", initializer_range=m.init_std,
        bos_token_id=m.bos_token_id, eos_token_id=m.eos_token_id, pad_token_id=m.pad_token_id,
        use_cache=False, torch_dtype="float32")
    if attn_impl:
        hf_cfg._attn_implementation = attn_impl
    model = LlamaForCausalLM(hf_cfg).float().to(device).train()
    t = cfg.train
    decay, no_decay = [], []
    for name, p in model.named_parameters():  # named_parameters lists a tied weight once
        (no_decay if any(s in name for s in t.weight_decay_exclude) else decay).append(p)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=t.learning_rate, betas=(t.b1, t.b2), eps=t.eps)
    return {"torch": torch, "model": model, "optimizer": optimizer, "clip": t.clip_grad_norm, "device": device,
            "attn": model.config._attn_implementation, "n_decay": len(decay), "n_no_decay": len(no_decay),
            "params": sum(p.numel() for p in model.parameters()), "phases": []}


def torch_batch(torch, batch: dict, device: str) -> dict:
    """The same batch for HF: positions as position_ids and the segment-causal mask as a 4D bool mask
    (True = attend). Padding queries attend to themselves only (they carry no loss and no real token
    attends to them) so their softmax rows stay finite; ours gives them a uniform row instead."""
    seg = torch.from_numpy(np.asarray(batch["segment_ids"]).astype(np.int64))
    t = seg.shape[1]
    causal = torch.tril(torch.ones(t, t, dtype=torch.bool))
    mask = (seg[:, :, None] == seg[:, None, :]) & (seg != 0)[:, :, None] & causal
    mask |= torch.eye(t, dtype=torch.bool)
    tensors = {"input_ids": torch.from_numpy(np.asarray(batch["inputs"]).astype(np.int64)),
               "position_ids": torch.from_numpy(np.asarray(batch["positions"]).astype(np.int64)),
               "attention_mask": mask[:, None, :, :],
               "targets": torch.from_numpy(np.asarray(batch["targets"]).astype(np.int64)),
               "loss_weights": torch.from_numpy(np.asarray(batch["loss_weights"]).astype(np.float32))}
    return {k: v.to(device) for k, v in tensors.items()}


def run_torch(tm: dict, tb: dict) -> float:
    torch, model, optimizer = tm["torch"], tm["model"], tm["optimizer"]
    t0 = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    logits = model(input_ids=tb["input_ids"], position_ids=tb["position_ids"],
                   attention_mask=tb["attention_mask"], use_cache=False).logits
    weights = tb["loss_weights"]
    ce = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tb["targets"].reshape(-1),
                                           reduction="none")
    loss = (ce * weights.reshape(-1)).sum() / weights.sum().clamp(min=1.0)
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    if tm["clip"] > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), tm["clip"])
    optimizer.step()
    value = loss.item()  # waits for the step (on a GPU, the forward/backward split is launch time only)
    tm["phases"].append((t1 - t0, t2 - t1, time.perf_counter() - t2))
    return value


# --------------------------------------------------------------------------- profile of ours

# XLA:CPU op names in a profiler trace -> a coarse category. Order matters: first match wins.
OP_CATEGORIES = [
    ("matmul (dot / YNNPACK fusions)", re.compile(r"^(ynn_fusion|dot|.*gemm|.*matmul|.*convolution)")),
    ("scan slicing (dynamic-(update-)slice)", re.compile(r"dynamic-(update-)?slice")),
    ("copies / transposes", re.compile(r"copy|transpose")),
    ("broadcasts", re.compile(r"broadcast")),
    ("reductions", re.compile(r"reduce")),
]
NOT_OPS = re.compile(r"^(ThunkExecutor|ThreadpoolListener|SlinkyThreadPool|end: |while$|call$|conditional$)")


def summarize_trace(trace_dir: str, top: int = 8) -> list[str]:
    """Op time by category and the top ops, summed over XLA's CPU threads (thread-time, not wall)."""
    files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True))
    if not files:
        return ["  (no trace.json.gz written)"]
    events = json.load(gzip.open(files[-1]))["traceEvents"]
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    per_op: collections.Counter = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and threads.get((e["pid"], e["tid"]), "").startswith("tf_XLA"):
            op = re.sub(r"\.\d+$", "", e["name"])
            if not NOT_OPS.match(op):
                per_op[op] += e["dur"]
    total = sum(per_op.values()) or 1.0
    per_cat: collections.Counter = collections.Counter()
    for op, dur in per_op.items():
        per_cat[next((name for name, rx in OP_CATEGORIES if rx.search(op)), "other elementwise fusions")] += dur
    lines = [f"  profile of our step (XLA op thread-time {total / 1e6:.2f}s, {files[-1]}):"]
    lines += [f"    {name:38s} {dur / total:6.1%}" for name, dur in per_cat.most_common()]
    lines.append("    top ops: " + ", ".join(f"{op} {dur / total:.0%}" for op, dur in per_op.most_common(top)))
    return lines


def breakdown_ours(cfg, ours: dict, batch, repeats: int) -> list[str]:
    """Our forward (+loss), forward+backward and optimizer update, each jitted alone (XLA fuses
    across them in the real step, so they need not add up). Unlike the comparison, this uses the
    model's and the step's module-level functions, which may move as the model changes."""
    import optax

    from xinst_jax.model.llama import forward, split_trainable
    from xinst_jax.train.loss import weighted_cross_entropy
    from xinst_jax.train.step import loss_and_grads

    def timed(fn, *args):
        out = jax.block_until_ready(fn(*args))
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times.append(time.perf_counter() - start)
        return statistics.median(times), out

    params, opt_state = ours["state"]["params"], ours["state"]["opt_state"]
    optimizer = ours["program"].optimizer

    def loss(p, b):
        logits = forward(p, b["inputs"], b["positions"], b["segment_ids"], cfg.model)
        return weighted_cross_entropy(logits, b["targets"], b["loss_weights"], cfg.train.z_loss)[0]

    def update(grads, opt_state, params):
        trainable = split_trainable(params, cfg.model)[0]
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state

    fwd, _ = timed(jax.jit(loss), params, batch)
    fb, (_, grads) = timed(jax.jit(lambda p, b: loss_and_grads(p, b, cfg.model, cfg.train)), params, batch)
    upd, _ = timed(jax.jit(update), grads, opt_state, params)
    return [f"  our parts, jitted alone (median of {repeats}): forward+loss {fwd * 1e3:.0f} ms | forward+backward "
            f"{fb * 1e3:.0f} ms (backward ~{(fb - fwd) * 1e3:.0f} ms, {(fb - fwd) / max(fwd, 1e-9):.2f}x forward) | "
            f"clip+AdamW update {upd * 1e3:.0f} ms"]


# --------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="smollm2_135m", help="model preset (configs/models/NAME.yaml)")
    parser.add_argument("--batch", type=int, default=4, help="rows per step")
    parser.add_argument("--seq", "--seq-len", dest="seq", type=int, default=256, help="tokens per row")
    parser.add_argument("--steps", type=int, default=5, help="timed steps of each side (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps of each side first (ours: +compile)")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: the cores XLA uses)")
    parser.add_argument("--torch-attn", default="", help="HF attn_implementation for torch (default: HF's, sdpa)")
    parser.add_argument("--no-torch", action="store_true", help="time ours only (MFU)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for ours, e.g. model.scan_layers=false (repeatable)")
    parser.add_argument("--trace", metavar="DIR", help="profile one more step of ours into DIR and summarise it")
    parser.add_argument("--breakdown", action="store_true", help="also time our forward/backward/update apart")
    parser.add_argument("--peak-sizes", type=int, nargs="+", default=[1024, 2048],
                        help="square fp32 matmul sizes for the measured peak (best is taken)")
    args = parser.parse_args()

    t_start = time.perf_counter()
    cores = usable_cores()
    threads = args.threads or cores
    cfg = load_config("tiny_synthetic", [f"model.preset={args.preset}", f"train.batch_size={args.batch}",
                                         f"train.seq_len={args.seq}", "model.dtype=float32",
                                         "model.param_dtype=float32", "train.steps=1000", "train.warmup_steps=0",
                                         "train.schedule=constant", *args.set])
    devices = jax.devices()
    versions = (f"python {platform.python_version()} | jax {jax.__version__} (jaxlib {jax.lib.__version__}, "
                f"{len(devices)} {devices[0].platform} device: {devices[0].device_kind})")
    if not args.no_torch:
        import torch
        import transformers

        versions += f" | torch {torch.__version__} | transformers {transformers.__version__}"
    print(f"machine: {cpu_model()} | {os.cpu_count()} logical cores, {cores} usable | {cpu_flags()} | "
          f"{platform.system()} {platform.machine()}")
    print(f"versions: {versions}")
    print(f"load average at start: {load_average()} (other work on the cores slows torch's OpenMP threads more "
          "than XLA's pool: compare figures from a quiet machine)")
    if len(devices) != 1:
        print("warning: more than one device; the comparison is meant for one device", file=sys.stderr)
    on_gpu = devices[0].platform == "gpu"
    peak = max(measured_matmul_peak(size, repeats=5) for size in args.peak_sizes)

    m, t = cfg.model, cfg.train
    tokens = args.batch * args.seq
    flops = training_flops_per_step(m, args.batch, args.seq)
    print(f"\n[{args.preset}] vocab {m.vocab_size}, embed {m.embed_dim}, {m.num_layers} layers, {m.num_heads} heads "
          f"/ {m.num_kv_heads} kv x {m.head_dim}, mlp {m.mlp_dim}, tied {m.tie_embeddings} | batch {args.batch} x "
          f"seq {args.seq} = {tokens} tokens, fp32 | AdamW lr {t.learning_rate} betas ({t.b1}, {t.b2}) eps {t.eps} "
          f"wd {t.weight_decay} (not on {t.weight_decay_exclude}), clip {t.clip_grad_norm}")
    print(f"  ours: scan_layers {m.scan_layers}, remat {m.remat}, grad_accum {t.grad_accum}"
          + (f", overrides {args.set}" if args.set else ""))

    source = SyntheticSource(cfg.data.synthetic, m.vocab_size, args.batch, args.seq, seed=cfg.seed)
    host_batch = source.batch_at(0)
    ours = build_ours(cfg)
    batch = jax.device_put({k: np.asarray(v) for k, v in host_batch.items()}, ours["program"].batch_sharding)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(ours["state"]["params"]))
    start = time.perf_counter()
    loss0_ours = run_ours(ours, batch)
    compile_s = time.perf_counter() - start
    print(f"  ours: {n_params / 1e6:.1f}M params | first step (compile + run) {compile_s:.1f}s | loss {loss0_ours:.4f}")

    tm = tb = None
    if not args.no_torch:
        tm = build_torch(cfg, threads, args.torch_attn or None, "cuda" if on_gpu else "cpu")
        tb = torch_batch(tm["torch"], host_batch, tm["device"])
        start = time.perf_counter()
        loss0_torch = run_torch(tm, tb)
        where = ("cuda, TF32 matmuls as XLA:GPU's default" if on_gpu else
                 f"{threads} intra-op threads (torch.set_num_threads; XLA:CPU uses the {cores} usable cores)")
        print(f"  torch: {tm['params'] / 1e6:.1f}M params | eager, attn {tm['attn']} | {where} | AdamW groups: "
              f"{tm['n_decay']} decayed, {tm['n_no_decay']} not | first step {time.perf_counter() - start:.1f}s | "
              f"loss {loss0_torch:.4f}")
        if tm["params"] != n_params:
            print(f"  warning: parameter counts differ ({n_params} ours, {tm['params']} torch)")

    for _ in range(args.warmup):
        run_ours(ours, batch)
        if tm:
            run_torch(tm, tb)
    if tm:
        tm["phases"].clear()
    ours_times, torch_times = [], []
    print(f"  timing {args.steps} steps of each, alternating ...", flush=True)
    for _ in range(args.steps):
        start = time.perf_counter()
        loss_ours = run_ours(ours, batch)
        ours_times.append(time.perf_counter() - start)
        if tm:
            start = time.perf_counter()
            loss_torch = run_torch(tm, tb)
            torch_times.append(time.perf_counter() - start)

    trace_lines, parts_lines = [], []
    if args.trace:
        path = os.path.join(args.trace, args.preset)
        with jax.profiler.trace(path):
            run_ours(ours, batch)
        trace_lines = summarize_trace(path)
    if args.breakdown:
        parts_lines = breakdown_ours(cfg, ours, batch, max(1, min(args.steps, 3)))

    peak = max(peak, *(measured_matmul_peak(size, repeats=5) for size in args.peak_sizes))
    ours_s = statistics.median(ours_times)
    print(f"\nresults (median of {args.steps}; min-max in brackets):")
    print(f"  ours  {ours_s * 1e3:9.1f} ms/step [{min(ours_times) * 1e3:.0f}-{max(ours_times) * 1e3:.0f}] | "
          f"{tokens / ours_s:8,.0f} tokens/s | loss after {len(ours_times) + args.warmup + 1} steps {loss_ours:.4f}")
    if tm:
        torch_s = statistics.median(torch_times)
        fwd, bwd, opt = (statistics.median(p) * 1e3 for p in zip(*tm["phases"]))
        print(f"  torch {torch_s * 1e3:9.1f} ms/step [{min(torch_times) * 1e3:.0f}-{max(torch_times) * 1e3:.0f}] | "
              f"{tokens / torch_s:8,.0f} tokens/s | loss after {len(torch_times) + args.warmup + 1} steps "
              f"{loss_torch:.4f} | forward+loss {fwd:.0f} ms, backward {bwd:.0f} ms, clip+AdamW {opt:.0f} ms")
        print(f"  ratio (torch ms / ours ms; >1 = ours faster): {torch_s / ours_s:.2f}x median, "
              f"{min(torch_times) / min(ours_times):.2f}x best step")
    print(f"  MFU of ours: {flops / 1e9:.1f} GFLOP/step (MaxText count) / {ours_s * 1e3:.1f} ms = "
          f"{flops / ours_s / 1e9:.1f} GFLOP/s = {flops / ours_s / peak:.1%} of the measured fp32 matmul peak "
          f"{peak / 1e9:.1f} GFLOP/s" + (f" (torch: {flops / torch_s / peak:.1%})" if tm else ""))
    for line in parts_lines + trace_lines:
        print(line)
    print(f"load average at end: {load_average()} | total benchmark time {time.perf_counter() - t_start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
