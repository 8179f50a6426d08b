"""The `generate` job: input schema and bad lines (the records reader of prepare), shards and
done-markers, resume after a real `kill -9`, the process split, and the shipped offline demo
through the entry point. That its prompts equal prepare's: test_tasks.py."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from xinst_jax.config import ConfigError, load_config
from xinst_jax.data.tokenizer import ByteTokenizer
from xinst_jax.infer.job import DEMO_PROMPTS, output_text, read_input, run_generate, sampling_settings
from xinst_jax.shards import shard_paths, shards_for_process
from xinst_jax.tasks import Task

REPO = Path(__file__).resolve().parent.parent
ENTRY = REPO / "launch" / "tpu_run.py"


def job_config(tmp_path: Path, input_path: Path, *extra: str):
    overrides = [f"run_dir={tmp_path / 'run'}", f"generate.input={input_path}", f"generate.output={tmp_path / 'out'}",
                 "generate.max_new_tokens=6", "generate.batch_size=2", "generate.shard_size=2",
                 "generate.prompt_buckets=[32,64]", "generate.progress=false", "mesh.num_devices=1", *extra]
    return load_config("generate_demo", overrides)


def write_lines(path: Path, lines: list[str | bytes]) -> Path:
    with open(path, "wb") as f:
        for line in lines:
            f.write(line if isinstance(line, bytes) else line.encode("utf-8"))
            f.write(b"\n")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


GOOD = [
    json.dumps({"id": "a", "prompt": "Write a question about rivers."}),
    json.dumps({"id": 7, "instruction": "Summarise.", "text": "The cat sat on the mat."}),
    json.dumps({"id": "c", "text": "กรุงเทพมหานครเป็นเมืองหลวง", "extra": [1, 2]}),
    json.dumps({"id": "d", "instruction": "Translate into English: Habari ya asubuhi"}),
    json.dumps({"id": "e", "prompt": "پاکستان کا دارالحکومت"}, ensure_ascii=False),
]


# --------------------------------------------------------------------------- pieces


def read_prompts(cfg, path: Path) -> tuple[list[tuple], dict]:
    """(id as written, line, prompt text) of the valid records, and the reader's counts."""
    task = Task.from_generate_config(cfg.generate, ByteTokenizer())
    reader, records = read_input(cfg, task, path)
    got = [(loc.source_id, loc.line, task.prompt_text(loc.record)) for loc in records]
    return got, reader.totals()


def test_input_schema(tmp_path):
    good = [b'{"id": 1, "prompt": "p"}', b'{"id": "x", "instruction": "i", "text": "t"}',
            b'{"id": "y", "text": "t", "prompt": ""}']  # an empty prompt falls back to the text
    bad = [(b'{"id": 1, "prompt": "p"', "malformed_json"), (b'[1, 2]', "not_object"),
           (b'{"prompt": "p"}', "missing_field:id"), (b'{"id": [1], "prompt": "p"}', "bad_type:id"),
           (b'{"id": true, "prompt": "p"}', "bad_type:id"), (b'{"id": 1}', "missing_field:prompt|instruction|text"),
           (b'{"id": 1, "prompt": 3}', "bad_type:prompt"), (b'{"id": 1, "text": ""}',
                                                             "missing_field:prompt|instruction|text"),
           (b'\xff\xfe{"id": 1}', "invalid_utf8")]
    path = write_lines(tmp_path / "in.jsonl", good + [raw for raw, _ in bad])
    cfg = job_config(tmp_path, path, "generate.join=' | '")
    got, totals = read_prompts(cfg, path)
    assert got == [(1, 1, "p"), ("x", 2, "i | t"), ("y", 3, "t")]  # ids as written: 1 stays an integer
    want: dict[str, int] = {}
    for _, reason in bad:
        want[reason] = want.get(reason, 0) + 1
    assert totals["skipped"] == want and totals["in"] == len(good) + len(bad) == totals["kept"] + sum(want.values())


