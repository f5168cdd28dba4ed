"""Late interaction (MaxSim): for each query token, the best page token, summed over query tokens."""

from __future__ import annotations

from collections.abc import Sequence

import torch

Embeddings = Sequence[torch.Tensor] | torch.Tensor  # list of (n_tokens_i, dim), or (n, max_tokens, dim)

# Cap on one (page tokens x query tokens) similarity block. Larger blocks make the matrix multiply
# more efficient (measured on a 2-core CPU: 4 MiB runs at 40% of the 64 MiB rate); past ~64 MiB
# the block no longer stays near the cache and the gain turns into memory traffic.
CPU_CHUNK_BYTES = 64 * 2**20
GPU_CHUNK_BYTES = 512 * 2**20


def _as_list(embs: Embeddings, what: str) -> list[torch.Tensor]:
    items = list(torch.unbind(embs)) if isinstance(embs, torch.Tensor) else list(embs)
    if not items:
        raise ValueError(f"no {what} embeddings given; pass at least one")
    dims = {e.shape[-1] for e in items}
    if len(dims) != 1 or any(e.dim() != 2 or e.shape[0] == 0 for e in items):
        raise ValueError(
            f"{what} embeddings must be non-empty (n_tokens, dim) tensors of one dim, got dims {dims}"
        )
    return items


def _pack_pages(pages: list[torch.Tensor], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Stack pages to (n, max_tokens, dim), padding each with copies of its own first token.

    A copied token never changes a max, so padded pages score exactly like unpadded ones.
    """
    longest = max(e.shape[0] for e in pages)
    if all(e.shape[0] == longest for e in pages):
        packed = torch.stack(pages)
    else:
        packed = torch.stack([torch.cat([e, e[:1].expand(longest - e.shape[0], -1)]) for e in pages])
    return packed.to(device=device, dtype=dtype)


def score_multi_vector(
    qs: Embeddings,
    ps: Embeddings,
    batch_size: int = 128,
    device: str | torch.device | None = None,
    max_chunk_bytes: int | None = None,
) -> torch.Tensor:
    """MaxSim scores between every query and every page.

    score(q, p) = sum over query tokens i of max over page tokens j of <q_i, p_j>.

    Pages are scored in chunks: each chunk is one matrix multiply (all its page tokens x the query
    tokens of a batch) into a reused buffer of at most `max_chunk_bytes`, followed by a max over
    page tokens and a sum over query tokens. Peak memory is therefore bounded whatever the corpus
    size, and on a CPU the block is reduced while it is still in cache. Each page chunk is moved
    and converted once, then scored against every query batch.

    Args:
        qs: Query embeddings: a list of (n_tokens_i, dim) tensors or a (n_queries, n_tokens, dim) tensor.
            Zero rows (padding) add exactly 0.
        ps: Page embeddings, likewise. Pages of a list may have different lengths; a 3-D tensor's
            rows all count as tokens (as in the einsum formulation).
        batch_size: Queries scored at a time.
        device: Where to compute; defaults to the pages' device. Results come back on the CPU.
        max_chunk_bytes: Memory cap for one similarity block; default 64 MiB on a CPU, 512 MiB on a GPU.

    Returns:
        (n_queries, n_pages) float32 scores on the CPU.

    Raises:
        ValueError: empty inputs, embeddings of different dims, or batch_size < 1.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    q_list, p_list = _as_list(qs, "query"), _as_list(ps, "page")
    dim = q_list[0].shape[-1]
    if dim != p_list[0].shape[-1]:
        raise ValueError(f"query dim {dim} != page dim {p_list[0].shape[-1]}")
    device = torch.device(device) if device is not None else p_list[0].device
    dtype = torch.float32 if device.type == "cpu" else p_list[0].dtype  # CPUs multiply bf16 slowly
    if max_chunk_bytes is None:
        max_chunk_bytes = CPU_CHUNK_BYTES if device.type == "cpu" else GPU_CHUNK_BYTES
    elem = torch.empty((), dtype=dtype).element_size()

    # Query batches, each flattened and transposed once: (dim, n_q * q_tokens); zero rows add 0.
    q_batches = []
    for start in range(0, len(q_list), batch_size):
        q = torch.nn.utils.rnn.pad_sequence(q_list[start : start + batch_size], batch_first=True)
        q = q.to(device=device, dtype=dtype)  # (n_q, q_tokens, dim)
        q_batches.append((start, q.shape[0], q.shape[1], q.reshape(-1, dim).T.contiguous()))
    rows = max(n_q * q_tokens for _, n_q, q_tokens, _ in q_batches)

    # Pages sorted by length so a chunk needs little padding; a 3-D tensor is sliced in place.
    stacked = isinstance(ps, torch.Tensor)
    lengths = [e.shape[0] for e in p_list]
    order = list(range(len(p_list))) if stacked else sorted(range(len(p_list)), key=lengths.__getitem__)
    if stacked:
        ps = ps.contiguous()

    # Plan the chunks: as many pages as fit the cap, padded to the chunk's longest (its last) page.
    chunks, start = [], 0
    while start < len(order):
        end = start + 1
        while end < len(order) and (end + 1 - start) * lengths[order[end]] * rows * elem <= max_chunk_bytes:
            end += 1
        chunks.append((start, end))
        start = end
    sim_buffer = torch.empty(
        max((end - start) * lengths[order[end - 1]] * rows for start, end in chunks),
        dtype=dtype,
        device=device,
    )
    scores = torch.empty(len(p_list), len(q_list), dtype=torch.float32, device=device)  # page-major
    for start, end in chunks:
        idx = order[start:end]
        if stacked:
            p = ps[start:end].to(device=device, dtype=dtype)  # (c, p_tokens, dim), a view if possible
        else:
            p = _pack_pages([p_list[i] for i in idx], device, dtype)  # (c, p_tokens, dim)
        c, p_tokens, _ = p.shape
        p_flat = p.view(c * p_tokens, dim)
        target = slice(start, end) if stacked else torch.tensor(idx, device=device)
        for q_start, n_q, q_tokens, q_t in q_batches:
            sim = torch.mm(
                p_flat, q_t, out=sim_buffer[: c * p_tokens * n_q * q_tokens].view(c * p_tokens, -1)
            )
            best = sim.view(c, p_tokens, n_q * q_tokens).amax(dim=1)  # (c, n_q * q_tokens)
            scores[target, q_start : q_start + n_q] = best.view(c, n_q, q_tokens).sum(
                dim=2, dtype=torch.float32
            )
    return scores.T.contiguous().cpu()


def score_multi_vector_reference(qs: Embeddings, ps: Embeddings) -> torch.Tensor:
    """The plain einsum formulation, zero-padded: einsum("bnd,csd->bcns").max(3).sum(2).

    Kept as the reference the fast scorer is tested and benchmarked against. Zero padding means a
    page whose real tokens all score below 0 against a query token gets 0 instead; the fast
    scorer does not have that artefact (they agree whenever pages have equal lengths).
    """
    q = torch.nn.utils.rnn.pad_sequence(_as_list(qs, "query"), batch_first=True).float()
    p = torch.nn.utils.rnn.pad_sequence(_as_list(ps, "page"), batch_first=True).float()
    return torch.einsum("bnd,csd->bcns", q, p).max(dim=3)[0].sum(dim=2)
