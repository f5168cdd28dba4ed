import numpy as np
import pytest
import torch
from PIL import Image

from colqwen3_lib import ColQwen3Processor

PAGE_SIZES = [(320, 480), (1240, 1754), (1754, 1240), (2000, 300), (640, 640)]


@pytest.mark.parametrize("cap", [64, 256, 768])
def test_max_num_visual_tokens_caps_every_page(tiny_path, cap):
    processor = ColQwen3Processor.from_pretrained("tiny", max_num_visual_tokens=cap)
    assert processor.image_processor.size["longest_edge"] == cap * 32 * 32
    for size in PAGE_SIZES:
        batch = processor.process_images([Image.new("RGB", size, "white")])
        n_tokens = int(processor.get_image_mask(batch).sum())
        n_x, n_y = processor.get_n_patches(size, spatial_merge_size=2)
        assert n_tokens == n_x * n_y <= cap
        grid = batch["image_grid_thw"][0]  # (t, h, w) in 16-px patches
        assert (int(grid[1]) // 2, int(grid[2]) // 2) == (n_y, n_x)


def test_pages_use_the_visual_prompt(processor):
    batch = processor.process_images([Image.new("RGB", (320, 320), "white")])
    text = processor.tokenizer.decode(batch["input_ids"][0])
    assert text.startswith("<|im_start|>user\n<|vision_start|><|image_pad|>")
    assert text.endswith("<|vision_end|>Describe the image.<|im_end|><|endoftext|>")


def test_pixel_values_are_padded_per_image(processor):
    pages = [Image.new("RGB", (320, 480), "red"), Image.new("RGB", (900, 900), "blue")]
    batch = processor.process_images(pages)
    n_patches = batch["image_grid_thw"].prod(dim=1)
    assert batch["pixel_values"].shape == (2, int(n_patches.max()), 3 * 2 * 16 * 16)
    short = int(n_patches.argmin())
    assert torch.all(batch["pixel_values"][short, int(n_patches[short]) :] == 0)
    assert processor.tokenizer.padding_side == "left"


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16", "1"])
def test_every_pil_mode_becomes_rgb(processor, mode):
    page = Image.new("RGB", (320, 400), (40, 120, 200)).convert(mode)
    batch = processor.process_images([page])
    assert batch["pixel_values"].shape[0] == 1
    assert torch.isfinite(batch["pixel_values"]).all()


def test_transparent_pages_are_composited_on_white(processor):
    transparent = Image.new("RGBA", (320, 320), (0, 0, 0, 0))
    white = Image.new("RGB", (320, 320), "white")
    a = processor.process_images([transparent])["pixel_values"]
    b = processor.process_images([white])["pixel_values"]
    assert torch.allclose(a, b)


def test_sixteen_bit_greyscale_keeps_its_contrast(processor):
    values = np.linspace(0, 65535, 320 * 320).reshape(320, 320).astype(np.uint16)
    ramp = Image.fromarray(values)
    assert ramp.mode == "I;16"
    pixels = processor.process_images([ramp])["pixel_values"]
    assert pixels.max() - pixels.min() > 1.5  # normalised to [-1, 1]: a full ramp, not a flat page


def test_pages_can_be_paths(processor, tmp_path):
    Image.new("RGB", (320, 320), "green").save(tmp_path / "page.png")
    batch = processor.process_images([str(tmp_path / "page.png"), tmp_path / "page.png"])
    assert batch["input_ids"].shape[0] == 2


def test_queries_are_text_and_ten_augmentation_tokens_as_in_the_reference(processor):
    """colpali-engine's ColQwen3Processor: query_prefix "" + query + 10 x <|endoftext|>, left-padded."""
    batch = processor.process_queries(["red pie chart", "a much longer query about a blue table"])
    eot = processor.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    for ids in batch["input_ids"]:
        assert ids[-10:].tolist() == [eot] * 10
    first = batch["input_ids"][0][batch["attention_mask"][0].bool()]
    assert (
        processor.tokenizer.decode(first, skip_special_tokens=False) == "red pie chart" + "<|endoftext|>" * 10
    )


def test_a_saved_query_prefix_is_kept(processor, tmp_path):
    import copy

    asking = copy.deepcopy(processor)
    asking.query_prefix = "Query: "
    asking.save_pretrained(tmp_path)
    reloaded = type(processor).from_pretrained(tmp_path)
    assert reloaded.query_prefix == "Query: "
    text = reloaded.tokenizer.decode(reloaded.process_queries(["red pie chart"])["input_ids"][0])
    assert text.startswith("Query: red pie chart")


def test_a_processor_saved_by_the_earlier_kit_keeps_its_query_prefix(processor, tmp_path, caplog):
    """Runs saved before the prefix was data: a training folder whose processor config has no query_prefix."""
    import json
    import logging

    processor.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "processor_config.json").read_text())
    del config["query_prefix"]
    (tmp_path / "processor_config.json").write_text(json.dumps(config))
    (tmp_path / "training_config.json").write_text("{}")
    with caplog.at_level(logging.WARNING, logger="colqwen3_lib.processor"):
        assert type(processor).from_pretrained(tmp_path).query_prefix == "Query: "
    assert "earlier version of the kit" in caplog.text


