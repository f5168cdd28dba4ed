"""Retrieval metrics as ViDoRe computes them: NDCG, MAP, recall, precision and MRR at k, with `pytrec_eval`.

MRR@k is pytrec_eval's recip_rank on the run cut to its top k (ties ranked as trec_eval ranks them:
score descending, then document id descending).
"""

from __future__ import annotations

from collections.abc import Sequence

K_VALUES = (1, 3, 5, 10, 20, 50, 100)
HEADLINE = ("ndcg_at_5", "ndcg_at_10")
SUMMARY_METRICS = ("ndcg_at_5", "ndcg_at_10", "recall_at_1", "recall_at_5", "mrr_at_10")


def _trec_order(doc_scores: dict[str, float]) -> list[tuple[str, float]]:
    """Documents as trec_eval ranks them: score descending, ties by document id descending."""
    return sorted(doc_scores.items(), key=lambda item: (item[1], item[0]), reverse=True)


def retrieval_metrics(
    qrels: dict[str, dict[str, int]], run: dict[str, dict[str, float]], k_values: Sequence[int] = K_VALUES
) -> dict[str, float]:
    """NDCG, MAP, recall, precision and MRR at each k, averaged over the judged queries of `run`.

    Args:
        qrels: query id -> {document id: relevance}; relevance >= 1 counts as relevant, and NDCG
            uses it as the gain (graded relevance).
        run: query id -> {document id: score}, higher is better.
        k_values: Cut-offs.

    Returns:
        {"ndcg_at_5": ..., "map_at_5": ..., "recall_at_5": ..., "precision_at_5": ..., "mrr_at_5": ..., ...}

    Raises:
        ValueError: no query of `run` has judgements in `qrels`.
        ImportError: pytrec_eval is not installed.
    """
    try:
        import pytrec_eval
    except ImportError as err:
        raise ImportError(
            "ViDoRe metrics need pytrec_eval: pip install 'colqwen3-lib[eval]' (or pytrec-eval-terrier)"
        ) from err

    ks = ",".join(str(k) for k in k_values)
    measures = {f"ndcg_cut.{ks}", f"map_cut.{ks}", f"recall.{ks}", f"P.{ks}"}
    per_query = pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(run)
    if not per_query:
        raise ValueError(
            f"none of the {len(run)} queries of the run has relevance judgements (qrels cover {len(qrels)} "
            "other query ids); check that query ids match between queries and qrels"
        )
    names = {"ndcg_cut": "ndcg_at", "map_cut": "map_at", "recall": "recall_at", "P": "precision_at"}
    metrics: dict[str, float] = {}
    for trec_name, name in names.items():
        for k in k_values:
            metrics[f"{name}_{k}"] = sum(q[f"{trec_name}_{k}"] for q in per_query.values()) / len(per_query)
    ranked = {qid: _trec_order(docs) for qid, docs in run.items()}
    reciprocal = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"})
    for k in k_values:
        cut = reciprocal.evaluate({qid: dict(docs[:k]) for qid, docs in ranked.items()})
        metrics[f"mrr_at_{k}"] = sum(
            cut.get(qid, {"recip_rank": 0.0})["recip_rank"] for qid in per_query
        ) / len(per_query)
    return metrics
