"""ViDoRe evaluation: NDCG@k and friends, computed as vidore-benchmark computes them.

Two dataset formats, as ViDoRe publishes them:

- QA (ViDoRe v1): one row per page with `query` (None on distractor pages), `image` and
  `image_filename`. The corpus is the set of distinct pages by `image_filename`; queries are
  de-duplicated; a query's relevant page (relevance 1) is the `image_filename` of its row (of its
  last row when it occurs more than once, as the reference evaluator builds its qrels); a page that
  appears on several rows scores the max over its rows.
- BEIR (ViDoRe v2/v3): configs `corpus` (`corpus-id`, `image`), `queries` (`query-id`, `query`)
  and `qrels` (`query-id`, `corpus-id`, `score`: graded relevance).

Metrics come from `pytrec_eval` (ndcg_cut, map_cut, recall, P; MRR@k is pytrec_eval's recip_rank on
the run cut to its top k), averaged over the queries that have judgements. Identical images are
embedded once, whatever their rows or ids.

`evaluate_model(model, processor, datasets)` returns the metrics per task; `load_model` loads a
checkpoint (and a LoRA adapter); `write_results`, `summary_table` and `compare_results` produce
the files and tables the CLI (`python -m colqwen3_lib.evaluate`) writes.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from .scoring import score_multi_vector

logger = logging.getLogger(__name__)

# The ViDoRe v1 benchmark (QA format, split `test`), as vidore-benchmark names it.
VIDORE_V1_TASKS = (
    "vidore/arxivqa_test_subsampled",
    "vidore/docvqa_test_subsampled",
    "vidore/infovqa_test_subsampled",
    "vidore/tabfquad_test_subsampled",
    "vidore/tatdqa_test",
    "vidore/shiftproject_test",
    "vidore/syntheticDocQA_artificial_intelligence_test",
    "vidore/syntheticDocQA_energy_test",
    "vidore/syntheticDocQA_government_reports_test",
    "vidore/syntheticDocQA_healthcare_industry_test",
)
VIDORE_V1 = "vidore-v1"  # names all ten tasks above
SYNTHETIC = "synthetic"  # names all offline synthetic test tasks (`data.SYNTHETIC_TASKS`)
QA, BEIR = "qa", "beir"
QA_COLUMNS = ("query", "image", "image_filename")
BEIR_COLUMNS = {
    "corpus": ("corpus-id", "image"),
    "queries": ("query-id", "query"),
    "qrels": ("query-id", "corpus-id", "score"),
}
K_VALUES = (1, 3, 5, 10, 20, 50, 100)
HEADLINE = ("ndcg_at_5", "ndcg_at_10")
SUMMARY_METRICS = ("ndcg_at_5", "ndcg_at_10", "recall_at_1", "recall_at_5", "mrr_at_10")

# Defaults, read by the CLI too.
SPLIT = "test"
BATCH_SIZE = 8  # pages per forward pass
QUERY_BATCH_SIZE = 64  # queries per forward pass
SCORE_BATCH_SIZE = 128  # queries per MaxSim block
DEFAULT_MAX_VISUAL_TOKENS = 768  # visual tokens per page, when the processor comes from a base checkpoint
READ_ROWS = 256  # dataset rows read (undecoded) at a time

RESULTS_FILE = "results.json"
SUMMARY_STEM = "summary"
COMPARISON_STEM = "comparison"


# ------------------------------------------------------------------ metrics


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


# ------------------------------------------------------------------ tasks


@dataclass
class RetrievalTask:
    """One evaluation task, reduced to what scoring needs.

    `pages` holds the page images undecoded; `images` lists the row of each distinct image in it;
    `image_docs` pairs each image index with a document id (an image may stand for several
    documents, a document may have several images: its score is the max). `query_ids[i]` is the id
    of query text `queries[i]` (an id may have several texts: its score is the max).
    """

    name: str
    format: str
    queries: list[str]
    query_ids: list[str]
    qrels: dict[str, dict[str, int]]
    pages: object  # datasets.Dataset with a single `image` column, not decoded
    images: list[int]
    image_docs: list[tuple[int, str]]

    @property
    def n_documents(self) -> int:
        return len({doc for _, doc in self.image_docs})


def _require_columns(ds, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise ValueError(
            f"{what} lacks the column(s) {missing} needed for evaluation; it has {ds.column_names}. "
            f"A ViDoRe QA test set has {list(QA_COLUMNS)}; a BEIR one has the configs "
            + ", ".join(f"{part} {list(cols)}" for part, cols in BEIR_COLUMNS.items())
        )
    if len(ds) == 0:
        raise ValueError(f"{what} is empty (0 rows); point to a dataset with pages and queries")


def _raw_images(ds):
    """`ds` with its `image` column undecoded (bytes/path dicts), and nothing else."""
    from datasets import Image as ImageFeature

    ds = ds.select_columns(["image"])
    if isinstance(ds.features["image"], ImageFeature):
        ds = ds.cast_column("image", ImageFeature(decode=False))
    return ds


def _image_key(value) -> str:
    """A content key for one stored image: a digest of its bytes (or of its path when only that is stored)."""
    if isinstance(value, dict):
        data = value.get("bytes")
        if data is None:
            path = value.get("path")
            if path is None:
                raise ValueError("an image holds neither bytes nor a path")
            data = Path(path).read_bytes() if os.path.exists(path) else str(path).encode()
        return hashlib.blake2b(data, digest_size=16).hexdigest()
    if isinstance(value, Image.Image):
        return hashlib.blake2b(
            value.tobytes() + repr((value.mode, value.size)).encode(), digest_size=16
        ).hexdigest()
    if isinstance(value, str | os.PathLike):
        return hashlib.blake2b(Path(value).read_bytes(), digest_size=16).hexdigest()
    raise ValueError(f"cannot read an image from a {type(value).__name__}; the image column must hold images")


def _distinct_images(pages, what: str) -> tuple[list[int], list[int]]:
    """The row of each distinct image of `pages` (by content), and for each row the index of its image."""
    index_of: dict[str, int] = {}
    rows: list[int] = []
    image_of_row: list[int] = []
    for start in range(0, len(pages), READ_ROWS):
        for offset, value in enumerate(pages[start : start + READ_ROWS]["image"]):
            if value is None:
                raise ValueError(f"{what}: row {start + offset} has no image")
            key = _image_key(value)
            if key not in index_of:
                index_of[key] = len(rows)
                rows.append(start + offset)
            image_of_row.append(index_of[key])
    return rows, image_of_row


def qa_task(ds, name: str) -> RetrievalTask:
    """A ViDoRe v1 QA dataset (one row per page) -> a task with vidore-benchmark's semantics.

    Raises:
        ValueError: missing columns, no rows, or no row with a query.
    """
    _require_columns(ds, QA_COLUMNS, f"dataset {name!r}")
    filenames = [str(f) for f in ds["image_filename"]]
    queries: list[str] = []
    relevant: dict[str, str] = {}
    for row, query in enumerate(ds["query"]):
        if query is None:
            continue  # a distractor page
        if not isinstance(query, str) or not query.strip():
            raise ValueError(f"dataset {name!r}: row {row} has query {query!r}; queries are text or None")
        if query not in relevant:
            queries.append(query)
        relevant[query] = filenames[row]  # the last row of a repeated query wins, as in the reference
    if not queries:
        raise ValueError(
            f"dataset {name!r} has no queries: the query of every one of its {len(ds)} rows is None"
        )
    pages = _raw_images(ds)
    rows, image_of_row = _distinct_images(pages, f"dataset {name!r}")
    image_docs = sorted({(image, filenames[row]) for row, image in enumerate(image_of_row)})
    query_ids = [str(i) for i in range(len(queries))]
    qrels = {qid: {relevant[query]: 1} for qid, query in zip(query_ids, queries)}
    return RetrievalTask(name, QA, queries, query_ids, qrels, pages, rows, image_docs)


def beir_task(corpus, queries, qrels, name: str) -> RetrievalTask:
    """A BEIR-format dataset (corpus, queries, qrels; graded relevance) -> a task.

    Ids are compared as strings. A document id on several corpus rows scores the max over them; a
    query id on several query rows likewise.

    Raises:
        ValueError: missing columns, an empty part, or no query text.
    """
    for part, ds in (("corpus", corpus), ("queries", queries), ("qrels", qrels)):
        _require_columns(ds, BEIR_COLUMNS[part], f"the {part} of dataset {name!r}")
    texts, query_ids = [], []
    for qid, text in zip(queries["query-id"], queries["query"]):
        if text is not None:
            texts.append(text)
            query_ids.append(str(qid))
    if not texts:
        raise ValueError(f"dataset {name!r} has no queries: every query text is None")
    judgements: dict[str, dict[str, int]] = {}
    for qid, cid, score in zip(qrels["query-id"], qrels["corpus-id"], qrels["score"]):
        judgements.setdefault(str(qid), {})[str(cid)] = int(score)
    corpus_ids = [str(c) for c in corpus["corpus-id"]]
    pages = _raw_images(corpus)
    rows, image_of_row = _distinct_images(pages, f"the corpus of dataset {name!r}")
    image_docs = sorted({(image, corpus_ids[row]) for row, image in enumerate(image_of_row)})
    return RetrievalTask(name, BEIR, texts, query_ids, judgements, pages, rows, image_docs)


def _is_beir_dir(path: Path) -> bool:
    return all((path / part).exists() for part in BEIR_COLUMNS)


def expand_datasets(names: Iterable[str | os.PathLike]) -> list[str]:
    """Expand `synthetic` (all synthetic test tasks) and `vidore-v1` (the ten ViDoRe v1 tasks); split commas."""
    from .data import SYNTHETIC_TASKS

    expanded: list[str] = []
    for item in names:
        for name in str(item).split(",") if not os.path.exists(item) else [str(item)]:
            name = name.strip()
            if name == SYNTHETIC:
                expanded.extend(SYNTHETIC_TASKS)
            elif name == VIDORE_V1:
                expanded.extend(VIDORE_V1_TASKS)
            elif name:
                expanded.append(name)
    if not expanded:
        raise ValueError(f"no datasets given; name ViDoRe tasks, local paths, {SYNTHETIC!r} or {VIDORE_V1!r}")
    return expanded


def task_name(name_or_path: str | os.PathLike) -> str:
    """How a dataset is named in results: hub ids and synthetic names as given, local paths by folder name."""
    path = Path(name_or_path)
    return path.resolve().name if path.exists() else str(name_or_path)


def load_task(name_or_path: str | os.PathLike, split: str = SPLIT) -> RetrievalTask:
    """Load a dataset by hub id, local path or synthetic task name, as a QA or BEIR task.

    A local directory with `corpus`, `queries` and `qrels` sub-directories is BEIR; any other local
    dataset is QA. A hub id is BEIR when its configs include corpus, queries and qrels (ViDoRe
    v2/v3), QA otherwise (ViDoRe v1).

    Raises:
        ValueError: the dataset cannot be read, or lacks what evaluation needs.
    """
    from .data import SYNTHETIC_TASKS, load_split

    name = str(name_or_path)
    path = Path(name)
    display = task_name(name)
    if path.exists():
        try:
            if _is_beir_dir(path):
                parts = {part: load_split(path / part, split) for part in BEIR_COLUMNS}
                return beir_task(parts["corpus"], parts["queries"], parts["qrels"], display)
            ds = load_split(path, split)
        except OSError as err:
            raise ValueError(f"{name} could not be read as a dataset: {err}") from err
        return qa_task(ds, display)
    if name in SYNTHETIC_TASKS:
        return qa_task(load_split(name, split), display)
    if name.count("/") != 1:
        raise ValueError(
            f"dataset {name!r} is neither a local path nor a Hugging Face Hub id (owner/name); "
            f"use one of those, {SYNTHETIC!r}, {VIDORE_V1!r} or a synthetic task {sorted(SYNTHETIC_TASKS)}"
        )
    return _load_hub_task(name, split)


def _load_hub_task(name: str, split: str) -> RetrievalTask:
    import datasets

    try:
        configs = set() if name in VIDORE_V1_TASKS else set(datasets.get_dataset_config_names(name))
        if set(BEIR_COLUMNS) <= configs:
            parts = {part: datasets.load_dataset(name, part, split=split) for part in BEIR_COLUMNS}
            return beir_task(parts["corpus"], parts["queries"], parts["qrels"], name)
        ds = datasets.load_dataset(name, split=split)
    except (OSError, ConnectionError, datasets.exceptions.DatasetNotFoundError) as err:
        raise ValueError(
            f"could not load {name!r} (split {split!r}) from the Hugging Face Hub: {err}. It needs network access "
            "or a populated HF cache; or pass the path of a local copy"
        ) from err
    return qa_task(ds, name)


# ------------------------------------------------------------------ embedding and scoring


def _decode(value) -> Image.Image:
    if isinstance(value, dict):
        return (
            Image.open(io.BytesIO(value["bytes"]))
            if value.get("bytes") is not None
            else Image.open(value["path"])
        )
    return Image.open(value) if isinstance(value, str | os.PathLike) else value


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _embed(model, batch) -> list[torch.Tensor]:
    """Run the model on a processed batch; each item's embeddings without padding, on the CPU."""
    batch = batch.to(_model_device(model))
    embeddings = model(**batch)  # (batch, seq_len, dim)
    mask = batch["attention_mask"].bool()  # (batch, seq_len)
    return [e[m].cpu() for e, m in zip(embeddings, mask)]


