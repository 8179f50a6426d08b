"""Exact resume of the tf.data pipeline: after set_state(get_state()) on a freshly built source
the next batches equal those of an uninterrupted run — mid-epoch, across epoch boundaries, at
the end of a finite run, per host, and through the orbax checkpoint — and a state that cannot
continue the stream (other host count, host, or data config) is refused with a clear message."""

from __future__ import annotations

import json

import numpy as np
import pytest

from test_pipeline import source, write_shards
from xinst_jax.config import ConfigError
from xinst_jax.data.batch import BATCH_KEYS

# Small rows and windows: every batch pulls a new window, the pool and the queue of packed rows
# are never empty, so the state holds all of tf.data's buffers and the packer's rows.
KW = dict(rows=2, seq_len=64, pack_window=8, pack_pool=3, shuffle_buffer=16)


def same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in BATCH_KEYS)


def take(src, n: int) -> list[dict]:
    return [next(src) for _ in range(n)]


def restored(root, state: dict, **kw):
    src = source(root, **{**KW, **kw})
    src.set_state(json.loads(json.dumps(state)))  # exactly what the checkpoint's JSON file holds
    return src


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """Two languages, 14 and 20 examples: an epoch of each lasts a few batches."""
    root = tmp_path_factory.mktemp("small")
    counts = {"bn": 14, "fi": 20}
    write_shards(root, counts, num_shards=2, lengths=(6, 30), seed=3)
    return root, counts


def test_restart_mid_epoch(tmp_path):
    counts = {"bn": 80, "fi": 120}
    write_shards(tmp_path, counts, num_shards=4, seed=1)
    reference = take(source(tmp_path, **KW), 10)
    src = source(tmp_path, **KW)
    first = take(src, 3)
    state = src.get_state()
    read = src.mix_report()["read"]
    assert all(0 < read[lang] < n for lang, n in counts.items()), "the save point is not mid-epoch"
    assert len(src.packer.ready) + src.packer.open_rows > 0
    rest = take(src, 7)
    assert same(first + rest, reference), "get_state disturbed the stream"
    again = restored(tmp_path, state)
    assert same(take(again, 7), reference[3:])
    assert again.mix_report() == src.mix_report()  # the counters continue too
    assert not same(take(source(tmp_path, **KW), 1), reference[3:4])  # a fresh start would differ


