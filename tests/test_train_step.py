"""The train step's numerics: gradient accumulation, loss normalisation, z-loss, AdamW's weight-decay
mask, the learning-rate schedule, clipping, and bf16 compute over fp32 master weights.

All on the `tiny` preset on one device (no mesh: jit places everything on device 0); reference
values are computed here in float64 numpy from the model's own logits.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from xinst_jax.config import load_config
from xinst_jax.model.llama import forward, init_params
from xinst_jax.train.optimizer import learning_rate_schedule, make_optimizer, weight_decay_mask
from xinst_jax.train.step import loss_and_grads, make_train_step

SEQ = 32
ROWS = 8
# Loss tokens per row: two all-padding rows, one with a single token, one full row. With
# grad_accum=4 every micro-batch (whichever rows it takes) then holds a different token count.
ROW_LENS = [32, 1, 0, 5, 20, 2, 7, 0]


def tiny_cfg(*overrides: str):
    return load_config("tiny_synthetic", overrides=["train.export_at_end=false", *overrides])


def make_batch(vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Rows of one document each, padded on the right; the first token of rows 0 and 4 is not a
    loss token (a prompt), so loss tokens != real tokens."""
    rng = np.random.default_rng(seed)
    batch = {k: np.zeros((ROWS, SEQ), np.int32) for k in ("inputs", "targets", "segment_ids", "positions")}
    batch["loss_weights"] = np.zeros((ROWS, SEQ), np.float32)
    for row, n in enumerate(ROW_LENS):
        batch["inputs"][row, :n] = rng.integers(3, vocab, n)
        batch["targets"][row, :n] = rng.integers(3, vocab, n)
        batch["segment_ids"][row, :n] = 1
        batch["positions"][row, :n] = np.arange(n)
        batch["loss_weights"][row, :n] = 1.0
    batch["loss_weights"][0, 0] = 0.0
    batch["loss_weights"][4, 0] = 0.0
    return batch


