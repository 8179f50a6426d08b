#!/usr/bin/env python
"""The one entry point: `python launch/tpu_run.py --config NAME [--set key=value ...]`.

The same command runs on a laptop CPU, one GPU, or every worker of a TPU pod.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from xinst_jax.config import ConfigError, available_configs, dump_yaml, load_config, save_resolved  # noqa: E402
from xinst_jax.jobs import JOB_MODULES, get_job  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    jobs = "\n".join(f"  {name:12s} {desc}" for name, (_, desc) in sorted(JOB_MODULES.items()))
    return argparse.ArgumentParser(
        description="xinst_jax: X-Instruction trainer and data pipeline.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"configs (configs/*.yaml):\n  {', '.join(available_configs())}\n\njobs (the config's `job`):\n{jobs}",
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    parser.add_argument("--config", required=True, help="config name in configs/ or a path to a YAML file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set model.num_layers=4 (repeatable)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        job = get_job(cfg.job, source="--set" if any(o.startswith("job=") for o in args.overrides) else args.config)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(dump_yaml(cfg), end="")
        return 0
    save_resolved(cfg)
    try:
        job(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
