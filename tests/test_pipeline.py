"""The tf.data pipeline end to end on small TFRecord shards written here in the prepare job's
format: host sharding (every example on exactly one host per epoch), packed rows that hold each
example exactly (loss only on the trained part, positions restarting per segment, the model's
logits equal to those of the example alone), language mixing, overlong handling, errors, and a
trainer that never imports TensorFlow."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from xinst_jax.config import Config, ConfigError, DataConfig
from xinst_jax.data.batch import BATCH_KEYS
from xinst_jax.data.mixing import mixing_probabilities
from xinst_jax.data.packing import iter_segments

BOS, EOS, ID_BASE = 1, 2, 3


def write_shards(root: Path, counts: dict[str, int], num_shards: int = 4, lengths: tuple[int, int] = (6, 30),
                 seed: int = 0, long_ids: dict[int, int] | None = None, vocab: int = 512,
                 manifest: str = "prepare") -> dict[int, dict]:
    """Examples in the prepare job's format: `<root>/train-XXXXX-of-NNNNN.tfrecord` (tf.train.Example
    with id, lang, tokens, loss_mask; example k in shard k % num_shards) + manifest.json: the
    prepare job's layout (languages {lang: {examples}}, shards [{file, complete}]), or with
    manifest="counts" only {"languages": {lang: n}} (the pipeline then lists the files).

    Example i is [BOS, ID_BASE + i, prompt..., completion..., EOS]: token 1 of every segment names
    its example. loss_mask is 0 on BOS, the id and the prompt, 1 on the completion and EOS.
    `long_ids` gives some examples a fixed total length. Returns {i: {lang, tokens, loss_mask}}."""
    from xinst_jax.data.pipeline import import_tf

    tf = import_tf()
    rng = np.random.default_rng(seed)
    langs = [lang for lang, n in counts.items() for _ in range(n)]
    rng.shuffle(langs)
    assert len(langs) + ID_BASE + 10 < vocab, "ids must stay token ids of the tiny model"
    root.mkdir(parents=True, exist_ok=True)
    writers = [tf.io.TFRecordWriter(str(root / f"train-{s:05d}-of-{num_shards:05d}.tfrecord"))
               for s in range(num_shards)]
    examples = {}
    for i, lang in enumerate(langs):
        n = (long_ids or {}).get(i) or int(rng.integers(*lengths, endpoint=True))
        tokens = rng.integers(ID_BASE + len(langs), vocab, n).astype(np.int64)
        tokens[0], tokens[1], tokens[-1] = BOS, ID_BASE + i, EOS
        mask = np.zeros(n, np.int64)
        mask[int(rng.integers(2, n - 1)):] = 1
        examples[i] = {"lang": lang, "tokens": tokens, "loss_mask": mask}
        feature = {"id": tf.train.Feature(bytes_list=tf.train.BytesList(value=[f"ex{i}".encode()])),
                   "lang": tf.train.Feature(bytes_list=tf.train.BytesList(value=[lang.encode()])),
                   "tokens": tf.train.Feature(int64_list=tf.train.Int64List(value=tokens)),
                   "loss_mask": tf.train.Feature(int64_list=tf.train.Int64List(value=mask))}
        writers[i % num_shards].write(tf.train.Example(features=tf.train.Features(feature=feature))
                                      .SerializeToString())
    for w in writers:
        w.close()
    if manifest == "prepare":
        content = {"format": "xinst_jax.prepared/1", "complete": True, "fingerprint": f"test-{seed}",
                   "languages": {lang: {"examples": n, "count": n} for lang, n in Counter(langs).items()},
                   "shards": [{"file": f"train-{s:05d}-of-{num_shards:05d}.tfrecord", "complete": True}
                              for s in range(num_shards)]}
    else:
        content = {"languages": dict(Counter(langs))}
    (root / "manifest.json").write_text(json.dumps(content))
    return examples


def data_cfg(**kw) -> DataConfig:
    defaults = dict(source="tfrecord", shuffle_buffer=64, pack_pool=4, pack_window=16, prefetch=2, mix_log_every=0)
    return DataConfig(**{**defaults, **kw})


def source(prepared: Path, rows: int = 4, seq_len: int = 64, seed: int = 0, process_index: int = 0,
           process_count: int = 1, **kw):
    from xinst_jax.data.pipeline import PipelineSource

    return PipelineSource(data_cfg(**kw), prepared, rows, seq_len, seed, process_index, process_count)


def segments_of(batch: dict[str, np.ndarray]):
    """(example id, row, slice) of every segment, from the id token each example carries."""
    return [(int(batch["inputs"][r, sl.start + 1]) - ID_BASE, r, sl) for r, _, sl in iter_segments(batch)]


def check_segment(batch, r: int, sl: slice, ex: dict) -> None:
    tokens, mask = ex["tokens"], ex["loss_mask"]
    assert np.array_equal(batch["inputs"][r, sl], tokens[:-1])
    assert np.array_equal(batch["targets"][r, sl], tokens[1:])
    assert np.array_equal(batch["loss_weights"][r, sl], mask[1:]), "loss only on the trained part"
    assert np.array_equal(batch["positions"][r, sl], np.arange(len(tokens) - 1)), "positions restart per segment"


def check_row_layout(batch) -> None:
    """Segments 1..k are contiguous from position 0; only padding (all fields 0) after them."""
    for r in range(batch["segment_ids"].shape[0]):
        ids = batch["segment_ids"][r]
        used = int(np.count_nonzero(ids))
        assert (ids[used:] == 0).all() and (np.diff(ids[:used]) >= 0).all()
        assert ids[:used].tolist() == sorted(ids[:used].tolist()) and (used == 0 or ids[0] == 1)
        for key in BATCH_KEYS:
            assert not batch[key][r, used:].any()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> tuple[Path, dict[int, dict]]:
    root = tmp_path_factory.mktemp("prepared")
    return root, write_shards(root, {"bn": 60, "fi": 90, "th": 30}, num_shards=4)


# --------------------------------------------------------------------------- hosts, epochs, rows


@pytest.mark.parametrize("num_shards,manifest", [(4, "prepare"), (3, "counts")])  # whole files / records per host
def test_two_hosts_cover_an_epoch_exactly_once_with_exact_rows(tmp_path, num_shards, manifest):
    examples = write_shards(tmp_path, {"bn": 50, "fi": 70, "th": 23}, num_shards=num_shards, seed=num_shards,
                            manifest=manifest)
    seen = []
    for host in (0, 1):
        src = source(tmp_path, process_index=host, process_count=2, num_epochs=1)
        host_ids = []
        batches = list(src)
        assert batches and all(b["inputs"].shape == (4, 64) for b in batches)
        for batch in batches:
            check_row_layout(batch)
            for i, r, sl in segments_of(batch):
                check_segment(batch, r, sl, examples[i])
                host_ids.append(i)
        with pytest.raises(StopIteration):
            next(src)
        report = src.mix_report()
        assert sum(v["examples"] for v in report["realised"].values()) == len(host_ids)
        assert Counter(examples[i]["lang"] for i in host_ids) == Counter(
            {k: v["examples"] for k, v in report["realised"].items() if v["examples"]})
        assert len(host_ids) > 0.3 * len(examples)  # both hosts get a fair part
        seen.append(host_ids)
    everything = seen[0] + seen[1]
    assert not set(seen[0]) & set(seen[1])
    assert sorted(everything) == list(range(len(examples))), "an example was lost or duplicated"


def test_repeat_forever_gives_each_example_once_per_language_epoch(prepared):
    """In the example stream the packer reads, every language's examples come in epochs: each
    block of n_l consecutive examples of language l holds each of them once, reshuffled."""
    root, examples = prepared
    src = source(root, num_epochs=0, pack_window=50)
    per_lang: dict[str, list[int]] = {}
    for _, window in zip(range(12), src._dataset):  # 600 examples: 3+ epochs of every language
        _, _, ids, langs = window
        for i, li in zip(ids.numpy(), langs.numpy()):
            per_lang.setdefault(src.langs[li], []).append(int(i.decode()[2:]))
    for lang, stream in per_lang.items():
        members = sorted(i for i, ex in examples.items() if ex["lang"] == lang)
        n = len(members)
        epochs = [stream[k:k + n] for k in range(0, len(stream) - n + 1, n)]
        assert len(epochs) >= 3, lang
        for epoch in epochs:
            assert sorted(epoch) == members, f"{lang}: an epoch lost or repeated an example"
        assert epochs[0] != epochs[1], f"{lang}: not reshuffled between epochs"


def test_packed_rows_are_full_and_shuffled_by_seed(prepared):
    root, _ = prepared
    a = next(source(root, seed=0, num_epochs=0, pack_window=32))
    b = next(source(root, seed=0, num_epochs=0, pack_window=32))
    c = next(source(root, seed=1, num_epochs=0, pack_window=32))
    assert all(np.array_equal(a[k], b[k]) for k in BATCH_KEYS)
    assert not np.array_equal(a["inputs"], c["inputs"])
    src = source(root, num_epochs=0, pack_window=64, pack_pool=16)
    for _ in range(10):
        next(src)
    assert src.mix_report()["real_token_rate"] > 0.95


def test_model_logits_on_a_packed_row_equal_each_example_alone(prepared):
    import jax
    import jax.numpy as jnp

    from xinst_jax.config import ModelConfig
    from xinst_jax.model.llama import forward, param_shapes
    from xinst_jax.config import load_model_preset

    root, examples = prepared
    cfg = ModelConfig(**load_model_preset("tiny"))
    rng = np.random.default_rng(0)  # numpy init: compiling the jax initialiser costs seconds
    params = jax.tree_util.tree_map_with_path(
        lambda path, s: (1.0 + 0.1 * rng.standard_normal(s.shape) if "scale" in jax.tree_util.keystr(path)
                         else 0.1 * rng.standard_normal(s.shape)).astype(np.float32), param_shapes(cfg))
    batch = next(source(root, seq_len=64, num_epochs=0))
    row = max(range(4), key=lambda r: int(batch["segment_ids"][r].max()))
    segs = [(i, sl) for i, r, sl in segments_of(batch) if r == row]
    assert len(segs) >= 2, "need a row packing several examples"
    # One call: row 0 the packed row, row 1 the same tokens as one segment (attending across
    # examples), then each example alone from position 0 (right padding after it cannot reach it
    # through causal attention).
    k = len(segs)
    inputs, positions, seg_ids = (np.zeros((2 + k, 64), np.int32) for _ in range(3))
    inputs[:2] = batch["inputs"][row]
    positions[0], seg_ids[0] = batch["positions"][row], batch["segment_ids"][row]
    positions[1:], seg_ids[1] = np.arange(64), 1
    for j, (i, _) in enumerate(segs):
        tokens = examples[i]["tokens"][:-1]
        inputs[2 + j, :len(tokens)], seg_ids[2 + j, :len(tokens)] = tokens, 1
    logits = np.asarray(jax.jit(lambda *a: forward(params, *a, cfg))(
        jnp.asarray(inputs), jnp.asarray(positions), jnp.asarray(seg_ids)))
    for j, (i, sl) in enumerate(segs):
        np.testing.assert_allclose(logits[0, sl], logits[2 + j, :sl.stop - sl.start], atol=2e-5, rtol=1e-5)
    _, sl = segs[-1]
    assert not np.allclose(logits[1, sl], logits[0, sl], atol=1e-3)


# --------------------------------------------------------------------------- mixing


def test_mixing_probabilities():
    counts = {"bn": 100, "fi": 400, "th": 0, "sw": 1600}
    p1 = mixing_probabilities(counts, "temperature", 1.0, {})
    assert set(p1) == {"bn", "fi", "sw"}  # a language without examples is never sampled
    assert p1 == pytest.approx({"bn": 100 / 2100, "fi": 400 / 2100, "sw": 1600 / 2100})
    p2 = mixing_probabilities(counts, "temperature", 2.0, {})
    assert p2 == pytest.approx({"bn": 10 / 70, "fi": 20 / 70, "sw": 40 / 70})
    assert all(v == pytest.approx(1 / 3, abs=1e-3) for v in mixing_probabilities(counts, "temperature", 1e4, {}).values())
    pw = mixing_probabilities(counts, "weights", 1.0, {"bn": 3, "sw": 1, "fi": 0})
    assert pw == pytest.approx({"bn": 0.75, "sw": 0.25})
    with pytest.raises(ConfigError, match=r"data\.weights\.th"):
        mixing_probabilities(counts, "weights", 1.0, {"th": 1.0})
    with pytest.raises(ConfigError, match=r"data\.temperature"):
        mixing_probabilities(counts, "temperature", 0.0, {})


@pytest.mark.parametrize("mixing,temperature,weights", [("temperature", 1.0, {}), ("temperature", 100.0, {}),
                                                        ("weights", 1.0, {"bn": 1.0, "fi": 3.0})])
def test_realised_mix_follows_the_target(tmp_path, mixing, temperature, weights):
    write_shards(tmp_path, {"bn": 30, "fi": 120}, num_shards=2, lengths=(4, 10))
    src = source(tmp_path, rows=8, seq_len=64, mixing=mixing, temperature=temperature, weights=weights,
                 num_epochs=0, mix_log_every=5)
    for _ in range(40):
        next(src)
    report = src.mix_report()
    expected = {"temperature": {1.0: {"bn": 0.2, "fi": 0.8}, 100.0: {"bn": 0.5, "fi": 0.5}}}.get(
        mixing, {}).get(temperature, {"bn": 0.25, "fi": 0.75})
    assert report["target"] == pytest.approx(expected, abs=0.01)
    total = sum(v["examples"] for v in report["realised"].values())
    assert total > 1000
    for lang, p in expected.items():
        assert report["realised"][lang]["share"] == pytest.approx(p, abs=0.05), report
    assert report["batches"] == 40


# --------------------------------------------------------------------------- overlong


@pytest.mark.parametrize("policy", ["truncate", "split"])
def test_overlong_examples_are_truncated_or_split_and_counted(tmp_path, policy):
    # 150 and 66 tokens are 149 and 65 positions: over seq_len 64; 65 tokens (64 positions) fit.
    examples = write_shards(tmp_path, {"fi": 12}, num_shards=1, long_ids={3: 150, 7: 65, 8: 66})
    src = source(tmp_path, rows=2, seq_len=64, overlong=policy, num_epochs=1, pack_window=64)
    firsts, continuations = {}, []
    for batch in src:
        for r, _, sl in iter_segments(batch):
            if batch["inputs"][r, sl.start] == BOS:
                firsts[int(batch["inputs"][r, sl.start + 1]) - ID_BASE] = (batch, r, sl)
            else:
                continuations.append((batch, r, sl))
    over = src.mix_report()["overlong"]
    assert sorted(firsts) == list(range(12))
    for i in set(range(12)) - {3, 8}:
        check_segment(*firsts[i], examples[i])
    for i in (3, 8):  # the first piece is the example's first 64 positions either way
        b, r, sl = firsts[i]
        assert sl.stop - sl.start == 64
        check_segment(b, r, sl, {k: v[:65] for k, v in examples[i].items() if k != "lang"})
    if policy == "truncate":
        assert over["truncated"] == 2 and over["split"] == 0 and not continuations
        assert over["dropped_tokens"] == (149 - 64) + (65 - 64)
    else:
        assert over["split"] == 2 and over["split_pieces"] == 3 + 2 and over["truncated"] == 0
        wanted = {(3, 64), (3, 128), (8, 64)}  # (example, first position) of each continuation
        assert len(continuations) == len(wanted)
        for b, r, sl in continuations:
            match = [(i, at) for i, at in wanted
                     if np.array_equal(b["inputs"][r, sl], examples[i]["tokens"][at:at + sl.stop - sl.start])]
            assert len(match) == 1
            i, at = match[0]
            wanted.remove((i, at))
            piece = {k: v[at:at + 65] for k, v in examples[i].items() if k != "lang"}
            check_segment(b, r, sl, piece)
        assert not wanted


# --------------------------------------------------------------------------- interface, errors


def test_make_pipeline_source_from_config(prepared):
    from xinst_jax.data.pipeline import make_pipeline_source

    root, _ = prepared
    cfg = Config()
    cfg.data = data_cfg(prepared_dir=str(root))
    cfg.train.seq_len = 96
    src = make_pipeline_source(cfg, rows=3, process_index=1, process_count=2)
    batch = next(src)
    assert set(batch) == set(BATCH_KEYS)
    assert all(v.shape == (3, 96) for v in batch.values())
    assert batch["loss_weights"].dtype == np.float32
    assert all(batch[k].dtype == np.int32 for k in BATCH_KEYS if k != "loss_weights")
    assert src.host_files == src.files[1::2] and src.record_stride == 1
    json.dumps(src.get_state())  # the checkpoint writes it as JSON


def test_clear_errors(tmp_path, prepared):
    root, _ = prepared
    with pytest.raises(ConfigError, match="not a directory"):
        source(tmp_path / "missing")
    (tmp_path / "train-00000-of-00002.tfrecord").write_bytes(b"")
    with pytest.raises(ConfigError, match="manifest.json not found"):
        source(tmp_path)
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"languages": {"fi": 3}}))
    with pytest.raises(ConfigError, match="incomplete"):
        source(tmp_path)
    manifest.write_text(json.dumps({"complete": False, "languages": {"fi": 3}}))
    with pytest.raises(ConfigError, match="not complete"):
        source(tmp_path)
    manifest.write_text(json.dumps({"languages": {"fi": 3}, "shards": [
        {"file": "train-00000-of-00002.tfrecord", "complete": True},
        {"file": "train-00001-of-00002.tfrecord", "complete": True}]}))
    with pytest.raises(ConfigError, match="do not exist: .*train-00001-of-00002"):
        source(tmp_path)
    manifest.write_text(json.dumps({"shards": "x"}))
    with pytest.raises(ConfigError, match="no per-language example counts"):
        source(tmp_path)
    with pytest.raises(ConfigError, match=r"data\.weights\.vi"):
        source(root, mixing="weights", weights={"vi": 1.0})
    with pytest.raises(ConfigError, match=r"data\.overlong"):
        source(root, overlong="drop")


def test_trainer_and_pipeline_module_do_not_import_tensorflow():
    code = ("import sys; import xinst_jax.train.loop, xinst_jax.data.pipeline, xinst_jax.data.packing; "
            "sys.exit('tensorflow' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parent.parent,
                          timeout=120).returncode == 0
