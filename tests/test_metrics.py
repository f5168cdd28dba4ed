"""Retrieval metrics as ViDoRe computes them, against hand-computed values."""

import math

import pytest

from colqwen3_lib.metrics import K_VALUES, retrieval_metrics

LOG2_3 = math.log2(3)


def test_metrics_single_relevant_page_at_rank_three():
    metrics = retrieval_metrics({"q": {"d1": 1}}, {"q": {"d1": 0.2, "d2": 0.9, "d3": 0.5}})
    assert metrics["ndcg_at_1"] == 0.0
    assert metrics["ndcg_at_3"] == pytest.approx(1 / math.log2(4))
    assert metrics["ndcg_at_5"] == pytest.approx(0.5)
    assert metrics["mrr_at_1"] == 0.0 and metrics["mrr_at_3"] == pytest.approx(1 / 3)
    assert metrics["recall_at_1"] == 0.0 and metrics["recall_at_3"] == 1.0
    assert metrics["map_at_5"] == pytest.approx(1 / 3)
    assert metrics["precision_at_1"] == 0.0
    expected = {f"{m}_at_{k}" for m in ("ndcg", "map", "recall", "precision", "mrr") for k in K_VALUES}
    assert set(metrics) == expected


def test_metrics_graded_relevance_and_unjudged_queries():
    qrels = {"q1": {"d2": 2, "d3": 1}, "q2": {"d1": 1}}
    run = {
        "q1": {"d0": 0.9, "d1": 0.1, "d2": 0.5, "d3": 0.3},  # ranks d0, d2, d3, d1
        "q2": {"d0": 0.1, "d1": 0.8},
        "q3": {"d0": 0.5},  # no judgements: not averaged
    }
    metrics = retrieval_metrics(qrels, run)
    q1_ndcg = (2 / LOG2_3 + 1 / 2) / (2 + 1 / LOG2_3)  # gain = relevance, discount log2(rank + 1)
    assert metrics["ndcg_at_5"] == pytest.approx((q1_ndcg + 1) / 2)
    assert metrics["ndcg_at_1"] == pytest.approx(0.5)
    assert metrics["mrr_at_5"] == pytest.approx((1 / 2 + 1) / 2)


def test_metrics_need_judged_queries():
    with pytest.raises(ValueError, match="relevance judgements"):
        retrieval_metrics({"a": {"d": 1}}, {"b": {"d": 1.0}})
