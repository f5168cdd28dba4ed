"""The memory estimator (parameter counts, breakdown, monotonic behaviour, measured accuracy) and the OOM helpers."""

import logging
from dataclasses import replace

import pytest
import torch

from colqwen3_lib import memory
from colqwen3_lib.memory import GIB, TrainingSetup, estimate_memory

CPU = dict(model_size="tiny", dtype="float32", attn_implementation="sdpa", device="cpu")


def _meta_model(size: str):
    from colqwen3_lib.model import ColQwen3
    from colqwen3_lib.tiny import real_config

    config = real_config(size)
    with torch.device("meta"):
        return ColQwen3(config)


@pytest.mark.parametrize("size", ["tiny", "2b", "8b"])
def test_parameter_count_matches_the_built_model(size):
    model = _meta_model(size)
    counted = memory.count_parameters(size)
    assert counted.base == sum(p.numel() for p in model.parameters())
    assert counted.vision == sum(p.numel() for p in model.visual.parameters())
    assert counted.embedding == model.language_model.embed_tokens.weight.numel()


def test_lora_parameter_count_matches_peft():
    from peft import LoraConfig, get_peft_model

    from colqwen3_lib.tiny import random_model

    model = get_peft_model(
        random_model("tiny", torch.float32),
        LoraConfig(r=32, lora_alpha=32, lora_dropout=0.1, target_modules=list(memory.LORA_TARGETS)),
    )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert memory.count_parameters("tiny", lora_rank=32).lora == trainable


def test_published_sizes_are_about_2_4_8_billion_parameters():
    billions = {size: memory.count_parameters(size).base / 1e9 for size in ("2b", "4b", "8b")}
    assert billions["2b"] == pytest.approx(2.1, abs=0.1)
    assert billions["4b"] == pytest.approx(4.4, abs=0.1)
    assert billions["8b"] == pytest.approx(8.1, abs=0.2)


@pytest.mark.parametrize(
    "setup",
    [
        TrainingSetup(),
        TrainingSetup(model_size="8b", lora=False, gradient_checkpointing=False, attn_implementation="eager"),
        TrainingSetup(**CPU, lora=False, batch_size=2),
    ],
)
def test_breakdown_adds_up_to_the_total(setup):
    estimate = estimate_memory(setup)
    parts = estimate.breakdown()
    assert all(value >= 0 for value in parts.values())
    assert sum(v for k, v in parts.items() if k != "total") == pytest.approx(parts["total"])
    assert estimate.total == max(estimate.phases.values())
    assert estimate.peak_phase in estimate.phases
    text = str(estimate)
    for label in ("weights", "trainable + optimizer", "gradients", "activations", "workspace", "total"):
        assert label in text


def test_lora_trains_only_the_adapters():
    lora, full = estimate_memory(lora=True), estimate_memory(lora=False)
    params = memory.count_parameters("2b", lora_rank=32)
    assert lora.trainable_params == params.lora
    assert lora.all_gradients == 4 * params.lora  # float32 adapters, no gradient for the frozen base
    assert lora.weights == 2 * params.base  # bf16 base weights
    assert full.trainable_params == params.base
    assert full.trainable == 3 * 2 * params.base  # bf16 parameters + two AdamW states
    assert lora.total < full.total


@pytest.mark.parametrize("size", ["tiny", "2b", "8b"])
@pytest.mark.parametrize(
    "field, values",
    [
        ("batch_size", [1, 2, 8, 32, 64]),
        ("max_visual_tokens", [128, 512, 768, 1280]),
        ("query_len", [5, 20, 60]),
    ],
)
def test_peak_grows_with_batch_tokens_and_query_length(size, field, values):
    for lora in (True, False):
        totals = [estimate_memory(model_size=size, lora=lora, **{field: v}).total for v in values]
        assert totals == sorted(totals), f"{field} {values} -> {totals}"
        assert totals[-1] > totals[0]


