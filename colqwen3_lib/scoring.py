"""Late interaction (MaxSim): for each query token, the best page token, summed over query tokens."""

from __future__ import annotations

from collections.abc import Sequence

import torch

Embeddings = Sequence[torch.Tensor] | torch.Tensor  # list of (n_tokens_i, dim), or (n, max_tokens, dim)

# Cap on one (query tokens x page tokens) similarity block. On a CPU the block is reduced right after the
# multiply, while it is still in cache: measured on a 2-core CPU (64 queries x 20 tokens, 500 pages of
# 600-768 tokens), 4-8 MiB blocks run fastest, 64 MiB ones 15-20% slower. On a GPU, larger blocks mean
# fewer kernel launches: on an H200 (256 queries x 4,000 pages, bf16; benchmarks/gpu/2026-12-04-run2.md)
# 64 MiB blocks took 174 ms, 256 MiB 66 ms, 2 GiB 54 ms. A GPU block takes at most a quarter of the free memory.
CPU_CHUNK_BYTES = 8 * 2**20
GPU_CHUNK_BYTES = 2 * 2**30


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
    counts = real.sum(dim=1)  # (n,)
    first = real.int().argmax(dim=1)  # first real row of each page
    last = ps.shape[1] - 1 - real.flip(1).int().argmax(dim=1)  # last real row
    contiguous = (last - first + 1 == counts) & (counts > 0)
    counts, first, contiguous = counts.tolist(), first.tolist(), contiguous.tolist()
    if all(n == ps.shape[1] for n in counts):
        return None
    return [
        page[start : start + n] if whole else page[mask]
        for page, mask, start, n, whole in zip(ps, real, first, counts, contiguous)
    ]


def _plan_chunks(lengths: list[int], rows: int, elem: int, max_chunk_bytes: int) -> list[tuple[int, int]]:
    """Consecutive (start, end) ranges of pages sorted by length (shortest first) whose block, each page padded
    to the range's last (longest) one, of (pages x longest) x rows similarities fits the cap."""
    chunks, start = [], 0
    while start < len(lengths):
        end = start + 1
        while end < len(lengths) and (end + 1 - start) * lengths[end] * rows * elem <= max_chunk_bytes:
            end += 1
        chunks.append((start, end))
        start = end
    return chunks


def _page_major(device: torch.device) -> bool:
    """Lay a block out page tokens x query tokens (a CPU: each page's rows are reduced while still in cache), or
    query tokens x page tokens (a GPU: the max runs over the innermost axis, its fastest reduction)."""
    return device.type == "cpu"


def _repeat_last_row_index(lengths: torch.Tensor, longest: int) -> torch.Tensor:
    """Rows of pages laid end to end that pad each page to `longest` rows by repeating its last row.

    A repeated row never changes a max, so the padded block gives exact MaxSim with no mask.
    Returns a (len(lengths) * longest,) index into the pages' concatenated rows.
    """
    starts = torch.cumsum(lengths, 0) - lengths  # (pages,)
    within = torch.arange(longest, device=lengths.device).minimum(
        (lengths - 1).unsqueeze(1)
    )  # (pages, longest)
    return (starts.unsqueeze(1) + within).reshape(-1)


