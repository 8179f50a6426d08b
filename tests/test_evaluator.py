"""The evaluator: label probabilities are a softmax over the three label completions' log-likelihoods
as the evaluator Task writes them (checked against score_records); loading from a checkpoint or a
HF directory and its one-line errors; a tiny evaluator trained for a few dozen steps on an easy
rating set ranks best above worst."""

from __future__ import annotations

import dataclasses
import time

import jax
import numpy as np
import pytest

from xinst_jax.config import CheckpointConfig, ConfigError, ModelConfig, TrainConfig, load_config, to_dict
from xinst_jax.curate.evaluator import Evaluator, Rating, label_targets, load_evaluator
from xinst_jax.data.templates import EVALUATOR_LABELS
from xinst_jax.data.tokenizer import ByteTokenizer
from xinst_jax.infer.generate import Engine
from xinst_jax.infer.score import score_records
from xinst_jax.model.llama import init_params
from xinst_jax.tasks import Task

TINY = ModelConfig(vocab_size=259, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64,
                   max_seq_len=512, init_std=0.2)
RECORDS = [  # three per label, as a rating set holds them
    {"id": "1", "lang": "sw", "instruction": "Say hello.", "output": "Habari!", "label": "best"},
    {"id": "2", "lang": "th", "instruction": "Name a city.", "output": "กรุงเทพ", "label": "best"},
    {"id": "3", "lang": "fi", "instruction": "Count to three.", "output": "yksi, kaksi, kolme", "label": "best"},
    {"id": "4", "lang": "hi", "instruction": "Count to five.", "output": "एक, दो", "label": "flawed"},
    {"id": "5", "lang": "ur", "instruction": "Write something.", "output": "پاکستان ایک ملک ہے۔", "label": "flawed"},
    {"id": "6", "lang": "tr", "instruction": "Name two rivers.", "output": "Dicle", "label": "flawed"},
    {"id": "7", "lang": "vi", "instruction": "Say hello.", "output": "Một hai ba bốn", "label": "worst"},
    {"id": "8", "lang": "ta", "instruction": "Name a city.", "output": "Habari za asubuhi", "label": "worst"},
    {"id": "9", "lang": "bn", "instruction": "Describe the sea.", "output": "আমার নাম", "label": "worst"},
]


@pytest.fixture(scope="module")
def engine():
    params = init_params(TINY, jax.random.key(5))
    return params, Engine(params, TINY, batch_size=4, buckets=(512,))


def test_probabilities_are_a_softmax_of_score_records(engine):
    _, eng = engine
    task = Task("evaluator", ByteTokenizer())
    evaluator = Evaluator(eng, ByteTokenizer())
    unlabelled = [{k: v for k, v in r.items() if k != "label"} for r in RECORDS]
    ratings = evaluator.rate(unlabelled)
    assert len(ratings) == len(RECORDS) and all(isinstance(r, Rating) for r in ratings)
    for record, rating in zip(RECORDS, ratings):
        # what is scored is exactly what Task("evaluator").encode writes for each label
        for label in EVALUATOR_LABELS:
            ex = task.encode(dict(record, label=label))
            assert evaluator.targets[label] == ex.target and evaluator.prompt_tokens(record) == ex.prompt
        sums = np.array([score_records(eng, task, [dict(record, label=label)]).sum_logprob[0]
                         for label in EVALUATOR_LABELS])
        manual = np.exp(sums - sums.max())
        manual /= manual.sum()
        got = np.array([rating.probs[label] for label in EVALUATOR_LABELS])
        np.testing.assert_allclose(got, manual, rtol=0, atol=1e-6)
        np.testing.assert_allclose([rating.logprobs[label] for label in EVALUATOR_LABELS], sums, rtol=1e-6)
        assert abs(sum(rating.probs.values()) - 1) < 1e-9
        assert rating.label == EVALUATOR_LABELS[int(np.argmax(manual))] and rating.score == rating.probs["best"]
        assert not rating.truncated
    assert len({r.label for r in ratings}) >= 1 and evaluator.rate([]) == []


def test_label_targets_are_the_completion_and_eos():
    tok = ByteTokenizer()
    targets = label_targets(Task("evaluator", tok))
    assert {k: tok.decode(v[:-1]) for k, v in targets.items()} == {"best": "best", "flawed": "flawed",
                                                                     "worst": "worst"}
    assert all(v[-1] == tok.eos_id for v in targets.values())


def test_records_need_instruction_output_and_lang(engine):
    _, eng = engine
    evaluator = Evaluator(eng, ByteTokenizer())
    with pytest.raises(ConfigError, match=r"record '7': lang is missing or empty"):
        evaluator.rate([{"id": "7", "instruction": "Say hi.", "output": "Habari"}])


def test_long_prompts_keep_their_end_and_say_so(engine):
    _, eng = engine
    evaluator = Evaluator(eng, ByteTokenizer())
    long = {"lang": "fi", "instruction": "Write. " * 100, "output": "Teksti."}
    (rating,) = evaluator.rate([long])
    assert rating.truncated and abs(sum(rating.probs.values()) - 1) < 1e-9


# --------------------------------------------------------------------------- load_evaluator


def evaluator_config(tmp_path, *extra: str):
    return load_config("evaluator_xinst", [
        f"run_dir={tmp_path / 'run'}", "model.preset=tiny", "model.vocab_size=259", "model.embed_dim=32",
        "model.head_dim=8", "model.mlp_dim=64", "model.max_seq_len=512", "model.dtype=float32", "model.remat=none",
        "train.seq_len=512", "generate.tokenizer=bytes", "generate.batch_size=4", "generate.prompt_buckets=[512]",
        "mesh.num_devices=1",
        *extra])


