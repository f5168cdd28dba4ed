"""Training settings: `TrainConfig` (the reference recipe's defaults), the tiny presets, and what a run
resolves at start (bf16, processes, the evaluation batch), plus the shape of what it reports.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .architectures import TINY
from .losses import LOSSES, ColbertContrastiveLoss
from .memory import TrainingSetup
from .model import ATTENTION_IMPLEMENTATIONS, resolve_attn_implementation, use_bf16
from .processor import ColQwen3Processor
from .reference import (
    BASE_MODEL,
    BATCH_SIZE,
    EMBEDDING_DIM,
    EVAL_BATCH_SIZE,
    EVAL_STEPS,
    LOGGING_STEPS,
    LORA_DROPOUT,
    LORA_RANK,
    LR,
    MAX_VISUAL_TOKENS,
    MODEL_IDS,
    NUM_TRAIN_EPOCHS,
    PAIRWISE_TEMPERATURE,
    SAVE_STEPS,
    SAVE_TOTAL_LIMIT,
    TAU,
    TRAIN_DATASET,
    WARMUP_STEPS,
)

TRAINERS = ("hf", "torch")
NO_EVAL = "none"
LATEST = "latest"
CONFIG_FILE = "training_config.json"
METRICS_FILE = "metrics.json"

# Validation of the numeric settings: the smallest value of each count, the range of each real number.
_AT_LEAST = {
    "per_device_train_batch_size": 1,
    "per_device_eval_batch_size": 1,
    "gradient_accumulation_steps": 1,
    "grad_cache_chunk_size": 1,
    "max_visual_tokens": 1,
    "lora_rank": 1,
    "lora_alpha": 1,
    "dim": 1,
    "warmup_steps": 0,
    "logging_steps": 1,
    "eval_steps": 1,
    "save_steps": 1,
    "save_total_limit": 0,
    "dataloader_num_workers": 0,
    "num_threads": 1,
    "collapse_patience": 0,
}
_FINITE = {  # name: (low, high); names in _POSITIVE must be above low, the others at least low
    "lr": (0.0, 1.0),
    "head_lr": (0.0, 1.0),
    "tau": (0.0, math.inf),
    "weight_decay": (0.0, math.inf),
    "max_grad_norm": (0.0, math.inf),
    "lora_dropout": (0.0, 0.99),
    "num_train_epochs": (-math.inf, math.inf),
    "hard_negative_weight": (0.0, 1.0),
}
_POSITIVE = {"lr", "head_lr", "tau", "max_grad_norm"}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _range_text(low: float, high: float, positive: bool) -> str:
    parts = [f"above {low:g}" if positive else f"at least {low:g}"] if low > -math.inf else []
    parts += [f"at most {high:g}"] if high < math.inf else []
    return "a finite number" + (" " + " and ".join(parts) if parts else "")


StepHook = Callable[[int, Path | None], None]  # (global step, checkpoint just written or None)
LogHook = Callable[[dict], None]  # each logged entry: {"step", "loss", "lr"} or {"step", "eval_loss"}

# What learns the synthetic pages fastest with the 2-layer tiny checkpoint on a laptop CPU: small
# pages, a high learning rate, no gradient checkpointing (it only recomputes a 2-layer model).
TINY_DEFAULTS = dict(
    train_dataset="synthetic",
    max_visual_tokens=32,
    per_device_train_batch_size=32,
    lr=5e-3,
    num_train_epochs=1.0,
    max_steps=300,
    # A random head at lr 5e-3 can fall into a trap in its first steps: its random scores start far from each
    # other (loss above chance), and shrinking them all together is the quickest way down, until no page can be
    # told from another. With 10 warm-up steps 1 seed in 16 stayed at chance on the CPU (on an H200, one run did
    # and one learnt late); with 40, all 16 and the GPU runs learnt (benchmarks/gpu/2026-12-04-run2.md).
    warmup_steps=40,
    logging_steps=1,
    eval_steps=50,
    save_steps=50,
    gradient_checkpointing=False,
    cache_pages=True,
    num_threads=1,  # its matrices are too small to split across threads: one thread is fastest
)
# The pairwise loss on the tiny checkpoint. Its hardest negative is, at first, just the page whose random
# features happen to score highest; among 31 pages that noise beats the positive by a wide margin, and the
# quickest way to shrink it is to send every embedding to one direction (all scores tie, loss log 2). With 7
# in-batch negatives the noise is smaller, and a head that learns 10x faster than the LoRA layers finds
# the real signal (colour, kind) before the backbone collapses. More, smaller steps: the same time as ce.
TINY_PAIRWISE_DEFAULTS = dict(
    tau=0.02,  # normalised scores at tau 0.02: the settings measured to learn here (docs/training.md)
    normalize_scores=True,
    head_in_full=True,  # a LoRA-adapted random head collapses here (loss log 2 from step ~300); a full one learns
    per_device_train_batch_size=8,
    lr=7e-4,
    head_lr=7e-3,
    max_steps=1800,
    eval_steps=300,
    save_steps=300,
)


@dataclass
class TrainConfig:
    """Every training setting, with the reference ColQwen3 recipe's defaults (see `python -m colqwen3_lib.train -h`)."""

    output_dir: str
    base_model_path: str = BASE_MODEL
    max_visual_tokens: int = MAX_VISUAL_TOKENS
    lr: float = LR
    head_lr: float | None = None  # learning rate of custom_text_proj; None: lr
    tau: float | None = None  # None: 0.02 for ce; 1.0 for pairwise (the reference's)
    normalize_scores: bool | None = None  # None: True for ce; False for pairwise (the reference's)
    trainer: str = "hf"
    loss: str = "ce"
    peft: bool = False
    lora_rank: int = LORA_RANK
    lora_alpha: int | None = None  # None: equal to lora_rank
    lora_dropout: float = LORA_DROPOUT
    head_in_full: bool = False  # the kit's opt-in: train custom_text_proj in full, not as a LoRA target
    # Head size for a base without one (None: 128; 320: colpali-engine's); a base with a head keeps its size.
    dim: int | None = None
    per_device_train_batch_size: int = BATCH_SIZE
    per_device_eval_batch_size: int | None = EVAL_BATCH_SIZE  # None: the training batch size
    gradient_accumulation_steps: int = 1
    # Gradient cache (grad_cache.py): embed in chunks of this many rows, keep every in-batch negative; None: off.
    grad_cache_chunk_size: int | None = None
    num_train_epochs: float = NUM_TRAIN_EPOCHS
    max_steps: int = -1  # > 0 overrides num_train_epochs
    warmup_steps: int = WARMUP_STEPS
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    train_dataset: str = TRAIN_DATASET
    eval_dataset: str | None = None  # None: the training set's `test` split; "none": no evaluation
    attn_implementation: str | None = None  # None: flash_attention_2 -> sdpa -> eager
    gradient_checkpointing: bool = True
    bf16: bool | None = None  # None: on when the GPU supports it
    dataloader_num_workers: int = 0
    cache_pages: bool = False  # keep processed pages in memory across epochs (small datasets only)
    num_threads: int | None = None  # CPU threads for torch; None: torch's default
    logging_steps: int = LOGGING_STEPS
    eval_steps: int = EVAL_STEPS
    save_steps: int = SAVE_STEPS
    save_total_limit: int = SAVE_TOTAL_LIMIT
    seed: int = 0
    resume_from_checkpoint: str | None = None  # a checkpoint directory, or "latest" in output_dir
    auto_batch_size: bool = False
    hard_negative_weight: float = 0.5
    # Stop when every query's in-batch scores have tied for this many optimizer steps in a row (the embeddings
    # collapsed: `losses.CollapseGuard`); 0: never.
    collapse_patience: int = 20

    def __post_init__(self):
        if self.trainer not in TRAINERS:
            raise ValueError(f"trainer={self.trainer!r} is not one of {TRAINERS}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss={self.loss!r} is not one of {LOSSES}")
        # The reference script: ColbertLoss(temperature=tau, normalize_scores=True) for ce,
        # ColbertPairwiseCELoss(normalize_scores=False) at its default temperature for pairwise.
        if self.tau is None:
            self.tau = TAU if self.loss == "ce" else PAIRWISE_TEMPERATURE
        if self.normalize_scores is None:
            self.normalize_scores = self.loss == "ce"
        if self.attn_implementation is not None and self.attn_implementation not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(
                f"attn_implementation={self.attn_implementation!r} is not one of {ATTENTION_IMPLEMENTATIONS}"
            )
        for name, low in _AT_LEAST.items():
            value = getattr(self, name)
            if value is not None and value < low:
                raise ValueError(f"{_flag(name)} must be at least {low}, got {value}")
        for name, (low, high) in _FINITE.items():
            value = getattr(self, name)
            if value is None:
                continue
            positive = name in _POSITIVE
            if not math.isfinite(value) or value < low or (positive and value == low) or value > high:
                raise ValueError(f"{_flag(name)} must be {_range_text(low, high, positive)}, got {value}")
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            raise ValueError(
                "--max-steps and --num-train-epochs are both 0 or less: nothing to train; set one of them above 0"
            )

    @property
    def bf16_enabled(self) -> bool:
        """`bf16` as given, or (None) on when the GPU supports it."""
        return use_bf16() if self.bf16 is None else self.bf16

    def loss_function(self) -> ColbertContrastiveLoss:
        return ColbertContrastiveLoss(
            self.loss,
            tau=self.tau,
            normalize_scores=self.normalize_scores,
            hard_negative_weight=self.hard_negative_weight,
        )

    @property
    def effective_batch_size(self) -> int:
        return self.per_device_train_batch_size * self.gradient_accumulation_steps * world_size()

    def memory_setup(self) -> TrainingSetup:
        """This run as a `memory.TrainingSetup` (its model size is None when the base model is not a published one)."""
        sizes = {TINY: TINY, **{model_id: size for size, model_id in MODEL_IDS.items()}}
        device = "cuda" if torch.cuda.is_available() else "cpu"  # where training runs
        return TrainingSetup(
            model_size=sizes.get(self.base_model_path),
            dtype="bfloat16" if self.bf16_enabled else "float32",
            lora=self.peft,
            lora_rank=self.lora_rank,
            head_in_full=self.head_in_full,
            embedding_dim=self.dim or EMBEDDING_DIM,
            batch_size=self.per_device_train_batch_size,
            max_visual_tokens=self.max_visual_tokens,
            gradient_checkpointing=self.gradient_checkpointing,
            grad_cache_chunk_size=self.grad_cache_chunk_size,
            world_size=world_size(),
            attn_implementation=resolve_attn_implementation(self.attn_implementation, device),
            device=device,
        )


