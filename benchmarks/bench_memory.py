"""Memory estimator vs measurement: predicted and measured peak memory of real ColQwen3 training steps.

On the CPU it measures the tiny checkpoint's architecture and a scaled-down 2B (hidden 512, 4 layers,
vision 256 x 4 blocks, the real vocabulary) over a grid of batch sizes and visual-token caps, with
and without LoRA and gradient checkpointing, and with the gradient cache; with `--gpu` it measures the
real 2B architecture (random weights) with `torch.cuda.max_memory_allocated`. Writes a markdown table
(benchmarks/memory_accuracy.md, or memory_accuracy_gpu.md with --gpu) and prints it.

With `--real-2b` it measures one LoRA step of the real 2B architecture (random weights, float32, gradient
checkpointing, 1 and 2 pages of 768 visual tokens) on this CPU and writes that section of
memory_accuracy.md, keeping the rest of the file. It needs about 16 GiB of free memory and, on 2 cores,
about 6 minutes per batch size.

    python benchmarks/bench_memory.py            # CPU grid, ~15 min on 2 cores
    python benchmarks/bench_memory.py --quick    # 4 CPU runs, ~1 min
    python benchmarks/bench_memory.py --real-2b  # the real 2B architecture on the CPU, ~15 min
    python benchmarks/bench_memory.py --gpu      # real 2B on the CUDA device
"""

from __future__ import annotations

import argparse
import platform
import resource
import time
from pathlib import Path

import torch

from colqwen3_lib.architectures import real_config, scaled_config
from colqwen3_lib.measure import measure_training_step
from colqwen3_lib.memory import GIB, TrainingSetup, estimate_memory
from colqwen3_lib.oom import HEADROOM, largest_chunk_size
from colqwen3_lib.reference import RECOMMENDED_BATCHES

MIB = 2**20
TOLERANCE = 0.10
MODES = [(True, False), (True, True), (False, False), (False, True)]  # (lora, gradient checkpointing)
CPU_GRID = [(2, 64), (4, 128), (8, 256)]  # (batch size, max visual tokens)
# The gradient cache: (model, lora, gradient checkpointing, batch, visual tokens, chunk), beside the same batch
# without it (the full fine-tuning case is the tiny model's, where activations outgrow the optimizer states).
GRAD_CACHE_GRID = [
    ("tiny", True, False, 16, 128, 4),
    ("tiny", True, True, 8, 256, 2),
    ("tiny", False, False, 16, 512, 4),
    ("tiny", False, True, 16, 512, 4),
    ("scaled-2b", True, False, 16, 128, 4),
    ("scaled-2b", True, True, 8, 256, 2),
]
REAL_2B_BATCHES = (1, 2)
GPU_SIZES_GIB = (24, 40, 48, 80)
REAL_2B_HEADING = "## The real 2B architecture on the CPU"


def cpu_cases(quick: bool):
    cases = []
    for name, config in (("tiny", real_config("tiny")), ("scaled-2b", scaled_config())):
        for lora, ckpt in MODES:
            for batch, tokens in CPU_GRID:
                if quick and (batch, tokens) != (8, 256) or quick and name == "scaled-2b" and not lora:
                    continue
                setup = TrainingSetup(
                    model_size="tiny", dtype="float32", lora=lora, gradient_checkpointing=ckpt, batch_size=batch,
                    max_visual_tokens=tokens, attn_implementation="sdpa", device="cpu",
                )  # fmt: skip
                cases.append((name, config, setup))
    if not quick:  # eager attention and bf16, without checkpointing so that every layer's tensors count
        extra = dict(model_size="tiny", gradient_checkpointing=False, device="cpu")
        for lora, dtype, attn, batch, tokens in [
            (True, "float32", "eager", 4, 128),
            (True, "bfloat16", "sdpa", 4, 128),
            (False, "bfloat16", "sdpa", 4, 128),
        ]:
            setup = TrainingSetup(
                **extra,
                lora=lora,
                dtype=dtype,
                attn_implementation=attn,
                batch_size=batch,
                max_visual_tokens=tokens,
            )
            cases.append(("scaled-2b", scaled_config(), setup))
        configs = {"tiny": real_config("tiny"), "scaled-2b": scaled_config()}
        for name, lora, ckpt, batch, tokens, chunk in GRAD_CACHE_GRID:
            for grad_cache in (None, chunk):
                setup = TrainingSetup(
                    model_size="tiny", dtype="float32", lora=lora, gradient_checkpointing=ckpt, batch_size=batch,
                    max_visual_tokens=tokens, attn_implementation="sdpa", device="cpu", grad_cache_chunk_size=grad_cache,
                )  # fmt: skip
                if (name, configs[name], setup) not in cases:  # a plain step the grid above already has
                    cases.append((name, configs[name], setup))
    return cases


