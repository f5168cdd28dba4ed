"""The gradient cache (Gao et al., 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited
Setup"): every in-batch negative, at the memory of a small chunk.

Gradient accumulation keeps the optimizer's batch but not the negatives: each loss sees only the pages of
its micro-batch. The gradient cache keeps them all. A contrastive loss depends on the parameters only
through the embeddings, so its gradient splits in two: dL/dθ = Σ_rows dL/de · de/dθ. One step:

1. embed the queries and pages in chunks without autograd (no activations kept), remembering the random
   state each chunk started from: pages `chunk_size` at a time, queries as many as hold as many tokens
   (usually all of them: a forward pass costs a launch of every kernel, whatever its size);
2. compute the loss over the whole batch from those embeddings (with every process's pages, gathered as
   `losses.contrastive_loss` gathers them) and back-propagate it to the embeddings only: dL/de, cached;
3. run each chunk again with autograd, from its saved random state (so dropout draws the same masks), and
   back-propagate the cached dL/de through it; the parameter gradients add up to dL/dθ.

The result is the gradient of the whole batch's loss, exactly (to float rounding), for one more forward
pass per step. When the vision tower is frozen (LoRA: it is never a target), its output for each page chunk
in step 1 is kept and given back in step 3 instead of being computed again: no gradient flows into it, so
the re-run needs only the language model (with the random state the vision tower left, should it draw any).
Peak memory is that of one chunk, plus the embeddings of the whole batch and their gradients, the vision
tower's outputs for every page when it is frozen, and the loss's similarity block for the whole batch
(`memory.estimate_memory` models it).

Both trainers call `grad_cache_step` (`loop.py`, and `hf_trainer.py`'s `training_step`). Under several
processes, all but the last re-run chunk run inside DDP's `no_sync`, so gradients are all-reduced once per
step; the last chunk is a page chunk, the only kind that reaches every trained weight (queries never use
the vision tower). Under FSDP each chunk's backward reduce-scatters its gradient into the shards instead
(`no_sync` would keep full, unsharded gradients on every process: the memory FSDP exists to save).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .losses import ColbertContrastiveLoss, loss_over_processes, sub_batch

# Embedding order: as `losses.contrastive_loss` (queries, pages, hard-negative pages).
EMBED_ORDER = ("query_", "doc_", "neg_doc_")
# Re-run order: pages last, so that the one backward outside `no_sync` reaches every trained weight.
RERUN_ORDER = ("query_", "neg_doc_", "doc_")


@dataclass
class RandomState:
    """The global random state of torch (CPU and every initialised CUDA device): what dropout draws from."""

    cpu: torch.Tensor
    cuda: list[torch.Tensor] | None

    @classmethod
    def capture(cls) -> RandomState:
        cuda = (
            torch.cuda.get_rng_state_all()
            if torch.cuda.is_available() and torch.cuda.is_initialized()
            else None
        )
        return cls(torch.get_rng_state(), cuda)

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)


def frozen_vision_backbone(model: torch.nn.Module) -> torch.nn.Module | None:
    """The Qwen3-VL backbone inside `model` (bare, PEFT, DDP or FSDP-wrapped) when its vision tower trains
    nothing, else None: then the tower's outputs may be kept from the graph-free pass and given back."""
    for module in model.modules():
        # Its own method and child module, not those a wrapper (PEFT) forwards to the model inside it.
        if hasattr(type(module), "get_image_features") and "visual" in module._modules:
            frozen = not any(p.requires_grad for p in module.visual.parameters())
            return module if frozen else None
    return None


@contextlib.contextmanager
def _vision_outputs(backbone: torch.nn.Module | None, kept: list | None, replay: bool = False):
    """While inside, the backbone's `get_image_features` appends what it computes to `kept` (with the random
    state after it), or, with `replay`, gives back the first entry of `kept` and restores that state. No
    backbone or no `kept`: nothing changes."""
    if backbone is None or kept is None:
        yield
        return
    compute = backbone.get_image_features

    def record(*args, **kwargs):
        features = compute(*args, **kwargs)
        kept.append((features, RandomState.capture()))
        return features

    def give_back(*args, **kwargs):
        features, state = kept.pop(0)
        state.restore()  # as if the vision tower had run and drawn what it drew
        return features

    backbone.get_image_features = give_back if replay else record
    try:
        yield
    finally:
        del backbone.get_image_features  # the class's method again


