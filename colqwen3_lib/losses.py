"""Contrastive losses for late-interaction retrieval: every other page in the batch is a negative.

Scores are MaxSim (for each query token, its best page token, summed over query tokens), by default
divided by the query's number of real tokens so that they lie in [-1, 1] whatever the query length;
`tau` then sets how sharp the softmax (or the softplus margin) is.

- `ce`: InfoNCE, cross-entropy over the scores of one query against every page of the batch / tau.
- `pairwise`: softplus((hardest in-batch negative - positive) / tau), the "more stable" loss.

Both take optional explicit hard negatives (one extra page per query); the hard-negative term
softplus((score(q, hard negative) - score(q, positive)) / tau) is blended with the in-batch term.

In multi-process training, pass the pages of every process (`gather_with_grad`) and the position
of this process's first query among them (`offset = rank * local batch`); `contrastive_loss` does
this for a collated training batch (`query_*`, `doc_*` and optional `neg_doc_*` keys), through
`loss_over_processes`, which the gradient cache (`grad_cache.py`) calls on embeddings it computed itself.
"""

from __future__ import annotations

import logging
import math
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .reference import TAU as DEFAULT_TAU

logger = logging.getLogger(__name__)

LOSSES = ("ce", "pairwise")
LossName = Literal["ce", "pairwise"]


def token_mask(embeddings: torch.Tensor) -> torch.Tensor:
    """Real tokens of a (batch, tokens, dim) embedding tensor: ColQwen3 zeroes padding, real ones have norm 1."""
    return embeddings.ne(0).any(dim=-1)  # (batch, tokens)


