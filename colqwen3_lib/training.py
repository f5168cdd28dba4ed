"""Contrastive (LoRA) training of ColQwen3 on query-page pairs, with two interchangeable trainers.

- `hf`: `ColQwen3Trainer`, a `transformers.Trainer` whose `compute_loss` embeds queries and pages;
  logging, evaluation, checkpointing and resuming come from the Trainer.
- `torch`: `train_torch_loop`, a plain loop on `accelerate`, written to be read.

Both use the same pieces: `PairDataset` (rows decoded lazily, with errors that name the row),
`ContrastiveCollator` (the processor), `contrastive_loss` (embed, gather pages across processes
with gradients, `ColbertContrastiveLoss`). `train(config)` picks a trainer, writes the outputs and
turns an out-of-memory error into advice (or, with `auto_batch_size`, into a smaller batch).
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import os
import random
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Sampler

from .losses import LOSSES, ColbertContrastiveLoss, gather_with_grad
from .memory import _free_memory, is_oom_error
from .model import ColQwen3
from .processor import ColQwen3Processor
from .scoring import score_multi_vector
from .tiny import TINY

logger = logging.getLogger(__name__)

TRAINERS = ("hf", "torch")
DEFAULT_BASE_MODEL = "Qwen/Qwen3-VL-2B-Instruct"
DEFAULT_TRAIN_DATASET = "vidore/colpali_train_set"
NO_EVAL = "none"
LATEST = "latest"
REQUIRED_COLUMNS = ("query", "image")
HARD_NEGATIVE_COLUMN = "neg_image"
# LoRA on the language model's attention and MLP projections; the vision tower stays frozen.
LORA_TARGETS = r"language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
HEAD = "custom_text_proj"
CONFIG_FILE = "training_config.json"
METRICS_FILE = "metrics.json"
TORCH_STATE_FILE = (
    "training_state.json"  # the torch loop's checkpoints; the HF Trainer writes trainer_state.json
)
HF_STATE_FILE = "trainer_state.json"
CHECKPOINT_PREFIX = "checkpoint-"

# What learns the synthetic pages fastest with the 2-layer tiny checkpoint on a laptop CPU: small
# pages, a high learning rate, no gradient checkpointing (it only recomputes a 2-layer model).
TINY_DEFAULTS = dict(
    train_dataset="synthetic",
    max_visual_tokens=32,
    per_device_train_batch_size=32,
    lr=5e-3,
    num_train_epochs=1.0,
    max_steps=300,
    warmup_steps=10,
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
    base_model_path: str = DEFAULT_BASE_MODEL
    max_visual_tokens: int = 768
    lr: float = 2e-4
    head_lr: float | None = None  # learning rate of custom_text_proj; None: lr
    tau: float = 0.02
    trainer: str = "hf"
    loss: str = "ce"
    peft: bool = False
    lora_rank: int = 32
    lora_alpha: int | None = None  # None: equal to lora_rank
    lora_dropout: float = 0.1
    per_device_train_batch_size: int = 64
    per_device_eval_batch_size: int | None = None  # None: the training batch size
    gradient_accumulation_steps: int = 1
    num_train_epochs: float = 5.0
    max_steps: int = -1  # > 0 overrides num_train_epochs
    warmup_steps: int = 100
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    train_dataset: str = DEFAULT_TRAIN_DATASET
    eval_dataset: str | None = None  # None: the training set's `test` split; "none": no evaluation
    attn_implementation: str | None = None  # None: flash_attention_2 -> sdpa -> eager
    gradient_checkpointing: bool = True
    bf16: bool | None = None  # None: on when the GPU supports it
    dataloader_num_workers: int = 0
    cache_pages: bool = False  # keep processed pages in memory across epochs (small datasets only)
    num_threads: int | None = None  # CPU threads for torch; None: torch's default
    logging_steps: int = 1
    eval_steps: int = 100
    save_steps: int = 500
    save_total_limit: int = 2
    seed: int = 0
    resume_from_checkpoint: str | None = None  # a checkpoint directory, or "latest" in output_dir
    auto_batch_size: bool = False
    hard_negative_weight: float = 0.5

    def __post_init__(self):
        if self.trainer not in TRAINERS:
            raise ValueError(f"trainer={self.trainer!r} is not one of {TRAINERS}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss={self.loss!r} is not one of {LOSSES}")
        for name in (
            "per_device_train_batch_size",
            "gradient_accumulation_steps",
            "max_visual_tokens",
            "lora_rank",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.lr <= 0 or (self.head_lr is not None and self.head_lr <= 0):
            raise ValueError(f"learning rates must be positive, got lr={self.lr}, head_lr={self.head_lr}")
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            raise ValueError("set max_steps > 0 or num_train_epochs > 0: as given, there is nothing to train")


def default_config(
    output_dir: str | os.PathLike, base_model_path: str = DEFAULT_BASE_MODEL, **overrides
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


@dataclass
class TrainResult:
    """What `train` returns: the trained model (in eval mode) and where everything was written."""

    output_dir: Path
    model: torch.nn.Module
    processor: ColQwen3Processor
    config: TrainConfig
    metrics: dict = field(default_factory=dict)


class TrainingOutOfMemoryError(RuntimeError):
    """Training ran out of memory; the message says which setting to change next."""


# ---------------------------------------------------------------------------------------------- data


def _decode(value, what: str) -> Image.Image:
    """A dataset cell (undecoded `datasets.Image` dict, path, bytes or PIL image) -> a loaded PIL image."""
    try:
        if isinstance(value, Image.Image):
            image = value
        elif isinstance(value, dict) and value.get("bytes"):
            image = Image.open(io.BytesIO(value["bytes"]))
        elif isinstance(value, dict) and value.get("path"):
            image = Image.open(value["path"])
        elif isinstance(value, str | os.PathLike):
            image = Image.open(value)
        elif isinstance(value, bytes):
            image = Image.open(io.BytesIO(value))
        else:
            raise ValueError(f"got a {type(value).__name__}, not an image")
        image.load()
    except Exception as err:
        raise ValueError(f"{what}: the image could not be decoded ({err}); fix or remove that row") from err
    return image


class PairDataset(torch.utils.data.Dataset):
    """Query-page pairs of a Hugging Face dataset; pages are decoded only when a batch is collated.

    Rows whose query is None (the distractor pages of ViDoRe test sets) are skipped. A `neg_image`
    column, when present, gives each query an explicit hard negative.

    Args:
        dataset: A `datasets.Dataset` with `query` and `image` columns (and optionally `neg_image`).
        name: How error messages name it (e.g. `vidore/colpali_train_set [train]`).

    Raises:
        ValueError: a required column is missing, or no row has a query.
    """

    def __init__(self, dataset, name: str):
        from datasets import Image as ImageFeature

        missing = [c for c in REQUIRED_COLUMNS if c not in dataset.column_names]
        if missing:
            raise ValueError(
                f"{name} has no {' or '.join(repr(c) for c in missing)} column (it has {dataset.column_names}); "
                f"training needs {list(REQUIRED_COLUMNS)} (and optionally {HARD_NEGATIVE_COLUMN!r}): "
                "rename the columns or pass another --train-dataset / --eval-dataset"
            )
        self.image_columns = [c for c in ("image", HARD_NEGATIVE_COLUMN) if c in dataset.column_names]
        for column in self.image_columns:
            if isinstance(dataset.features[column], ImageFeature):
                dataset = dataset.cast_column(column, ImageFeature(decode=False))
        self.dataset, self.name = dataset, name
        self.rows = [i for i, query in enumerate(dataset["query"]) if query is not None]
        if not self.rows:
            raise ValueError(f"{name} has no row with a query; training needs query-page pairs")

    @property
    def has_hard_negatives(self) -> bool:
        return HARD_NEGATIVE_COLUMN in self.image_columns

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        row = self.rows[index]
        item = self.dataset[row]
        query = item["query"]
        if not isinstance(query, str) or not query.strip():
            raise ValueError(
                f"{self.name} row {row}: the query is {query!r}; give it some text or remove the row"
            )
        # Pages stay encoded (bytes or a path) until the collator needs them.
        return {"row": row, "source": self.name, "query": query, **{c: item[c] for c in self.image_columns}}


def load_pairs(name: str, split: str) -> PairDataset:
    """`data.load_split(name, split)` wrapped as a `PairDataset`."""
    from .data import load_split

    return PairDataset(load_split(name, split), f"{name} [{split}]")


class ContrastiveCollator:
    """Rows -> one flat batch: `query_*`, `doc_*` (and `neg_doc_*`) processor outputs.

    Flat keys let `transformers.Trainer` move the batch to the device as it does any batch.

    Args:
        processor: The ColQwen3 processor.
        cache_pages: Keep each processed page (per dataset row) in memory and reuse it in later
            epochs instead of resizing it again. Worth it for small datasets seen many times (the
            tiny run); it holds every page's pixels in memory, so leave it off for real datasets.
    """

    def __init__(self, processor: ColQwen3Processor, cache_pages: bool = False):
        self.processor, self.cache_pages = processor, cache_pages
        self._pages: dict[tuple[str, str, int], dict[str, torch.Tensor]] = {}  # (dataset, column, row) ->

    @staticmethod
    def _decode(rows: list[dict], column: str) -> list[Image.Image]:
        what = "" if column == "image" else f" ({column})"
        return [_decode(r[column], f"{r['source']} row {r['row']}{what}") for r in rows]

    def _process_pages(self, rows: list[dict], column: str) -> dict[str, torch.Tensor]:
        if not self.cache_pages:
            return dict(self.processor.process_images(self._decode(rows, column)))
        todo = [r for r in rows if (r["source"], column, r["row"]) not in self._pages]
        if todo:
            batch = self.processor.process_images(self._decode(todo, column))
            for i, r in enumerate(todo):
                n_tokens = int(batch["attention_mask"][i].sum())
                n_patches = int(batch["image_grid_thw"][i].prod())
                self._pages[r["source"], column, r["row"]] = {
                    "input_ids": batch["input_ids"][i, -n_tokens:].clone(),
                    "mm_token_type_ids": batch["mm_token_type_ids"][i, -n_tokens:].clone(),
                    "pixel_values": batch["pixel_values"][i, :n_patches].clone(),
                    "image_grid_thw": batch["image_grid_thw"][i].clone(),
                }
        pages = [self._pages[r["source"], column, r["row"]] for r in rows]
        longest = max(p["input_ids"].shape[0] for p in pages)
        pad_id = self.processor.tokenizer.pad_token_id

        def left_pad(t: torch.Tensor, value: int) -> torch.Tensor:
            return torch.nn.functional.pad(t, (longest - t.shape[0], 0), value=value)

        return {  # the same tensors process_images gives for these pages, left-padded as it pads
            "input_ids": torch.stack([left_pad(p["input_ids"], pad_id) for p in pages]),  # (batch, longest)
            "attention_mask": torch.stack([left_pad(torch.ones_like(p["input_ids"]), 0) for p in pages]),
            "mm_token_type_ids": torch.stack([left_pad(p["mm_token_type_ids"], 0) for p in pages]),
            "pixel_values": torch.nn.utils.rnn.pad_sequence(
                [p["pixel_values"] for p in pages], batch_first=True
            ),
            "image_grid_thw": torch.stack([p["image_grid_thw"] for p in pages]),  # (batch, 3)
        }

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        try:
            parts = {"query_": dict(self.processor.process_queries([r["query"] for r in rows]))}
            parts["doc_"] = self._process_pages(rows, "image")
            if HARD_NEGATIVE_COLUMN in rows[0]:
                parts["neg_doc_"] = self._process_pages(rows, HARD_NEGATIVE_COLUMN)
        except ValueError as err:
            if "could not be decoded" in str(err):  # already names the row
                raise
            raise ValueError(f"{rows[0]['source']}, batch of rows {[r['row'] for r in rows]}: {err}") from err
        return {prefix + key: value for prefix, batch in parts.items() for key, value in batch.items()}


class EpochShuffler(Sampler[int]):
    """A random order that depends only on (seed, epoch): a resumed run sees the same batches."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.n, generator=generator).tolist())


