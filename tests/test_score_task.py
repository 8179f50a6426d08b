"""Scoring through the Task: a record's log-likelihood is minus the training loss the trainer
computes for the same record as `prepare` tokenises it (a model is scored as it was trained)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from xinst_jax.config import ModelConfig
from xinst_jax.data.tokenizer import ByteTokenizer
from xinst_jax.infer.generate import Engine
from xinst_jax.infer.score import score_records
from xinst_jax.model.llama import forward, init_params
from xinst_jax.tasks import Task
from xinst_jax.train.loss import weighted_cross_entropy

RECORDS = [
    {"id": "a", "lang": "sw", "instruction": "Say hello.", "output": "Habari!"},
    {"id": "b", "lang": "th", "instruction": "Name a city.", "output": "กรุงเทพ"},
    {"id": "c", "lang": "fi", "instruction": "Count to three in Finnish, please.", "output": "yksi, kaksi, kolme"},
]


def test_score_records_is_minus_the_training_loss():
    cfg = ModelConfig(vocab_size=259, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                      mlp_dim=64, init_std=0.2)
    params = init_params(cfg, jax.random.key(3))
    task = Task("sft", ByteTokenizer())
    engine = Engine(params, cfg, batch_size=2, buckets=(256,), score_buckets=(256,))
    scored = score_records(engine, task, RECORDS)
    for i, record in enumerate(RECORDS):
        ex = task.encode(record)
        tokens = np.asarray([ex.tokens], np.int32)
        weights = np.asarray([ex.loss_weights], np.float32)
        positions = np.arange(tokens.shape[1] - 1, dtype=np.int32)[None]
        logits = forward(params, jnp.asarray(tokens[:, :-1]), jnp.asarray(positions),
                         jnp.ones_like(jnp.asarray(positions)), cfg)
        loss, _ = weighted_cross_entropy(logits, jnp.asarray(tokens[:, 1:]), jnp.asarray(weights[:, 1:]))
        assert scored.num_tokens[i] == len(ex.target) == int(weights.sum()) and not scored.truncated[i]
        np.testing.assert_allclose(scored.sum_logprob[i], -float(loss), rtol=1e-5)
