#!/usr/bin/env python
"""Compile a config's train step, or one inference decode step, for a TPU topology on this (CPU)
machine, before paying for a pod.

    pip install -e '.[tpu]'     # libtpu, which carries the TPU compiler
    python launch/aot_check.py --config sft_xinst --topology v5p:2x2x2 [--set key=value ...]
    python launch/aot_check.py --mode decode --config sft_xinst --topology v5e:2x4 --batch 64 \\
        --context 2048 --set mesh.fsdp=1 --set mesh.tensor=8

Train mode prints the per-chip memory the compiled step needs (arguments, outputs, temporaries,
code) against the chip's HBM, and XLA's FLOP count against MaxText's formula.

Decode mode builds what the inference Engine (xinst_jax/infer/generate.py) runs once per
generated token: its weight layout (LoRA merged, layers unstacked, cast to the served dtype) and
shardings, and one call of the model's `hidden` + `logits` with a KV cache of `--context` slots
for one new token per row, the cache donated (updated in place, as the Engine's decode loop
carries it). It prints per chip the weight bytes, the KV-cache bytes, the bytes the step accesses
by XLA's cost analysis, their ratio, the step time that implies at the chip's HBM bandwidth
(decode is bandwidth-bound: every weight and every cache slot is read once per token), XLA's FLOP
count against the matmul formula (they agree only if every layer is counted), and the compiled
step's memory against the chip's HBM. Bytes accessed are counted on the step compiled without
memory-space assignment: with it, operands are staged in on-chip VMEM and the TPU cost analysis
counts them again for the copy in and the read from VMEM, so only without it is the count the
step's HBM traffic (both counts are printed). A ratio above `--max-ratio` fails.

Exit code 1 when the step does not fit (or, in decode mode, reads too much), 2 on a usage error.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Per chip: HBM capacity in bytes and HBM bandwidth in bytes/s, from Google Cloud's TPU system
# architecture pages (cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e):
#   v4   32 GiB  1200 GB/s      v5e  16 GB  819 GB/s
#   v5p  95 GB   2765 GB/s      v6e  32 GB  1638 GB/s
HBM_BYTES = {"v4": 32 << 30, "v5e": 16 << 30, "v5litepod": 16 << 30, "v5p": 95 << 30, "v6e": 32 << 30}
HBM_BANDWIDTH = {"v4": 1200e9, "v5e": 819e9, "v5litepod": 819e9, "v5p": 2765e9, "v6e": 1638e9}
GIB = 1 << 30


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--topology", required=True, help="e.g. v5e:2x2, v5e:2x4, v4:2x2x2, v5p:4x4x4")
    parser.add_argument("--mode", choices=("train", "decode"), default="train")
    parser.add_argument("--batch", type=int, default=64, help="decode: rows decoded together")
    parser.add_argument("--context", type=int, default=2048, help="decode: KV-cache slots per row")
    parser.add_argument("--weight-dtype", default="bfloat16", choices=("bfloat16", "float32"),
                        help="decode: the served weights' dtype (the Engine's weight_dtype)")
    parser.add_argument("--kv-dtype", default="bfloat16", choices=("bfloat16", "float32"),
                        help="decode: the KV cache's dtype (the Engine's kv_dtype)")
    parser.add_argument("--max-ratio", type=float, default=1.3,
                        help="decode: most bytes accessed per step / (weight + KV-cache bytes) that passes")
    parser.add_argument("--dump-hlo", metavar="FILE", help="decode: write the compiled step's HLO here")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")  # quiets libtpu's host discovery

    from jax.experimental import topologies

    from xinst_jax.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        topology = topologies.get_topology_desc(topology_name=args.topology, platform="tpu")
    except Exception as e:  # noqa: BLE001 - no libtpu, unknown topology
        print(f"error: cannot describe TPU topology {args.topology!r}: {e}\n(install the `tpu` extra: "
              "pip install -e '.[tpu]')", file=sys.stderr)
        return 2
    generation = args.topology.split(":")[0]
    try:
        if args.mode == "decode":
            return check_decode(cfg, topology, generation, args)
        return check_train(cfg, topology, generation, args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _memory_used(memory) -> int:
    return (memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
            + memory.generated_code_size_in_bytes - memory.alias_size_in_bytes)


def _memory_line(memory, hbm: int | None) -> str:
    return (f"per chip: arguments {memory.argument_size_in_bytes / GIB:.2f} GiB, outputs "
            f"{memory.output_size_in_bytes / GIB:.2f} GiB (aliased {memory.alias_size_in_bytes / GIB:.2f}), "
            f"temporaries {memory.temp_size_in_bytes / GIB:.2f} GiB, code "
            f"{memory.generated_code_size_in_bytes / GIB:.3f} GiB -> {_memory_used(memory) / GIB:.2f} GiB"
            + (f" of {hbm / GIB:.0f} GiB HBM" if hbm else ""))


def _cost(compiled) -> dict:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return dict(cost or {})


def check_train(cfg, topology, generation: str, args) -> int:
    import jax
    import numpy as np

    from xinst_jax.data.batch import BATCH_KEYS
    from xinst_jax.model.llama import count_params
    from xinst_jax.train.flops import training_flops_per_step
    from xinst_jax.train.program import build_train_program

    program = build_train_program(cfg, list(topology.devices))
    shape = (cfg.train.batch_size, cfg.train.seq_len)
    batch = {k: jax.ShapeDtypeStruct(shape, np.float32 if k == "loss_weights" else np.int32,
                                     sharding=program.batch_sharding) for k in BATCH_KEYS}
    compiled = program.step_fn.lower(program.abstract_state, batch).compile()
    memory = compiled.memory_analysis()
    cost = _cost(compiled)
    chips = len(topology.devices)
    used = _memory_used(memory)
    hbm = HBM_BYTES.get(generation)
    print(f"{cfg.name}: {count_params(cfg.model) / 1e9:.2f}B params on {args.topology} ({chips} chips, "
          f"{topology.devices[0].device_kind}), mesh {dict(program.mesh.shape)}")
    print(_memory_line(memory, hbm))
    model_flops = training_flops_per_step(cfg.model, *shape) / chips
    xla_flops = float(cost.get("flops", 0.0))
    print(f"per chip per step: {model_flops / 1e12:.2f} TFLOP by MaxText's formula" +
          (f"; XLA's count {xla_flops / 1e12:.2f} TFLOP (it counts a scanned layer loop's body once)"
           if xla_flops else ""))
    if hbm and used > hbm:
        print(f"DOES NOT FIT: needs {used / GIB:.2f} GiB per chip, the chip has {hbm / GIB:.0f} GiB", file=sys.stderr)
        return 1
    return 0


def _per_chip_bytes(tree) -> int:
    """Bytes one chip holds of a tree of ShapeDtypeStructs with shardings (the largest shard)."""
    import jax
    import numpy as np

    total = 0
    for x in jax.tree.leaves(tree):
        shard = x.sharding.shard_shape(x.shape)
        total += int(np.prod(shard, dtype=np.int64)) * np.dtype(x.dtype).itemsize
    return total


def decode_program(cfg, devices, batch: int, context: int, weight_dtype: str, kv_dtype: str):
    """One decode step as the Engine runs it, ready to lower: (jitted step, abstract arguments,
    mesh, the inference model config). The step maps (params, cache, tokens [B, 1], positions [B, 1]) to (logits [B, V]
    float32, cache advanced by one slot); the cache is donated."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import NamedSharding

    from xinst_jax.config import ConfigError
    from xinst_jax.infer.generate import Engine, inference_config, inference_params
    from xinst_jax.model.kv_cache import CACHE_AXES, CACHE_SEGMENT_AXES, KVCache, init_cache
    from xinst_jax.model.llama import DTYPES, abstract_model, logical_axes, param_shapes
    from xinst_jax.sharding import (activation_sharding, batch_sharding, logical_to_spec, make_mesh, parse_rules,
                                    replicated, tree_shardings)

    mesh = make_mesh(cfg.mesh, devices)
    rules = parse_rules(cfg.mesh.rules)
    rows = batch_sharding(mesh, rules, 2)
    lead = rows.spec[0]
    dp = math.prod(mesh.shape[a] for a in (() if lead is None else (lead,) if isinstance(lead, str) else lead))
    if batch % dp:
        raise ConfigError(f"--batch {batch} is not divisible by the {dp} data-parallel shards of the mesh")
    # The Engine's weight layout: inference_config / inference_params, sharded by the logical-axis rules.
    infer_cfg = inference_config(cfg.model, weight_dtype)
    shapes = jax.eval_shape(lambda p: inference_params(p, cfg.model, infer_cfg), param_shapes(cfg.model))
    param_sh = tree_shardings(logical_axes(infer_cfg, stack_layers=False), shapes, rules, mesh)
    params = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, param_sh)
    # The Engine's cache: init_cache's layout, sharded by the cache_* logical axes.
    cache_shapes = jax.eval_shape(lambda: init_cache(infer_cfg.num_layers, batch, context, infer_cfg.num_kv_heads,
                                                     infer_cfg.head_dim, DTYPES[kv_dtype]))

    def placed(x, axes):
        spec = logical_to_spec(axes, x.shape, rules, mesh) if axes else None
        sharding = NamedSharding(mesh, spec) if spec is not None else replicated(mesh)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    cache = KVCache([placed(x, CACHE_AXES) for x in cache_shapes.k], [placed(x, CACHE_AXES) for x in cache_shapes.v],
                    placed(cache_shapes.segment_ids, CACHE_SEGMENT_AXES), placed(cache_shapes.index, None))
    token = jax.ShapeDtypeStruct((batch, 1), jnp.int32, sharding=rows)
    graphdef = nnx.split(abstract_model(infer_cfg, stack_layers=False))[0]

    def step(params, cache, tokens, positions):
        # The body of Engine._decode_loop, less token selection: one new token per row.
        with activation_sharding(mesh, rules):
            model = nnx.merge(graphdef, params)
            h, cache = model.hidden(tokens, positions, jnp.ones_like(tokens), cache)
            return model.logits(h)[:, 0], Engine._constrain_cache(cache)

    cache_sh = jax.tree.map(lambda x: x.sharding, cache)
    fn = jax.jit(step, out_shardings=(NamedSharding(mesh, logical_to_spec(
        ("activation_batch", "activation_vocab"), (batch, infer_cfg.vocab_size), rules, mesh)), cache_sh),
        donate_argnums=1)
    return fn, (params, cache, token, token), mesh, infer_cfg


