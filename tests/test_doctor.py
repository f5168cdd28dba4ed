"""The setup doctor: its report on this (CPU, offline) machine, and the hard failures that set its exit code."""

import importlib
import importlib.metadata
import json
import subprocess
import sys
import threading
import time

import pytest

from colqwen3_lib import doctor


@pytest.fixture(scope="module")
def report(tiny_path):
    return doctor.run_doctor(hub_timeout=1.0)


def test_report_on_this_machine_is_ok(report):
    assert report.ok, report.table()
    for name in ("python", *doctor.CHECKED_PACKAGES, "qwen3_vl", "tiny model"):
        assert report.check(name).status == doctor.OK, report.check(name)
    assert "Qwen3VLModel" in report.check("qwen3_vl").detail
    assert "offline checkpoint loads" in report.check("tiny model").detail
    assert "(1, 18, 128)" in report.check("tiny model").detail  # query: 8 text + 10 augmentation tokens


def test_report_describes_the_accelerator_and_attention(report):
    import torch

    if torch.cuda.is_available():
        assert "compute" in report.check("gpu").detail
        return
    assert report.check("gpu").status == doctor.WARN and "no CUDA device" in report.check("gpu").detail
    assert report.attention == "sdpa"
    assert "sdpa" in report.check("attention").detail and "CUDA GPU" in report.check("attention").detail
    flash = report.check("flash-attn")
    assert flash.status in (doctor.INFO, doctor.OK)
    if flash.status == doctor.INFO:
        assert "pip install flash-attn --no-build-isolation" in flash.detail


def test_report_has_disk_hub_and_verdicts(report):
    assert "GB free" in report.check("disk").detail
    assert report.check("hub").status in (doctor.OK, doctor.WARN, doctor.INFO)  # never a hard failure
    assert [(v["model"], v["batch"]) for v in report.verdicts] == [
        ("2b", 64),
        ("4b", 48),
        ("4b", 32),
        ("8b", 32),
        ("8b", 16),
    ]
    if report.gpu_memory_gib is None:
        assert {v["verdict"] for v in report.verdicts} == {"does not fit"}
    table = report.table()
    for text in ("python", "tiny model", "Recommended settings", "verdict", "Result: OK"):
        assert text in table
    assert json.loads(json.dumps(report.as_dict()))["ok"] is True


def test_command_line_prints_the_report_and_exits_zero():
    done = subprocess.run(
        [sys.executable, "-m", "colqwen3_lib.doctor", "--skip-tiny", "--json", "--hub-timeout", "1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    parsed = json.loads(done.stdout)
    assert parsed["ok"] is True
    assert {c["name"] for c in parsed["checks"]} >= {
        "python",
        "transformers",
        "qwen3_vl",
        "gpu",
        "attention",
        "hub",
    }


def test_old_transformers_is_a_hard_failure(monkeypatch, capsys):
    real_version = importlib.metadata.version
    monkeypatch.setattr(
        importlib.metadata, "version", lambda name: "4.56.2" if name == "transformers" else real_version(name)
    )
    check = {c.name: c for c in doctor.check_packages()}["transformers"]
    assert check.status == doctor.FAIL
    assert "4.56.2" in check.detail and ">=4.57" in check.detail and "pip install" in check.detail
    assert doctor.main(["--skip-tiny", "--hub-timeout", "0.5"]) == 1
    assert "hard failure" in capsys.readouterr().out


def test_missing_package_is_a_hard_failure(monkeypatch):
    real_version = importlib.metadata.version

    def version(name):
        if name == "peft":
            raise importlib.metadata.PackageNotFoundError(name)
        return real_version(name)

    monkeypatch.setattr(importlib.metadata, "version", version)
    check = {c.name: c for c in doctor.check_packages()}["peft"]
    assert check.status == doctor.FAIL and "not installed" in check.detail


def test_missing_qwen3vl_gives_the_reference_fix(monkeypatch):
    real_import = importlib.import_module

    def import_module(name, *args):
        if name == "transformers.models.qwen3_vl":
            raise ImportError("No module named 'transformers.models.qwen3_vl'")
        return real_import(name, *args)

    monkeypatch.setattr(doctor.importlib, "import_module", import_module)
    check = doctor.check_qwen3vl()
    assert check.status == doctor.FAIL
    assert 'pip install "transformers>=4.57.0"' in check.detail
    assert "from transformers.models.qwen3_vl import Qwen3VLModel" in check.detail


def test_hub_check_never_hangs(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    release = threading.Event()

    def hang(*args, **kwargs):
        release.wait(30)
        raise OSError("released by the test")

    monkeypatch.setattr(doctor.socket, "create_connection", hang)
    start = time.perf_counter()
    check = doctor.check_hub(timeout=0.5)
    release.set()  # let the abandoned connection thread end
    assert time.perf_counter() - start < 2
    assert check.status == doctor.WARN and "unreachable" in check.detail


def test_offline_mode_is_reported_not_failed(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert doctor.check_hub().status == doctor.INFO


def test_broken_tiny_path_is_a_hard_failure(monkeypatch, tiny_path):
    from colqwen3_lib import ColQwen3

    def broken(*args, **kwargs):
        raise OSError("model.safetensors is truncated")

    monkeypatch.setattr(ColQwen3, "from_pretrained", broken)
    check = doctor.check_tiny()
    assert check.status == doctor.FAIL and "truncated" in check.detail
