"""Late interaction (MaxSim): for each query token, the best page token, summed over query tokens."""

from __future__ import annotations

from collections.abc import Sequence

import torch

Embeddings = Sequence[torch.Tensor] | torch.Tensor  # list of (n_tokens_i, dim), or (n, max_tokens, dim)

DEFAULT_CHUNK_BYTES = 256 * 2**20  # cap on the (query tokens x page tokens) similarity block


def _as_list(embs: Embeddings, what: str) -> list[torch.Tensor]:
    items = list(torch.unbind(embs)) if isinstance(embs, torch.Tensor) else list(embs)
    if not items:
        raise ValueError(f"no {what} embeddings given; pass at least one")
    dims = {e.shape[-1] for e in items}
    if len(dims) != 1 or any(e.dim() != 2 or e.shape[0] == 0 for e in items):
        raise ValueError(f"{what} embeddings must be non-empty (n_tokens, dim) tensors of one dim, got dims {dims}")
    return items


def _pad_repeating_first(embs: list[torch.Tensor]) -> torch.Tensor:
    """Stack pages to (n, max_tokens, dim), padding each with copies of its own first token.

    A copied token never changes a max, so padded pages score exactly like unpadded ones.
    """
    longest = max(e.shape[0] for e in embs)
    return torch.stack([torch.cat([e, e[:1].expand(longest - e.shape[0], -1)]) for e in embs])


def score_multi_vector(
    qs: Embeddings,
    ps: Embeddings,
    batch_size: int = 128,
    device: str | torch.device | None = None,
    max_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> torch.Tensor:
    """MaxSim scores between every query and every page.

    score(q, p) = sum over query tokens i of max over page tokens j of <q_i, p_j>.

    Pages are scored in chunks sized so that the similarity block stays under `max_chunk_bytes`,
    so peak memory is bounded whatever the corpus size. Each chunk is one matrix multiply
    (all query tokens x all page tokens of the chunk) followed by a max and a sum.

    Args:
        qs: Query embeddings: a list of (n_tokens_i, dim) tensors or a (n_queries, n_tokens, dim) tensor.
        ps: Page embeddings, likewise.
        batch_size: Queries scored at a time.
        device: Where to compute; defaults to the pages' device. Results come back on the CPU.
        max_chunk_bytes: Memory cap for one similarity block.

    Returns:
        (n_queries, n_pages) float32 scores on the CPU.

    Raises:
        ValueError: empty inputs or embeddings of different dims.
    """
    q_list, p_list = _as_list(qs, "query"), _as_list(ps, "page")
    if q_list[0].shape[-1] != p_list[0].shape[-1]:
        raise ValueError(f"query dim {q_list[0].shape[-1]} != page dim {p_list[0].shape[-1]}")
    device = torch.device(device) if device is not None else p_list[0].device
    dtype = torch.float32 if device.type == "cpu" else p_list[0].dtype  # CPUs multiply bf16 slowly

    # Sort pages by length so each chunk needs little padding; scatter scores back at the end.
    order = sorted(range(len(p_list)), key=lambda i: p_list[i].shape[0])
    scores = torch.empty(len(q_list), len(p_list), dtype=torch.float32)
    for q_start in range(0, len(q_list), batch_size):
        q = torch.nn.utils.rnn.pad_sequence(q_list[q_start : q_start + batch_size], batch_first=True)
        q = q.to(device=device, dtype=dtype)  # (n_q, q_tokens, dim); zero rows add 0 to the sum
        n_q, q_tokens, dim = q.shape
        q_flat = q.reshape(n_q * q_tokens, dim)
        start = 0
        while start < len(order):
            longest = p_list[order[min(start + 255, len(order) - 1)]].shape[0]
            per_page = n_q * q_tokens * longest * q.element_size()
            chunk = max(1, min(256, len(order) - start, max_chunk_bytes // per_page))
            idx = order[start : start + chunk]
            p = _pad_repeating_first([p_list[i] for i in idx]).to(device=device, dtype=dtype)  # (c, p_tokens, dim)
            c, p_tokens, _ = p.shape
            sim = q_flat @ p.reshape(c * p_tokens, dim).T  # (n_q * q_tokens, c * p_tokens)
            best = sim.view(n_q, q_tokens, c, p_tokens).amax(dim=3)  # (n_q, q_tokens, c)
            scores[q_start : q_start + n_q, idx] = best.sum(dim=1).float().cpu()  # (n_q, c)
            start += chunk
    return scores


def score_multi_vector_reference(qs: Embeddings, ps: Embeddings) -> torch.Tensor:
    """The plain einsum formulation, zero-padded: einsum("bnd,csd->bcns").max(3).sum(2).

    Kept as the reference the fast scorer is tested and benchmarked against. Zero padding means a
    page whose real tokens all score below 0 against a query token gets 0 instead; the fast
    scorer does not have that artefact (they agree whenever pages have equal lengths).
    """
    q = torch.nn.utils.rnn.pad_sequence(_as_list(qs, "query"), batch_first=True).float()
    p = torch.nn.utils.rnn.pad_sequence(_as_list(ps, "page"), batch_first=True).float()
    return torch.einsum("bnd,csd->bcns", q, p).max(dim=3)[0].sum(dim=2)