@torch.inference_mode()
def embed_pages(
    model, processor, task: RetrievalTask, batch_size: int = BATCH_SIZE, progress=None
) -> list[torch.Tensor]:
    """Embeddings of the task's distinct images, in `task.images` order: a list of (n_tokens, dim) CPU tensors.

    Pages are batched by size (similar pages pad little) and decoded one batch at a time.
    """
    sizes = []
    for start in range(0, len(task.images), READ_ROWS):
        for value in task.pages[task.images[start : start + READ_ROWS]]["image"]:
            width, height = _decode(value).size  # reads the header only
            sizes.append(width * height)
    order = sorted(range(len(task.images)), key=sizes.__getitem__)
    embeddings: list[torch.Tensor | None] = [None] * len(order)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        images = [_decode(value) for value in task.pages[[task.images[i] for i in chunk]]["image"]]
        for i, embedding in zip(chunk, _embed(model, processor.process_images(images))):
            embeddings[i] = embedding
        if progress is not None:
            progress.update(len(chunk))
    return embeddings


@torch.inference_mode()
def embed_queries(
    model, processor, queries: Sequence[str], batch_size: int = QUERY_BATCH_SIZE, progress=None
):
    """Embeddings of the queries: a list of (n_tokens, dim) CPU tensors."""
    embeddings: list[torch.Tensor] = []
    for start in range(0, len(queries), batch_size):
        chunk = list(queries[start : start + batch_size])
        embeddings.extend(_embed(model, processor.process_queries(chunk)))
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
            "image": _decode(task.pages[task.images[i]]["image"]),
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
            logger.info(
                f"{key}: "
                + ", ".join(f"{m} {result['metrics'][m]:.4f}" for m in HEADLINE)
                + f" ({result['n_queries']} queries, {result['n_pages']} pages)"
            )
    finally:
        model.train(was_training)
    return results


