"""ColQwen3: loading Instruct and ColQwen3 checkpoints, the embeddings, saving and reloading, the
attention kernel chosen for where the model goes (flash_attention_2 -> sdpa -> eager, and the one log
line that explains it), dtype and device helpers, and random models of the published architectures."""

import importlib.util
import json
import logging

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import Qwen3VLForConditionalGeneration

from colqwen3_lib import ColQwen3
from colqwen3_lib import model as model_module
from colqwen3_lib.model import (
    default_dtype,
    device_of,
    embed_batch,
    random_model,
    resolve_attn_implementation,
    use_bf16,
)

LOGGER = "colqwen3_lib.model"
INSTALL_HINT = "pip install flash-attn --no-build-isolation"  # the reference README's fix


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


# ------------------------------------------------------------------ attention


@pytest.fixture
def fake_gpu(monkeypatch):
    """Pretend a CUDA device of a given compute capability exists, with or without flash-attn installed."""

    def setup(flash_installed: bool, capability: tuple[int, int] = (9, 0)):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        real_find_spec = importlib.util.find_spec

        def find_spec(name, *args, **kwargs):
            if name == "flash_attn":
                return object() if flash_installed else None
            return real_find_spec(name, *args, **kwargs)

        monkeypatch.setattr(model_module.importlib.util, "find_spec", find_spec)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)

    return setup


def _resolve(caplog, requested, device):
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        chosen = resolve_attn_implementation(requested, device)
    records = [r for r in caplog.records if r.name == LOGGER]
    assert len(records) == 1, f"expected one log line, got {[r.getMessage() for r in records]}"
    return chosen, records[0]


def test_cpu_picks_sdpa_and_says_why(caplog):
    chosen, record = _resolve(caplog, None, "cpu")
    assert chosen == "sdpa"
    assert record.levelno == logging.INFO
    assert "needs a CUDA GPU" in record.getMessage()


def test_flash_request_on_cpu_falls_back_with_a_warning(caplog):
    chosen, record = _resolve(caplog, "flash_attention_2", "cpu")
    assert chosen == "sdpa"
    assert record.levelno == logging.WARNING
    assert "flash_attention_2 needs a CUDA GPU" in record.getMessage()


def test_gpu_with_flash_attn_picks_flash(caplog, fake_gpu):
    fake_gpu(flash_installed=True)
    for requested in (None, "flash_attention_2"):
        chosen, record = _resolve(caplog, requested, "cuda")
        assert chosen == "flash_attention_2"
        assert "flash_attention_2" in record.getMessage()


@pytest.mark.parametrize("requested, level", [(None, logging.INFO), ("flash_attention_2", logging.WARNING)])
def test_gpu_without_flash_attn_falls_back_to_sdpa_with_the_install_hint(caplog, fake_gpu, requested, level):
    fake_gpu(flash_installed=False)
    chosen, record = _resolve(caplog, requested, "cuda")
    assert chosen == "sdpa"
    assert record.levelno == level
    assert "not installed" in record.getMessage()
    assert INSTALL_HINT in record.getMessage()


def test_pre_ampere_gpu_does_not_get_flash_attention(caplog, fake_gpu):
    fake_gpu(flash_installed=True, capability=(7, 5))  # e.g. a T4
    chosen, record = _resolve(caplog, None, "cuda")
    assert chosen == "sdpa"
    assert "compute capability 8.0" in record.getMessage()


@pytest.mark.parametrize("requested", ["sdpa", "eager"])
def test_explicit_sdpa_or_eager_is_kept(caplog, requested):
    chosen, record = _resolve(caplog, requested, "cpu")
    assert chosen == requested
    assert requested in record.getMessage()


def test_sdpa_falls_back_to_eager_without_the_torch_kernel(caplog, monkeypatch):
    monkeypatch.delattr(model_module.F, "scaled_dot_product_attention")
    chosen, record = _resolve(caplog, "sdpa", "cpu")
    assert chosen == "eager"
    assert record.levelno == logging.WARNING
    assert "scaled_dot_product_attention" in record.getMessage()


def test_unknown_implementation_is_refused():
    with pytest.raises(ValueError, match="not one of"):
        resolve_attn_implementation("flash_attention_3", "cpu")


def test_from_pretrained_uses_the_resolved_implementation(tiny_path):
    best = ColQwen3.from_pretrained(tiny_path, torch_dtype=torch.float32)
    eager = ColQwen3.from_pretrained(tiny_path, torch_dtype=torch.float32, attn_implementation="eager")
    assert best.config._attn_implementation == "sdpa"  # no device_map: the model stays on the CPU
    assert eager.config._attn_implementation == "eager"


def test_without_a_device_map_the_model_gets_sdpa_even_where_cuda_exists(tiny_path, caplog, fake_gpu):
    """The kernel is chosen for where the model goes: the CPU without a device_map, whatever GPU exists."""
    fake_gpu(flash_installed=True)
    assert resolve_attn_implementation(None) == "sdpa"  # no device: the CPU
    assert resolve_attn_implementation(None, device_of({"": 0})) == "flash_attention_2"
    with caplog.at_level(logging.INFO, logger=LOGGER):
        model = ColQwen3.from_pretrained(tiny_path, torch_dtype=torch.float32)
    assert model.config._attn_implementation == "sdpa"
    assert "the model goes to the CPU" in caplog.text


def test_device_of_a_device_map(monkeypatch):
    assert device_of(None) == torch.device("cpu")
    assert device_of("cpu") == torch.device("cpu")
    assert device_of(1) == torch.device("cuda", 1)
    assert device_of({"": 0}) == torch.device("cuda", 0)
    assert device_of({"": "cuda:1"}) == torch.device("cuda", 1)
    assert device_of({"visual": "cpu", "language_model": "disk"}) == torch.device("cpu")
    assert device_of({"visual": "cpu", "language_model": 0}) == torch.device("cuda", 0)
    for available, expected in ((True, "cuda"), (False, "cpu")):
        monkeypatch.setattr(torch.cuda, "is_available", lambda available=available: available)
        assert device_of("auto") == torch.device(expected)


def test_bf16_only_on_a_cuda_device_that_supports_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not use_bf16() and default_dtype() == torch.float32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    assert use_bf16() and use_bf16("cuda:0") and default_dtype("cuda") == torch.bfloat16
    assert not use_bf16("cpu") and default_dtype("cpu") == torch.float32  # a CPU model stays float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    assert not use_bf16("cuda") and default_dtype("cuda") == torch.float32


# ------------------------------------------------------------------ helpers


def test_embed_batch_gives_each_item_its_real_tokens(model, processor):
    batch = processor.process_queries(["red pie chart", "Which page shows a blue table in landscape layout?"])
    embeddings = embed_batch(model, batch)
    with torch.no_grad():
        padded = model(**batch)  # (2, seq_len, dim)
    mask = batch["attention_mask"].bool()
    assert [e.shape for e in embeddings] == [(int(m.sum()), model.dim) for m in mask]
    for embedding, row, m in zip(embeddings, padded, mask):
        assert embedding.device.type == "cpu"
        torch.testing.assert_close(embedding, row[m])


def test_random_model_builds_the_real_architecture_without_a_download():
    model = random_model("2b", device="meta", dim=128)
    n_backbone = sum(
        p.numel() for name, p in model.named_parameters() if not name.startswith("custom_text_proj")
    )
    assert n_backbone == 2_127_532_032  # lm_head is tied to the embeddings in the 2B model
    assert model.custom_text_proj.weight.shape == (128, 2048)
    assert model.dtype == torch.bfloat16
