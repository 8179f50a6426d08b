"""k-means in JAX: k-means++ initialisation and Lloyd iterations, points sharded over a mesh.

    result = kmeans(points, k, jax.random.PRNGKey(0), mesh=mesh)   # points [N, D] float32 (numpy)
    result.centroids [k, D], result.assignments [N], result.inertia, result.sizes [k]

The diversify job (curate/diversify.py) clusters each language's instruction embeddings with it.

Layout. The points' rows are split over the mesh's data axes (`axes`, by default `data` and
`fsdp`); every other array (centroids [k, D], per-cluster sums and counts) is replicated. N is
padded (`padded_rows`: a multiple of the shard count, one of a few sizes so that similar N share a
compile) with zero rows of weight 0, so N need not divide the device count and padding never
moves a centroid, counts or inertia. The arrays are built with
`jax.make_array_from_callback` from the same numpy array on every process, so the one call runs
on one CPU, one chip, or every host of a pod slice (all processes call it with the same points).

Determinism across meshes. Everything per point (distances, assignments, random draws) is the
same computation on any mesh: the random draws of k-means++ are keyed by the point's global
index (`fold_in(key, i)`), not by the padded array's shape. Everything per cluster is a sum over
the sharded points axis (a one-hot [N, k] matmul), which GSPMD computes as per-shard partial sums
plus an all-reduce: 8 devices give the 1-device centroids up to float32 summation order (~1e-7).
(Choices made by comparing such sums -- the greedy k-means++ trial, the best restart -- could
only differ between meshes on a near-tie within that rounding.)
Matmuls run at `Precision.HIGHEST` (on TPU the default bf16 passes would move centroids ~1e-3).

Metric. "cosine" (spherical k-means, for sentence embeddings): points are L2-normalised, assigned
to the nearest centroid and each centroid is its cluster's normalised mean; "euclidean": plain
Lloyd. Distances are squared euclidean in both (on unit vectors 2 - 2 cos), and so is `inertia`.

1. greedy k-means++ (Arthur & Vassilvitskii 2007; scikit-learn's variant): the first centroid is
   a point drawn by weight; for each next one, 2 + ln k points are drawn with probability
   proportional to weight x D² (D: the distance to the nearest chosen centroid; Gumbel top-k over
   the points; by weight alone when every point sits on a centroid) and the one that lowers the
   potential sum(w D²) most is taken. Deterministic given the key.
2. Lloyd, in one jit-compiled `lax.while_loop`: assign every point to its nearest centroid, move
   each centroid to its cluster's (weighted) mean; stop after `iterations` updates or when the
   centroids moved less than `tolerance` (relative: ||C_new - C||_F / ||C||_F). A cluster left
   empty is re-seeded at the farthest point from its centroid (the r-th empty cluster at the r-th
   farthest point), as scikit-learn does.
3. The returned assignments are those to the returned centroids (one last assignment step).

Memory per device: the points' share (N/shards x D x 4 bytes) plus two [N/shards, k] float32
arrays (distances and the one-hot), e.g. 1M points of 384 dims, k=1000 on 8 chips: ~1.2 GB.
Traffic: per Lloyd iteration one all-reduce of [k, D + 1]; per k-means++ step (and per re-seed)
XLA all-gathers the [N] float32 scores for `top_k` (4 MB for 1M points).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

METRICS = ("cosine", "euclidean")
HIGHEST = lax.Precision.HIGHEST
DATA_AXES = ("data", "fsdp")
MIN_ROWS = 256  # points are padded to at least this many rows (and then to a few sizes): fewer compiles


@dataclasses.dataclass(frozen=True)
class KMeansResult:
    centroids: np.ndarray  # [k, D] float32
    assignments: np.ndarray  # [N] int32, the nearest centroid of each point
    inertia: float  # sum over points of weight x squared distance to its centroid
    sizes: np.ndarray  # [k] int64, points (of weight > 0) per cluster (0: a cluster left empty)
    iterations: int  # Lloyd updates run
    shift: float  # the last update's relative centroid movement
    reseeded: int  # empty clusters re-seeded at a far point, all iterations together


# --------------------------------------------------------------------------- pieces (inside jit)


def _sq_distances(x: jax.Array, x_sq: jax.Array, c: jax.Array) -> jax.Array:
    """Squared euclidean distances [N, k] of points x [N, D] (x_sq = |x|² [N]) to centroids c [k, D]."""
    cross = jnp.dot(x, c.T, precision=HIGHEST)
    return jnp.maximum(x_sq[:, None] - 2.0 * cross + jnp.sum(c * c, axis=-1)[None, :], 0.0)


def _rows(x: jax.Array, index: jax.Array, wanted: jax.Array) -> jax.Array:
    """x[wanted] for wanted [m] global row indices, as a one-hot matmul over the (sharded) rows:
    exact (one term per output), and no gather of x across devices."""
    select = (index[:, None] == wanted[None, :]).astype(x.dtype)  # [N, m]
    return jnp.dot(select.T, x, precision=HIGHEST)


def _gumbel(key: jax.Array, index: jax.Array) -> jax.Array:
    """Gumbel noise per point keyed by its global index: the same draw on any mesh or padding."""
    return jax.vmap(lambda i: jax.random.gumbel(jax.random.fold_in(key, i)))(index)


def _normalise(c: jax.Array) -> jax.Array:
    return c / jnp.maximum(jnp.linalg.norm(c, axis=-1, keepdims=True), 1e-12)


def kmeans_plus_plus(x: jax.Array, x_sq: jax.Array, w: jax.Array, key: jax.Array, k: int,
                     trials: int | None = None) -> jax.Array:
    """Greedy k-means++ centroids [k, D] for points x [N, D] (x_sq = |x|²) with weights w [N] (0: padding).

    The first centroid is a point drawn by weight; each next one is the best of `trials` points
    (default 2 + ln k, as scikit-learn) drawn without replacement with probability proportional
    to weight x D² (Gumbel top-k over the points): the one that lowers the potential
    sum(w x D²) most."""
    n = x.shape[0]
    trials = max(1, min(trials or 2 + int(math.log(k)), n))
    index = jnp.arange(n, dtype=jnp.int32)
    log_w = jnp.where(w > 0, jnp.log(jnp.where(w > 0, w, 1.0)), -jnp.inf)

    first = jnp.argmax(log_w + _gumbel(jax.random.fold_in(key, 0), index)).astype(jnp.int32)
    c0 = _rows(x, index, first[None])  # [1, D]
    d2 = _sq_distances(x, x_sq, c0)[:, 0]
    centroids = lax.dynamic_update_slice(jnp.zeros((k, x.shape[1]), x.dtype), c0, (0, 0))

    def body(j, carry):
        centroids, d2 = carry
        g = _gumbel(jax.random.fold_in(key, j), index)
        score = jnp.where((w > 0) & (d2 > 0), log_w + jnp.log(jnp.where(d2 > 0, d2, 1.0)) + g, -jnp.inf)
        score = jnp.where(jnp.max(score) > -jnp.inf, score, log_w + g)  # all points on centroids: by weight
        _, picks = lax.top_k(score, trials)
        candidates = _rows(x, index, picks.astype(jnp.int32))  # [trials, D]
        dc = jnp.minimum(d2[:, None], _sq_distances(x, x_sq, candidates))  # [N, trials]
        best = jnp.argmin(jnp.sum(w[:, None] * dc, axis=0))
        chosen = lax.dynamic_slice_in_dim(candidates, best, 1, axis=0)
        return lax.dynamic_update_slice(centroids, chosen, (j, 0)), jnp.take(dc, best, axis=1)

    centroids, _ = lax.fori_loop(1, k, body, (centroids, d2))
    return centroids


def _assign(x, x_sq, centroids):
    d = _sq_distances(x, x_sq, centroids)
    a = jnp.argmin(d, axis=1).astype(jnp.int32)
    return a, jnp.take_along_axis(d, a[:, None], axis=1)[:, 0]


def _cluster_sums(x, w, a, k):
    """Per-cluster weighted sums [k, D] and weights [k]: a one-hot matmul reducing over the points."""
    onehot = (a[:, None] == jnp.arange(k, dtype=jnp.int32)[None, :]).astype(x.dtype) * w[:, None]  # [N, k]
    return jnp.dot(onehot.T, x, precision=HIGHEST), jnp.sum(onehot, axis=0)


def lloyd_step(x, x_sq, w, centroids, metric: str):
    """One Lloyd update: (new centroids, clusters re-seeded)."""
    k = centroids.shape[0]
    a, dmin = _assign(x, x_sq, centroids)
    sums, counts = _cluster_sums(x, w, a, k)
    means = sums / jnp.maximum(counts, 1e-30)[:, None]
    empty = counts <= 0
    n_empty = jnp.sum(empty).astype(jnp.int32)

    def reseed(means):
        index = jnp.arange(x.shape[0], dtype=jnp.int32)
        far = jnp.where(w > 0, dmin, -jnp.inf)
        _, farthest = lax.top_k(far, k)  # the k farthest points, farthest first
        rank = jnp.clip(jnp.cumsum(empty) - 1, 0, k - 1)  # the r-th empty cluster takes the r-th farthest
        return jnp.where(empty[:, None], _rows(x, index, farthest[rank].astype(jnp.int32)), means)

    new = lax.cond(n_empty > 0, reseed, lambda m: m, means)
    if metric == "cosine":
        new = _normalise(new)
    return new, n_empty


def _kmeans_impl(points, weights, key, iterations, tolerance, *, k: int, metric: str):
    x = points.astype(jnp.float32)
    w = weights.astype(jnp.float32)
    if metric == "cosine":
        x = _normalise(x) * (w > 0)[:, None]
    x_sq = jnp.sum(x * x, axis=-1)
    centroids = kmeans_plus_plus(x, x_sq, w, key, k)

    def cond(state):
        i, _, shift, _ = state
        return (i < iterations) & (shift >= tolerance)

    def body(state):
        i, c, _, reseeded = state
        new, n_empty = lloyd_step(x, x_sq, w, c, metric)
        shift = jnp.sqrt(jnp.sum((new - c) ** 2)) / jnp.maximum(jnp.sqrt(jnp.sum(c * c)), 1e-12)
        return i + 1, new, shift, reseeded + n_empty

    state = (jnp.int32(0), centroids, jnp.float32(jnp.inf), jnp.int32(0))
    i, centroids, shift, reseeded = lax.while_loop(cond, body, state)
    a, dmin = _assign(x, x_sq, centroids)
    return centroids, a, jnp.sum(w * dmin), i, shift, reseeded


@functools.lru_cache(maxsize=64)
def _compiled(k: int, metric: str, mesh: Mesh | None):
    fn = functools.partial(_kmeans_impl, k=k, metric=metric)
    if mesh is None:
        return jax.jit(fn)
    return jax.jit(fn, out_shardings=NamedSharding(mesh, PartitionSpec()))


# --------------------------------------------------------------------------- entry point


def data_axes(mesh: Mesh, axes: Sequence[str] = DATA_AXES) -> tuple[str, ...]:
    """The mesh axes (of `axes`) that split the points: those present with size > 1."""
    return tuple(a for a in axes if a in mesh.shape and mesh.shape[a] > 1)


def padded_rows(n: int, shards: int) -> int:
    """N padded: a multiple of the shard count, at least MIN_ROWS, rounded up to one of a few sizes
    per power of two (at most 1/8 more rows), so languages of similar sizes share a compiled loop."""
    per = -(-max(n, MIN_ROWS) // shards)
    step = 1 << max(0, per.bit_length() - 4)
    return -(-per // step) * step * shards


def _place(array: np.ndarray, mesh: Mesh | None, axes: tuple[str, ...]) -> jax.Array:
    if mesh is None:
        return jnp.asarray(array)
    lead = None if not axes else axes[0] if len(axes) == 1 else axes
    sharding = NamedSharding(mesh, PartitionSpec(lead, *([None] * (array.ndim - 1))))
    return jax.make_array_from_callback(array.shape, sharding, lambda idx: array[idx])


def kmeans(points: np.ndarray, k: int, key: jax.Array, *, iterations: int = 50, tolerance: float = 1e-4,
           metric: str = "cosine", weights: np.ndarray | None = None, mesh: Mesh | None = None,
           axes: Sequence[str] = DATA_AXES, restarts: int = 1) -> KMeansResult:
    """Cluster points [N, D] into k clusters (k-means++ then Lloyd; module docstring).

    `restarts`: run this many times from keys fold_in(key, 0..restarts-1) and keep the run of the
    lowest inertia (the first on ties), as scikit-learn's n_init: k-means++ alone can seed two
    centroids in one large cluster and merge two small ones.

    `weights` [N] (default 1): a point of weight 0 is padding (never a centroid, never counted).
    `mesh`: split the points over its `axes` (those of size > 1); None: the default device.
    Every process of a multi-host run must call this with the same arguments."""
    if restarts < 1:
        raise ValueError(f"kmeans: restarts must be >= 1, got {restarts}")
    if metric not in METRICS:
        raise ValueError(f"kmeans: metric must be one of {METRICS}, got {metric!r}")
    points = np.asarray(points, np.float32)
    if points.ndim != 2:
        raise ValueError(f"kmeans: points must be [N, D], got shape {points.shape}")
    n = points.shape[0]
    weights = np.ones((n,), np.float32) if weights is None else np.asarray(weights, np.float32)
    if weights.shape != (n,) or (weights < 0).any():
        raise ValueError(f"kmeans: weights must be [N] = [{n}] and >= 0")
    real = int((weights > 0).sum())
    if not 1 <= k <= real:
        raise ValueError(f"kmeans: k={k} clusters need 1 <= k <= {real} (points of weight > 0)")
    axes = data_axes(mesh, axes) if mesh is not None else ()
    shards = math.prod(mesh.shape[a] for a in axes) if axes else 1
    padded = padded_rows(n, shards)
    if padded > n:
        points = np.concatenate([points, np.zeros((padded - n, points.shape[1]), np.float32)])
        weights = np.concatenate([weights, np.zeros((padded - n,), np.float32)])
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    key = np.asarray(key, np.uint32)  # numpy: the same replicated input on every process
    fn = _compiled(int(k), metric, mesh)
    placed = (_place(points, mesh, axes), _place(weights, mesh, axes))
    best = None
    for r in range(restarts):
        run_key = key if restarts == 1 else np.asarray(jax.random.fold_in(key, r), np.uint32)
        out = jax.device_get(fn(*placed, run_key, np.int32(iterations), np.float32(tolerance)))
        if best is None or float(out[2]) < float(best[2]):
            best = out
    centroids, a, inertia, i, shift, reseeded = best
    a = np.asarray(a[:n], np.int32)
    return KMeansResult(centroids=np.asarray(centroids, np.float32), assignments=a, inertia=float(inertia),
                        sizes=np.bincount(a[weights[:n] > 0], minlength=k).astype(np.int64), iterations=int(i),
                        shift=float(shift), reseeded=int(reseeded))
