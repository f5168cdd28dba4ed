"""Memory estimator vs measurement: predicted and measured peak memory of real ColQwen3 training steps.

On the CPU it measures the tiny checkpoint's architecture and a scaled-down 2B (hidden 512, 4 layers,
vision 256 x 4 blocks, the real vocabulary) over a grid of batch sizes and visual-token caps, with
and without LoRA and gradient checkpointing; with `--gpu` it measures the real 2B architecture (random
weights) with `torch.cuda.max_memory_allocated`. Writes a markdown table
(benchmarks/memory_accuracy.md, or memory_accuracy_gpu.md with --gpu) and prints it.

    python benchmarks/bench_memory.py            # CPU grid, ~10 min on 2 cores
    python benchmarks/bench_memory.py --quick    # 4 CPU runs, ~1 min
    python benchmarks/bench_memory.py --gpu      # real 2B on the CUDA device
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

from colqwen3_lib.architectures import real_config, scaled_config
from colqwen3_lib.measure import measure_training_step
from colqwen3_lib.memory import GIB, TrainingSetup, estimate_memory
from colqwen3_lib.reference import RECOMMENDED_BATCHES

MIB = 2**20
TOLERANCE = 0.10
MODES = [(True, False), (True, True), (False, False), (False, True)]  # (lora, gradient checkpointing)
CPU_GRID = [(2, 64), (4, 128), (8, 256)]  # (batch size, max visual tokens)


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
    return cases


def gpu_cases():
    cases = []
    for lora, ckpt, batch, tokens in [
        (True, True, 8, 768),
        (True, True, 16, 768),
        (True, False, 4, 512),
        (False, True, 4, 768),
    ]:
        attn = "flash_attention_2" if _has_flash_attn() else "sdpa"
        setup = TrainingSetup(
            model_size="2b", dtype="bfloat16", lora=lora, gradient_checkpointing=ckpt, batch_size=batch,
            max_visual_tokens=tokens, attn_implementation=attn, device="cuda",
        )  # fmt: skip
        cases.append(("2b", None, setup))
    return cases


def _has_flash_attn() -> bool:
    import importlib.util

    return importlib.util.find_spec("flash_attn") is not None


def run(cases) -> list[dict]:
    rows = []
    for name, config, setup in cases:
        start = time.perf_counter()
        measured = measure_training_step(setup, config=config)
        estimate = estimate_memory(setup, config=config)
        parts = {k: v for k, v in estimate.breakdown().items() if k != "total"}
        fixed = estimate.weights + estimate.trainable
        row = dict(
            model=name,
            mode=("LoRA" if setup.lora else "full") + (" +ckpt" if setup.gradient_checkpointing else ""),
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
        )
        rows.append(row)
        print(
            f"{row['model']:<10} {row['mode']:<11} {row['attn']:<17} {row['dtype']:<8} b={row['batch']:<3} "
            f"v={row['tokens']:<4} predicted {row['predicted']:8.0f} MiB measured {row['measured']:8.0f} MiB "
            f"ratio {row['ratio']:.2f} ({row['seconds']:.0f} s)",
            flush=True,
        )
    return rows


def markdown(rows: list[dict], device: str) -> str:
    lines = [
        "# Memory estimator accuracy",
        "",
        f"Generated by `python benchmarks/bench_memory.py` on {device}, torch {torch.__version__}. "
        "Peak memory of the second of two real training steps (queries then pages forward, "
        "`ColbertContrastiveLoss`, backward, AdamW step), random weights. Measured: on the CPU, the bytes "
        "resident before the step plus the CPU allocator's peak during it (profiler memory events); "
        "on CUDA, `torch.cuda.max_memory_allocated`. The model is prepared by `colqwen3_lib.lora.prepare_for_training`, "
        "the LoRA training itself uses (adapters on the language model's projections, the head trained in full). "
        "Predicted: `colqwen3_lib.memory.estimate_memory`.",
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
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 CPU runs instead of the full grid")
    parser.add_argument("--gpu", action="store_true", help="measure the real 2B architecture on CUDA")
    parser.add_argument(
        "--output", type=Path, help="default: memory_accuracy.md (CPU) or memory_accuracy_gpu.md"
    )
    args = parser.parse_args()
    args.output = args.output or Path(__file__).with_name(
        "memory_accuracy_gpu.md" if args.gpu else "memory_accuracy.md"
    )
    if args.gpu:
        if not torch.cuda.is_available():
            raise SystemExit("--gpu needs a CUDA device; none is visible")
        device = f"{torch.cuda.get_device_name()} ({torch.cuda.get_device_properties(0).total_memory / GIB:.0f} GiB)"
        rows = run(gpu_cases())
    else:
        device = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
        rows = run(cpu_cases(args.quick))
    text = markdown(rows, device)
    args.output.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
