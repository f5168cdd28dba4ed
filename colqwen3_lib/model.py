"""ColQwen3: a Qwen3-VL backbone whose last hidden states are projected to multi-vector embeddings."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig
from transformers.models.qwen3_vl import Qwen3VLConfig, Qwen3VLModel

from .tiny import resolve_model_path

logger = logging.getLogger(__name__)

DEFAULT_DIM = 128
HEAD = "custom_text_proj"
# A Qwen3-VL-Instruct checkpoint stores the backbone under `model.`; ColQwen3 holds it at the top level.
INSTRUCT_KEY_MAPPING = {r"^model\.visual": "visual", r"^model\.language_model": "language_model"}
FLASH_ATTN_HINT = (
    'install it with `pip install flash-attn --no-build-isolation`, or pass attn_implementation="sdpa" '
    '(or "eager") to silence this'
)


def resolve_attn_implementation(requested: str | None, device: str | torch.device | None = None) -> str:
    """Pick the attention kernel: flash_attention_2 -> sdpa -> eager, logging which and why.

    Args:
        requested: What the caller asked for (`flash_attention_2`, `sdpa`, `eager`, or None for the
            best available).
        device: Where the model will run; defaults to CUDA when available, else CPU.

    Returns:
        The implementation to pass to transformers.

    Raises:
        ValueError: `requested` is not one of the three names.
    """
    choices = ("flash_attention_2", "sdpa", "eager")
    if requested is not None and requested not in choices:
        raise ValueError(f"attn_implementation={requested!r} is not one of {choices}")
    on_cuda = torch.device(device).type == "cuda" if device is not None else torch.cuda.is_available()
    if requested in (None, "flash_attention_2"):
        if not on_cuda:
            reason = "flash_attention_2 needs a CUDA GPU and none is in use"
        elif importlib.util.find_spec("flash_attn") is None:
            reason = f"the flash-attn package is not installed ({FLASH_ATTN_HINT})"
        elif torch.cuda.get_device_capability(device) < (8, 0):
            reason = "flash-attn 2 needs an Ampere or newer GPU (compute capability 8.0+)"
        else:
            logger.info("attention: flash_attention_2 (requested or best available)")
            return "flash_attention_2"
        (logger.warning if requested else logger.info)(f"attention: using sdpa because {reason}")
        return "sdpa"
    if requested == "sdpa" and not hasattr(F, "scaled_dot_product_attention"):
        logger.warning("attention: using eager because this torch has no scaled_dot_product_attention")
        return "eager"
    logger.info(f"attention: {requested} (requested)")
    return requested


def _dim_in_checkpoint(path: str) -> int | None:
    """The output dim of a saved `custom_text_proj`, read from a local safetensors header (or None)."""
    from safetensors import safe_open

    folder = Path(path)
    index = folder / "model.safetensors.index.json"
    if index.exists():
        shard = json.loads(index.read_text())["weight_map"].get(f"{HEAD}.weight")
        files = [folder / shard] if shard else []
    else:
        files = [folder / "model.safetensors"]
    for file in files:
        if file.exists():
            with safe_open(str(file), "pt") as f:
                if f"{HEAD}.weight" in f.keys():
                    return f.get_slice(f"{HEAD}.weight").get_shape()[0]
    return None


class ColQwen3(Qwen3VLModel):
    """Qwen3-VL backbone + a linear head to `dim`-dimensional, L2-normalised token embeddings.

    Call it with the output of `ColQwen3Processor.process_images` or `.process_queries`; it returns
    a (batch, seq_len, dim) tensor, zero on padding tokens.

    Args:
        config: A `Qwen3VLConfig`. Its `embedding_dim` attribute (default 128) sets the head size.
        mask_non_image_embeddings: Keep only the image-token embeddings of pages (zeros elsewhere).
    """

    def __init__(self, config: Qwen3VLConfig, mask_non_image_embeddings: bool = False):
        super().__init__(config)
        self.dim = int(getattr(config, "embedding_dim", DEFAULT_DIM))
        config.embedding_dim = self.dim
        self.custom_text_proj = nn.Linear(config.text_config.hidden_size, self.dim)
        self.mask_non_image_embeddings = mask_non_image_embeddings
        self.post_init()

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *model_args,
        dim: int | None = None,
        mask_non_image_embeddings: bool = False,
        attn_implementation: str | None = None,
        **kwargs,
    ) -> ColQwen3:
        """Load a ColQwen3, or a Qwen3-VL(-Instruct) checkpoint with a fresh projection head.

        Every backbone weight must come from the checkpoint: a missing one raises instead of
        leaving a silently random backbone. `custom_text_proj` is the only tensor that may be
        newly initialised, and a warning says so.

        Args:
            pretrained_model_name_or_path: Hub id, local directory, or `tiny` for the offline checkpoint.
            dim: Embedding size. Default: the checkpoint's (`embedding_dim` in its config, or the
                shape of its saved head), else 128.
            mask_non_image_embeddings: See the class docstring.
            attn_implementation: `flash_attention_2`, `sdpa` or `eager`; flash-attn falls back to
                sdpa with one warning when it cannot run.
            **kwargs: Passed to `transformers.PreTrainedModel.from_pretrained` (`torch_dtype`/`dtype`,
                `device_map`, `revision`, ...).

        Raises:
            RuntimeError: The checkpoint lacks backbone weights, or its head has another shape.
        """
        path = resolve_model_path(pretrained_model_name_or_path)
        if "torch_dtype" in kwargs and "dtype" not in kwargs:
            kwargs["dtype"] = kwargs.pop("torch_dtype")
        config = kwargs.pop("config", None)
        if config is None:
            config_kwargs = {
                k: kwargs[k] for k in ("revision", "token", "cache_dir", "local_files_only") if k in kwargs
            }
            config = AutoConfig.from_pretrained(path, **config_kwargs)
        if dim is None:
            dim = getattr(config, "embedding_dim", None) or (os.path.isdir(path) and _dim_in_checkpoint(path))
        config.embedding_dim = int(dim or DEFAULT_DIM)
        kwargs.setdefault("key_mapping", INSTRUCT_KEY_MAPPING)
        device = kwargs.get("device_map")
        device = device if isinstance(device, (str, torch.device)) and device != "auto" else None
        model, info = super().from_pretrained(
            path,
            *model_args,
            config=config,
            attn_implementation=resolve_attn_implementation(attn_implementation, device),
            output_loading_info=True,
            **kwargs,
        )
        missing = [k for k in info["missing_keys"] if not k.startswith(HEAD)]
        if missing:
            raise RuntimeError(
                f"{path} is missing {len(missing)} backbone weights (e.g. {missing[:3]}); loading it would give a "
                "randomly initialised backbone. Point to a Qwen3-VL(-Instruct) or ColQwen3 checkpoint."
            )
        if info.get("mismatched_keys"):
            raise RuntimeError(
                f"{path} has weights of another shape: {info['mismatched_keys'][:3]}. If the saved head has "
                "another size, pass dim=<that size>."
            )
        if any(k.startswith(HEAD) for k in info["missing_keys"]):
            logger.warning(
                f"Loaded the Qwen3-VL backbone from {path}; {HEAD} (hidden {config.text_config.hidden_size} -> "
                f"{model.dim}) is newly initialised: train it (e.g. with LoRA) before using the embeddings."
            )
        model.loading_info = info
        model.mask_non_image_embeddings = mask_non_image_embeddings
        return model

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """Embed a processed batch of pages or queries: (batch, seq_len, dim), zero on padding."""
        if pixel_values is not None and pixel_values.dim() == 3:
            # The processor pads pixel_values per image; the backbone wants them concatenated.
            n_patches = image_grid_thw.prod(dim=1)  # (batch,)
            pixel_values = torch.cat([pv[:n] for pv, n in zip(pixel_values, n_patches.tolist())])
        for key in ("use_cache", "return_dict", "output_hidden_states", "labels"):
            kwargs.pop(key, None)
        hidden = (
            super()
            .forward(
                input_ids=input_ids,
                attention_mask=attention_mask,
                pixel_values=pixel_values,
                image_grid_thw=image_grid_thw,
                use_cache=False,
                return_dict=True,
                **kwargs,
            )
            .last_hidden_state
        )  # (batch, seq_len, hidden)
        proj = self.custom_text_proj(hidden)  # (batch, seq_len, dim)
        proj = F.normalize(proj, dim=-1) * attention_mask.unsqueeze(-1).to(proj.dtype)
        if pixel_values is not None and self.mask_non_image_embeddings:
            proj = proj * (input_ids == self.config.image_token_id).unsqueeze(-1).to(proj.dtype)
        return proj

    @property
    def patch_size(self) -> int:
        return self.config.vision_config.patch_size

    @property
    def spatial_merge_size(self) -> int:
        return self.config.vision_config.spatial_merge_size
