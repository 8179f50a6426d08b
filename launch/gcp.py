"""The gcloud command lines `launch/tpu_vm.py` runs, built here without running anything.

Cloud TPU facts they rely on (Google Cloud's TPU docs):
  * runtime (software) version per generation: v4 `tpu-ubuntu2204-base`, v5e
    `v2-alpha-tpuv5-lite`, v5p `v2-alpha-tpuv5`, v6e `v2-alpha-tpuv6e`;
  * accelerator types count TensorCores for v4 and v5p (2 per chip) and chips for v5e and v6e;
    a host drives 4 chips, except that v5e and v6e slices of up to 8 chips are one host;
  * a multi-slice queued resource names its nodes `<node-prefix>-0 .. -<N-1>`;
  * on multi-slice, libtpu and jax read MEGASCALE_COORDINATOR_ADDRESS (worker 0 of slice 0),
    MEGASCALE_NUM_SLICES and MEGASCALE_SLICE_ID. Queued resources also publish them in the VM
    metadata; the launcher sets them explicitly so a run does not depend on that.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass

REMOTE_DIR = "xinst_jax"  # the checkout on every worker, under the ssh user's home
REMOTE_VENV = "xinst_venv"  # its virtual environment (TPU images ship Python 3.10; setup.py needs 3.11)
REMOTE_PYTHON = "3.11"
ARCHIVE = "xinst_jax.tar.gz"
MEGASCALE_PORT = 8080
COORDINATOR_PLACEHOLDER = "<ip of worker 0 of slice 0>"
# The workers read and write gs:// with the VM's service account: the full scope leaves access
# to IAM on the bucket instead of to a narrower default scope.
SCOPES = "https://www.googleapis.com/auth/cloud-platform"


class LaunchError(Exception):
    """A user-facing problem: printed as one line, exit code 2."""


@dataclass(frozen=True)
class Generation:
    prefix: str  # as gcloud spells it in accelerator types
    runtime: str  # the TPU software version for JAX
    cores_per_chip: int  # what the type's number counts: TensorCores (2 per chip) or chips
    single_host_chips: int  # slices up to this many chips are one host


GENERATIONS = {
    "v4": Generation("v4", "tpu-ubuntu2204-base", 2, 4),
    "v5litepod": Generation("v5litepod", "v2-alpha-tpuv5-lite", 1, 8),
    "v5p": Generation("v5p", "v2-alpha-tpuv5", 2, 4),
    "v6e": Generation("v6e", "v2-alpha-tpuv6e", 1, 8),
}
ALIASES = {"v5e": "v5litepod"}
CHIPS_PER_HOST = 4


@dataclass(frozen=True)
class Accelerator:
    generation: Generation
    size: int  # the number in the type

    @property
    def type(self) -> str:
        return f"{self.generation.prefix}-{self.size}"

    @property
    def chips(self) -> int:
        return max(1, self.size // self.generation.cores_per_chip)

    @property
    def hosts(self) -> int:
        """Workers (TPU VMs) per slice: one ssh target each."""
        if self.chips <= self.generation.single_host_chips:
            return 1
        return self.chips // CHIPS_PER_HOST


def parse_accelerator(name: str) -> Accelerator:
    """'v5e-16' -> v5litepod-16; the generations this launcher knows, else LaunchError."""
    match = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", name.strip().lower())
    prefix = ALIASES.get(match.group(1), match.group(1)) if match else ""
    if not match or prefix not in GENERATIONS or int(match.group(2)) < 1:
        known = ", ".join(["v4-32", "v5litepod-16 (or v5e-16)", "v5p-64", "v6e-8"])
        raise LaunchError(f"--type {name!r}: expected an accelerator type such as {known}")
    return Accelerator(GENERATIONS[prefix], int(match.group(2)))


@dataclass(frozen=True)
class Pod:
    """Where the run goes: a queued resource of `num_slices` slices, or one existing TPU VM."""

    name: str  # queued resource id (node id for one slice, node prefix for several), or the VM
    zone: str
    project: str = ""
    num_slices: int = 1
    internal_ip: bool = False

    def nodes(self) -> list[str]:
        if self.num_slices == 1:
            return [self.name]
        return [f"{self.name}-{i}" for i in range(self.num_slices)]

    def scope(self) -> list[str]:
        return [f"--zone={self.zone}"] + ([f"--project={self.project}"] if self.project else [])


def accelerator_types_cmd(pod: Pod) -> list[str]:
    return ["gcloud", "compute", "tpus", "accelerator-types", "list", *pod.scope(), "--format=value(type)"]


def create_cmd(pod: Pod, accel: Accelerator, runtime: str, capacity: str) -> list[str]:
    """capacity: 'spot', 'reserved' or 'on-demand' (no flag)."""
    cmd = ["gcloud", "compute", "tpus", "queued-resources", "create", pod.name, *pod.scope(),
           f"--accelerator-type={accel.type}", f"--runtime-version={runtime}", f"--scopes={SCOPES}"]
    if pod.num_slices == 1:
        cmd.append(f"--node-id={pod.name}")
    else:
        cmd += [f"--node-count={pod.num_slices}", f"--node-prefix={pod.name}"]
    if capacity in ("spot", "reserved"):
        cmd.append(f"--{capacity}")
    return cmd


def describe_qr_cmd(pod: Pod) -> list[str]:
    # state, then gcloud's reason when it failed (tab-separated by value())
    return ["gcloud", "compute", "tpus", "queued-resources", "describe", pod.name, *pod.scope(),
            "--format=value(state.state,state.failedData.error.message)"]


def delete_qr_cmd(pod: Pod) -> list[str]:
    # --force deletes the TPU VMs with the request; --quiet answers the confirmation prompt
    return ["gcloud", "compute", "tpus", "queued-resources", "delete", pod.name, *pod.scope(), "--force", "--quiet"]


def describe_node_cmd(pod: Pod, node: str, field: str) -> list[str]:
    return ["gcloud", "compute", "tpus", "tpu-vm", "describe", node, *pod.scope(), f"--format=value({field})"]


def coordinator_cmd(pod: Pod) -> list[str]:
    return describe_node_cmd(pod, pod.nodes()[0], "networkEndpoints[0].ipAddress")


def _ssh_flags(pod: Pod) -> list[str]:
    # --quiet: no prompt (ssh key creation) from many gcloud processes at once
    return (["--internal-ip"] if pod.internal_ip else []) + ["--quiet"]


def scp_cmd(pod: Pod, node: str, archive: str) -> list[str]:
    return ["gcloud", "compute", "tpus", "tpu-vm", "scp", archive, f"{node}:{ARCHIVE}", *pod.scope(),
            "--worker=all", *_ssh_flags(pod)]


def ssh_cmd(pod: Pod, node: str, worker: int | str, command: str) -> list[str]:
    return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", node, *pod.scope(), f"--worker={worker}",
            f"--command={command}", *_ssh_flags(pod)]


def archive_cmd(archive: str) -> list[str]:
    # tracked files of HEAD only: no virtualenvs, run directories or uncommitted edits travel
    return ["git", "archive", "--format=tar.gz", "-o", archive, "HEAD"]


def install_script() -> str:
    """Unpack and install on a worker. uv brings Python 3.11 when the image's python3 is older."""
    venv_python = f"~/{REMOTE_VENV}/bin/python"
    return " && ".join([
        "set -e",
        f"mkdir -p {REMOTE_DIR}",
        f"tar -xzf {ARCHIVE} -C {REMOTE_DIR}",
        "python3 -m pip install -q --user uv",
        f"python3 -m uv venv -q --allow-existing --python {REMOTE_PYTHON} ~/{REMOTE_VENV}",
        f"cd {REMOTE_DIR}",
        f"python3 -m uv pip install -q --python {venv_python} -e '.[tpu,data]'",
    ])


def megascale_env(slice_id: int, num_slices: int, coordinator_ip: str) -> dict[str, str]:
    if num_slices == 1:
        return {}
    return {"MEGASCALE_COORDINATOR_ADDRESS": f"{coordinator_ip}:{MEGASCALE_PORT}",
            "MEGASCALE_NUM_SLICES": str(num_slices), "MEGASCALE_SLICE_ID": str(slice_id)}


def run_script(run_args: list[str], env: dict[str, str]) -> str:
    """The same tpu_run.py command on every worker; only the environment differs by slice."""
    assignments = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
    prefix = f"{assignments} " if assignments else ""
    # the venv of install_script(), else the image's python3 (a VM set up by hand)
    python = f"PY=~/{REMOTE_VENV}/bin/python; [ -x $PY ] || PY=python3"
    return f"{python}; cd {REMOTE_DIR} && {prefix}$PY launch/tpu_run.py {shlex.join(run_args)} 2>&1"