# ------------------------------------------------------------------ loading a model and an adapter


def _config_of(path: str) -> dict | None:
    config = Path(path) / "config.json"
    if not config.exists():
        return None
    data = json.loads(config.read_text())
    for key in (
        "_name_or_path",
        "transformers_version",
        "dtype",
        "torch_dtype",
        "architectures",
        "embedding_dim",
    ):
        data.pop(key, None)
    return data


def _same_base(adapter_base: str, model_path: str) -> bool:
    """Whether an adapter's recorded base model is the checkpoint at `model_path` (by path, hub id or config)."""
    from .tiny import resolve_model_path

    if not adapter_base:
        return True
    names = [adapter_base, model_path]
    resolved = [
        os.path.normpath(resolve_model_path(n)) if n == "tiny" else os.path.normpath(n) for n in names
    ]
    if resolved[0] == resolved[1]:
        return True
    configs = [_config_of(r) for r in resolved]
    if configs[0] is not None and configs[1] is not None:
        return configs[0] == configs[1]
    # A hub id against a local copy of it (a plain folder, or the HF cache's models--owner--name/snapshots/...).
    hub, local = (names[0], resolved[1]) if configs[0] is None else (names[1], resolved[0])
    hub_name = hub.rstrip("/").split("/")[-1].lower()
    local_lower = local.lower()
    return (
        local_lower.rstrip("/").split("/")[-1] == hub_name
        or f"models--{hub.replace('/', '--')}".lower() in local_lower
    )