def test_settings_that_save_memory_save_memory():
    base = TrainingSetup(
        model_size="2b", batch_size=16, gradient_checkpointing=False, attn_implementation="sdpa"
    )
    total = estimate_memory(base).total
    assert estimate_memory(base, gradient_checkpointing=True).total < total
    assert estimate_memory(base, attn_implementation="flash_attention_2").total < total
    assert estimate_memory(base, attn_implementation="eager").total > total
    assert estimate_memory(base, dtype="float32").total > total
    assert estimate_memory(base, lora=False).total > total
    assert estimate_memory(base, lora=False, optimizer="sgd").total < estimate_memory(base, lora=False).total
    sizes = [estimate_memory(base, model_size=s).total for s in ("tiny", "2b", "4b", "8b")]
    assert sizes == sorted(sizes)


def test_activations_dominate_large_batches_and_weights_small_ones():
    small = estimate_memory(model_size="8b", batch_size=1)
    large = estimate_memory(model_size="8b", batch_size=64, gradient_checkpointing=False)
    assert small.weights > small.activations
    assert large.activations > large.weights


def test_invalid_settings_are_refused():
    with pytest.raises(ValueError, match="dtype"):
        TrainingSetup(dtype="int8")
    with pytest.raises(ValueError, match="batch_size"):
        TrainingSetup(batch_size=0)
    with pytest.raises(ValueError, match="unknown model size"):
        estimate_memory(model_size="70b")


def test_suggestion_keeps_the_effective_batch_and_fits_the_budget():
    setup = TrainingSetup(model_size="2b", batch_size=64)
    suggestion = memory.suggest_settings(24, setup)
    assert suggestion.fits and 0 < suggestion.batch_size < 64
    assert suggestion.batch_size * suggestion.gradient_accumulation_steps == 64  # exactly the wanted batch
    assert suggestion.estimate.total <= 24 * GIB * 0.9
    largest = memory.largest_batch_size(24 * GIB * 0.9, setup)
    assert estimate_memory(setup, batch_size=largest + 1).total > 24 * GIB * 0.9
    assert largest / 2 < suggestion.batch_size <= largest  # a divisor of 64 close to the largest that fits
    assert "gradient accumulation" in suggestion.note

    roomy = memory.suggest_settings(1000, setup)
    assert (roomy.batch_size, roomy.gradient_accumulation_steps, roomy.note) == (64, 1, "fits")

    hopeless = memory.suggest_settings(4, replace(setup, model_size="8b"))
    assert not hopeless.fits and "does not fit" in hopeless.note


def test_gradient_accumulation_steps():
    assert memory.gradient_accumulation_steps(64, 16) == 4
    assert memory.gradient_accumulation_steps(64, 24) == 3
    assert memory.gradient_accumulation_steps(64, 16, num_devices=4) == 1
    assert memory.gradient_accumulation_steps(64, 128) == 1


def test_recommended_verdicts():
    without_gpu = memory.recommended_verdicts(None)
    assert [(v["model"], v["batch"]) for v in without_gpu] == list(memory.RECOMMENDED)
    assert {v["verdict"] for v in without_gpu} == {"does not fit"}
    on_80 = {(v["model"], v["batch"]): v["verdict"] for v in memory.recommended_verdicts(80)}
    assert on_80[("2b", 64)] == "fits"
    on_24 = {(v["model"], v["batch"]): v["verdict"] for v in memory.recommended_verdicts(24)}
    assert on_24[("8b", 32)] in ("needs grad. accumulation", "does not fit")


# ---------------------------------------------------------------- out-of-memory handling


def _fits_up_to(limit: int, calls: list[int]):
    def step(batch_size: int) -> str:
        calls.append(batch_size)
        if batch_size > limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {batch_size} GiB")
        return f"trained at {batch_size}"

    return step


