"""When training does not fit: settings that fit a memory budget, the verdicts on the reference settings,
shrinking the batch on out-of-memory errors, and the advice that names what to change."""

import logging
from dataclasses import replace

import pytest
import torch

from colqwen3_lib import oom
from colqwen3_lib.config import default_config
from colqwen3_lib.memory import GIB, TrainingSetup, estimate_memory
from colqwen3_lib.reference import RECOMMENDED_BATCHES

# ---------------------------------------------------------------- settings that fit


def test_suggestion_keeps_the_effective_batch_and_fits_the_budget():
    setup = TrainingSetup(model_size="2b", batch_size=64)  # ~21.5 GiB: more than 90% of 20 GiB
    suggestion = oom.suggest_settings(20, setup)
    assert suggestion.fits and 0 < suggestion.batch_size < 64
    assert suggestion.batch_size * suggestion.gradient_accumulation_steps == 64  # exactly the wanted batch
    assert suggestion.estimate.total <= 20 * GIB * 0.9
    largest = oom.largest_batch_size(20 * GIB * 0.9, setup)
    assert estimate_memory(setup, batch_size=largest + 1).total > 20 * GIB * 0.9
    assert largest / 2 < suggestion.batch_size <= largest  # a divisor of 64 close to the largest that fits
    assert "gradient accumulation" in suggestion.note

    roomy = oom.suggest_settings(1000, setup)
    assert (roomy.batch_size, roomy.gradient_accumulation_steps) == (64, 1) and roomy.note.startswith("fits")

    hopeless = oom.suggest_settings(4, replace(setup, model_size="8b"))
    assert not hopeless.fits and "does not fit" in hopeless.note


def test_gradient_accumulation_steps():
    assert oom.gradient_accumulation_steps(64, 16) == 4
    assert oom.gradient_accumulation_steps(64, 24) == 3
    assert oom.gradient_accumulation_steps(64, 16, num_devices=4) == 1
    assert oom.gradient_accumulation_steps(64, 128) == 1


def test_recommended_verdicts():
    without_gpu = oom.recommended_verdicts(None)
    assert [(v["model"], v["batch"]) for v in without_gpu] == list(RECOMMENDED_BATCHES)
    assert {v["verdict"] for v in without_gpu} == {"does not fit"}
    on_80 = {(v["model"], v["batch"]): v["verdict"] for v in oom.recommended_verdicts(80)}
    assert on_80[("2b", 64)] == "fits"
    on_24 = {(v["model"], v["batch"]): v["verdict"] for v in oom.recommended_verdicts(24)}
    assert on_24[("8b", 32)] in ("needs grad. accumulation", "does not fit")


# ---------------------------------------------------------------- out-of-memory errors


def _fits_up_to(limit: int, calls: list[int]):
    def step(batch_size: int) -> str:
        calls.append(batch_size)
        if batch_size > limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {batch_size} GiB")
        return f"trained at {batch_size}"

    return step


def test_find_batch_size_halves_until_it_fits(caplog):
    calls: list[int] = []
    with caplog.at_level(logging.WARNING, logger="colqwen3_lib.oom"):
        batch, result = oom.find_batch_size(_fits_up_to(10, calls), start_batch_size=64)
    assert (batch, result) == (8, "trained at 8")
    assert calls == [64, 32, 16, 8]
    assert len(caplog.records) == 3 and "retrying with 32" in caplog.records[0].getMessage()


def test_find_batch_size_gives_advice_when_nothing_fits():
    calls: list[int] = []
    with pytest.raises(oom.TrainingOutOfMemoryError) as raised:
        oom.find_batch_size(_fits_up_to(0, calls), start_batch_size=4)
    assert calls == [4, 2, 1]
    message = str(raised.value)
    for fix in (
        "--per-device-train-batch-size",
        "gradient checkpointing",
        "--peft",
        "--max-visual-tokens 512",
    ):
        assert fix in message
    with pytest.raises(oom.TrainingOutOfMemoryError, match="^nothing fits at batch 2$"):
        oom.find_batch_size(
            _fits_up_to(0, []), 8, min_batch_size=2, advice=lambda batch: f"nothing fits at batch {batch}"
        )


def test_find_batch_size_lets_other_errors_through():
    def broken(batch_size):
        raise ValueError("not a memory problem")

    with pytest.raises(ValueError, match="not a memory problem"):
        oom.find_batch_size(broken, 8)


def test_is_oom_error():
    assert oom.is_oom_error(torch.OutOfMemoryError("anything"))
    assert oom.is_oom_error(
        RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1")
    )
    assert not oom.is_oom_error(RuntimeError("shape mismatch"))
    assert not oom.is_oom_error(oom.TrainingOutOfMemoryError("out of memory: already advised"))


# ---------------------------------------------------------------- advice


def test_oom_advice_suggests_settings_that_fit():
    setup = TrainingSetup(model_size="8b", batch_size=32)
    advice = oom.oom_advice(setup, memory_gib=24)
    suggestion = oom.suggest_settings(24, setup)
    assert "estimated peak" in advice
    assert f"--per-device-train-batch-size {suggestion.batch_size}" in advice
    assert f"--gradient-accumulation-steps {suggestion.gradient_accumulation_steps}" in advice


