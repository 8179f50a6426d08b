"""launch/tpu_vm.py: the gcloud commands its dry-run prints (v4-32, v5e-16, v5p-64, 2 x v5e-256),
and its real control flow against a fake `gcloud` first on PATH (a script that logs its argv and
answers like gcloud): create, wait for ACTIVE, copy, install, one ssh per worker, delete. No
network, no GCP project."""

import importlib.util
import json
import os
import shlex
import stat
import sys

import pytest

from conftest import REPO_ROOT
from data_helpers import readme_pod_commands, run_sets

TPU_VM = os.path.join(REPO_ROOT, "launch", "tpu_vm.py")
RUN_ARGS = ["--", "--config", "tiny_synthetic", "--set", "train.steps=2"]


def load_tpu_vm():
    spec = importlib.util.spec_from_file_location("tpu_vm", TPU_VM)
    module = importlib.util.module_from_spec(spec)
    sys.modules["tpu_vm"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


tpu_vm = load_tpu_vm()


def dry_run(capsys, *flags: str, run_args=RUN_ARGS) -> list[list[str]]:
    """The commands a dry run prints (comment lines dropped), each as argv."""
    code = tpu_vm.main(["--zone", "us-east5-b", "--name", "t", "--dry-run", *flags, *run_args])
    out = capsys.readouterr().out
    assert code == 0, out
    return [shlex.split(line) for line in out.splitlines() if line and not line.startswith("#")]


def find(cmds, *words):
    return [c for c in cmds if all(w in c for w in words)]


def flag(cmd, name):
    values = [a.split("=", 1)[1] for a in cmd if a.startswith(f"--{name}=")]
    return values[0] if values else None


def worker_ssh(cmds):
    return [c for c in find(cmds, "ssh") if flag(c, "worker") != "all"]


@pytest.mark.parametrize("type_, accel, runtime, hosts, capacity", [
    ("v4-32", "v4-32", "tpu-ubuntu2204-base", 4, ""),
    ("v5e-16", "v5litepod-16", "v2-alpha-tpuv5-lite", 4, "--spot"),
    ("v5p-64", "v5p-64", "v2-alpha-tpuv5", 8, "--reserved"),
    ("v6e-8", "v6e-8", "v2-alpha-tpuv6e", 1, "--spot"),
])
def test_dry_run_single_slice(capsys, type_, accel, runtime, hosts, capacity):
    cmds = dry_run(capsys, "--type", type_, *([capacity] if capacity else []))
    assert cmds[0][:5] == ["gcloud", "compute", "tpus", "accelerator-types", "list"]
    assert cmds[1][:2] == ["git", "archive"]
    create = cmds[2]
    assert create[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "t"]
    assert flag(create, "accelerator-type") == accel and flag(create, "runtime-version") == runtime
    assert flag(create, "node-id") == "t" and flag(create, "node-count") is None
    assert ("--spot" in create, "--reserved" in create) == (capacity == "--spot", capacity == "--reserved")
    assert find(cmds, "queued-resources", "describe")
    assert flag(find(cmds, "scp")[0], "worker") == "all" and flag(find(cmds, "ssh")[0], "worker") == "all"
    workers = worker_ssh(cmds)
    assert [flag(c, "worker") for c in workers] == [str(w) for w in range(hosts)]
    run = flag(workers[0], "command")
    assert "launch/tpu_run.py --config tiny_synthetic --set train.steps=2" in run
    assert "MEGASCALE" not in run and "dcn_data" not in run
    assert ("XINST_TPU_POD=1" in run) == (hosts > 1)  # several hosts must join one jax.distributed run
    assert cmds[-1][:6] == ["gcloud", "compute", "tpus", "queued-resources", "delete", "t"]
    assert "--force" in cmds[-1]


def test_dry_run_two_v5e_256_slices(capsys):
    cmds = dry_run(capsys, "--type", "v5e-256", "--num-slices", "2", "--spot")
    create = find(cmds, "queued-resources", "create")[0]
    assert flag(create, "accelerator-type") == "v5litepod-256"
    assert flag(create, "runtime-version") == "v2-alpha-tpuv5-lite"
    assert flag(create, "node-count") == "2" and flag(create, "node-prefix") == "t" and "--spot" in create
    assert flag(create, "node-id") is None
    coordinator = find(cmds, "tpu-vm", "describe")[0]
    assert "t-0" in coordinator and flag(coordinator, "format") == "value(networkEndpoints[0].ipAddress)"
    assert sorted(c[c.index("scp") + 2].split(":")[0] for c in find(cmds, "scp")) == ["t-0", "t-1"]
    workers = worker_ssh(cmds)
    assert len(workers) == 2 * 64
    for slice_id, node in enumerate(["t-0", "t-1"]):
        mine = [c for c in workers if c[c.index("ssh") + 1] == node]
        assert [flag(c, "worker") for c in mine] == [str(w) for w in range(64)]
        run = flag(mine[0], "command")
        assert f"MEGASCALE_SLICE_ID={slice_id}" in run and "MEGASCALE_NUM_SLICES=2" in run
        assert "MEGASCALE_COORDINATOR_ADDRESS=" in run and "XINST_TPU_POD=1" in run
        assert "--set mesh.dcn_data=2" in run  # the data axis spans the slices
    assert find(cmds, "queued-resources", "delete") == [cmds[-1]]


def test_dry_run_keep_has_no_delete_and_runtime_override(capsys):
    cmds = dry_run(capsys, "--type", "v4-8", "--keep", "--runtime-version", "tpu-vm-custom")
    assert flag(find(cmds, "create")[0], "runtime-version") == "tpu-vm-custom"
    assert not find(cmds, "delete")
    assert len(worker_ssh(cmds)) == 1


def test_dry_run_multislice_keeps_an_explicit_dcn_setting(capsys):
    cmds = dry_run(capsys, "--type", "v5e-16", "--num-slices", "2",
                   run_args=RUN_ARGS + ["--set", "mesh.dcn_data=2"])
    assert flag(worker_ssh(cmds)[0], "command").count("mesh.dcn_data") == 1


@pytest.mark.parametrize("flags, message", [
    (["--type", "v9-8"], "--type 'v9-8'"),
    (["--tpu", "vm", "--num-slices", "2"], "--tpu runs on an existing VM"),
    ([], "give --type"),
    (["--type", "v4-8", "--env", "NOEQUALS"], "--env 'NOEQUALS'"),
])
def test_usage_errors_are_one_line(capsys, flags, message):
    assert tpu_vm.main(["--zone", "z", "--dry-run", *flags, *RUN_ARGS]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1


def test_config_is_checked_before_anything_runs(capsys):
    code = tpu_vm.main(["--zone", "z", "--type", "v4-8", "--dry-run", "--", "--config", "tiny_synthetic",
                        "--set", "train.no_such_key=1"])
    out, err = capsys.readouterr()
    assert code == 2 and err.startswith("error: config:") and err.count("\n") == 1
    assert "gcloud" not in out


# ---------------------------------------------------------------- real control flow, fake gcloud

FAKE_GCLOUD = r'''#!{python}
import json, os, sys
args = sys.argv[1:]
log = os.environ["FAKE_GCLOUD_LOG"]
with open(log, "a") as f:
    f.write(json.dumps(args) + "\n")

def flag(name):
    return next((a.split("=", 1)[1] for a in args if a.startswith("--" + name + "=")), None)

if "accelerator-types" in args:
    print("\n".join(os.environ.get("FAKE_TYPES", "v4-8 v4-32 v5litepod-16").split()))
elif "create" in args and os.environ.get("FAKE_CREATE_ERROR"):
    print(os.environ["FAKE_CREATE_ERROR"], file=sys.stderr)
    sys.exit(1)
elif "queued-resources" in args and "describe" in args:
    with open(log + ".describes", "a+") as f:
        f.write("x")
        f.seek(0)
        n = len(f.read())
    states = os.environ["FAKE_STATES"].split(",")
    state = states[min(n, len(states)) - 1]
    print(state + ("\tno capacity in zone" if state == "FAILED" else ""))
elif "tpu-vm" in args and "describe" in args:
    print("v4-8" if flag("format") == "value(acceleratorType)" else "10.0.0.2")
elif "ssh" in args and flag("worker") != "all":
    node = args[args.index("ssh") + 1]
    print(node + " worker " + flag("worker") + " says hello", flush=True)
    sys.exit(json.loads(os.environ.get("FAKE_SSH_EXIT", "{}")).get(node + ":" + flag("worker"), 0))
'''


@pytest.fixture
def fake_gcloud(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "gcloud"
    script.write_text(FAKE_GCLOUD.replace("{python}", sys.executable))
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    log = tmp_path / "gcloud.log"
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_GCLOUD_LOG", str(log))
    monkeypatch.setenv("FAKE_STATES", "PROVISIONING,ACTIVE")

    def calls() -> list[list[str]]:
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    return calls


def launch(tmp_path, *flags: str) -> int:
    return tpu_vm.main(["--zone", "us-east5-b", "--name", "qr", "--poll-s", "0", "--log-dir",
                        str(tmp_path / "logs"), *flags, *RUN_ARGS])


def verbs(calls) -> list[str]:
    """Each gcloud call as 'group verb' (e.g. 'queued-resources create', 'tpu-vm ssh')."""
    return [f"{c[2]} {c[3]}" for c in calls]


def test_missing_gcloud_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert launch(tmp_path, "--type", "v4-8") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: gcloud is not on PATH") and err.count("\n") == 1


def test_full_run_then_delete(tmp_path, fake_gcloud, capsys):
    assert launch(tmp_path, "--type", "v4-32") == 0
    out = capsys.readouterr().out
    calls = fake_gcloud()
    assert verbs(calls)[:4] == ["accelerator-types list", "queued-resources create",
                                "queued-resources describe", "queued-resources describe"]
    assert verbs(calls)[-1] == "queued-resources delete"
    workers = [c for c in calls if c[3] == "ssh" and flag(c, "worker") != "all"]
    assert sorted(flag(c, "worker") for c in workers) == ["0", "1", "2", "3"]
    assert "qr worker 0 says hello" in out and "qr worker 1 says hello" not in out  # worker 0 streams
    assert "qr worker 3 says hello" in (tmp_path / "logs" / "slice0-worker3.log").read_text()
    assert (tmp_path / "logs" / "xinst_jax.tar.gz").stat().st_size > 0


def test_failed_queued_resource_is_reported_and_deleted(tmp_path, fake_gcloud, monkeypatch, capsys):
    monkeypatch.setenv("FAKE_STATES", "WAITING_FOR_RESOURCES,PROVISIONING,FAILED")
    assert launch(tmp_path, "--type", "v4-32", "--spot") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: queued resource qr is FAILED: no capacity in zone") and err.count("\n") == 1
    calls = verbs(fake_gcloud())
    assert calls.count("queued-resources describe") == 3 and "tpu-vm ssh" not in calls
    assert calls[-1] == "queued-resources delete"


def test_wait_is_bounded(tmp_path, fake_gcloud, monkeypatch, capsys):
    monkeypatch.setenv("FAKE_STATES", "WAITING_FOR_RESOURCES")
    assert launch(tmp_path, "--type", "v4-8", "--timeout-s", "0.01") == 2
    assert "not ACTIVE after 0.01 s (last state WAITING_FOR_RESOURCES)" in capsys.readouterr().err
    assert verbs(fake_gcloud())[-1] == "queued-resources delete"


def test_zone_without_the_type(tmp_path, fake_gcloud, capsys):
    assert launch(tmp_path, "--type", "v5p-64") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: zone us-east5-b does not offer v5p-64: it offers no v5p types")
    assert err.count("\n") == 1
    assert verbs(fake_gcloud()) == ["accelerator-types list"]  # nothing created, nothing to delete


def test_refused_create_is_one_line_and_nothing_to_delete(tmp_path, fake_gcloud, monkeypatch, capsys):
    monkeypatch.setenv("FAKE_CREATE_ERROR", "ERROR: (gcloud.compute.tpus.queued-resources.create) INVALID_ARGUMENT: "
                       "Accelerator type v4-32 is not available in zone us-east5-b.")
    assert launch(tmp_path, "--type", "v4-32") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: zone us-east5-b does not offer v4-32: ERROR:") and err.count("\n") == 1
    assert verbs(fake_gcloud()) == ["accelerator-types list", "queued-resources create"]


def test_ctrl_c_during_the_run_still_deletes(tmp_path, fake_gcloud, monkeypatch, capsys):
    def interrupted(jobs):
        if any(flag(job.cmd, "worker") == "0" for job in jobs):
            raise KeyboardInterrupt
        return [0] * len(jobs)

    monkeypatch.setattr(tpu_vm, "run_parallel", interrupted)
    assert launch(tmp_path, "--type", "v4-32") == 130
    assert "interrupted" in capsys.readouterr().err
    assert verbs(fake_gcloud())[-1] == "queued-resources delete"


def test_failed_worker_is_named(tmp_path, fake_gcloud, monkeypatch, capsys):
    monkeypatch.setenv("FAKE_SSH_EXIT", json.dumps({"qr:2": 1}))
    assert launch(tmp_path, "--type", "v4-32") == 1
    err = capsys.readouterr().err
    assert "error: 1 of 4 workers failed: worker 2 (exit 1)" in err
    assert verbs(fake_gcloud())[-1] == "queued-resources delete"


def test_keep_does_not_delete(tmp_path, fake_gcloud, capsys):
    assert launch(tmp_path, "--type", "v4-8", "--keep") == 0
    assert "queued-resources delete" not in verbs(fake_gcloud())
    assert "kept (--keep)" in capsys.readouterr().out


def test_multislice_workers_get_the_megascale_env(tmp_path, fake_gcloud, capsys):
    assert launch(tmp_path, "--type", "v5e-16", "--num-slices", "2") == 0
    calls = fake_gcloud()
    workers = [c for c in calls if c[3] == "ssh" and flag(c, "worker") != "all"]
    assert len(workers) == 8
    for c in workers:
        slice_id = int(c[4].rsplit("-", 1)[1])
        run = flag(c, "command")
        assert "MEGASCALE_COORDINATOR_ADDRESS=10.0.0.2:8080" in run and f"MEGASCALE_SLICE_ID={slice_id}" in run


def test_existing_vm_runs_without_create_or_delete(tmp_path, fake_gcloud, capsys):
    code = tpu_vm.main(["--zone", "z", "--tpu", "myvm", "--setup", "--log-dir", str(tmp_path / "logs"),
                        *RUN_ARGS])
    assert code == 0
    calls = verbs(fake_gcloud())
    assert calls == ["tpu-vm describe", "tpu-vm scp", "tpu-vm ssh", "tpu-vm ssh"]  # v4-8: one worker


# ---------------------------------------------------------------- the README's pod commands

def test_readme_pod_commands_dry_run(capsys):
    env, commands = readme_pod_commands()
    assert {"PROJECT", "ZONE", "BUCKET"} <= set(env) and len(commands) >= 2
    for argv in commands:
        sets = run_sets(argv)
        for key in ("train.init_from", "data.tokenizer", "checkpoint.dir", "export.out", "data.prepared_dir"):
            assert any(a.startswith(f"{key}=gs://") for a in sets), (key, argv)
        assert tpu_vm.main(argv[:argv.index("--")] + ["--dry-run"] + argv[argv.index("--"):]) == 0, \
            capsys.readouterr().err
        out = capsys.readouterr().out
        assert "queued-resources create" in out and "queued-resources delete" in out


@pytest.mark.parametrize("env, expected", [
    ({}, False),
    ({"XINST_TPU_POD": "1"}, True),  # set by this launcher on every worker of a multi-host slice
    ({"MEGASCALE_NUM_SLICES": "2"}, True),
    ({"MEGASCALE_NUM_SLICES": "1"}, False),
    ({"TPU_WORKER_HOSTNAMES": "10.0.0.2,10.0.0.3"}, True),
    ({"TPU_WORKER_HOSTNAMES": "localhost"}, False),
])
def test_runtime_joins_the_other_hosts_when_the_launcher_says_so(monkeypatch, env, expected):
    from xinst_jax.runtime import is_multi_host_tpu

    for key in ("XINST_TPU_POD", "MEGASCALE_NUM_SLICES", "TPU_WORKER_HOSTNAMES"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert is_multi_host_tpu() is expected