def test_find_batch_size_halves_until_it_fits(caplog):
    calls: list[int] = []
    with caplog.at_level(logging.WARNING, logger="colqwen3_lib.memory"):
        batch, result = memory.find_batch_size(_fits_up_to(10, calls), start_batch_size=64)
    assert (batch, result) == (8, "trained at 8")
    assert calls == [64, 32, 16, 8]
    assert len(caplog.records) == 3 and "retrying with 32" in caplog.records[0].getMessage()


def test_find_batch_size_gives_advice_when_nothing_fits():
    calls: list[int] = []
    with pytest.raises(torch.OutOfMemoryError) as raised:
        memory.find_batch_size(_fits_up_to(0, calls), start_batch_size=4)
    assert calls == [4, 2, 1]
    message = str(raised.value)
    for fix in (
        "--per-device-train-batch-size",
        "gradient checkpointing",
        "--peft",
        "--max-visual-tokens 512",
    ):
        assert fix in message


def test_find_batch_size_lets_other_errors_through():
    def broken(batch_size):
        raise ValueError("not a memory problem")

    with pytest.raises(ValueError, match="not a memory problem"):
        memory.find_batch_size(broken, 8)


def test_is_oom_error():
    assert memory.is_oom_error(torch.OutOfMemoryError("anything"))
    assert memory.is_oom_error(
        RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1")
    )
    assert not memory.is_oom_error(RuntimeError("shape mismatch"))


def test_oom_advice_suggests_settings_that_fit():
    setup = TrainingSetup(model_size="8b", batch_size=32)
    advice = memory.oom_advice(setup, memory_gib=24)
    suggestion = memory.suggest_settings(24, setup)
    assert "estimated peak" in advice
    assert f"--per-device-train-batch-size {suggestion.batch_size}" in advice
    assert f"--gradient-accumulation-steps {suggestion.gradient_accumulation_steps}" in advice


# ---------------------------------------------------------------- against measurement


def test_synthetic_batch_is_shaped_like_the_processor_output():
    from colqwen3_lib.tiny import real_config

    config = real_config("tiny")
    pages, queries = memory.synthetic_batch(config, batch_size=3, max_visual_tokens=64, query_len=20)
    n_image = (pages["input_ids"] == config.image_token_id).sum(dim=1)
    assert n_image.tolist() == [64, 64, 56]  # the last page one row shorter: the batch is padded
    assert pages["input_ids"].shape[1] == 64 + memory.PAGE_PROMPT_TOKENS
    assert pages["image_grid_thw"].prod(dim=1).tolist() == [256, 256, 224]  # 4 patches per visual token
    assert pages["pixel_values"].shape == (3, 256, 1536)
    assert queries["input_ids"].shape == (3, 20 + memory.QUERY_AUGMENTATION_TOKENS)
    assert (queries["attention_mask"].sum(dim=1) == torch.tensor([30, 30, 27])).all()


MEASURED = {
    "tiny-lora": ("tiny", TrainingSetup(**CPU, lora=True, batch_size=4, max_visual_tokens=128, gradient_checkpointing=False)),
    "tiny-full-ckpt": ("tiny", TrainingSetup(**CPU, lora=False, batch_size=4, max_visual_tokens=128)),
    "scaled-lora": ("scaled", TrainingSetup(**CPU, lora=True, batch_size=8, max_visual_tokens=256, gradient_checkpointing=False)),
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(MEASURED))
def test_estimate_is_within_25_percent_of_a_measured_training_step(case):
    from colqwen3_lib.tiny import real_config

    name, setup = MEASURED[case]
    config = (
        real_config("tiny")
        if name == "tiny"
        else memory.scaled_config(hidden=256, intermediate=768, layers=2)
    )
    measured = memory.measure_training_step(setup, config=config)
    estimate = estimate_memory(setup, config=config)
    assert estimate.total == pytest.approx(measured, rel=0.25)
    if name == "scaled":  # big enough that the activations, not the weights, are what is being checked
        assert estimate.activations + estimate.workspace > estimate.weights
