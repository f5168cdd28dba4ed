"""Retrieval metrics under the kit's two evaluation protocols: NDCG, MAP, recall, precision and MRR at k.

- `mteb` (the default; what the public ViDoRe leaderboard runs, `mteb.evaluate`): k in 1, 3, 5, 10, 20,
  100 and 1000 over each query's top 1000 pages; queries without relevance judgements are dropped;
  NDCG, MAP, recall, precision and hit rate averaged over queries and rounded to 5 decimals; MRR@k
  unrounded, ties broken by document id as in mteb >= 2.18.19. `mteb_metrics`.
- `vidore-benchmark` (vidore-benchmark's evaluators): k in 1, 3, 5, 10, 20, 50, 100 over the whole
  ranking, unrounded. `retrieval_metrics`.

Both use `pytrec_eval` and break score ties as trec_eval does: score descending, then document id
descending. MRR@k is the reciprocal rank of the first relevant page within the top k.
"""

from __future__ import annotations

from collections.abc import Sequence

MTEB, VIDORE_BENCHMARK = "mteb", "vidore-benchmark"
PROTOCOLS = (MTEB, VIDORE_BENCHMARK)
PROTOCOL = MTEB  # the default: what the leaderboard runs

K_VALUES = (1, 3, 5, 10, 20, 50, 100)  # vidore-benchmark
MTEB_K_VALUES = (1, 3, 5, 10, 20, 100, 1000)
MTEB_TOP_K = 1000  # pages kept per query, as mteb's search returns them
MTEB_DECIMALS = 5  # mteb rounds NDCG, MAP, recall, precision and hit rate (not MRR)
HEADLINE = ("ndcg_at_5", "ndcg_at_10")
MAIN_SCORE = "ndcg_at_5"  # a task's main score unless its benchmark names another (ViDoRe v3: NDCG@10)
SUMMARY_METRICS = ("ndcg_at_5", "ndcg_at_10", "recall_at_1", "recall_at_5", "mrr_at_10")


def check_protocol(protocol: str) -> str:
    """`protocol` if it is one of `PROTOCOLS`, else a ValueError that lists them."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown evaluation protocol {protocol!r}; choose one of {list(PROTOCOLS)}")
    return protocol


def _pytrec_eval():
    try:
        import pytrec_eval
    except ImportError as err:
        raise ImportError(
            "ViDoRe metrics need pytrec_eval: pip install 'colqwen3-lib[eval]' (or pytrec-eval-terrier)"
        ) from err
    return pytrec_eval


def _trec_order(doc_scores: dict[str, float]) -> list[tuple[str, float]]:
    """Documents as trec_eval ranks them: score descending, ties by document id descending."""
    return sorted(doc_scores.items(), key=lambda item: (item[1], item[0]), reverse=True)


def _no_judged_queries(qrels: dict, run: dict) -> ValueError:
    return ValueError(
        f"none of the {len(run)} queries of the run has relevance judgements (qrels cover {len(qrels)} "
        "other query ids); check that query ids match between queries and qrels"
    )


def retrieval_metrics(
    qrels: dict[str, dict[str, int]], run: dict[str, dict[str, float]], k_values: Sequence[int] = K_VALUES
) -> dict[str, float]:
    """NDCG, MAP, recall, precision and MRR at each k as vidore-benchmark computes them, averaged over
    the judged queries of `run`.

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
    pytrec_eval = _pytrec_eval()
    ks = ",".join(str(k) for k in k_values)
    measures = {f"ndcg_cut.{ks}", f"map_cut.{ks}", f"recall.{ks}", f"P.{ks}"}
    per_query = pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(run)
    if not per_query:
        raise _no_judged_queries(qrels, run)
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


def mteb_metrics(
    qrels: dict[str, dict[str, int]],
    run: dict[str, dict[str, float]],
    k_values: Sequence[int] = MTEB_K_VALUES,
) -> dict[str, float]:
    """NDCG, MAP, recall, precision, hit rate and MRR at each k as mteb's retrieval evaluation computes them.

    Queries of `run` without judgements in `qrels` are dropped (a query judged only 0 stays, and scores
    0); each query's ranking is cut to its `MTEB_TOP_K` best pages (trec_eval order).

    Args:
        qrels: query id -> {document id: relevance}; relevance >= 1 counts as relevant (graded for NDCG).
        run: query id -> {document id: score}, higher is better.
        k_values: Cut-offs.

    Returns:
        {"ndcg_at_5": ..., "map_at_5": ..., "recall_at_5": ..., "precision_at_5": ..., "hit_rate_at_5": ...,
        "mrr_at_5": ..., ...}

    Raises:
        ValueError: no query of `run` has judgements in `qrels`.
        ImportError: pytrec_eval is not installed.
    """
    pytrec_eval = _pytrec_eval()
    ranked = {qid: _trec_order(docs)[:MTEB_TOP_K] for qid, docs in run.items() if qrels.get(qid)}
    if not ranked:
        raise _no_judged_queries(qrels, run)
    ks = ",".join(str(k) for k in k_values)
    measures = {f"ndcg_cut.{ks}", f"map_cut.{ks}", f"recall.{ks}", f"P.{ks}", f"success.{ks}"}
    judged = {qid: qrels[qid] for qid in ranked}
    per_query = pytrec_eval.RelevanceEvaluator(judged, measures).evaluate(
        {qid: dict(docs) for qid, docs in ranked.items()}
    )
    names = {
        "ndcg_cut": "ndcg_at",
        "map_cut": "map_at",
        "recall": "recall_at",
        "P": "precision_at",
        "success": "hit_rate_at",
    }
    metrics: dict[str, float] = {}
    for trec_name, name in names.items():
        for k in k_values:
            values = [q[f"{trec_name}_{k}"] for q in per_query.values()]
            metrics[f"{name}_{k}"] = round(sum(values) / len(per_query), MTEB_DECIMALS)
    for k in k_values:
        reciprocal = []
        for qid, docs in ranked.items():
            relevant = {doc for doc, relevance in qrels[qid].items() if relevance > 0}
            rank = next((i for i, (doc, _) in enumerate(docs[:k], start=1) if doc in relevant), None)
            reciprocal.append(1 / rank if rank else 0.0)
        metrics[f"mrr_at_{k}"] = sum(reciprocal) / len(reciprocal)
    return metrics


def protocol_metrics(
    protocol: str, qrels: dict[str, dict[str, int]], run: dict[str, dict[str, float]]
) -> dict[str, float]:
    """The metrics of `run` under `protocol` (`mteb_metrics` or `retrieval_metrics`, at their own k values)."""
    if check_protocol(protocol) == MTEB:
        return mteb_metrics(qrels, run)
    return retrieval_metrics(qrels, run)