def np_token_stats(params, batch, model_cfg):
    """Per-token float64 (cross-entropy, logsumexp) from the model's float32 logits."""
    logits = jax.jit(lambda p, b: forward(p, b["inputs"], b["positions"], b["segment_ids"], model_cfg))(
        params, batch)
    logits = np.asarray(logits, np.float64)
    m = logits.max(-1, keepdims=True)
    lse = (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[..., 0]
    target_logit = np.take_along_axis(logits, batch["targets"][..., None].astype(np.int64), -1)[..., 0]
    return lse - target_logit, lse


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def jit_loss_and_grads(model_cfg, train_cfg):
    return jax.jit(lambda p, b: loss_and_grads(p, b, model_cfg, train_cfg))


class Setup:
    """The tiny model, one batch, and jitted functions shared across tests (each compile costs
    seconds on a small CPU)."""

    def __init__(self):
        self.cfg = tiny_cfg("train.warmup_steps=0", "train.learning_rate=3e-3")
        self.params = jax.jit(lambda k: init_params(self.cfg.model, k))(jax.random.key(0))
        self.batch = make_batch(self.cfg.model.vocab_size)
        self.loss_and_grads = jit_loss_and_grads(self.cfg.model, self.cfg.train)
        self.optimizer = make_optimizer(self.cfg.train)
        self.step = jax.jit(make_train_step(self.cfg.model, self.cfg.train, self.optimizer,
                                            learning_rate_schedule(self.cfg.train)))
        self._base_step = None

    def state(self, optimizer=None):
        optimizer = optimizer or self.optimizer
        return {"step": jnp.zeros((), jnp.int32), "params": self.params, "opt_state": optimizer.init(self.params),
                "rng": jax.random.key(1)}

    def base_step(self):
        """One train step of the base config on the test batch: (new_state, metrics) on host."""
        if self._base_step is None:
            self._base_step = jax.device_get(self.step(self.state(), self.batch))
        return self._base_step


@pytest.fixture(scope="module")
def setup():
    return Setup()


# --------------------------------------------------------------------------- gradient accumulation


def test_grad_accum_equals_one_big_batch(setup):
    cfg, params, batch = setup.cfg, setup.params, setup.batch
    # The micro-batches hold different numbers of loss tokens, whichever way rows are assigned.
    w = batch["loss_weights"].sum(1)
    strided = [w[i::4].sum() for i in range(4)]
    contiguous = [w[2 * i:2 * i + 2].sum() for i in range(4)]
    assert len(set(strided)) == 4 and len(set(contiguous)) == 4, (strided, contiguous)

    sums1, grads1 = setup.loss_and_grads(params, batch)
    train4 = dataclasses.replace(cfg.train, grad_accum=4)
    sums4, grads4 = jit_loss_and_grads(cfg.model, train4)(params, batch)

    assert float(sums4.weight) == float(sums1.weight) == w.sum()
    loss1, loss4 = float(sums1.loss / sums1.weight), float(sums4.loss / sums4.weight)
    loss_rel = abs(loss4 - loss1) / abs(loss1)
    flat1, flat4 = jax.tree.leaves(grads1), jax.tree.leaves(grads4)
    leaf_rel = max(rel(g4, g1) for g1, g4 in zip(flat1, flat4))
    print(f"\ngrad_accum 4 vs 1: loss {loss4!r} vs {loss1!r} (rel {loss_rel:.2e}); "
          f"max per-leaf grad rel-norm diff {leaf_rel:.2e}")
    assert loss_rel <= 1e-6
    assert leaf_rel <= 1e-6
    for g1, g4 in zip(flat1, flat4):
        assert g4.dtype == g1.dtype == jnp.float32

    # The test discriminates: averaging per-micro-batch means (the classic accumulation bug)
    # would be far off, because the micro-batches' token counts differ so much.
    ce, _ = np_token_stats(params, batch, cfg.model)
    micro_means = [(ce[i::4] * batch["loss_weights"][i::4]).sum() / strided[i] for i in range(4)]
    assert abs(np.mean(micro_means) - loss1) / loss1 > 1e-3


def test_loss_normalised_by_loss_tokens(setup):
    cfg, params, batch = setup.cfg, setup.params, setup.batch
    ce, _ = np_token_stats(params, batch, cfg.model)
    w = batch["loss_weights"].astype(np.float64)
    expected = (ce * w).sum() / w.sum()

    sums, _ = setup.loss_and_grads(params, batch)
    assert float(sums.weight) == w.sum()
    assert float(sums.real_tokens) == (batch["segment_ids"] != 0).sum()
    assert float(sums.real_tokens) != float(sums.weight)
    assert abs(float(sums.loss / sums.weight) - expected) / expected <= 1e-6

    # The train step's reported loss is the same normalised figure.
    _, metrics = setup.base_step()
    assert abs(float(metrics["loss"]) - expected) / expected <= 1e-6
    assert float(metrics["loss_tokens"]) == w.sum()
    # A mean over all positions (padding included) or over real tokens would differ.
    assert abs(ce.mean() - expected) / expected > 1e-4


def test_z_loss_adds_z_times_mean_logsumexp_squared(setup):
    cfg, params, batch = setup.cfg, setup.params, setup.batch
    z = 1e-2
    ce, lse = np_token_stats(params, batch, cfg.model)
    w = batch["loss_weights"].astype(np.float64)
    ce_mean = (ce * w).sum() / w.sum()
    z_term = z * (lse ** 2 * w).sum() / w.sum()
    assert z_term > 1e-2 * ce_mean  # large enough to see

    assert cfg.train.z_loss == 0.0
    results = {0.0: setup.base_step()[1]}
    train_cfg = dataclasses.replace(cfg.train, z_loss=z)
    step = jax.jit(make_train_step(cfg.model, train_cfg, setup.optimizer, learning_rate_schedule(train_cfg)))
    results[z] = jax.device_get(step(setup.state(), batch)[1])
    assert float(results[0.0]["z_loss"]) == 0.0
    assert abs(float(results[0.0]["loss"]) - ce_mean) / ce_mean <= 1e-6
    assert abs(float(results[z]["z_loss"]) - z_term) / z_term <= 1e-6
    assert abs(float(results[z]["loss"]) - (ce_mean + z_term)) / (ce_mean + z_term) <= 1e-6
    # z-loss also enters the gradient.
    assert float(results[z]["grad_norm"]) != float(results[0.0]["grad_norm"])


# --------------------------------------------------------------------------- optimizer


def test_weight_decay_mask_excludes_norms(setup):
    cfg, params = setup.cfg, setup.params
    mask = weight_decay_mask(params, cfg.train.weight_decay_exclude)
    flat = {jax.tree_util.keystr(p): m for p, m in jax.tree_util.tree_flatten_with_path(mask)[0]}
    excluded = sorted(k for k, m in flat.items() if not m)
    assert excluded == sorted(k for k in flat if "norm" in k)
    assert len(excluded) == 3  # attn_norm, mlp_norm, final_norm
    assert sum(flat.values()) == len(flat) - 3

    lr, wd = 0.1, 0.1
    train_cfg = dataclasses.replace(cfg.train, learning_rate=lr, weight_decay=wd, warmup_steps=0)
    optimizer = make_optimizer(train_cfg)
    opt_state = optimizer.init(params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = jax.jit(optimizer.update)(zeros, opt_state, params)
    new = jax.device_get(optax.apply_updates(params, updates))
    old = jax.device_get(params)
    for (path, p_old), p_new in zip(jax.tree_util.tree_flatten_with_path(old)[0], jax.tree.leaves(new)):
        name = jax.tree_util.keystr(path)
        assert p_new.dtype == p_old.dtype
        if "norm" in name:
            np.testing.assert_array_equal(p_new, p_old, err_msg=name)
        else:
            # Zero grads: Adam's update is 0, decoupled decay shrinks by lr * wd.
            np.testing.assert_allclose(p_new, p_old * (1 - lr * wd), rtol=1e-6, atol=0, err_msg=name)
            nz = p_old != 0
            assert np.all(np.abs(p_new[nz]) < np.abs(p_old[nz])), name


def _expected_lr(t: int, peak: float, warmup: int, steps: int, ratio: float, kind: str) -> float:
    if t < warmup:
        return peak * t / warmup
    k, d = min(t - warmup, steps - warmup), steps - warmup
    if kind == "cosine":
        return peak * (ratio + (1 - ratio) * 0.5 * (1 + math.cos(math.pi * k / d)))
    if kind == "linear":
        return peak + (peak * ratio - peak) * k / d
    return peak


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_learning_rate_schedule(kind):
    peak, warmup, steps, ratio = 3e-3, 10, 100, 0.1
    cfg = tiny_cfg(f"train.learning_rate={peak}", f"train.warmup_steps={warmup}", f"train.steps={steps}",
                   f"train.min_lr_ratio={ratio}", f"train.schedule={kind}").train
    schedule = learning_rate_schedule(cfg)
    got = np.array([float(schedule(t)) for t in range(0, steps + 30)])
    want = np.array([_expected_lr(t, peak, warmup, steps, ratio, kind) for t in range(0, steps + 30)])
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-12)
    assert got[0] == 0.0
    assert got[warmup] == pytest.approx(peak, rel=1e-6)
    assert np.all(np.diff(got[:warmup + 1]) > 0)
    if kind != "constant":
        assert got[steps] == pytest.approx(ratio * peak, rel=1e-6)
        assert got[-1] == pytest.approx(ratio * peak, rel=1e-6)  # held at the floor after `steps`
        assert np.all(np.diff(got[warmup:steps + 1]) < 0)
    else:
        np.testing.assert_allclose(got[warmup:], peak, rtol=1e-6)


def test_clipping_reports_pre_clip_norm_and_updates_with_clipped_grads(setup):
    cfg, params, batch = setup.cfg, setup.params, setup.batch
    _, grads = setup.loss_and_grads(params, batch)
    grads = jax.device_get(grads)
    norm = float(np.sqrt(sum(np.sum(np.square(g.astype(np.float64))) for g in jax.tree.leaves(grads))))
    clip = norm / 4
    lr, eps, b1 = 0.5, 1.0, cfg.train.b1
    # eps=1 (>> |grad| elements) makes Adam's first update ~ lr * g, so its size shows the clipping.
    train_cfg = dataclasses.replace(cfg.train, clip_grad_norm=clip, learning_rate=lr, warmup_steps=0,
                                    weight_decay=0.0, eps=eps)
    optimizer = make_optimizer(train_cfg)
    step = jax.jit(make_train_step(cfg.model, train_cfg, optimizer, learning_rate_schedule(train_cfg)))
    new_state, metrics = jax.device_get(step(setup.state(optimizer), batch))

    assert abs(float(metrics["grad_norm"]) - norm) / norm <= 1e-6  # pre-clip
    adam = [s for s in jax.tree.leaves(new_state["opt_state"], is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
            if isinstance(s, optax.ScaleByAdamState)]
    assert len(adam) == 1
    mu_norm = float(np.sqrt(sum(np.sum(np.square(m.astype(np.float64))) for m in jax.tree.leaves(adam[0].mu))))
    assert abs(mu_norm / (1 - b1) - clip) / clip <= 1e-5  # Adam saw grads of norm == clip
    old = jax.device_get(params)
    for path_p, g, mu, p_old, p_new in zip(jax.tree_util.tree_flatten_with_path(old)[0], jax.tree.leaves(grads),
                                           jax.tree.leaves(adam[0].mu), jax.tree.leaves(old),
                                           jax.tree.leaves(new_state["params"])):
        name = jax.tree_util.keystr(path_p[0])
        gc = g.astype(np.float64) * (clip / norm)
        np.testing.assert_allclose(mu, (1 - b1) * gc, rtol=1e-5, atol=1e-12, err_msg=name)
        expected = p_old - lr * gc / (np.abs(gc) + eps)
        # atol: a few float32 ulps of the old value (where the update nearly cancels it).
        atol = 4 * np.finfo(np.float32).eps * np.abs(p_old).max()
        np.testing.assert_allclose(p_new, expected, rtol=1e-6, atol=atol, err_msg=name)
        unclipped = p_old - lr * g / (np.abs(g) + eps)
        if np.abs(g).max() > 1e-6:
            assert not np.allclose(p_new, unclipped, rtol=1e-6, atol=atol), name


# --------------------------------------------------------------------------- mixed precision


def test_bf16_compute_keeps_fp32_master_weights(setup):
    """bf16 activations/matmuls (model.dtype), fp32 params and optimizer state (param_dtype).

    Tolerance: at each of 4 steps the bf16 loss must match the fp32 loss to within bf16's unit
    roundoff, 2**-9 (~2e-3) relative: as if only the final loss had been rounded to bf16. The loss
    itself is computed in float32 from logits of magnitude ~0.2 (init_std 0.02), so bf16 rounding of
    activations moves it by far less (measured ~1e-5); casting the logits/log-softmax to bf16 or
    accumulating updates in bf16 params would not fit. The dtype checks catch bf16 master weights.
    """
    from xinst_jax.data.synthetic import SyntheticSource

    steps = 4
    losses, finals = {}, {}
    for dtype in ("float32", "bfloat16"):
        cfg = dataclasses.replace(setup.cfg, model=dataclasses.replace(setup.cfg.model, dtype=dtype))
        assert cfg.model.param_dtype == "float32"
        if dtype == "float32":
            step = setup.step
        else:
            step = jax.jit(make_train_step(cfg.model, cfg.train, setup.optimizer, learning_rate_schedule(cfg.train)))
        state = setup.state()  # the same fp32 init for both
        source = SyntheticSource(cfg.data.synthetic, cfg.model.vocab_size, ROWS, SEQ, seed=0)
        out = []
        for _ in range(steps):
            state, metrics = step(state, next(source))
            out.append(float(metrics["loss"]))
        losses[dtype], finals[dtype] = out, jax.device_get(state)

    state = finals["bfloat16"]
    for leaf in jax.tree.leaves(state["params"]):
        assert leaf.dtype == np.float32
    adam = [s for s in jax.tree.leaves(state["opt_state"], is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
            if isinstance(s, optax.ScaleByAdamState)][0]
    for leaf in jax.tree.leaves((adam.mu, adam.nu)):
        assert leaf.dtype == np.float32
    # fp32 master weights: the updated params are not bf16 numbers stored in fp32.
    for name, leaf in (("wq", state["params"]["layers"]["attn"]["wq"]), ("lm_head", state["params"]["lm_head"]["kernel"])):
        rounded = np.asarray(jnp.asarray(leaf).astype(jnp.bfloat16).astype(jnp.float32))
        assert np.mean(rounded != leaf) > 0.9, name

    rels = [abs(b - f) / f for b, f in zip(losses["bfloat16"], losses["float32"])]
    print(f"\nfp32 losses {losses['float32']}\nbf16 losses {losses['bfloat16']}\nrel diffs {rels}")
    assert losses["float32"][-1] < losses["float32"][0]  # it trains
    assert max(rels) <= 2 ** -9
    assert losses["bfloat16"] != losses["float32"]  # the compute really was bf16
