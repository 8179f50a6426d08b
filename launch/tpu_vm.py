#!/usr/bin/env python
"""From a GCP project to a finished run on Cloud TPU with one command.

    python launch/tpu_vm.py --zone ZONE --type v5p-64 [--project P] [--spot | --reserved] \\
        [--num-slices N] [--keep] [--dry-run] -- --config sft_xinst --set k=v ...

In order: check that the zone offers the type; create a queued resource (one slice, or
`--num-slices N` slices on the data-center network); wait until it is ACTIVE (at most
`--timeout-s`); copy this checkout (`git archive HEAD`) to every worker of every slice and install
it there, all slices in parallel; start `launch/tpu_run.py <args>` on every worker at once (one
ssh per worker), streaming worker 0's log here and keeping every worker's log under `--log-dir`;
report each worker that failed; delete the queued resource, also after a failure or Ctrl-C,
unless `--keep`. Multi-slice runs get the MEGASCALE_* variables jax reads and
`--set mesh.dcn_data=N` (unless the arguments set it).

With an existing TPU VM, `--tpu NAME` runs there without creating or deleting anything
(`--setup` first copies and installs the checkout). `--dry-run` prints the commands in order and
runs nothing. Problems the user can fix are one line on stderr with exit code 2; a failed worker
makes the exit code that worker's.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import gcp  # noqa: E402
from gcp import Accelerator, LaunchError, Pod  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
STOPPED_STATES = ("FAILED", "SUSPENDING", "SUSPENDED")  # a queued resource that will not become ACTIVE
SETUP_ATTEMPTS = 3  # fresh VMs can refuse the first ssh while keys propagate
DESCRIBE_FAILURES = 3  # consecutive describe errors tolerated while waiting (transient API errors)


# ---------------------------------------------------------------- printing and running commands

@dataclass
class Shell:
    """Every command is printed before it runs; with dry_run it is only printed."""

    dry_run: bool

    def note(self, text: str) -> None:
        print(f"# {text}", flush=True)

    def show(self, cmd: list[str]) -> None:
        print(shlex.join(cmd), flush=True)

    def run(self, cmd: list[str], what: str, cwd: Path | None = None) -> None:
        self.show(cmd)
        if not self.dry_run:
            result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
            if result.returncode != 0:
                raise LaunchError(f"{what} failed: {last_line(result.stderr) or f'exit {result.returncode}'}")

    def output(self, cmd: list[str], quiet: bool = False) -> subprocess.CompletedProcess:
        """Run and capture (never in dry-run: callers print and skip)."""
        if not quiet:
            self.show(cmd)
        return subprocess.run(cmd, capture_output=True, text=True)


def last_line(text: str) -> str:
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[-1] if lines else ""


@dataclass
class Job:
    label: str  # "slice 1 worker 3"
    cmd: list[str]
    log: Path
    stream: bool = False  # also copy its output to this terminal


def _copy_lines(source: IO[str], log: IO[str]) -> None:
    for line in source:
        sys.stdout.write(line)
        sys.stdout.flush()
        log.write(line)


def run_parallel(jobs: list[Job]) -> list[int]:
    """Start all jobs at once; their exit codes in order. Ctrl-C stops every one still running."""
    procs: list[subprocess.Popen] = []
    threads: list[threading.Thread] = []
    logs: list[IO[str]] = []
    try:
        for job in jobs:
            job.log.parent.mkdir(parents=True, exist_ok=True)
            log = open(job.log, "w")
            logs.append(log)
            out = subprocess.PIPE if job.stream else log
            proc = subprocess.Popen(job.cmd, stdout=out, stderr=subprocess.STDOUT, text=True)
            procs.append(proc)
            if job.stream:
                threads.append(threading.Thread(target=_copy_lines, args=(proc.stdout, log), daemon=True))
                threads[-1].start()
        codes = [proc.wait() for proc in procs]
        for thread in threads:
            thread.join()
        return codes
    finally:
        stop(procs)
        for thread in threads:
            thread.join(timeout=5)
        for log in logs:
            log.close()


def stop(procs: list[subprocess.Popen], grace_s: float = 10.0) -> None:
    """Terminate what still runs (after Ctrl-C or an error), then kill what ignores it."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def announce(shell: Shell, jobs: list[Job]) -> None:
    """Dry-run prints every command; a real run the first and how many run beside it."""
    for i, job in enumerate(jobs):
        if shell.dry_run or i == 0:
            shell.show(job.cmd)
    if not shell.dry_run and len(jobs) > 1:
        shell.note(f"... and {len(jobs) - 1} more like it in parallel ({jobs[-1].label} last)")