def gpu_cases():
    """The real 2B in bf16 on the GPU: batch 8 and 16 with sdpa and (when installed) flash-attention 2, then one
    row each without checkpointing, in full fine-tuning, and at 64 pages with the gradient cache."""
    attentions = ["sdpa"] + (["flash_attention_2"] if _has_flash_attn() else [])
    rows = [(True, True, batch, 768, attn, None) for attn in attentions for batch in (8, 16)]
    best = attentions[-1]
    rows += [
        (True, False, 4, 512, best, None),
        (False, True, 4, 768, best, None),
        (True, True, 64, 768, best, 8),
    ]
    cases = []
    for lora, ckpt, batch, tokens, attn, chunk in rows:
        setup = TrainingSetup(
            model_size="2b", dtype="bfloat16", lora=lora, gradient_checkpointing=ckpt, batch_size=batch,
            max_visual_tokens=tokens, attn_implementation=attn, device="cuda", grad_cache_chunk_size=chunk,
        )  # fmt: skip
        cases.append(("2b", None, setup))
    return cases


def _has_flash_attn() -> bool:
    import importlib.util

    return importlib.util.find_spec("flash_attn") is not None


def run(cases, steps: int = 2) -> list[dict]:
    """Measure and predict each case; with `steps` of 3 or more, also the time of a step after the first."""
    rows = []
    for name, config, setup in cases:
        start = time.perf_counter()
        step_seconds = []
        measured = measure_training_step(setup, config=config, steps=steps, step_seconds=step_seconds)
        estimate = estimate_memory(setup, config=config)
        parts = {k: v for k, v in estimate.breakdown().items() if k != "total"}
        fixed = estimate.weights + estimate.trainable
        row = dict(
            model=name,
            mode=("LoRA" if setup.lora else "full")
            + (" +ckpt" if setup.gradient_checkpointing else "")
            + (f" +cache {setup.grad_cache_chunk_size}" if setup.grad_cache_chunk_size else ""),
            attn=setup.attn_implementation,
            dtype=setup.dtype,
            batch=setup.batch_size,
            tokens=setup.max_visual_tokens,
            predicted=estimate.total / MIB,
            measured=measured / MIB,
            ratio=estimate.total / measured,
            # weights and optimizer states are exact parameter counts: how good is the rest?
            variable_ratio=(estimate.total - fixed) / (measured - fixed),
            phase=estimate.peak_phase,
            largest=max(parts, key=parts.get),
            seconds=time.perf_counter() - start,
            step_seconds=step_seconds[-1] if steps > 2 else None,
        )
        rows.append(row)
        print(
            f"{row['model']:<10} {row['mode']:<11} {row['attn']:<17} {row['dtype']:<8} b={row['batch']:<3} "
            f"v={row['tokens']:<4} predicted {row['predicted']:8.0f} MiB measured {row['measured']:8.0f} MiB "
            f"ratio {row['ratio']:.2f} ({row['seconds']:.0f} s)",
            flush=True,
        )
    return rows


