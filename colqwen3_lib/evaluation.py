"""ViDoRe evaluation: embed a task's pages and queries, score them by MaxSim, measure the ranking.

`evaluate_model(model, processor, datasets)` returns the metrics per task (`metrics.py`, computed as
vidore-benchmark computes them) for tasks loaded by `tasks.py`; `top_pages` shows what the retriever
returns for one query. Loading a model and an adapter is `model.load_model`; result files and tables
are in `results.py`; the command line is `python -m colqwen3_lib.evaluate`.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Sequence

import torch

from .data import decode_image
from .metrics import HEADLINE, retrieval_metrics
from .model import embed_batch
from .scoring import score_multi_vector
from .synthetic import SYNTHETIC
from .tasks import READ_ROWS, SPLIT, RetrievalTask, expand_datasets, load_task

logger = logging.getLogger(__name__)

# Defaults, read by the CLI too.
BATCH_SIZE = 8  # pages per forward pass
QUERY_BATCH_SIZE = 64  # queries per forward pass
SCORE_BATCH_SIZE = 128  # queries per MaxSim block


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _embed_by_size(model, processor, sizes: list[int], load, batch_size: int, progress) -> list[torch.Tensor]:
    """Embed items in batches of similar size (little padding); `load(indices)` gives their images."""
    order = sorted(range(len(sizes)), key=sizes.__getitem__)
    embeddings: list[torch.Tensor | None] = [None] * len(sizes)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        for i, embedding in zip(chunk, embed_batch(model, processor.process_images(load(chunk)))):
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
    embeddings: list[torch.Tensor] = []
    for start in range(0, len(queries), batch_size):
        chunk = list(queries[start : start + batch_size])
        embeddings.extend(embed_batch(model, processor.process_queries(chunk)))
        if progress is not None:
            progress.update(len(chunk))
    return embeddings


def build_run(task: RetrievalTask, scores: torch.Tensor) -> dict[str, dict[str, float]]:
    """(n_query_texts, n_images) scores -> {query id: {document id: score}}, max over repeated ids."""
    doc_ids = sorted({doc for _, doc in task.image_docs})
    doc_index = {doc: i for i, doc in enumerate(doc_ids)}
    images = torch.tensor([image for image, _ in task.image_docs])
    docs = torch.tensor([doc_index[doc] for _, doc in task.image_docs])
    per_pair = scores[:, images]  # (n_query_texts, n_pairs)
    per_doc = torch.full((scores.shape[0], len(doc_ids)), -math.inf).scatter_reduce(
        1, docs.expand_as(per_pair), per_pair, reduce="amax"
    )  # (n_query_texts, n_docs)
    run: dict[str, dict[str, float]] = {}
    for qid, row in zip(task.query_ids, per_doc.tolist()):
        current = run.setdefault(qid, {})
        for doc, score in zip(doc_ids, row):
            current[doc] = max(score, current.get(doc, -math.inf))
    return run


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


def evaluate_task(
    model,
    processor,
    task: RetrievalTask,
    batch_size: int = BATCH_SIZE,
    query_batch_size: int = QUERY_BATCH_SIZE,
    score_batch_size: int = SCORE_BATCH_SIZE,
    show_progress: bool = True,
) -> dict:
    """Embed, score and measure one loaded task.

    Returns:
        {"format", "n_queries", "n_pages", "metrics": {"ndcg_at_5": ...}, "seconds": {...}}.
    """
    from tqdm.auto import tqdm

    seconds = {}
    with tqdm(
        total=len(task.images) + len(task.queries), desc=task.name, unit="item", disable=not show_progress
    ) as bar:
        start = time.perf_counter()
        pages = embed_pages(model, processor, task, batch_size, bar)
        seconds["pages"] = time.perf_counter() - start
        start = time.perf_counter()
        queries = embed_queries(model, processor, task.queries, query_batch_size, bar)
        seconds["queries"] = time.perf_counter() - start
    start = time.perf_counter()
    scores = score_multi_vector(queries, pages, batch_size=score_batch_size, device=_model_device(model))
    run = build_run(task, scores)
    seconds["scoring"] = time.perf_counter() - start
    start = time.perf_counter()
    metrics = retrieval_metrics(task.qrels, run)
    seconds["metrics"] = time.perf_counter() - start
    return {
        "format": task.format,
        "n_queries": len(set(task.query_ids)),
        "n_pages": task.n_documents,
        "n_images": len(task.images),
        "metrics": metrics,
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
    }


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
) -> dict[str, dict]:
    """Evaluate a ColQwen3 model (or a PeftModel around one) on ViDoRe-style datasets.

    Args:
        model: The model, in eval mode, on its device.
        processor: Its `ColQwen3Processor`.
        datasets: ViDoRe hub ids (e.g. `vidore/docvqa_test_subsampled`), local dataset paths (QA or
            BEIR format), `synthetic` (all synthetic test tasks) or `vidore-v1` (the ten v1 tasks).
        split: Split to evaluate (`test` for ViDoRe).
        batch_size: Pages per forward pass.
        query_batch_size: Queries per forward pass.
        score_batch_size: Queries per MaxSim block.
        show_progress: Show a progress bar per task.
        on_task_done: Called with (task name, result) as each task completes, e.g. to write it at once.

    Returns:
        Task name -> {"format", "n_queries", "n_pages", "n_images", "metrics": {"ndcg_at_5": ...},
        "seconds": {"load", "pages", "queries", "scoring", "metrics"}}.

    Raises:
        ValueError: a dataset cannot be loaded or lacks what evaluation needs (the message names it).
    """
    was_training = model.training
    model.eval()
    results: dict[str, dict] = {}
    try:
        for name in expand_datasets(datasets):
            start = time.perf_counter()
            task = load_task(name, split)
            load_seconds = time.perf_counter() - start
            key, n = task.name, 2
            while key in results:
                key, n = f"{task.name}-{n}", n + 1
            result = evaluate_task(
                model, processor, task, batch_size, query_batch_size, score_batch_size, show_progress
            )
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
