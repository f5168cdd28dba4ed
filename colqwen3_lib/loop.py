"""The torch trainer: the whole training loop on `accelerate`, written to be read top to bottom.

It trains exactly as the HF trainer (`hf_trainer.py`) does: the same data, loss, optimizer groups,
linear schedule with warm-up, gradient clipping, accumulation, logging, evaluation and checkpoints,
so that either can resume the other's settings and their results agree. With `grad_cache_chunk_size`,
each step's forward and backward are the gradient cache's (`grad_cache.grad_cache_step`).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from .checkpoints import load_torch_checkpoint, save_torch_checkpoint
from .config import LogHook, StepHook, TrainConfig, eval_batch_size, run_metrics
from .data import ContrastiveCollator, EpochShuffler, PairDataset
from .grad_cache import chunked_loss, grad_cache_step, sync_control
from .lora import optimizer_groups
from .losses import CollapseGuard, NonFiniteLossError, contrastive_loss
from .processor import ColQwen3Processor

logger = logging.getLogger(__name__)


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

    accelerator = Accelerator(
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        mixed_precision="bf16" if config.bf16_enabled else "no",
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
            batch_size=eval_batch_size(config, len(eval_set)),
            drop_last=True,
            collate_fn=collator,
            generator=torch.Generator().manual_seed(config.seed),
        )
    optimizer = torch.optim.AdamW(
        optimizer_groups(model, config.lr, config.head_lr), lr=config.lr, weight_decay=config.weight_decay
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
    loss_fn = config.loss_function()
    chunk = config.grad_cache_chunk_size
    no_sync = sync_control(accelerator, model) if chunk else None

    guard = CollapseGuard(config.collapse_patience, after_step=config.warmup_steps)
    step, history = 0, {"train": [], "eval": []}
    if resume is not None:
        step, history = load_torch_checkpoint(resume, accelerator, model, optimizer, scheduler)
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
                if chunk:  # every page of the batch a negative, at the memory of a chunk (grad_cache.py)
                    loss = grad_cache_step(model, batch, loss_fn, chunk, accelerator.backward, no_sync)
                else:
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
            if not math.isfinite(mean_loss):
                raise NonFiniteLossError(step, mean_loss)
            guard.update(
                step, accelerator.gather(loss_fn.spread.reshape(1)).max().item(), mean_loss, loss_fn.chance
            )
            if step % config.logging_steps == 0:
                history["train"].append({"step": step, "loss": mean_loss, "lr": scheduler.get_last_lr()[0]})
                logger.info(f"step {step}/{total_steps}  loss {mean_loss:.4f}")
                if on_log:
                    on_log(history["train"][-1])
            if eval_loader is not None and (step % config.eval_steps == 0 or step == total_steps):
                history["eval"].append(
                    {"step": step, "eval_loss": _evaluate(model, eval_loader, loss_fn, accelerator, chunk)}
                )
                logger.info(f"step {step}  eval loss {history['eval'][-1]['eval_loss']:.4f}")
                if on_log:
                    on_log(history["eval"][-1])
            if hook:
                hook(step, None)
            if step % config.save_steps == 0 and step < total_steps:
                checkpoint = save_torch_checkpoint(
                    config, accelerator, model, optimizer, scheduler, step, history
                )
                if hook:
                    hook(step, checkpoint)
            if step >= total_steps:
                break
    seconds = time.perf_counter() - start
    accelerator.wait_for_everyone()
    return run_metrics(history["train"], history["eval"], step, step - first_step, seconds)


def _evaluate(model, loader, loss_fn, accelerator, chunk: int | None = None) -> float:
    model.eval()
    with torch.no_grad():
        losses = torch.stack(
            [
                chunked_loss(model, batch, loss_fn, chunk)
                if chunk
                else contrastive_loss(model, batch, loss_fn)
                for batch in loader
            ]
        )
    model.train()
    return accelerator.reduce(losses.mean(), "mean").item()
