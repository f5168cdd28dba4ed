"""Evaluation results on disk (per-task JSON, results.json, summary tables) and their comparison."""

import pytest

from colqwen3_lib.metrics import SUMMARY_METRICS
from colqwen3_lib.results import benchmark_rows, compare_results, read_results, write_results


def _result(ndcg5: float, ndcg10: float) -> dict:
    metrics = {m: 0.5 for m in SUMMARY_METRICS} | {"ndcg_at_5": ndcg5, "ndcg_at_10": ndcg10}
    return {"format": "qa", "n_queries": 4, "n_pages": 8, "n_images": 8, "metrics": metrics, "seconds": {}}


def test_result_files_and_comparison(tmp_path):
    before = {"a": _result(0.2, 0.3), "b/c": _result(0.4, 0.5)}
    after = {"a": _result(0.5, 0.6), "b/c": _result(0.4, 0.7), "only_after": _result(1.0, 1.0)}
    write_results(before, tmp_path / "before", {"model_path": "x"})
    write_results(after, tmp_path / "after")
    assert (tmp_path / "before" / "b_c.json").exists()
    summary = (tmp_path / "before" / "summary.md").read_text()
    assert "| average | 8 | 16 | 30.00 | 40.00 |" in summary
    rows = compare_results(tmp_path / "before", tmp_path / "after" / "results.json")
    assert [r["task"] for r in rows] == ["a", "b/c", "average"]
    assert rows[0]["delta ndcg_at_5"] == pytest.approx(0.3)
    assert rows[-1]["delta ndcg_at_10"] == pytest.approx((0.3 + 0.2) / 2)
    assert read_results(tmp_path / "before" / "a.json")["a"]["metrics"]["ndcg_at_5"] == 0.2
    with pytest.raises(ValueError, match="share no task"):
        compare_results({"x": _result(0, 0)}, {"y": _result(0, 0)})
    with pytest.raises(ValueError, match="not an evaluation result"):
        (tmp_path / "other.json").write_text("{}")
        read_results(tmp_path / "other.json")


def test_benchmark_rows_average_each_benchmarks_main_score():
    v3 = {**_result(0.1, 0.4), "protocol": "mteb", "benchmark": "vidore-v3", "main_score": "ndcg_at_10"}
    results = {
        "a": {**_result(0.2, 0.3), "protocol": "mteb", "benchmark": "vidore-v1", "main_score": "ndcg_at_5"},
        "b": {**_result(0.4, 0.5), "protocol": "mteb", "benchmark": "vidore-v1", "main_score": "ndcg_at_5"},
        "c": v3,
        "d": {**_result(0.9, 0.9), "protocol": "mteb", "benchmark": None},
    }
    rows = benchmark_rows(results)
    assert [(r["benchmark"], r["main_score"], r["tasks"]) for r in rows] == [
        ("ViDoRe(v1)", "ndcg_at_5", "2/10"),
        ("ViDoRe(v3)", "ndcg_at_10", "1/8 (+2 private)"),
    ]
    assert rows[0]["score"] == pytest.approx(0.3) and rows[1]["score"] == pytest.approx(0.4)
    assert benchmark_rows({"old": _result(0.1, 0.1)}) == []  # results written before protocols had none


def test_rounded_rounds_every_float_for_display_and_nothing_else():
    from colqwen3_lib.results import rounded

    shown = rounded(
        {"ndcg": 0.8904166666666666, "per_task": {"a": [0.123456, 3]}, "name": "x", "ok": True}, 3
    )
    assert shown == {"ndcg": 0.89, "per_task": {"a": [0.123, 3]}, "name": "x", "ok": True}
