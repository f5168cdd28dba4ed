"""Offline stand-ins for the real Qwen3-VL checkpoints.

`make_tiny_checkpoint` writes a miniature Qwen3-VL-Instruct checkpoint in the hub's file layout
(config, safetensors saved from `Qwen3VLForConditionalGeneration`, a Qwen tokenizer with the real
special-token ids, image/video processor configs, a chat template), so that the exact code that
loads `Qwen/Qwen3-VL-2B-Instruct` can be exercised with no network.

`real_config` / `random_model` build the published 2B/4B/8B architectures with random weights,
for memory and speed measurements without a download.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

TINY = "tiny"
CACHE_ENV = "COLQWEN3_CACHE"
REAL_MODEL_IDS = {
    "2b": "Qwen/Qwen3-VL-2B-Instruct",
    "4b": "Qwen/Qwen3-VL-4B-Instruct",
    "8b": "Qwen/Qwen3-VL-8B-Instruct",
}
TINY_VERSION = 1  # bump when the tiny checkpoint's contents change, so caches rebuild

# Qwen2/Qwen3 special tokens at their real ids (vocab_size stays 151936, as in the real models).
SPECIAL_TOKENS = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<|object_ref_start|>": 151646,
    "<|object_ref_end|>": 151647,
    "<|box_start|>": 151648,
    "<|box_end|>": 151649,
    "<|quad_start|>": 151650,
    "<|quad_end|>": 151651,
    "<|vision_start|>": 151652,
    "<|vision_end|>": 151653,
    "<|vision_pad|>": 151654,
    "<|image_pad|>": 151655,
    "<|video_pad|>": 151656,
}
VOCAB_SIZE = 151936

_TOKEN_IDS = {
    "image_token_id": 151655,
    "video_token_id": 151656,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
}

# Published config values of the Qwen3-VL-Instruct checkpoints (config.json on the hub).
_ARCHITECTURES = {
    "2b": dict(
        text=dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16),
        vision=dict(depth=24, hidden_size=1024, intermediate_size=4096, deepstack_visual_indexes=[5, 11, 17]),
        tie=True,
    ),
    "4b": dict(
        text=dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32),
        vision=dict(depth=24, hidden_size=1024, intermediate_size=4096, deepstack_visual_indexes=[5, 11, 17]),
        tie=True,
    ),
    "8b": dict(
        text=dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32),
        vision=dict(depth=27, hidden_size=1152, intermediate_size=4304, deepstack_visual_indexes=[8, 16, 24]),
        tie=False,
    ),
    TINY: dict(
        text=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            rope_scaling={"mrope_interleaved": True, "mrope_section": [4, 2, 2], "rope_type": "default"},
        ),
        vision=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            deepstack_visual_indexes=[0, 1],
        ),
        tie=True,
    ),
}


def real_config_dict(size: str) -> dict:
    """The `config.json` contents of a Qwen3-VL-Instruct checkpoint (`tiny`, `2b`, `4b` or `8b`)."""
    size = size.lower()
    if size not in _ARCHITECTURES:
        raise ValueError(f"unknown model size {size!r}; choose one of {sorted(_ARCHITECTURES)}")
    arch = _ARCHITECTURES[size]
    text = {
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "head_dim": 128,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "max_position_embeddings": 262144,
        "model_type": "qwen3_vl_text",
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-06,
        "rope_scaling": {"mrope_interleaved": True, "mrope_section": [24, 20, 20], "rope_type": "default"},
        "rope_theta": 5000000,
        "tie_word_embeddings": arch["tie"],
        "use_cache": True,
        "vocab_size": VOCAB_SIZE,
        **arch["text"],
    }
    vision = {
        "hidden_act": "gelu_pytorch_tanh",
        "in_channels": 3,
        "initializer_range": 0.02,
        "model_type": "qwen3_vl",
        "num_heads": 16,
        "num_position_embeddings": 2304,
        "out_hidden_size": text["hidden_size"],
        "patch_size": 16,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        **arch["vision"],
    }
    return {
        "architectures": ["Qwen3VLForConditionalGeneration"],
        "model_type": "qwen3_vl",
        "text_config": text,
        "vision_config": vision,
        "tie_word_embeddings": arch["tie"],
        **_TOKEN_IDS,
    }


def real_config(size: str):
    """A `Qwen3VLConfig` with the published architecture of `size` (no download)."""
    from transformers import Qwen3VLConfig

    return Qwen3VLConfig(**copy.deepcopy(real_config_dict(size)))


def random_model(
    size: str, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu", dim: int = 128
):
    """A ColQwen3 with the real `size` architecture and random weights, for memory/speed measurements."""
    from .model import ColQwen3

    config = real_config(size)
    config.embedding_dim = dim
    with torch.device(device):
        model = ColQwen3(config)
    return model.to(dtype=dtype)


# ---------------------------------------------------------------- the tiny checkpoint on disk

# Words the synthetic pages and queries use; each becomes one BPE token so queries stay short.
_WORDS = (
    "which what where find show shows showing page pages document with the a an of in on and is for "
    "bar line pie chart charts table tables report reports invoice invoices slide slides graph plot "
    "red blue green orange purple teal brown pink gray grey black yellow navy colour color coloured "
    "portrait landscape wide tall square layout drawn header total totals revenue quarterly annual "
    "summary sales costs budget figure values rows columns text title describe image query"
).split()

_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "<|im_start|>{{ message['role'] }}\n"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' or 'image' in item -%}<|vision_start|><|image_pad|><|vision_end|>"
    "{%- elif item['type'] == 'video' or 'video' in item -%}<|vision_start|><|video_pad|><|vision_end|>"
    "{%- elif 'text' in item -%}{{ item['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}<|im_end|>\n"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|im_start|>assistant\n{%- endif -%}"
)

_IMAGE_PROCESSOR = {
    "size": {"longest_edge": 16777216, "shortest_edge": 65536},
    "patch_size": 16,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "processor_class": "Qwen3VLProcessor",
    "image_processor_type": "Qwen2VLImageProcessorFast",
}
_VIDEO_PROCESSOR = {
    "size": {"longest_edge": 25165824, "shortest_edge": 4096},
    "patch_size": 16,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "processor_class": "Qwen3VLProcessor",
    "video_processor_type": "Qwen3VLVideoProcessor",
}


def _byte_level_alphabet() -> list[str]:
    """The 256 printable stand-ins GPT-2/Qwen byte-level BPE uses for raw bytes."""
    from tokenizers import pre_tokenizers

    return sorted(pre_tokenizers.ByteLevel.alphabet())


def _tiny_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A small byte-level BPE: every byte, plus one token per course word (with and without a space)."""
    vocab = {ch: i for i, ch in enumerate(_byte_level_alphabet())}
    merges: list[tuple[str, str]] = []
    # Merges apply by rank, so space-prefixed chains go first: " page" -> "Ġpage", not "Ġ" + "page".
    spaced = ["Ġ" + w for w in _WORDS] + ["Ġ" + w.capitalize() for w in _WORDS]
    for piece in spaced + [w.capitalize() for w in _WORDS] + list(_WORDS):
        current = piece[0]
        for ch in piece[1:]:
            if current + ch not in vocab:
                vocab[current + ch] = len(vocab)
                merges.append((current, ch))
            current += ch
    vocab.update(SPECIAL_TOKENS)
    return vocab, merges


