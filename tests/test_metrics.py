"""Retrieval metrics under both protocols, against hand-computed values and mteb's own scoring."""

import math
import random

import pytest

from colqwen3_lib.metrics import (
    K_VALUES,
    MTEB_DECIMALS,
    MTEB_K_VALUES,
    PROTOCOL,
    PROTOCOLS,
    mteb_metrics,
    protocol_metrics,
    retrieval_metrics,
)

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


# ------------------------------------------------------------------ the mteb protocol


def test_mteb_metrics_keys_rounding_and_dropped_queries():
    qrels = {"q1": {"d2": 2, "d3": 1}, "q2": {"d1": 1}, "q4": {"d0": 0}}
    run = {
        "q1": {"d0": 0.9, "d1": 0.1, "d2": 0.5, "d3": 0.3},
        "q2": {"d0": 0.1, "d1": 0.8},
        "q3": {"d0": 0.5},  # no judgements: dropped
        "q4": {"d0": 0.5},  # judged, but nothing relevant: kept, scores 0 (as mteb keeps it)
    }
    metrics = mteb_metrics(qrels, run)
    expected = {
        f"{m}_at_{k}"
        for m in ("ndcg", "map", "recall", "precision", "hit_rate", "mrr")
        for k in MTEB_K_VALUES
    }
    assert set(metrics) == expected
    q1_ndcg = (2 / LOG2_3 + 1 / 2) / (2 + 1 / LOG2_3)
    assert metrics["ndcg_at_5"] == round((q1_ndcg + 1 + 0) / 3, MTEB_DECIMALS)
    assert metrics["mrr_at_5"] == pytest.approx((1 / 2 + 1 + 0) / 3, abs=1e-15)  # not rounded
    assert metrics["hit_rate_at_1"] == round(1 / 3, MTEB_DECIMALS)


def test_mteb_metrics_break_ties_by_document_id_and_cut_at_the_top_1000():
    tied = mteb_metrics({"q": {"a": 1}}, {"q": {"a": 0.5, "b": 0.5, "c": 0.5}})  # ranks c, b, a
    assert tied["mrr_at_3"] == pytest.approx(1 / 3) and tied["mrr_at_1"] == 0.0
    run = {"q": {f"d{i:04d}": float(-i) for i in range(1500)}}  # d1200 ranks 1201st
    deep = mteb_metrics({"q": {"d1200": 1}}, run)
    assert (
        deep["recall_at_1000"] == 0.0
        and retrieval_metrics({"q": {"d1200": 1}}, run, [1500])["recall_at_1500"] == 1.0
    )


def test_protocols_are_named_and_checked():
    assert PROTOCOLS == ("mteb", "vidore-benchmark") and PROTOCOL == "mteb"
    assert set(protocol_metrics("vidore-benchmark", {"q": {"d": 1}}, {"q": {"d": 1.0}})) == {
        f"{m}_at_{k}" for m in ("ndcg", "map", "recall", "precision", "mrr") for k in K_VALUES
    }
    with pytest.raises(ValueError, match="unknown evaluation protocol 'beir'.*'mteb', 'vidore-benchmark'"):
        protocol_metrics("beir", {}, {})


def test_mteb_metrics_equal_mtebs_own_evaluation():
    """Against mteb's own scoring code (`calculate_retrieval_scores`), on random graded runs with ties."""
    scoring = pytest.importorskip(
        "mteb._evaluators.retrieval_metrics", reason="mteb is not installed: pip install 'colqwen3-lib[mteb]'"
    )
    rng = random.Random(0)
    docs = [f"doc{i}" for i in range(60)]
    qrels = {
        f"q{q}": {d: rng.choice([0, 1, 1, 2]) for d in rng.sample(docs, rng.randint(1, 4))} for q in range(40)
    }
    run = {qid: {d: round(rng.random(), 2) for d in docs} for qid in qrels}  # 2 decimals: many ties
    ours = mteb_metrics(qrels, run)
    result = scoring.calculate_retrieval_scores(run, qrels, list(MTEB_K_VALUES))
    theirs = {
        **{f"ndcg_at_{k.split('@')[1]}": v for k, v in result.ndcg.items()},
        **{f"map_at_{k.split('@')[1]}": v for k, v in result.map.items()},
        **{f"recall_at_{k.split('@')[1]}": v for k, v in result.recall.items()},
        **{f"precision_at_{k.split('@')[1]}": v for k, v in result.precision.items()},
        **{f"mrr_at_{k.split('@')[1]}": v for k, v in result.mrr.items()},
        **{f"hit_rate_at_{k.split('@')[1]}": v for k, v in result.hit_rate.items()},
    }
    assert ours == pytest.approx(theirs, abs=1e-12)
