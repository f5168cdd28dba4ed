"""Checkpoints: only complete ones count, `latest` is the last of them, and a run interrupted right after
one resumes to the weights of an uninterrupted run, with either trainer."""

import pytest
import torch
from safetensors.torch import load_file

from colqwen3_lib.checkpoints import checkpoints, latest_checkpoint, resolve_resume
from colqwen3_lib.training import train


def _adapter(path):
    return load_file(path / "adapter_model.safetensors")


def _assert_same_weights(a: dict, b: dict, atol=1e-5):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=1e-4, msg=key)


def test_only_complete_checkpoints_count_in_step_order(tmp_path, small_config):
    for name, state in (
        ("checkpoint-2", "training_state.json"),  # the torch loop's
        ("checkpoint-10", "trainer_state.json"),  # the HF Trainer's
        ("checkpoint-12", None),  # killed before its state file was written
        (".tmp-checkpoint-14", "training_state.json"),  # not yet renamed into place
        ("checkpoint-x", "training_state.json"),
    ):
        (tmp_path / name).mkdir()
        if state:
            (tmp_path / name / state).write_text("{}")
    assert checkpoints(tmp_path) == [tmp_path / "checkpoint-2", tmp_path / "checkpoint-10"]
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-10"
    assert latest_checkpoint(tmp_path / "missing") is None
    assert (
        resolve_resume(small_config(tmp_path, resume_from_checkpoint="latest")) == tmp_path / "checkpoint-10"
    )
    with pytest.raises(ValueError, match="not a complete checkpoint directory"):
        resolve_resume(small_config(tmp_path, resume_from_checkpoint=str(tmp_path / "checkpoint-12")))
    with pytest.raises(ValueError, match="holds no complete checkpoint"):
        resolve_resume(small_config(tmp_path / "empty", resume_from_checkpoint="latest"))


@pytest.mark.parametrize("trainer", ["torch", "hf"])
def test_resume_after_an_interruption_reaches_the_same_weights(tmp_path, torch_run, trainer, small_config):
    if trainer == "torch":
        reference = _adapter(torch_run.output_dir)
    else:
        reference = _adapter(train(small_config(tmp_path / "reference", trainer="hf")).output_dir)

    def interrupt(step, checkpoint):
        if checkpoint is not None and step == 2:
            raise KeyboardInterrupt  # as Ctrl-C right after the checkpoint at step 2

    out = tmp_path / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        train(small_config(out, trainer=trainer), hook=interrupt)
    assert latest_checkpoint(out) == out / "checkpoint-2"
    assert not (out / "adapter_model.safetensors").exists()  # no final model from an interrupted run
    result = train(small_config(out, trainer=trainer, resume_from_checkpoint="latest"))
    _assert_same_weights(_adapter(out), reference)
    assert result.metrics["summary"]["global_step"] == 4
    assert [e["step"] for e in result.metrics["train"]] == [
        1,
        2,
        3,
        4,
    ]  # the resumed run keeps the earlier log
