"""Checkpoints: only complete ones count, `latest` is the last of them, and a run interrupted right after
one (Ctrl-C in the process, or `kill -9` of a process) resumes to the weights of an uninterrupted run, with either
trainer."""

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


KILL_AT_THE_CHECKPOINT = """
import os, signal, sys
from colqwen3_lib.train import config_from_args
from colqwen3_lib.training import train

def kill(step, checkpoint):
    if checkpoint is not None and step == 2:
        os.kill(os.getpid(), signal.SIGKILL)  # kill -9, right after the checkpoint at step 2 is complete

train(config_from_args(sys.argv[1:]), hook=kill)
"""


@pytest.mark.slow
@pytest.mark.parametrize("trainer", ["torch", "hf"])
def test_a_run_killed_at_a_checkpoint_resumes_to_the_uninterrupted_runs_files_bit_for_bit(tmp_path, trainer):
    """`kill -9` right after a checkpoint, then `--resume-from-checkpoint latest`: the final adapter and head equal
    those of a run that was never stopped, bit for bit; each run is a process of its own on one thread."""
    import os
    import signal
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["--base-model-path", "tiny", "--peft", "--max-steps", "4", "--save-steps", "2"]
    args += ["--warmup-steps", "1", "--trainer", trainer]
    args += ["--per-device-train-batch-size", "8", "--max-visual-tokens", "16", "--eval-dataset", "none"]

    def run(*command, output_dir):
        command = [sys.executable, *command, "--output-dir", str(output_dir), *args]
        return subprocess.run(command, env=env, capture_output=True, text=True)

    reference, killed = tmp_path / "uninterrupted", tmp_path / "killed"
    done = run("-m", "colqwen3_lib.train", output_dir=reference)
    assert done.returncode == 0, done.stderr[-2000:]
    done = run("-c", KILL_AT_THE_CHECKPOINT, output_dir=killed)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    assert latest_checkpoint(killed) == killed / "checkpoint-2"
    assert not (killed / "adapter_model.safetensors").exists()
    done = run("-m", "colqwen3_lib.train", "--resume-from-checkpoint", "latest", output_dir=killed)
    assert done.returncode == 0, done.stderr[-2000:]
    files = sorted(p.name for p in reference.glob("*.safetensors"))
    assert "adapter_model.safetensors" in files
    assert files == sorted(p.name for p in killed.glob("*.safetensors"))
    for name in files:
        expected, resumed = load_file(reference / name), load_file(killed / name)
        assert expected.keys() == resumed.keys()
        assert all(torch.equal(resumed[key], expected[key]) for key in expected), name
