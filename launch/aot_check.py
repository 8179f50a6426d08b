#!/usr/bin/env python
"""Compile a config's train step for a TPU topology on this (CPU) machine, before paying for a pod.

    pip install -e '.[tpu]'     # libtpu, which carries the TPU compiler
    python launch/aot_check.py --config sft_xinst --topology v5p:2x2x2 [--set key=value ...]

Prints the per-chip memory the compiled step needs (arguments, outputs, temporaries, code) against
the chip's HBM, and XLA's FLOP count against MaxText's formula. Exit code 1 when it does not fit.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# HBM per chip in bytes (vendor figures).
HBM_BYTES = {"v4": 32 << 30, "v5e": 16 << 30, "v5litepod": 16 << 30, "v5p": 95 << 30, "v6e": 32 << 30}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--topology", required=True, help="e.g. v5e:2x2, v4:2x2x2, v5p:4x4x4")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")  # quiets libtpu's host discovery

    import jax
    import numpy as np
    from jax.experimental import topologies

    from xinst_jax.config import ConfigError, load_config
    from xinst_jax.data.batch import BATCH_KEYS
    from xinst_jax.model.llama import count_params
    from xinst_jax.train.flops import training_flops_per_step
    from xinst_jax.train.program import build_train_program

    try:
        cfg = load_config(args.config, args.overrides)
        topology = topologies.get_topology_desc(topology_name=args.topology, platform="tpu")
        program = build_train_program(cfg, list(topology.devices))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - no libtpu, unknown topology
        print(f"error: cannot describe TPU topology {args.topology!r}: {e}\n(install the `tpu` extra: "
              "pip install -e '.[tpu]')", file=sys.stderr)
        return 2
    shape = (cfg.train.batch_size, cfg.train.seq_len)
    batch = {k: jax.ShapeDtypeStruct(shape, np.float32 if k == "loss_weights" else np.int32,
                                     sharding=program.batch_sharding) for k in BATCH_KEYS}
    compiled = program.step_fn.lower(program.abstract_state, batch).compile()
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    chips = len(topology.devices)
    gib = 1 << 30
    used = (memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
            + memory.generated_code_size_in_bytes - memory.alias_size_in_bytes)
    hbm = HBM_BYTES.get(args.topology.split(":")[0])
    print(f"{cfg.name}: {count_params(cfg.model) / 1e9:.2f}B params on {args.topology} ({chips} chips, "
          f"{topology.devices[0].device_kind}), mesh {dict(program.mesh.shape)}")
    print(f"per chip: arguments {memory.argument_size_in_bytes / gib:.2f} GiB, outputs "
          f"{memory.output_size_in_bytes / gib:.2f} GiB (aliased {memory.alias_size_in_bytes / gib:.2f}), "
          f"temporaries {memory.temp_size_in_bytes / gib:.2f} GiB, code {memory.generated_code_size_in_bytes / gib:.3f} "
          f"GiB -> {used / gib:.2f} GiB" + (f" of {hbm / gib:.0f} GiB HBM" if hbm else ""))
    model_flops = training_flops_per_step(cfg.model, *shape) / chips
    xla_flops = float(cost.get("flops", 0.0)) if cost else 0.0
    print(f"per chip per step: {model_flops / 1e12:.2f} TFLOP by MaxText's formula" +
          (f"; XLA's count {xla_flops / 1e12:.2f} TFLOP (it counts a scanned layer loop's body once)"
           if xla_flops else ""))
    if hbm and used > hbm:
        print(f"DOES NOT FIT: needs {used / gib:.2f} GiB per chip, the chip has {hbm / gib:.0f} GiB", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