# Memory-space assignment stages operands in on-chip VMEM (async copies before their consumers),
# and the TPU cost analysis then counts those bytes again: the copy's read, its write and the
# consumer's read. Compiled without it, every fusion reads its operands from HBM and writes its
# outputs there, so "bytes accessed" is the program's HBM traffic.
NO_VMEM_STAGING = {"xla_msa_enable": False}


def check_decode(cfg, topology, generation: str, args) -> int:
    from xinst_jax.model.llama import count_params

    devices = list(topology.devices)
    fn, abstract, mesh, m = decode_program(cfg, devices, args.batch, args.context, args.weight_dtype, args.kv_dtype)
    params, cache = abstract[0], abstract[1]
    lowered = fn.lower(*abstract)
    compiled = lowered.compile()  # as served: its memory, and its HLO for --dump-hlo
    if args.dump_hlo:
        with open(args.dump_hlo, "w") as f:
            f.write(compiled.as_text())
    memory = compiled.memory_analysis()
    staged = float(_cost(compiled).get("bytes accessed", 0.0))
    try:
        cost = _cost(lowered.compile(compiler_options=NO_VMEM_STAGING))
    except Exception as e:  # noqa: BLE001 - a libtpu without the option
        print(f"warning: cannot compile without VMEM staging ({e}); bytes accessed include VMEM traffic",
              file=sys.stderr)
        cost = _cost(compiled)
    chips = len(devices)
    hbm = HBM_BYTES.get(generation)
    bandwidth = HBM_BANDWIDTH.get(generation)
    weight_bytes = _per_chip_bytes(params)
    kv_bytes = _per_chip_bytes((cache.k, cache.v))
    live = weight_bytes + kv_bytes
    accessed = float(cost.get("bytes accessed", 0.0))
    ratio = accessed / live
    # The least a step can touch per chip: every weight but the embedding table (B rows of it are
    # gathered), the whole cache read, one new slot per row and layer written.
    floor = weight_bytes - _per_chip_bytes(params["embed"]) + kv_bytes + kv_bytes // args.context
    # Matmul FLOPs for one token per row: 2 per weight (the embedding gather is no matmul) and
    # attention's two matmuls over every slot of the cache. XLA's count matching it shows that all
    # layers are counted (the decode model unrolls them; a scanned loop's body would count once).
    flops = (2 * args.batch * (count_params(m) - m.vocab_size * m.embed_dim)
             + 4 * args.batch * args.context * m.num_heads * m.head_dim * m.num_layers) / chips
    xla_flops = float(cost.get("flops", 0.0))
    print(f"{cfg.name} decode step: {count_params(m) / 1e9:.2f}B params ({args.weight_dtype}), KV cache "
          f"{args.kv_dtype}, batch {args.batch} x {args.context} slots, {m.num_layers} unrolled layers, on "
          f"{args.topology} ({chips} chips, {devices[0].device_kind}), mesh {dict(mesh.shape)}")
    print(f"per chip: weights {weight_bytes / GIB:.3f} GiB + KV cache {kv_bytes / GIB:.3f} GiB = {live / GIB:.3f} GiB")
    print(f"per chip per step: XLA bytes accessed {accessed / GIB:.3f} GiB = {ratio:.3f} x (weights + KV cache) "
          f"[least possible {floor / GIB:.3f} GiB = {floor / live:.3f} x]; as compiled with VMEM staging the count "
          f"is {staged / GIB:.3f} GiB (on-chip copies counted again)")
    print(f"per chip per step: XLA {xla_flops / 1e9:.2f} GFLOP, matmul formula {flops / 1e9:.2f} GFLOP "
          f"(all {m.num_layers} layers: {xla_flops / flops:.3f} x)")
    if bandwidth:
        step = accessed / bandwidth
        print(f"implied step time at {bandwidth / 1e9:.0f} GB/s HBM per chip: {step * 1e3:.2f} ms per step, "
              f"{args.batch / step:.0f} tokens/s for the slice (weights + cache read once: "
              f"{live / bandwidth * 1e3:.2f} ms)")
    print(_memory_line(memory, hbm))
    status = 0
    if hbm and _memory_used(memory) > hbm:
        print(f"DOES NOT FIT: needs {_memory_used(memory) / GIB:.2f} GiB per chip, the chip has {hbm / GIB:.0f} GiB",
              file=sys.stderr)
        status = 1
    if ratio > args.max_ratio:
        print(f"READS TOO MUCH: {ratio:.3f} x (weights + KV cache) per step, more than --max-ratio {args.max_ratio}",
              file=sys.stderr)
        status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
