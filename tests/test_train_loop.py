"""The trainer's loop and hooks: when each hook runs (one step late for metrics, before the next
step where the state is read), stop requests, the preemption agreement schedule across hosts,
divergence, the model taken from train.init_from's config.json, and no TensorFlow import.

The scheduling tests drive `Trainer` with a fake step (no compilation)."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys

import pytest

from conftest import REPO_ROOT
from xinst_jax.config import ConfigError, load_config
from xinst_jax.train import loop
from xinst_jax.train.loop import CheckFinite, PreemptionWatcher, StepInfo, Trainer, TrainingDiverged, resolve_model


def make_trainer(events: list, end: int, start: int = 0) -> Trainer:
    def step_fn(state, batch):
        events.append(("step", state["step"] + 1))
        return {"step": state["step"] + 1}, {"loss": 0.5}

    return Trainer(step_fn, lambda: {}, {"step": start}, start, end)


def recorder(events: list, name: str):
    def hook(info: StepInfo) -> None:
        events.append((name, info.step, None if info.state is None else info.state["step"], info.last))

    return hook


def test_metrics_hooks_run_a_step_late_and_state_hooks_before_the_next_step():
    events: list = []
    trainer = make_trainer(events, end=7)
    trainer.add_hook(recorder(events, "metrics"))
    trainer.add_hook(recorder(events, "save"), 3, needs_state=True, at_end=True)
    trainer.add_hook(recorder(events, "export"), 0, needs_state=True, at_end=True)
    assert trainer.run() == {"step": 7}
    assert events == [
        ("step", 1), ("step", 2), ("metrics", 1, None, False),  # step 1's hooks while step 2 runs
        ("step", 3), ("metrics", 2, None, False),
        ("metrics", 3, 3, False), ("save", 3, 3, False),  # a save is due: before step 4 takes the state
        ("step", 4), ("step", 5), ("metrics", 4, None, False),
        ("step", 6), ("metrics", 5, None, False), ("metrics", 6, 6, False), ("save", 6, 6, False),
        ("step", 7), ("metrics", 7, 7, True), ("save", 7, 7, True), ("export", 7, 7, True),  # the end
    ]


def test_no_steps_no_hooks():
    events: list = []
    trainer = make_trainer(events, end=3, start=3)
    trainer.add_hook(recorder(events, "any"), at_end=True)
    assert trainer.run() == {"step": 3} and events == []


def test_stop_from_a_late_hook_ends_after_the_step_in_flight():
    events: list = []
    trainer = make_trainer(events, end=100)
    trainer.add_hook(lambda info: trainer.request_stop() if info.step == 4 else None)
    trainer.add_hook(recorder(events, "save"), 50, needs_state=True, at_end=True)
    trainer.run()
    # step 4's hooks ran while step 5 computed: the run ends with step 5, saved
    assert events[-3:] == [("step", 4), ("step", 5), ("save", 5, 5, True)]
    assert trainer.step == 5


def test_stop_at_a_state_step_saves_that_step_once():
    events: list = []
    trainer = make_trainer(events, end=100)
    trainer.add_hook(lambda info: trainer.request_stop() if info.step == 6 else None)
    trainer.add_hook(recorder(events, "save"), 3, needs_state=True, at_end=True)
    trainer.run()
    assert [e for e in events if e[0] == "save"] == [("save", 3, 3, False), ("save", 6, 6, True)]
    assert events[-1] == ("save", 6, 6, True) and trainer.step == 6


def test_divergence_names_the_step_and_last_checkpoint():
    class Saved:
        saved_at = 4
        checkpointer = type("C", (), {"directory": "/ckpt"})()

    check = CheckFinite(Saved())
    check(StepInfo(5, {"loss": 1.0, "grad_norm": 2.0}, None))
    with pytest.raises(TrainingDiverged, match=r"at step 6; last good checkpoint is step 4 in /ckpt"):
        check(StepInfo(6, {"loss": float("nan"), "grad_norm": 2.0}, None))
    Saved.saved_at = None
    with pytest.raises(TrainingDiverged, match="no checkpoint yet"):
        check(StepInfo(1, {"loss": 1.0, "grad_norm": float("inf")}, None))


# --------------------------------------------------------------------------- preemption


def test_one_process_stops_after_the_step_in_flight():
    events: list = []
    trainer = make_trainer(events, end=100)
    previous = signal.getsignal(signal.SIGTERM)
    watcher = PreemptionWatcher(trainer, sync_every=10, checkpoint_every=50)
    assert signal.getsignal(signal.SIGTERM) != previous
    try:
        trainer.add_hook(lambda info: os.kill(os.getpid(), signal.SIGTERM) if info.step == 3 else None)
        trainer.add_hook(watcher)
        trainer.add_hook(recorder(events, "save"), 50, needs_state=True, at_end=True)
        trainer.run()
    finally:
        watcher.close()
    assert signal.getsignal(signal.SIGTERM) == previous
    assert events[-1] == ("save", 4, 4, True)  # signalled in step 3's (late) hooks: stops after step 4


def test_hosts_agree_only_at_sync_and_checkpoint_steps(monkeypatch):
    """Two hosts (simulated): the local SIGTERM flag is all-gathered every `sync_every` steps and at
    checkpoint steps only, and only there can a stop begin, so every host stops at the same step."""
    gathered: list[int] = []
    monkeypatch.setattr(loop.jax, "process_count", lambda: 2)
    monkeypatch.setattr(loop.multihost_utils, "process_allgather",
                        lambda x: gathered.append(trainer.step) or [x, 0])  # the other host: no signal
    events: list = []
    trainer = make_trainer(events, end=100)
    watcher = PreemptionWatcher(trainer, sync_every=5, checkpoint_every=7)
    try:
        trainer.add_hook(lambda info: setattr(watcher, "signalled", info.step >= 11))
        trainer.add_hook(watcher)
        trainer.add_hook(recorder(events, "save"), 7, needs_state=True, at_end=True)
        trainer.run()
    finally:
        watcher.close()
    # hook steps 5 and 10 (late: the device is a step ahead), 7 and 14 (checkpoint steps: on time)
    assert gathered == [6, 7, 11, 14]
    # signalled from step 11; the first agreement after it is the checkpoint step 14
    assert [e for e in events if e[0] == "save"] == [("save", 7, 7, False), ("save", 14, 14, True)]
    assert trainer.step == 14


# --------------------------------------------------------------------------- config


def test_init_from_with_default_model_takes_config_json(tmp_path):
    hf = {"model_type": "llama", "vocab_size": 300, "hidden_size": 48, "intermediate_size": 80,
          "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 12,
          "max_position_embeddings": 96, "rope_theta": 50000.0, "tie_word_embeddings": True}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    base = ["model.preset=null", f"train.init_from={tmp_path}", "train.seq_len=64", "model.dtype=bfloat16",
            "model.remat=full"]
    cfg = resolve_model(load_config("tiny_synthetic", base))
    m = cfg.model
    assert (m.vocab_size, m.embed_dim, m.num_layers, m.head_dim, m.max_seq_len, m.tie_embeddings) == \
        (300, 48, 3, 12, 96, True)
    assert (m.dtype, m.remat) == ("bfloat16", "full")  # the run's own choices stay
    # a set architecture is never replaced (import_hf then checks it against the weights)
    tiny = load_config("tiny_synthetic", [f"train.init_from={tmp_path}", "train.seq_len=64"])
    assert resolve_model(tiny) == tiny
    # train.seq_len is checked against the checkpoint's max_seq_len once it is known
    long_rows = load_config("tiny_synthetic", base[:2] + ["train.seq_len=128"])
    with pytest.raises(ConfigError, match=r"train.seq_len=128 is above model.max_seq_len=96"):
        resolve_model(long_rows)
    with pytest.raises(ConfigError, match=r"^train.init_from: .*not a directory"):
        resolve_model(dataclasses.replace(long_rows, train=dataclasses.replace(long_rows.train,
                                                                               init_from=str(tmp_path / "x"))))


def test_training_never_imports_tensorflow(tmp_path):
    """Synthetic data: the whole run (loop, checkpoints, TensorBoard, export) without TensorFlow."""
    code = f"""
