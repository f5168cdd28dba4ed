"""Hierarchical token pooling: Ward's method as scipy computes it, clusters as colpali-engine cuts them."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from colqwen3_lib.pooling import cluster_tokens, hierarchical_pooling, ward_merges


def _unit(n, dim=16, seed=0):
    return F.normalize(torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)), dim=-1)


def _same_partition(a, b):
    pairs = set(zip(np.asarray(a).tolist(), np.asarray(b).tolist()))
    return len(pairs) == len(set(np.asarray(a).tolist())) == len(set(np.asarray(b).tolist()))


@pytest.mark.parametrize("n", [2, 7, 40])
def test_ward_heights_match_scipy(n):
    hierarchy = pytest.importorskip("scipy.cluster.hierarchy")
    points = np.random.default_rng(n).normal(size=(n, 5))
    reference = hierarchy.linkage(points, method="ward")[:, 2]
    assert [h for _, _, h in ward_merges(points)] == pytest.approx(sorted(reference), rel=1e-9)


@pytest.mark.parametrize("n_clusters", [1, 2, 10, 20, 60])
def test_clusters_are_colpali_engines(n_clusters):
    """colpali-engine: linkage(1 - E @ E.T, metric="euclidean", method="ward"), fcluster(maxclust)."""
    hierarchy = pytest.importorskip("scipy.cluster.hierarchy")
    embeddings = _unit(60)
    distances = (1 - embeddings @ embeddings.T).numpy()
    reference = hierarchy.fcluster(
        hierarchy.linkage(distances, metric="euclidean", method="ward"), t=n_clusters, criterion="maxclust"
    )
    labels = cluster_tokens(embeddings, n_clusters)
    assert sorted(set(labels.tolist())) == list(range(n_clusters))
    assert _same_partition(labels, reference)


def test_pool_factor_one_is_the_identity():
    embeddings = _unit(30)
    assert hierarchical_pooling(embeddings, 1) is embeddings


@pytest.mark.parametrize("n_tokens, factor, expected", [(60, 2, 30), (60, 3, 20), (61, 3, 20), (2, 3, 1)])
def test_pooling_divides_the_tokens_and_keeps_unit_vectors(n_tokens, factor, expected):
    pooled = hierarchical_pooling(_unit(n_tokens, dim=128), factor)
    assert pooled.shape == (expected, 128)
    assert pooled.norm(dim=-1) == pytest.approx(torch.ones(expected), abs=1e-5)


def test_pooled_vectors_are_the_normalised_means_of_their_clusters():
    embeddings = _unit(45)
    pooled = hierarchical_pooling(embeddings, 3)
    labels = cluster_tokens(embeddings, 15)
    for cluster in range(15):
        mean = embeddings[labels == cluster].mean(dim=0)
        torch.testing.assert_close(pooled[cluster], F.normalize(mean, dim=0))


def test_similar_tokens_are_pooled_together():
    """Three tight groups of five near-copies: a pool factor of 5 gives back the three directions."""
    centres = _unit(3, dim=32, seed=1)
    noise = 0.01 * torch.randn(15, 32, generator=torch.Generator().manual_seed(2))
    tokens = F.normalize(centres.repeat_interleave(5, dim=0) + noise, dim=-1)  # (15, 32)
    labels = cluster_tokens(tokens, 3)
    assert labels.tolist() == [0] * 5 + [1] * 5 + [2] * 5
    pooled = hierarchical_pooling(tokens[torch.randperm(15)], 5)
    assert (pooled @ centres.T).max(dim=0).values.min() > 0.99  # each centre has its pooled vector


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_pooling_keeps_the_dtype(dtype):
    embeddings = _unit(20).to(dtype)
    pooled = hierarchical_pooling(embeddings, 2)
    assert pooled.dtype == dtype and pooled.shape == (10, 16)


@pytest.mark.parametrize("factor", [0, -2, 1.5])
def test_bad_pool_factor_is_refused(factor):
    with pytest.raises(ValueError, match="pool_factor must be an integer >= 1"):
        hierarchical_pooling(_unit(10), factor)


@pytest.mark.parametrize("shape", [(0, 16), (16,), (2, 3, 16)])
def test_bad_embeddings_are_refused(shape):
    with pytest.raises(ValueError, match=r"\(n_tokens, dim\)"):
        hierarchical_pooling(torch.zeros(shape), 2)


def test_bad_cluster_count_is_refused():
    with pytest.raises(ValueError, match="between 1 and the 10 tokens"):
        cluster_tokens(_unit(10), 11)
