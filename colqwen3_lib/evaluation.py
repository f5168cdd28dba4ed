"""ViDoRe evaluation: embed a task's pages and queries, score them by MaxSim, measure the ranking.

`evaluate_model(model, processor, datasets, protocol=...)` returns the metrics per task for tasks loaded
by `tasks.py`, under one of two protocols (`metrics.py`): `mteb`, what the public leaderboard runs (each
query's top 1000 pages, queries without judgements dropped, a task's language subsets measured apart and
averaged), or `vidore-benchmark`. `top_pages` shows what the retriever returns for one query. Loading a
model and an adapter is `model.load_model`; result files and tables are in `results.py`; the command
line is `python -m colqwen3_lib.evaluate`; mteb's own `evaluate` runs a kit model through
`mteb_wrapper.py`.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from .benchmarks import benchmark_of
from .data import decode_image, load_split
from .metrics import (
    HEADLINE,
    MAIN_SCORE,
    MTEB,
    MTEB_TOP_K,
    PROTOCOL,
    check_protocol,
    mteb_metrics,
    retrieval_metrics,
)
from .model import embed_batch
from .scoring import score_multi_vector
from .synthetic import SYNTHETIC
from .tasks import READ_ROWS, SPLIT, RetrievalTask, expand_datasets, load_task

logger = logging.getLogger(__name__)

# Defaults, read by the CLI too.
BATCH_SIZE = 8  # pages per forward pass
QUERY_BATCH_SIZE = 64  # queries per forward pass
SCORE_BATCH_SIZE = 128  # queries per MaxSim block
PREFETCH_BATCHES = 2  # batches processed ahead of the model on a GPU


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _prefetched(jobs: Sequence, prepare: Callable, ahead: int):
    """`prepare(job)` of each job, in order; with `ahead` > 0, one worker thread prepares up to `ahead` jobs
    in advance while the caller uses the current one (on a GPU: decoding and processing the next pages while
    the model embeds these). One worker, so that the processor is never called from two threads at once."""
    if ahead == 0:
        yield from map(prepare, jobs)
        return
    with ThreadPoolExecutor(max_workers=1) as worker:
        pending = deque(worker.submit(prepare, job) for job in jobs[:ahead])
        for job in jobs[ahead:]:
            ready = pending.popleft().result()
            pending.append(worker.submit(prepare, job))
            yield ready
        while pending:
            yield pending.popleft().result()


def _prefetch_depth(model) -> int:
    """Batches prepared ahead: on a GPU, so that it never waits for the CPU; on a CPU none (both would share
    the same cores)."""
    return PREFETCH_BATCHES if _model_device(model).type == "cuda" else 0


def _embed_by_size(model, processor, sizes: list[int], load, batch_size: int, progress) -> list[torch.Tensor]:
    """Embed items in batches of similar size (little padding); `load(indices)` gives their images.

    On a GPU the next batches are decoded and processed in a worker thread while the model runs, and their
    images are resized on the GPU (`ColQwen3Processor.process_images(device=...)`).
    """
    device = _model_device(model)
    order = sorted(range(len(sizes)), key=sizes.__getitem__)
    chunks = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]

    def prepare(chunk: list[int]):
        return processor.process_images(load(chunk), device=device, pad_pixel_values=False)

    embeddings: list[torch.Tensor | None] = [None] * len(sizes)
    for chunk, batch in zip(chunks, _prefetched(chunks, prepare, _prefetch_depth(model))):
        for i, embedding in zip(chunk, embed_batch(model, batch)):
            embeddings[i] = embedding
        if progress is not None:
            progress.update(len(chunk))
    return embeddings


@torch.inference_mode()
def embed_images(
    model, processor, images: Sequence, batch_size: int = BATCH_SIZE, progress=None
) -> list[torch.Tensor]:
    """Embeddings of pages (PIL images or paths), in their order: a list of (n_tokens, dim) CPU tensors."""
    sizes = [image.width * image.height if hasattr(image, "width") else 0 for image in images]
    return _embed_by_size(
        model, processor, sizes, lambda chunk: [images[i] for i in chunk], batch_size, progress
    )


@torch.inference_mode()
def embed_pages(
    model, processor, task: RetrievalTask, batch_size: int = BATCH_SIZE, progress=None
) -> list[torch.Tensor]:
    """Embeddings of the task's distinct images, in `task.images` order: a list of (n_tokens, dim) CPU tensors.

    Pages are batched by size (similar pages pad little) and decoded one batch at a time.
    """
    sizes = []
    for start in range(0, len(task.images), READ_ROWS):
        rows = task.images[start : start + READ_ROWS]
        for row, value in zip(rows, task.pages[rows]["image"]):
            width, height = decode_image(value, f"{task.name} row {row}", header_only=True).size
            sizes.append(width * height)

    def load(chunk: list[int]) -> list:
        rows = [task.images[i] for i in chunk]
        return [decode_image(v, f"{task.name} row {r}") for r, v in zip(rows, task.pages[rows]["image"])]

    return _embed_by_size(model, processor, sizes, load, batch_size, progress)


@torch.inference_mode()
def embed_queries(
    model, processor, queries: Sequence[str], batch_size: int = QUERY_BATCH_SIZE, progress=None
) -> list[torch.Tensor]:
    """Embeddings of the queries: a list of (n_tokens, dim) CPU tensors."""
    chunks = [list(queries[start : start + batch_size]) for start in range(0, len(queries), batch_size)]
    embeddings: list[torch.Tensor] = []
    for chunk, batch in zip(chunks, _prefetched(chunks, processor.process_queries, _prefetch_depth(model))):
        embeddings.extend(embed_batch(model, batch))
        if progress is not None:
            progress.update(len(chunk))
    return embeddings


def _per_document(task: RetrievalTask, scores: torch.Tensor) -> tuple[list[str], torch.Tensor]:
    """(n_query_texts, n_images) scores -> the document ids (sorted) and each text's score for each: the max
    over the document's images, (n_query_texts, n_docs)."""
    doc_ids = sorted({doc for _, doc in task.image_docs})
    doc_index = {doc: i for i, doc in enumerate(doc_ids)}
    images = torch.tensor([image for image, _ in task.image_docs])
    docs = torch.tensor([doc_index[doc] for _, doc in task.image_docs])
    per_pair = scores[:, images]  # (n_query_texts, n_pairs)
    per_doc = torch.full((scores.shape[0], len(doc_ids)), -math.inf).scatter_reduce(
        1, docs.expand_as(per_pair), per_pair, reduce="amax"
    )  # (n_query_texts, n_docs)
    return doc_ids, per_doc


