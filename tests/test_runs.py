"""A training run's folder under faults and bad input: nothing of a user's is overwritten, nothing is run from
a checkpoint, a resume keeps the run's defining settings, a failed start does not block the corrected rerun."""

import errno
import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from colqwen3_lib import loop
from colqwen3_lib.checkpoints import latest_checkpoint
from colqwen3_lib.config import CONFIG_FILE
from colqwen3_lib.losses import NonFiniteLossError
from colqwen3_lib.runs import HISTORY_FILE
from colqwen3_lib.training import train


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, small_config, synthetic):
    """A 4-step torch-loop run with a checkpoint at step 2."""
    folder = tmp_path_factory.mktemp("finished")
    train(small_config(folder, trainer="torch"))
    return folder


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_a_folder_of_user_files_is_refused_even_when_resuming_another_run(
    tmp_path, small_config, finished_run
):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "README.md").write_text("my notes")
    (mine / "metrics.json").write_text('{"mine": true}')
    before = _files(mine)
    config = small_config(mine, trainer="torch", resume_from_checkpoint=str(finished_run / "checkpoint-2"))
    with pytest.raises(FileExistsError, match="never overwritten"):
        train(config)
    assert _files(mine) == before


def test_another_runs_checkpoint_continues_into_an_empty_folder(tmp_path, small_config, finished_run):
    result = train(
        small_config(tmp_path, trainer="torch", resume_from_checkpoint=str(finished_run / "checkpoint-2"))
    )
    assert result.metrics["summary"]["global_step"] == 4
    history = json.loads((tmp_path / HISTORY_FILE).read_text())
    assert history[0]["resumed_from"] == str(finished_run / "checkpoint-2")


