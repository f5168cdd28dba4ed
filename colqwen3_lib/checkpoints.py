"""Checkpoints: finding them (`checkpoints`, `latest_checkpoint`), choosing the one to resume from, and
the torch loop's own checkpoint files (the HF Trainer writes its own in the same `checkpoint-<step>` layout).

A checkpoint is complete once its state file exists: it is written last, into a temporary folder that
is renamed into place, so a run killed mid-save never leaves a checkpoint that `latest` would pick.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path

import torch

from .config import LATEST, TrainConfig

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
TORCH_STATE_FILE = "training_state.json"  # the torch loop's; the HF Trainer writes trainer_state.json
HF_STATE_FILE = "trainer_state.json"


def checkpoint_step(path: Path | None) -> int:
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
    return sorted(found, key=checkpoint_step)


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The last complete checkpoint in `output_dir`, or None."""
    found = checkpoints(output_dir)
    return found[-1] if found else None


def rotate_checkpoints(output_dir: Path, keep: int) -> None:
    for old in checkpoints(output_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def resolve_resume(config: TrainConfig) -> Path | None:
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


def save_torch_checkpoint(config, accelerator, model, optimizer, scheduler, step, history) -> Path:
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
        rotate_checkpoints(Path(config.output_dir), config.save_total_limit)
    accelerator.wait_for_everyone()
    return final


def load_torch_checkpoint(path: Path, accelerator, model, optimizer, scheduler) -> tuple[int, dict]:
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