def build_run(task: RetrievalTask, scores: torch.Tensor) -> dict[str, dict[str, float]]:
    """(n_query_texts, n_images) scores -> {query id: {document id: score}}, max over repeated ids."""
    doc_ids, per_doc = _per_document(task, scores)
    run: dict[str, dict[str, float]] = {}
    for qid, row in zip(task.query_ids, per_doc.tolist()):
        current = run.setdefault(qid, {})
        for doc, score in zip(doc_ids, row):
            current[doc] = max(score, current.get(doc, -math.inf))
    return run


def top_k_run(
    task: RetrievalTask, scores: torch.Tensor, query_ids: list[str], top_k: int = MTEB_TOP_K
) -> dict[str, dict[str, float]]:
    """Each query's `top_k` documents and their scores, as mteb's search returns them.

    Args:
        scores: (n_query_texts, n_images) scores of the texts whose ids are `query_ids` (max over repeats).
        top_k: Documents kept per query, in trec_eval order (score, then document id, descending).
    """
    doc_ids, per_doc = _per_document(task, scores)
    index = {qid: i for i, qid in enumerate(dict.fromkeys(query_ids))}  # in order of first text, as mteb's
    ids, rows = list(index), torch.tensor([index[qid] for qid in query_ids])
    per_query = torch.full((len(ids), len(doc_ids)), -math.inf).scatter_reduce(
        0, rows[:, None].expand_as(per_doc), per_doc, reduce="amax"
    )  # (n_query_ids, n_docs)
    descending_ids = doc_ids[::-1]
    values, order = per_query.flip(1).sort(dim=1, descending=True, stable=True)  # ties: larger id first
    values, order = values[:, :top_k].tolist(), order[:, :top_k].tolist()
    return {
        qid: {descending_ids[i]: score for i, score in zip(columns, row)}
        for qid, columns, row in zip(ids, order, values)
    }


def own_page_scores(
    model, processor, dataset: str, n: int = 8, split: str = SPLIT
) -> tuple[torch.Tensor, list[str]]:
    """MaxSim of the first `n` queries of a QA-format set (one row per page) against their own rows' pages.

    Query i was written for page i, so a good retriever's best page per row is on the diagonal: the score
    matrix of notebook 02, for any model.

    Returns:
        (n, n) float32 scores and the query texts.
    """
    rows = load_split(dataset, split)
    rows = rows.select([i for i, query in enumerate(rows["query"]) if query is not None][:n])
    queries = list(rows["query"])
    scores = score_multi_vector(
        embed_queries(model, processor, queries), embed_images(model, processor, list(rows["image"]))
    )
    return scores, queries