def check_adapter(adapter_dir: str | os.PathLike, model: torch.nn.Module, model_path: str) -> dict:
    """Check that a PEFT adapter fits a base model before loading it.

    Returns:
        The adapter's config (`adapter_config.json`).

    Raises:
        ValueError: not an adapter directory, trained on another base model, or weights whose
            shapes or modules do not exist in `model`.
    """
    from safetensors import safe_open

    adapter_dir = Path(adapter_dir)
    config_file = adapter_dir / "adapter_config.json"
    if not config_file.exists():
        raise ValueError(
            f"{adapter_dir} is not a PEFT adapter directory: it has no adapter_config.json "
            "(pass the folder written by PeftModel.save_pretrained, or give a full model with --model-path)"
        )
    config = json.loads(config_file.read_text())
    base = config.get("base_model_name_or_path") or ""
    if not _same_base(base, model_path):
        raise ValueError(
            f"adapter {adapter_dir} was trained on {base!r}, but the base model is {model_path!r}; "
            f"pass --model-path {base} (or a local copy of that checkpoint)"
        )
    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.exists():
        raise ValueError(
            f"adapter {adapter_dir} has no adapter_model.safetensors; save it with safe_serialization"
        )
    modules = dict(model.named_modules())
    problems = []
    with safe_open(str(weights), "pt") as f:
        for key in f.keys():
            shape = tuple(f.get_slice(key).get_shape())
            name = key.removeprefix("base_model.model.")
            for marker, axis, attr in ((".lora_A.", 1, "in_features"), (".lora_B.", 0, "out_features")):
                if marker in name:
                    module_name = name.split(marker)[0]
                    module = modules.get(module_name)
                    if module is None:
                        problems.append(f"{module_name} (no such module)")
                    elif hasattr(module, attr) and getattr(module, attr) != shape[axis]:
                        problems.append(
                            f"{module_name}: adapter {attr} {shape[axis]} != model {getattr(module, attr)}"
                        )
                    break
            else:  # a fully saved module (modules_to_save), e.g. custom_text_proj.weight
                module_name, _, param = name.rpartition(".")
                module = modules.get(module_name)
                tensor = getattr(module, param, None) if module is not None else None
                if tensor is None:
                    problems.append(f"{name} (no such parameter)")
                elif tuple(tensor.shape) != shape:
                    problems.append(f"{name}: adapter shape {list(shape)} != model {list(tensor.shape)}")
    if problems:
        raise ValueError(
            f"adapter {adapter_dir} does not fit the base model {model_path!r}: {len(problems)} mismatch(es), e.g. "
            + "; ".join(problems[:3])
            + ". Load the base model the adapter was trained on (and the same embedding dim)"
        )
    return config


