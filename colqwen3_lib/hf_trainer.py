"""The HF trainer: `ColQwen3Trainer`, a `transformers.Trainer` whose `compute_loss` embeds queries and pages.

With `grad_cache_chunk_size` set, its `training_step` runs the gradient cache (`grad_cache.py`) instead of
one forward and backward of the whole batch, with the Trainer's loss scaling for gradient accumulation.

Logging, evaluation, checkpointing and resuming come from the Trainer; `train_hf` sets its arguments
from a `TrainConfig` and returns the same metrics as the torch loop.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .checkpoints import CHECKPOINT_PREFIX, checkpoint_step
from .config import LogHook, StepHook, TrainConfig, eval_batch_size, run_metrics
from .data import ContrastiveCollator, PairDataset
from .fingerprint import write_adapter_files
from .grad_cache import chunked_loss, grad_cache_step, sync_control
from .lora import optimizer_groups
from .losses import ColbertContrastiveLoss, CollapseGuard, NonFiniteLossError, contrastive_loss
from .processor import ColQwen3Processor


def _hf_trainer_class():
    from transformers import Trainer, TrainerCallback

    class ColQwen3Trainer(Trainer):
        """`transformers.Trainer` for contrastive ColQwen3 training: `compute_loss` embeds queries and pages."""

        def __init__(self, *args, loss_fn: ColbertContrastiveLoss, config: TrainConfig, **kwargs):
            super().__init__(*args, **kwargs)
            self.loss_fn, self.config = loss_fn, config
            self.guard = CollapseGuard(config.collapse_patience, after_step=config.warmup_steps)
            self.add_callback(_GuardCallback(self))
            self.spread: torch.Tensor | None = None  # of the last training batch, the largest over processes
            self.last_loss: torch.Tensor | None = None  # of the last training batch, the mean over processes
            # ColQwen3.forward takes **kwargs, which makes the Trainer expect the model to normalise the
            # loss for gradient accumulation itself; ours is a per-batch mean, so let the Trainer scale it.
            self.model_accepts_loss_kwargs = False

        def create_optimizer(self, model=None):
            """The Trainer's AdamW, or with `head_lr` set, `optimizer_groups` (the head at its own rate)."""
            if self.config.head_lr is None or self.optimizer is not None:
                return super().create_optimizer(model)
            groups = optimizer_groups(model or self.model, self.config.lr, self.config.head_lr)
            self.optimizer = torch.optim.AdamW(
                groups, lr=self.args.learning_rate, weight_decay=self.args.weight_decay
            )
            return self.optimizer

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = contrastive_loss(model, inputs, self.loss_fn)
            self._check_finite(loss, model)
            return (loss, None) if return_outputs else loss

        def _check_finite(self, loss, model):
            if model.training and not torch.isfinite(loss):
                raise NonFiniteLossError(self.state.global_step + 1, loss.item())
            if model.training:
                self.spread = self.accelerator.gather(self.loss_fn.spread.reshape(1)).max()
                self.last_loss = self.accelerator.reduce(loss.detach(), "mean")

        def check_learning(self) -> None:
            """After an optimizer step: stop if the in-batch scores have tied for too long (`CollapseGuard`)."""
            if self.spread is not None:
                self.guard.update(
                    self.state.global_step, self.spread.item(), self.last_loss.item(), self.loss_fn.chance
                )

        def training_step(self, model, inputs, num_items_in_batch=None):
            """The Trainer's step, or with `grad_cache_chunk_size` the gradient cache's (`grad_cache.grad_cache_step`).

            As in the Trainer's own step: the loss is divided by the accumulation steps of this window
            (our loss is a per-batch mean, `model_accepts_loss_kwargs` is off), every backward goes through
            `accelerator.backward`, and the returned loss is that scaled loss, detached, for logging.
            """
            chunk = self.config.grad_cache_chunk_size
            if not chunk:
                return super().training_step(model, inputs, num_items_in_batch)
            model.train()
            if callable(getattr(self.optimizer, "train", None)):
                self.optimizer.train()
            inputs = self._prepare_inputs(inputs)
            scale = 1 / self.current_gradient_accumulation_steps

            def backward(surrogate: torch.Tensor) -> None:
                self.accelerator.backward(surrogate * scale)

            with self.compute_loss_context_manager():
                loss = grad_cache_step(
                    model,
                    inputs,
                    self.loss_fn,
                    chunk,
                    backward=backward,
                    no_sync=sync_control(self.accelerator, model),
                    check_loss=lambda loss: self._check_finite(loss, model),
                )
            return loss * scale

        def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
            inputs = self._prepare_inputs(inputs)
            chunk = self.config.grad_cache_chunk_size
            with torch.no_grad():
                if chunk:
                    loss = chunked_loss(model, inputs, self.loss_fn, chunk)
                else:
                    loss = contrastive_loss(model, inputs, self.loss_fn)
            return loss.detach(), None, None

    class _GuardCallback(TrainerCallback):
        """After each optimizer step, the trainer's `check_learning`."""

        def __init__(self, trainer):
            self.trainer = trainer

        def on_step_end(self, args, state, control, **kwargs):
            self.trainer.check_learning()

    return ColQwen3Trainer


def _hf_hook_callback(hook: StepHook | None, on_log: LogHook | None):
    from transformers import TrainerCallback

    class HookCallback(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if hook:
                hook(state.global_step, None)

        def on_save(self, args, state, control, model=None, **kwargs):
            checkpoint = Path(args.output_dir) / f"{CHECKPOINT_PREFIX}{state.global_step}"
            if checkpoint.is_dir():
                write_adapter_files(checkpoint, getattr(model, "adapter_files", None))
            if hook:
                hook(state.global_step, checkpoint)

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

    args = TrainingArguments(
        output_dir=config.output_dir,
        per_device_train_batch_size=config.per_device_train_batch_size,
        per_device_eval_batch_size=eval_batch_size(config, len(eval_set) if eval_set is not None else None),
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
        bf16=config.bf16_enabled,
        seed=config.seed,
        data_seed=config.seed,
        dataloader_num_workers=config.dataloader_num_workers,
        dataloader_persistent_workers=config.dataloader_num_workers > 0,  # workers keep their page cache
        dataloader_drop_last=True,  # every process needs a full batch for the page gather
        dataloader_pin_memory=torch.cuda.is_available(),  # pinned memory only speeds copies to a GPU
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
        loss_fn=config.loss_function(),
        config=config,
        callbacks=[_hf_hook_callback(hook, on_log)],
    )
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    seconds = time.perf_counter() - start
    if eval_set is not None and not any(
        "eval_loss" in e and e["step"] == trainer.state.global_step for e in trainer.state.log_history
    ):
        trainer.evaluate()
    history = trainer.state.log_history
    return run_metrics(
        train=[
            {"step": e["step"], "loss": e["loss"], "lr": e.get("learning_rate")}
            for e in history
            if "loss" in e
        ],
        evals=[{"step": e["step"], "eval_loss": e["eval_loss"]} for e in history if "eval_loss" in e],
        steps=trainer.state.global_step,
        steps_run=trainer.state.global_step - checkpoint_step(resume),
        seconds=seconds,
    )
