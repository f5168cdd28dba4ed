"""Evaluation tasks: ViDoRe datasets (hub ids, local copies, the synthetic sets) reduced to queries, pages and qrels.

Two dataset formats, as ViDoRe publishes them:

- QA (ViDoRe v1): one row per page with `query` (None on distractor pages), `image` and
  `image_filename`. The corpus is the set of distinct pages by `image_filename`; queries are
  de-duplicated; a query's relevant page (relevance 1) is the `image_filename` of its row (of its
  last row when it occurs more than once, as the reference evaluator builds its qrels); a page that
  appears on several rows scores the max over its rows.
- BEIR (ViDoRe v2/v3): configs `corpus` (`corpus-id`, `image`), `queries` (`query-id`, `query`)
  and `qrels` (`query-id`, `corpus-id`, `score`: graded relevance).

Identical images are embedded once, whatever their rows or ids.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from .data import load_split
from .synthetic import SYNTHETIC, SYNTHETIC_TASKS

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
QA, BEIR = "qa", "beir"
QA_COLUMNS = ("query", "image", "image_filename")
BEIR_COLUMNS = {
    "corpus": ("corpus-id", "image"),
    "queries": ("query-id", "query"),
    "qrels": ("query-id", "corpus-id", "score"),
}
SPLIT = "test"
READ_ROWS = 256  # dataset rows read (undecoded) at a time


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
