"""When training does not fit: settings that fit a memory budget, and one out-of-memory path.

- `suggest_settings` / `recommended_verdicts`: the largest per-device batch that the estimator
  (`memory.py`) says fits a device, with the accumulation that keeps the effective batch, and the
  gradient-cache chunk that fits the whole batch instead (`largest_chunk_size`: every negative kept);
  of the settings that fit, the fastest by step times measured on an H200 (`STEP_TIME_*`): without
  gradient checkpointing when that fits too.
- `is_oom_error`, `find_batch_size` (shrink the batch after each out-of-memory error until a step
  runs: the training CLI's `--auto-batch-size` uses it) and `oom_advice` (what to change next, most
  effective first: the training CLI's error message, the doctor and notebook 05 all print it).
"""

from __future__ import annotations

import gc
import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TypeVar

import torch

from .memory import GIB, MemoryEstimate, TrainingSetup, estimate_memory
from .model import FLASH_ATTN_HINT
from .reference import RECOMMENDED_BATCHES

logger = logging.getLogger(__name__)

T = TypeVar("T")
HEADROOM = 0.9  # share of a device's memory an estimate may use (CUDA context, allocator fragmentation)
# Step time against a plain step with gradient checkpointing at the same batch, measured on an H200 (2B, LoRA,
# bf16, 768 visual tokens, 2026-12-04; benchmarks/gpu/2026-12-04-run0.jsonl and -run1.md): without checkpointing
# (batch 16), and with the gradient cache in chunks of 8 (batch 64), with and without checkpointing. The cache's
# were measured while its re-run still ran the frozen vision tower again: upper bounds until measured again.
STEP_TIME_WITHOUT_CHECKPOINTING = 0.72
STEP_TIME_CACHE = {True: 1.53, False: 1.21}  # gradient checkpointing: relative step time
FAST_CHUNK = 8  # the smallest chunk measured; smaller chunks leave a GPU idle between kernels


class TrainingOutOfMemoryError(RuntimeError):
    """Training ran out of memory at every batch size tried; the message says which setting to change next."""


@dataclass(frozen=True)
class Suggestion:
    """Settings that fit a memory budget: per-device batch, accumulation steps, and their estimate."""

    batch_size: int
    gradient_accumulation_steps: int
    effective_batch_size: int
    estimate: MemoryEstimate | None
    fits: bool
    note: str
    grad_cache_chunk_size: int | None = None  # when the batch needs accumulation: a chunk that fits it whole
    # With that chunk, or with the batch when it fits: whether to checkpoint (False when the faster setting,
    # without it, also fits); None: as the setup has it.
    gradient_checkpointing: bool | None = None

    def as_dict(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k != "estimate"}
        out["estimated_gib"] = None if self.estimate is None else round(self.estimate.total_gib, 2)
        return out


def largest_batch_size(
    memory_bytes: float, setup: TrainingSetup | None = None, limit: int = 4096, **overrides
) -> int:
    """The largest per-device batch whose estimated peak stays under `memory_bytes` (0 if none)."""
    return _largest(replace(setup or TrainingSetup(), **overrides), "batch_size", limit, memory_bytes)


def _largest(setup: TrainingSetup, field: str, limit: int, memory_bytes: float) -> int:
    """The largest value of `field` (1 to `limit`) whose estimated peak fits `memory_bytes`, by bisection (0 if none)."""
    if estimate_memory(setup, **{field: 1}).total > memory_bytes:
        return 0
    low, high = 1, limit
    while low < high:  # the peak grows with the field: bisect
        mid = (low + high + 1) // 2
        if estimate_memory(setup, **{field: mid}).total <= memory_bytes:
            low = mid
        else:
            high = mid - 1
    return low


def largest_chunk_size(memory_bytes: float, setup: TrainingSetup | None = None, **overrides) -> int:
    """The largest gradient-cache chunk (at most the batch) whose estimated peak stays under `memory_bytes` (0 if none)."""
    setup = replace(setup or TrainingSetup(), **overrides)
    return _largest(setup, "grad_cache_chunk_size", setup.batch_size, memory_bytes)


def gradient_accumulation_steps(
    effective_batch_size: int, per_device_batch_size: int, num_devices: int = 1
) -> int:
    """Accumulation steps so that per_device x devices x steps reaches `effective_batch_size`."""
    if per_device_batch_size < 1 or num_devices < 1:
        raise ValueError("per_device_batch_size and num_devices must be at least 1")
    return max(1, math.ceil(effective_batch_size / (per_device_batch_size * num_devices)))


