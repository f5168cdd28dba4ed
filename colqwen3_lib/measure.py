"""Measuring the peak memory of a real ColQwen3 training step, to check the estimator against.

`measure_training_step` builds a model with random weights through `lora.prepare_for_training` (the
very preparation training uses), feeds it batches shaped exactly like the processor's output
(`synthetic_batch`) and measures the peak: CUDA's allocator statistics, or on the CPU the profiler's
allocation events. `measure_against_estimate` puts the estimate beside each measurement (notebook 05;
`benchmarks/bench_memory.py` does the same with more columns).
"""

from __future__ import annotations

import copy
import gc
import os
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import torch

from .architectures import SPECIAL_TOKENS, real_config
from .grad_cache import grad_cache_step
from .lora import prepare_for_training
from .losses import ColbertContrastiveLoss
from .memory import PAGE_PROMPT_TOKENS, TrainingSetup, estimate_memory
from .model import ColQwen3
from .oom import free_memory
from .processor import N_QUERY_AUGMENTATION_TOKENS


def synthetic_batch(
    config, batch_size: int, max_visual_tokens: int, query_len: int, device: str | torch.device = "cpu"
) -> tuple[dict, dict]:
    """A batch of pages and one of queries shaped exactly like `ColQwen3Processor` output, with random content.

    Pages have `max_visual_tokens` image tokens (the last page one row fewer, so that the batch is
    padded as in training) and 20 prompt tokens; queries have `query_len` tokens (the last one 3
    fewer) and 10 augmentation tokens. Pixel values are padded per page to (batch, patches, pixels).
    """
    v = config.vision_config
    rows = max(d for d in range(1, int(max_visual_tokens**0.5) + 1) if max_visual_tokens % d == 0)
    cols = max_visual_tokens // rows
    merge = v.spatial_merge_size
    grids = [
        (rows - (1 if i == batch_size - 1 and batch_size > 1 and rows > 1 else 0), cols)
        for i in range(batch_size)
    ]
    g = torch.Generator().manual_seed(0)

    def left_pad(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        longest = max(map(len, seqs))
        ids = torch.tensor([[SPECIAL_TOKENS["<|endoftext|>"]] * (longest - len(s)) + s for s in seqs])
        mask = torch.tensor([[0] * (longest - len(s)) + [1] * len(s) for s in seqs])
        return ids.to(device), mask.to(device)

    filler = torch.randint(100, 5000, (PAGE_PROMPT_TOKENS,), generator=g).tolist()
    pages = [
        [SPECIAL_TOKENS["<|im_start|>"], *filler[:2], SPECIAL_TOKENS["<|vision_start|>"]]
        + [config.image_token_id] * (r * c)
        + [
            SPECIAL_TOKENS["<|vision_end|>"],
            *filler[2:15],
            SPECIAL_TOKENS["<|im_end|>"],
            SPECIAL_TOKENS["<|endoftext|>"],
        ]
        for r, c in grids
    ]
    ids, mask = left_pad(pages)
    grid_thw = torch.tensor([[1, r * merge, c * merge] for r, c in grids])
    n_patches = grid_thw.prod(dim=1)
    patch_dim = v.in_channels * v.temporal_patch_size * v.patch_size**2
    pixels = torch.zeros(batch_size, int(n_patches.max()), patch_dim)
    for i, n in enumerate(n_patches.tolist()):
        pixels[i, :n] = torch.randn(n, patch_dim, generator=g)
    page_batch = dict(
        input_ids=ids,
        attention_mask=mask,
        mm_token_type_ids=(ids == config.image_token_id).long(),
        pixel_values=pixels.to(device),
        image_grid_thw=grid_thw.to(device),
    )

    queries = [
        torch.randint(
            100,
            5000,
            (query_len - (3 if i == batch_size - 1 and batch_size > 1 and query_len > 3 else 0),),
            generator=g,
        ).tolist()
        + [SPECIAL_TOKENS["<|endoftext|>"]] * N_QUERY_AUGMENTATION_TOKENS
        for i in range(batch_size)
    ]
    q_ids, q_mask = left_pad(queries)
    return page_batch, dict(input_ids=q_ids, attention_mask=q_mask, mm_token_type_ids=torch.zeros_like(q_ids))


def build_training_model(setup: TrainingSetup, config=None, device: str | torch.device = "cpu"):
    """A ColQwen3 with random weights, prepared for training as `setup` says, by the code training uses.

    Args:
        setup: LoRA or full fine-tuning, rank, gradient checkpointing, attention, dtype, head size.
        config: A `Qwen3VLConfig` instead of the published `setup.model_size` architecture.
        device: Where to build it.
    """
    config = copy.deepcopy(config) if config is not None else real_config(setup.model_size)
    config.embedding_dim = setup.embedding_dim
    config._attn_implementation = setup.attn_implementation
    with torch.device(device):
        model = ColQwen3(config)
    model = model.to(dtype=getattr(torch, setup.dtype))
    return prepare_for_training(
        model, setup.lora, setup.gradient_checkpointing, setup.lora_rank, head_in_full=setup.head_in_full
    )


def _live_bytes(*objects) -> int:
    """Bytes of the distinct storages of the tensors in `objects` (modules, optimizers, dicts, tensors)."""
    seen: dict[int, int] = {}

    def add(t):
        if isinstance(t, torch.Tensor):
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
        elif isinstance(t, dict):
            for v in t.values():
                add(v)
        elif isinstance(t, list | tuple):
            for v in t:
                add(v)

    for obj in objects:
        if isinstance(obj, torch.nn.Module):
            add(list(obj.parameters()) + list(obj.buffers()))
        elif isinstance(obj, torch.optim.Optimizer):
            add(list(obj.state.values()))
        else:
            add(obj)
    return sum(seen.values())


# What the profiler's C++ side prints on every start and stop, whatever happens: not news for a learner.
_PROFILER_CHATTER = (
    "SyncActivityProfilerHandler",
    "gpuGetDeviceCount failed",
    "Memory block of unknown size",
)


@contextmanager
def _without_profiler_chatter():
    """Hold back the profiler's own start/stop lines (written by C++ to file descriptor 2); pass on anything else."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as caught:
        os.dup2(caught.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            for line in caught.read().decode(errors="replace").splitlines(keepends=True):
                if not any(marker in line for marker in _PROFILER_CHATTER):
                    sys.stderr.write(line)


def _cpu_peak_bytes(fn: Callable[[], Any]) -> int:
    """Peak bytes allocated by `fn` above what was allocated when it started, on the CPU.

    The profiler's memory events (`profile_memory=True`) report every allocation and free of the
    CPU allocator with the allocator's running total: the CPU's equivalent of CUDA's
    `max_memory_allocated`, counting every tensor torch allocates (kernel-internal oneDNN scratch
    space excepted).
    """
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with _without_profiler_chatter(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = []

    def walk(nodes):
        for node in nodes:
            if node.tag == _EventType.Allocation:
                events.append(
                    (node.start_time_ns, node.extra_fields.alloc_size, node.extra_fields.total_allocated)
                )
            walk(node.children)

    walk(prof.profiler.kineto_results.experimental_event_tree())
    if not events:
        return 0
    events.sort()
    start = events[0][2] - events[0][1]
    return max(total for _, _, total in events) - start


def measure_training_step(
    setup: TrainingSetup, config=None, steps: int = 2, seed: int = 0, step_seconds: list | None = None
) -> int:
    """Measured peak memory (bytes) of a real ColQwen3 training step, random weights, no download.

    Runs `steps` steps (forward of queries and pages, `ColbertContrastiveLoss`, backward, AdamW step,
    `zero_grad(set_to_none=True)`; with `setup.grad_cache_chunk_size`, the forward and backward of
    `grad_cache.grad_cache_step` instead) and measures the last one, when the optimizer states exist:
    `torch.cuda.max_memory_allocated` on CUDA; on the CPU, the bytes resident before the step
    (weights, optimizer states, the batch) plus the allocator's peak during it (`_cpu_peak_bytes`).

    Args:
        setup: The configuration (`setup.device` picks CPU or CUDA).
        config: A `Qwen3VLConfig` instead of the published `setup.model_size` architecture.
        steps: Steps to run (the first creates the optimizer states).
        seed: Seed for the random weights.
        step_seconds: If given, the wall time of each step but the measured one (whose profiling on the CPU
            slows it) is appended to it: a step time that benchmarks can quote.
    """
    if setup.optimizer != "adamw":
        raise ValueError("measure_training_step runs AdamW; set optimizer='adamw'")
    device = torch.device(setup.device)
    torch.manual_seed(seed)
    model = build_training_model(setup, config, device)
    base_config = model.config
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    loss_fn = ColbertContrastiveLoss()
    pages, queries = synthetic_batch(
        base_config, setup.batch_size, setup.max_visual_tokens, setup.query_len, device
    )

    def step():
        if setup.grad_cache_chunk_size:
            inputs = {
                **{f"query_{k}": v for k, v in queries.items()},
                **{f"doc_{k}": v for k, v in pages.items()},
            }
            grad_cache_step(model, inputs, loss_fn, setup.grad_cache_chunk_size)
            del inputs
        else:
            query_embeddings = model(**queries)  # (batch, query_tokens, dim)
            page_embeddings = model(**pages)  # (batch, page_tokens, dim)
            loss = loss_fn(query_embeddings, page_embeddings)
            del page_embeddings, query_embeddings
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(steps - 1):
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step_seconds is not None:
            step_seconds.append(time.perf_counter() - start)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        resident = _live_bytes(model, optimizer, pages, queries)
        peak = resident + _cpu_peak_bytes(step)
    model = optimizer = None  # release the weights before the next measurement
    free_memory()
    return peak


def measure_against_estimate(setups: dict[str, TrainingSetup], config=None) -> list[dict]:
    """Measure one training step per setup and put the estimate beside it.

    Returns:
        One row per setup: `label`, `measured_mib`, `predicted_mib`, `error` (predicted / measured - 1).
    """
    rows = []
    for label, setup in setups.items():
        measured = measure_training_step(setup, config=config)
        predicted = estimate_memory(setup, config=config).total
        rows.append(
            {
                "label": label,
                "measured_mib": measured / 2**20,
                "predicted_mib": predicted / 2**20,
                "error": predicted / measured - 1,
            }
        )
    return rows
