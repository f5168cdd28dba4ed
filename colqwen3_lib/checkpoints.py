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
from .files import safetensors_problem
from .fingerprint import write_adapter_files

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


def check_checkpoint(path: Path) -> dict:
    """Read a checkpoint's state file and check its weight files are whole; returns the state.

    Raises:
        ValueError: the state file is not valid JSON, or a safetensors file is shorter than its
            header says (a save cut off, a partial copy); the message names the file.
    """
    state_file = path / (TORCH_STATE_FILE if (path / TORCH_STATE_FILE).exists() else HF_STATE_FILE)
    try:
        state = json.loads(state_file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(
            f"checkpoint {path} is damaged: {state_file.name} cannot be read ({err}). {_earlier(path)}"
        ) from err
    for weights in sorted(path.glob("*.safetensors")):
        problem = safetensors_problem(weights)
        if problem:
            raise ValueError(f"checkpoint {path} is damaged: {weights.name} {problem}. {_earlier(path)}")
    return state


def _earlier(path: Path) -> str:
    older = [p for p in checkpoints(path.parent) if checkpoint_step(p) < checkpoint_step(path)]
    return (
        f"Resume from an earlier one: --resume-from-checkpoint {older[-1]}"
        if older
        else "No earlier checkpoint is left."
    )


def resolve_resume(config: TrainConfig) -> Path | None:
    """The checkpoint `config.resume_from_checkpoint` names (`latest`: the last one in `output_dir`), checked whole."""
    if not config.resume_from_checkpoint:
        return None
    if config.resume_from_checkpoint == LATEST:
        found = latest_checkpoint(config.output_dir)
        if found is None:
            raise ValueError(
                f"--resume-from-checkpoint latest: {config.output_dir} holds no complete checkpoint (the run stopped "
                "before its first save); run the same command without --resume-from-checkpoint to start it again"
            )
    else:
        found = Path(config.resume_from_checkpoint)
        if not found.is_dir() or found not in checkpoints(found.parent):
            raise ValueError(
                f"{found} is not a complete checkpoint directory (checkpoint-<step> with its state file); "
                f"the complete ones in {found.parent} are {[p.name for p in checkpoints(found.parent)]}"
            )
    check_checkpoint(found)
    return found


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
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.save_pretrained(tmp)  # the adapter, or the full model
        write_adapter_files(tmp, getattr(unwrapped, "adapter_files", None))
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


def _load_plain(file: Path):
    """`torch.load` of tensors and plain Python values only (never arbitrary pickled objects)."""
    try:
        return torch.load(file, weights_only=True)
    except Exception as err:
        raise ValueError(
            f"{file} holds something other than tensors and plain values ({type(err).__name__}), or is damaged; "
            "the kit does not unpickle objects from checkpoints. Resume from a checkpoint the kit wrote"
        ) from err


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
    # weights_only: tensors and plain values only, so that a crafted file cannot run code on resume.
    optimizer.load_state_dict(_load_plain(path / "optimizer.pt"))
    scheduler.load_state_dict(_load_plain(path / "scheduler.pt"))
    rng_file = path / f"rng_state_{accelerator.process_index}.pth"
    if rng_file.exists():  # dropout continues as it would have
        _set_rng_state(_load_plain(rng_file))
    state = json.loads((path / TORCH_STATE_FILE).read_text())
    logger.info(f"resumed from {path} at step {state['global_step']}")
    return state["global_step"], state["log_history"]