def test_templates_that_name_the_language_need_one(tmp_path):
    lines = [json.dumps({"id": 1, "instruction": "Say hello.", "lang": "sw"}),
             json.dumps({"id": 2, "instruction": "Say hello."}),  # generate.lang fills it
             json.dumps({"id": 3, "instruction": "Say hello.", "lang": "xx"}), json.dumps({"id": 4, "text": "t"})]
    path = write_lines(tmp_path / "in.jsonl", lines)
    got, totals = read_prompts(job_config(tmp_path, path, "generate.template=sft", "generate.lang=th"), path)
    assert [(i, line) for i, line, _ in got] == [(1, 1), (2, 2)]
    assert got[0][2].endswith("Say hello. Answer in Swahili. \n\n### Response:") and "Answer in Thai." in got[1][2]
    assert totals["skipped"] == {"unknown_lang:lang": 1, "missing_field:instruction": 1}
    got, totals = read_prompts(job_config(tmp_path, path, "generate.template=sft"), path)
    assert [i for i, _, _ in got] == [1] and totals["skipped"]["missing_field:lang"] == 2  # lines 2 and 4
    got, _ = read_prompts(job_config(tmp_path, path), path)  # raw ignores lang
    assert [i for i, _, _ in got] == [1, 2, 3, 4]


def test_strict_names_file_line_and_field(tmp_path):
    path = write_lines(tmp_path / "in.jsonl", [GOOD[0], json.dumps({"id": "x", "prompt": 3})])
    with pytest.raises(ConfigError, match=rf"^{path}:2: prompt: bad_type \(int\) \[generate.strict is true\]$"):
        run_generate(job_config(tmp_path, path, "generate.strict=true"))


def test_process_split_covers_every_shard_once():
    for shards in (0, 1, 5, 12, 13):
        for count in (1, 2, 3, 4, 7):
            for split in ("contiguous", "strided"):
                parts = [shards_for_process(shards, p, count, split) for p in range(count)]
                flat = sorted(k for part in parts for k in part)
                assert flat == list(range(shards)), (shards, count, split)
                assert max(map(len, parts)) - min(map(len, parts)) <= 1  # balanced
                if split == "contiguous":
                    assert all(part == list(range(part[0], part[0] + len(part))) for part in parts if part)
                    assert [k for part in parts for k in part] == list(range(shards))  # process order = input order
                else:
                    assert all(all(k % count == p for k in part) for p, part in enumerate(parts))


def test_stop_strings_end_rows_and_are_cut(tmp_path):
    cfg = job_config(tmp_path, DEMO_PROMPTS, "generate.stop_strings=['##', 'END']", "generate.stop_token_ids=[7]")
    tok = ByteTokenizer()
    settings = sampling_settings(cfg, cfg.model, tok)
    assert settings.stop_sequences == (tuple(b + 3 for b in b"##"), tuple(b + 3 for b in b"END"))  # no BOS
    assert set(settings.stop_token_ids) == {7, cfg.model.eos_token_id}
    assert (settings.temperature, settings.top_p, settings.top_k, settings.no_repeat_ngram) == (0.7, 0.9, 50, 6)
    text, finish = output_text(tok, tok.encode("abc##def") + [tok.eos_id], "stop", settings, ["##", "END"])
    assert (text, finish) == ("abc", "stop")
    assert output_text(tok, tok.encode("abcd"), "length", settings, ["##"]) == ("abcd", "length")
    assert output_text(tok, tok.encode("ab") + [7], "stop", settings, []) == ("ab", "stop")


# --------------------------------------------------------------------------- the job, in process


