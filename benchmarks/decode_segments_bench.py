#!/usr/bin/env python
"""Decode-loop segments vs one full-length KV cache, same engine, same run.

    python benchmarks/decode_segments_bench.py                              # 384 new tokens after 200-token prompts
    python benchmarks/decode_segments_bench.py --new-tokens 128 --prompt-len 72
    python benchmarks/decode_segments_bench.py --layers 2 --batch 2 --new-tokens 70 --prompt-len 40 --repeats 1

Attention reads every slot of the cache it is given. With one cache sized for the whole
generation (`max_segments=1`, the baseline), every step reads the empty tail too. With segments,
each part of the loop reads a cache that ends just past the slots it writes (xinst_jax/infer/
generate.py). Both engines decode the same batch greedily, alternating; how many leading tokens
per row agree is printed (attention sums over a different number of masked slots, so float
rounding differs, and random weights give near-tied logits that such rounding can flip; the
tests check exact equality on a model without near-ties). The model is the SmolLM2-135M shape
with random weights: speed does not depend on the values, and nothing is downloaded.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from machine import machine_summary  # noqa: E402  (benchmarks/machine.py)
from xinst_jax.config import model_preset  # noqa: E402
from xinst_jax.infer.generate import Engine  # noqa: E402
from xinst_jax.infer.sampling import SamplingSettings  # noqa: E402
from xinst_jax.model.llama import init_params  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=200, help="longest prompt (the others are 5 tokens shorter each)")
    p.add_argument("--new-tokens", type=int, default=384)
    p.add_argument("--segments", type=int, default=4, help="max_segments of the segmented engine")
    p.add_argument("--dtype", default="bfloat16", help="weights and KV cache")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--layers", type=int, default=None, help="num_layers (default: the preset's 30; smoke runs)")
    args = p.parse_args()

    cfg = model_preset("smollm2_135m", **({} if args.layers is None else {"num_layers": args.layers}))
    params = init_params(cfg, jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, cfg.vocab_size, size=max(1, args.prompt_len - 5 * i)).tolist()
               for i in range(args.batch)]
    n = args.new_tokens
    settings = SamplingSettings(max_new_tokens=n, temperature=0.0, no_repeat_ngram=0, stop_token_ids=(cfg.eos_token_id,),
                                min_new_tokens=n, pad_id=cfg.eos_token_id)  # exactly n tokens per row
    engines = {k: Engine(params, cfg, batch_size=args.batch, buckets=tuple(range(16, 4097, 16)),
                         weight_dtype=args.dtype, kv_dtype=args.dtype, max_segments=k)
               for k in (1, args.segments)}
    print(f"machine: {machine_summary()}")
    layers = "" if args.layers is None else f" ({cfg.num_layers} layers)"
    print(f"SmolLM2-135M shape{layers}, random {args.dtype} weights + KV cache | batch {args.batch}, prompts "
          f"{min(len(x) for x in prompts)}-{max(len(x) for x in prompts)} tokens, {n} new tokens")
    reference = {k: e.generate(prompts, settings).tokens for k, e in engines.items()}  # compiles
    same = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(x))
            for x, y in zip(reference[1], reference[args.segments])]
    print(f"tokens equal to the one-cache run, per row (of {n}): {same}")
    decode: dict[int, list[float]] = {k: [] for k in engines}
    for _ in range(args.repeats):
        for k, engine in engines.items():
            engine.timings.clear()
            engine.generate(prompts, settings)
            decode[k].append(engine.timings[0].decode_s)
    ms = {k: 1e3 * min(v) / (n - 1) for k, v in decode.items()}
    for k, engine in engines.items():
        ends = engine.segment_ends(n)
        bucket = engine.timings[0].bucket
        lengths = [engine.cache_length(bucket, e) for e in ends]
        print(f"  max_segments={k}: cache lengths {lengths} | decode {ms[k]:.1f} ms/step "
              f"(median {1e3 * statistics.median(decode[k]) / (n - 1):.1f})")
    print(f"segmented / one cache: {ms[1] / ms[args.segments]:.2f}x faster per decode step")


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"total {time.perf_counter() - t0:.0f}s")
