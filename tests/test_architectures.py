"""The published Qwen3-VL architectures, built from their configs with no download."""

import pytest
import torch

from colqwen3_lib.architectures import real_config, real_config_dict, scaled_config


@pytest.mark.parametrize(
    "size, published",
    # Parameter counts of Qwen/Qwen3-VL-{2B,4B,8B}-Instruct as the hub reports them.
    [("2b", 2_127_532_032), ("4b", 4_437_815_808), ("8b", 8_767_123_696)],
)
def test_real_architectures_match_the_published_parameter_counts(size, published):
    from transformers import Qwen3VLForConditionalGeneration

    with torch.device("meta"):
        model = Qwen3VLForConditionalGeneration(real_config(size))
    assert sum(p.numel() for p in model.parameters()) == published
    assert real_config_dict(size)["text_config"]["tie_word_embeddings"] is (size != "8b")


def test_unknown_size_is_a_clear_error():
    with pytest.raises(ValueError, match="choose one of"):
        real_config("3b")


def test_the_scaled_architecture_builds_and_keeps_the_2b_layout():
    """Shrunk for CPU measurements: the same vocabulary, head size, GQA ratio and DeepStack mergers."""
    from colqwen3_lib.model import ColQwen3

    config = scaled_config(hidden=256, intermediate=768, layers=2)
    reference = real_config("2b").text_config
    text = config.text_config
    assert (text.vocab_size, text.head_dim) == (reference.vocab_size, reference.head_dim)
    assert text.num_attention_heads // text.num_key_value_heads == 2
    assert config.vision_config.out_hidden_size == text.hidden_size == 256
    with torch.device("meta"):
        model = ColQwen3(config)
    assert len(model.language_model.layers) == 2
    assert len(model.visual.deepstack_merger_list) == len(config.vision_config.deepstack_visual_indexes)