# ---------------------------------------------------------------- the steps

def check_gcloud() -> None:
    if shutil.which("gcloud") is None:
        raise LaunchError("gcloud is not on PATH: install the Google Cloud CLI "
                          "(https://cloud.google.com/sdk/docs/install), then `gcloud auth login`")


def check_zone_offers(shell: Shell, pod: Pod, accel: Accelerator) -> None:
    cmd = gcp.accelerator_types_cmd(pod)
    if shell.dry_run:
        shell.show(cmd)
        return
    result = shell.output(cmd)
    if result.returncode != 0:
        raise LaunchError(f"cannot list the accelerator types of zone {pod.zone}: "
                          f"{last_line(result.stderr) or f'exit {result.returncode}'}")
    offered = result.stdout.split()
    if accel.type not in offered:
        same = sorted((t for t in offered if t.startswith(accel.generation.prefix + "-")),
                      key=lambda t: int(t.rsplit("-", 1)[1]))
        alternatives = f"it offers {', '.join(same)}" if same else f"it offers no {accel.generation.prefix} types"
        raise LaunchError(f"zone {pod.zone} does not offer {accel.type}: {alternatives} "
                          "(gcloud compute tpus accelerator-types list)")


def check_tree(shell: Shell) -> None:
    if shell.dry_run:
        return
    result = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                            capture_output=True, text=True)
    if result.returncode == 0 and result.stdout.strip():
        shell.note("uncommitted changes stay here: the workers get HEAD (git archive)")


def make_archive(shell: Shell, log_dir: Path) -> str:
    archive = str((log_dir / gcp.ARCHIVE).resolve())
    if not shell.dry_run:
        log_dir.mkdir(parents=True, exist_ok=True)
    shell.run(gcp.archive_cmd(archive), "git archive", cwd=REPO_ROOT)
    return archive


def create(shell: Shell, pod: Pod, accel: Accelerator, runtime: str, capacity: str) -> None:
    cmd = gcp.create_cmd(pod, accel, runtime, capacity)
    if shell.dry_run:
        shell.show(cmd)
        return
    result = shell.output(cmd)
    if result.returncode != 0:
        reason = last_line(result.stderr) or f"exit {result.returncode}"
        if "accelerator" in reason.lower() and ("zone" in reason.lower() or "not" in reason.lower()):
            raise LaunchError(f"zone {pod.zone} does not offer {accel.type}: {reason}")
        raise LaunchError(f"creating queued resource {pod.name} failed: {reason}")


def wait_active(shell: Shell, pod: Pod, timeout_s: float, poll_s: float) -> None:
    cmd = gcp.describe_qr_cmd(pod)
    shell.note(f"repeat every {poll_s:g} s until the state is ACTIVE (at most {timeout_s:g} s):")
    shell.show(cmd)
    if shell.dry_run:
        return
    deadline, state, failures = time.monotonic() + timeout_s, "", 0
    while True:
        result = shell.output(cmd, quiet=True)
        failures = failures + 1 if result.returncode else 0
        if failures >= DESCRIBE_FAILURES:
            raise LaunchError(f"cannot describe queued resource {pod.name}: {last_line(result.stderr)}")
        if result.returncode == 0:
            new_state, _, reason = result.stdout.strip().partition("\t")
            if new_state != state:
                shell.note(f"queued resource {pod.name}: {new_state}")
            state = new_state
            if state == "ACTIVE":
                return
            if state in STOPPED_STATES:
                why = f": {reason.strip()}" if reason.strip() else ""
                raise LaunchError(f"queued resource {pod.name} is {state}{why}")
        if time.monotonic() >= deadline:
            raise LaunchError(f"queued resource {pod.name} not ACTIVE after {timeout_s:g} s "
                              f"(last state {state or 'unknown'}); raise --timeout-s or try another zone")
        time.sleep(poll_s)