def _write_tokenizer(path: Path) -> None:
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

    vocab, merges = _tiny_vocab_and_merges()
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, model_max_length=262144)
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS)})
    tokenizer.save_pretrained(path)


def _write_tiny(path: Path, seed: int) -> None:
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    config_dict = real_config_dict(TINY)
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(Qwen3VLConfig(**copy.deepcopy(config_dict)))
    model.save_pretrained(path, safe_serialization=True)
    # Overwrite the config with the hub's own format (as written for the real checkpoints).
    config_dict["dtype"] = "float32"
    (path / "config.json").write_text(json.dumps(config_dict, indent=2) + "\n")
    (path / "generation_config.json").write_text(
        json.dumps(
            {"bos_token_id": 151643, "eos_token_id": [151645, 151643], "pad_token_id": 151643}, indent=2
        )
    )
    (path / "preprocessor_config.json").write_text(json.dumps(_IMAGE_PROCESSOR, indent=2) + "\n")
    (path / "video_preprocessor_config.json").write_text(json.dumps(_VIDEO_PROCESSOR, indent=2) + "\n")
    (path / "chat_template.json").write_text(json.dumps({"chat_template": _CHAT_TEMPLATE}, indent=2) + "\n")
    _write_tokenizer(path)


def make_tiny_checkpoint(path: str | os.PathLike, seed: int = 0, overwrite: bool = False) -> Path:
    """Write a miniature Qwen3-VL-Instruct checkpoint to `path`, with no network access.

    The files mirror the hub checkpoint (`config.json`, `model.safetensors` with keys
    `model.visual.*` / `model.language_model.*`, tokenizer with Qwen's special tokens, image and
    video processor configs, chat template). The same seed gives the same weights.

    Args:
        path: Directory to create. It is written atomically: a crash leaves no half checkpoint.
        seed: Seed for the random weights.
        overwrite: Replace an existing directory instead of raising.

    Returns:
        The checkpoint directory.

    Raises:
        FileExistsError: `path` exists, is not empty and `overwrite` is False.
    """
    path = Path(path)
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(f"{path} exists and is not empty; pass overwrite=True or choose another path")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        _write_tiny(tmp, seed)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def cache_dir() -> Path:
    """Where the kit keeps generated checkpoints and data (`$COLQWEN3_CACHE`, else ~/.cache/colqwen3)."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "colqwen3")


def tiny_checkpoint_path() -> Path:
    """The cached tiny checkpoint, built on first use (safe when several processes ask at once)."""
    from filelock import FileLock

    path = cache_dir() / f"tiny-qwen3-vl-v{TINY_VERSION}"
    if not (path / "model.safetensors").exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path) + ".lock"):
            if not (path / "model.safetensors").exists():
                make_tiny_checkpoint(path, overwrite=True)
    return path


def resolve_model_path(name_or_path: str | os.PathLike) -> str:
    """Map `tiny` to the offline tiny checkpoint (built on first use); pass anything else through."""
    if str(name_or_path) == TINY:
        return str(tiny_checkpoint_path())
    return str(name_or_path)