def test_score_returns_one_row_per_query(processor):
    qs = [torch.nn.functional.normalize(torch.randn(n, 128), dim=-1) for n in (5, 9, 12)]
    ps = [torch.nn.functional.normalize(torch.randn(n, 128), dim=-1) for n in (30, 64)]
    assert processor.score(qs, ps).shape == (3, 2)


@pytest.mark.parametrize(
    "images, message",
    [
        ([], "empty list"),
        ([Image.new("RGB", (320, 320)), Image.new("RGB", (10, 10))], "image 1 is 10x10 px"),
        ([Image.new("RGB", (40, 8100))], "image 0 is 40x8100 px, an aspect ratio over 200"),
        ([Image.new("RGB", (320, 320)), "no/such/page.png"], "image 1 .* could not be read"),
        ([Image.new("RGB", (320, 320)), 3.5], "image 1 is a float"),
    ],
)
def test_bad_pages_are_named_in_the_error(processor, images, message):
    with pytest.raises(ValueError, match=message):
        processor.process_images(images)


def test_a_file_that_is_not_an_image_is_named(processor, tmp_path):
    (tmp_path / "notes.pdf").write_text("%PDF-1.4 not really")
    with pytest.raises(ValueError, match=r"image 0 \(.*notes.pdf\) could not be read as an image"):
        processor.process_images([tmp_path / "notes.pdf"])


@pytest.mark.parametrize(
    "queries, message",
    [
        ([], "empty list"),
        (["fine", 42], "query 1 is a int"),
        (["fine", None], "query 1 is a NoneType"),
        (["  "], "query 0 is empty"),
    ],
)
def test_bad_queries_are_named_in_the_error(processor, queries, message):
    with pytest.raises(ValueError, match=message):
        processor.process_queries(queries)


def test_visual_token_cap_must_be_positive(tiny_path):
    with pytest.raises(ValueError, match="positive integer"):
        ColQwen3Processor.from_pretrained("tiny", max_num_visual_tokens=0)


def test_unpadded_pixel_values_are_the_padded_ones_without_padding_and_embed_the_same(processor, model):
    """For embedding, the processor may skip padding pixel_values per page (a copy of every pixel): the model
    reads both forms and gives the same embeddings."""
    pages = [Image.new("RGB", (320, 480), "red"), Image.new("RGB", (200, 100), "blue")]
    padded = processor.process_images(pages)
    flat = processor.process_images(pages, pad_pixel_values=False)
    n_patches = padded["image_grid_thw"].prod(dim=1).tolist()
    assert flat["pixel_values"].dim() == 2 and flat["pixel_values"].shape[0] == sum(n_patches)
    torch.testing.assert_close(
        flat["pixel_values"], torch.cat([pv[:n] for pv, n in zip(padded["pixel_values"], n_patches)])
    )
    with torch.no_grad():
        torch.testing.assert_close(model(**flat), model(**padded))