def coordinator_ip(shell: Shell, pod: Pod) -> str:
    if pod.num_slices == 1:
        return ""
    cmd = gcp.coordinator_cmd(pod)
    if shell.dry_run:
        shell.show(cmd)
        return gcp.COORDINATOR_PLACEHOLDER
    result = shell.output(cmd)
    ip = result.stdout.strip()
    if result.returncode != 0 or not ip:
        raise LaunchError(f"cannot find the address of {pod.nodes()[0]} worker 0: {last_line(result.stderr)}")
    return ip


def run_with_retries(shell: Shell, jobs: list[Job], what: str, poll_s: float) -> None:
    """Setup steps are idempotent: rerun the nodes that failed, a few times."""
    announce(shell, jobs)
    if shell.dry_run:
        return
    for attempt in range(1, SETUP_ATTEMPTS + 1):
        codes = run_parallel(jobs)
        failed = [job for job, code in zip(jobs, codes) if code != 0]
        if not failed:
            return
        if attempt == SETUP_ATTEMPTS:
            job = failed[0]
            raise LaunchError(f"{what} failed on {', '.join(j.label for j in failed)} after {attempt} attempts: "
                              f"{last_line(job.log.read_text()) or 'no output'} (log: {job.log})")
        shell.note(f"{what} failed on {', '.join(j.label for j in failed)}; retrying")
        jobs = failed
        time.sleep(poll_s)


def copy_and_install(shell: Shell, pod: Pod, archive: str, log_dir: Path, poll_s: float) -> None:
    nodes = pod.nodes()
    copies = [Job(node, gcp.scp_cmd(pod, node, archive), log_dir / f"copy-{node}.log") for node in nodes]
    run_with_retries(shell, copies, "copying the checkout", poll_s)
    installs = [Job(node, gcp.ssh_cmd(pod, node, "all", gcp.install_script()), log_dir / f"install-{node}.log")
                for node in nodes]
    run_with_retries(shell, installs, "installing", poll_s)


def worker_jobs(pod: Pod, hosts: int, run_args: list[str], env: dict[str, str], coordinator: str,
                log_dir: Path) -> list[Job]:
    jobs = []
    # Several hosts: each process must join the others (xinst_jax/runtime.py reads this; on TPU VMs
    # the worker list lives in the metadata server, not always in the ssh session's environment).
    multi_host = {"XINST_TPU_POD": "1"} if hosts * pod.num_slices > 1 else {}
    for slice_id, node in enumerate(pod.nodes()):
        script = gcp.run_script(run_args, {**env, **multi_host,
                                           **gcp.megascale_env(slice_id, pod.num_slices, coordinator)})
        for worker in range(hosts):
            label = f"slice {slice_id} worker {worker}" if pod.num_slices > 1 else f"worker {worker}"
            jobs.append(Job(label, gcp.ssh_cmd(pod, node, worker, script),
                            log_dir / f"slice{slice_id}-worker{worker}.log", stream=not jobs))
    return jobs


def run_workers(shell: Shell, jobs: list[Job], log_dir: Path) -> int:
    shell.note(f"every worker at once; worker 0's log follows, all logs go to {log_dir}")
    announce(shell, jobs)
    if shell.dry_run:
        return 0
    codes = run_parallel(jobs)
    failed = [(job, code) for job, code in zip(jobs, codes) if code != 0]
    if not failed:
        print(f"all {len(jobs)} workers finished; logs in {log_dir}", flush=True)
        return 0
    # 255 is ssh's own failure (connection lost), not the run's
    named = ", ".join(f"{job.label} (exit {code}{', ssh' if code == 255 else ''})" for job, code in failed)
    print(f"error: {len(failed)} of {len(jobs)} workers failed: {named}; logs in {log_dir}", file=sys.stderr,
          flush=True)
    return failed[0][1]


def delete(shell: Shell, pod: Pod) -> bool:
    cmd = gcp.delete_qr_cmd(pod)
    shell.note("delete the queued resource and its TPU VMs (also after a failure or Ctrl-C)")
    shell.show(cmd)
    if shell.dry_run:
        return True
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        print(f"error: deleting queued resource {pod.name} failed ({last_line(result.stderr)}); it may still "
              f"be billed: {shlex.join(cmd)}", file=sys.stderr, flush=True)
        return False
    return True