def suggest_settings(
    memory_gib: float,
    setup: TrainingSetup | None = None,
    effective_batch_size: int | None = None,
    num_devices: int = 1,
    headroom: float = HEADROOM,
    **overrides,
) -> Suggestion:
    """The largest per-device batch that fits `memory_gib`, and the accumulation keeping the effective batch.

    In-batch negatives come from the per-device batch, so a smaller batch with accumulation trains
    a (slightly) different objective than the recommended one; the note says so, and names the
    gradient-cache chunk that keeps the whole batch (`grad_cache_chunk_size`) when one fits.

    Args:
        memory_gib: Memory of one device (e.g. 80 for an H100 80GB).
        setup: The configuration; its `batch_size` is the wanted per-device batch.
        effective_batch_size: Batch to keep per optimizer step; default: `setup.batch_size` x devices.
        num_devices: Data-parallel devices.
        headroom: Share of the memory the estimate may use (CUDA context, allocator fragmentation).
        **overrides: Fields of `TrainingSetup` to change.
    """
    setup = replace(setup or TrainingSetup(), **overrides)
    wanted = effective_batch_size or setup.batch_size * num_devices
    budget = memory_gib * GIB * headroom
    batch = min(largest_batch_size(budget, setup), setup.batch_size)
    if batch == 0:
        estimate = estimate_memory(setup, batch_size=1)
        note = (
            f"does not fit: batch 1 needs ~{estimate.total_gib:.1f} GiB of {memory_gib:.0f} GiB; "
            + ("enable gradient checkpointing, " if not setup.gradient_checkpointing else "")
            + ("use LoRA, " if not setup.lora else "")
            + "lower max_visual_tokens or use a smaller model"
        )
        return Suggestion(0, 0, 0, estimate, False, note)
    per_device = math.ceil(wanted / num_devices)
    divisor = max(d for d in range(1, batch + 1) if per_device % d == 0)
    if batch < setup.batch_size and divisor * 2 > batch:
        batch = divisor  # e.g. 32 x 2 rather than 63 x 2: the effective batch stays exactly as wanted
    steps = gradient_accumulation_steps(wanted, batch, num_devices)
    estimate = estimate_memory(setup, batch_size=batch)
    chunk, checkpointing = None, None
    if batch >= setup.batch_size:
        note = "fits"
        if (
            setup.gradient_checkpointing
            and estimate_memory(setup, gradient_checkpointing=False).total <= budget
        ):
            checkpointing = False
            note += (
                "; also without gradient checkpointing (--no-gradient-checkpointing), whose steps took "
                f"{STEP_TIME_WITHOUT_CHECKPOINTING:.2f}x the time on an H200"
            )
    else:
        note = (
            f"needs gradient accumulation: batch {batch} x {steps} steps"
            + (f" x {num_devices} devices" if num_devices > 1 else "")
            + f" for an effective {batch * steps * num_devices} (in-batch negatives: {batch} per step)"
        )
        if setup.grad_cache_chunk_size is None:
            chunk, checkpointing = _fastest_chunk(budget, setup)
        if chunk:
            cached = estimate_memory(setup, grad_cache_chunk_size=chunk, gradient_checkpointing=checkpointing)
            flags = f"--grad-cache-chunk-size {chunk}" + (
                " --no-gradient-checkpointing" if setup.gradient_checkpointing and not checkpointing else ""
            )
            note += (
                f"; or keep all {setup.batch_size} negatives per step with {flags} (~{cached.total_gib:.1f} GiB; "
                f"its steps took {STEP_TIME_CACHE[checkpointing]:.2f}x a plain step's time on an H200)"
            )
    return Suggestion(batch, steps, batch * steps * num_devices, estimate, True, note, chunk, checkpointing)


def _fastest_chunk(budget: float, setup: TrainingSetup) -> tuple[int | None, bool]:
    """The gradient-cache chunk (at most half the batch) that fits the whole batch, and whether to checkpoint:
    without checkpointing when a chunk of at least `FAST_CHUNK` fits so (measured faster), else as the setup does."""
    half = setup.batch_size // 2
    if setup.gradient_checkpointing:
        plain = min(largest_chunk_size(budget, setup, gradient_checkpointing=False), half)
        if plain >= FAST_CHUNK:
            return plain, False
    chunk = min(largest_chunk_size(budget, setup), half)
    return chunk or None, setup.gradient_checkpointing