def top_pages(
    model,
    processor,
    task: RetrievalTask,
    query: str,
    k: int = 5,
    page_embeddings: list[torch.Tensor] | None = None,
) -> list[dict]:
    """The `k` best pages of `task` for one query, to look at.

    Args:
        page_embeddings: `embed_pages(model, processor, task)`, when already computed.

    Returns:
        One dict per page, best first: `image` (PIL), `score`, `document` (its id) and `relevant`
        (the document's relevance to `query` in the task's qrels, 0 when unjudged or unknown).
    """
    if page_embeddings is None:
        page_embeddings = embed_pages(model, processor, task)
    scores = score_multi_vector(embed_queries(model, processor, [query]), page_embeddings)[0]  # (n_images,)
    qrels = {}
    for text, qid in zip(task.queries, task.query_ids):
        if text == query:
            qrels = task.qrels.get(qid, {})
    docs_of = {}
    for image, doc in task.image_docs:
        docs_of.setdefault(image, doc)
    best = scores.topk(min(k, len(page_embeddings)))
    return [
        {
            "image": decode_image(task.pages[task.images[i]]["image"], f"{task.name} row {task.images[i]}"),
            "score": float(score),
            "document": docs_of.get(i, ""),
            "relevant": qrels.get(docs_of.get(i, ""), 0),
        }
        for score, i in zip(best.values.tolist(), best.indices.tolist())
    ]


def _mteb_measure(task: RetrievalTask, query_ids: list[str], scores: torch.Tensor) -> tuple[dict, dict]:
    """mteb's metrics of a task: each language subset measured on its own, the task's the mean over them.

    Returns:
        (task metrics, {subset: {"n_queries", "metrics"}}; the latter empty for a task without subsets).
    """
    subsets = task.subsets or {"default": list(dict.fromkeys(query_ids))}
    measured = {}
    for subset, ids in subsets.items():
        keep = set(ids)
        rows = [i for i, qid in enumerate(query_ids) if qid in keep]
        if not rows:
            continue  # a subset without judged queries
        run = top_k_run(task, scores[rows], [query_ids[i] for i in rows])
        measured[subset] = {"n_queries": len(run), "metrics": mteb_metrics(task.qrels, run)}
    if not measured:
        raise ValueError(f"{task.name}: none of its queries has relevance judgements; check its qrels")
    names = next(iter(measured.values()))["metrics"]
    metrics = {m: sum(r["metrics"][m] for r in measured.values()) / len(measured) for m in names}
    return metrics, measured if task.subsets else {}


def evaluate_task(
    model,
    processor,
    task: RetrievalTask,
    batch_size: int = BATCH_SIZE,
    query_batch_size: int = QUERY_BATCH_SIZE,
    score_batch_size: int = SCORE_BATCH_SIZE,
    show_progress: bool = True,
    protocol: str = PROTOCOL,
) -> dict:
    """Embed, score and measure one loaded task under `protocol` (`mteb` or `vidore-benchmark`).

    Under `mteb`, queries without relevance judgements are not embedded (mteb drops them first).

    Returns:
        {"protocol", "format", "n_queries", "n_pages", "n_images", "metrics": {"ndcg_at_5": ...},
        "seconds": {...}}; under `mteb` also "subsets": {subset: {"n_queries", "metrics"}} for a task
        with language subsets (its metrics are their mean).
    """
    from tqdm.auto import tqdm

    check_protocol(protocol)
    texts, query_ids = task.queries, task.query_ids
    if protocol == MTEB:
        judged = [i for i, qid in enumerate(query_ids) if task.qrels.get(qid)]
        if not judged:
            raise ValueError(f"{task.name}: none of its queries has relevance judgements; check its qrels")
        texts, query_ids = [texts[i] for i in judged], [query_ids[i] for i in judged]
    seconds = {}
    with tqdm(
        total=len(task.images) + len(texts), desc=task.name, unit="item", disable=not show_progress
    ) as bar:
        start = time.perf_counter()
        pages = embed_pages(model, processor, task, batch_size, bar)
        seconds["pages"] = time.perf_counter() - start
        start = time.perf_counter()
        queries = embed_queries(model, processor, texts, query_batch_size, bar)
        seconds["queries"] = time.perf_counter() - start
    start = time.perf_counter()
    scores = score_multi_vector(queries, pages, batch_size=score_batch_size, device=_model_device(model))
    subsets = {}
    if protocol == MTEB:
        seconds["scoring"] = time.perf_counter() - start
        start = time.perf_counter()
        metrics, subsets = _mteb_measure(task, query_ids, scores)
        n_queries = sum(r["n_queries"] for r in subsets.values()) if subsets else len(set(query_ids))
    else:
        run = build_run(task, scores)
        seconds["scoring"] = time.perf_counter() - start
        start = time.perf_counter()
        metrics = retrieval_metrics(task.qrels, run)
        n_queries = len(set(query_ids))
    seconds["metrics"] = time.perf_counter() - start
    result = {
        "protocol": protocol,
        "format": task.format,
        "n_queries": n_queries,
        "n_pages": task.n_documents,
        "n_images": len(task.images),
        "metrics": metrics,
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
    }
    if subsets:
        result["subsets"] = subsets
    return result