# ---------------------------------------------------------------------------------------------- model


def use_bf16() -> bool:
    """bf16 when training on a GPU that supports it."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def lora_config(config: TrainConfig):
    """The recommended LoRA: rank 32, alpha 32, dropout 0.1, gaussian init, language-model projections.

    `custom_text_proj` is trained in full and saved with the adapter (`modules_to_save`): a new head
    is randomly initialised on every load of the base model, so only a saved head reloads the same.
    """
    from peft import LoraConfig

    return LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha or config.lora_rank,
        lora_dropout=config.lora_dropout,
        init_lora_weights="gaussian",
        target_modules=LORA_TARGETS,
        modules_to_save=[HEAD],
        bias="none",
    )


def build_model(config: TrainConfig) -> tuple[torch.nn.Module, ColQwen3Processor]:
    """Load the base model and processor, enable gradient checkpointing, wrap with LoRA if asked.

    Returns:
        The model (a `PeftModel` with `config.peft`) with only the trained parameters requiring
        gradients, and the processor.
    """
    bf16 = use_bf16() if config.bf16 is None else config.bf16
    model = ColQwen3.from_pretrained(
        config.base_model_path,
        attn_implementation=config.attn_implementation,
        torch_dtype=torch.bfloat16 if bf16 else torch.float32,
    )
    processor = ColQwen3Processor.from_pretrained(
        config.base_model_path, max_num_visual_tokens=config.max_visual_tokens
    )
    if config.gradient_checkpointing:
        model.config.use_cache = False
        enable = (
            getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        )
        enable({"use_reentrant": False})
    if config.peft:
        from peft import get_peft_model

        model = get_peft_model(model, lora_config(config))
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    logger.info(f"trainable parameters: {n_train:,} of {n_all:,} ({100 * n_train / n_all:.2f}%)")
    return model, processor


def optimizer_groups(model: torch.nn.Module, config: TrainConfig) -> list[dict]:
    """The trained parameters as AdamW groups: `custom_text_proj` at `head_lr` (if set), the rest at `lr`."""
    trained = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if config.head_lr is None:
        return [{"params": [p for _, p in trained], "lr": config.lr}]
    head = [p for name, p in trained if HEAD in name]
    rest = [p for name, p in trained if HEAD not in name]
    return [{"params": rest, "lr": config.lr}, {"params": head, "lr": config.head_lr}]


def _sub_batch(inputs: dict, prefix: str) -> dict:
    return {key[len(prefix) :]: value for key, value in inputs.items() if key.startswith(prefix)}


def contrastive_loss(model: torch.nn.Module, inputs: dict, loss_fn: ColbertContrastiveLoss) -> torch.Tensor:
    """Embed a collated batch and score every query against every page of every process.

    Pages are gathered across processes with gradients, so each query has world_size * batch - 1
    in-batch negatives; its own page sits at offset rank * batch.
    """
    queries = model(**_sub_batch(inputs, "query_"))  # (batch, q_tokens, dim)
    pages = model(**_sub_batch(inputs, "doc_"))  # (batch, p_tokens, dim)
    all_pages, offset = gather_with_grad(pages)  # (world * batch, max_p_tokens, dim)
    hard_negatives = model(**_sub_batch(inputs, "neg_doc_")) if "neg_doc_input_ids" in inputs else None
    return loss_fn(queries, all_pages, offset, hard_negatives)


def loss_from_config(config: TrainConfig) -> ColbertContrastiveLoss:
    return ColbertContrastiveLoss(
        config.loss, tau=config.tau, hard_negative_weight=config.hard_negative_weight
    )


# ------------------------------------------------------------------------------------------ hf trainer

StepHook = Callable[[int, Path | None], None]  # (global step, checkpoint just written or None)
LogHook = Callable[[dict], None]  # each logged entry: {"step", "loss", "lr"} or {"step", "eval_loss"}


def _hf_trainer_class():
    from transformers import Trainer

    class ColQwen3Trainer(Trainer):
        """`transformers.Trainer` for contrastive ColQwen3 training: `compute_loss` embeds queries and pages."""

        def __init__(self, *args, loss_fn: ColbertContrastiveLoss, config: TrainConfig, **kwargs):
            super().__init__(*args, **kwargs)
            self.loss_fn, self.config = loss_fn, config
            # ColQwen3.forward takes **kwargs, which makes the Trainer expect the model to normalise the
            # loss for gradient accumulation itself; ours is a per-batch mean, so let the Trainer scale it.
            self.model_accepts_loss_kwargs = False

        def create_optimizer(self, model=None):
            """The Trainer's AdamW, or with `head_lr` set, `optimizer_groups` (the head at its own rate)."""
            if self.config.head_lr is None or self.optimizer is not None:
                return super().create_optimizer(model)
            groups = optimizer_groups(model or self.model, self.config)
            self.optimizer = torch.optim.AdamW(
                groups, lr=self.args.learning_rate, weight_decay=self.args.weight_decay
            )
            return self.optimizer

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = contrastive_loss(model, inputs, self.loss_fn)
            return (loss, None) if return_outputs else loss

        def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
            inputs = self._prepare_inputs(inputs)
            with torch.no_grad():
                loss = contrastive_loss(model, inputs, self.loss_fn)
            return loss.detach(), None, None

    return ColQwen3Trainer


