"""What the gradient cache costs: training-step time with and without it, on the tiny checkpoint, CPU.

One step is the forward and backward of a collated batch (queries and pages) and the AdamW step. Runs
alternate (plain, then each chunk size, in turn, the order reversed every other round) so that a machine
shared with other work slows them alike; the medians and their ratios to the plain step are printed.

The cache adds one forward pass without autograd per step. With full fine-tuning (backward about twice a
forward) that is about 4/3 of a plain step. With LoRA the plain backward is cheaper (frozen weights get no
gradients, and nothing in the frozen vision tower is back-propagated), so the extra forward weighs more; but the
frozen vision tower's outputs from the first pass are given back in the re-run instead of computed again, so the
extra work is one pass of the language model. Under LoRA each chunk size is also timed with the vision tower run
again, side by side, to show what that saves. With gradient checkpointing the plain backward already recomputes
the language model once, so the extra pass weighs less. Chunks smaller than the batch add per-call overhead,
large on the tiny model's default 32-token pages (its forward takes milliseconds) and small once pages carry
real work (--max-visual-tokens 256).

Measured on 2026-12-05 on a 2-core x86_64 CPU (fp32 matrix products at 230 GFLOP/s on 2 threads), 1 thread,
16 pages of 256 visual tokens, median of 9 (x: time of a plain step): LoRA x1.39 in one chunk and x1.36 in
chunks of 4 (x1.76 and x1.79 with the vision tower run again); with checkpointing x1.27 and x1.28 (x1.53, x1.57).

    COLQWEN3_CACHE=/tmp/cq python benchmarks/bench_grad_cache.py [--batch-size 32] [--chunk-sizes 32 8] \
        [--max-visual-tokens 32] [--repeats 15] [--gradient-checkpointing] [--full]
"""

from __future__ import annotations

import argparse
import statistics
import time
from unittest import mock

import torch

from colqwen3_lib import ColQwen3, ColQwen3Processor, grad_cache
from colqwen3_lib.data import ContrastiveCollator, load_pairs
from colqwen3_lib.grad_cache import grad_cache_step
from colqwen3_lib.lora import prepare_for_training
from colqwen3_lib.losses import ColbertContrastiveLoss, contrastive_loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=32, help="pages (and queries) per step (tiny: 32)")
    parser.add_argument(
        "--chunk-sizes", type=int, nargs="+", default=[32, 8], help="rows per forward pass with the cache"
    )
    parser.add_argument("--max-visual-tokens", type=int, default=32, help="visual tokens per page (tiny: 32)")
    parser.add_argument("--repeats", type=int, default=15, help="timed steps of each kind")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="as the real models train")
    parser.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (tiny: 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model = ColQwen3.from_pretrained("tiny", dtype=torch.float32)
    model = prepare_for_training(
        model, peft=not args.full, gradient_checkpointing=args.gradient_checkpointing
    )
    processor = ColQwen3Processor.from_pretrained("tiny", max_num_visual_tokens=args.max_visual_tokens)
    pairs = load_pairs("synthetic", "train")
    batch = ContrastiveCollator(processor)([pairs[i] for i in range(args.batch_size)])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    loss_fn = ColbertContrastiveLoss("ce")

    def plain() -> None:
        contrastive_loss(model, batch, loss_fn).backward()

    def cached(chunk_size: int, keep_vision: bool = True):
        def step():
            if (
                keep_vision
            ):  # under LoRA the re-run takes the frozen vision tower's outputs from the first pass
                return grad_cache_step(model, batch, loss_fn, chunk_size)
            with mock.patch.object(grad_cache, "frozen_vision_backbone", lambda model: None):
                return grad_cache_step(model, batch, loss_fn, chunk_size)

        return step

    def timed(forward_backward) -> float:
        start = time.perf_counter()
        forward_backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    runs = {"plain step": plain}
    for c in args.chunk_sizes:
        runs[f"gradient cache, chunks of {c}"] = cached(c)
        if not args.full:  # what keeping the vision tower's outputs saves: the same, running it again
            runs[f"  chunks of {c}, vision run again"] = cached(c, keep_vision=False)
    for run in runs.values():  # warm-up: allocator, kernels, optimizer states
        timed(run)
    times = {name: [] for name in runs}
    for i in range(args.repeats):
        for name, run in list(runs.items())[:: 1 if i % 2 == 0 else -1]:
            times[name].append(timed(run))
    medians = {name: statistics.median(t) for name, t in times.items()}
    mode = "full fine-tuning" if args.full else "LoRA"
    checkpointing = "with" if args.gradient_checkpointing else "without"
    print(
        f"tiny {mode}, batch {args.batch_size}, {args.max_visual_tokens} visual tokens, {checkpointing} gradient "
        f"checkpointing, {args.threads} thread(s), median of {args.repeats} alternating steps:"
    )
    for name, seconds in medians.items():
        print(f"  {name:<34} {seconds * 1000:7.1f} ms  x{seconds / medians['plain step']:.2f}")


if __name__ == "__main__":
    main()
