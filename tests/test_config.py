"""Training settings: what `TrainConfig` refuses, batches across processes, and a run's config as the
memory setup that out-of-memory advice and estimates are computed for."""

import dataclasses

import pytest
import torch

from colqwen3_lib.config import TrainConfig, default_config, eval_batch_size


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(trainer="jax"), "trainer='jax' is not one of"),
        (dict(loss="triplet"), "loss='triplet' is not one of"),
        (
            dict(attn_implementation="flash_attention_3"),
            "attn_implementation='flash_attention_3' is not one of",
        ),
        (dict(per_device_train_batch_size=0), "per.device.train.batch.size must be at least 1"),
        (dict(max_steps=-1, num_train_epochs=0), "nothing to train"),
    ],
)
def test_invalid_settings_are_refused(tmp_path, bad, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(output_dir=str(tmp_path), **bad)


def test_batches_across_processes(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    config = default_config(tmp_path, "tiny", per_device_train_batch_size=8, gradient_accumulation_steps=3)
    assert config.effective_batch_size == 8 * 3 * 2
    assert eval_batch_size(config, None) == 16  # the reference's evaluation batch
    assert (
        eval_batch_size(dataclasses.replace(config, per_device_eval_batch_size=None), None) == 8
    )  # the training's
    assert eval_batch_size(config, 10) == 5  # no larger than each process's share of the rows
    assert eval_batch_size(config, 1) == 1


def test_memory_setup_describes_the_run(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    reference = default_config(tmp_path).memory_setup()
    assert (reference.model_size, reference.batch_size, reference.max_visual_tokens) == ("2b", 64, 768)
    assert (reference.lora, reference.gradient_checkpointing) == (False, True)
    assert (reference.dtype, reference.device) == ("float32", "cpu")
    eight = default_config(
        tmp_path,
        "Qwen/Qwen3-VL-8B-Instruct",
        peft=True,
        lora_rank=16,
        per_device_train_batch_size=16,
        attn_implementation="sdpa",
    ).memory_setup()
    assert (eight.model_size, eight.lora, eight.lora_rank, eight.batch_size) == ("8b", True, 16, 16)
    assert eight.attn_implementation == "sdpa"
    assert default_config(tmp_path, "tiny").memory_setup().model_size == "tiny"
    assert default_config(tmp_path, "/models/another-checkpoint").memory_setup().model_size is None


def test_pages_are_embedded_at_the_size_training_used(tmp_path):
    from colqwen3_lib import ColQwen3Processor
    from colqwen3_lib.config import trained_page_size

    assert trained_page_size("tiny") == 32  # the tiny run's
    assert trained_page_size("Qwen/Qwen3-VL-2B-Instruct") == 768  # the reference README's
    ColQwen3Processor.from_pretrained("tiny", max_num_visual_tokens=48).save_pretrained(tmp_path / "adapter")
    assert trained_page_size("tiny", tmp_path / "adapter") == 48  # the adapter's own, saved with it