def load_model(
    model_path: str,
    adapter: str | os.PathLike | None = None,
    max_visual_tokens: int | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    attn_implementation: str | None = None,
    seed: int = 0,
):
    """Load a ColQwen3 (and optionally a LoRA adapter, merged) with its processor, ready to evaluate.

    Args:
        model_path: Hub id, local checkpoint or `tiny`.
        adapter: Directory of a PEFT adapter saved by `PeftModel.save_pretrained`.
        max_visual_tokens: Visual tokens per page. None keeps the cap of a processor saved with the
            adapter or the fine-tuned model, and uses 768 on a base checkpoint's processor.
        device: Default: CUDA when available, else CPU.
        dtype: Default: bf16 on a GPU that supports it, else float32.
        attn_implementation: See `ColQwen3.from_pretrained`.
        seed: Seeds a head that the checkpoint lacks, so that an untrained model evaluates reproducibly.

    Returns:
        (model in eval mode, processor).

    Raises:
        ValueError: the adapter does not fit the base model.
    """
    from .model import HEAD, ColQwen3
    from .processor import ColQwen3Processor
    from .tiny import resolve_model_path

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    torch.manual_seed(seed)
    model = ColQwen3.from_pretrained(model_path, dtype=dtype, attn_implementation=attn_implementation)
    new_head = any(k.startswith(HEAD) for k in model.loading_info["missing_keys"])
    processor_dir = resolve_model_path(model_path)
    trained = not new_head
    if adapter is not None:
        config = check_adapter(adapter, model, str(model_path))
        if new_head and HEAD not in (config.get("modules_to_save") or []):
            logger.warning(
                f"the base model has no {HEAD} and adapter {adapter} does not save one (modules_to_save): "
                "its embeddings come from a freshly initialised head, not the one it was trained with"
            )
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
        except (RuntimeError, ValueError, KeyError) as err:
            raise ValueError(f"adapter {adapter} could not be loaded onto {model_path!r}: {err}") from err
        if any((Path(adapter) / f).exists() for f in ("processor_config.json", "preprocessor_config.json")):
            processor_dir, trained = str(adapter), True
    processor = ColQwen3Processor.from_pretrained(processor_dir)
    if max_visual_tokens is not None or not trained:
        processor.set_max_num_visual_tokens(max_visual_tokens or DEFAULT_MAX_VISUAL_TOKENS)
    return model.to(device).eval(), processor


