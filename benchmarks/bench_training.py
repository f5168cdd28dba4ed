"""Does training learn? The tiny checkpoint on the synthetic pages, CPU only, with the tiny-run defaults.

For each loss, prints held-out NDCG@5 on the synthetic ViDoRe-style test tasks before and after
training, a summary of the loss curve, and steps per second. The course's bar: NDCG@5 from near
chance to at least 0.8 within 3 minutes of training.

    COLQWEN3_CACHE=/tmp/cq python benchmarks/bench_training.py [--loss ce pairwise] [--trainer torch] [--seed 1]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
from pathlib import Path

import torch
from transformers import set_seed

from colqwen3_lib.config import default_config
from colqwen3_lib.evaluation import evaluate_model
from colqwen3_lib.synthetic import SYNTHETIC_TASKS
from colqwen3_lib.training import build_model, train

TARGET_NDCG = 0.8
MAX_TRAIN_SECONDS = 180


def held_out_ndcg(model, processor) -> dict[str, float]:
    """NDCG@5 per synthetic test task (the kit's ViDoRe evaluation), plus their mean."""
    results = evaluate_model(model, processor, list(SYNTHETIC_TASKS), show_progress=False)
    scores = {task: result["metrics"]["ndcg_at_5"] for task, result in results.items()}
    return {**scores, "mean": statistics.mean(scores.values())}


def run(loss: str, trainer: str, output_dir: Path, **overrides) -> dict:
    config = default_config(output_dir, "tiny", loss=loss, trainer=trainer, peft=True, **overrides)
    threads = torch.get_num_threads()
    torch.set_num_threads(config.num_threads or threads)
    set_seed(config.seed)  # the same initial weights as the training run gets
    untrained, processor = build_model(config)
    before = held_out_ndcg(untrained, processor)
    torch.set_num_threads(threads)
    del untrained

    result = train(config)
    torch.set_num_threads(config.num_threads or threads)
    after = held_out_ndcg(result.model, result.processor)
    torch.set_num_threads(threads)
    losses = [entry["loss"] for entry in result.metrics["train"]]
    window = max(1, min(10, len(losses) // 4))
    summary = result.metrics["summary"]
    return {
        "loss": loss,
        "trainer": trainer,
        "ndcg@5_before": before,
        "ndcg@5_after": after,
        "loss_curve": {
            "steps": summary["global_step"],
            f"first_{window}_mean": statistics.mean(losses[:window]),
            f"last_{window}_mean": statistics.mean(losses[-window:]),
            "min": min(losses),
            "eval_loss": [(e["step"], round(e["eval_loss"], 4)) for e in result.metrics["eval"]],
        },
        "train_seconds": summary["train_seconds"],
        "steps_per_second": summary["steps_per_second"],
        "settings": {
            k: getattr(config, k)
            for k in ("per_device_train_batch_size", "max_visual_tokens", "lr", "head_lr", "tau", "max_steps")
        },
        "passed": after["mean"] >= TARGET_NDCG and summary["train_seconds"] <= MAX_TRAIN_SECONDS,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loss", nargs="+", default=["ce", "pairwise"], choices=["ce", "pairwise"])
    parser.add_argument("--trainer", default="torch", choices=["hf", "torch"])
    parser.add_argument("--max-steps", type=int, help="override the tiny default")
    parser.add_argument("--lr", type=float, help="override the tiny default")
    parser.add_argument("--head-lr", type=float, help="override the tiny default")
    parser.add_argument("--warmup-steps", type=int, help="override the tiny default")
    parser.add_argument("--seed", type=int, help="override the tiny default (0)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    overrides = {
        k: getattr(args, k)
        for k in ("max_steps", "lr", "head_lr", "warmup_steps", "seed")
        if getattr(args, k) is not None
    }
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for loss in args.loss:
            r = run(loss, args.trainer, Path(tmp) / loss, **overrides)
            results.append(r)
            curve = r["loss_curve"]
            first, last = (k for k in curve if k.startswith(("first", "last")))
            print(
                f"loss={loss:<8} trainer={args.trainer}  NDCG@5 before {r['ndcg@5_before']['mean']:.3f} -> after "
                f"{r['ndcg@5_after']['mean']:.3f}  (charts {r['ndcg@5_after']['synthetic_charts_test']:.3f}, "
                f"documents {r['ndcg@5_after']['synthetic_documents_test']:.3f})\n"
                f"    {curve['steps']} steps in {r['train_seconds']:.1f} s = {r['steps_per_second']:.2f} steps/s; "
                f"train loss {first} {curve[first]:.3f} -> {last} {curve[last]:.3f} (min {curve['min']:.3f}); "
                f"eval loss {curve['eval_loss']}\n"
                f"    settings {r['settings']}  {'PASS' if r['passed'] else 'FAIL'} "
                f"(target NDCG@5 >= {TARGET_NDCG} within {MAX_TRAIN_SECONDS} s)",
                flush=True,
            )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
