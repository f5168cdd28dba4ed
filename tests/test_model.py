import json
import logging

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import Qwen3VLForConditionalGeneration

from colqwen3_lib import ColQwen3


@pytest.fixture(scope="module")
def pages():
    return [Image.new("RGB", (320, 480), (200, 30, 30)), Image.new("RGB", (600, 300), (30, 30, 200))]


def test_instruct_checkpoint_loads_every_backbone_weight(tiny_path, caplog):
    reference = Qwen3VLForConditionalGeneration.from_pretrained(tiny_path).state_dict()
    with caplog.at_level(logging.WARNING, logger="colqwen3_lib.model"):
        model = ColQwen3.from_pretrained(tiny_path)
    ours = model.state_dict()
    backbone = {k: v for k, v in ours.items() if not k.startswith("custom_text_proj")}
    assert len(backbone) > 50
    for key, tensor in backbone.items():
        assert torch.equal(tensor, reference[f"model.{key}"]), key
    assert sorted(model.loading_info["missing_keys"]) == ["custom_text_proj.bias", "custom_text_proj.weight"]
    assert "custom_text_proj" in caplog.text and "newly initialised" in caplog.text


def test_a_checkpoint_missing_backbone_weights_is_refused(tiny_path, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in tiny_path.iterdir():
        if f.is_file() and f.name != "model.safetensors":
            (broken / f.name).write_bytes(f.read_bytes())
    weights = load_file(tiny_path / "model.safetensors")
    del weights["model.language_model.layers.1.self_attn.q_proj.weight"]
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(RuntimeError, match="missing 1 backbone weights"):
        ColQwen3.from_pretrained(broken)


def test_embeddings_are_normalised_and_zero_on_padding(model, processor, pages):
    queries = processor.process_queries(
        ["red pie chart", "Which page shows a blue table in landscape layout?"]
    )
    with torch.no_grad():
        emb = model(**queries)  # (2, seq_len, 128)
    assert emb.shape[-1] == 128
    norms = emb.norm(dim=-1)
    mask = queries["attention_mask"].bool()
    assert torch.allclose(norms[mask], torch.ones(int(mask.sum())), atol=1e-5)
    assert torch.all(norms[~mask] == 0)
    assert (~mask).any()  # the short query really is padded


def test_mask_non_image_embeddings_keeps_only_image_tokens(model, processor, pages):
    batch = processor.process_images(pages)
    with torch.no_grad():
        model.mask_non_image_embeddings = True
        try:
            emb = model(**batch)
        finally:
            model.mask_non_image_embeddings = False
    nonzero = emb.norm(dim=-1) > 0
    assert torch.equal(nonzero, processor.get_image_mask(batch))


def test_a_page_embeds_the_same_alone_and_in_a_padded_batch(model, processor, pages):
    with torch.no_grad():
        together = model(**processor.process_images(pages))
        alone = model(**processor.process_images(pages[1:]))
    mask = processor.process_images(pages)["attention_mask"][1].bool()
    assert torch.allclose(together[1][mask], alone[0], atol=1e-4)


@pytest.mark.parametrize("dim", [128, 320])
def test_save_and_reload_gives_identical_embeddings(tiny_path, processor, pages, tmp_path, dim):
    model = ColQwen3.from_pretrained(tiny_path, dim=dim).eval()
    batch = processor.process_images(pages)
    with torch.no_grad():
        before = model(**batch)
    model.save_pretrained(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["embedding_dim"] == dim
    reloaded = ColQwen3.from_pretrained(tmp_path / "saved").eval()  # dim comes from the checkpoint
    assert reloaded.dim == dim
    assert not reloaded.loading_info["missing_keys"]
    with torch.no_grad():
        assert torch.equal(reloaded(**batch), before)


@pytest.mark.parametrize("prefix", ["model.", ""])
def test_checkpoints_load_with_either_backbone_key_layout(tiny_path, processor, pages, tmp_path, prefix):
    # transformers 5 saves the backbone as `model.visual.*`, 4.x as `visual.*`; the head is always
    # `custom_text_proj.*` (colpali-engine's naming), so adapters and heads move between the two.
    model = ColQwen3.from_pretrained(tiny_path).eval()
    model.save_pretrained(tmp_path / "saved")
    weights = load_file(tmp_path / "saved" / "model.safetensors")
    assert {"custom_text_proj.weight", "custom_text_proj.bias"} <= set(weights)
    renamed = {
        (k if k.startswith("custom_text_proj") else prefix + k.removeprefix("model.")): v
        for k, v in weights.items()
    }
    save_file(renamed, tmp_path / "saved" / "model.safetensors", metadata={"format": "pt"})
    reloaded = ColQwen3.from_pretrained(tmp_path / "saved").eval()
    assert not reloaded.loading_info["missing_keys"]
    batch = processor.process_images(pages)
    with torch.no_grad():
        assert torch.equal(reloaded(**batch), model(**batch))


def test_head_size_is_read_from_weights_when_the_config_does_not_say(tiny_path, tmp_path):
    ColQwen3.from_pretrained(tiny_path, dim=320).save_pretrained(tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    del config["embedding_dim"]  # as in checkpoints written by other ColQwen3 implementations
    (tmp_path / "saved" / "config.json").write_text(json.dumps(config))
    assert ColQwen3.from_pretrained(tmp_path / "saved").dim == 320


def test_flash_attention_request_falls_back_to_sdpa_on_cpu(tiny_path, caplog):
    with caplog.at_level(logging.WARNING, logger="colqwen3_lib.model"):
        model = ColQwen3.from_pretrained(tiny_path, attn_implementation="flash_attention_2")
    assert model.config._attn_implementation == "sdpa"
    assert sum("using sdpa" in r.message for r in caplog.records) == 1
