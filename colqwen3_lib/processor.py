"""ColQwen3Processor: pages and queries -> model inputs, plus MaxSim scoring helpers."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from transformers import BatchFeature
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize
from transformers.models.qwen3_vl import Qwen3VLProcessor

from .scoring import score_multi_vector
from .tiny import resolve_model_path

logger = logging.getLogger(__name__)

QUERY_PREFIX = ""  # the reference's: colpali-engine's ColQwen3Processor leaves its prefix empty
LEGACY_QUERY_PREFIX = "Query: "  # what the kit's processors used before the prefix was saved with them
MIN_PAGE_SIDE = 32  # px: one merged 2x2 block of 16-px patches
MAX_ASPECT_RATIO = 200  # Qwen's resize refuses anything more elongated
N_QUERY_AUGMENTATION_TOKENS = 10

ImageLike = Image.Image | str | os.PathLike


def _load_page(item: ImageLike, index: int) -> Image.Image:
    """Open/convert one page to RGB, or raise a ValueError naming it."""
    if isinstance(item, str | os.PathLike):
        try:
            with Image.open(item) as opened:
                item = opened.copy()
        except (FileNotFoundError, UnidentifiedImageError, OSError) as err:
            raise ValueError(f"image {index} ({item}) could not be read as an image: {err}") from err
    if not isinstance(item, Image.Image):
        raise ValueError(f"image {index} is a {type(item).__name__}; pass PIL images or paths to image files")
    width, height = item.size
    if min(width, height) < MIN_PAGE_SIDE:
        raise ValueError(
            f"image {index} is {width}x{height} px; ColQwen3 needs at least {MIN_PAGE_SIDE}x{MIN_PAGE_SIDE} px "
            "(upscale it or drop it)"
        )
    if max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
        raise ValueError(
            f"image {index} is {width}x{height} px, an aspect ratio over {MAX_ASPECT_RATIO}:1; "
            "split it into pages or crop it"
        )
    if item.mode == "RGB":
        return item
    if item.mode.startswith(("I", "F")):  # 16/32-bit greyscale: map the 16-bit range onto 8 bits
        values = np.asarray(item, dtype=np.float32)
        values = values / 257 if values.max() > 255 else values
        item = Image.fromarray(values.clip(0, 255).astype(np.uint8))  # mode L
    if item.mode in ("RGBA", "LA", "PA") or (item.mode == "P" and "transparency" in item.info):
        # Composite transparent pages onto white, as a viewer shows them.
        rgba = item.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return item.convert("RGB")


def saved_by_kit(path: str | os.PathLike) -> bool:
    """Whether `path` holds a processor the kit saved (its prompts are data there, not the format's)."""
    config = Path(path) / "processor_config.json"
    if not config.exists():
        return False
    return "query_prefix" in json.loads(config.read_text()) or is_legacy_kit_processor(path)


def is_legacy_kit_processor(path: str | os.PathLike) -> bool:
    """A processor saved by the kit before `query_prefix` was saved: a training run's folder without the field."""
    folder = Path(path)
    config = folder / "processor_config.json"
    return (
        config.exists()
        and (folder / "training_config.json").exists()
        and "query_prefix" not in json.loads(config.read_text())
    )


class ColQwen3Processor(Qwen3VLProcessor):
    """Turns document pages and queries into ColQwen3 inputs.

    Load it like the Qwen3-VL processor; `max_num_visual_tokens` caps how many visual tokens a page
    becomes (the page is resized so that it has at most that many 32x32-px blocks).
    """

    visual_prompt_prefix: ClassVar[str] = (
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe the image.<|im_end|><|endoftext|>"
    )
    query_augmentation_token: ClassVar[str] = "<|endoftext|>"
    image_token: ClassVar[str] = "<|image_pad|>"

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        video_processor=None,
        chat_template=None,
        query_prefix: str = QUERY_PREFIX,
        **kwargs,
    ):
        # Explicit sub-processor arguments: transformers reads them from this signature (and saves
        # `query_prefix` in processor_config.json, so that a processor keeps the prompt it was trained with).
        super().__init__(image_processor, tokenizer, video_processor, chat_template=chat_template, **kwargs)
        self.tokenizer.padding_side = "left"
        self.query_prefix = query_prefix

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path, *args, max_num_visual_tokens: int | None = None, **kwargs
    ) -> ColQwen3Processor:
        """Load the processor of a Qwen3-VL or ColQwen3 checkpoint (`tiny` for the offline one).

        Args:
            pretrained_model_name_or_path: Hub id, local directory or `tiny`.
            max_num_visual_tokens: Cap on visual tokens per page (e.g. 768); None keeps the checkpoint's.
            **kwargs: Passed to `Qwen3VLProcessor.from_pretrained`.
        """
        path = resolve_model_path(pretrained_model_name_or_path)
        processor = super().from_pretrained(path, *args, **kwargs)
        if is_legacy_kit_processor(path):
            processor.query_prefix = LEGACY_QUERY_PREFIX
            logger.warning(
                f"{path} was saved by an earlier version of the kit, whose queries start with "
                f"{LEGACY_QUERY_PREFIX!r}: keeping that prefix (new runs use the reference's, {QUERY_PREFIX!r})"
            )
        elif processor.query_prefix != QUERY_PREFIX:
            logger.info(f"{path}: queries start with {processor.query_prefix!r} (saved with the processor)")
        if max_num_visual_tokens is not None:
            processor.set_max_num_visual_tokens(max_num_visual_tokens)
        return processor

    @property
    def block_size(self) -> int:
        """Side in px of the image block that becomes one visual token (patch 16 x merge 2 = 32)."""
        return self.image_processor.patch_size * self.image_processor.merge_size

    @property
    def max_num_visual_tokens(self) -> int:
        return self.image_processor.size["longest_edge"] // self.block_size**2

    def set_max_num_visual_tokens(self, n: int) -> None:
        """Cap pages at `n` visual tokens: max_pixels = n * (patch_size * merge_size)^2."""
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"max_num_visual_tokens must be a positive integer, got {n!r}")
        max_pixels = n * self.block_size**2
        size = dict(self.image_processor.size)
        size["longest_edge"] = max_pixels
        size["shortest_edge"] = min(size["shortest_edge"], max_pixels)
        self.image_processor.size = size
        if getattr(self.image_processor, "max_pixels", None) is not None:  # transformers 4.x reads these too
            self.image_processor.max_pixels = max_pixels
            self.image_processor.min_pixels = size["shortest_edge"]

    def process_images(
        self,
        images: Sequence[ImageLike],
        device: str | torch.device | None = None,
        pad_pixel_values: bool = True,
    ) -> BatchFeature:
        """Pages (PIL images of any mode, or paths) -> a padded batch for `ColQwen3`.

        Args:
            images: The pages.
            device: Where to resize and normalise the images (transformers' fast image processor runs on
                a GPU too): with a CUDA device only the pixels' bytes leave the CPU, and the batch's pixel
                values are made where the model reads them. Default: the CPU.
            pad_pixel_values: Pad `pixel_values` per image to (batch, max_patches, patch_dim), so that a
                batch splits cleanly across chunks and processes (training does); the model un-pads them
                using `image_grid_thw`. False keeps them as the image processor gives them, (patches,
                patch_dim), which the model reads as they are: no copy, for embedding.

        Raises:
            ValueError: empty list, unreadable file, page under 32 px or over 200:1.
        """
        if len(images) == 0:
            raise ValueError("process_images got an empty list; pass at least one page")
        pages = [_load_page(image, i) for i, image in enumerate(images)]
        on_device = (
            {"device": str(device)} if device is not None and torch.device(device).type != "cpu" else {}
        )
        batch = self(
            text=[self.visual_prompt_prefix] * len(pages),
            images=pages,
            padding="longest",
            return_tensors="pt",
            **on_device,
        )
        if pad_pixel_values:
            n_patches = batch["image_grid_thw"].prod(dim=1)  # (batch,)
            per_image = torch.split(batch["pixel_values"], n_patches.tolist())
            batch["pixel_values"] = torch.nn.utils.rnn.pad_sequence(
                per_image, batch_first=True
            )  # (batch, max_patches, dim)
        return batch

    def process_texts(self, texts: Sequence[str]) -> BatchFeature:
        """Tokenise texts as they are, left-padded to the longest."""
        return self(text=list(texts), padding="longest", return_tensors="pt")

    def process_queries(self, queries: Sequence[str]) -> BatchFeature:
        """Queries -> model inputs: `query_prefix` + text + 10 `<|endoftext|>` augmentation tokens.

        `query_prefix` is empty by default, as in colpali-engine's ColQwen3 (the reference recipe); a
        processor saved with another prefix keeps it.

        Raises:
            ValueError: empty list, or an item that is not a non-empty string.
        """
        if len(queries) == 0:
            raise ValueError("process_queries got an empty list; pass at least one query")
        for i, query in enumerate(queries):
            if not isinstance(query, str):
                raise ValueError(f"query {i} is a {type(query).__name__}, not a string; pass text queries")
            if not query.strip():
                raise ValueError(f"query {i} is empty; remove it or give it some text")
        suffix = self.query_augmentation_token * N_QUERY_AUGMENTATION_TOKENS
        return self.process_texts([self.query_prefix + query + suffix for query in queries])

    def score(self, qs, ps, batch_size: int = 128, device: str | torch.device | None = None) -> torch.Tensor:
        """MaxSim scores of query embeddings against page embeddings: (n_queries, n_pages), float32."""
        return score_multi_vector(qs, ps, batch_size=batch_size, device=device)

    def get_n_patches(self, image_size: tuple[int, int], spatial_merge_size: int) -> tuple[int, int]:
        """Grid of visual tokens (n_x, n_y) that a page of PIL size (width, height) becomes."""
        width, height = image_size
        size = self.image_processor.size
        height, width = smart_resize(
            height,
            width,
            factor=self.block_size,
            min_pixels=size["shortest_edge"],
            max_pixels=size["longest_edge"],
        )
        patch = self.image_processor.patch_size
        return width // patch // spatial_merge_size, height // patch // spatial_merge_size

    def get_image_mask(self, batch: BatchFeature) -> torch.Tensor:
        """Boolean (batch, seq_len) mask of the image tokens in a processed batch of pages."""
        return batch["input_ids"] == self.image_token_id
