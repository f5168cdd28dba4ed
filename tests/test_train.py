"""The training CLI: the reference script's arguments and defaults, its outputs, its errors, and
`accelerate launch` with two CPU processes."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from colqwen3_lib.config import TINY_DEFAULTS, TINY_PAIRWISE_DEFAULTS
from colqwen3_lib.train import build_parser, config_from_args, main

REFERENCE_ARGUMENTS = {  # train_colqwen3_model.py's arguments and defaults, from its README
    "base_model_path": "Qwen/Qwen3-VL-2B-Instruct",
    "max_visual_tokens": 768,
    "lr": 2e-4,
    "tau": 0.02,
    "trainer": "hf",
    "loss": "ce",
    "peft": False,
}
SMALL_RUN = [
    "--base-model-path", "tiny",
    "--peft",
    "--per-device-train-batch-size", "8",
    "--max-visual-tokens", "16",
    "--max-steps", "2",
    "--save-steps", "1",
    "--eval-steps", "2",
    "--warmup-steps", "1",
]  # fmt: skip


def test_defaults_are_the_reference_scripts():
    config = config_from_args(["--output-dir", "out"])
    for name, value in REFERENCE_ARGUMENTS.items():
        assert getattr(config, name) == value, name
    assert config.per_device_train_batch_size == 64 and config.lora_rank == 32
    assert config.train_dataset == "vidore/colpali_train_set" and config.gradient_checkpointing


def test_the_reference_advanced_command_maps_one_to_one():
    argv = "--output-dir ./models/colqwen3-v1 --base-model-path Qwen/Qwen3-VL-2B-Instruct --max-visual-tokens 768 "
    argv += "--lr 2e-4 --tau 0.02 --loss pairwise --peft"
    config = config_from_args(argv.split())
    assert (config.output_dir, config.loss, config.peft, config.lr) == (
        "./models/colqwen3-v1",
        "pairwise",
        True,
        2e-4,
    )
    # The script's pairwise loss ignores --tau: ColbertPairwiseCELoss(normalize_scores=False), temperature 1.0.
    assert (config.tau, config.normalize_scores) == (1.0, False)


def test_tau_is_the_ce_temperature_and_pairwise_tau_the_pairwise_one():
    def tau(argv):
        return config_from_args(["--output-dir", "out", *argv.split()]).tau

    assert tau("--tau 0.05") == 0.05 and tau("--pairwise-tau 0.5") == 0.02  # ce; --pairwise-tau is not its
    assert tau("--loss pairwise --pairwise-tau 0.5 --tau 0.05") == 0.5
    assert tau("--loss pairwise --base-model-path tiny --tau 0.5") == TINY_PAIRWISE_DEFAULTS["tau"]
    for bad in ("0", "inf", "-1"):
        with pytest.raises(
            ValueError, match=f"--pairwise-tau must be a finite number above 0, got {float(bad)}"
        ):
            tau(f"--loss pairwise --pairwise-tau {bad}")


def test_tiny_defaults_apply_only_to_the_tiny_checkpoint_and_yield_to_flags():
    tiny = config_from_args(["--output-dir", "out", "--base-model-path", "tiny"])
    for name, value in TINY_DEFAULTS.items():
        assert getattr(tiny, name) == value, name
    explicit = config_from_args(
        ["--output-dir", "o", "--base-model-path", "tiny", "--lr", "1e-4", "--cache-pages"]
    )
    assert explicit.lr == 1e-4 and explicit.max_visual_tokens == TINY_DEFAULTS["max_visual_tokens"]
    no_checkpointing = config_from_args(["--output-dir", "o", "--no-gradient-checkpointing"])
    assert no_checkpointing.gradient_checkpointing is False and no_checkpointing.lr == 2e-4


def test_tiny_pairwise_gets_its_own_defaults_and_flags_still_win():
    pairwise = config_from_args(["--output-dir", "o", "--base-model-path", "tiny", "--loss", "pairwise"])
    for name, value in {**TINY_DEFAULTS, **TINY_PAIRWISE_DEFAULTS}.items():
        assert getattr(pairwise, name) == value, name
    assert pairwise.head_lr != pairwise.lr
    explicit = config_from_args(
        ["--output-dir", "o", "--base-model-path", "tiny", "--loss", "pairwise", "--head-lr", "1e-3"]
    )
    assert explicit.head_lr == 1e-3 and explicit.lr == TINY_PAIRWISE_DEFAULTS["lr"]
    # Only the tiny checkpoint's presets change with the loss: the reference defaults stay as they are.
    real = config_from_args(["--output-dir", "o", "--loss", "pairwise"])
    assert (real.lr, real.head_lr, real.per_device_train_batch_size) == (2e-4, None, 64)
    ce = config_from_args(["--output-dir", "o", "--base-model-path", "tiny"])
    assert ce.head_lr is None


def test_help_explains_every_argument():
    text = " ".join(build_parser().format_help().split())  # unwrapped
    for flag in (
        "--output-dir", "--base-model-path", "--max-visual-tokens", "--lr", "--tau", "--trainer", "--loss",
        "--peft", "--per-device-train-batch-size", "--gradient-accumulation-steps", "--num-train-epochs",
        "--max-steps", "--train-dataset", "--eval-dataset", "--attn-implementation", "--lora-rank", "--seed",
        "--resume-from-checkpoint", "--auto-batch-size", "--head-lr",
    ):  # fmt: skip
        assert flag in text, flag
    assert "default: 768" in text and "default: 0.0002" in text and "tiny: synthetic" in text
    for action in build_parser()._actions:
        assert action.help, action.dest


def test_a_run_writes_model_processor_config_and_metrics(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["--output-dir", str(out), *SMALL_RUN, "--trainer", "torch"]) == 0
    assert "trained 2 steps" in capsys.readouterr().out
    for name in (
        "adapter_model.safetensors",
        "adapter_config.json",
        "processor_config.json",
        "tokenizer.json",
    ):
        assert (out / name).exists(), name
    config = json.loads((out / "training_config.json").read_text())
    assert (config["lr"], config["tau"], config["max_visual_tokens"]) == (TINY_DEFAULTS["lr"], 0.02, 16)
    metrics = json.loads((out / "metrics.json").read_text())
    assert [e["step"] for e in metrics["train"]] == [1, 2]
    assert [e["step"] for e in metrics["eval"]] == [2] and metrics["eval"][0]["eval_loss"] > 0
    # Continuing from the last checkpoint (step 1) retrains step 2 to the same weights.
    adapter = load_file(out / "adapter_model.safetensors")
    assert (
        main(
            ["--output-dir", str(out), *SMALL_RUN, "--trainer", "torch", "--resume-from-checkpoint", "latest"]
        )
        == 0
    )
    assert json.loads((out / "metrics.json").read_text())["summary"]["steps_this_run"] == 1
    resumed = load_file(out / "adapter_model.safetensors")
    for key, value in adapter.items():
        assert torch.allclose(resumed[key], value, atol=1e-6), key


def test_errors_say_what_to_change(tmp_path, capsys):
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "model.safetensors").write_text("an earlier run")
    assert main(["--output-dir", str(tmp_path / "old"), *SMALL_RUN]) == 1
    assert "not empty" in capsys.readouterr().err
    assert (tmp_path / "old" / "model.safetensors").read_text() == "an earlier run"
    assert (
        main(["--output-dir", str(tmp_path / "big"), *SMALL_RUN, "--per-device-train-batch-size", "999"]) == 1
    )
    assert "--per-device-train-batch-size 256 or less" in capsys.readouterr().err
    assert main(["--output-dir", str(tmp_path / "r"), *SMALL_RUN, "--resume-from-checkpoint", "latest"]) == 1
    assert "no complete checkpoint" in capsys.readouterr().err


def test_the_module_runs_as_a_script():
    done = subprocess.run(
        [sys.executable, "-m", "colqwen3_lib.train", "--help"], capture_output=True, text=True
    )
    assert done.returncode == 0 and "--output-dir" in done.stdout


@pytest.mark.skipif(
    shutil.which("accelerate", path=str(Path(sys.executable).parent)) is None, reason="no accelerate"
)
def test_accelerate_launch_with_two_cpu_processes(tmp_path):
    """The HF trainer as two gloo processes: one output, world size 2.

    (`accelerate launch --cpu` starts a single process whatever --num_processes says; `--multi_gpu`
    starts them, and without a GPU they train on the CPU.)
    """
    out = tmp_path / "ddp"
    accelerate = str(Path(sys.executable).parent / "accelerate")
    command = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    command += ["--mixed_precision", "no"]
    command += ["--dynamo_backend", "no", "-m", "colqwen3_lib.train", "--output-dir", str(out), *SMALL_RUN]
    command += ["--per-device-train-batch-size", "4", "--num-threads", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    config = json.loads((out / "training_config.json").read_text())
    assert config["world_size"] == 2 and config["effective_batch_size"] == 8
    metrics = json.loads((out / "metrics.json").read_text())
    assert [e["step"] for e in metrics["train"]] == [1, 2]
    assert (out / "adapter_model.safetensors").exists()


@pytest.fixture(scope="module")
def other_architectures(tmp_path_factory):
    """A BERT and a GPT-2 checkpoint: what a user may point --base-model-path to by mistake."""
    from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

    folder = tmp_path_factory.mktemp("other-architectures")
    small = dict(vocab_size=100)
    BertModel(
        BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, **small)
    ).save_pretrained(folder / "bert")
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, **small)).save_pretrained(folder / "gpt2")
    return folder


@pytest.mark.parametrize(
    "base, message",
    [
        ("bert", "is in no known ColQwen3 layout: model_type='bert'"),
        ("gpt2", "is in no known ColQwen3 layout: model_type='gpt2'"),
        ("no-such-folder", "does not exist: no such checkpoint folder"),
    ],
)
def test_a_wrong_base_model_is_one_line_and_the_corrected_rerun_works(
    tmp_path, capsys, other_architectures, base, message
):
    out = tmp_path / "run"
    base_path = str(other_architectures / base)
    offline = [
        "--train-dataset",
        "synthetic",
        "--eval-dataset",
        "none",
    ]  # a non-tiny base gets the reference's
    assert main(["--output-dir", str(out), *SMALL_RUN, *offline, "--base-model-path", base_path]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert main(["--output-dir", str(out), *SMALL_RUN, "--trainer", "torch"]) == 0  # the same folder, reused


def test_an_empty_local_dataset_is_one_line(tmp_path, capsys):
    from datasets import Dataset

    Dataset.from_dict({"query": [], "image": []}).save_to_disk(str(tmp_path / "empty"))
    assert (
        main(["--output-dir", str(tmp_path / "run"), *SMALL_RUN, "--train-dataset", str(tmp_path / "empty")])
        == 1
    )
    assert "holds no data" in capsys.readouterr().err


@pytest.mark.slow
def test_ctrl_c_stops_a_run_with_exit_130_and_the_command_to_resume(tmp_path):
    """SIGINT, as Ctrl-C sends it, to a training process started with the default SIGINT disposition (a process
    put in the background by a non-interactive shell would ignore it: POSIX)."""
    import signal
    import subprocess
    import sys
    import time

    out, log = tmp_path / "run", tmp_path / "stderr.txt"
    args = ["--output-dir", str(out), "--base-model-path", "tiny", "--peft", "--max-steps", "400"]
    args += ["--save-steps", "2", "--per-device-train-batch-size", "8", "--max-visual-tokens", "16"]
    args += ["--eval-dataset", "none", "--trainer", "torch", "--collapse-patience", "0"]
    with open(log, "w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "colqwen3_lib.train", *args],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        deadline = time.monotonic() + 180
        while not list(out.glob("checkpoint-*")):  # older checkpoints are removed as new ones come
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.2)
        process.send_signal(signal.SIGINT)
        sent = time.monotonic()
        assert process.wait(timeout=60) == 130 and time.monotonic() - sent < 30
    error = log.read_text()
    assert "interrupted. The last checkpoint is" in error and "--resume-from-checkpoint" in error
    assert "Traceback" not in error
