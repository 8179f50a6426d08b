"""TensorBoard events written by the trainer's MetricsLogger (tensorboardX), read back through
TensorFlow's own event reader."""

import json
import sys

import pytest

from xinst_jax.train.metrics import MetricsLogger


def test_metrics_read_back_from_tensorboard_events(tmp_path):
    tf = pytest.importorskip("tensorflow")
    logger = MetricsLogger(tmp_path, total_steps=3, start_step=0)
    logger.log(1, {"loss": 2.5, "learning_rate": 1e-3})
    logger.log(2, {"loss": 2.25, "mfu": 0.125})
    logger.close()

    files = sorted((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert len(files) == 1
    events = list(tf.compat.v1.train.summary_iterator(str(files[0])))
    assert events[0].file_version == "brain.Event:2"
    got = []
    for event in events[1:]:
        for value in event.summary.value:
            # tensorboardX writes simple_value; newer writers a scalar tensor: accept either
            number = value.simple_value if value.HasField("simple_value") else tf.make_ndarray(value.tensor).item()
            got.append((event.step, value.tag, number))
    assert got == [(1, "loss", 2.5), (1, "learning_rate", pytest.approx(1e-3)), (2, "loss", 2.25),
                   (2, "mfu", 0.125)]
    # metrics.jsonl holds the same values
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in records] == [(1, 2.5), (2, 2.25)]


def test_resumed_run_appends_a_new_event_file(tmp_path):
    tf = pytest.importorskip("tensorflow")
    for step in (1, 2):  # two runs of the same run_dir (a resume)
        logger = MetricsLogger(tmp_path, total_steps=2, start_step=step - 1)
        logger.log(step, {"loss": float(step)})
        logger.close()
    steps = sorted(e.step for f in (tmp_path / "tensorboard").glob("events.out.tfevents.*")
                   for e in tf.compat.v1.train.summary_iterator(str(f)) if e.summary.value)
    assert steps == [1, 2]


def test_without_tensorboardx_metrics_still_log(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # import fails
    with caplog.at_level("WARNING"):
        logger = MetricsLogger(tmp_path, total_steps=1, start_step=0)
    logger.log(1, {"loss": 3.0})
    logger.close()
    assert "tensorboardX is not installed" in caplog.text
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["loss"] == 3.0
    assert not (tmp_path / "tensorboard").exists()
