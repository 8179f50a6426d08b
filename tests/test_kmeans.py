"""k-means in JAX (xinst_jax/curate/kmeans.py): planted clusters recovered, 8 fake devices give the
1-device centroids and assignments, padding (weight 0) changes nothing, empty clusters re-seeded."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xinst_jax.config import MeshConfig
from xinst_jax.curate.kmeans import kmeans, lloyd_step
from xinst_jax.sharding import make_mesh


def planted(n: int, k: int, dim: int, noise: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n points around k random unit directions (well separated for small noise) and their labels."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = rng.integers(0, k, n)
    return (centres[labels] + noise * rng.normal(size=(n, dim))).astype(np.float32), labels


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """a and b split the points the same way (cluster ids may differ)."""
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


@pytest.fixture(scope="module")
def meshes():
    return {"1": make_mesh(MeshConfig(data=1, fsdp=1, tensor=1, num_devices=1)),
            "8": make_mesh(MeshConfig(data=8, fsdp=1, tensor=1)),
            "2x2x2": make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))}


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_planted_clusters_recovered(metric):
    x, labels = planted(240, 5, 16, noise=0.05)
    result = kmeans(x, 5, jax.random.PRNGKey(1), metric=metric)
    assert same_partition(result.assignments, labels)
    assert sorted(result.sizes.tolist()) == sorted(np.bincount(labels).tolist())
    assert result.iterations < 50 and result.shift < 1e-4  # converged, not stopped by the cap
    again = kmeans(x, 5, jax.random.PRNGKey(1), metric=metric)  # deterministic given the key
    np.testing.assert_array_equal(again.centroids, result.centroids)
    if metric == "cosine":
        np.testing.assert_allclose(np.linalg.norm(result.centroids, axis=1), 1.0, atol=1e-6)
    else:  # centroids are the planted clusters' means
        for c in range(5):
            np.testing.assert_allclose(result.centroids[c], x[result.assignments == c].mean(axis=0), atol=1e-5)


def test_sharded_equals_one_device(meshes):
    """1001 points (not a multiple of 8) over 8 devices, and over data x fsdp with a replicating
    tensor axis: the 1-device centroids (1e-5), assignments and inertia."""
    x, _ = planted(1001, 7, 24, noise=0.3, seed=3)  # overlapping clusters: several Lloyd iterations
    ref = kmeans(x, 7, jax.random.PRNGKey(0), mesh=meshes["1"], iterations=30, tolerance=0.0)
    assert ref.iterations > 3
    for name in ("8", "2x2x2"):
        got = kmeans(x, 7, jax.random.PRNGKey(0), mesh=meshes[name], iterations=30, tolerance=0.0)
        np.testing.assert_allclose(got.centroids, ref.centroids, atol=1e-5, err_msg=name)
        np.testing.assert_array_equal(got.assignments, ref.assignments, err_msg=name)
        np.testing.assert_array_equal(got.sizes, ref.sizes)
        assert got.iterations == ref.iterations
        assert got.inertia == pytest.approx(ref.inertia, rel=1e-5)


def test_padding_is_masked(meshes):
    """Extra rows of weight 0 (far away, even) never become centroids nor move one."""
    x, labels = planted(120, 4, 8, noise=0.05, seed=5)
    ref = kmeans(x, 4, jax.random.PRNGKey(2), metric="euclidean", mesh=meshes["8"])
    junk = np.full((37, 8), 50.0, np.float32)
    weights = np.concatenate([np.ones(120), np.zeros(37)]).astype(np.float32)
    got = kmeans(np.concatenate([x, junk]), 4, jax.random.PRNGKey(2), metric="euclidean", weights=weights,
                 mesh=meshes["8"])
    np.testing.assert_allclose(got.centroids, ref.centroids, atol=1e-6)
    np.testing.assert_array_equal(got.assignments[:120], ref.assignments)
    assert got.sizes.sum() == 120 and got.inertia == pytest.approx(ref.inertia, rel=1e-6)
    assert np.abs(got.centroids).max() < 5  # no centroid at the junk


def test_empty_cluster_reseeded_at_farthest_point():
    x, _ = planted(60, 2, 4, noise=0.05, seed=7)
    x = np.concatenate([x, np.array([[0.0, 0.0, 3.0, 0.0]], np.float32)])  # one outlier, far from both
    w = np.ones(len(x), np.float32)
    x_sq = np.sum(x * x, axis=1)
    centroids = np.stack([x[0], x[1], np.full(4, 100.0, np.float32)])  # the third attracts nothing
    step = jax.jit(lloyd_step, static_argnames="metric")
    new, empty = step(jnp.asarray(x), jnp.asarray(x_sq), jnp.asarray(w), jnp.asarray(centroids), metric="euclidean")
    assert int(empty) == 1
    np.testing.assert_allclose(np.asarray(new)[2], x[-1])  # the point farthest from its centroid

    # degenerate input: 10 points at 3 places, k=5: clusters stay finite, some may stay empty
    dup = np.repeat(np.eye(3, 4, dtype=np.float32), [4, 3, 3], axis=0)
    result = kmeans(dup, 5, jax.random.PRNGKey(0), metric="euclidean")
    assert np.isfinite(result.centroids).all() and result.sizes.sum() == 10
    assert result.inertia == pytest.approx(0.0, abs=1e-6)
    assert len(set(result.assignments[:4])) == 1 and len(set(result.assignments[4:7])) == 1


def test_bad_arguments():
    x, _ = planted(5, 2, 3, noise=0.1)
    with pytest.raises(ValueError, match="k=6"):
        kmeans(x, 6, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="metric"):
        kmeans(x, 2, jax.random.PRNGKey(0), metric="manhattan")
