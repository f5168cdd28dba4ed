"""Contrastive (LoRA) training of ColQwen3 on query-page pairs: `train(config)` runs it end to end.

It loads the data (`data.py`) and the model (`build_model`: base checkpoint, processor, then
`lora.prepare_for_training`), hands them to one of two interchangeable trainers, writes the results,
and turns an out-of-memory error into advice (or, with `auto_batch_size`, into a smaller batch):

- `hf`: `hf_trainer.train_hf`, a `transformers.Trainer` with a contrastive `compute_loss`;
- `torch`: `loop.train_torch_loop`, a plain loop on `accelerate`, written to be read.

Settings are a `config.TrainConfig`; checkpoints and resuming are in `checkpoints.py`; both trainers run the
gradient cache (`grad_cache.py`) when `grad_cache_chunk_size` is set; FSDP sharding is in `sharding.py`.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoints import latest_checkpoint, resolve_resume
from .config import (
    METRICS_FILE,
    NO_EVAL,
    LogHook,
    StepHook,
    TrainConfig,
    is_main_process,
    world_size,
)
from .data import PairDataset, load_pairs
from .files import write_json
from .fingerprint import adapter_files, write_adapter_files
from .hf_trainer import train_hf
from .loop import train_torch_loop
from .lora import prepare_for_training
from .losses import CollapsedTrainingError, NonFiniteLossError
from .model import HEAD, ColQwen3
from .oom import TrainingOutOfMemoryError, find_batch_size, is_oom_error, oom_advice
from .processor import ColQwen3Processor
from .runs import check_resume, prepare_output_dir, write_record
from .sharding import check_sharded_trainer, full_state_dict
from .tiny import resolve_model_path

logger = logging.getLogger(__name__)

# What torch.save says when a write fails (a full disk among the causes): its own RuntimeError, not an OSError.
TORCH_WRITE_FAILED = ("PytorchStreamWriter failed", "unexpected pos", "file write failed")


@dataclass
class TrainResult:
    """What `train` returns: the trained model (in eval mode) and where everything was written."""

    output_dir: Path
    model: torch.nn.Module
    processor: ColQwen3Processor
    config: TrainConfig
    metrics: dict = field(default_factory=dict)


def build_model(config: TrainConfig) -> tuple[torch.nn.Module, ColQwen3Processor]:
    """Load the base model and processor, then prepare the model for training (checkpointing, LoRA).

    The model is loaded straight onto this process's GPU when there is one, so that the attention
    kernel is chosen for where it runs.

    Returns:
        The model (a `PeftModel` with `config.peft`) with only the trained parameters requiring
        gradients, and the processor.
    """
    from accelerate import PartialState

    device = PartialState().device
    model = ColQwen3.from_pretrained(
        config.base_model_path,
        dim=config.dim,
        warn_new_head=False,  # a new head is what training is about to train
        attn_implementation=config.attn_implementation,
        dtype=torch.bfloat16 if config.bf16_enabled else torch.float32,
        device_map={"": device} if device.type == "cuda" else None,
    )
    processor = ColQwen3Processor.from_pretrained(
        config.base_model_path, max_num_visual_tokens=config.max_visual_tokens
    )
    head_is_new = any(k.startswith(HEAD) for k in model.loading_info["missing_keys"])
    files = adapter_files(model, head_is_new, head_in_lora=not config.head_in_full) if config.peft else None
    model = prepare_for_training(
        model,
        config.peft,
        config.gradient_checkpointing,
        config.lora_rank,
        config.lora_alpha,
        config.lora_dropout,
        config.head_in_full,
    )
    model.adapter_files = files  # written beside every adapter the run saves
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    logger.info(f"trainable parameters: {n_train:,} of {n_all:,} ({100 * n_train / n_all:.2f}%)")
    return model, processor


def _check_batch_fits(config: TrainConfig, train_set: PairDataset) -> None:
    world = world_size()
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


def _train_once(
    config: TrainConfig, resume: Path | None, hook: StepHook | None, on_log: LogHook | None = None
) -> TrainResult:
    from transformers import set_seed

    # The data and the tiny checkpoint first: building either into an empty cache must not change what the
    # seed draws (the new head, LoRA's matrices, dropout), so that a first run after install equals every later one.
    resolve_model_path(config.base_model_path)
    train_set = load_pairs(config.train_dataset, "train")
    _check_batch_fits(config, train_set)
    eval_set = None
    if config.eval_dataset != NO_EVAL:
        eval_name = config.eval_dataset or config.train_dataset
        try:  # the training set's own test split must really exist: never its training rows again
            eval_set = load_pairs(eval_name, "test", single_as_any_split=bool(config.eval_dataset))
        except ValueError as err:
            if config.eval_dataset:  # asked for explicitly: say why it cannot be used
                raise
            logger.warning(f"no evaluation loss: {err}; pass --eval-dataset to evaluate on another set")
    set_seed(config.seed)
    model, processor = build_model(config)
    run = train_hf if config.trainer == "hf" else train_torch_loop
    metrics = run(config, model, processor, train_set, eval_set, resume=resume, hook=hook, on_log=on_log)
    metrics["summary"].update(
        per_device_train_batch_size=config.per_device_train_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
    )
    state_dict = full_state_dict(model)  # under FSDP every process sends its shards; otherwise None
    if is_main_process():
        model.save_pretrained(config.output_dir, state_dict=state_dict)  # the LoRA adapter, or the full model
        processor.save_pretrained(config.output_dir)
        write_adapter_files(config.output_dir, model.adapter_files)
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

    check_sharded_trainer(config)
    prepare_output_dir(config)
    # Without a GPU, processes started by `accelerate launch`/`torchrun` train together over gloo.
    PartialState(cpu=not torch.cuda.is_available()).wait_for_everyone()  # all have checked before any writes
    resume = resolve_resume(config)
    changes = {}
    if resume is not None:
        config, changes = check_resume(config, resume)
    started_with = latest_checkpoint(config.output_dir)
    threads = torch.get_num_threads()
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    try:
        result = _train_shrinking_on_oom(config, resume, changes, started_with, hook, on_log)
    finally:
        torch.set_num_threads(threads)
    if is_main_process():
        write_json(result.output_dir / METRICS_FILE, result.metrics)
    return result


def _train_shrinking_on_oom(
    config: TrainConfig, resume: Path | None, changes: dict, started_with: Path | None, hook, on_log
) -> TrainResult:
    """`_train_once` under `oom.find_batch_size`: with `auto_batch_size`, an out-of-memory error before the
    first checkpoint retries with half the batch and twice the accumulation (the same effective batch), or
    with the gradient cache on, with half its chunk (the same batch, and so the same in-batch negatives)."""
    first_batch = config.per_device_train_batch_size
    first_chunk = config.grad_cache_chunk_size
    first_size = min(first_chunk, first_batch) if first_chunk else first_batch

    def settings(size: int) -> TrainConfig:
        if first_chunk:
            return dataclasses.replace(config, grad_cache_chunk_size=size)
        return dataclasses.replace(
            config,
            per_device_train_batch_size=size,
            gradient_accumulation_steps=config.gradient_accumulation_steps * (first_batch // size),
        )

    def attempt(size: int) -> TrainResult:
        run = settings(size)
        if is_main_process():
            write_record(run, resume, changes)
        try:
            return _train_once(run, resume, hook, on_log)
        except KeyboardInterrupt:
            last = latest_checkpoint(run.output_dir)
            if last:
                logger.error(
                    f"interrupted. The last checkpoint is {last}: continue with --resume-from-checkpoint {last}"
                )
            raise
        except NonFiniteLossError as err:
            raise NonFiniteLossError(
                err.step, err.loss, _non_finite_advice(run, err, latest_checkpoint(run.output_dir))
            ) from None
        except CollapsedTrainingError as err:
            raise CollapsedTrainingError(
                err.step, err.steps, err.spread, _collapse_advice(run, err, latest_checkpoint(run.output_dir))
            ) from None
        except OSError as err:
            if err.errno == errno.ENOSPC:
                raise OSError(errno.ENOSPC, _full_disk_message(run, "no space left on the device")) from err
            raise
        except Exception as err:
            if isinstance(err, RuntimeError) and any(sign in str(err) for sign in TORCH_WRITE_FAILED):
                detail = str(err).strip().splitlines()[-1][:120]  # torch.save's own error for a failed write
                raise OSError(
                    errno.ENOSPC,
                    _full_disk_message(run, f"writing a file failed (torch: {detail}); no space left?"),
                ) from err
            last = latest_checkpoint(run.output_dir)
            if is_oom_error(err) and last != started_with:  # it trained a while: retrying would lose that
                raise TrainingOutOfMemoryError(advice(size, last)) from err
            raise

    def advice(size: int, checkpoint: Path | None = None) -> str:
        run = settings(size)
        return oom_advice(
            run.memory_setup(),
            run.gradient_accumulation_steps,
            checkpoint=checkpoint or latest_checkpoint(config.output_dir),
        )

    smallest = 1 if config.auto_batch_size and resume is None else first_size
    what = "gradient-cache chunk size" if first_chunk else "batch size"
    _, result = find_batch_size(attempt, first_size, min_batch_size=smallest, advice=advice, what=what)
    return result


def _full_disk_message(config: TrainConfig, what: str) -> str:
    last = latest_checkpoint(config.output_dir)
    try:
        free = f"{shutil.disk_usage(config.output_dir).free / 2**30:.1f} GiB free there now"
    except OSError:
        free = "its free space unknown"
    intact = (
        f"the last checkpoint, {last}, is intact: free some space and add --resume-from-checkpoint {last}"
        if last
        else "no checkpoint was written yet"
    )
    return f"{what} while writing to {config.output_dir} ({free}); {intact}"


def _collapse_advice(config: TrainConfig, err: CollapsedTrainingError, last: Path | None) -> str:
    saved = (
        f"The last checkpoint, {last}, may predate the collapse; no final model was written."
        if last
        else "No checkpoint and no model were written."
    )
    return (
        f"Training stopped at step {err.step}: for {err.steps} steps in a row every query scored all pages of its "
        f"batch alike (largest spread {err.spread:.2g}, after the temperature {config.tau}). The embeddings have "
        "collapsed to one direction; the gradients of a page and of its negatives then cancel, so the run cannot "
        f"learn any more, and a model saved now would rank pages at random. {saved} Try a lower --lr (now "
        f"{config.lr}"
        + (f", --head-lr {config.head_lr}" if config.head_lr else "")
        + f") or more --warmup-steps "
        f"(now {config.warmup_steps}); --no-bf16 to train in float32; --loss pairwise. --collapse-patience 0 "
        "trains on regardless."
    )


def _non_finite_advice(config: TrainConfig, err: NonFiniteLossError, last: Path | None) -> str:
    where = (
        f"The last good checkpoint is {last}: resume from it with a lower learning rate (--resume-from-checkpoint {last} --lr ...)."
        if last
        else "No checkpoint was written, and no model: nothing broken was saved."
    )
    return (
        f"Training stopped: the loss is {err.loss} at step {err.step} (--lr {config.lr}"
        + (f", --head-lr {config.head_lr}" if config.head_lr else "")
        + f", --warmup-steps {config.warmup_steps}, --max-grad-norm {config.max_grad_norm}). {where} "
        "Try a lower --lr (and --head-lr) or more --warmup-steps; "
        "check the data for empty pages or queries."
        + (
            " On an H100 or H200 with PyTorch 2.11 or later, sdpa's default (cuDNN) kernel can return NaN gradients "
            "for padded batches of some lengths (pytorch/pytorch#196678): a loss that turns NaN at once, not after "
            "growing, points there; try --attn-implementation eager or flash_attention_2."
            if config.attn_implementation != "eager" and torch.cuda.is_available()
            else ""
        )
    )