def test_out_of_memory_advice_for_the_reference_settings(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same advice on any machine
    message = oom.oom_advice(default_config(tmp_path).memory_setup())
    assert "--per-device-train-batch-size 64" in message and "--max-visual-tokens 768" in message
    assert "gradient checkpointing on" in message
    assert "--per-device-train-batch-size 32 --gradient-accumulation-steps 2" in message
    assert "--max-visual-tokens 512" in message and "--peft" in message
    assert "No checkpoint was written yet" in message


# ---------------------------------------------------------------- the gradient cache


def test_a_batch_that_needs_accumulation_can_keep_its_negatives_with_the_gradient_cache():
    setup = TrainingSetup(model_size="8b", batch_size=64)
    budget = 40 * GIB * oom.HEADROOM
    suggestion = oom.suggest_settings(40, setup)
    assert suggestion.batch_size < 64 and suggestion.grad_cache_chunk_size is not None
    chunk = suggestion.grad_cache_chunk_size
    largest = oom.largest_chunk_size(budget, setup)
    assert chunk == min(largest, 32)  # a chunk of at most half the batch
    assert estimate_memory(setup, grad_cache_chunk_size=chunk).total <= budget
    assert estimate_memory(setup, grad_cache_chunk_size=largest + 1).total > budget
    assert f"keep all 64 negatives per step with --grad-cache-chunk-size {chunk}" in suggestion.note
    assert suggestion.as_dict()["grad_cache_chunk_size"] == chunk
    assert oom.suggest_settings(1000, setup).grad_cache_chunk_size is None  # it fits: nothing to add
    assert oom.largest_chunk_size(1 * GIB, setup) == 0


def test_out_of_memory_advice_offers_the_gradient_cache_first_and_a_smaller_chunk_once_on():
    setup = TrainingSetup(model_size="8b", batch_size=64)
    chunk = min(oom.largest_chunk_size(24 * GIB * oom.HEADROOM, setup), 32)
    tries = oom.oom_advice(setup, memory_gib=24).split("Try, in this order: ")[1]
    assert tries.startswith(f"--grad-cache-chunk-size {chunk} (the gradient cache")
    assert "--per-device-train-batch-size" in tries  # accumulation stays on the list
    on = oom.oom_advice(replace(setup, grad_cache_chunk_size=32), memory_gib=24)
    assert f"--grad-cache-chunk-size {chunk} " in on and chunk < 32
    unknown = oom.oom_advice(TrainingSetup(model_size=None, batch_size=64, grad_cache_chunk_size=16))
    assert "--grad-cache-chunk-size 8 " in unknown  # no estimate: half the chunk


def test_out_of_memory_advice_on_a_batch_that_nearly_fits_explains_the_headroom_and_halves_the_batch():
    """The 2B at batch 64 on 24 GiB: an estimate under 24 GiB but over the 90% a run can count on is called out
    as such, and the chunk offered is at most half the batch (not a chunk of 62 and one of 2)."""
    setup = TrainingSetup(model_size="2b", batch_size=64, max_visual_tokens=768)
    estimate = estimate_memory(setup).total_gib
    assert 24 * oom.HEADROOM < estimate < 24
    advice = oom.oom_advice(setup, memory_gib=24)
    assert (
        f"{estimate:.1f} GiB on this 24 GiB device, more than the 21.6 GiB (90%) a run can count on" in advice
    )
    assert oom.largest_chunk_size(24 * GIB * oom.HEADROOM, setup) > 32
    assert "--grad-cache-chunk-size 32 (" in advice
    assert "more than the" not in oom.oom_advice(setup, memory_gib=80)


def test_the_fastest_setting_that_fits_is_suggested():
    """Measured on an H200: without checkpointing a step took 0.72x the time, and the gradient cache 1.21x
    without it against 1.53x with it. So a batch that also fits without checkpointing is told so, and a cache
    chunk of at least 8 pages that fits without checkpointing is preferred to a larger one with it."""
    small = TrainingSetup(model_size="2b", batch_size=16)
    roomy = oom.suggest_settings(80, small)
    assert roomy.gradient_checkpointing is False and "--no-gradient-checkpointing" in roomy.note
    assert estimate_memory(small, gradient_checkpointing=False).total <= 80 * GIB * oom.HEADROOM
    assert oom.suggest_settings(20, small).gradient_checkpointing is None  # only with checkpointing

    setup = TrainingSetup(model_size="2b", batch_size=256)
    seen = set()
    for gib in range(20, 200, 10):
        suggestion = oom.suggest_settings(gib, setup)
        chunk, budget = suggestion.grad_cache_chunk_size, gib * GIB * oom.HEADROOM
        if chunk is None:
            continue
        seen.add(suggestion.gradient_checkpointing)
        fits = estimate_memory(
            setup, grad_cache_chunk_size=chunk, gradient_checkpointing=suggestion.gradient_checkpointing
        )
        assert fits.total <= budget
        if suggestion.gradient_checkpointing is False:
            assert chunk >= oom.FAST_CHUNK and "--no-gradient-checkpointing (" in suggestion.note
        else:
            assert oom.largest_chunk_size(budget, setup, gradient_checkpointing=False) < oom.FAST_CHUNK
    assert seen == {True, False}