def split_rows(batch: dict[str, torch.Tensor], chunk_size: int) -> list[dict[str, torch.Tensor]]:
    """Split a processor batch (pages or queries) into chunks of `chunk_size` rows (the last may be smaller).

    Every tensor is cut along its first axis; padding is kept, so the chunks' embeddings concatenate
    back to the shape of the whole batch's. Pixel values must be padded per page, (batch, patches,
    pixels), as `ColQwen3Processor` and the training collator give them.

    Raises:
        ValueError: `chunk_size` is below 1, or a tensor does not have one row per item.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    rows = batch["input_ids"].shape[0]
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and (value.dim() == 0 or value.shape[0] != rows):
            raise ValueError(
                f"cannot split the batch into chunks: {key} has shape {tuple(value.shape)}, not one row per item "
                f"({rows}); pad pixel_values per page, (batch, patches, pixels), as ColQwen3Processor does"
            )
    return [
        {key: value[start : start + chunk_size] for key, value in batch.items()}
        for start in range(0, rows, chunk_size)
    ]


def chunk_rows(inputs: dict, prefix: str, chunk_size: int) -> int:
    """Rows per forward pass for the `prefix` part of a collated batch: `chunk_size` for pages; for queries, as
    many as hold the tokens of `chunk_size` pages (queries are some 30 tokens, pages hundreds), so that the
    queries of a batch usually make one chunk: each forward pass is a launch of every kernel of the model,
    and a chunk of 8 queries would spend it on a few hundred tokens."""
    if prefix != "query_" or "doc_input_ids" not in inputs:
        return chunk_size
    query_len, page_len = inputs["query_input_ids"].shape[1], inputs["doc_input_ids"].shape[1]
    return max(chunk_size, chunk_size * page_len // max(query_len, 1))


def embed_in_chunks(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], chunk_size: int
) -> tuple[torch.Tensor, list[RandomState]]:
    """Embed a processor batch chunk by chunk without autograd.

    Returns:
        The (batch, tokens, dim) embeddings and, per chunk, the random state its forward started from.
    """
    return _embed_without_graph(model, split_rows(batch, chunk_size))


@torch.no_grad()
def _embed_without_graph(
    model: torch.nn.Module,
    chunks: list[dict],
    backbone: torch.nn.Module | None = None,
    vision: list | None = None,
) -> tuple[torch.Tensor, list[RandomState]]:
    """Embed `chunks` one by one without a graph; with a `backbone` (`frozen_vision_backbone`), `vision` (a list)
    receives each page chunk's vision outputs."""
    states, parts = [], []
    for chunk in chunks:
        states.append(RandomState.capture())
        with _vision_outputs(backbone, vision):
            parts.append(model(**chunk))  # (chunk, tokens, dim)
    return torch.cat(parts), states


def chunked_loss(
    model: torch.nn.Module, inputs: dict, loss_fn: ColbertContrastiveLoss, chunk_size: int
) -> torch.Tensor:
    """The loss of a collated batch embedded in chunks, without autograd (evaluation with the gradient cache on)."""
    embeddings = {
        prefix: embed_in_chunks(model, sub_batch(inputs, prefix), chunk_rows(inputs, prefix, chunk_size))[0]
        for prefix in EMBED_ORDER
        if f"{prefix}input_ids" in inputs
    }
    with torch.no_grad():
        return loss_over_processes(
            loss_fn, embeddings["query_"], embeddings["doc_"], embeddings.get("neg_doc_")
        )