def test_bad_lines_are_skipped_and_reported(tmp_path, capsys):
    lines = [GOOD[0], "{not json", GOOD[1], json.dumps({"prompt": "no id"}), "", json.dumps({"id": "x"}),
             GOOD[2], json.dumps([1, 2, 3]), json.dumps({"id": {"a": 1}, "prompt": "p"}), b"\xff\xfe garbage",
             GOOD[3], json.dumps({"id": "y", "prompt": 12}), "   ", GOOD[4]]
    inp = write_lines(tmp_path / "in.jsonl", lines)
    report = run_generate(job_config(tmp_path, inp))
    reasons = {2: "-: malformed_json", 4: "id: missing_field", 6: "prompt|instruction|text: missing_field",
               8: "-: not_object", 9: "id: bad_type", 10: "-: invalid_utf8", 12: "prompt: bad_type"}
    assert [b.split(" (")[0] for b in report["bad"]] == [f"{inp}:{n}: {r}" for n, r in reasons.items()]
    assert report["skipped"] == {"malformed_json": 1, "missing_field:id": 1, "missing_field:prompt|instruction|text": 1,
                                 "not_object": 1, "bad_type:id": 1, "invalid_utf8": 1, "bad_type:prompt": 1}
    assert report["blank_lines"] == 2 and report["template"] == "raw"
    assert report["records"] == 5 and report["bad_lines"] == 7 and report["shards"] == 3
    out = capsys.readouterr().out
    for b in report["bad"]:
        assert b in out
    rows = read_jsonl(tmp_path / "out" / "output.jsonl")
    assert [r["id"] for r in rows] == ["a", 7, "c", "d", "e"]
    assert [r["line"] for r in rows] == [1, 3, 7, 11, 14]
    for r in rows:
        assert set(r) == {"id", "line", "output", "finish_reason", "prompt_tokens", "output_tokens", "truncated"}
        assert r["finish_reason"] in ("stop", "length") and 1 <= r["output_tokens"] <= 6
    # prompt_tokens = BOS + the prompt's UTF-8 bytes (instruction and text joined by generate.join)
    assert rows[1]["prompt_tokens"] == 1 + len("Summarise.\n\nThe cat sat on the mat.".encode())
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["bad"] == report["bad"] and saved["merged"].endswith("output.jsonl")


def test_rerun_skips_done_shards_and_redoes_unfinished(tmp_path):
    inp = write_lines(tmp_path / "in.jsonl", GOOD)
    cfg = job_config(tmp_path, inp)
    first = run_generate(cfg)
    assert (first["shards"], first["shards_generated"], first["shards_reused"]) == (3, 3, 0)
    out = tmp_path / "out"
    merged = (out / "output.jsonl").read_bytes()
    assert len(read_jsonl(out / "output.jsonl")) == 5

    again = run_generate(cfg)  # everything done: nothing is generated, same output
    assert (again["shards_generated"], again["shards_reused"]) == (0, 3)
    assert (out / "output.jsonl").read_bytes() == merged

    part1, done1 = shard_paths(out, 1)  # shard 1 lost its marker mid-write; shard 2 is half written
    done1.unlink()
    part2, done2 = shard_paths(out, 2)
    part2.write_bytes(part2.read_bytes()[:10])
    (out / "output.jsonl").unlink()
    (out / "part-00002.jsonl.tmp-999").write_text("stale")
    third = run_generate(cfg)
    assert (third["shards_generated"], third["shards_reused"]) == (2, 1)
    assert (out / "output.jsonl").read_bytes() == merged  # regenerated shards are identical


def test_other_settings_in_the_same_output_are_refused(tmp_path):
    inp = write_lines(tmp_path / "in.jsonl", GOOD[:2])
    run_generate(job_config(tmp_path, inp))
    with pytest.raises(ConfigError, match="another run.*settings"):
        run_generate(job_config(tmp_path, inp, "generate.max_new_tokens=7"))
    write_lines(inp, GOOD[:3])
    with pytest.raises(ConfigError, match="input_sha256"):
        run_generate(job_config(tmp_path, inp))


