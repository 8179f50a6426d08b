#!/usr/bin/env python
"""Compile a config's train step, or one inference decode step, for a TPU topology on this (CPU)
machine, before paying for a pod.

    pip install -e '.[tpu]'     # libtpu, which carries the TPU compiler
    python launch/aot_check.py --config sft_xinst --topology v5e-16 [--set key=value ...]
    python launch/aot_check.py --config sft_xinst --topology v5e-16 --num-slices 2
    python launch/aot_check.py --table docs/aot_fit_table.md     # the README's fit table
    python launch/aot_check.py --mode decode --config sft_xinst --topology v5e:2x4 --batch 64 \\
        --context 2048 --set mesh.fsdp=1 --set mesh.tensor=8

`--topology` takes a Cloud TPU accelerator type (v4-8, v5p-8, v5e-16, v6e-8: v4 and v5p count
TensorCores, v5e and v6e chips) or a libtpu topology (v5e:4x4, v4:2x2x1). `--num-slices N` compiles
for N such slices joined over the data-center network, with the mesh's data axis across them
(mesh.dcn_data=N, added to the overrides when the config leaves it at 1).

Train mode prints the per-chip memory the compiled step needs (arguments, outputs, temporaries,
code) against the HBM the TPU compiler may use, XLA's FLOP count against MaxText's formula (counted
the way XLA counts a scanned loop: its body once), and a verdict. When the step does not fit it
compiles candidate changes in a fixed order of cost (fsdp over every chip of a slice, then remat
dots_saveable, then full, then gradient accumulation, which keeps the global batch, then a smaller
global batch) and prints the first that fits as the exact `--set` overrides. A candidate whose
params and optimizer state alone exceed the HBM is not compiled.

Decode mode builds what the inference Engine (xinst_jax/infer/generate.py) runs once per
generated token: its weight layout (LoRA merged, layers unstacked, cast to the served dtype) and
shardings, and one call of the model's `hidden` + `logits` with a KV cache of `--context` slots
for one new token per row, the cache donated (updated in place, as the Engine's decode loop
carries it). It prints per chip the weight bytes, the KV-cache bytes, the bytes the step accesses
by XLA's cost analysis, their ratio, the step time that implies at the chip's HBM bandwidth
(decode is bandwidth-bound: every weight and every cache slot is read once per token), XLA's FLOP
count against the matmul formula (they agree only if every layer is counted), and the compiled
step's memory against the chip's HBM. `--read-len N` compiles the step as continuous batching
runs rows of a shorter prompt bucket: the cache keeps `--context` slots, attention reads (and the
write lands in) the first N only, and the figures are against that prefix. Bytes accessed are
counted on the step compiled without memory-space assignment: with it, operands are staged in on-chip VMEM and the TPU cost analysis
counts them again for the copy in and the read from VMEM, so only without it is the count the
step's HBM traffic (both counts are printed). A ratio above `--max-ratio` fails.

Exit code 1 when the step does not fit (or, in decode mode, reads too much), 2 on a usage error.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Per chip: HBM capacity in bytes and HBM bandwidth in bytes/s, from Google Cloud's TPU system
# architecture pages (cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e):
#   v4   32 GiB  1200 GB/s      v5e  16 GB  819 GB/s
#   v5p  95 GB   2765 GB/s      v6e  32 GB  1638 GB/s
HBM_BYTES = {"v4": 32 << 30, "v5e": 16 << 30, "v5p": 95 << 30, "v6e": 32 << 30}
HBM_BANDWIDTH = {"v4": 1200e9, "v5e": 819e9, "v5p": 2765e9, "v6e": 1638e9}
GIB = 1 << 30
# What libtpu's compiler lets one program use per chip, as its out-of-memory error states it
# ("exceeds available HBM (15.75G)", binary units): the capacity less what the runtime reserves.
USABLE_HBM_BYTES = {"v4": int(30.75 * GIB), "v5e": int(15.75 * GIB), "v5p": int(95.74 * GIB), "v6e": int(31.25 * GIB)}
# v5e and v6e accelerator types count chips; these are their single-slice shapes.
CHIP_GRIDS = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
# v4 and v5p accelerator types count TensorCores, two per chip, driven as one "megacore" device.
CORE_GRIDS = {8: "2x2x1", 16: "2x2x2", 32: "2x2x4", 64: "2x4x4", 128: "4x4x4", 256: "4x4x8", 512: "4x8x8"}
MEGACORE = ("v4", "v5p")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="sft_xinst")
    parser.add_argument("--topology", help="an accelerator type (v5e-16, v4-8) or a topology (v5e:4x4)")
    parser.add_argument("--num-slices", type=int, default=1, help="slices joined over DCN (multi-slice)")
    parser.add_argument("--mode", choices=("train", "decode"), default="train")
    parser.add_argument("--no-search", action="store_true", help="train: do not search for a change that fits")
    parser.add_argument("--table", metavar="OUT.md",
                        help="train: compile every --models x --slices cell of --config, write the fit table "
                             "(markdown) there and its records beside it (.json)")
    parser.add_argument("--models", nargs="+", default=list(TABLE_MODELS), help="--table: model presets")
    parser.add_argument("--slices", nargs="+", default=list(TABLE_SLICES),
                        help="--table: slices, e.g. v5e-16 or 2xv5e-16 (two slices)")
    parser.add_argument("--jobs", type=int, default=1, help="--table: cells compiled at once (processes)")
    parser.add_argument("--render", metavar="OUT.md", help="write the fit table again from OUT.json (no compiling)")
    parser.add_argument("--batch", type=int, default=64, help="decode: rows decoded together")
    parser.add_argument("--context", type=int, default=2048, help="decode: KV-cache slots per row")
    parser.add_argument("--read-len", type=int, default=None,
                        help="decode: attention reads only the cache's first N slots, in place (continuous "
                             "batching's rows of a shorter prompt bucket)")
    parser.add_argument("--weight-dtype", default="bfloat16", choices=("bfloat16", "float32"),
                        help="decode: the served weights' dtype (the Engine's weight_dtype)")
    parser.add_argument("--kv-dtype", default="bfloat16", choices=("bfloat16", "float32"),
                        help="decode: the KV cache's dtype (the Engine's kv_dtype)")
    parser.add_argument("--max-ratio", type=float, default=1.3,
                        help="decode: most bytes accessed per step / (weight + KV-cache bytes) that passes")
    parser.add_argument("--dump-hlo", metavar="FILE", help="decode: write the compiled step's HLO here")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    quiet_libtpu()

    from xinst_jax.config import ConfigError, load_config

    try:
        if args.render:
            return render_table(args.render)
        if args.table:
            return write_table(args.config, args.models, args.slices, args.overrides, args.table, args.jobs)
        if not args.topology:
            parser.error("--topology is required (or --table)")
        tpu = parse_slice(args.topology, args.num_slices)
        overrides = slice_overrides(args.config, tpu, args.overrides)
        cfg = load_config(args.config, overrides)
        try:
            devices = slice_devices(tpu)
        except Exception as e:  # noqa: BLE001 - no libtpu, unknown topology
            print(f"error: cannot describe TPU topology {tpu.topology!r}: {e}\n(install the `tpu` extra: "
                  "pip install -e '.[tpu]')", file=sys.stderr)
            return 2
        if args.mode == "decode":
            return check_decode(cfg, devices, tpu.generation, args)
        return check_train(args.config, overrides, tpu, devices, search=not args.no_search)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def quiet_libtpu() -> None:
    """Compiling needs no chip: skip libtpu's host discovery and its one-process-per-machine lock
    (so the check runs beside another jax process that loaded libtpu, e.g. a test runner)."""
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def _memory_used(memory) -> int:
    return (memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
            + memory.generated_code_size_in_bytes - memory.alias_size_in_bytes)


def _memory_line(memory, hbm: int | None, usable: int | None = None) -> str:
    of = f" of {hbm / GIB:.0f} GiB HBM" if hbm else ""
    if usable:
        of += f" (the compiler's limit: {usable / GIB:.2f} GiB)"
    return (f"per chip: arguments {memory.argument_size_in_bytes / GIB:.2f} GiB, outputs "
            f"{memory.output_size_in_bytes / GIB:.2f} GiB (aliased {memory.alias_size_in_bytes / GIB:.2f}), "
            f"temporaries {memory.temp_size_in_bytes / GIB:.2f} GiB, code "
            f"{memory.generated_code_size_in_bytes / GIB:.3f} GiB -> {_memory_used(memory) / GIB:.2f} GiB" + of)


def _cost(compiled) -> dict:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return dict(cost or {})


# --------------------------------------------------------------------------- slices

@dataclass(frozen=True)
class Slice:
    label: str  # as written: v5e-16, 2xv5e-16, v5e:4x4
    topology: str  # libtpu's name: v5e:4x4
    generation: str  # v4, v5e, v5p, v6e
    num_slices: int = 1


def parse_slice(text: str, num_slices: int = 1) -> Slice:
    """`v5e-16`, `v5e:4x4` or `2xv5e-16` (two slices) -> Slice; a ConfigError names what is known."""
    from xinst_jax.config import ConfigError

    label = text if num_slices == 1 else f"{num_slices}x{text}"
    match = re.fullmatch(r"(?:(\d+)x)?(v\d+[a-z]*)([-:])([0-9x]+)", text)
    if not match:
        raise ConfigError(f"--topology: cannot read {text!r} (e.g. v5e-16, v4-8, v5e:4x4, 2xv5e-16)")
    slices, generation, sep, size = match.groups()
    num_slices = int(slices) if slices else num_slices
    generation = "v5e" if generation == "v5litepod" else generation
    if sep == ":":
        return Slice(label, f"{generation}:{size}", generation, num_slices)
    grids = CORE_GRIDS if generation in MEGACORE else CHIP_GRIDS
    if not size.isdigit() or int(size) not in grids:
        raise ConfigError(f"--topology: no single-slice shape known for {generation}-{size} (known: "
                          f"{', '.join(f'{generation}-{n}' for n in grids)}; or name the topology, e.g. v5e:4x4)")
    return Slice(label, f"{generation}:{grids[int(size)]}", generation, num_slices)


def slice_devices(tpu: Slice) -> list:
    """Compile-only devices for every chip of the slices (libtpu, no chip needed)."""
    from jax.experimental import topologies

    kwargs: dict[str, Any] = {}
    if tpu.generation in MEGACORE:
        kwargs["chip_config_name"] = "megacore"  # one device per chip, as TPU VMs run
    if tpu.num_slices > 1:
        kwargs["num_slices"] = tpu.num_slices
    return list(topologies.get_topology_desc(topology_name=tpu.topology, platform="tpu", **kwargs).devices)


def slice_overrides(config: str, tpu: Slice, overrides: list[str]) -> list[str]:
    """The overrides, plus mesh.dcn_data=<slices> for a multi-slice run whose config leaves it at 1."""
    from xinst_jax.config import load_config

    if tpu.num_slices > 1 and load_config(config, overrides).mesh.dcn_data == 1:
        return [*overrides, f"mesh.dcn_data={tpu.num_slices}"]
    return list(overrides)


# --------------------------------------------------------------------------- train: compile, fit

@dataclass
class Fit:
    """One compile of the train step for one slice."""

    overrides: list[str]  # the --set list this was compiled with
    fits: bool
    per_chip_bytes: int  # compiled total; when refused: arguments + the temporaries the compiler's error states
    usable_bytes: int
    mesh: dict[str, int]
    compile_s: float
    memory: Any = None  # CompiledMemoryStats, when it compiled
    xla_flops: float = 0.0
    formula_flops: float = 0.0  # per chip: MaxText's formula, and the same counted as XLA counts a scan
    counted_flops: float = 0.0
    refused: str = ""  # why it did not compile (the compiler's out-of-memory message) or was not tried
    state_over_hbm: bool = False  # params + optimizer state alone exceed the usable HBM: not compiled at all
    model: dict = field(default_factory=dict)  # the resolved model config (the table checks it is current)

    def summary(self) -> str:
        return f"{self.per_chip_bytes / GIB:.2f} of {self.usable_bytes / GIB:.2f} GiB per chip"


_OOM = re.compile(r"HLO temporaries \(([0-9.]+)([KMGT])\)")


def _refused_temporaries(message: str) -> int | None:
    """Bytes of temporaries in libtpu's out-of-memory error, None for any other error."""
    match = _OOM.search(message)
    if not match or "RESOURCE_EXHAUSTED" not in message:
        return None
    return int(float(match.group(1)) * 1024 ** " KMGT".index(match.group(2)))