def default_config(
    output_dir: str | os.PathLike, base_model_path: str = BASE_MODEL, **overrides
) -> TrainConfig:
    """A `TrainConfig` with the reference defaults, or the tiny run's for the tiny checkpoint, then `overrides`.

    The tiny run's are `TINY_DEFAULTS`, and with `loss="pairwise"` also `TINY_PAIRWISE_DEFAULTS`.
    """
    preset = {}
    if base_model_path == TINY:
        preset = dict(TINY_DEFAULTS)
        if overrides.get("loss") == "pairwise":
            preset.update(TINY_PAIRWISE_DEFAULTS)
    return TrainConfig(output_dir=str(output_dir), base_model_path=base_model_path, **{**preset, **overrides})


def trained_page_size(base_model_path: str, adapter: str | os.PathLike | None = None) -> int:
    """The visual-token cap to embed pages at with a trained model: the adapter's (its saved processor keeps it),
    else the one training uses for this base (the tiny run's, or the reference's), so that pages are not embedded
    at another size than the model learnt."""
    if adapter is not None:
        return ColQwen3Processor.from_pretrained(adapter).max_num_visual_tokens
    return default_config("-", base_model_path).max_visual_tokens


def world_size() -> int:
    """Processes training together (set by `accelerate launch` / `torchrun`)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def eval_batch_size(config: TrainConfig, n_eval_rows: int | None) -> int:
    """The per-device evaluation batch, no larger than each process's share of the evaluation rows."""
    size = config.per_device_eval_batch_size or config.per_device_train_batch_size
    if n_eval_rows is not None:
        size = min(size, max(1, n_eval_rows // world_size()))
    return size


def run_metrics(train: list, evals: list, steps: int, steps_run: int, seconds: float) -> dict:
    """What both trainers report, as written to `metrics.json`: the logged losses and a summary."""
    return {
        "train": train,
        "eval": evals,
        "summary": {
            "global_step": steps,
            "steps_this_run": steps_run,
            "train_seconds": round(seconds, 3),
            "steps_per_second": round(steps_run / seconds, 4) if seconds > 0 else None,
            "final_loss": train[-1]["loss"] if train else None,
            "final_eval_loss": evals[-1]["eval_loss"] if evals else None,
        },
    }
