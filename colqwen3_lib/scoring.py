"""Late interaction (MaxSim): for each query token, the best page token, summed over query tokens."""

from __future__ import annotations

from collections.abc import Sequence

import torch

Embeddings = Sequence[torch.Tensor] | torch.Tensor  # list of (n_tokens_i, dim), or (n, max_tokens, dim)

# Cap on one (page tokens x query tokens) similarity block. On a CPU the block is reduced (max over
# each page's rows) right after the multiply, while it is still in cache: measured on a 2-core CPU
# (64 queries x 20 tokens, 500 pages of 600-768 tokens), 4-8 MiB blocks run fastest, 64 MiB ones 15-20%
# slower. On a GPU, larger blocks mean fewer kernel launches.
CPU_CHUNK_BYTES = 8 * 2**20
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


def _real_tokens(ps: torch.Tensor) -> list[torch.Tensor] | None:
    """A padded (n, max_tokens, dim) page tensor as a list of its real (non-zero) rows; None if nothing is padding.

    Left or right padding (ColQwen3 pads on the left) gives views; scattered zero rows, copies.
    """
    real = ps.ne(0).any(dim=-1)  # (n, max_tokens)
    counts = real.sum(dim=1).tolist()
    if all(n == ps.shape[1] for n in counts):
        return None
    first = real.int().argmax(dim=1).tolist()  # first real row of each page
    pages = []
    for page, mask, start, n in zip(ps, real, first, counts):
        contiguous = n > 0 and bool(mask[start : start + n].all())
        pages.append(page[start : start + n] if contiguous else page[mask])
    return pages


def _plan_chunks(lengths: list[int], rows: int, elem: int, max_chunk_bytes: int) -> list[tuple[int, int]]:
    """Consecutive (start, end) ranges of pages whose (tokens x rows) similarity block fits the cap."""
    chunks, start = [], 0
    while start < len(lengths):
        end, tokens = start + 1, lengths[start]
        while end < len(lengths) and (tokens + lengths[end]) * rows * elem <= max_chunk_bytes:
            tokens += lengths[end]
            end += 1
        chunks.append((start, end))
        start = end
    return chunks


def score_multi_vector(
    qs: Embeddings,
    ps: Embeddings,
    batch_size: int = 128,
    device: str | torch.device | None = None,
    max_chunk_bytes: int | None = None,
) -> torch.Tensor:
    """MaxSim scores between every query and every page.

    score(q, p) = sum over query tokens i of max over page tokens j of <q_i, p_j>.

    Pages are scored in chunks of consecutive pages: a chunk's tokens, laid end to end without
    padding, make one matrix multiply against the query tokens of a batch, into a reused buffer of
    at most `max_chunk_bytes`; then each page's rows are reduced by a max and each query's columns by
    a sum. Peak memory is bounded whatever the corpus size, on a CPU the block is reduced while it is
    still in cache, and no padding row can ever win a max: the scores are exact.

    Args:
        qs: Query embeddings: a list of (n_tokens_i, dim) tensors or a (n_queries, n_tokens, dim) tensor.
            Zero rows (padding) add exactly 0.
        ps: Page embeddings, likewise. Pages of a list may have different lengths; in a 3-D tensor,
            all-zero rows are padding (as `ColQwen3` pads) and are left out.
        batch_size: Queries scored at a time.
        device: Where to compute; defaults to the pages' device. Results come back on the CPU.
        max_chunk_bytes: Memory cap for one similarity block; default 8 MiB on a CPU, 512 MiB on a GPU.

    Returns:
        (n_queries, n_pages) float32 scores on the CPU.

    Raises:
        ValueError: empty inputs, embeddings of different dims, or batch_size < 1.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    q_list = _as_list(qs, "query")
    padded = _real_tokens(ps) if isinstance(ps, torch.Tensor) and ps.dim() == 3 else None
    p_list = _as_list(padded if padded is not None else ps, "page")
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

    # A 3-D tensor without padding is sliced in place; otherwise each chunk's pages are laid end to end.
    whole = isinstance(ps, torch.Tensor) and padded is None
    lengths = [e.shape[0] for e in p_list]
    chunks = _plan_chunks(lengths, rows, elem, max_chunk_bytes)
    longest_chunk = max(sum(lengths[start:end]) for start, end in chunks)
    sim_buffer = torch.empty(longest_chunk * rows, dtype=dtype, device=device)
    scores = torch.empty(len(p_list), len(q_list), dtype=torch.float32, device=device)  # page-major
    for start, end in chunks:
        if whole:
            flat = ps[start:end].reshape(-1, dim).to(device=device, dtype=dtype)  # (c * p_tokens, dim)
        else:
            flat = torch.cat(p_list[start:end]).to(device=device, dtype=dtype)  # (tokens of the chunk, dim)
        offsets = [0]
        for n in lengths[start:end]:
            offsets.append(offsets[-1] + n)
        for q_start, n_q, q_tokens, q_t in q_batches:
            sim = torch.mm(
                flat, q_t, out=sim_buffer[: flat.shape[0] * n_q * q_tokens].view(flat.shape[0], -1)
            )
            if whole:  # equal lengths: one max over the token axis
                best = sim.view(end - start, lengths[start], -1).amax(dim=1)  # (c, n_q * q_tokens)
            else:
                best = torch.stack([sim[a:b].amax(dim=0) for a, b in zip(offsets, offsets[1:])])
            scores[start:end, q_start : q_start + n_q] = best.view(-1, n_q, q_tokens).sum(
                dim=2, dtype=torch.float32
            )
    return scores.T.contiguous().cpu()


def score_multi_vector_reference(qs: Embeddings, ps: Embeddings) -> torch.Tensor:
    """The plain einsum formulation, zero-padded: einsum("bnd,csd->bcns").max(3).sum(2).

    Kept as a reference to test and benchmark against. Zero padding means a page whose real tokens
    all score below 0 against a query token gets 0 instead; the fast scorer does not have that
    artefact (they agree whenever pages have equal lengths and no padding).
    """
    q = torch.nn.utils.rnn.pad_sequence(_as_list(qs, "query"), batch_first=True).float()
    p = torch.nn.utils.rnn.pad_sequence(_as_list(ps, "page"), batch_first=True).float()
    return torch.einsum("bnd,csd->bcns", q, p).max(dim=3)[0].sum(dim=2)