def test_weights_from_checkpoint_or_hf_dir(tmp_path):
    """generate.checkpoint (a trainer checkpoint) and generate.hf_dir (a HF directory) load the same
    weights: same greedy outputs, equal to the engine run directly, unlike the random init."""
    import jax
    import jax.numpy as jnp

    from xinst_jax.checkpoint import Checkpointer
    from xinst_jax.config import CheckpointConfig, to_dict
    from xinst_jax.convert.hf import export_hf
    from xinst_jax.infer.generate import Engine
    from xinst_jax.model.llama import init_params

    inp = write_lines(tmp_path / "in.jsonl", GOOD)
    greedy = ("generate.temperature=0", "generate.no_repeat_ngram=0")
    cfg = job_config(tmp_path, inp, *greedy)
    params = jax.tree.map(lambda x: x * 6.0 if x.ndim >= 2 else x,  # larger weights: decisive argmaxes
                          init_params(cfg.model, jax.random.PRNGKey(42)))
    ckpt = Checkpointer(tmp_path / "ckpt", CheckpointConfig(async_save=False))
    ckpt.save(5, {"step": jnp.int32(5), "params": params}, {}, to_dict(cfg), force=True)
    ckpt.close()
    export_hf(params, cfg.model, tmp_path / "hf", dtype="float32")

    outputs = {}
    for name, source in [("ckpt", f"generate.checkpoint={tmp_path / 'ckpt' / '5'}"),
                         ("hf", f"generate.hf_dir={tmp_path / 'hf'}"), ("random", "generate.checkpoint=")]:
        report = run_generate(job_config(tmp_path, inp, *greedy, source, f"generate.output={tmp_path / name}"))
        assert report["model"].startswith({"ckpt": "checkpoint", "hf": "hf", "random": "random init"}[name])
        outputs[name] = [r["output"] for r in read_jsonl(tmp_path / name / "output.jsonl")]
    assert outputs["ckpt"] == outputs["hf"] != outputs["random"]

    tok = ByteTokenizer()
    prompts = [[cfg.model.bos_token_id] + tok.encode(text, add_special_tokens=False)
               for _, _, text in read_prompts(cfg, inp)[0]]
    engine = Engine(params, cfg.model, batch_size=2, buckets=(32, 64))
    direct = engine.generate(prompts, sampling_settings(cfg, cfg.model, tok), row_ids=[1, 2, 3, 4, 5])
    texts = [output_text(tok, t, f, sampling_settings(cfg, cfg.model, tok), [])[0]
             for t, f in zip(direct.tokens, direct.finish_reasons)]
    assert texts == outputs["ckpt"]


def test_missing_input_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="generate.input"):
        run_generate(job_config(tmp_path, tmp_path / "nope.jsonl"))


@pytest.mark.parametrize("key,value", [("batch_size", 0), ("shard_size", 0), ("decode_segments", 0)])
def test_bad_engine_settings_are_config_errors(tmp_path, key, value):
    path = write_lines(tmp_path / "in.jsonl", ['{"id": 1, "prompt": "p"}'])
    with pytest.raises(ConfigError, match=f"generate.{key}: must be >= 1, got {value}"):
        run_generate(job_config(tmp_path, path, f"generate.{key}={value}"))


# --------------------------------------------------------------------------- through the entry point


