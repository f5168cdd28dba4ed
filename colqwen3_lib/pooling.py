"""Hierarchical token pooling: fewer vectors per page, almost the same retrieval.

A page's token vectors are clustered and each cluster is replaced by its mean, L2-normalised, so a
page costs `n_tokens / pool_factor` vectors in the index and in every MaxSim. This is the pooling of
Clavié et al. (2024, "Reducing the footprint of multi-vector retrieval with minimal performance impact
via token pooling") as colpali-engine's `HierarchicalTokenPooler` does it: each token is described by
its cosine distances to all the page's tokens (a row of the 1 - cos matrix), Ward's method clusters
those rows, and the tree is cut into `n_tokens // pool_factor` clusters. Ward's method is written out
here (`ward_merges`, the nearest-neighbour chain with the Lance-Williams update) and tested against
scipy's `linkage`. It runs in numpy on the CPU: a page's matrices are small, and at this size torch's thread
pool can cost more than the arithmetic (far more on a busy CPU).
"""

from __future__ import annotations

import numpy as np
import torch


def ward_merges(points: np.ndarray) -> list[tuple[int, int, float]]:
    """Ward's agglomerative clustering of the rows of `points`, in Euclidean space.

    Nearest-neighbour chain (Mullner 2011, "Modern hierarchical, agglomerative clustering
    algorithms"): follow nearest neighbours until two clusters are each other's nearest, merge them,
    and keep the rest of the chain. Ward's distance between clusters is updated by Lance-Williams on
    squared distances, so the whole tree costs O(n^2) memory and time.

    Args:
        points: (n, d) observations.

    Returns:
        The n - 1 merges as (a, b, height), lowest first: clusters are named by the smallest row they
        contain, and the height is the Ward distance (scipy's `linkage(method="ward")` heights).
    """
    n = points.shape[0]
    x = points.astype(np.float64)
    sq = (x * x).sum(axis=1)
    dist = np.maximum(sq[:, None] + sq[None, :] - 2 * x @ x.T, 0.0)  # (n, n) squared Euclidean
    np.fill_diagonal(dist, np.inf)
    size = np.ones(n)
    active = np.ones(n, dtype=bool)
    merges: list[tuple[int, int, float]] = []
    chain: list[int] = []
    while len(merges) < n - 1:
        if not chain:
            chain.append(int(np.flatnonzero(active)[0]))
        a = chain[-1]
        row = np.where(active, dist[a], np.inf)  # (n,)
        b = int(row.argmin())
        if len(chain) > 1 and row[chain[-2]] <= row[b]:
            b = chain[-2]  # a and the cluster before it are each other's nearest: merge
        else:
            chain.append(b)
            continue
        chain = chain[:-2]
        d_ab = dist[a, b]
        keep, gone = min(a, b), max(a, b)
        n_a, n_b = size[a], size[b]
        total = n_a + n_b + size  # (n,)
        updated = ((n_a + size) * dist[a] + (n_b + size) * dist[b] - size * d_ab) / total  # (n,)
        dist[keep], dist[:, keep] = updated, updated
        dist[keep, keep] = np.inf
        dist[gone], dist[:, gone] = np.inf, np.inf
        size[keep] = n_a + n_b
        active[gone] = False
        merges.append((keep, gone, float(np.sqrt(d_ab))))
    return sorted(merges, key=lambda merge: merge[2])


def cluster_tokens(embeddings: torch.Tensor, n_clusters: int) -> torch.Tensor:
    """Cluster one page's token vectors into `n_clusters` groups, as colpali-engine's pooler does.

    Args:
        embeddings: (n_tokens, dim) L2-normalised token vectors of one page.
        n_clusters: Clusters wanted, 1 to n_tokens.

    Returns:
        (n_tokens,) cluster label of each token, 0 to n_clusters - 1, numbered in order of each
        cluster's first token.
    """
    n = embeddings.shape[0]
    if not 1 <= n_clusters <= n:
        raise ValueError(f"n_clusters must be between 1 and the {n} tokens, got {n_clusters}")
    e = embeddings.detach().float().cpu().numpy()
    distances = 1 - e @ e.T  # (n, n) cosine distances; row i describes token i
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b, _ in ward_merges(distances)[: n - n_clusters]:  # the lowest merges cut the tree at k
        parent[root(b)] = root(a)
    roots = [root(i) for i in range(n)]
    number = {r: i for i, r in enumerate(dict.fromkeys(roots))}
    return torch.tensor([number[r] for r in roots])


def hierarchical_pooling(embeddings: torch.Tensor, pool_factor: int) -> torch.Tensor:
    """Pool one page's token vectors to `max(n_tokens // pool_factor, 1)` vectors.

    Args:
        embeddings: (n_tokens, dim) token vectors of one page, padding removed.
        pool_factor: 1 returns `embeddings` itself; 2 halves the vectors, 3 keeps a third, ...

    Returns:
        (n_clusters, dim) L2-normalised cluster means, in the dtype and on the device of `embeddings`.

    Raises:
        ValueError: `pool_factor` below 1, or `embeddings` not a non-empty 2-D tensor.
    """
    if not isinstance(pool_factor, int) or pool_factor < 1:
        raise ValueError(f"pool_factor must be an integer >= 1, got {pool_factor!r}")
    if embeddings.dim() != 2 or embeddings.shape[0] == 0:
        raise ValueError(
            f"expected one page's (n_tokens, dim) embeddings, got shape {tuple(embeddings.shape)}"
        )
    if pool_factor == 1:
        return embeddings
    n_clusters = max(embeddings.shape[0] // pool_factor, 1)
    labels = cluster_tokens(embeddings, n_clusters).numpy()  # (n_tokens,)
    members = (labels[None, :] == np.arange(n_clusters)[:, None]).astype(np.float32)  # (n_clusters, n_tokens)
    e = embeddings.detach().float().cpu().numpy()  # (n_tokens, dim)
    means = members @ e / members.sum(axis=1, keepdims=True)  # (n_clusters, dim)
    means /= np.maximum(np.linalg.norm(means, axis=1, keepdims=True), 1e-12)
    return torch.from_numpy(means).to(embeddings.device, embeddings.dtype)
