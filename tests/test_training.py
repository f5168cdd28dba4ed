"""Training end to end (`training.train`): what a run checks before it starts, what it writes, that the two
trainers train the same, reloading what it wrote, surviving out-of-memory errors, and (slow) that the
tiny model learns the synthetic pages."""

import json
import statistics
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from colqwen3_lib import loop
from colqwen3_lib.checkpoints import latest_checkpoint
from colqwen3_lib.config import default_config
from colqwen3_lib.data import load_pairs
from colqwen3_lib.oom import TrainingOutOfMemoryError
from colqwen3_lib.training import build_model, train


def _adapter(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "adapter_model.safetensors")


def _assert_same_weights(a: dict, b: dict, atol=1e-5):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=1e-4, msg=key)


def _decoded():
    from datasets import Image

    return Image(decode=True)


# ------------------------------------------------------------------------------------ before a run


def test_a_batch_larger_than_the_data_says_what_fits(tmp_path, small_config):
    config = small_config(tmp_path / "out", per_device_train_batch_size=1000)
    with pytest.raises(ValueError, match=r"256 query-page pairs.*--per-device-train-batch-size 256 or less"):
        train(config)
    with pytest.raises(ValueError, match="at least 2 pages per step"):
        train(small_config(tmp_path / "out2", per_device_train_batch_size=1))


def test_a_non_empty_output_dir_is_never_overwritten(tmp_path, small_config):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="never overwritten. Choose a new --output-dir"):
        train(small_config(tmp_path))
    assert (tmp_path / "notes.txt").read_text() == "keep me"


# ------------------------------------------------------------------------------------------ trainers


def test_the_two_trainers_train_the_same(tmp_path, small_config, recwarn):
    logged = {"hf": [], "torch": []}
    results = {
        name: train(
            small_config(tmp_path / name, trainer=name, lora_dropout=0.0, max_steps=3, save_steps=10),
            on_log=logged[name].append,
        )
        for name in ("hf", "torch")
    }
    for name, result in results.items():  # the live log (for loss curves) is what metrics.json records
        assert [e["step"] for e in logged[name]] == [1, 2, 3]
        assert [e["loss"] for e in logged[name]] == pytest.approx(
            [e["loss"] for e in result.metrics["train"]]
        )
    hf_losses = [e["loss"] for e in results["hf"].metrics["train"]]
    torch_losses = [e["loss"] for e in results["torch"].metrics["train"]]
    assert len(hf_losses) == len(torch_losses) == 3
    assert hf_losses == pytest.approx(torch_losses, rel=1e-3)
    _assert_same_weights(_adapter(tmp_path / "hf"), _adapter(tmp_path / "torch"), atol=1e-4)
    assert not [str(w.message) for w in recwarn if "pin_memory" in str(w.message)]  # no GPU, nothing to pin