import sys
from xinst_jax.config import load_config
from xinst_jax.train.loop import run_training
cfg = load_config("tiny_synthetic", ["run_dir={tmp_path}", "train.steps=2", "checkpoint.every=1",
                                     "train.batch_size=2", "train.seq_len=16", "mesh.num_devices=1"])
assert run_training(cfg).final_step == 2
print(sorted({{m.split(".")[0] for m in sys.modules if m.split(".")[0] in ("tensorflow", "tensorboard")}}))
"""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout
    assert (tmp_path / "hf" / "config.json").exists() and list((tmp_path / "tensorboard").iterdir())


def test_held_out_loss_every_n_steps_is_the_mean_token_loss_of_fixed_batches(tmp_path):
    """train.eval_every=2 over 5 steps: eval_loss at steps 2, 4 and the last (5), in the step's
    record of metrics.jsonl; at the last step it is the token-weighted mean cross-entropy of the
    final params over the same held-out batches (in the train step's 2 micro-batches), recomputed
    here with a plain forward of whole batches. The batches (synthetic, another seed) are not the
    training batches."""
    import jax
    import numpy as np

    from xinst_jax.model.llama import forward
    from xinst_jax.train.program import build_train_program

    cfg = load_config("tiny_synthetic", [f"run_dir={tmp_path}", "train.steps=5", "train.batch_size=2",
                                         "train.seq_len=32", "mesh.num_devices=1", "train.export_at_end=false",
                                         "train.eval_every=2", "train.eval_batches=3", "checkpoint.every=100",
                                         "train.grad_accum=2"])
    result = loop.run_training(cfg)
    assert [h["step"] for h in result.history if "eval_loss" in h] == [2, 4, 5]
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "eval_loss" in r] == [2, 4, 5] and all("loss" in r for r in lines)

    program = build_train_program(cfg)
    batches = jax.device_get(loop.eval_batches(cfg, program))
    first_train = next(iter(loop.make_source(cfg, program.host_rows)))
    assert not np.array_equal(batches[0]["inputs"], first_train["inputs"])
    loss = tokens = 0.0
    for b in batches:
        logits = np.asarray(forward(result.state["params"], b["inputs"], b["positions"], b["segment_ids"],
                                    cfg.model), np.float64)
        log_p = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
            - logits.max(-1, keepdims=True)
        picked = np.take_along_axis(log_p, b["targets"][..., None], -1)[..., 0]
        loss -= float((picked * b["loss_weights"]).sum())
        tokens += float(b["loss_weights"].sum())
    last = result.history[-1]
    assert last["eval_tokens"] == tokens > 0
    np.testing.assert_allclose(last["eval_loss"], loss / tokens, rtol=1e-5)
    assert abs(last["eval_loss"] - result.history[1]["eval_loss"]) > 1e-4  # it follows the params


def test_held_out_loss_needs_held_out_data():
    with pytest.raises(ConfigError, match=r"train.eval_every=5 needs held-out data: data.eval_inputs .* or "
                                          r"data.eval_prepared_dir"):
        load_config("tiny_synthetic", ["data.source=tfrecord", "train.eval_every=5"])
    with pytest.raises(ConfigError, match=r"train.eval_batches >= 1"):
        load_config("tiny_synthetic", ["train.eval_every=5", "train.eval_batches=0"])
