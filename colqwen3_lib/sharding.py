"""Sharded training with FSDP2 (`configs/fsdp.yaml`), for models that outgrow one GPU (8B full fine-tuning).

`accelerate launch --config_file configs/fsdp.yaml -m colqwen3_lib.train --trainer hf ...` shards the
weights, gradients and optimizer states of every decoder layer and vision block across the processes
(`torch.distributed.fsdp.fully_shard`, applied by accelerate). What the kit does differently under it:

- the trained model is gathered from every process before the main one saves it (`full_state_dict`);
- only the HF trainer runs sharded (`check_sharded_trainer`): the Trainer saves and resumes sharded
  optimizer states, while the torch loop's checkpoints hold one process's state;
- the gradient cache (`grad_cache.py`) works as without sharding: each chunk's backward reduce-scatters
  its gradients into the shards.

accelerate shards only on GPUs: without one, `accelerate launch` with this configuration runs plain data
parallelism on gloo (its CPU processes never become FSDP). The tests wrap the tiny model with accelerate's
own FSDP2 preparation on two gloo processes instead.
"""

from __future__ import annotations

import os

import torch

from .config import TrainConfig, is_main_process

FSDP_ENV = "ACCELERATE_USE_FSDP"  # set by `accelerate launch` with an FSDP configuration


def fsdp_requested() -> bool:
    """Whether `accelerate launch` was given an FSDP configuration."""
    return os.environ.get(FSDP_ENV, "false").lower() == "true"


def check_sharded_trainer(config: TrainConfig) -> None:
    """Refuse the torch loop under FSDP, before anything is written.

    Raises:
        ValueError: `--trainer torch` under an FSDP configuration.
    """
    if fsdp_requested() and config.trainer == "torch":
        raise ValueError(
            "--trainer torch does not run under FSDP: its checkpoints hold the main process's optimizer state only, "
            "and each process holds a shard of it. Pass --trainer hf (the Trainer saves and resumes sharded states)"
        )


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether FSDP2 has sharded the model (its parameters are DTensors)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """The whole weights of a model sharded by FSDP2, gathered on the main process's CPU, for `save_pretrained`.

    Every process must call it (the shards are gathered from all of them). Returns None on the other
    processes and for a model that is not sharded (then `save_pretrained` reads the model itself).
    """
    if not is_sharded(model):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return state if is_main_process() else None
