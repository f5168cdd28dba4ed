"""What an adapter needs to be reloaded exactly, written beside every adapter and checkpoint the kit saves.

- Which base weights it was trained on: a LoRA adapter only makes sense on those exact weights, and two
  checkpoints with the same `config.json` (the tiny checkpoint built with two seeds, say) are not
  interchangeable. The fingerprint is a SHA-256 of evenly spaced samples of a few named base tensors,
  rounded to bf16 so that the same checkpoint loaded in float32 or bf16 gives the same value.
- The base's `custom_text_proj` when the base checkpoint had none and LoRA adapts it (the reference
  recipe): that head was randomly initialised at the start of training, and the adapter only holds
  its low-rank update, so the kit saves the initial head and restores it before applying the adapter.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

FINGERPRINT_FILE = "base_fingerprint.json"
BASE_HEAD_FILE = "base_head.safetensors"
SAMPLES = 4096  # values taken from each tensor
# Tensors every ColQwen3 / Qwen3-VL backbone has: the token embeddings, the first decoder layer, the vision stem.
TENSORS = (
    "language_model.embed_tokens.weight",
    "language_model.layers.0.self_attn.q_proj.weight",
    "language_model.layers.0.mlp.down_proj.weight",
    "visual.patch_embed.proj.weight",
)


def base_fingerprint(model: torch.nn.Module) -> dict:
    """The fingerprint of a (not yet LoRA-wrapped) ColQwen3's base weights."""
    params = dict(model.named_parameters())
    digest = hashlib.sha256()
    for name in TENSORS:
        flat = params[name].detach().flatten()
        step = max(1, flat.numel() // SAMPLES)
        sample = flat[::step][:SAMPLES].to(torch.bfloat16).float().cpu()
        digest.update(name.encode() + sample.numpy().tobytes())
    return {"sha256": digest.hexdigest(), "tensors": list(TENSORS), "samples_per_tensor": SAMPLES}


def adapter_files(base: torch.nn.Module, head_is_new: bool, head_in_lora: bool) -> dict:
    """What to write beside the adapters of a base model about to be wrapped with LoRA (see the module docstring)."""
    files = {"fingerprint": base_fingerprint(base)}
    if head_is_new and head_in_lora:
        files["base_head"] = {
            k: v.detach().clone().contiguous() for k, v in base.custom_text_proj.state_dict().items()
        }
    return files


def write_adapter_files(folder: str | Path, files: dict | None) -> None:
    """Write `adapter_files(...)` into an adapter or checkpoint folder (nothing for full fine-tuning)."""
    if not files:
        return
    (Path(folder) / FINGERPRINT_FILE).write_text(json.dumps(files["fingerprint"], indent=2) + "\n")
    if "base_head" in files:
        from safetensors.torch import save_file

        save_file(files["base_head"], str(Path(folder) / BASE_HEAD_FILE))


def restore_base_head(adapter_dir: str | Path, model: torch.nn.Module) -> bool:
    """Load the initial head saved with an adapter into `model` (before the adapter is applied); True if there was one."""
    file = Path(adapter_dir) / BASE_HEAD_FILE
    if not file.exists():
        return False
    from safetensors.torch import load_file

    head = model.custom_text_proj
    state = load_file(str(file), device=str(head.weight.device))
    head.load_state_dict({k: v.to(head.weight.dtype) for k, v in state.items()})
    return True


def check_fingerprint(adapter_dir: str | Path, model: torch.nn.Module, model_path: str) -> None:
    """Refuse an adapter whose recorded base differs from `model`'s weights; warn when it records none.

    Raises:
        ValueError: the adapter was trained on other base weights.
    """
    file = Path(adapter_dir) / FINGERPRINT_FILE
    if not file.exists():
        logger.warning(
            f"adapter {adapter_dir} records no base-model fingerprint (saved by another tool?): the kit cannot "
            f"check that it was trained on the weights of {model_path}"
        )
        return
    recorded = json.loads(file.read_text())
    if recorded.get("sha256") != base_fingerprint(model)["sha256"]:
        raise ValueError(
            f"adapter {adapter_dir} was trained on other base weights than those of {model_path} (their fingerprints "
            f"differ; {FINGERPRINT_FILE}). Load the base checkpoint it was trained on (its adapter_config.json names it)"
        )
