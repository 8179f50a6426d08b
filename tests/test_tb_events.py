"""Our hand-encoded TensorBoard event files read back through TensorFlow's own event reader."""

import pytest

from xinst_jax.train.tb_events import EventWriter, crc32c


def test_crc32c_known_vector():
    # RFC 3720 (iSCSI) check value for the ASCII digits 1..9.
    assert crc32c(b"123456789") == 0xE3069283


def test_event_file_reads_back_in_tensorflow(tmp_path):
    tf = pytest.importorskip("tensorflow")
    writer = EventWriter(tmp_path)
    writer.scalars(1, {"loss": 2.5, "learning_rate": 1e-3})
    writer.scalars(2, {"loss": 2.25})
    writer.close()
    events = list(tf.compat.v1.train.summary_iterator(str(writer.path)))
    assert events[0].file_version == "brain.Event:2"
    got = [(e.step, v.tag, v.simple_value) for e in events[1:] for v in e.summary.value]
    assert got == [(1, "loss", 2.5), (1, "learning_rate", pytest.approx(1e-3)), (2, "loss", 2.25)]