# ------------------------------------------------------------------ result files and tables


def write_results(
    results: dict[str, dict], output_dir: str | os.PathLike, metadata: dict | None = None
) -> Path:
    """Write one JSON per task (`<task>.json`), `results.json` (all tasks) and the summary table.

    Returns:
        The path of `results.json`.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    metadata = dict(metadata or {})
    metadata.setdefault("timestamp", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    for name, result in results.items():
        slug = name.replace("/", "_")
        (output_dir / f"{slug}.json").write_text(
            json.dumps({"task": name, "metadata": metadata, **result}, indent=2) + "\n"
        )
    path = output_dir / RESULTS_FILE
    path.write_text(json.dumps({"metadata": metadata, "results": results}, indent=2) + "\n")
    rows = summary_rows(results)
    _write_table(rows, output_dir / SUMMARY_STEM)
    return path


def summary_rows(results: dict[str, dict], metrics: Sequence[str] = SUMMARY_METRICS) -> list[dict]:
    """One row per task plus `average` (the mean over tasks): task, n_queries, n_pages and `metrics`."""
    rows = [
        {
            "task": name,
            "n_queries": r["n_queries"],
            "n_pages": r["n_pages"],
            **{m: r["metrics"][m] for m in metrics},
        }
        for name, r in results.items()
    ]
    if rows:
        rows.append(
            {
                "task": "average",
                "n_queries": sum(r["n_queries"] for r in rows),
                "n_pages": sum(r["n_pages"] for r in rows),
                **{m: sum(r[m] for r in rows) / len(rows) for m in metrics},
            }
        )
    return rows


def markdown_table(rows: list[dict]) -> str:
    """Rows as a Markdown table; metric values (floats) shown x100 with two decimals."""
    if not rows:
        return ""
    columns = list(rows[0])
    lines = [
        "| " + " | ".join(columns) + " |",
        "|" + "|".join("---" if c == "task" else "---:" for c in columns) + "|",
    ]
    for row in rows:
        cells = [
            f"{row[c] * 100:+.2f}"
            if c.startswith("delta")
            else f"{row[c] * 100:.2f}"
            if isinstance(row[c], float)
            else str(row[c])
            for c in columns
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _write_table(rows: list[dict], stem: Path) -> None:
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["task"])
        writer.writeheader()
        writer.writerows(rows)
    stem.with_suffix(".md").write_text("Scores x 100.\n\n" + markdown_table(rows) + "\n")


def read_results(path: str | os.PathLike) -> dict[str, dict]:
    """Task -> result from `results.json`, one task's JSON, or an output directory.

    Raises:
        ValueError: nothing readable as results there.
    """
    path = Path(path)
    if path.is_dir():
        if (path / RESULTS_FILE).exists():
            path = path / RESULTS_FILE
        else:
            found = {}
            for file in sorted(path.glob("*.json")):
                found.update(read_results(file))
            if not found:
                raise ValueError(
                    f"{path} holds no evaluation results (no {RESULTS_FILE}, no task JSON files)"
                )
            return found
    if not path.exists():
        raise ValueError(f"no results at {path}; pass a results.json, a task JSON or an output directory")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not JSON: {err}") from err
    if isinstance(data, dict) and isinstance(data.get("results"), dict):
        return data["results"]
    if isinstance(data, dict) and "task" in data and isinstance(data.get("metrics"), dict):
        return {data["task"]: data}
    raise ValueError(
        f"{path} is not an evaluation result file (expected keys 'results', or 'task' and 'metrics')"
    )


def compare_results(
    before: dict[str, dict] | str | os.PathLike,
    after: dict[str, dict] | str | os.PathLike,
    metrics: Sequence[str] = HEADLINE,
) -> list[dict]:
    """Per-task before/after/delta of `metrics` for the tasks both have, plus their `average`.

    Raises:
        ValueError: the two results share no task.
    """
    before = before if isinstance(before, dict) else read_results(before)
    after = after if isinstance(after, dict) else read_results(after)
    common = [name for name in before if name in after]
    if not common:
        raise ValueError(f"the two results share no task: {sorted(before)} vs {sorted(after)}")
    rows = []
    for name in common:
        row: dict = {"task": name}
        for m in metrics:
            old, new = before[name]["metrics"][m], after[name]["metrics"][m]
            row.update({f"{m} before": old, f"{m} after": new, f"delta {m}": new - old})
        rows.append(row)
    average = {"task": "average"}
    for column in rows[0]:
        if column != "task":
            average[column] = sum(r[column] for r in rows) / len(rows)
    rows.append(average)
    return rows


def write_comparison(rows: list[dict], output_dir: str | os.PathLike) -> Path:
    """Write `comparison.csv` and `comparison.md`; returns the Markdown path."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    _write_table(rows, output_dir / COMPARISON_STEM)
    return output_dir / f"{COMPARISON_STEM}.md"