def test_load_evaluator_from_checkpoint_or_hf_dir(tmp_path):
    import jax.numpy as jnp

    from xinst_jax.checkpoint import Checkpointer
    from xinst_jax.convert.hf import export_hf

    cfg = evaluator_config(tmp_path)
    params = init_params(dataclasses.replace(cfg.model, init_std=0.2), jax.random.key(11))
    ckpt = Checkpointer(tmp_path / "ckpt", CheckpointConfig(async_save=False))
    ckpt.save(3, {"step": jnp.int32(3), "params": params}, {}, to_dict(cfg), force=True)
    ckpt.close()
    export_hf(params, cfg.model, tmp_path / "hf", dtype="float32")
    want = [r.probs for r in Evaluator(Engine(params, cfg.model, batch_size=4, buckets=(512,)),
                                       ByteTokenizer()).rate(RECORDS)]
    for source in (f"curate.evaluator_checkpoint={tmp_path / 'ckpt'}", f"curate.evaluator_hf_dir={tmp_path / 'hf'}"):
        evaluator = load_evaluator(evaluator_config(tmp_path, source))
        got = [r.probs for r in evaluator.rate(RECORDS)]
        for g, w in zip(got, want):
            np.testing.assert_allclose([g[k] for k in EVALUATOR_LABELS], [w[k] for k in EVALUATOR_LABELS], atol=1e-6)
        assert evaluator.source.startswith(("checkpoint", "hf"))

    with pytest.raises(ConfigError, match=r"^curate.evaluator_checkpoint: neither it nor curate.evaluator_hf_dir"):
        load_evaluator(cfg)
    with pytest.raises(ConfigError, match=r"^curate.evaluator_checkpoint: directory .*nope not found$"):
        load_evaluator(evaluator_config(tmp_path, f"curate.evaluator_checkpoint={tmp_path / 'nope'}"))
    with pytest.raises(ConfigError, match=r"^curate.evaluator_hf_dir: directory .*nope not found$"):
        load_evaluator(evaluator_config(tmp_path, f"curate.evaluator_hf_dir={tmp_path / 'nope'}"))
    small = dataclasses.replace(cfg.model, vocab_size=200)
    export_hf(init_params(small, jax.random.key(0)), small, tmp_path / "small", dtype="float32")
    with pytest.raises(ConfigError, match=r"^generate.tokenizer: bytes has 259 tokens but the evaluator's vocabulary "
                                          r"\(hf .*small\) is 200$"):
        load_evaluator(evaluator_config(tmp_path, "model.vocab_size=200",
                                        f"curate.evaluator_hf_dir={tmp_path / 'small'}"))


# --------------------------------------------------------------------------- it learns


def easy_ratings(n: int, seed: int) -> list[dict]:
    """best: a Thai response to a request for Thai; worst: an English one (the script gives it away)."""
    rng = np.random.default_rng(seed)
    thai = "บ้าน แม่น้ำ เมือง ทะเล ขนมปัง โรงเรียน ฝน ภูเขา กฎหมาย เด็ก".split()
    latin = "house river city sea bread school rain mountain law child".split()
    out = []
    for i in range(n):
        label = ("best", "worst")[i % 2]
        words = thai if label == "best" else latin
        out.append({"id": str(i), "lang": "th", "instruction": f"Write about the {rng.choice(latin)}.",
                    "output": " ".join(rng.choice(words, int(rng.integers(3, 8)))), "label": label})
    return out


def test_a_tiny_evaluator_trained_briefly_ranks_best_above_worst():
    from xinst_jax.train.optimizer import learning_rate_schedule, make_optimizer
    from xinst_jax.train.step import init_state, make_train_step

    start = time.time()
    seq, rows, steps = 512, 8, 30
    model = dataclasses.replace(TINY, embed_dim=64, head_dim=16, mlp_dim=128, init_std=0.02)
    train = TrainConfig(steps=steps, batch_size=rows, seq_len=seq, learning_rate=5e-3, warmup_steps=5,
                        weight_decay=0.0)
    tok = ByteTokenizer()
    task = Task("evaluator", tok)
    examples = [task.encode(r) for r in easy_ratings(400, seed=0)]
    optimizer = make_optimizer(train)
    state = init_state(model, optimizer, jax.random.key(0))
    step = jax.jit(make_train_step(model, train, optimizer, learning_rate_schedule(train)))
    rng = np.random.default_rng(0)
    for _ in range(steps):  # one example per row, right-padded: the trainer's batch layout
        batch = {k: np.zeros((rows, seq), np.int32) for k in ("inputs", "targets", "segment_ids", "positions")}
        batch["loss_weights"] = np.zeros((rows, seq), np.float32)
        for r, i in enumerate(rng.integers(0, len(examples), rows)):
            tokens, weights = examples[i].tokens, examples[i].loss_weights
            n = len(tokens) - 1
            assert n <= seq
            batch["inputs"][r, :n], batch["targets"][r, :n] = tokens[:-1], tokens[1:]
            batch["segment_ids"][r, :n], batch["positions"][r, :n] = 1, np.arange(n)
            batch["loss_weights"][r, :n] = weights[1:]
        state, _ = step(state, batch)
    held_out = easy_ratings(40, seed=1)
    ratings = Evaluator(Engine(state["params"], model, batch_size=8, buckets=(seq,)), tok).rate(held_out)
    scores = np.array([r.score for r in ratings])
    best = np.array([r["label"] == "best" for r in held_out])
    auc = np.mean([(a > b) + 0.5 * (a == b) for a in scores[best] for b in scores[~best]])
    assert auc >= 0.8, auc  # chance: 0.5
    assert time.time() - start < 120
