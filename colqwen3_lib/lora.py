"""What fine-tuning trains: the LoRA configuration, the model prepared for training, the optimizer groups.

The training run and the memory tools (estimate and measurement) both use `prepare_for_training`, so
what is measured is what is trained.

- LoRA (`peft`), as the reference script builds it: rank-r adapters on the language model's attention
  and MLP projections and on the `custom_text_proj` head; the vision tower stays frozen. A head that
  the base checkpoint lacks is randomly initialised on every load, so the kit saves that initial head
  beside the adapter (`fingerprint.py`) and restores it before applying the adapter.
- With `head_in_full` (the kit's opt-in): the head is trained in full and saved with the adapter
  (`modules_to_save`), LoRA adapts the projections only.
- Full fine-tuning (no `peft`): every weight trains.
"""

from __future__ import annotations

import warnings

import torch

from .model import HEAD
from .reference import LORA_DROPOUT, LORA_RANK

LORA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# colpali-engine's train_colqwen3_model.py, verbatim: the projections of every module under a "model"
# that is not visual (the language model's decoder layers), and the head.
REFERENCE_TARGETS = r"(.*(model)(?!.*visual).*(down_proj|gate_proj|up_proj|k_proj|q_proj|v_proj|o_proj).*$|.*(custom_text_proj).*$)"
# The same projections without the head, for `head_in_full`.
PROJECTION_TARGETS = r"language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"


def lora_config(
    rank: int = LORA_RANK, alpha: int | None = None, dropout: float = LORA_DROPOUT, head_in_full: bool = False
):
    """The reference LoRA: rank 32, alpha = rank, dropout 0.1, gaussian init, no bias, on the language model's
    projections and the head; with `head_in_full`, the head is trained in full (`modules_to_save`) instead."""
    from peft import LoraConfig

    return LoraConfig(
        r=rank,
        lora_alpha=alpha or rank,
        lora_dropout=dropout,
        init_lora_weights="gaussian",
        target_modules=PROJECTION_TARGETS if head_in_full else REFERENCE_TARGETS,
        modules_to_save=[HEAD] if head_in_full else None,
        bias="none",
    )


def prepare_for_training(
    model: torch.nn.Module,
    peft: bool,
    gradient_checkpointing: bool,
    lora_rank: int = LORA_RANK,
    lora_alpha: int | None = None,
    lora_dropout: float = LORA_DROPOUT,
    head_in_full: bool = False,
) -> torch.nn.Module:
    """Enable gradient checkpointing (non-reentrant) and wrap with LoRA if asked; returns the model to train.

    Only the trained parameters require gradients afterwards.
    """
    if gradient_checkpointing:
        model.config.use_cache = False
        # transformers >= 5 names it activation checkpointing; 4.x only has the older name.
        enable = (
            getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        )
        enable({"use_reentrant": False})
    if peft:
        from peft import get_peft_model

        with warnings.catch_warnings():  # peft reads transformers' deprecated `is_gradient_checkpointing`
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            model = get_peft_model(model, lora_config(lora_rank, lora_alpha, lora_dropout, head_in_full))
    return model.train()


def optimizer_groups(model: torch.nn.Module, lr: float, head_lr: float | None = None) -> list[dict]:
    """The trained parameters as AdamW groups: `custom_text_proj` at `head_lr` (if set), the rest at `lr`."""
    trained = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if head_lr is None:
        return [{"params": [p for _, p in trained], "lr": lr}]
    head = [p for name, p in trained if HEAD in name]
    rest = [p for name, p in trained if HEAD not in name]
    return [{"params": rest, "lr": lr}, {"params": head, "lr": head_lr}]
