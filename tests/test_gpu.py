"""Checks that only a CUDA GPU can run; skipped elsewhere (`pytest -m gpu` on a GPU machine)."""

import pytest
import torch
from PIL import Image

from colqwen3_lib import ColQwen3, estimate_memory, resolve_attn_implementation
from colqwen3_lib.measure import measure_training_step
from colqwen3_lib.memory import TrainingSetup

pytestmark = pytest.mark.gpu


def test_tiny_model_embeds_in_bf16_on_the_gpu(processor):
    model = ColQwen3.from_pretrained("tiny", torch_dtype=torch.bfloat16, device_map="cuda").eval()
    batch = processor.process_images([Image.new("RGB", (320, 480), "red")]).to("cuda")
    with torch.inference_mode():
        emb = model(**batch)
    mask = batch["attention_mask"].bool()
    assert emb.dtype == torch.bfloat16
    assert torch.allclose(
        emb[mask].float().norm(dim=-1), torch.ones(int(mask.sum()), device="cuda"), atol=1e-2
    )


def test_attention_choice_on_this_gpu():
    chosen = resolve_attn_implementation("flash_attention_2", "cuda")
    major, _ = torch.cuda.get_device_capability()
    try:
        import flash_attn  # noqa: F401

        has_flash = True
    except ImportError:
        has_flash = False
    assert chosen == ("flash_attention_2" if has_flash and major >= 8 else "sdpa")


def test_memory_estimate_matches_a_measured_step_on_the_gpu():
    setup = TrainingSetup(model_size="tiny", batch_size=8, max_visual_tokens=256, attn_implementation="sdpa")
    measured = measure_training_step(setup)
    assert estimate_memory(setup).total == pytest.approx(measured, rel=0.25)