def maxsim_scores(qs: torch.Tensor, ps: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """Differentiable MaxSim of every query against every page.

    Padding page tokens (all-zero rows) never win the max, so a page scores the same however much
    it is padded; padding query tokens add nothing.

    Args:
        qs: (n_queries, q_tokens, dim) query embeddings, zero on padding.
        ps: (n_pages, p_tokens, dim) page embeddings, zero on padding.
        normalize: Divide each query's scores by its number of real tokens.

    Returns:
        (n_queries, n_pages) scores, in the dtype of the inputs.
    """
    n_q, q_tokens, dim = qs.shape
    n_p, p_tokens, _ = ps.shape
    sim = (
        qs.reshape(n_q * q_tokens, dim) @ ps.reshape(n_p * p_tokens, dim).T
    )  # (n_q * q_tokens, n_p * p_tokens)
    sim = sim.view(n_q, q_tokens, n_p, p_tokens)
    sim = sim.masked_fill(~token_mask(ps).view(1, 1, n_p, p_tokens), torch.finfo(sim.dtype).min)
    scores = sim.amax(dim=3).mul(token_mask(qs).unsqueeze(-1)).sum(dim=1)  # (n_q, n_p)
    if normalize:
        scores = scores / token_mask(qs).sum(dim=1, keepdim=True).clamp(min=1)
    return scores


def paired_scores(qs: torch.Tensor, ps: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """MaxSim of query i against page i only: (n,), the diagonal of `maxsim_scores` without the rest."""
    sim = torch.einsum("bnd,bsd->bns", qs, ps)  # (n, q_tokens, p_tokens)
    sim = sim.masked_fill(~token_mask(ps).unsqueeze(1), torch.finfo(sim.dtype).min)
    scores = sim.amax(dim=2).mul(token_mask(qs)).sum(dim=1)  # (n,)
    if normalize:
        scores = scores / token_mask(qs).sum(dim=1).clamp(min=1)
    return scores


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; training stops rather than write a broken model."""

    def __init__(self, step: int, loss: float, message: str | None = None):
        super().__init__(message or f"the training loss is {loss} at step {step}")
        self.step, self.loss = step, loss


# In-batch scores (after the temperature) whose spread for every query stays below this carry no signal: the
# softmax over them is uniform to within 5%, and when the embeddings have collapsed to one vector, the
# gradients of the positive and of the negatives cancel exactly.
TIED_SPREAD = 0.05
# A mean loss within this of chance (ln of the pages each query is scored against) means: not learning.
CHANCE_MARGIN = 0.05


class CollapsedTrainingError(RuntimeError):
    """The in-batch scores of every query have tied for many steps in a row: the embeddings collapsed and the
    run has stopped learning; training stops rather than write a model that ranks pages at random."""

    def __init__(self, step: int, steps: int, spread: float, message: str | None = None):
        super().__init__(
            message
            or f"the in-batch scores have tied (largest spread {spread:.2g} < {TIED_SPREAD}) for {steps} steps, up to step {step}"
        )
        self.step, self.steps, self.spread = step, steps, spread


class CollapseGuard:
    """Watches a run after each optimizer step for two signs that it has stopped learning.

    - Tied scores: every query's in-batch scores within `TIED_SPREAD` of each other (`ColbertContrastiveLoss.spread`)
      for `patience` steps in a row: the embeddings collapsed, nothing more can be learnt; `update` raises
      `CollapsedTrainingError`.
    - Chance: after `after_step` (the warm-up), the mean loss of the last `patience` steps still within
      `CHANCE_MARGIN` of the loss of scores that ignore the page (ln of the pages each query is scored against,
      for `ce`): `update` logs one warning with advice. A run can leave it late, so it is not stopped.

    Args:
        patience: Steps of either sign before it counts; 0 turns the guard off.
        after_step: Steps before the chance check starts (the warm-up, when the loss may rise first).
    """

    def __init__(self, patience: int, after_step: int = 0):
        self.patience, self.after_step = patience, after_step
        self.tied, self.losses, self.warned = 0, [], False

    def update(
        self, step: int, spread: float, loss: float | None = None, chance: float | None = None
    ) -> None:
        if not self.patience:
            return
        self.tied = self.tied + 1 if spread < TIED_SPREAD else 0
        if self.tied >= self.patience:
            raise CollapsedTrainingError(step, self.tied, spread)
        if loss is None or chance is None or step <= self.after_step or self.warned:
            return
        self.losses = [*self.losses, loss][-self.patience :]
        if len(self.losses) == self.patience and sum(self.losses) / self.patience >= chance - CHANCE_MARGIN:
            self.warned = True
            logger.warning(
                f"step {step}: the loss has stayed at chance level for {self.patience} steps (mean "
                f"{sum(self.losses) / self.patience:.3f}; scores that ignore the page give ln {round(math.exp(chance))} "
                f"= {chance:.3f}): the run is not learning yet. If it stays there, stop it and try a longer "
                "--warmup-steps or a lower --lr (a random head at a high learning rate can fall into this), and check "
                "that each query belongs to its page."
            )


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every process's gradient for this process's slice."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.size = dist.get_rank(), tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        # Every process's loss depends on our pages: add up their gradients, keep our slice.
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.size : (ctx.rank + 1) * ctx.size]


def gather_with_grad(embeddings: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Gather (local_batch, tokens, dim) embeddings from every process, keeping gradients.

    Pages of different lengths are zero-padded (on the token axis) to the longest first; zero rows
    count as padding in `maxsim_scores`. All processes must have the same local batch size.

    Returns:
        The (world_size * local_batch, max_tokens, dim) embeddings and this process's offset
        (rank * local_batch), the index of its first item. Without torch.distributed: the input and 0.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return embeddings, 0
    lengths = torch.tensor([embeddings.shape[1]], device=embeddings.device)
    all_lengths = [torch.empty_like(lengths) for _ in range(dist.get_world_size())]
    dist.all_gather(all_lengths, lengths)
    longest = int(torch.stack(all_lengths).max())
    padded = F.pad(embeddings, (0, 0, 0, longest - embeddings.shape[1]))  # (local_batch, longest, dim)
    return _GatherWithGrad.apply(padded), dist.get_rank() * embeddings.shape[0]


class ColbertContrastiveLoss(nn.Module):
    """In-batch contrastive loss over MaxSim scores (`ce` or `pairwise`), with optional hard negatives.

    Args:
        loss: `ce` (InfoNCE) or `pairwise` (softplus of hardest negative minus positive).
        tau: Temperature: scores are divided by it.
        normalize_scores: Divide scores by the query's number of real tokens.
        hard_negative_weight: Weight of the hard-negative term when hard negatives are given;
            the in-batch term gets 1 minus it.
    """

    def __init__(
        self,
        loss: LossName = "ce",
        tau: float = DEFAULT_TAU,
        normalize_scores: bool = True,
        hard_negative_weight: float = 0.5,
    ):
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"loss={loss!r} is not one of {LOSSES}")
        if tau <= 0:
            raise ValueError(f"tau must be positive, got {tau}")
        if not 0 <= hard_negative_weight <= 1:
            raise ValueError(f"hard_negative_weight must be in [0, 1], got {hard_negative_weight}")
        self.loss, self.tau, self.normalize_scores = loss, tau, normalize_scores
        self.hard_negative_weight = hard_negative_weight
        # The largest spread (max - min) of one query's in-batch scores, after the temperature, at the last call:
        # near 0 means every page scores alike (`CollapseGuard`). A detached tensor; None before the first call.
        self.spread: torch.Tensor | None = None
        # The loss of scores that ignore the page at the last call: ln(pages per query) for `ce`; None for pairwise.
        self.chance: float | None = None

    def forward(
        self,
        query_embeddings: torch.Tensor,
        page_embeddings: torch.Tensor,
        offset: int = 0,
        hard_negative_embeddings: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Mean loss of the queries.

        Args:
            query_embeddings: (n_queries, q_tokens, dim); query i's page is page `offset + i`.
            page_embeddings: (n_pages, p_tokens, dim), n_pages >= offset + n_queries; the others
                are negatives.
            offset: Index of the first query's page (rank * local batch after a gather).
            hard_negative_embeddings: (n_queries, h_tokens, dim), one hard negative per query.
        """
        n_q = query_embeddings.shape[0]
        if page_embeddings.shape[0] < offset + n_q:
            raise ValueError(f"{n_q} queries at offset {offset} need at least {offset + n_q} pages")
        # Scores of bf16 embeddings in float32; float64 ones stay float64.
        dtype = torch.promote_types(query_embeddings.dtype, torch.float32)
        scores = maxsim_scores(query_embeddings, page_embeddings, self.normalize_scores).to(dtype) / self.tau
        self.spread = (scores.amax(dim=1) - scores.amin(dim=1)).amax().detach()  # ()
        self.chance = math.log(scores.shape[1]) if self.loss == "ce" else None
        positives = torch.arange(n_q, device=scores.device) + offset  # (n_q,)
        if self.loss == "ce":
            loss = F.cross_entropy(scores, positives)
        else:
            pos = scores[torch.arange(n_q), positives]  # (n_q,)
            neg = scores.scatter(1, positives.unsqueeze(1), float("-inf")).amax(dim=1)  # (n_q,)
            loss = F.softplus(neg - pos).mean()
        if hard_negative_embeddings is None:
            return loss
        own_pages = page_embeddings[offset : offset + n_q]
        pos = paired_scores(query_embeddings, own_pages, self.normalize_scores).to(dtype) / self.tau  # (n_q,)
        neg = (
            paired_scores(query_embeddings, hard_negative_embeddings, self.normalize_scores).to(dtype)
            / self.tau
        )
        hard = F.softplus(neg - pos).mean()
        return (1 - self.hard_negative_weight) * loss + self.hard_negative_weight * hard


def sub_batch(inputs: dict, prefix: str) -> dict:
    """The part of a collated batch whose keys start with `prefix`, without the prefix."""
    return {key[len(prefix) :]: value for key, value in inputs.items() if key.startswith(prefix)}


def loss_over_processes(
    loss_fn: ColbertContrastiveLoss,
    queries: torch.Tensor,
    pages: torch.Tensor,
    hard_negatives: torch.Tensor | None = None,
) -> torch.Tensor:
    """The loss of this process's queries against the pages of every process.

    Pages are gathered across processes with gradients, so each query has world_size * batch - 1
    in-batch negatives; its own page sits at offset rank * batch.
    """
    all_pages, offset = gather_with_grad(pages)  # (world * batch, max_p_tokens, dim)
    return loss_fn(queries, all_pages, offset, hard_negatives)


def contrastive_loss(model: nn.Module, inputs: dict, loss_fn: ColbertContrastiveLoss) -> torch.Tensor:
    """Embed a collated batch and score every query against every page of every process (`loss_over_processes`)."""
    queries = model(**sub_batch(inputs, "query_"))  # (batch, q_tokens, dim)
    pages = model(**sub_batch(inputs, "doc_"))  # (batch, p_tokens, dim)
    hard_negatives = model(**sub_batch(inputs, "neg_doc_")) if "neg_doc_input_ids" in inputs else None
    return loss_over_processes(loss_fn, queries, pages, hard_negatives)
