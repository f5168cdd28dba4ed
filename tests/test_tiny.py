"""The offline tiny checkpoint: the hub's file layout, Qwen's special tokens, reproducible weights."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoTokenizer

from colqwen3_lib import make_tiny_checkpoint, resolve_model_path
from colqwen3_lib.architectures import SPECIAL_TOKENS

HUB_FILES = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "chat_template.json",
}


def test_tiny_checkpoint_has_the_hub_layout(tiny_path):
    assert HUB_FILES <= {p.name for p in tiny_path.iterdir()}
    config = json.loads((tiny_path / "config.json").read_text())
    assert config["model_type"] == "qwen3_vl"
    assert config["architectures"] == ["Qwen3VLForConditionalGeneration"]
    assert (config["image_token_id"], config["video_token_id"]) == (151655, 151656)
    assert (config["vision_start_token_id"], config["vision_end_token_id"]) == (151652, 151653)
    vision, text = config["vision_config"], config["text_config"]
    assert (vision["patch_size"], vision["spatial_merge_size"], vision["temporal_patch_size"]) == (16, 2, 2)
    assert len(vision["deepstack_visual_indexes"]) >= 1
    assert text["rope_scaling"]["mrope_interleaved"] is True
    assert sum(text["rope_scaling"]["mrope_section"]) == text["head_dim"] // 2
    assert text["vocab_size"] == 151936


def test_tiny_weights_use_the_instruct_key_names(tiny_path):
    keys = load_file(tiny_path / "model.safetensors").keys()
    assert all(k.startswith(("model.visual.", "model.language_model.", "lm_head.")) for k in keys)
    assert any(k.startswith("model.visual.deepstack_merger_list.") for k in keys)
    assert "model.language_model.embed_tokens.weight" in keys


def test_tiny_is_small(model):
    n_params = sum(p.numel() for p in model.parameters())
    n_embedding = model.language_model.embed_tokens.weight.numel()
    # The real vocabulary (151,936 ids, needed for the real special-token ids) dominates the count.
    assert n_params - n_embedding < 500_000
    assert n_params < 11_000_000


def test_tokenizer_carries_qwen_special_tokens_at_their_real_ids(tiny_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_path)
    for token, token_id in SPECIAL_TOKENS.items():
        assert tokenizer.convert_tokens_to_ids(token) == token_id
    ids = tokenizer("Which page shows a red pie chart?<|endoftext|>").input_ids
    assert ids[-1] == 151643
    assert tokenizer.decode(ids) == "Which page shows a red pie chart?<|endoftext|>"
    assert len(ids) == 9  # one token per course word, plus "?" and the special token


def test_same_seed_same_weights_other_seed_other_weights(tmp_path):
    a = load_file(make_tiny_checkpoint(tmp_path / "a", seed=3) / "model.safetensors")
    b = load_file(make_tiny_checkpoint(tmp_path / "b", seed=3) / "model.safetensors")
    c = load_file(make_tiny_checkpoint(tmp_path / "c", seed=4) / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_refuses_to_overwrite_a_non_empty_directory(tmp_path):
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        make_tiny_checkpoint(target)
    assert (target / "notes.txt").read_text() == "keep me"


def test_tiny_sentinel_resolves_to_the_cached_checkpoint(tiny_path):
    assert resolve_model_path("tiny") == str(tiny_path)
    assert resolve_model_path("Qwen/Qwen3-VL-2B-Instruct") == "Qwen/Qwen3-VL-2B-Instruct"
    assert AutoConfig.from_pretrained(resolve_model_path("tiny")).model_type == "qwen3_vl"


def test_a_checkpoint_saved_under_another_renaming_is_refused_and_nothing_is_left(tmp_path, monkeypatch):
    """A library can register its own renaming of Qwen3-VL checkpoints in transformers (colpali-engine does under
    transformers 5.17): the tiny checkpoint would then be written as `model.model.*` and load nowhere else."""
    from safetensors.torch import save_file
    from transformers import Qwen3VLForConditionalGeneration

    save = Qwen3VLForConditionalGeneration.save_pretrained

    def save_renamed(self, path, **kwargs):
        save(self, path, **kwargs)
        weights = load_file(f"{path}/model.safetensors")
        save_file({"model." + k: v.contiguous() for k, v in weights.items()}, f"{path}/model.safetensors")

    monkeypatch.setattr(Qwen3VLForConditionalGeneration, "save_pretrained", save_renamed)
    with pytest.raises(RuntimeError, match=r"model\.model\..*Build it in a fresh process"):
        make_tiny_checkpoint(tmp_path / "tiny")
    assert not (tmp_path / "tiny").exists() and list(tmp_path.iterdir()) == []