def abstract_batch(cfg, sharding) -> dict:
    import jax
    import numpy as np

    from xinst_jax.data.batch import BATCH_KEYS

    shape = (cfg.train.batch_size, cfg.train.seq_len)
    return {k: jax.ShapeDtypeStruct(shape, np.float32 if k == "loss_weights" else np.int32, sharding=sharding)
            for k in BATCH_KEYS}


def compile_train(config: str, overrides: list[str], devices: list, usable: int) -> Fit:
    """Compile the real train step (train/program.py) for `devices`; a step whose params and
    optimizer state alone exceed `usable` is not compiled."""
    from xinst_jax.config import load_config
    from xinst_jax.train.program import build_train_program

    from xinst_jax.train.flops import training_flops_per_step

    cfg = load_config(config, overrides)
    program = build_train_program(cfg, devices)
    batch = abstract_batch(cfg, program.batch_sharding)
    arguments = _per_chip_bytes((program.abstract_state, batch))
    mesh = dict(program.mesh.shape)
    t, chips = cfg.train, len(devices)
    flops = {"formula_flops": training_flops_per_step(cfg.model, t.batch_size, t.seq_len) / chips,
             "counted_flops": scan_flops(cfg.model, t.batch_size, t.seq_len, t.grad_accum) / chips,
             "model": dataclasses.asdict(cfg.model)}
    if arguments > usable:
        return Fit(list(overrides), False, arguments, usable, mesh, 0.0, refused="params + optimizer state alone",
                   state_over_hbm=True, **flops)
    start = time.perf_counter()
    try:
        compiled = program.step_fn.lower(program.abstract_state, batch).compile()
    except Exception as e:  # noqa: BLE001 - jax raises its runtime error type for an OOM
        temporaries = _refused_temporaries(str(e))
        if temporaries is None:
            raise
        return Fit(list(overrides), False, arguments + temporaries, usable, mesh, time.perf_counter() - start,
                   refused=str(e).splitlines()[0], **flops)
    seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    used = _memory_used(memory)
    return Fit(list(overrides), used <= usable, used, usable, mesh, seconds, memory,
               float(_cost(compiled).get("flops", 0.0)), **flops)