def test_outputs_are_written(torch_run):
    out = torch_run.output_dir
    for name in (
        "adapter_model.safetensors",
        "adapter_config.json",
        "processor_config.json",
        "tokenizer.json",
    ):
        assert (out / name).exists(), name
    config = json.loads((out / "training_config.json").read_text())
    assert (
        config["peft"] is True and config["max_visual_tokens"] == 16 and config["effective_batch_size"] == 8
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert [e["step"] for e in metrics["train"]] == [1, 2, 3, 4]
    assert all(e["loss"] > 0 for e in metrics["train"])
    assert metrics["summary"]["steps_per_second"] > 0
    lora = json.loads((out / "adapter_config.json").read_text())
    assert (lora["r"], lora["lora_alpha"], lora["lora_dropout"], lora["init_lora_weights"]) == (
        32,
        32,
        0.1,
        "gaussian",
    )
    assert lora["modules_to_save"] is None and "custom_text_proj" in lora["target_modules"]  # the reference's
    assert (out / "base_head.safetensors").exists()  # the head the adapter's LoRA was trained on


# ----------------------------------------------------------------------------------------- reloading


def test_a_trained_adapter_reloads_with_the_same_embeddings(torch_run):
    from peft import PeftModel

    from colqwen3_lib import ColQwen3
    from colqwen3_lib.fingerprint import restore_base_head

    pages = [
        row["image"] for row in load_pairs("synthetic", "train").dataset.cast_column("image", _decoded())
    ][:3]
    batch_pages = torch_run.processor.process_images(pages)
    batch_queries = torch_run.processor.process_queries(["a red bar chart", "blue table"])
    with torch.no_grad():
        expected = [torch_run.model(**batch_pages), torch_run.model(**batch_queries)]
        base = ColQwen3.from_pretrained("tiny")
        assert restore_base_head(torch_run.output_dir, base)  # the initial head, saved with the adapter
        reloaded = PeftModel.from_pretrained(base, torch_run.output_dir).eval()
        got = [reloaded(**batch_pages), reloaded(**batch_queries)]
        merged = reloaded.merge_and_unload()
        got_merged = [merged(**batch_pages), merged(**batch_queries)]
    for e, g, m in zip(expected, got, got_merged):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(m, e, atol=1e-4, rtol=1e-3)


def test_full_fine_tuning_saves_a_model_that_reloads(tmp_path, small_config):
    from colqwen3_lib import ColQwen3

    result = train(small_config(tmp_path, peft=False, max_steps=1, trainer="torch", lr=1e-3))
    trainable = sum(p.numel() for p in result.model.parameters() if p.requires_grad)
    assert trainable == sum(p.numel() for p in result.model.parameters())
    batch = result.processor.process_queries(["a red bar chart"])
    with torch.no_grad():
        torch.testing.assert_close(ColQwen3.from_pretrained(tmp_path).eval()(**batch), result.model(**batch))


@pytest.mark.parametrize("head_in_full", [False, True])
def test_a_run_at_dim_320_reloads_at_320(tmp_path, small_config, head_in_full):
    """--dim 320 on a base without a head: `load_model` builds the head at the adapter's size, then restores
    the saved initial head (LoRA on the head) or takes the whole head from the adapter (--head-in-full)."""
    from colqwen3_lib.model import load_model

    result = train(small_config(tmp_path, dim=320, max_steps=1, warmup_steps=0, head_in_full=head_in_full))
    model, processor = load_model("tiny", adapter=tmp_path, device="cpu", dtype=torch.float32)
    batch = processor.process_queries(["a red bar chart", "blue table"])
    with torch.no_grad():
        got, expected = model(**batch), result.model(**batch)
    assert model.dim == got.shape[-1] == 320
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_a_base_with_a_head_keeps_its_size_without_dim(tmp_path, small_config):
    """colpali-engine's runs start from a ColQwen3 base that has its (320-output) head: no --dim needed."""
    import dataclasses

    from colqwen3_lib import ColQwen3, ColQwen3Processor

    base = tmp_path / "base"
    ColQwen3.from_pretrained("tiny", dim=320).save_pretrained(base)
    ColQwen3Processor.from_pretrained("tiny").save_pretrained(base)
    config = dataclasses.replace(small_config(tmp_path / "run", max_steps=1), base_model_path=str(base))
    assert config.dim is None
    result = train(config)
    assert result.model.base_model.model.dim == 320
    assert not (tmp_path / "run" / "base_head.safetensors").exists()  # the base has its head


# ------------------------------------------------------------------------------------- out of memory


def _oom_when(condition):
    """A `contrastive_loss` that raises CUDA's out-of-memory error whenever condition(inputs, model) holds."""
    real = loop.contrastive_loss

    def patched(model, inputs, loss_fn):
        if condition(inputs, model):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return real(model, inputs, loss_fn)

    return patched


def test_out_of_memory_mid_run_explains_what_to_try_and_keeps_the_checkpoint(
    tmp_path, monkeypatch, small_config
):
    steps = []
    monkeypatch.setattr(loop, "contrastive_loss", _oom_when(lambda inputs, model: len(steps) >= 2))
    config = small_config(tmp_path, peft=False, trainer="torch", lr=1e-4, max_steps=4)
    with pytest.raises(TrainingOutOfMemoryError) as caught:
        train(config, hook=lambda step, checkpoint: steps.append(step) if checkpoint is None else None)
    message = str(caught.value)
    assert "--per-device-train-batch-size 8 " in message and "--max-visual-tokens 16" in message
    assert "gradient checkpointing off" in message and "full fine-tuning" in message
    assert "--per-device-train-batch-size 4 --gradient-accumulation-steps 2" in message
    assert "--peft" in message and "drop --no-gradient-checkpointing" in message
    checkpoint = tmp_path / "checkpoint-2"
    assert f"--resume-from-checkpoint {checkpoint}" in message
    assert latest_checkpoint(tmp_path) == checkpoint
    assert load_file(checkpoint / "model.safetensors")  # intact: it loads


def test_auto_batch_size_halves_the_batch_until_it_fits(tmp_path, monkeypatch, small_config):
    too_big = _oom_when(lambda inputs, model: inputs["doc_input_ids"].shape[0] > 4)
    monkeypatch.setattr(loop, "contrastive_loss", too_big)
    with pytest.raises(TrainingOutOfMemoryError, match="--auto-batch-size"):
        train(small_config(tmp_path / "plain", per_device_train_batch_size=16, max_steps=2, trainer="torch"))
    result = train(
        small_config(
            tmp_path / "auto",
            per_device_train_batch_size=16,
            max_steps=2,
            auto_batch_size=True,
            trainer="torch",
        )
    )
    summary = result.metrics["summary"]
    assert (summary["per_device_train_batch_size"], summary["gradient_accumulation_steps"]) == (4, 4)
    assert summary["global_step"] == 2
    saved = json.loads((tmp_path / "auto" / "training_config.json").read_text())
    assert saved["effective_batch_size"] == 16 and saved["per_device_train_batch_size"] == 4


# ------------------------------------------------------------------------------------------- learning


# ------------------------------------------------------------------------------- a run that stops learning


def _collapsed(build):
    """`training.build_model` whose head maps every token to one vector: all embeddings equal, every score tied."""

    def build_collapsed(config):
        model, processor = build(config)
        head = model.get_submodule("base_model.model.custom_text_proj.base_layer")
        with torch.no_grad():
            head.weight.zero_()
            head.bias.copy_(torch.linspace(-1, 1, head.bias.numel()))
        return model, processor

    return build_collapsed


@pytest.mark.parametrize("trainer", ["torch", "hf"])
def test_a_run_whose_embeddings_collapse_stops_with_advice_and_writes_no_model(
    tmp_path, small_config, monkeypatch, trainer
):
    from colqwen3_lib import training
    from colqwen3_lib.losses import CollapsedTrainingError

    monkeypatch.setattr(training, "build_model", _collapsed(training.build_model))
    config = small_config(
        tmp_path / "out", trainer=trainer, max_steps=12, save_steps=100, collapse_patience=5
    )
    with pytest.raises(
        CollapsedTrainingError, match="every query scored all pages of its batch alike"
    ) as err:
        train(config)
    assert err.value.step == 5 and err.value.spread < 0.05
    assert "--collapse-patience 0" in str(err.value) and "No checkpoint and no model were written" in str(
        err.value
    )
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


def test_the_command_line_says_a_run_collapsed_in_one_line(tmp_path, monkeypatch, capsys):
    from colqwen3_lib import training
    from colqwen3_lib.train import main

    monkeypatch.setattr(training, "build_model", _collapsed(training.build_model))
    argv = ["--output-dir", str(tmp_path / "out"), "--base-model-path", "tiny", "--peft", "--max-steps", "8"]
    argv += ["--per-device-train-batch-size", "8", "--max-visual-tokens", "16", "--eval-dataset", "none"]
    assert main(argv + ["--collapse-patience", "3"]) == 1
    error = capsys.readouterr().err
    assert error.startswith("error: Training stopped at step 3") and "Traceback" not in error


def test_collapse_patience_0_trains_a_collapsed_run_to_the_end(tmp_path, small_config, monkeypatch):
    from colqwen3_lib import training

    monkeypatch.setattr(training, "build_model", _collapsed(training.build_model))
    result = train(small_config(tmp_path / "out", trainer="torch", max_steps=6, collapse_patience=0))
    assert result.metrics["summary"]["global_step"] == 6


def test_the_guard_counts_tied_steps_in_a_row():
    from colqwen3_lib.losses import TIED_SPREAD, CollapsedTrainingError, CollapseGuard

    guard = CollapseGuard(patience=3)
    for step, spread in enumerate([0.0, 0.0, 1.0, 0.0, 0.0], start=1):  # a real spread resets the count
        guard.update(step, spread)
    with pytest.raises(CollapsedTrainingError) as err:
        guard.update(6, TIED_SPREAD / 2)
    assert (err.value.step, err.value.steps) == (6, 3)
    never = CollapseGuard(patience=0)
    for step in range(100):
        never.update(step, 0.0)


@pytest.fixture
def one_thread():
    """One torch thread for the test, then the process's own count again: the same sums on every machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["ce", "pairwise"])
def test_the_tiny_model_learns_the_synthetic_pages(tmp_path, loss, one_thread):
    """Held-out NDCG@5 from near chance to >= 0.8 with the tiny defaults (about 1 and 3 CPU minutes).

    Each loss with its own tiny defaults: pairwise takes 8 pages per step and a faster head
    (`TINY_PAIRWISE_DEFAULTS`), without which its hardest negative collapses the random tiny model.
    NDCG@5 is the kit's ViDoRe evaluation, averaged over the synthetic test tasks.
    """
    from transformers import set_seed

    from colqwen3_lib.evaluation import evaluate_model
    from colqwen3_lib.synthetic import SYNTHETIC_TASKS

    config = default_config(tmp_path, "tiny", loss=loss, peft=True, trainer="torch")

    def ndcg(model, processor):
        results = evaluate_model(model, processor, list(SYNTHETIC_TASKS), show_progress=False)
        return statistics.mean(result["metrics"]["ndcg_at_5"] for result in results.values())

    set_seed(config.seed)
    before = ndcg(*build_model(config))
    result = train(config)
    after = ndcg(result.model, result.processor)
    assert before < 0.3
    assert after >= 0.8  # the time it takes is measured by benchmarks/bench_training.py, not here


def test_a_loss_at_chance_after_the_warm_up_is_warned_about_once(caplog):
    """ln(32) = 3.466 is the loss of scores that ignore the page; 20 steps whose mean stays within 0.05 of it,
    after the warm-up, earn one warning with what to try; a run below it earns none."""
    import logging
    import math

    from colqwen3_lib.losses import CollapseGuard

    chance = math.log(32)
    stuck, learning = CollapseGuard(patience=20, after_step=10), CollapseGuard(patience=20, after_step=10)
    with caplog.at_level(logging.WARNING, logger="colqwen3_lib.losses"):
        for step in range(1, 80):
            stuck.update(step, spread=1.9, loss=chance + (0.08 if step % 2 else -0.1), chance=chance)
            learning.update(step, spread=2.5, loss=max(0.5, chance - 0.02 * step), chance=chance)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and warnings[0].startswith("step 30: the loss has stayed at chance level")
    assert "--warmup-steps" in warnings[0]


@pytest.mark.slow
def test_a_first_run_into_an_empty_cache_trains_what_every_later_run_trains(tmp_path):
    """Building the tiny checkpoint and the synthetic pages draws random numbers; done before the seed, the first
    run after install (an empty cache) gives bit for bit the adapter and initial head of later runs, each in a
    process of its own."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "COLQWEN3_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    args = ["--base-model-path", "tiny", "--peft", "--max-steps", "3", "--per-device-train-batch-size", "8"]
    args += ["--max-visual-tokens", "16", "--eval-dataset", "none", "--trainer", "torch"]
    runs = []
    for name in ("empty cache", "warm cache", "warm again"):
        out = tmp_path / name.replace(" ", "-")
        done = subprocess.run(
            [sys.executable, "-m", "colqwen3_lib.train", "--output-dir", str(out), *args],
            env=env,
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        runs.append({**_adapter(out), **load_file(out / "base_head.safetensors")})
    for later in runs[1:]:
        assert later.keys() == runs[0].keys()
        assert all(torch.equal(later[k], runs[0][k]) for k in runs[0])