def _hf_hook_callback(hook: StepHook | None, on_log: LogHook | None):
    from transformers import TrainerCallback

    class HookCallback(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if hook:
                hook(state.global_step, None)

        def on_save(self, args, state, control, **kwargs):
            if hook:
                hook(state.global_step, Path(args.output_dir) / f"{CHECKPOINT_PREFIX}{state.global_step}")

        def on_log(self, args, state, control, logs=None, **kwargs):
            if on_log and logs and ("loss" in logs or "eval_loss" in logs):
                entry = {"step": state.global_step}
                entry.update({k: logs[k] for k in ("loss", "learning_rate", "eval_loss") if k in logs})
                if "learning_rate" in entry:
                    entry["lr"] = entry.pop("learning_rate")
                on_log(entry)

    return HookCallback()


def train_hf(
    config: TrainConfig,
    model: torch.nn.Module,
    processor: ColQwen3Processor,
    train_set: PairDataset,
    eval_set: PairDataset | None,
    resume: Path | None = None,
    hook: StepHook | None = None,
    on_log: LogHook | None = None,
) -> dict:
    """Train with `ColQwen3Trainer`; returns the metrics (see `train`)."""
    from transformers import TrainingArguments

    bf16 = use_bf16() if config.bf16 is None else config.bf16
    args = TrainingArguments(
        output_dir=config.output_dir,
        per_device_train_batch_size=config.per_device_train_batch_size,
        per_device_eval_batch_size=_eval_batch_size(config, eval_set),
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        learning_rate=config.lr,
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        num_train_epochs=config.num_train_epochs,
        max_steps=config.max_steps,
        warmup_steps=config.warmup_steps,
        lr_scheduler_type="linear",
        logging_steps=config.logging_steps,
        eval_strategy="steps" if eval_set is not None else "no",
        eval_steps=config.eval_steps,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        bf16=bf16,
        seed=config.seed,
        data_seed=config.seed,
        dataloader_num_workers=config.dataloader_num_workers,
        dataloader_persistent_workers=config.dataloader_num_workers > 0,  # workers keep their page cache
        dataloader_drop_last=True,  # every process needs a full batch for the page gather
        remove_unused_columns=False,
        label_names=[],
        report_to="none",
        disable_tqdm=True,
        ddp_find_unused_parameters=False,
    )
    trainer = _hf_trainer_class()(
        model=model,
        args=args,
        data_collator=ContrastiveCollator(processor, config.cache_pages),
        train_dataset=train_set,
        eval_dataset=eval_set,
        loss_fn=loss_from_config(config),
        config=config,
        callbacks=[_hf_hook_callback(hook, on_log)] if hook or on_log else None,
    )
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    seconds = time.perf_counter() - start
    if eval_set is not None and not any(
        "eval_loss" in e and e["step"] == trainer.state.global_step for e in trainer.state.log_history
    ):
        trainer.evaluate()
    history = trainer.state.log_history
    return _metrics(
        train=[
            {"step": e["step"], "loss": e["loss"], "lr": e.get("learning_rate")}
            for e in history
            if "loss" in e
        ],
        evals=[{"step": e["step"], "eval_loss": e["eval_loss"]} for e in history if "eval_loss" in e],
        steps=trainer.state.global_step,
        steps_run=trainer.state.global_step - _checkpoint_step(resume),
        seconds=seconds,
    )


# --------------------------------------------------------------------------------------- torch loop


def train_torch_loop(
    config: TrainConfig,
    model: torch.nn.Module,
    processor: ColQwen3Processor,
    train_set: PairDataset,
    eval_set: PairDataset | None,
    resume: Path | None = None,
    hook: StepHook | None = None,
    on_log: LogHook | None = None,
) -> dict:
    """The same training as `train_hf`, as a plain loop on `accelerate`; returns the metrics."""
    from accelerate import Accelerator
    from transformers import get_scheduler

    bf16 = use_bf16() if config.bf16 is None else config.bf16
    accelerator = Accelerator(
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        mixed_precision="bf16" if bf16 else "no",
    )
    collator = ContrastiveCollator(processor, config.cache_pages)
    sampler = EpochShuffler(len(train_set), config.seed)
    loader = DataLoader(
        train_set,
        batch_size=config.per_device_train_batch_size,
        sampler=sampler,
        drop_last=True,  # every process needs a full batch for the page gather
        collate_fn=collator,
        num_workers=config.dataloader_num_workers,
        persistent_workers=config.dataloader_num_workers > 0,  # workers keep their page cache
        # Its own generator: starting an epoch then draws no number from the global one that dropout uses,
        # so a resumed run's dropout masks are those of an uninterrupted run.
        generator=torch.Generator().manual_seed(config.seed),
    )
    eval_loader = None
    if eval_set is not None:
        eval_loader = DataLoader(
            eval_set,
            batch_size=_eval_batch_size(config, eval_set),
            drop_last=True,
            collate_fn=collator,
            generator=torch.Generator().manual_seed(config.seed),
        )
    optimizer = torch.optim.AdamW(
        optimizer_groups(model, config), lr=config.lr, weight_decay=config.weight_decay
    )
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    if eval_loader is not None:
        eval_loader = accelerator.prepare(eval_loader)
    steps_per_epoch = math.ceil(len(loader) / config.gradient_accumulation_steps)
    total_steps = (
        config.max_steps if config.max_steps > 0 else math.ceil(steps_per_epoch * config.num_train_epochs)
    )
    # Stepped once per optimizer step by us (not prepared: accelerate would step it once per process).
    scheduler = get_scheduler(
        "linear", optimizer, num_warmup_steps=config.warmup_steps, num_training_steps=total_steps
    )
    loss_fn = loss_from_config(config)

    step, history = 0, {"train": [], "eval": []}
    if resume is not None:
        step, history = _load_torch_checkpoint(resume, accelerator, model, optimizer, scheduler)
    first_step = step
    start = time.perf_counter()
    model.train()
    while step < total_steps:
        loader.set_epoch(step // steps_per_epoch)
        batches = loader
        done_in_epoch = (step % steps_per_epoch) * config.gradient_accumulation_steps
        if done_in_epoch:  # resuming mid-epoch: the same order, minus the batches already seen
            batches = accelerator.skip_first_batches(loader, done_in_epoch)
        step_losses = []
        for batch in batches:
            with accelerator.accumulate(model):
                loss = contrastive_loss(model, batch, loss_fn)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
            step_losses.append(loss.detach())
            if not accelerator.sync_gradients:
                continue
            scheduler.step()
            step += 1
            mean_loss = accelerator.reduce(torch.stack(step_losses).mean(), "mean").item()
            step_losses = []
            if step % config.logging_steps == 0:
                history["train"].append({"step": step, "loss": mean_loss, "lr": scheduler.get_last_lr()[0]})
                logger.info(f"step {step}/{total_steps}  loss {mean_loss:.4f}")
                if on_log:
                    on_log(history["train"][-1])
            if eval_loader is not None and (step % config.eval_steps == 0 or step == total_steps):
                history["eval"].append(
                    {"step": step, "eval_loss": _evaluate(model, eval_loader, loss_fn, accelerator)}
                )
                logger.info(f"step {step}  eval loss {history['eval'][-1]['eval_loss']:.4f}")
                if on_log:
                    on_log(history["eval"][-1])
            if hook:
                hook(step, None)
            if step % config.save_steps == 0 and step < total_steps:
                checkpoint = _save_torch_checkpoint(
                    config, accelerator, model, optimizer, scheduler, step, history
                )
                if hook:
                    hook(step, checkpoint)
            if step >= total_steps:
                break
    seconds = time.perf_counter() - start
    accelerator.wait_for_everyone()
    return _metrics(history["train"], history["eval"], step, step - first_step, seconds)


def _evaluate(model, loader, loss_fn, accelerator) -> float:
    model.eval()
    with torch.no_grad():
        losses = torch.stack([contrastive_loss(model, batch, loss_fn) for batch in loader])
    model.train()
    return accelerator.reduce(losses.mean(), "mean").item()


def _rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_torch_checkpoint(config, accelerator, model, optimizer, scheduler, step, history) -> Path:
    """Write checkpoint-<step> atomically: a temporary folder, renamed once complete."""
    final = Path(config.output_dir) / f"{CHECKPOINT_PREFIX}{step}"
    tmp = Path(config.output_dir) / f".tmp-{CHECKPOINT_PREFIX}{step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        accelerator.unwrap_model(model).save_pretrained(tmp)  # the adapter, or the full model
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    accelerator.wait_for_everyone()
    torch.save(_rng_state(), tmp / f"rng_state_{accelerator.process_index}.pth")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state = {"global_step": step, "trainer": "torch", "log_history": history}
        (tmp / TORCH_STATE_FILE).write_text(json.dumps(state, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _rotate_checkpoints(Path(config.output_dir), config.save_total_limit)
    accelerator.wait_for_everyone()
    return final


def _load_torch_checkpoint(path: Path, accelerator, model, optimizer, scheduler) -> tuple[int, dict]:
    from safetensors.torch import load_file

    if not (path / TORCH_STATE_FILE).exists():
        raise ValueError(
            f"{path} was not written by --trainer torch (no {TORCH_STATE_FILE}); resume it with --trainer hf"
        )
    unwrapped = accelerator.unwrap_model(model)
    if (path / "adapter_model.safetensors").exists():
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(unwrapped, load_file(path / "adapter_model.safetensors"))
    elif (path / "model.safetensors.index.json").exists():
        from transformers.modeling_utils import load_sharded_checkpoint

        load_sharded_checkpoint(unwrapped, str(path), strict=False)
    else:
        unwrapped.load_state_dict(load_file(path / "model.safetensors"), strict=False)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    rng_file = path / f"rng_state_{accelerator.process_index}.pth"
    if rng_file.exists():  # dropout continues as it would have
        _set_rng_state(torch.load(rng_file, weights_only=False))
    state = json.loads((path / TORCH_STATE_FILE).read_text())
    logger.info(f"resumed from {path} at step {state['global_step']}")
    return state["global_step"], state["log_history"]


# ---------------------------------------------------------------------------------------- checkpoints


def _checkpoint_step(path: Path | None) -> int:
    match = re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", path.name) if path else None
    return int(match.group(1)) if match else 0


def checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """The complete checkpoints in `output_dir` (their state file is written last), oldest first."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [
        p
        for p in folder.iterdir()
        if re.fullmatch(rf"{CHECKPOINT_PREFIX}\d+", p.name)
        and ((p / TORCH_STATE_FILE).exists() or (p / HF_STATE_FILE).exists())
    ]
    return sorted(found, key=_checkpoint_step)


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The last complete checkpoint in `output_dir`, or None."""
    found = checkpoints(output_dir)
    return found[-1] if found else None


def _rotate_checkpoints(output_dir: Path, keep: int) -> None:
    for old in checkpoints(output_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def _resolve_resume(config: TrainConfig) -> Path | None:
    if not config.resume_from_checkpoint:
        return None
    if config.resume_from_checkpoint == LATEST:
        found = latest_checkpoint(config.output_dir)
        if found is None:
            raise ValueError(
                f"--resume-from-checkpoint latest: {config.output_dir} holds no complete checkpoint"
            )
        return found
    path = Path(config.resume_from_checkpoint)
    if not path.is_dir() or path not in checkpoints(path.parent):
        raise ValueError(
            f"{path} is not a complete checkpoint directory (checkpoint-<step> with its state file)"
        )
    return path


# ------------------------------------------------------------------------------------- orchestration


def _eval_batch_size(config: TrainConfig, eval_set: PairDataset | None) -> int:
    size = config.per_device_eval_batch_size or config.per_device_train_batch_size
    if eval_set is not None:
        size = min(size, max(1, len(eval_set) // _world_size()))
    return size


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _metrics(train: list, evals: list, steps: int, steps_run: int, seconds: float) -> dict:
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


def _check_batch_fits(config: TrainConfig, train_set: PairDataset) -> None:
    world = _world_size()
    per_step = config.per_device_train_batch_size * world
    if per_step < 2:
        raise ValueError(
            "contrastive training needs at least 2 pages per step (the other pages are the negatives); "
            "pass --per-device-train-batch-size 2 or more"
        )
    if per_step > len(train_set):
        fit = max(1, len(train_set) // world)
        raise ValueError(
            f"{train_set.name} has {len(train_set)} query-page pairs, fewer than one step's batch "
            f"({config.per_device_train_batch_size} per device x {world} processes = {per_step}); "
            f"pass --per-device-train-batch-size {fit} or less, or a larger --train-dataset"
        )


def _check_output_dir(config: TrainConfig) -> None:
    folder = Path(config.output_dir)
    if config.resume_from_checkpoint or not folder.exists() or not any(folder.iterdir()):
        return
    raise FileExistsError(
        f"--output-dir {folder} exists and is not empty; it is never overwritten. Choose a new --output-dir, "
        f"delete this one, or continue its run with --resume-from-checkpoint {LATEST}"
    )


def oom_advice(config: TrainConfig, checkpoint: Path | None = None) -> str:
    """What ran out of memory and which settings to try next, most effective first."""
    batch, accum = config.per_device_train_batch_size, config.gradient_accumulation_steps
    state = (
        f"Out of memory while training with --per-device-train-batch-size {batch} "
        f"(x{accum} gradient accumulation), --max-visual-tokens {config.max_visual_tokens}, "
        f"gradient checkpointing {'on' if config.gradient_checkpointing else 'off'}, "
        f"{'LoRA (--peft)' if config.peft else 'full fine-tuning (no --peft)'}."
    )
    tries = []
    if batch > 1:
        tries.append(
            f"--per-device-train-batch-size {batch // 2} --gradient-accumulation-steps {accum * 2} "
            "(same effective batch; or --auto-batch-size to find one)"
        )
    if not config.gradient_checkpointing:
        tries.append("drop --no-gradient-checkpointing (recompute activations instead of storing them)")
    if config.max_visual_tokens > 256:
        tries.append(
            f"--max-visual-tokens {512 if config.max_visual_tokens > 512 else config.max_visual_tokens // 2}"
        )
    if not config.peft:
        tries.append("--peft (train LoRA adapters instead of every weight)")
    where = (
        f" The last checkpoint, {checkpoint}, is intact: add --resume-from-checkpoint {checkpoint} to continue."
        if checkpoint
        else " No checkpoint was written yet."
    )
    return state + " Try, in this order: " + "; ".join(tries or ["a GPU with more memory"]) + "." + where


def _write_json(path: Path, data) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def _train_once(
    config: TrainConfig, resume: Path | None, hook: StepHook | None, on_log: LogHook | None = None
) -> TrainResult:
    from transformers import set_seed

    set_seed(config.seed)
    train_set = load_pairs(config.train_dataset, "train")
    _check_batch_fits(config, train_set)
    eval_set = None
    if config.eval_dataset != NO_EVAL:
        eval_name = config.eval_dataset or config.train_dataset
        try:
            eval_set = load_pairs(eval_name, "test")
        except ValueError as err:
            if config.eval_dataset:  # asked for explicitly: say why it cannot be used
                raise
            logger.warning(f"no evaluation: {err}")
    model, processor = build_model(config)
    run = train_hf if config.trainer == "hf" else train_torch_loop
    metrics = run(config, model, processor, train_set, eval_set, resume=resume, hook=hook, on_log=on_log)
    metrics["summary"].update(
        per_device_train_batch_size=config.per_device_train_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
    )
    if _is_main_process():
        model.save_pretrained(config.output_dir)  # the LoRA adapter, or the full model
        processor.save_pretrained(config.output_dir)
    model.eval()
    return TrainResult(Path(config.output_dir), model, processor, config, metrics)


def train(config: TrainConfig, hook: StepHook | None = None, on_log: LogHook | None = None) -> TrainResult:
    """Train ColQwen3 contrastively and write the results to `config.output_dir`.

    Writes the LoRA adapter (or the full model), the processor, `training_config.json` (the
    resolved settings) and `metrics.json` (loss per logged step, eval losses, a summary), plus
    `checkpoint-<step>` folders every `save_steps`.

    Args:
        config: The settings.
        hook: Called after every optimizer step with (step, None), and after every checkpoint with
            (step, its path); raising from it stops training (tests use it to interrupt a run).
        on_log: Called with each logged entry (`{"step", "loss", "lr"}` or `{"step", "eval_loss"}`),
            e.g. to draw a live loss curve.

    Raises:
        FileExistsError: `output_dir` is not empty and this is not a resumed run.
        ValueError: a dataset lacks a column or a readable image, or the batch does not fit the data.
        TrainingOutOfMemoryError: out of memory, with the settings to try next.
        KeyboardInterrupt: interrupted; the last checkpoint is intact and the log says how to resume.
    """
    from accelerate import PartialState

    _check_output_dir(config)
    # Without a GPU, processes started by `accelerate launch`/`torchrun` train together over gloo.
    PartialState(cpu=not torch.cuda.is_available()).wait_for_everyone()  # all have checked before any writes
    resume = _resolve_resume(config)
    started_with = latest_checkpoint(config.output_dir)
    threads = torch.get_num_threads()
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    try:
        result = _train_with_retries(config, resume, started_with, hook, on_log)
    finally:
        torch.set_num_threads(threads)
    if _is_main_process():
        _write_json(result.output_dir / METRICS_FILE, result.metrics)
    return result


def _train_with_retries(
    config: TrainConfig, resume: Path | None, started_with: Path | None, hook, on_log=None
) -> TrainResult:
    """Run `_train_once`; on out-of-memory, retry with half the batch (`auto_batch_size`) or explain."""
    while True:
        if _is_main_process():
            Path(config.output_dir).mkdir(parents=True, exist_ok=True)
            resolved = {**dataclasses.asdict(config), "world_size": _world_size()}
            resolved["bf16"] = use_bf16() if config.bf16 is None else config.bf16
            resolved["effective_batch_size"] = (
                config.per_device_train_batch_size * config.gradient_accumulation_steps * _world_size()
            )
            _write_json(Path(config.output_dir) / CONFIG_FILE, resolved)
        try:
            return _train_once(config, resume, hook, on_log)
        except KeyboardInterrupt:
            last = latest_checkpoint(config.output_dir)
            logger.error(
                "interrupted. "
                + (
                    f"The last checkpoint is {last}: continue with --resume-from-checkpoint {last}"
                    if last
                    else ""
                )
            )
            raise
        except Exception as err:
            if not is_oom_error(err):
                raise
            _free_memory()
            last = latest_checkpoint(config.output_dir)
            batch = config.per_device_train_batch_size
            if config.auto_batch_size and batch > 1 and last == started_with and resume is None:
                config = dataclasses.replace(
                    config,
                    per_device_train_batch_size=batch // 2,
                    gradient_accumulation_steps=config.gradient_accumulation_steps * 2,
                )
                logger.warning(
                    f"out of memory at per-device batch {batch}: retrying with {config.per_device_train_batch_size} "
                    f"and {config.gradient_accumulation_steps} gradient accumulation steps (same effective batch, "
                    "fewer in-batch negatives per query)"
                )
                continue
            raise TrainingOutOfMemoryError(oom_advice(config, last)) from err


# ----------------------------------------------------------------------------------- retrieval check


def retrieval_ndcg(
    model: torch.nn.Module, processor: ColQwen3Processor, dataset, k: int = 5, batch_size: int = 32
) -> float:
    """NDCG@k of a ViDoRe-style test set: each query has one relevant page, its row's `image_filename`.

    The corpus is the distinct pages of the set (rows with query None are distractor pages). A quick
    check for training; `colqwen3_lib.evaluation` runs the full benchmark.
    """
    pages, page_index, queries, relevant = [], {}, [], []
    for row in dataset:
        if row["image_filename"] not in page_index:
            page_index[row["image_filename"]] = len(pages)
            pages.append(row["image"])
        if row["query"] is not None:
            queries.append(row["query"])
            relevant.append(page_index[row["image_filename"]])
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    with torch.no_grad():
        page_embs = [
            e[e.ne(0).any(-1)]
            for start in range(0, len(pages), batch_size)
            for e in model(**processor.process_images(pages[start : start + batch_size]).to(device))
        ]
        query_embs = [
            e[e.ne(0).any(-1)]
            for start in range(0, len(queries), batch_size)
            for e in model(**processor.process_queries(queries[start : start + batch_size]).to(device))
        ]
    model.train(was_training)
    scores = score_multi_vector(query_embs, page_embs)  # (n_queries, n_pages)
    gains = []
    for i, page in enumerate(relevant):
        rank = int((scores[i] >= scores[i, page]).sum()) - 1  # a tie counts against the query
        gains.append(1 / math.log2(rank + 2) if rank < k else 0.0)
    return sum(gains) / len(gains)
