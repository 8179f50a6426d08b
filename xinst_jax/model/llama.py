"""The LLaMA family as one Flax NNX Module: training, prefill and decode run the same layers.

    model = LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
    logits = model(tokens, positions, segment_ids)                  # training: packed rows
    logits, cache = model(tokens, positions, segment_ids, cache)    # prefill and decode

Parameters are `nnx.Param`s tagged with logical axis names (`embed`, `heads`, `kv_heads`,
`head_dim`, `mlp`, `vocab`, `norm`, and `layers` for the stacked layer axis) that `mesh.rules`
maps to mesh axes. Their tree, as `nnx.split(model)` gives it (and checkpoints and the Hugging
Face mapping read it):

    embed/embedding          [vocab, embed]
    layers/attn_norm/scale   [layers, embed]
    layers/attn/wq           [layers, embed, heads, head_dim]
    layers/attn/wk, wv       [layers, embed, kv_heads, head_dim]
    layers/attn/wo           [layers, heads, head_dim, embed]
    layers/mlp_norm/scale    [layers, embed]
    layers/mlp/w_gate, w_up  [layers, embed, mlp]
    layers/mlp/w_down        [layers, mlp, embed]
    final_norm/scale         [embed]
    lm_head/kernel           [embed, vocab]       (absent with tied embeddings)
    layers/.../w*_lora/a, b  LoRA adapters        (only with model.lora_rank > 0)

Layer weights are stacked on a leading `layers` axis (created with `nnx.vmap`), scanned or
looped over per `model.scan_layers`, with `model.remat`. Inference builds the same module with
`stack_layers=False` (a list of layers; `unstack_layers` converts the params): a decode step then
reads each weight where it lies instead of slicing it out of the stack on every step.

The KV cache (`kv_cache.KVCache`) is an input and an output of every decoder layer: prefill and
decode are the same call with a cache, training the call without one. Attention is causal and
never crosses segments (segment 0 = padding), in packed rows and in the cache alike.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx, traverse_util

from xinst_jax.config import ModelConfig
from xinst_jax.model.attention import FusedMask, attend, choose_kernel, segment_causal_mask
from xinst_jax.model.kv_cache import CACHE_AXES, CACHE_SEGMENT_AXES, KVCache, write_slots
from xinst_jax.model.rope import apply_rope, inverse_frequencies, rope_cos_sin
from xinst_jax.sharding import compile_platform, constrain

Params = dict[str, Any]

BTE = ("activation_batch", "activation_length", "activation_embed")
BTHD = ("activation_batch", "activation_length", "activation_heads", None)
BTKD = ("activation_batch", "activation_length", "activation_kv_heads", None)
BTM = ("activation_batch", "activation_length", "activation_mlp")
BTV = ("activation_batch", "activation_length", "activation_vocab")

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
LORA_SUFFIX = "_lora"


# --------------------------------------------------------------------------- building blocks


def _param(value: jax.Array, axes: tuple[str | None, ...], kind: type = nnx.Param) -> nnx.Variable:
    return kind(value, logical_axes=axes)


def _normal(rngs: nnx.Rngs, shape: tuple[int, ...], std: float, dtype: Any) -> jax.Array:
    return (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, cfg: ModelConfig):
        self.scale = _param(jnp.ones((dim,), DTYPES[cfg.param_dtype]), ("norm",))
        self.eps = cfg.norm_eps

    def __call__(self, x: jax.Array) -> jax.Array:
        """Normalise in float32 (as HF does), return in the input dtype."""
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(x.dtype) * y.astype(x.dtype)


class LoRA(nnx.Module):
    """A low-rank update of one projection: x -> (x . a) . b * alpha / rank. `b` starts at zero,
    so a fresh adapter leaves the model unchanged; both are `nnx.LoRAParam`s."""

    def __init__(self, in_shape: tuple[int, ...], out_shape: tuple[int, ...], in_axes: tuple, out_axes: tuple,
                 cfg: ModelConfig, rngs: nnx.Rngs):
        rank = cfg.lora_rank
        fan_in = 1
        for d in in_shape:
            fan_in *= d
        dtype = DTYPES[cfg.lora_dtype]
        self.a = _param(_normal(rngs, in_shape + (rank,), fan_in ** -0.5, dtype), in_axes + (None,), nnx.LoRAParam)
        self.b = _param(jnp.zeros((rank,) + out_shape, dtype), (None,) + out_axes, nnx.LoRAParam)
        self.scale = cfg.lora_alpha / rank

    def __call__(self, x: jax.Array) -> jax.Array:
        a, b = self.a[...].astype(x.dtype), self.b[...].astype(x.dtype)
        n_in = a.ndim - 1
        low = jax.lax.dot_general(x, a, ((tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in))), ((), ())))
        return jax.lax.dot_general(low, b, (((low.ndim - 1,), (0,)), ((), ()))) * self.scale


def _transposed_specs(spec: str) -> tuple[str, str]:
    """For `x, w -> y`: the specs of dx = (dy, w -> x) and dw = (x, dy -> w)."""
    inputs, out = spec.split("->")
    x, w = inputs.split(",")
    return f"{out},{w}->{x}", f"{x},{out}->{w}"


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _mixed_einsum(spec: str, x: jax.Array, w: jax.Array) -> jax.Array:
    """einsum(spec, x, w in x's dtype) accumulated and returned in float32 -- and so are the two
    backward matmuls, whose operands are cast to x's dtype too. Left to autodiff, the float32
    output's cotangent would make both backward matmuls float32 (TF32 on a GPU: measured at half
    the bf16 rate on an H200, a third of the step)."""
    return jnp.einsum(spec, x, w.astype(x.dtype), preferred_element_type=jnp.float32)


def _mixed_einsum_fwd(spec, x, w):
    return _mixed_einsum(spec, x, w), (x, w)


def _mixed_einsum_bwd(spec, residuals, dy):
    x, w = residuals
    dx_spec, dw_spec = _transposed_specs(spec)
    dy = dy.astype(x.dtype)
    dx = jnp.einsum(dx_spec, dy, w.astype(x.dtype), preferred_element_type=jnp.float32)
    dw = jnp.einsum(dw_spec, x, dy, preferred_element_type=jnp.float32)
    return dx.astype(x.dtype), dw.astype(w.dtype)


_mixed_einsum.defvjp(_mixed_einsum_fwd, _mixed_einsum_bwd)


def _token_einsum(spec: str, x: jax.Array, w: jax.Array) -> jax.Array:
    """einsum(spec, x [B, T, ...], w) accumulated in float32, with batch and length merged into one
    token axis: the weight's gradient is then one plain matmul (over B and T as two axes, XLA:CPU
    transposes the activations and their gradients to sum over both). With x in a half dtype, `w`
    (float32 parameters too) is cast to it inside, and the backward matmuls take half operands
    (on accelerators; XLA:CPU widens them)."""
    b, t = x.shape[:2]
    spec = spec.replace("bt", "n")
    tokens = x.reshape((b * t,) + x.shape[2:])
    if x.dtype == jnp.float32 or compile_platform() == "cpu":  # XLA:CPU has no bf16 x bf16 -> f32 dot kernel
        y = jnp.einsum(spec, tokens, w.astype(x.dtype), preferred_element_type=jnp.float32)
    else:
        y = _mixed_einsum(spec, tokens, w)
    return y.reshape((b, t) + y.shape[1:])


def _projection(module: nnx.Module, name: str, spec: str, x: jax.Array) -> jax.Array:
    """`einsum(spec, x, module.<name>)` in x's dtype, plus the weight's LoRA adapter if it has one.
    Accumulated in float32 whatever the inputs (bfloat16 matmuls then take the backends' fast
    bf16-in, f32-accumulate kernels, e.g. the TPU MXU's; XLA:CPU widens the weight otherwise)."""
    y = _token_einsum(spec, x, getattr(module, name)[...]).astype(x.dtype)
    adapter = getattr(module, name + LORA_SUFFIX, None)
    return y if adapter is None else y + adapter(x).astype(y.dtype)


def _add_lora(module: nnx.Module, name: str, n_in: int, axes: tuple, cfg: ModelConfig, rngs: nnx.Rngs) -> None:
    if cfg.lora_rank > 0:
        shape = getattr(module, name).get_value().shape
        setattr(module, name + LORA_SUFFIX, LoRA(shape[:n_in], shape[n_in:], axes[:n_in], axes[n_in:], cfg, rngs))


class Attention(nnx.Module):
    """Grouped-query attention with RoPE; with a cache, the new keys and values are written at the
    cache's index and attention reads the cache's slots the mask spans (all, or hidden's
    `read_len` first ones)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        E, H, KV, D = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        std, dtype = cfg.init_std, DTYPES[cfg.param_dtype]
        weights = {"wq": ((E, H, D), ("embed", "heads", "head_dim")),
                   "wk": ((E, KV, D), ("embed", "kv_heads", "head_dim")),
                   "wv": ((E, KV, D), ("embed", "kv_heads", "head_dim")),
                   "wo": ((H, D, E), ("heads", "head_dim", "embed"))}
        for name, (shape, axes) in weights.items():
            setattr(self, name, _param(_normal(rngs, shape, std, dtype), axes))
        for name, (_, axes) in weights.items():
            _add_lora(self, name, 2 if name == "wo" else 1, axes, cfg, rngs)

    def __call__(self, x, cos, sin, mask, kv: tuple[jax.Array, jax.Array] | None, index):
        q = constrain(_projection(self, "wq", "bte,ehd->bthd", x), BTHD)
        k = constrain(_projection(self, "wk", "bte,ekd->btkd", x), BTKD)
        v = constrain(_projection(self, "wv", "bte,ekd->btkd", x), BTKD)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, KV, T, D]: the cache's layout
        if kv is not None:
            read = mask.shape[-1]  # the mask spans the slots attention reads: a prefix of the cache
            k = constrain(write_slots(kv[0], k, index, read), CACHE_AXES)
            v = constrain(write_slots(kv[1], v, index, read), CACHE_AXES)
            kv = (k, v)
            k, v = k[:, :, :read], v[:, :, :read]
        out = attend(q, k, v, mask)
        return constrain(_projection(self, "wo", "bthd,hde->bte", out), BTE), kv


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        E, M = cfg.embed_dim, cfg.mlp_dim
        std, dtype = cfg.init_std, DTYPES[cfg.param_dtype]
        weights = {"w_gate": ((E, M), ("embed", "mlp")), "w_up": ((E, M), ("embed", "mlp")),
                   "w_down": ((M, E), ("mlp", "embed"))}
        for name, (shape, axes) in weights.items():
            setattr(self, name, _param(_normal(rngs, shape, std, dtype), axes))
        for name, (_, axes) in weights.items():
            _add_lora(self, name, 1, axes, cfg, rngs)

    def __call__(self, x):
        gate = constrain(_projection(self, "w_gate", "bte,em->btm", x), BTM)
        up = constrain(_projection(self, "w_up", "bte,em->btm", x), BTM)
        return constrain(_projection(self, "w_down", "btm,me->bte", jax.nn.silu(gate) * up), BTE)


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg.embed_dim, cfg)
        self.attn = Attention(cfg, rngs)
        self.mlp_norm = RMSNorm(cfg.embed_dim, cfg)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, h, cos, sin, mask, kv=None, index=None):
        attended, kv = self.attn(self.attn_norm(h), cos, sin, mask, kv, index)
        h = h + attended
        return h + self.mlp(self.mlp_norm(h)), kv


class Embed(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        shape = (cfg.vocab_size, cfg.embed_dim)
        self.embedding = _param(_normal(rngs, shape, cfg.init_std, DTYPES[cfg.param_dtype]), ("vocab", "embed"))


class LMHead(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        shape = (cfg.embed_dim, cfg.vocab_size)
        self.kernel = _param(_normal(rngs, shape, cfg.init_std, DTYPES[cfg.param_dtype]), ("embed", "vocab"))


REMAT_POLICIES: dict[str, Callable | None] = {
    "dots_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "full": jax.checkpoint_policies.nothing_saveable,
}


def _stacked_layers(cfg: ModelConfig, rngs: nnx.Rngs) -> DecoderLayer:
    """`num_layers` DecoderLayers as one module whose params carry a leading layer axis."""
    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs: nnx.Rngs) -> DecoderLayer:
        return DecoderLayer(cfg, rngs)

    return make(rngs)


def _unstack(tree: Any, n: int) -> list:
    """A tree of [n, ...] arrays -> n trees of [...] arrays (None -> n Nones)."""
    if tree is None:
        return [None] * n
    pieces = jax.tree.map(lambda x: [p[0] for p in jnp.split(x, n)], tree)
    return [jax.tree.map(lambda p, i=i: p[i], pieces, is_leaf=lambda x: isinstance(x, list)) for i in range(n)]


# --------------------------------------------------------------------------- the model


class LlamaForCausalLM(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, stack_layers: bool = True):
        self.cfg = cfg
        self.stack_layers = stack_layers
        self.embed = Embed(cfg, rngs)
        if stack_layers:
            self.layers = _stacked_layers(cfg, rngs)
        else:
            self.layers = nnx.List([DecoderLayer(cfg, rngs) for _ in range(cfg.num_layers)])
        self.final_norm = RMSNorm(cfg.embed_dim, cfg)
        self.lm_head = None if cfg.tie_embeddings else LMHead(cfg, rngs)

    def __call__(self, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array,
                 cache: KVCache | None = None):
        """tokens, positions, segment_ids [B, T] int32 -> logits [B, T, vocab] float32, and the
        updated cache when one is given."""
        h, cache = self.hidden(tokens, positions, segment_ids, cache)
        logits = self.logits(h)
        return logits if cache is None else (logits, cache)

    def hidden(self, tokens, positions, segment_ids, cache: KVCache | None = None, read_len: int | None = None):
        """The last layer's hidden states [B, T, embed] (before the final norm) and the cache.

        Without a cache: packed rows, each token attending to earlier tokens of its segment.
        With one: the tokens go to slots index .. index+T-1 (their segment ids too), and attend to
        every earlier slot of their segment, the new ones included; the cache's index advances.
        A cache whose index is [B] holds each row's own write slot (rows at different steps).
        `read_len`: the caller's promise that every slot written or attended to lies below it;
        attention then reads only that prefix of a longer cache, which stays in place (continuous
        batching: slots sized for the longest prompt bucket, rows of a shorter one running)."""
        cfg = self.cfg
        h = constrain(jnp.take(self.embed.embedding[...], tokens, axis=0).astype(DTYPES[cfg.dtype]), BTE)
        cos, sin = rope_cos_sin(positions, inverse_frequencies(cfg))
        # Once per call: fused into its consumers, XLA recomputes sin/cos in every layer.
        cos, sin = jax.lax.optimization_barrier((cos, sin))
        b, t = tokens.shape
        q_index = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        if cache is None:
            kernel = choose_kernel(cfg.attention, DTYPES[cfg.dtype])
            mask = (segment_causal_mask(segment_ids, segment_ids, q_index, q_index) if kernel == "xla"
                    else FusedMask(segment_ids, kernel))
            h, _ = self._run_layers(h, cos, sin, mask, None, None)
            return h, None
        index = cache.index
        if index.ndim == 0:  # one write slot for every row
            segments = jax.lax.dynamic_update_slice(cache.segment_ids, segment_ids.astype(jnp.int32), (0, index))
            q_slot = q_index + index
        else:  # index [B]: each row writes at its own slot (continuous batching)
            segments = jax.vmap(lambda s, n, i: jax.lax.dynamic_update_slice(s, n, (i,)))(
                cache.segment_ids, segment_ids.astype(jnp.int32), index)
            q_slot = q_index + index[:, None]
        segments = constrain(segments, CACHE_SEGMENT_AXES)
        read = cache.length if read_len is None else min(read_len, cache.length)
        kv_index = jnp.broadcast_to(jnp.arange(read, dtype=jnp.int32), (b, read))
        mask = segment_causal_mask(segment_ids, segments[:, :read], q_slot, kv_index)  # once, not per layer
        h, (k, v) = self._run_layers(h, cos, sin, mask, (cache.k, cache.v), index)
        return h, KVCache(k, v, segments, index + t)

    def logits(self, h: jax.Array) -> jax.Array:
        """Hidden states [B, T, embed] -> logits [B, T, vocab] float32 (final norm, then lm_head)."""
        h = self.final_norm(h)
        if self.lm_head is None:
            logits = _token_einsum("bte,ve->btv", h, self.embed.embedding[...])
        else:
            logits = _token_einsum("bte,ev->btv", h, self.lm_head.kernel[...])
        return constrain(logits, BTV)

    def _run_layers(self, h, cos, sin, mask, kv, index):
        """All layers: a Python loop over the per-layer list, or (stacked) a scan or a loop over
        the layer axis. `kv`: (k, v) per layer as the layout stores them, or None."""
        cfg = self.cfg
        if not self.stack_layers:
            ks, vs = [], []
            for i, layer in enumerate(self.layers):
                h, layer_kv = layer(h, cos, sin, mask, None if kv is None else (kv[0][i], kv[1][i]), index)
                if layer_kv is not None:
                    ks.append(layer_kv[0])
                    vs.append(layer_kv[1])
            return h, (None if kv is None else (ks, vs))

        graphdef, state = nnx.split(self.layers)

        def one_layer(h, layer_state, layer_kv):
            return nnx.merge(graphdef, layer_state)(h, cos, sin, mask, layer_kv, index)

        if cfg.remat != "none":
            one_layer = jax.checkpoint(one_layer, policy=REMAT_POLICIES[cfg.remat], prevent_cse=True)
        if cfg.scan_layers:
            return jax.lax.scan(lambda h, xs: one_layer(h, *xs), h, (state, kv))
        # Split the stack once (its gradient is one concatenate, not a pad and an add per layer).
        states, kvs = _unstack(state, cfg.num_layers), _unstack(kv, cfg.num_layers)
        outputs = []
        for i in range(cfg.num_layers):
            h, layer_kv = one_layer(h, states[i], kvs[i])
            outputs.append(layer_kv)
        if kv is None:
            return h, None
        return h, jax.tree.map(lambda *xs: jnp.stack(xs), *outputs)


# --------------------------------------------------------------------------- params as plain trees
#
# The trainer, checkpoints and the Hugging Face mapping hold the module's state as a plain dict
# (`nnx.split(model)[1].to_pure_dict()`); `bind` merges it back into the module.


def abstract_model(cfg: ModelConfig, stack_layers: bool = True) -> LlamaForCausalLM:
    """The module with ShapeDtypeStructs for arrays: no memory, no compute."""
    return nnx.eval_shape(lambda: LlamaForCausalLM(cfg, rngs=nnx.Rngs(0), stack_layers=stack_layers))


def bind(params: Params, cfg: ModelConfig, stack_layers: bool = True) -> LlamaForCausalLM:
    """The module holding `params` (a plain tree as `init_params` makes; inside jit: tracers)."""
    graphdef, _ = nnx.split(abstract_model(cfg, stack_layers))
    return nnx.merge(graphdef, params)


def init_params(cfg: ModelConfig, rng: jax.Array, stack_layers: bool = True) -> Params:
    """Random init (normal(init_std) matrices, unit norms, zero LoRA `b`). Pure: jit it with
    out_shardings to create the params directly sharded."""
    model = LlamaForCausalLM(cfg, rngs=nnx.Rngs(params=rng), stack_layers=stack_layers)
    return nnx.split(model)[1].to_pure_dict()


def forward(params: Params, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array,
            cfg: ModelConfig) -> jax.Array:
    """tokens, positions, segment_ids [B, T] int32 -> logits [B, T, vocab] float32."""
    return bind(params, cfg)(tokens, positions, segment_ids)


def _flat_variables(cfg: ModelConfig, stack_layers: bool) -> dict[tuple, nnx.Variable]:
    state = nnx.split(abstract_model(cfg, stack_layers))[1]
    return {tuple(path): variable for path, variable in state.flat_state()}


def logical_axes(cfg: ModelConfig, stack_layers: bool = True) -> Params:
    """The params tree with a tuple of logical axis names per array (`layers` first for stacked
    layer weights)."""
    def axes(path, variable):
        names = tuple(variable.get_metadata()["logical_axes"])
        return ("layers",) + names if stack_layers and path[0] == "layers" else names

    return traverse_util.unflatten_dict({p: axes(p, v) for p, v in _flat_variables(cfg, stack_layers).items()})


def param_shapes(cfg: ModelConfig, stack_layers: bool = True) -> Params:
    return traverse_util.unflatten_dict({p: jax.ShapeDtypeStruct(v.get_value().shape, v.get_value().dtype)
                                         for p, v in _flat_variables(cfg, stack_layers).items()})


def count_params(cfg: ModelConfig, trainable_only: bool = False) -> int:
    total = 0
    for path, v in _flat_variables(cfg, True).items():
        if not trainable_only or is_trainable(path, cfg):
            total += v.get_value().size
    return total


def default_positions_and_segments(tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One unpacked sequence per row: positions 0..T-1, segment 1 everywhere."""
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    return positions, jnp.ones((b, t), jnp.int32)


# --------------------------------------------------------------------------- LoRA and layouts


def is_lora_path(path: tuple) -> bool:
    return any(str(p).endswith(LORA_SUFFIX) for p in path)


def is_trainable(path: tuple, cfg: ModelConfig) -> bool:
    """With LoRA only the adapters train; otherwise every parameter does."""
    return is_lora_path(path) if cfg.lora_rank > 0 else True


def split_trainable(params: Params, cfg: ModelConfig) -> tuple[Params, Params]:
    """(trainable, frozen) subtrees of `params`; `join_trainable` puts them back together."""
    flat = traverse_util.flatten_dict(params)
    trainable = {p: x for p, x in flat.items() if is_trainable(p, cfg)}
    frozen = {p: x for p, x in flat.items() if not is_trainable(p, cfg)}
    return traverse_util.unflatten_dict(trainable), traverse_util.unflatten_dict(frozen)


def join_trainable(trainable: Params, frozen: Params) -> Params:
    return traverse_util.unflatten_dict({**traverse_util.flatten_dict(frozen),
                                         **traverse_util.flatten_dict(trainable)})


def merge_lora(params: Params, cfg: ModelConfig) -> Params:
    """Base params with every adapter folded into its weight (W + a . b * alpha / rank, in
    float32, cast back to the weight's dtype) and the adapters removed: what HF export writes."""
    flat = traverse_util.flatten_dict(params)
    out = {p: x for p, x in flat.items() if not is_lora_path(p)}
    scale = cfg.lora_alpha / cfg.lora_rank if cfg.lora_rank > 0 else 0.0
    for path in [p for p in flat if is_lora_path(p) and p[-1] == "a"]:
        base = path[:-2] + (path[-2][:-len(LORA_SUFFIX)],)
        a, b, w = flat[path], flat[path[:-1] + ("b",)], out[base]
        lead = (a.ndim - 1) + (b.ndim - 1) - w.ndim  # 1 for stacked layers, else 0
        rank = a.shape[-1]
        a2 = jnp.asarray(a, jnp.float32).reshape(a.shape[:lead] + (-1, rank))
        b2 = jnp.asarray(b, jnp.float32).reshape(b.shape[:lead] + (rank, -1))
        out[base] = (jnp.asarray(w, jnp.float32) + scale * jnp.matmul(a2, b2).reshape(w.shape)).astype(w.dtype)
    return traverse_util.unflatten_dict(out)


def unstack_layers(params: Params, cfg: ModelConfig) -> Params:
    """Stacked params (the training layout) -> the `stack_layers=False` layout: one subtree per
    layer. Pure: jit it with the per-layer shardings to lay out inference weights once."""
    return {**params, "layers": dict(enumerate(_unstack(params["layers"], cfg.num_layers)))}
