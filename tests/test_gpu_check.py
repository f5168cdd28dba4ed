"""benchmarks/gpu_check.py, the GPU acceptance check, run in its dry-run mode on the CPU so that its logic
cannot rot between the times a GPU is at hand: every section runs and reports, none fails."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

PATH = Path(__file__).parents[1] / "benchmarks" / "gpu_check.py"


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_every_section_runs_and_reports_in_a_dry_run(tmp_path):
    gpu_check = _gpu_check()
    report, jsonl = tmp_path / "report.md", tmp_path / "check.jsonl"
    threads = torch.get_num_threads()
    try:
        gpu_check.main(["--dry-run", "--diagnose", "--report", str(report), "--jsonl", str(jsonl)])
    finally:
        torch.set_num_threads(threads)
    text = report.read_text()
    assert "**Failed**" not in text and "| failed" not in text
    for title in gpu_check.SECTIONS:
        assert f"## {title}\n" in text
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    parts = {r["part"] for r in records}
    assert {
        "machine",
        "attention",
        "diagnose",
        "training",
        "maxsim",
        "grad_cache",
        "embedding",
        "memory",
    } <= parts
    assert not [r for r in records if "error" in r]
    attention = [r for r in records if r["part"] == "attention" and "out" in r]
    assert attention and all(r[k] < 1e-3 for r in attention for k in ("out", "dq", "dk", "dv"))
    maxsim = report.read_text().split("## MaxSim")[1]
    assert "max |error| " in maxsim and float(maxsim.split("max |error| ")[1].split(".\n")[0]) < 1e-5
    assert "| goal | measured |" in text and "pass |" not in text  # a dry run measures no goal


def test_a_dry_run_needs_its_own_report_and_a_real_run_needs_a_gpu(tmp_path, capsys):
    gpu_check = _gpu_check()
    with pytest.raises(SystemExit):
        gpu_check.main(["--dry-run"])
    assert "--dry-run needs --report" in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            gpu_check.main(["--report", str(tmp_path / "r.md")])
        assert "no CUDA GPU is visible" in capsys.readouterr().err