# ---------------------------------------------------------------- arguments

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--zone", required=True)
    p.add_argument("--project", default="", help="default: gcloud's configured project")
    p.add_argument("--type", dest="accelerator", default="", metavar="TYPE",
                   help="accelerator type: v4-32, v5litepod-16 (or v5e-16), v5p-64, v6e-8, ...")
    p.add_argument("--tpu", default="", metavar="NAME", help="run on this existing TPU VM (no create, no delete)")
    p.add_argument("--setup", action="store_true", help="with --tpu: copy and install the checkout first")
    p.add_argument("--name", default="", help="queued resource name (default: xinst-<type>-<time>)")
    p.add_argument("--num-slices", type=int, default=1, help="slices of a multi-slice run")
    capacity = p.add_mutually_exclusive_group()
    capacity.add_argument("--spot", action="store_true", help="spot capacity (preemptible, cheaper)")
    capacity.add_argument("--reserved", action="store_true", help="a reservation of the project")
    p.add_argument("--runtime-version", default="", help="TPU software version (default: by generation)")
    p.add_argument("--timeout-s", type=float, default=3600.0, help="longest wait for ACTIVE")
    p.add_argument("--poll-s", type=float, default=30.0, help="seconds between state checks")
    p.add_argument("--keep", action="store_true", help="keep the queued resource at the end")
    p.add_argument("--internal-ip", action="store_true", help="ssh over internal IPs (running inside the VPC)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment variable for the run on every worker (repeatable)")
    p.add_argument("--log-dir", default="", help="worker logs (default: runs/tpu_vm/<name>)")
    p.add_argument("--dry-run", action="store_true", help="print the commands in order, run nothing")
    return p


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    split = argv.index("--") if "--" in argv else len(argv)
    return argv[:split], argv[split + 1:]


def parse_env(items: list[str]) -> dict[str, str]:
    env = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise LaunchError(f"--env {item!r}: expected KEY=VALUE")
        env[key] = value
    return env


def check_args(args: argparse.Namespace) -> None:
    if args.tpu and (args.num_slices != 1 or args.spot or args.reserved or args.name or args.runtime_version):
        raise LaunchError("--tpu runs on an existing VM: --num-slices, --spot, --reserved, --name and "
                          "--runtime-version only apply when creating one (drop --tpu)")
    if not args.tpu and not args.accelerator:
        raise LaunchError("give --type (e.g. --type v5p-64) to create a TPU, or --tpu NAME for an existing VM")
    if args.num_slices < 1:
        raise LaunchError(f"--num-slices must be >= 1, got {args.num_slices}")
    if args.timeout_s <= 0 or args.poll_s < 0:
        raise LaunchError("--timeout-s must be > 0 and --poll-s >= 0")


def with_slices(run_args: list[str], num_slices: int) -> list[str]:
    """Multi-slice: the data axis spans the slices unless the arguments say otherwise."""
    if num_slices == 1 or any("mesh.dcn_data=" in a for a in run_args):
        return run_args
    return run_args + ["--set", f"mesh.dcn_data={num_slices}"]


