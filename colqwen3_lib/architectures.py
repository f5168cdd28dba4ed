"""The published Qwen3-VL architectures (2B, 4B, 8B), the tiny one, and Qwen's special tokens.

`real_config(size)` builds the `Qwen3VLConfig` of a published checkpoint with no download, for memory
and speed measurements on random weights (`model.random_model`); `scaled_config` shrinks the 2B one
for quick CPU measurements; the tiny checkpoint (`tiny.py`) is written from the `tiny` entry.
"""

from __future__ import annotations

import copy

TINY = "tiny"  # the sentinel that selects the offline stand-ins
MODEL_SIZES = (TINY, "2b", "4b", "8b")

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

TOKEN_IDS = {
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
        **TOKEN_IDS,
    }


def real_config(size: str):
    """A `Qwen3VLConfig` with the published architecture of `size` (no download)."""
    from transformers import Qwen3VLConfig

    return Qwen3VLConfig(**copy.deepcopy(real_config_dict(size)))


def scaled_config(
    hidden: int = 512,
    intermediate: int = 1536,
    layers: int = 4,
    vision_hidden: int = 256,
    vision_depth: int = 4,
):
    """The 2B architecture shrunk (same vocabulary, head size, GQA ratio, DeepStack layout) for CPU measurements."""
    config = real_config("2b")
    text, vision = config.text_config, config.vision_config
    text.hidden_size, text.intermediate_size, text.num_hidden_layers = hidden, intermediate, layers
    text.num_attention_heads = hidden // text.head_dim
    text.num_key_value_heads = max(1, text.num_attention_heads // 2)
    vision.hidden_size, vision.intermediate_size, vision.depth = (
        vision_hidden,
        4 * vision_hidden,
        vision_depth,
    )
    vision.num_heads = vision_hidden // 64
    vision.deepstack_visual_indexes = list(range(min(3, vision_depth)))
    vision.out_hidden_size = hidden
    return config