def recommended_verdicts(memory_gib: float | None, **overrides) -> list[dict]:
    """Fits / needs gradient accumulation / does not fit, for each of the reference README's settings.

    Args:
        memory_gib: Memory of the GPU to judge; None when there is no GPU (nothing fits).
        **overrides: `TrainingSetup` fields shared by every row (default: bf16, LoRA r=32,
            768 visual tokens, flash_attention_2, gradient checkpointing).
    """
    rows = []
    for size, batch in RECOMMENDED_BATCHES:
        setup = TrainingSetup(model_size=size, batch_size=batch, **overrides)
        needed = estimate_memory(setup)
        row = {"model": size, "batch": batch, "needs_gib": round(needed.total_gib, 1)}
        if memory_gib is None:
            row.update(verdict="does not fit", detail="no CUDA GPU: real-size training needs one")
        else:
            s = suggest_settings(memory_gib, setup, effective_batch_size=batch)
            verdict = (
                "fits"
                if s.fits and s.batch_size >= batch
                else ("needs grad. accumulation" if s.fits else "does not fit")
            )
            row.update(
                verdict=verdict,
                detail=s.note,
                batch_that_fits=s.batch_size,
                accumulation=s.gradient_accumulation_steps,
            )
        rows.append(row)
    return rows


def remedies(setup: TrainingSetup) -> dict[str, TrainingSetup]:
    """The reference README's out-of-memory remedies, each applied to `setup` (and eager attention, for contrast)."""
    return {
        "as planned": setup,
        "batch / 2": replace(setup, batch_size=max(1, setup.batch_size // 2)),
        "no grad. ckpt": replace(setup, gradient_checkpointing=False),
        "full fine-tune": replace(setup, lora=False),
        "512 tokens": replace(setup, max_visual_tokens=512),
        "eager attention": replace(setup, attn_implementation="eager"),
    }


# ---------------------------------------------------------------- surviving out-of-memory errors


def is_oom_error(error: BaseException) -> bool:
    """True for an out-of-memory error from CUDA, MPS, XPU or the CPU allocator."""
    from accelerate.utils.memory import should_reduce_batch_size

    if isinstance(error, TrainingOutOfMemoryError):  # already handled: it carries its advice
        return False
    return isinstance(error, torch.OutOfMemoryError) or should_reduce_batch_size(error)


def free_memory() -> None:
    """Release what a failed step left behind (garbage, and CUDA's cached blocks)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def find_batch_size(
    fn: Callable[[int], T],
    start_batch_size: int,
    min_batch_size: int = 1,
    factor: float = 0.5,
    advice: Callable[[int], str] | None = None,
    what: str = "batch size",
) -> tuple[int, T]:
    """Call `fn(batch_size)`, shrinking the batch after each out-of-memory error until it runs.

    The equivalent of `accelerate.utils.find_executable_batch_size`, but it returns the batch size
    that worked, logs every retry, and raises a readable error when even `min_batch_size` fails.
    `fn` must free what it allocated when it raises (keep model, optimizer and batch local to it, or
    reuse them: a failed attempt's activations are released here before the retry).

    Args:
        fn: Runs the work (e.g. one training step, or the whole training) at a batch size.
        start_batch_size: First batch size to try.
        min_batch_size: Smallest batch size to try.
        factor: Multiplier applied after each failure (0.5 halves it).
        advice: The error message when even `min_batch_size` fails, given that batch size
            (default: `oom_advice` for the reference setup at that batch).
        what: What the size is, for the log (`batch size`; training with the gradient cache shrinks the chunk).

    Returns:
        (the batch size that ran, what `fn` returned).

    Raises:
        TrainingOutOfMemoryError: even `min_batch_size` runs out of memory (message: `advice`).
    """
    if not 0 < factor < 1:
        raise ValueError(f"factor must be between 0 and 1, got {factor}")
    batch_size = start_batch_size
    while True:
        try:
            return batch_size, fn(batch_size)
        except Exception as error:
            if not is_oom_error(error):
                raise
            del error  # drop the traceback's references to the failed step's tensors
            free_memory()
            if batch_size <= min_batch_size:
                message = (
                    advice(batch_size)
                    if advice
                    else oom_advice(TrainingSetup(model_size=None, batch_size=batch_size))
                )
                raise TrainingOutOfMemoryError(message) from None
            smaller = max(min_batch_size, int(batch_size * factor))
            logger.warning(f"out of memory at {what} {batch_size}; retrying with {smaller}")
            batch_size = smaller


def _device_memory_gib() -> float | None:
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / GIB


def oom_advice(
    setup: TrainingSetup,
    gradient_accumulation_steps: int = 1,
    memory_gib: float | None = None,
    checkpoint: Path | None = None,
) -> str:
    """What ran out of memory and which training flags to try next, most effective first.

    Args:
        setup: The configuration that ran out of memory (`TrainConfig.memory_setup()` for a run).
        gradient_accumulation_steps: Its accumulation, kept in the suggested effective batch.
        memory_gib: The device's memory (default: the current CUDA device's, if any). With a
            published model size, the advice adds the estimate and a batch that fits.
        checkpoint: The last intact checkpoint of the run, if any.
    """
    memory_gib = memory_gib if memory_gib is not None else _device_memory_gib()
    batch, accum = setup.batch_size, gradient_accumulation_steps
    lines = [
        f"Out of memory while training with --per-device-train-batch-size {batch} (x{accum} gradient "
        f"accumulation), --max-visual-tokens {setup.max_visual_tokens}, gradient checkpointing "
        f"{'on' if setup.gradient_checkpointing else 'off'}, "
        f"{'LoRA (--peft)' if setup.lora else 'full fine-tuning (no --peft)'}, {setup.attn_implementation} attention."
    ]
    smaller, smaller_accum = batch // 2, accum * 2
    if setup.model_size is not None and memory_gib is not None:
        estimate = estimate_memory(setup)
        usable = memory_gib * HEADROOM
        lines.append(
            f"The estimated peak is {estimate.total_gib:.1f} GiB on this {memory_gib:.0f} GiB device"
            + (
                f", more than the {usable:.1f} GiB ({HEADROOM:.0%}) a run can count on: the rest goes to the CUDA "
                "context, the allocator's fragmentation and other processes."
                if estimate.total_gib > usable
                else "."
            )
        )
        suggestion = suggest_settings(memory_gib, setup, effective_batch_size=batch * accum)
        if suggestion.fits and suggestion.batch_size < batch:
            smaller, smaller_accum = suggestion.batch_size, suggestion.gradient_accumulation_steps
        elif suggestion.fits:
            lines.append(
                "That estimate fits, so something else holds memory (another process, longer pages or queries "
                "than assumed, fragmentation: try PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True)."
            )
    tries = []
    chunk = setup.grad_cache_chunk_size
    if batch > 1 and (chunk is None or chunk > 1):
        fitting = None
        if setup.model_size is not None and memory_gib is not None:
            fitting = largest_chunk_size(memory_gib * GIB * HEADROOM, setup)
            if chunk is None:  # at most half the batch, as `suggest_settings` offers it
                fitting = min(fitting, batch // 2)
        default = max(1, batch // 4) if chunk is None else max(1, chunk // 2)
        new_chunk = fitting if fitting and fitting < (chunk or batch) else default
        tries.append(
            f"--grad-cache-chunk-size {new_chunk} (the gradient cache: the same batch and every in-batch negative, "
            "one chunk's activations at a time, about one more forward pass per step)"
        )
    if batch > 1 and smaller >= 1:
        tries.append(
            f"--per-device-train-batch-size {smaller} --gradient-accumulation-steps {smaller_accum} "
            "(same effective batch, fewer in-batch negatives; or --auto-batch-size to find one)"
        )
    if not setup.gradient_checkpointing:
        tries.append("drop --no-gradient-checkpointing (recompute activations instead of storing them)")
    if setup.max_visual_tokens > 256:
        tries.append(
            f"--max-visual-tokens {512 if setup.max_visual_tokens > 512 else setup.max_visual_tokens // 2}"
        )
    if not setup.lora:
        tries.append("--peft (train LoRA adapters instead of every weight)")
    if setup.attn_implementation == "eager":
        tries.append(f"--attn-implementation flash_attention_2 or sdpa, not eager ({FLASH_ATTN_HINT})")
    lines.append("Try, in this order: " + "; ".join(tries or ["a GPU with more memory"]) + ".")
    lines.append(
        f"The last checkpoint, {checkpoint}, is intact: add --resume-from-checkpoint {checkpoint} to continue."
        if checkpoint
        else "No checkpoint was written yet."
    )
    lines.append("`python -m colqwen3_lib.doctor` shows which recommended settings fit this machine.")
    return "\n".join(lines)