def validate_run_config(shell: Shell, run_args: list[str]) -> None:
    """Resolve the config here so a typo fails before any TPU is paid for."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--config", default="")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    known, _ = parser.parse_known_args(run_args)
    if not known.config:
        raise LaunchError("the tpu_run.py arguments need --config NAME, e.g. -- --config sft_xinst")
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    try:
        from xinst_jax.config import ConfigError, load_config
    except ImportError as e:  # this machine may only have gcloud: the workers validate again
        shell.note(f"config not checked here ({e})")
        return
    try:
        load_config(known.config, known.overrides)
    except ConfigError as e:
        raise LaunchError(f"config: {e}") from None


def resolve_accelerator(shell: Shell, args: argparse.Namespace, pod: Pod) -> Accelerator:
    """--type, or (existing VM) what gcloud says the VM is."""
    if args.accelerator:
        return gcp.parse_accelerator(args.accelerator)
    if shell.dry_run:
        raise LaunchError("--dry-run with --tpu needs --type (the worker count comes from it)")
    result = shell.output(gcp.describe_node_cmd(pod, pod.name, "acceleratorType"))
    if result.returncode != 0:
        raise LaunchError(f"cannot describe TPU VM {pod.name}: {last_line(result.stderr)}")
    return gcp.parse_accelerator(result.stdout.strip().rsplit("/", 1)[-1])


# ---------------------------------------------------------------- the two modes

def launch_existing(shell: Shell, args: argparse.Namespace, run_args: list[str], env: dict[str, str]) -> int:
    pod = Pod(args.tpu, args.zone, args.project, internal_ip=args.internal_ip)
    accel = resolve_accelerator(shell, args, pod)
    log_dir = Path(args.log_dir or os.path.join("runs", "tpu_vm", pod.name))
    if args.setup:
        check_tree(shell)
        archive = make_archive(shell, log_dir)
        copy_and_install(shell, pod, archive, log_dir, args.poll_s)
    jobs = worker_jobs(pod, accel.hosts, run_args, env, "", log_dir)
    return run_workers(shell, jobs, log_dir)


def launch_created(shell: Shell, args: argparse.Namespace, run_args: list[str], env: dict[str, str]) -> int:
    accel = gcp.parse_accelerator(args.accelerator)
    name = args.name or f"xinst-{accel.type}-{time.strftime('%m%d-%H%M%S')}"
    pod = Pod(name, args.zone, args.project, args.num_slices, args.internal_ip)
    runtime = args.runtime_version or accel.generation.runtime
    capacity = "spot" if args.spot else "reserved" if args.reserved else "on-demand"
    log_dir = Path(args.log_dir or os.path.join("runs", "tpu_vm", name))
    shell.note(f"{args.num_slices} x {accel.type} ({accel.hosts} worker(s) per slice), {capacity}, "
               f"runtime {runtime}")
    check_zone_offers(shell, pod, accel)
    check_tree(shell)
    archive = make_archive(shell, log_dir)
    try:
        create(shell, pod, accel, runtime, capacity)
    except LaunchError as e:
        return report(e)  # gcloud refused the request: nothing exists to delete
    except KeyboardInterrupt:  # the request may have gone through: delete it below
        return finish(shell, pod, args.keep, report_interrupt())
    try:
        wait_active(shell, pod, args.timeout_s, args.poll_s)
        coordinator = coordinator_ip(shell, pod)
        copy_and_install(shell, pod, archive, log_dir, args.poll_s)
        code = run_workers(shell, worker_jobs(pod, accel.hosts, run_args, env, coordinator, log_dir), log_dir)
    except LaunchError as e:  # reported before the delete's output, which can take minutes
        code = report(e)
    except KeyboardInterrupt:
        code = report_interrupt()
    return finish(shell, pod, args.keep, code)


def finish(shell: Shell, pod: Pod, keep: bool, code: int) -> int:
    """Delete the queued resource unless --keep; a failed delete makes a successful run fail."""
    if keep:
        shell.note(f"kept (--keep); delete it later with: {shlex.join(gcp.delete_qr_cmd(pod))}")
        return code
    try:
        deleted = delete(shell, pod)
    except KeyboardInterrupt:  # a second Ctrl-C: leave, but say what may be left behind
        print(f"error: interrupted while deleting; check with: {shlex.join(gcp.describe_qr_cmd(pod))}",
              file=sys.stderr, flush=True)
        return 130
    return code or (0 if deleted else 1)


def report(error: LaunchError) -> int:
    print(f"error: {error}", file=sys.stderr, flush=True)
    return 2


def report_interrupt() -> int:
    print("interrupted", file=sys.stderr, flush=True)
    return 130


def _sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # same cleanup as Ctrl-C


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    own, run_args = split_argv(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(own)
    if not run_args:
        parser.error("give the tpu_run.py arguments after `--`, e.g. -- --config sft_xinst")
    shell = Shell(dry_run=args.dry_run)
    previous = signal.signal(signal.SIGTERM, _sigterm) if threading.current_thread() is threading.main_thread() \
        else None
    try:
        check_args(args)
        env = parse_env(args.env)
        if not args.tpu:
            run_args = with_slices(run_args, args.num_slices)
        validate_run_config(shell, run_args)
        if not args.dry_run:
            check_gcloud()
        launch = launch_existing if args.tpu else launch_created
        return launch(shell, args, run_args, env)
    except LaunchError as e:
        return report(e)
    except KeyboardInterrupt:
        return report_interrupt()
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