def evaluate_model(
    model,
    processor,
    datasets: Sequence[str | os.PathLike] = (SYNTHETIC,),
    split: str = SPLIT,
    batch_size: int = BATCH_SIZE,
    query_batch_size: int = QUERY_BATCH_SIZE,
    score_batch_size: int = SCORE_BATCH_SIZE,
    show_progress: bool = True,
    on_task_done: Callable[[str, dict], None] | None = None,
    protocol: str = PROTOCOL,
) -> dict[str, dict]:
    """Evaluate a ColQwen3 model (or a PeftModel around one) on ViDoRe-style datasets.

    Args:
        model: The model, in eval mode, on its device.
        processor: Its `ColQwen3Processor`.
        datasets: ViDoRe hub ids (`vidore/docvqa_test_subsampled`, `owner/name@revision`), local dataset
            paths (QA, BEIR or mteb's per-language layout), or the aliases `synthetic`, `vidore-v1`,
            `vidore-v2` and `vidore-v3` (what they name depends on `protocol`: `benchmarks.py`).
        split: Split to evaluate (`test` for ViDoRe).
        batch_size: Pages per forward pass.
        query_batch_size: Queries per forward pass.
        score_batch_size: Queries per MaxSim block.
        show_progress: Show a progress bar per task.
        on_task_done: Called with (task name, result) as each task completes, e.g. to write it at once.
        protocol: `mteb` (default; what the public leaderboard runs) or `vidore-benchmark`.

    Returns:
        Task name -> {"protocol", "benchmark" (its alias, or None), "main_score" (the metric its benchmark
        ranks by), "revision", "format", "n_queries", "n_pages", "n_images", "metrics": {"ndcg_at_5": ...},
        "seconds": {"load", "pages", "queries", "scoring", "metrics"}} (and "subsets" under `mteb`, for
        tasks mteb splits by language).

    Raises:
        ValueError: an unknown protocol, or a dataset that cannot be loaded or lacks what evaluation needs
            (the message names it).
    """
    check_protocol(protocol)
    was_training = model.training
    model.eval()
    results: dict[str, dict] = {}
    try:
        for name in expand_datasets(datasets, protocol):
            start = time.perf_counter()
            task = load_task(name, split, protocol)
            load_seconds = time.perf_counter() - start
            key, n = task.name, 2
            while key in results:
                key, n = f"{task.name}-{n}", n + 1
            result = evaluate_task(
                model,
                processor,
                task,
                batch_size,
                query_batch_size,
                score_batch_size,
                show_progress,
                protocol,
            )
            bench = benchmark_of(task.copy_of or task.name, protocol, task.revision)
            result = {
                "protocol": protocol,
                "benchmark": bench.alias if bench else None,
                "main_score": bench.main_score if bench else MAIN_SCORE,
                "revision": task.revision,
                **({"copy_of": task.copy_of} if task.copy_of else {}),
                **result,
            }
            result["seconds"] = {"load": round(load_seconds, 3), **result["seconds"]}
            results[key] = result
            if on_task_done is not None:
                on_task_done(key, result)
            logger.info(
                f"{key}: "
                + ", ".join(f"{m} {result['metrics'][m]:.4f}" for m in HEADLINE)
                + f" ({result['n_queries']} queries, {result['n_pages']} pages)"
            )
    finally:
        model.train(was_training)
    return results