class _RunsCode:
    """Pickles to a call of os.system: what a crafted optimizer.pt would hold."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_optimizer_state_is_never_unpickled(tmp_path, small_config, finished_run):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    marker = tmp_path / "code-ran"
    with open(run / "checkpoint-2" / "optimizer.pt", "wb") as f:
        pickle.dump(_RunsCode(marker), f, protocol=2)  # the protocol torch.save writes
    with pytest.raises(ValueError, match="does not unpickle"):
        train(small_config(run, trainer="torch", max_steps=6, resume_from_checkpoint="latest"))
    assert not marker.exists()


@pytest.mark.parametrize(
    "change, named",
    [
        (dict(loss="pairwise"), "--loss was 'ce', now 'pairwise'"),
        (dict(lora_rank=8), "--lora-rank was 32, now 8"),
        (dict(trainer="hf"), "--trainer was 'torch', now 'hf'"),
        (dict(tau=0.05), "--tau was 0.02, now 0.05"),
        (dict(seed=1), "--seed was 0, now 1"),
        (dict(per_device_train_batch_size=4), "--per-device-train-batch-size was 8, now 4"),
    ],
)
def test_a_resume_that_changes_what_defines_the_run_is_refused(small_config, finished_run, change, named):
    record = (finished_run / CONFIG_FILE).read_text()
    config = small_config(
        finished_run, **{"trainer": "torch", "max_steps": 6, **change}, resume_from_checkpoint="latest"
    )
    with pytest.raises(ValueError, match="cannot resume") as refused:
        train(config)
    assert named in str(refused.value)
    assert (finished_run / CONFIG_FILE).read_text() == record  # the run's record is untouched


def test_allowed_changes_are_recorded_without_rewriting_the_runs_record(tmp_path, small_config, finished_run):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    record = (run / CONFIG_FILE).read_text()
    train(small_config(run, trainer="torch", max_steps=6, lr=1e-3, resume_from_checkpoint="latest"))
    assert (run / CONFIG_FILE).read_text() == record
    (entry,) = json.loads((run / HISTORY_FILE).read_text())
    assert entry["changed"] == {"lr": [5e-3, 1e-3], "max_steps": [4, 6]}


def test_a_failed_start_leaves_a_folder_the_corrected_command_reuses(tmp_path, small_config):
    with pytest.raises(ValueError, match="does not exist"):
        train(small_config(tmp_path, train_dataset=str(tmp_path / "no-such-dataset")))
    assert (tmp_path / CONFIG_FILE).exists()  # the record of the failed start
    with pytest.raises(ValueError, match="no complete checkpoint"):
        train(small_config(tmp_path, resume_from_checkpoint="latest"))
    result = train(small_config(tmp_path, max_steps=2))  # the corrected command
    assert result.metrics["summary"]["global_step"] == 2


def test_a_non_finite_loss_stops_training_and_writes_no_model(tmp_path, small_config, monkeypatch):
    real = loop.contrastive_loss
    calls = []

    def nan_from_the_third_batch(model, inputs, loss_fn):
        calls.append(1)
        loss = real(model, inputs, loss_fn)
        return loss * float("nan") if len(calls) >= 3 else loss

    monkeypatch.setattr(loop, "contrastive_loss", nan_from_the_third_batch)
    with pytest.raises(NonFiniteLossError) as stopped:
        train(small_config(tmp_path, trainer="torch"))
    message = str(stopped.value)
    assert "nan at step 3" in message and f"--resume-from-checkpoint {tmp_path / 'checkpoint-2'}" in message
    assert not (tmp_path / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("damaged", ["training_state.json", "adapter_model.safetensors"])
def test_a_damaged_checkpoint_is_named_with_the_one_to_use_instead(
    tmp_path, small_config, finished_run, damaged
):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    (run / "checkpoint-1").mkdir()  # an earlier complete checkpoint to fall back to
    for name in ("training_state.json", "adapter_model.safetensors"):
        shutil.copy(run / "checkpoint-2" / name, run / "checkpoint-1" / name)
    file = run / "checkpoint-2" / damaged
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    with pytest.raises(ValueError, match=f"damaged: {damaged}") as refused:
        train(small_config(run, trainer="torch", max_steps=6, resume_from_checkpoint="latest"))
    assert f"--resume-from-checkpoint {run / 'checkpoint-1'}" in str(refused.value)


@pytest.mark.parametrize(
    "failure",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        RuntimeError(
            "[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0"
        ),  # torch.save's own
    ],
    ids=["ENOSPC", "torch.save"],
)
def test_a_full_disk_during_a_save_says_so_and_keeps_the_last_checkpoint(
    tmp_path, small_config, monkeypatch, failure
):
    from colqwen3_lib import checkpoints

    real = checkpoints.torch.save

    def full_from_the_second_save(obj, path, *args, **kwargs):
        if "checkpoint-4" in str(path):
            raise failure
        return real(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpoints.torch, "save", full_from_the_second_save)
    with pytest.raises(OSError, match="no space left") as failed:
        train(small_config(tmp_path, trainer="torch", max_steps=6))
    assert "GiB free there now" in str(failed.value)
    assert f"--resume-from-checkpoint {tmp_path / 'checkpoint-2'}" in str(failed.value)
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-2"
    monkeypatch.undo()
    assert train(small_config(tmp_path, trainer="torch", max_steps=6, resume_from_checkpoint="latest"))


@pytest.mark.parametrize(
    "setting, message",
    [
        (dict(lr=float("inf")), "--lr must be a finite number above 0"),
        (dict(warmup_steps=-1), "--warmup-steps must be at least 0"),
        (dict(logging_steps=0), "--logging-steps must be at least 1"),
        (dict(eval_steps=0), "--eval-steps must be at least 1"),
        (dict(save_steps=0), "--save-steps must be at least 1"),
        (dict(num_threads=-1), "--num-threads must be at least 1"),
        (dict(max_steps=0, num_train_epochs=0), "nothing to train"),
    ],
)
def test_bad_numbers_are_refused_before_anything_is_written(tmp_path, small_config, setting, message):
    with pytest.raises(ValueError, match=message):
        small_config(tmp_path / "run", **setting)
    assert not (tmp_path / "run").exists()


def test_an_output_dir_that_is_a_file_is_refused(tmp_path, small_config):
    file = tmp_path / "a-file"
    file.write_text("keep me")
    with pytest.raises(ValueError, match="is a file"):
        train(small_config(file))
    assert file.read_text() == "keep me"


def test_a_dataset_saved_without_a_test_split_gives_no_eval_loss(tmp_path, small_config, synthetic, caplog):
    from colqwen3_lib.data import load_split

    single = tmp_path / "single"
    load_split("synthetic", "train").select(range(16)).save_to_disk(str(single))  # a Dataset, no splits
    config = small_config(tmp_path / "run", train_dataset=str(single), eval_dataset=None, max_steps=2)
    result = train(config)
    assert result.metrics["eval"] == []
    assert "no evaluation loss" in caplog.text and "no split 'test'" in caplog.text


def test_the_kits_torch_checkpoints_load_without_pickled_objects(finished_run):
    for name in ("optimizer.pt", "scheduler.pt", "rng_state_0.pth"):
        assert torch.load(finished_run / "checkpoint-2" / name, weights_only=True) is not None