def test_restart_at_every_step_across_epoch_boundaries(small):
    root, counts = small
    horizon, ahead = 16, 3
    reference = take(source(root, **KW), horizon + ahead)
    src = source(root, **KW)
    states, epochs = [], []
    for _ in range(horizon):
        states.append(src.get_state())
        epochs.append({lang: src.mix_report()["read"][lang] // n for lang, n in counts.items()})
        next(src)
    epochs.append({lang: src.mix_report()["read"][lang] // n for lang, n in counts.items()})
    # the save points cover epoch 0 and later epochs, and continuations that cross a boundary
    assert epochs[0] == {"bn": 0, "fi": 0} and min(epochs[-1].values()) >= 2
    crossing = [k for k in range(horizon) if epochs[min(k + ahead, horizon)] != epochs[k]]
    assert crossing and any(min(epochs[k].values()) >= 1 for k in crossing)
    for k in range(horizon):
        assert same(take(restored(root, states[k]), ahead), reference[k:k + ahead]), f"restart at batch {k}"


def test_restart_near_the_end_of_a_finite_run(small):
    root, _ = small
    reference = list(source(root, num_epochs=2, **KW))
    src = source(root, num_epochs=2, **KW)
    take(src, len(reference) - 3)
    state = src.get_state()
    again = restored(root, state, num_epochs=2)
    assert same(list(again), reference[-3:])
    with pytest.raises(StopIteration):
        next(again)
    exhausted = source(root, num_epochs=2, **KW)
    for _ in exhausted:
        pass
    done = restored(root, exhausted.get_state(), num_epochs=2)
    with pytest.raises(StopIteration):
        next(done)


def test_each_host_restores_its_own_stream(small):
    root, _ = small
    hosts = [source(root, process_index=i, process_count=2, **KW) for i in (0, 1)]
    for src in hosts:
        take(src, 2)
    states = [src.get_state() for src in hosts]
    expected = [take(src, 4) for src in hosts]
    assert not same(expected[0], expected[1])
    for i in (0, 1):
        again = restored(root, states[i], process_index=i, process_count=2)
        assert same(take(again, 4), expected[i])
    with pytest.raises(ConfigError, match="process 0 offered to process 1"):
        restored(root, states[0], process_index=1, process_count=2)


def test_a_state_that_cannot_continue_the_stream_is_refused(small):
    root, _ = small
    src = source(root, process_index=0, process_count=2, **KW)
    next(src)
    state = src.get_state()
    with pytest.raises(ConfigError, match=r"saved by 2 processes; restoring with 1 would repeat or drop"):
        restored(root, state, process_count=1)
    with pytest.raises(ConfigError, match=r"pack_pool: saved 3, now 5"):
        restored(root, state, process_index=0, process_count=2, pack_pool=5)
    with pytest.raises(ConfigError, match=r"seq_len"):
        restored(root, state, process_index=0, process_count=2, seq_len=32)
    changed = json.loads(json.dumps(state))
    changed["fingerprint"]["data"] = "prepared again from other inputs"
    with pytest.raises(ConfigError, match=r"data: saved 'prepared again"):
        restored(root, changed, process_index=0, process_count=2)
    with pytest.raises(ConfigError, match="not written by the tfrecord pipeline"):
        source(root, **KW).set_state({"index": 3})  # a synthetic source's state


def test_resume_through_the_orbax_checkpoint(tmp_path, small):
    import jax
    import jax.numpy as jnp

    from xinst_jax.checkpoint import Checkpointer
    from xinst_jax.config import CheckpointConfig

    root, _ = small
    src = source(root, **KW)
    take(src, 5)
    ckpt = Checkpointer(tmp_path / "ckpt", CheckpointConfig(async_save=True, keep=2))
    train_state = {"w": jnp.arange(4.0)}
    ckpt.save(5, train_state, src.get_state(), {"note": "test"}, force=True)
    expected = take(src, 4)  # the source moves on while the save is written
    ckpt.close()
    ckpt = Checkpointer(tmp_path / "ckpt", CheckpointConfig(async_save=True, keep=2))
    step, _, data_state, _ = ckpt.restore_latest(jax.eval_shape(lambda: train_state))
    ckpt.close()
    assert step == 5 and data_state["batches"] == 5
    again = source(root, **KW)
    again.set_state(data_state)
    assert same(take(again, 4), expected)
    assert (tmp_path / "ckpt" / "5" / "data" / "process_0.json").exists()


@pytest.mark.slow
def test_training_interrupted_and_resumed_sees_the_same_batches(tmp_path, small):
    """Through the trainer's own hook (run_training: get_state into the orbax step dir, set_state on
    restore): 3 steps + resume for 3 more give the losses of 6 uninterrupted steps."""
    from xinst_jax.config import load_config
    from xinst_jax.data.pipeline import make_pipeline_source
    from xinst_jax.train.loop import run_training

    root, _ = small

    def cfg(run: str):
        return load_config("tiny_synthetic", overrides=[
            f"run_dir={tmp_path / run}", "data.source=tfrecord", f"data.prepared_dir={root}", "train.steps=6",
            "checkpoint.every=3", "checkpoint.async_save=false", "train.export_at_end=false", "mesh.num_devices=1",
            "train.seq_len=64", "train.batch_size=4", "data.shuffle_buffer=16", "data.pack_window=8",
            "data.pack_pool=3"])

    first = make_pipeline_source(cfg("resumed"), 4, 0, 1)
    assert run_training(cfg("resumed"), source=first, stop_after=3).final_step == 3
    second = make_pipeline_source(cfg("resumed"), 4, 0, 1)
    resumed = run_training(cfg("resumed"), source=second)
    straight_source = make_pipeline_source(cfg("straight"), 4, 0, 1)
    straight = run_training(cfg("straight"), source=straight_source)
    assert resumed.final_step == straight.final_step == 6 and second.batches == 6
    np.testing.assert_allclose([h["loss"] for h in resumed.history], [h["loss"] for h in straight.history[3:]],
                               rtol=1e-6)
    assert second.get_state()["packer"] == straight_source.get_state()["packer"]
