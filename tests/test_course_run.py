"""The whole course, tiny profile, executed with papermill as `make course` runs it (about 5 min on 2 cores)."""

import json

import pytest

from colqwen3_lib.course import NOTEBOOKS, run_course

pytestmark = [pytest.mark.notebooks, pytest.mark.slow]


@pytest.fixture(scope="module")
def course(tmp_path_factory):
    out = tmp_path_factory.mktemp("course")
    rows = run_course("tiny", out, progress=False)
    return out, {row["notebook"]: row for row in rows}


def test_every_notebook_runs_and_writes_its_metrics(course):
    out, rows = course
    assert list(rows) == list(NOTEBOOKS)
    assert all(row["status"] == "ok" for row in rows.values())
    for name in NOTEBOOKS:
        assert json.loads((out / name / "metrics.json").read_text()) == rows[name]["metrics"]
        assert (out / "html" / f"{name}.html").stat().st_size > 10_000  # rendered, figures embedded
    summary = json.loads((out / "summary.json").read_text())
    assert [r["notebook"] for r in summary] == list(NOTEBOOKS)


def test_setup_check_passes_on_this_machine(course):
    metrics = course[1]["00_setup_check"]["metrics"]
    assert metrics["ok"] and metrics["tiny_ok"] and metrics["n_failures"] == 0


def test_processor_notebook_respects_the_cap(course):
    metrics = course[1]["01_processor_and_visual_tokens"]["metrics"]
    assert 0 < metrics["visual_tokens"] <= metrics["max_visual_tokens"]
    assert metrics["grid"][0] * metrics["grid"][1] == metrics["visual_tokens"]


def test_model_notebook_checks_maxsim_by_hand(course):
    metrics = course[1]["02_model_and_late_interaction"]["metrics"]
    assert metrics["maxsim_matches_loops"] and metrics["embedding_dim"] == 128


def test_training_notebook_learns_and_hands_its_adapter_on(course):
    out, rows = course
    metrics = rows["03_lora_training"]["metrics"]
    assert metrics["final_loss"] < metrics["first_loss"] / 3
    assert (out / "03_lora_training" / "adapter" / "adapter_model.safetensors").exists()
    assert metrics["adapter_path"] == str(out / "03_lora_training" / "adapter")


def test_trained_adapter_beats_the_untrained_model(course):
    metrics = course[1]["04_vidore_eval"]["metrics"]
    assert metrics["trained"]
    assert metrics["ndcg_at_5_untrained"] < 0.4  # near chance: 24 queries over 32 pages per task
    assert metrics["ndcg_at_5"] >= 0.8


def test_oom_notebook_estimates_within_tolerance(course):
    metrics = course[1]["05_troubleshooting_oom"]["metrics"]
    assert metrics["max_abs_error"] <= 0.25
    assert metrics["finder_batch_size"] <= 24  # the simulated device fails above 24