def score_multi_vector(
    qs: Embeddings,
    ps: Embeddings,
    batch_size: int = 128,
    device: str | torch.device | None = None,
    max_chunk_bytes: int | None = None,
) -> torch.Tensor:
    """MaxSim scores between every query and every page.

    score(q, p) = sum over query tokens i of max over page tokens j of <q_i, p_j>.

    Pages are sorted by length and scored in chunks of consecutive pages, each padded to its longest page
    by repeating every shorter page's last row (a repeated row never changes a max: the scores are exact,
    and no mask is needed). A chunk is one matrix multiply against the real tokens of a batch of queries,
    then one max over each page's rows and one sum per query. The number of operations grows with the
    number of chunks, never with the number of pages (no per-page loop: on a GPU, one kernel per page
    would cost more than the arithmetic); sorting keeps the repeated rows few. On a CPU a block is laid
    out page tokens x query tokens and reduced while still in cache; on a GPU query tokens x page tokens,
    so that the max runs over the innermost axis.

    Args:
        qs: Query embeddings: a list of (n_tokens_i, dim) tensors or a (n_queries, n_tokens, dim) tensor.
            Zero rows (padding) add exactly 0.
        ps: Page embeddings, likewise. Pages of a list may have different lengths; in a 3-D tensor,
            all-zero rows are padding (as `ColQwen3` pads) and are left out.
        batch_size: Queries scored at a time.
        device: Where to compute; defaults to the pages' device. Results come back on the CPU.
        max_chunk_bytes: Memory cap for one similarity block; default 8 MiB on a CPU, on a GPU 2 GiB or a
            quarter of its free memory, whichever is less.

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
    if max_chunk_bytes is None and device.type == "cuda":
        max_chunk_bytes = min(GPU_CHUNK_BYTES, torch.cuda.mem_get_info(device)[0] // 4)
    elif max_chunk_bytes is None:
        max_chunk_bytes = CPU_CHUNK_BYTES if device.type == "cpu" else GPU_CHUNK_BYTES
    elem = torch.empty((), dtype=dtype).element_size()

    # Query batches: the real tokens of a batch stacked, (tokens, dim), and the query each row belongs to.
    q_batches = []
    for start in range(0, len(q_list), batch_size):
        batch = q_list[start : start + batch_size]
        q_rows = torch.cat(batch).to(device=device, dtype=dtype)  # (tokens of the batch, dim)
        lengths = torch.tensor([q.shape[0] for q in batch])
        owner = torch.repeat_interleave(torch.arange(len(batch)), lengths).to(
            device
        )  # (tokens of the batch,)
        q_batches.append((start, len(batch), q_rows, owner))
    rows = max(q_rows.shape[0] for _, _, q_rows, _ in q_batches)

    # A 3-D tensor without padding: every page has the same length, sliced in place. Otherwise pages by length.
    whole = isinstance(ps, torch.Tensor) and padded is None
    lengths = [e.shape[0] for e in p_list]
    order = list(range(len(p_list))) if whole else sorted(range(len(p_list)), key=lengths.__getitem__)
    sorted_lengths = [lengths[i] for i in order]
    page_order = torch.tensor(order, device=device)
    length_of = torch.tensor(sorted_lengths, device=p_list[0].device)
    scores = torch.empty(len(q_list), len(p_list), dtype=torch.float32, device=device)
    for start, end in _plan_chunks(sorted_lengths, rows, elem, max_chunk_bytes):
        longest, n_pages = sorted_lengths[end - 1], end - start
        if whole:
            block = ps[start:end].reshape(-1, dim)  # (pages * tokens, dim)
        else:
            flat = torch.cat([p_list[i] for i in order[start:end]])  # (tokens of the chunk, dim)
            block = flat.index_select(0, _repeat_last_row_index(length_of[start:end], longest))
        block = block.to(device=device, dtype=dtype)  # (pages * longest, dim)
        for q_start, n_q, q_rows, owner in q_batches:
            if _page_major(device):  # a page's rows reduced while the block is still in cache
                sim = block @ q_rows.T  # (pages * longest, query tokens)
                best = sim.view(n_pages, longest, -1).amax(dim=1).T  # (query tokens, pages)
            else:
                sim = q_rows @ block.T  # (query tokens, pages * longest)
                best = sim.view(-1, n_pages, longest).amax(dim=2)  # (query tokens, pages)
            summed = torch.zeros(n_q, n_pages, dtype=torch.float32, device=device)
            summed.index_add_(0, owner, best.float())  # (queries, pages)
            scores[q_start : q_start + n_q, page_order[start:end]] = summed
    return scores.cpu()


def score_multi_vector_reference(qs: Embeddings, ps: Embeddings) -> torch.Tensor:
    """The plain einsum formulation, zero-padded: einsum("bnd,csd->bcns").max(3).sum(2).

    Kept as a reference to test and benchmark against. Zero padding means a page whose real tokens
    all score below 0 against a query token gets 0 instead; the fast scorer does not have that
    artefact (they agree whenever pages have equal lengths and no padding).
    """
    q = torch.nn.utils.rnn.pad_sequence(_as_list(qs, "query"), batch_first=True).float()
    p = torch.nn.utils.rnn.pad_sequence(_as_list(ps, "page"), batch_first=True).float()
    return torch.einsum("bnd,csd->bcns", q, p).max(dim=3)[0].sum(dim=2)
