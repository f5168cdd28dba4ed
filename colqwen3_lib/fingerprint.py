"""Which base weights an adapter was trained on: a fingerprint written with every adapter the kit saves.

A LoRA adapter only makes sense on the exact base weights it was trained on; two checkpoints with the
same `config.json` (the tiny checkpoint built with two seeds, say) are not interchangeable. The
fingerprint is a SHA-256 of evenly spaced samples of a few named base tensors, rounded to bf16 so
that the same checkpoint loaded in float32 or bf16 gives the same value.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

FINGERPRINT_FILE = "base_fingerprint.json"
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


def write_fingerprint(folder: str | Path, fingerprint: dict) -> None:
    (Path(folder) / FINGERPRINT_FILE).write_text(json.dumps(fingerprint, indent=2) + "\n")


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
