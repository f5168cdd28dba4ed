"""Measuring a real training step to check the estimator: batches shaped like the processor's, the model
prepared as training prepares it, and (slow) the estimate within 25% of the measured peak, within 5% with
the gradient cache, whose measured saving is the predicted one."""

from dataclasses import replace

import pytest
import torch

from colqwen3_lib.architectures import real_config, scaled_config
from colqwen3_lib.measure import build_training_model, measure_training_step, synthetic_batch
from colqwen3_lib.memory import PAGE_PROMPT_TOKENS, TrainingSetup, estimate_memory
from colqwen3_lib.processor import N_QUERY_AUGMENTATION_TOKENS

CPU = dict(model_size="tiny", dtype="float32", attn_implementation="sdpa", device="cpu")


def test_synthetic_batch_is_shaped_like_the_processor_output():
    config = real_config("tiny")
    pages, queries = synthetic_batch(config, batch_size=3, max_visual_tokens=64, query_len=20)
    n_image = (pages["input_ids"] == config.image_token_id).sum(dim=1)
    assert n_image.tolist() == [64, 64, 56]  # the last page one row shorter: the batch is padded
    assert pages["input_ids"].shape[1] == 64 + PAGE_PROMPT_TOKENS
    assert pages["image_grid_thw"].prod(dim=1).tolist() == [256, 256, 224]  # 4 patches per visual token
    assert pages["pixel_values"].shape == (3, 256, 1536)
    assert queries["input_ids"].shape == (3, 20 + N_QUERY_AUGMENTATION_TOKENS)
    assert (queries["attention_mask"].sum(dim=1) == torch.tensor([30, 30, 27])).all()


@pytest.mark.parametrize("lora", [True, False])
def test_the_measured_model_trains_what_the_estimate_counts(lora):
    setup = TrainingSetup(**CPU, lora=lora)
    model = build_training_model(setup)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == estimate_memory(setup).trainable_params
    assert model.training and model.config._attn_implementation == "sdpa"


MEASURED = {
    "tiny-lora": ("tiny", TrainingSetup(**CPU, lora=True, batch_size=4, max_visual_tokens=128, gradient_checkpointing=False)),
    "tiny-full-ckpt": ("tiny", TrainingSetup(**CPU, lora=False, batch_size=4, max_visual_tokens=128)),
    "scaled-lora": ("scaled", TrainingSetup(**CPU, lora=True, batch_size=8, max_visual_tokens=256, gradient_checkpointing=False)),
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(MEASURED))
def test_estimate_is_within_25_percent_of_a_measured_training_step(case):
    name, setup = MEASURED[case]
    config = real_config("tiny") if name == "tiny" else scaled_config(hidden=256, intermediate=768, layers=2)
    measured = measure_training_step(setup, config=config)
    estimate = estimate_memory(setup, config=config)
    assert estimate.total == pytest.approx(measured, rel=0.25)
    if name == "scaled":  # big enough that the activations, not the weights, are what is being checked
        assert estimate.activations + estimate.workspace > estimate.weights


GRAD_CACHE = {  # chunks of 2-4 rows of batches of 8-16 pages
    "tiny-lora-cache": ("tiny", TrainingSetup(**CPU, lora=True, batch_size=16, max_visual_tokens=128, gradient_checkpointing=False, grad_cache_chunk_size=4)),
    "tiny-full-cache": ("tiny", TrainingSetup(**CPU, lora=False, batch_size=16, max_visual_tokens=512, gradient_checkpointing=False, grad_cache_chunk_size=4)),
    "scaled-lora-ckpt-cache": ("scaled", TrainingSetup(**CPU, lora=True, batch_size=8, max_visual_tokens=256, grad_cache_chunk_size=2)),
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(GRAD_CACHE))
def test_the_gradient_cache_estimate_is_within_5_percent_and_the_saving_is_real(case):
    """The measured step runs `grad_cache.grad_cache_step`; the same batch without the cache needs more, as predicted."""
    name, setup = GRAD_CACHE[case]
    config = real_config("tiny") if name == "tiny" else scaled_config(hidden=256, intermediate=768, layers=2)
    cached = measure_training_step(setup, config=config)
    assert estimate_memory(setup, config=config).total == pytest.approx(cached, rel=0.05)
    plain_setup = replace(setup, grad_cache_chunk_size=None)
    plain = measure_training_step(plain_setup, config=config)
    assert cached < plain
    predicted_saving = (
        estimate_memory(plain_setup, config=config).total - estimate_memory(setup, config=config).total
    )
    assert predicted_saving == pytest.approx(plain - cached, rel=0.25)