def launch(*args: str, cwd: Path, env_extra: dict | None = None, **kw) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("XINST_")}
    env.update(JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1", **(env_extra or {}))
    env.pop("XLA_FLAGS", None)
    return subprocess.Popen([sys.executable, str(ENTRY), *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def run_cli(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = launch(*args, cwd=cwd)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        proc.kill()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_demo_config_runs_offline(tmp_path):
    proc = run_cli("--config", "generate_demo", "--set", f"run_dir={tmp_path / 'run'}",
                   "--set", "generate.max_new_tokens=8", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "random-init" in proc.stderr  # no weights configured: said so
    assert "rec" in proc.stderr and "100%" in proc.stderr  # the progress bar
    rows = read_jsonl(tmp_path / "run" / "generate" / "output.jsonl")
    shipped = [json.loads(line) for line in DEMO_PROMPTS.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert [r["id"] for r in rows] == [s["id"] for s in shipped]
    assert all(1 <= r["output_tokens"] <= 8 for r in rows)
    summary = [line for line in proc.stdout.splitlines() if line.startswith("generate:")]
    assert len(summary) == 1 and f"{len(shipped)} records" in summary[0]


def test_bad_input_through_cli_is_a_report_not_a_traceback(tmp_path):
    inp = write_lines(tmp_path / "in.jsonl", [GOOD[0], "{broken", json.dumps({"id": 3})])
    proc = run_cli("--config", "generate_demo", "--set", f"run_dir={tmp_path / 'run'}",
                   "--set", f"generate.input={inp}", "--set", "generate.max_new_tokens=4",
                   "--set", "generate.progress=false", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"{inp}:2: -: malformed_json" in proc.stdout and f"{inp}:3: prompt|instruction|text: missing_field" in proc.stdout
    assert len(read_jsonl(tmp_path / "run" / "generate" / "output.jsonl")) == 1


@pytest.mark.slow
def test_kill_9_mid_run_then_rerun_gives_the_same_output(tmp_path):
    records = [json.dumps({"id": f"r{i}", "prompt": f"Prompt number {i}: " + "word " * (i % 9)}) for i in range(60)]
    inp = write_lines(tmp_path / "in.jsonl", records)
    common = ["--set", f"generate.input={inp}", "--set", "generate.max_new_tokens=40", "--set", "generate.shard_size=4",
              "--set", "generate.batch_size=4", "--set", "generate.progress=false", "--set", "mesh.num_devices=1"]

    ref = run_cli("--config", "generate_demo", "--set", f"run_dir={tmp_path / 'ref'}", *common, cwd=tmp_path)
    assert ref.returncode == 0, ref.stderr
    want = (tmp_path / "ref" / "generate" / "output.jsonl").read_bytes()

    out = tmp_path / "killed" / "generate"
    args = ("--config", "generate_demo", "--set", f"run_dir={tmp_path / 'killed'}", *common)
    proc = launch(*args, cwd=tmp_path)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not list(out.glob("*.done")):
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL
    done = list(out.glob("*.done"))
    assert 1 <= len(done) < 15, len(done)  # killed mid-run: some shards done, not all
    assert not (out / "output.jsonl").exists()

    rerun = run_cli(*args, cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["shards_reused"] == len(done) and report["shards_generated"] == 15 - len(done)
    got = (out / "output.jsonl").read_bytes()
    assert got == want  # same records, same order, same text: no duplicates, no losses
    ids = [r["id"] for r in read_jsonl(out / "output.jsonl")]
    assert ids == [f"r{i}" for i in range(60)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("split", ["contiguous", "strided"])
def test_two_processes_split_the_input(tmp_path, split):
    records = [json.dumps({"id": i, "text": f"document {i} " + "x" * (i % 5)}) for i in range(22)]
    inp = write_lines(tmp_path / "in.jsonl", records)
    common = ["--config", "generate_demo", "--set", f"generate.input={inp}", "--set", "generate.max_new_tokens=6",
              "--set", "generate.shard_size=3", "--set", "generate.batch_size=2", "--set", "generate.progress=false",
              "--set", f"generate.split={split}"]
    one = run_cli(*common, "--set", f"run_dir={tmp_path / 'one'}", cwd=tmp_path)
    assert one.returncode == 0, one.stderr

    port = free_port()
    procs = [launch(*common, "--set", f"run_dir={tmp_path / 'two'}",
                    "--set", f"distributed.coordinator=127.0.0.1:{port}", "--set", "distributed.num_processes=2",
                    "--set", f"distributed.process_id={i}", cwd=tmp_path)
             for i in range(2)]
    try:
        results = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, err
    out = tmp_path / "two" / "generate"
    report = json.loads((out / "report.json").read_text())
    assert report["process_count"] == 2 and report["shards"] == 8 and report["shards_this_process"] == 4
    assert report["shards_generated"] == 4  # process 0 did its half; process 1 the rest
    assert (out / "output.jsonl").read_bytes() == (tmp_path / "one" / "generate" / "output.jsonl").read_bytes()