def grad_cache_step(
    model: torch.nn.Module,
    inputs: dict,
    loss_fn: ColbertContrastiveLoss,
    chunk_size: int,
    backward: Callable[[torch.Tensor], None] | None = None,
    no_sync: Callable[[], contextlib.AbstractContextManager] | None = None,
    check_loss: Callable[[torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """One training step's forward and backward with the gradient cache; the parameters' `.grad` receive dL/dθ.

    Args:
        model: The model being trained (bare, or wrapped by DDP / FSDP).
        inputs: A collated batch (`query_*`, `doc_*` and optional `neg_doc_*` keys, `data.ContrastiveCollator`).
        loss_fn: The contrastive loss, over the whole batch and every process's pages.
        chunk_size: Pages per forward pass; queries go as many at a time as hold as many tokens
            (`chunk_rows`).
        backward: Back-propagates a scalar (default `Tensor.backward`); the trainers pass
            `accelerator.backward`, with the loss scaling of gradient accumulation applied to it.
        no_sync: A context manager factory that keeps gradients local (DDP's `no_sync`); all but the
            last chunk's forward and backward run inside it. None: every backward syncs as it would.
        check_loss: Called with the loss before any parameter gradient is computed (e.g. to stop on NaN).

    Returns:
        The loss of the whole batch, detached.
    """
    backward = backward or torch.Tensor.backward
    present = [prefix for prefix in EMBED_ORDER if f"{prefix}input_ids" in inputs]
    rows = {prefix: chunk_rows(inputs, prefix, chunk_size) for prefix in present}
    chunks = {prefix: split_rows(sub_batch(inputs, prefix), rows[prefix]) for prefix in present}

    # 1. Embed every chunk without a graph, remembering the random state each one started from, and the
    # frozen vision tower's outputs for the pages.
    backbone = frozen_vision_backbone(model)
    vision = {prefix: [] if backbone is not None and prefix != "query_" else None for prefix in present}
    cached, states = {}, {}
    for prefix in present:
        cached[prefix], states[prefix] = _embed_without_graph(model, chunks[prefix], backbone, vision[prefix])
    after_forward = RandomState.capture()

    # 2. The loss over the whole batch, back-propagated to the embeddings only (no parameter is in this graph).
    leaves = {prefix: embeddings.requires_grad_() for prefix, embeddings in cached.items()}
    loss = loss_over_processes(loss_fn, leaves["query_"], leaves["doc_"], leaves.get("neg_doc_"))
    if check_loss is not None:
        check_loss(loss)
    loss.backward()
    # Dropping the loss's graph frees the cached embeddings: only their gradients stay.
    loss = loss.detach()
    cached_grads = {prefix: leaf.grad.split(rows[prefix]) for prefix, leaf in leaves.items()}
    del leaves, cached

    # 3. Each chunk again, with a graph and the same dropout masks; its cached gradient flows to the parameters.
    jobs = [
        (prefix, chunk, state, grad)
        for prefix in RERUN_ORDER
        if prefix in chunks
        for chunk, state, grad in zip(chunks[prefix], states[prefix], cached_grads[prefix])
    ]
    for i, (prefix, chunk, state, grad) in enumerate(jobs):
        last = i == len(jobs) - 1
        state.restore()
        with (
            contextlib.nullcontext() if last or no_sync is None else no_sync(),
            _vision_outputs(backbone, vision[prefix], replay=True),
        ):
            embeddings = model(**chunk)  # (chunk, tokens, dim)
            # A scalar whose gradient with respect to the embeddings is the cached dL/de of this chunk.
            backward((embeddings * grad).sum())
    after_forward.restore()  # the random state the plain step would leave: the next step draws the same
    return loss


def sync_control(
    accelerator, model: torch.nn.Module
) -> Callable[[], contextlib.AbstractContextManager] | None:
    """The `no_sync` for `grad_cache_step` under `accelerate`: DDP's, or None where it does not apply.

    Raises:
        ValueError: DeepSpeed, whose backward in `accelerate` also steps the engine, so that every chunk
            would count as a micro-batch of its own.
    """
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        raise ValueError(
            "--grad-cache-chunk-size does not run under DeepSpeed: accelerate's DeepSpeed backward steps the "
            "engine at every call, so each chunk would count as a micro-batch. Shard with FSDP instead "
            "(accelerate launch --config_file configs/fsdp.yaml), or drop --grad-cache-chunk-size"
        )
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return functools.partial(accelerator.no_sync, model)
    return None