def _setting(cfg, key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def fit_candidates(cfg, chips: int) -> list[dict[str, Any]]:
    """Changes to try, cheapest first, each keeping the ones before it: fsdp over every chip of a
    slice (more all-gathers, no extra FLOPs), remat dots_saveable then full (recompute), gradient
    accumulation (the same global batch in smaller micro-batches), then a smaller global batch
    (changes the training run itself). Each is {key: value} over the config's own settings."""
    steps: list[dict[str, Any]] = []
    current: dict[str, Any] = {}
    slices = cfg.mesh.dcn_data
    if (cfg.mesh.data, cfg.mesh.tensor) != (1, 1) or cfg.mesh.fsdp not in (-1, chips // slices):
        current |= {"mesh.data": 1, "mesh.fsdp": -1, "mesh.tensor": 1}
        steps.append(dict(current))
    order = ["none", "dots_saveable", "full"]
    for remat in order[order.index(cfg.model.remat) + 1:]:
        current["model.remat"] = remat
        steps.append(dict(current))
    batch, accum = cfg.train.batch_size, cfg.train.grad_accum
    data_parallel = chips if current.get("mesh.fsdp") == -1 else _data_parallel(cfg, chips)
    while batch % (accum * 2) == 0 and (batch // (accum * 2)) % data_parallel == 0:
        accum *= 2
        current["train.grad_accum"] = accum
        steps.append(dict(current))
    rows = batch // data_parallel  # rows per chip and step, all micro-batches together
    while rows > 1:  # one micro-batch: no accumulator beside the gradients
        rows //= 2
        steps.append({**current, "train.grad_accum": 1, "train.batch_size": rows * data_parallel})
    return steps


def _data_parallel(cfg, chips: int) -> int:
    from xinst_jax.sharding import mesh_shape

    data, fsdp, _ = mesh_shape(cfg.mesh, chips)
    return data * fsdp


def as_overrides(cfg, change: dict[str, Any]) -> list[str]:
    """`key=value` for each setting of `change` that differs from the config's."""
    return [f"{k}={v}" for k, v in change.items() if _setting(cfg, k) != v]


def search_fit(config: str, overrides: list[str], devices: list, usable: int,
               report=print) -> tuple[Fit | None, list[Fit]]:
    """The first candidate change (fit_candidates' order) whose step fits; every Fit tried."""
    from xinst_jax.config import load_config

    cfg = load_config(config, overrides)
    tried: list[Fit] = []
    for change in fit_candidates(cfg, len(devices)):
        fit = compile_train(config, [*overrides, *as_overrides(cfg, change)], devices, usable)
        tried.append(fit)
        report(f"  {_set_flags(fit.overrides[len(overrides):])}: {'fits' if fit.fits else 'does not fit'}, "
               f"{fit.summary()}" + (f" [{fit.refused}]" if fit.refused else "") + f" ({fit.compile_s:.0f} s)")
        if fit.fits:
            return fit, tried
    return None, tried


def _set_flags(overrides: list[str]) -> str:
    return " ".join(f"--set {o}" for o in overrides)


def scan_flops(model_cfg, batch: int, seq_len: int, grad_accum: int) -> float:
    """MaxText's formula counted as XLA's cost analysis counts a step: a scanned loop's body once,
    so one micro-batch (the accumulation scan) and, with scanned layers, one layer."""
    from xinst_jax.train.flops import training_flops_per_step

    rows = batch // grad_accum
    if not model_cfg.scan_layers:
        return training_flops_per_step(model_cfg, rows, seq_len)
    return training_flops_per_step(dataclasses.replace(model_cfg, num_layers=1), rows, seq_len)


def check_train(config: str, overrides: list[str], tpu: Slice, devices: list, search: bool = True) -> int:
    from xinst_jax.config import load_config
    from xinst_jax.model.llama import count_params

    cfg = load_config(config, overrides)
    usable = USABLE_HBM_BYTES[tpu.generation]
    fit = compile_train(config, overrides, devices, usable)
    t, m = cfg.train, cfg.model
    print(f"{cfg.name} ({m.preset}): {count_params(m) / 1e9:.2f}B params, batch {t.batch_size} x {t.seq_len} "
          f"(grad_accum {t.grad_accum}), remat {m.remat}, on {tpu.label} ({len(devices)} chips, "
          f"{devices[0].device_kind}), mesh {fit.mesh}")
    if fit.memory is not None:
        print(f"compiled in {fit.compile_s:.0f} s; " + _memory_line(fit.memory, HBM_BYTES[tpu.generation], usable))
        print(f"per chip per step: {fit.formula_flops / 1e12:.2f} TFLOP by MaxText's formula; XLA counts "
              f"{fit.xla_flops / 1e12:.2f} TFLOP, a scanned loop's body once: the formula counted so is "
              f"{fit.counted_flops / 1e12:.2f} TFLOP (XLA / formula {fit.xla_flops / fit.counted_flops:.2f}"
              + ("; remat recomputes the forward)" if m.remat != "none" else ")"))
    if fit.fits:
        print(f"FITS: {fit.summary()}")
        return 0
    print(f"DOES NOT FIT: {fit.summary()} ({fit.refused or 'compiled, but over the usable HBM'})", file=sys.stderr)
    if search:
        print("trying changes in order of cost (fsdp width, remat, gradient accumulation, batch):")
        best, _ = search_fit(config, overrides, devices, usable)
        if best:
            print(f"smallest change that fits: {_set_flags(best.overrides[len(overrides):])} ({best.summary()})")
        else:
            print("no change searched fits: more chips, or fewer bytes per parameter (model.param_dtype=bfloat16, "
                  "or LoRA: model.lora_rank)")
    return 1


# --------------------------------------------------------------------------- the fit table

TABLE_MODELS = ("llama2_7b", "llama3_8b", "llama2_13b")
TABLE_SLICES = ("v4-8", "v5e-8", "v5e-16", "v5p-8", "v6e-8", "2xv5e-16")


def fit_cell(config: str, model: str, slice_label: str, overrides: list[str], report=print) -> dict:
    """Compile one table cell (and search for a change when it does not fit); its record."""
    tpu = parse_slice(slice_label)
    devices = slice_devices(tpu)
    cell_overrides = slice_overrides(config, tpu, [*overrides, f"model.preset={model}"])
    usable = USABLE_HBM_BYTES[tpu.generation]
    start = time.perf_counter()
    fit = compile_train(config, cell_overrides, devices, usable)
    report(f"{model} on {tpu.label}: {'fits' if fit.fits else 'does not fit'}, {fit.summary()} "
           f"({fit.compile_s:.0f} s)")
    best, tried = (None, []) if fit.fits else search_fit(config, cell_overrides, devices, usable, report)
    return {"model": model, "slice": tpu.label, "topology": tpu.topology, "num_slices": tpu.num_slices,
            "chips": len(devices), "overrides": cell_overrides, "base": _fit_record(fit),
            "change": best.overrides[len(cell_overrides):] if best else None,
            "changed": _fit_record(best) if best else None, "tried": [_fit_record(f) for f in tried],
            "seconds": round(time.perf_counter() - start, 1)}


def _fit_record(fit: Fit) -> dict:
    return {"overrides": fit.overrides, "fits": fit.fits, "per_chip_gib": round(fit.per_chip_bytes / GIB, 3),
            "compiled": fit.memory is not None, "state_over_hbm": fit.state_over_hbm,
            "usable_gib": round(fit.usable_bytes / GIB, 2), "mesh": fit.mesh,
            "compile_s": round(fit.compile_s, 1), "xla_tflop": round(fit.xla_flops / 1e12, 3),
            "formula_tflop": round(fit.formula_flops / 1e12, 3),
            "formula_scan_tflop": round(fit.counted_flops / 1e12, 3),
            "refused": fit.refused, "model": fit.model}


def _cell_markdown(cell: dict) -> str:
    base = cell["base"]
    # † not compiled (the state alone is over), * the compiler refused: a refusal can take under 0.05 s,
    # so compile_s == 0 does not tell them apart
    mark = "" if base["compiled"] else "†" if base["state_over_hbm"] else "*"
    gib = f"{base['per_chip_gib']:.1f}{mark} / {base['usable_gib']:.2f}"
    if base["fits"]:
        return f"✓ {gib}"
    if cell["change"] is None:
        return f"✗ {gib}; nothing searched fits"
    return f"✗ {gib} → `{' '.join(cell['change'])}`: {cell['changed']['per_chip_gib']:.1f}"


def table_markdown(config: str, cells: list[dict], meta: dict) -> str:
    models = list(dict.fromkeys(c["model"] for c in cells))
    slices = list(dict.fromkeys(c["slice"] for c in cells))
    by_key = {(c["model"], c["slice"]): c for c in cells}
    chips = {c["slice"]: c["chips"] for c in cells}
    lines = [f"Per-chip memory of `{config}`'s train step (GiB) against what the TPU compiler may use, "
             f"compiled with libtpu {meta['libtpu']} (jax {meta['jax']}) on a CPU machine by "
             f"`{meta['command']}` in {meta['seconds'] / 60:.0f} min on a 2-core machine. ✓ fits, ✗ does not; "
             "*: the compiler refused the step, and the figure is its arguments plus the temporaries its "
             "out-of-memory error states; †: params and optimizer state alone exceed the HBM (not compiled). → the "
             "first change, in order of cost (fsdp width, remat, gradient accumulation, a smaller global batch), "
             "that compiles and fits, as `--set` overrides, and its per-chip GiB.", "",
             "| model | " + " | ".join(f"{s} ({chips[s]} chips)" for s in slices) + " |",
             "|---" * (len(slices) + 1) + "|"]
    for model in models:
        lines.append(f"| {model} | " + " | ".join(_cell_markdown(by_key[(model, s)]) for s in slices) + " |")
    lines += ["", "TFLOP per chip per step of the step that fits (as configured, or with the change): XLA's count / "
              "MaxText's formula counted the way XLA counts a scanned loop, its body once (one layer, one "
              "micro-batch), and their ratio. They agree only roughly: XLA's count adds remat's recomputed forward "
              "and the optimizer, and counts nested loops (accumulation around the layer scan) and multi-slice "
              "programs in ways the one-body rule does not capture. Compute MFU from the formula "
              "(xinst_jax/train/flops.py), not from XLA's count.", "",
              "| model | " + " | ".join(slices) + " |", "|---" * (len(slices) + 1) + "|"]
    for model in models:
        lines.append(f"| {model} | " + " | ".join(_flops_markdown(by_key[(model, s)]) for s in slices) + " |")
    return "\n".join(lines) + "\n"


def _flops_markdown(cell: dict) -> str:
    fit = cell["base"] if cell["base"]["fits"] else cell["changed"]
    if not fit or not fit["formula_scan_tflop"]:
        return "–"
    xla, formula = fit["xla_tflop"], fit["formula_scan_tflop"]
    return f"{xla:.1f} / {formula:.1f} ({xla / formula:.2f})"


def render_table(out: str) -> int:
    """Write OUT.md again from its records (OUT.json), compiling nothing."""
    with open(os.path.splitext(out)[0] + ".json") as f:
        records = json.load(f)
    with open(out, "w") as f:
        f.write(table_markdown(records["config"], records["cells"], records["meta"]))
    return 0


def _logged_cell(config: str, model: str, slice_label: str, overrides: list[str]) -> dict:
    record = fit_cell(config, model, slice_label, overrides)
    print("cell: " + json.dumps(record), flush=True)  # a long run's log keeps every finished cell
    return record


def write_table(config: str, models: list[str], slices: list[str], overrides: list[str], out: str,
                jobs: int = 1) -> int:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    import jax

    start = time.perf_counter()
    keys = [(model, s) for model in models for s in slices]
    # Each compile runs on one core: cells in separate processes (each loads libtpu) run side by side.
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        cells = list(pool.map(_logged_cell, *zip(*[(config, m, s, overrides) for m, s in keys])))
    meta = {"jax": jax.__version__, "libtpu": _libtpu_version(),
            "command": "python launch/aot_check.py --table " + os.path.relpath(out)
                       + (f" --config {config}" if config != "sft_xinst" else "")
                       + "".join(f" --set {o}" for o in overrides) + (f" --jobs {jobs}" if jobs > 1 else ""),
            "seconds": round(time.perf_counter() - start),
            "cell_seconds": round(sum(c["seconds"] for c in cells))}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        f.write(table_markdown(config, cells, meta))
    with open(os.path.splitext(out)[0] + ".json", "w") as f:
        json.dump({"config": config, "meta": meta, "cells": cells}, f, indent=1)
    print(f"wrote {out} and its .json in {meta['seconds'] / 60:.1f} min")
    return 0


def _libtpu_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("libtpu")
    except PackageNotFoundError:
        return "unknown"


# --------------------------------------------------------------------------- decode

def _per_chip_bytes(tree) -> int:
    """Bytes one chip holds of a tree of ShapeDtypeStructs with shardings (the largest shard)."""
    import jax
    import numpy as np

    total = 0
    for x in jax.tree.leaves(tree):
        shard = x.sharding.shard_shape(x.shape)
        total += int(np.prod(shard, dtype=np.int64)) * x.dtype.itemsize  # a PRNG key's dtype has one too
    return total


def decode_program(cfg, devices, batch: int, context: int, weight_dtype: str, kv_dtype: str,
                   read_len: int | None = None):
    """One decode step as the Engine runs it, ready to lower: (jitted step, abstract arguments,
    mesh, the inference model config); `read_len` as model.hidden takes it. The step maps (params,
    cache, tokens [B, 1], positions [B, 1]) to (logits [B, V] float32, cache advanced by one slot);
    the cache is donated."""
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
            h, cache = model.hidden(tokens, positions, jnp.ones_like(tokens), cache, read_len=read_len)
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


def check_decode(cfg, devices: list, generation: str, args) -> int:
    from xinst_jax.model.llama import count_params

    read = min(args.read_len or args.context, args.context)
    fn, abstract, mesh, m = decode_program(cfg, devices, args.batch, args.context, args.weight_dtype, args.kv_dtype,
                                           read)
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
    kv_bytes = _per_chip_bytes((cache.k, cache.v)) * read // args.context  # the slots a step reads
    live = weight_bytes + kv_bytes
    accessed = float(cost.get("bytes accessed", 0.0))
    ratio = accessed / live
    # The least a step can touch per chip: every weight but the embedding table (B rows of it are
    # gathered), the whole cache read, one new slot per row and layer written.
    floor = weight_bytes - _per_chip_bytes(params["embed"]) + kv_bytes + kv_bytes // read
    # Matmul FLOPs for one token per row: 2 per weight (the embedding gather is no matmul) and
    # attention's two matmuls over every slot of the cache. XLA's count matching it shows that all
    # layers are counted (the decode model unrolls them; a scanned loop's body would count once).
    flops = (2 * args.batch * (count_params(m) - m.vocab_size * m.embed_dim)
             + 4 * args.batch * read * m.num_heads * m.head_dim * m.num_layers) / chips
    xla_flops = float(cost.get("flops", 0.0))
    reading = f" (reading {read})" if read < args.context else ""
    print(f"{cfg.name} decode step: {count_params(m) / 1e9:.2f}B params ({args.weight_dtype}), KV cache "
          f"{args.kv_dtype}, batch {args.batch} x {args.context} slots{reading}, {m.num_layers} unrolled layers, on "
          f"{args.topology} ({chips} chips, {devices[0].device_kind}), mesh {dict(mesh.shape)}")
    print(f"per chip: weights {weight_bytes / GIB:.3f} GiB + KV cache {kv_bytes / GIB:.3f} GiB"
          f"{' (the slots read)' if reading else ''} = "
          f"{live / GIB:.3f} GiB")
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
