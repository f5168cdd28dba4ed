"""Train ColQwen3: `python -m colqwen3_lib.train --output-dir runs/x [--peft] ...` (also under `accelerate launch`).

The arguments and defaults are those of the reference `train_colqwen3_model.py`; run with `-h` for
the full list. With `--base-model-path tiny`, the defaults marked "tiny:" apply instead, so that
`python -m colqwen3_lib.train --output-dir runs/tiny --base-model-path tiny --peft` trains on the
offline synthetic pages in a few CPU minutes.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys

from .config import LATEST, NO_EVAL, TINY_DEFAULTS, TINY_PAIRWISE_DEFAULTS, TrainConfig, default_config
from .losses import CollapsedTrainingError, NonFiniteLossError
from .model import ATTENTION_IMPLEMENTATIONS
from .oom import TrainingOutOfMemoryError
from .reference import BASE_MODEL, PAIRWISE_TEMPERATURE, TAU, TRAIN_DATASET
from .training import train

logger = logging.getLogger(__name__)

_REFERENCE = {f.name: f.default for f in TrainConfig.__dataclass_fields__.values()}


def _default(name: str) -> str:
    """`(default: X; tiny: Y)` for the help text."""
    text = f"default: {_REFERENCE[name]}"
    if name in TINY_DEFAULTS:
        text += f"; tiny: {TINY_DEFAULTS[name]}"
    if name in TINY_PAIRWISE_DEFAULTS:
        text += f"; tiny with --loss pairwise: {TINY_PAIRWISE_DEFAULTS[name]}"
    return f"({text})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m colqwen3_lib.train",
        description="Contrastive (LoRA) training of ColQwen3 on query-page pairs. Writes the adapter (or full "
        "model), the processor, training_config.json and metrics.json to --output-dir, with checkpoints on the way.",
    )
    add = parser.add_argument
    add(
        "--output-dir",
        required=True,
        help="where to write the model, checkpoints and metrics; must be new or empty",
    )
    add(
        "--base-model-path",
        default=BASE_MODEL,
        help=f"Qwen3-VL(-Instruct) or ColQwen3 checkpoint: hub id, local path, or `tiny` for the offline test checkpoint (default: {BASE_MODEL})",
    )
    add(
        "--max-visual-tokens",
        type=int,
        help=f"cap on visual tokens per page; lower it (512) on OOM {_default('max_visual_tokens')}",
    )
    add("--lr", type=float, help=f"peak learning rate, linear warmup then decay {_default('lr')}")
    add(
        "--head-lr",
        type=float,
        help=f"learning rate of the new projection head custom_text_proj; unset: --lr {_default('head_lr')}",
    )
    add(
        "--tau",
        type=float,
        help="temperature of --loss ce: its scores (divided by the query's length) are divided by it (default: "
        f"{TAU}). As in the reference script, --loss pairwise does not use it: see --pairwise-tau",
    )
    add(
        "--pairwise-tau",
        type=float,
        help=f"temperature of --loss pairwise (default: {PAIRWISE_TEMPERATURE}, the reference script's, on raw "
        "summed MaxSim scores; tiny with --loss pairwise: "
        f"{TINY_PAIRWISE_DEFAULTS['tau']} on scores divided by the query's length)",
    )
    add(
        "--trainer",
        choices=["hf", "torch"],
        help=f"hf: transformers.Trainer; torch: plain accelerate loop {_default('trainer')}",
    )
    add(
        "--loss",
        choices=["ce", "pairwise"],
        help=f"ce: InfoNCE over in-batch negatives; pairwise: softplus(hardest negative - positive), more stable {_default('loss')}",
    )
    add(
        "--peft",
        action="store_true",
        default=None,
        help="LoRA fine-tuning as the reference: rank 32, alpha 32, dropout 0.1, on the language model's projections and "
        "the custom_text_proj head; without it, every weight is trained",
    )
    add(
        "--head-in-full",
        action="store_true",
        default=None,
        help="with --peft, train the custom_text_proj head in full and save it with the adapter (modules_to_save) "
        f"instead of adapting it with LoRA (the reference's way) {_default('head_in_full')}",
    )
    add(
        "--normalize-scores",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="divide MaxSim scores by the query's length before the temperature; unset: on for ce, off for pairwise "
        "(the reference's)",
    )
    add(
        "--dim",
        type=int,
        help="size of the embeddings (the head's output) when the base checkpoint has no head: 128 (the reference "
        "README's), or 320 to train checkpoints colpali-engine's ColQwen3 loads; unset: the base's head size, else 128",
    )
    add("--lora-rank", type=int, help=f"LoRA rank; alpha follows it {_default('lora_rank')}")
    add(
        "--per-device-train-batch-size",
        type=int,
        help=f"pages (and queries) per device per step; every other page in the step is a negative {_default('per_device_train_batch_size')}",
    )
    add(
        "--gradient-accumulation-steps",
        type=int,
        help=f"steps whose gradients are summed before an update (negatives stay per step) {_default('gradient_accumulation_steps')}",
    )
    add(
        "--grad-cache-chunk-size",
        type=int,
        help="gradient cache: embed queries and pages N at a time without keeping activations, compute the loss over "
        "the whole batch (every page a negative), then re-run each chunk to back-propagate it. The same gradient as "
        "the whole batch at once, at the memory of N rows, for about one more forward pass; unset: off "
        "(try 8-16 for a 64-page batch that does not fit)",
    )
    add("--num-train-epochs", type=float, help=f"passes over the training set {_default('num_train_epochs')}")
    add(
        "--max-steps",
        type=int,
        help=f"optimizer steps; > 0 overrides --num-train-epochs {_default('max_steps')}",
    )
    add("--warmup-steps", type=int, help=f"linear learning-rate warmup {_default('warmup_steps')}")
    add(
        "--train-dataset",
        help=f"hub id, local dataset directory, or `synthetic` for the offline synthetic pages; needs `query` and `image` columns, optional `neg_image` hard negatives (default: {TRAIN_DATASET}; tiny: synthetic)",
    )
    add(
        "--eval-dataset",
        help=f"dataset whose `test` split gives the eval loss; `{NO_EVAL}` to skip (default: the training set's test split)",
    )
    add(
        "--attn-implementation",
        choices=ATTENTION_IMPLEMENTATIONS,
        help="attention kernel (default: flash_attention_2 when installed on a GPU, else sdpa)",
    )
    add(
        "--no-gradient-checkpointing",
        dest="gradient_checkpointing",
        action="store_false",
        default=None,
        help="store activations instead of recomputing them: faster, more memory (default: checkpointing on; tiny: off)",
    )
    add(
        "--dataloader-num-workers",
        type=int,
        help=f"processes that decode and process pages while the model trains {_default('dataloader_num_workers')}",
    )
    add(
        "--cache-pages",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="keep processed pages in memory across epochs; for small datasets seen many times (default: off; tiny: on)",
    )
    add(
        "--num-threads",
        type=int,
        help="CPU threads for torch (default: torch's choice; tiny: 1, its matrices are too small to split)",
    )
    add("--logging-steps", type=int, help=f"log the loss every N steps {_default('logging_steps')}")
    add("--eval-steps", type=int, help=f"eval loss every N steps {_default('eval_steps')}")
    add("--save-steps", type=int, help=f"checkpoint every N steps {_default('save_steps')}")
    add("--save-total-limit", type=int, help=f"checkpoints kept {_default('save_total_limit')}")
    add("--seed", type=int, help=f"random seed (model init, data order, dropout) {_default('seed')}")
    add(
        "--resume-from-checkpoint",
        help=f"continue a run from a checkpoint directory, or `{LATEST}` for the last one in --output-dir",
    )
    add(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="train in bfloat16 (weights and autocast); --no-bf16 trains in float32 (default: bf16 on a GPU that "
        "supports it, else float32)",
    )
    add(
        "--collapse-patience",
        type=int,
        help="stop when every query's in-batch scores have been equal for N optimizer steps in a row (the embeddings "
        f"collapsed: nothing more can be learnt); 0 never stops {_default('collapse_patience')}",
    )
    add(
        "--auto-batch-size",
        action="store_true",
        default=None,
        help="on out-of-memory, halve the per-device batch and double gradient accumulation (same effective batch), then "
        "retry; with --grad-cache-chunk-size, halve the chunk instead (the same batch and in-batch negatives)",
    )
    return parser


def config_from_args(argv: list[str] | None = None) -> TrainConfig:
    """Parse the command line into a `TrainConfig`: only the options given override the defaults.

    `--tau` is the `ce` loss's temperature and `--pairwise-tau` the `pairwise` loss's, so that the reference
    README's `--tau 0.02 --loss pairwise` trains what the reference script trains (it ignores `--tau` there);
    `TrainConfig.tau` holds the temperature of the loss chosen.
    """
    args = vars(build_parser().parse_args(argv))
    base = args.pop("base_model_path")
    output_dir = args.pop("output_dir")
    ce_tau, pairwise_tau = args.pop("tau"), args.pop("pairwise_tau")
    if pairwise_tau is not None and not (math.isfinite(pairwise_tau) and pairwise_tau > 0):
        raise ValueError(f"--pairwise-tau must be a finite number above 0, got {pairwise_tau}")
    if args.get("loss") == "pairwise":
        args["tau"] = pairwise_tau
        if ce_tau is not None:
            logger.info(
                "--tau %s is the ce loss's temperature: --loss pairwise does not use it, as in the reference "
                "script (--pairwise-tau sets its own)",
                ce_tau,
            )
    else:
        args["tau"] = ce_tau
        if pairwise_tau is not None:
            logger.info(
                "--pairwise-tau %s applies to --loss pairwise only; this run's loss is ce", pairwise_tau
            )
    return default_config(output_dir, base, **{k: v for k, v in args.items() if v is not None})


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = config_from_args(argv)
        result = train(config)
    except KeyboardInterrupt:
        return 130  # train() has logged where the last checkpoint is
    except (
        TrainingOutOfMemoryError,
        NonFiniteLossError,
        CollapsedTrainingError,
        FileExistsError,
        ValueError,
        OSError,
    ) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    summary = result.metrics["summary"]
    print(
        f"trained {summary['global_step']} steps ({summary['steps_per_second']} steps/s), final loss "
        f"{summary['final_loss']}, eval loss {summary['final_eval_loss']}; wrote {result.output_dir}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