def markdown(rows: list[dict], device: str, steps: int = 2) -> str:
    lines = [
        "# Memory estimator accuracy",
        "",
        f"Generated by `python benchmarks/bench_memory.py` on {device}, torch {torch.__version__}. "
        f"Peak memory of the last of {'two' if steps == 2 else steps} real training steps (queries then pages forward, "
        "`ColbertContrastiveLoss`, backward, AdamW step), random weights. Measured: on the CPU, the bytes "
        "resident before the step plus the CPU allocator's peak during it (profiler memory events); "
        "on CUDA, `torch.cuda.max_memory_allocated`. The model is prepared by `colqwen3_lib.lora.prepare_for_training`, "
        "the LoRA training itself uses (the reference's: adapters on the language model's projections and the head). "
        "`+cache N`: the step of the gradient cache in chunks of N rows (`colqwen3_lib.grad_cache.grad_cache_step`), "
        "beside the same batch without it. Predicted: `colqwen3_lib.memory.estimate_memory`.",
        "",
        "| model | mode | attention | dtype | batch | visual tokens | predicted MiB | measured MiB "
        "| predicted/measured | same, without weights & optimizer | peak at | largest term |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['mode']} | {r['attn']} | {r['dtype']} | {r['batch']} | {r['tokens']} | "
            f"{r['predicted']:.0f} | {r['measured']:.0f} | {r['ratio']:.2f} | {r['variable_ratio']:.2f} | "
            f"{r['phase']} | {r['largest']} |"
        )
    ratios = [r["ratio"] for r in rows]
    inside = sum(abs(x - 1) <= TOLERANCE for x in ratios)
    variable = [r["variable_ratio"] for r in rows]
    lines += [
        "",
        f"{inside} of {len(rows)} within +-{TOLERANCE:.0%}; ratio range {min(ratios):.2f}-{max(ratios):.2f}. "
        f"Without the weights and optimizer states (exact parameter counts), what remains (gradients, "
        f"activations, workspace) is predicted within {min(variable):.2f}-{max(variable):.2f} of its measured size.",
        "",
        "## Predictions for the reference README's recommended settings",
        "",
        "bf16, LoRA r=32, 768 visual tokens, 20-token queries, flash_attention_2, gradient checkpointing, AdamW.",
        "",
        "| model | batch | predicted GiB | peak at | weights | trainable + optimizer | activations | workspace |",
        "|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    for size, batch in RECOMMENDED_BATCHES:
        e = estimate_memory(TrainingSetup(model_size=size, batch_size=batch))
        b = e.breakdown()
        lines.append(
            f"| {size} | {batch} | {e.total_gib:.1f} | {e.peak_phase} | {b['weights']:.1f} | {b['trainable']:.1f} | "
            f"{b['activations']:.1f} | {b['workspace']:.1f} |"
        )
    return "\n".join(lines + ["", *grad_cache_predictions()]) + "\n"


def grad_cache_predictions() -> list[str]:
    """Batch 64 per device with and without the gradient cache: predicted peaks, and what fits each GPU size."""
    budget = {gib: gib * GIB * HEADROOM for gib in GPU_SIZES_GIB}
    lines = [
        "## Predictions: 64 pages per device with the gradient cache",
        "",
        "The settings above at batch 64, without the cache and with it in chunks of 8, 16 and 32, on one process "
        "(with several, the similarity block grows with the pages gathered from all of them). Per GPU size: "
        f"*fits* when batch 64 fits without the cache (predicted peak at most {HEADROOM:.0%} of the memory), "
        "else the largest chunk (up to half the batch) with which it fits, else *no*.",
        "",
        "| model | no cache | chunks of 8 | chunks of 16 | chunks of 32 | "
        + " | ".join(f"{gib} GiB" for gib in GPU_SIZES_GIB)
        + " |",
        "|---|---:|---:|---:|---:|" + "---|" * len(GPU_SIZES_GIB),
    ]
    for size in ("2b", "4b", "8b"):
        setup = TrainingSetup(model_size=size, batch_size=64)
        plain = estimate_memory(setup).total
        cells = [f"{plain / GIB:.1f} GiB"]
        cells += [
            f"{estimate_memory(setup, grad_cache_chunk_size=c).total / GIB:.1f} GiB" for c in (8, 16, 32)
        ]
        for gib in GPU_SIZES_GIB:
            chunk = min(largest_chunk_size(budget[gib], setup), 32)
            cells.append("fits" if plain <= budget[gib] else f"chunks of {chunk}" if chunk else "no")
        lines.append(f"| {size} | " + " | ".join(cells) + " |")
    return lines


def _available_bytes() -> int:
    """MemAvailable of /proc/meminfo: what this machine can give a new allocation without swapping."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise SystemExit("cannot read the available memory from /proc/meminfo")


def real_2b_rows() -> list[dict]:
    """One LoRA step of the real 2B architecture on the CPU, per batch of `REAL_2B_BATCHES`, measured and predicted."""
    cases = []
    for batch in REAL_2B_BATCHES:
        setup = TrainingSetup(
            model_size="2b", dtype="float32", lora=True, gradient_checkpointing=True, batch_size=batch,
            max_visual_tokens=768, attn_implementation="sdpa", device="cpu",
        )  # fmt: skip
        # The process holds more than the allocator's peak (the heap keeps freed blocks): 1.8x, as observed.
        needed = 1.8 * estimate_memory(setup).total
        if _available_bytes() < needed:
            raise SystemExit(
                f"--real-2b at batch {batch} needs about {needed / GIB:.0f} GiB of free memory; "
                f"{_available_bytes() / GIB:.0f} GiB are available. Stop other work and run it again."
            )
        cases.append(("2b", None, setup))
    return run(cases)


def real_2b_section(rows: list[dict], device: str) -> str:
    """The `REAL_2B_HEADING` section of memory_accuracy.md."""
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # bytes (Linux reports KiB)
    lines = [
        REAL_2B_HEADING,
        "",
        f"Generated by `python benchmarks/bench_memory.py --real-2b` on {device}, torch {torch.__version__}: one "
        "LoRA training step (r=32, the reference's targets, AdamW) of the published Qwen3-VL-2B architecture with "
        "random weights (`measure.build_training_model`), float32 (bf16 matrix products are slow on this CPU; the "
        "estimate counts bytes per element the same way), sdpa, gradient checkpointing, pages of 768 visual tokens "
        "and 20-token queries. Measured and predicted as in the table above.",
        "",
        "| batch | predicted MiB | measured MiB | predicted/measured | without weights & optimizer | peak at | minutes |",
        "|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['batch']} | {r['predicted']:.0f} | {r['measured']:.0f} | {r['ratio']:.3f} | "
            f"{r['variable_ratio']:.2f} | {r['phase']} | {r['seconds'] / 60:.0f} |"
        )
    inside = all(abs(r["ratio"] - 1) <= TOLERANCE for r in rows)
    lines += [
        "",
        f"{'Within' if inside else 'Outside'} the +-{TOLERANCE:.0%} goal. The process's resident memory (RSS) peaked at "
        f"{peak_rss / GIB:.1f} GiB, above the allocator's peak: on the CPU not every freed block goes back to the "
        "system (building the random weights included). The allocator's peak (measured) is what the estimate "
        "predicts, and what `torch.cuda.max_memory_allocated` reports on a GPU; plan a CPU run's RAM with margin.",
        "",
        "The GPU rows (2B at batch 8 and 16 in bf16, with sdpa and with flash-attention 2, and 64 pages in chunks "
        "of 8) are measured by `python benchmarks/bench_memory.py --gpu` into memory_accuracy_gpu.md. No GPU was "
        "available where this file was generated, so they are not measured yet.",
    ]
    return "\n".join(lines) + "\n"


def replace_section(text: str, heading: str, section: str) -> str:
    """`text` with the `## heading` section (up to the next `## ` or the end) replaced by `section`, or appended."""
    start = text.find(heading)
    if start < 0:
        return text.rstrip("\n") + "\n\n" + section
    end = text.find("\n## ", start + len(heading))
    return text[:start] + section + (text[end + 1 :] if end >= 0 else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 CPU runs instead of the full grid")
    parser.add_argument("--gpu", action="store_true", help="measure the real 2B architecture on CUDA")
    parser.add_argument(
        "--real-2b",
        action="store_true",
        help="measure the real 2B architecture on the CPU (float32, LoRA, checkpointing, 1 and 2 pages of 768 "
        "visual tokens) and write that section of memory_accuracy.md, keeping the rest",
    )
    parser.add_argument(
        "--output", type=Path, help="default: memory_accuracy.md (CPU) or memory_accuracy_gpu.md"
    )
    args = parser.parse_args()
    args.output = args.output or Path(__file__).with_name(
        "memory_accuracy_gpu.md" if args.gpu else "memory_accuracy.md"
    )
    if args.real_2b:
        device = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
        section = real_2b_section(real_2b_rows(), device)
        old = args.output.read_text() if args.output.exists() else "# Memory estimator accuracy\n"
        args.output.write_text(replace_section(old, REAL_2B_HEADING, section))
        print(section)
        return
    if args.gpu:
        if not torch.cuda.is_available():
            raise SystemExit("--gpu needs a CUDA device; none is visible")
        device = f"{torch.cuda.get_device_name()} ({torch.cuda.get_device_properties(0).total_memory / GIB:.0f} GiB)"
        rows = run(gpu_cases())
    else:
        device = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
        rows = run(cpu_cases(args.quick))
    text = markdown(rows, device)
    if args.output.exists() and not args.gpu:  # keep the real 2B's section, measured by --real-2b
        old = args.output.read_text()
        if REAL_2B_HEADING in old:
            start = old.index(REAL_2B_HEADING)
            end = old.find("\n## ", start + len(REAL_2B_HEADING))
            text = replace_section(text, REAL_2B_HEADING, old[start : end + 1 if end >= 0 else len(old)])
    args.output.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
