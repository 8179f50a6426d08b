#!/usr/bin/env python
"""Run a config on every worker of a GCP TPU VM (single- or multi-host) with one command.

    python launch/tpu_vm.py --tpu NAME --zone ZONE [--project P] [--setup] -- --config sft_xinst --set k=v

`--setup` first syncs this checkout to every worker and installs it (with the `tpu` extra);
then the same `launch/tpu_run.py` command starts on all workers at once (`--worker=all`).
jax discovers the pod's coordinator on TPU VMs, so no distributed flags are needed. If one
worker dies, the others exit through jax's heartbeat timeout (distributed.heartbeat_timeout)
instead of hanging. `--dry-run` prints the gcloud commands without running them.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys

REMOTE_DIR = "xinst_jax"
ARCHIVE = "xinst_jax.tar.gz"


def gcloud_ssh(args: argparse.Namespace, command: str) -> list[str]:
    cmd = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", args.tpu, f"--zone={args.zone}", "--worker=all",
           f"--command={command}"]
    if args.project:
        cmd.append(f"--project={args.project}")
    return cmd


def gcloud_scp(args: argparse.Namespace, archive: str) -> list[str]:
    cmd = ["gcloud", "compute", "tpus", "tpu-vm", "scp", "--worker=all", f"--zone={args.zone}", archive,
           f"{args.tpu}:{ARCHIVE}"]
    if args.project:
        cmd.append(f"--project={args.project}")
    return cmd


def build_commands(args: argparse.Namespace, run_args: list[str]) -> list[list[str]]:
    commands = []
    if args.setup:
        # Tracked files only (git archive): no virtualenvs or run directories travel.
        commands.append(["git", "archive", "--format=tar.gz", "-o", ARCHIVE, "HEAD"])
        commands.append(gcloud_scp(args, ARCHIVE))
        commands.append(gcloud_ssh(args, f"mkdir -p {REMOTE_DIR} && tar -xzf {ARCHIVE} -C {REMOTE_DIR} && cd {REMOTE_DIR}"
                                         " && python3 -m pip install -q -e '.[tpu,data]'"))
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in (e.split("=", 1) for e in args.env))
    run = f"cd {REMOTE_DIR} && {env + ' ' if env else ''}python3 launch/tpu_run.py {shlex.join(run_args)}"
    commands.append(gcloud_ssh(args, run))
    return commands


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tpu", required=True, help="TPU VM name")
    parser.add_argument("--zone", required=True)
    parser.add_argument("--project", default="")
    parser.add_argument("--setup", action="store_true", help="copy this checkout to the workers and install it")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="environment variable for the run (repeatable)")
    parser.add_argument("--dry-run", action="store_true")
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    run_args = argv[split + 1:]
    if not run_args:
        parser.error("give the tpu_run.py arguments after `--`, e.g. -- --config sft_xinst")
    for command in build_commands(args, run_args):
        print(shlex.join(command), flush=True)
        if not args.dry_run:
            result = subprocess.run(command)
            if result.returncode != 0:
                return result.returncode
    return 0


if __name__ == "__main__":
    sys.exit(main())
