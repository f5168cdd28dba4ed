"""Evaluation tasks: ViDoRe datasets (hub ids, local copies, the synthetic sets) reduced to queries, pages and
qrels; dataset names and the aliases of `benchmarks.py`.

Three dataset layouts, as ViDoRe and mteb publish them:

- QA (ViDoRe v1): one row per page with `query` (None on distractor pages), `image` and `image_filename`.
- BEIR (ViDoRe v2, mteb's mirrors of v1): configs (or local folders) `corpus` (`corpus-id`, `image`),
  `queries` (`query-id`, `query`) and `qrels` (`query-id`, `corpus-id`, `score`: graded relevance).
- mteb's per-language layout (ViDoRe v3): configs `<language>-corpus` (`id`, `image`),
  `<language>-queries` (`id`, `text`) and `<language>-qrels`, one set per language.

How a dataset is read depends on the evaluation protocol (`metrics.PROTOCOLS`):

- `vidore-benchmark`: a QA set as vidore-benchmark reads it. The corpus is the set of distinct pages by
  `image_filename`; queries are de-duplicated; a query's relevant page (relevance 1) is the
  `image_filename` of its row (of its last row when it occurs more than once); a page that appears on
  several rows scores the max over its rows. A BEIR or per-language dataset is one pool of queries.
- `mteb`: a QA set as its BEIR mirror (`synthetic.mirror_qa_rows`): every distinct image is a document,
  every row of a repeated query is relevant. mteb's language subsets (ViDoRe v2's multilingual tasks
  split by the queries' `language`, ViDoRe v3's per-language configs) are kept apart in `subsets`.

Identical images are embedded once, whatever their rows or ids.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .benchmarks import (
    ALIASES,
    BENCHMARKS,
    KNOWN_TASKS,
    VIDORE_V1_TASKS,
    BenchmarkTask,
    local_copy_of,
    split_revision,
)
from .data import load_split
from .metrics import MTEB, PROTOCOL, check_protocol
from .synthetic import (
    SYNTHETIC_BEIR_TASKS,
    SYNTHETIC_TASKS,
    image_key,
    mirror_qa_rows,
    synthetic_docs,
)

QA, BEIR = "qa", "beir"
QA_COLUMNS = ("query", "image", "image_filename")
BEIR_COLUMNS = {
    "corpus": ("corpus-id", "image"),
    "queries": ("query-id", "query"),
    "qrels": ("query-id", "corpus-id", "score"),
}
# mteb's per-language layout names ids `id` (or `_id`) and query text `text`.
MTEB_COLUMNS = {
    "corpus": {"id": "corpus-id", "_id": "corpus-id"},
    "queries": {"id": "query-id", "_id": "query-id", "text": "query"},
}
SPLIT = "test"
READ_ROWS = 256  # dataset rows read (undecoded) at a time


@dataclass
class RetrievalTask:
    """One evaluation task, reduced to what scoring needs.

    `pages` holds the page images undecoded; `images` lists the row of each distinct image in it;
    `image_docs` pairs each image index with a document id (an image may stand for several
    documents, a document may have several images: its score is the max). `query_ids[i]` is the id
    of query text `queries[i]` (an id may have several texts: its score is the max). `subsets` maps
    each of mteb's language subsets to its query ids (empty: one subset, all queries).
    """

    name: str
    format: str
    queries: list[str]
    query_ids: list[str]
    qrels: dict[str, dict[str, int]]
    pages: object  # datasets.Dataset with a single `image` column, not decoded
    images: list[int]
    image_docs: list[tuple[int, str]]
    subsets: dict[str, list[str]] = field(default_factory=dict)
    revision: str | None = None
    copy_of: str | None = None  # a local folder: the hub dataset it is a copy of (`benchmarks.local_copy_of`)

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


def _distinct_images(pages, what: str) -> tuple[list[int], list[int]]:
    """The row of each distinct image of `pages` (by content), and for each row the index of its image."""
    index_of: dict[str, int] = {}
    rows: list[int] = []
    image_of_row: list[int] = []
    for start in range(0, len(pages), READ_ROWS):
        for offset, value in enumerate(pages[start : start + READ_ROWS]["image"]):
            if value is None:
                raise ValueError(f"{what}: row {start + offset} has no image")
            key = image_key(value)
            if key not in index_of:
                index_of[key] = len(rows)
                rows.append(start + offset)
            image_of_row.append(index_of[key])
    return rows, image_of_row


def _qa_queries(ds, name: str) -> list[str | None]:
    """Each row's query (None on a distractor page), checked."""
    queries = ds["query"]
    for row, query in enumerate(queries):
        if query is not None and (not isinstance(query, str) or not query.strip()):
            raise ValueError(f"dataset {name!r}: row {row} has query {query!r}; queries are text or None")
    if all(query is None for query in queries):
        raise ValueError(
            f"dataset {name!r} has no queries: the query of every one of its {len(ds)} rows is None"
        )
    return queries


def qa_task(ds, name: str, protocol: str = PROTOCOL) -> RetrievalTask:
    """A ViDoRe v1 QA dataset (one row per page) -> a task, read as `protocol` reads it (see the module doc).

    Raises:
        ValueError: missing columns, no rows, or no row with a query.
    """
    _require_columns(ds, QA_COLUMNS, f"dataset {name!r}")
    row_queries = _qa_queries(ds, name)
    pages = _raw_images(ds)
    rows, image_of_row = _distinct_images(pages, f"dataset {name!r}")
    if check_protocol(protocol) == MTEB:
        mirror = mirror_qa_rows(row_queries, image_of_row)  # corpus id i is image i: both in first-row order
        query_ids = [str(i) for i in range(len(mirror["queries"]))]
        qrels: dict[str, dict[str, int]] = {}
        for query, corpus in mirror["qrels"]:
            qrels.setdefault(str(query), {})[str(corpus)] = 1
        image_docs = [(image, str(image)) for image in range(len(rows))]
        return RetrievalTask(name, QA, mirror["queries"], query_ids, qrels, pages, rows, image_docs)
    filenames = [str(f) for f in ds["image_filename"]]
    queries: list[str] = []
    relevant: dict[str, str] = {}
    for row, query in enumerate(row_queries):
        if query is None:
            continue  # a distractor page
        if query not in relevant:
            queries.append(query)
        relevant[query] = filenames[row]  # the last row of a repeated query wins, as in the reference
    image_docs = sorted({(image, filenames[row]) for row, image in enumerate(image_of_row)})
    query_ids = [str(i) for i in range(len(queries))]
    qrels = {qid: {relevant[query]: 1} for qid, query in zip(query_ids, queries)}
    return RetrievalTask(name, QA, queries, query_ids, qrels, pages, rows, image_docs)


def beir_task(
    corpus, queries, qrels, name: str, subsets: dict[str, list[str]] | None = None
) -> RetrievalTask:
    """A BEIR-format dataset (corpus, queries, qrels; graded relevance) -> a task.

    Ids are compared as strings. A document id on several corpus rows scores the max over them; a
    query id on several query rows likewise.

    Args:
        subsets: mteb's language subsets: subset name -> its query ids.

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
    return RetrievalTask(name, BEIR, texts, query_ids, judgements, pages, rows, image_docs, subsets or {})


def _by_language(queries, languages: Sequence[str], name: str) -> dict[str, list[str]]:
    """mteb's ViDoRe v2 subsets: the query ids of each language, from the queries' `language` column."""
    if "language" not in queries.column_names:
        raise ValueError(
            f"the queries of dataset {name!r} have no `language` column; mteb splits this task by language"
        )
    subsets: dict[str, list[str]] = {language: [] for language in languages}
    for qid, language in zip(queries["query-id"], queries["language"]):
        if language in subsets:
            subsets[language].append(str(qid))
    return subsets


def _mteb_part(ds, part: str):
    """A part of mteb's per-language layout with the BEIR column names."""
    renames = {old: new for old, new in MTEB_COLUMNS.get(part, {}).items() if old in ds.column_names}
    renames = {old: new for old, new in renames.items() if new not in ds.column_names}
    return ds.rename_columns(renames) if renames else ds


def per_language_task(load_part, languages: Sequence[str], name: str) -> RetrievalTask:
    """mteb's per-language layout (`<language>-corpus`, `-queries`, `-qrels`) -> one task with a subset per language.

    Query ids become `<language>/<id>` (a translated query keeps its id across languages); the languages
    must share one corpus, as ViDoRe v3's do.

    Args:
        load_part: `load_part(config)` -> that config's `datasets.Dataset`.

    Raises:
        ValueError: a part is missing or malformed, or the languages' corpora differ.
    """
    from datasets import Dataset, concatenate_datasets

    corpus, corpus_ids, queries, qrels, subsets = None, None, [], [], {}
    for language in languages:
        ids = _mteb_part(load_part(f"{language}-corpus"), "corpus")
        _require_columns(ids, BEIR_COLUMNS["corpus"], f"the {language}-corpus of dataset {name!r}")
        if corpus is None:
            corpus, corpus_ids = ids, [str(c) for c in ids["corpus-id"]]
        elif [str(c) for c in ids["corpus-id"]] != corpus_ids:
            raise ValueError(
                f"dataset {name!r}: the {language}-corpus differs from the {languages[0]}-corpus; the kit "
                "evaluates the languages of a task over one shared corpus"
            )
        part = _mteb_part(load_part(f"{language}-queries"), "queries")
        judged = load_part(f"{language}-qrels")
        for ds, what in ((part, "queries"), (judged, "qrels")):
            _require_columns(ds, BEIR_COLUMNS[what], f"the {language}-{what} of dataset {name!r}")
        ids_here = [f"{language}/{qid}" for qid in part["query-id"]]
        queries.append(Dataset.from_dict({"query-id": ids_here, "query": part["query"]}))
        qrels.append(
            Dataset.from_dict(
                {
                    "query-id": [f"{language}/{qid}" for qid in judged["query-id"]],
                    "corpus-id": judged["corpus-id"],
                    "score": judged["score"],
                }
            )
        )
        subsets[language] = ids_here
    return beir_task(corpus, concatenate_datasets(queries), concatenate_datasets(qrels), name, subsets)


def _config_languages(configs: Iterable[str], known: Sequence[str] = ()) -> list[str]:
    """The languages of mteb's per-language layout among `configs` (folder or config names `<language>-corpus`,
    `-queries`, `-qrels`): `known` (mteb's order) when all are there, else those found, in name order."""
    configs = set(configs)
    parts = ("corpus", "queries", "qrels")
    seen = sorted({c.rsplit("-", 1)[0] for c in configs if "-" in c and c.rsplit("-", 1)[1] in parts})
    for language in seen:  # a language with some of its parts: its score would be left out of the average
        missing = [p for p in parts if f"{language}-{p}" not in configs]
        if missing and len(missing) < len(parts):
            raise ValueError(
                f"the {language} part of this per-language dataset has no {' or '.join(f'{language}-{p}' for p in missing)}: "
                "a score averaged over fewer languages than the dataset has is not its score; add what is missing, "
                f"or remove the {language} folders to leave the language out"
            )
    found = [lang for lang in seen if all(f"{lang}-{p}" in configs for p in parts)]
    return list(known) if known and set(known) <= set(found) else found


def _is_beir_dir(path: Path) -> bool:
    """Whether a local folder is BEIR (`corpus`, `queries`, `qrels`).

    Raises:
        ValueError: it has some of the three folders but not all: it looks like BEIR and cannot be read as one.
    """
    present = [part for part in BEIR_COLUMNS if (path / part).exists()]
    if present and len(present) < len(BEIR_COLUMNS):
        missing = [part for part in BEIR_COLUMNS if part not in present]
        raise ValueError(
            f"{path} looks like a BEIR dataset ({', '.join(present)}) but has no {' or '.join(missing)}: add "
            f"{'them' if len(missing) > 1 else 'it'} (qrels: query-id, corpus-id, score), or point to a QA dataset"
        )
    return bool(present)


# ------------------------------------------------------------------ names


def expand_datasets(names: Iterable[str | os.PathLike], protocol: str = PROTOCOL) -> list[str]:
    """Expand the aliases (`synthetic`, `vidore-v1`, `vidore-v2`, `vidore-v3`) into what they name under
    `protocol` (pinned hub datasets as `path@revision`); split commas."""
    check_protocol(protocol)
    expanded: list[str] = []
    for item in names:
        for name in str(item).split(",") if not os.path.exists(item) else [str(item)]:
            name = name.strip()
            if name in BENCHMARKS[protocol]:
                expanded.extend(task.spec for task in BENCHMARKS[protocol][name].tasks)
            elif name:
                expanded.append(name)
    if not expanded:
        raise ValueError(f"no datasets given; name ViDoRe tasks, local paths or one of {list(ALIASES)}")
    for name in expanded:  # every name checked before any is evaluated
        _check_dataset_name(name)
    return expanded


def split_copy_of(spec: str) -> tuple[str, BenchmarkTask | None]:
    """`PATH=owner/name` (a local copy of a ViDoRe task, said by the user) -> (PATH, that task); else (spec, None).

    Raises:
        ValueError: the name after `=` is not a task of the benchmarks the kit knows.
    """
    if "=" not in spec or os.path.exists(spec):
        return spec, None
    path, hub_id = spec.rsplit("=", 1)
    hub_id = split_revision(hub_id)[0]
    if hub_id not in KNOWN_TASKS:
        raise ValueError(
            f"{spec!r}: {hub_id!r} is not a ViDoRe task the kit knows; after '=' name one of {sorted(KNOWN_TASKS)}"
        )
    if not os.path.exists(path):
        raise ValueError(f"{spec!r}: {path} does not exist; before '=' give the folder of your local copy")
    return path, KNOWN_TASKS[hub_id]


def _check_dataset_name(name_or_path: str) -> None:
    """A name a dataset can have: a local path (optionally `=owner/name`, the task it is a copy of), a synthetic
    task, or a hub id (owner/name, optionally @revision).

    Raises:
        ValueError: it is none of those; the message lists what is.
    """
    name = split_revision(split_copy_of(name_or_path)[0])[0]
    if Path(name).exists() or name in SYNTHETIC_TASKS or name in SYNTHETIC_BEIR_TASKS or name.count("/") == 1:
        return
    raise ValueError(
        f"dataset {name!r} is neither a local path nor a Hugging Face Hub id (owner/name); use one of "
        f"those, an alias {list(ALIASES)} or a synthetic task {sorted([*SYNTHETIC_TASKS, *SYNTHETIC_BEIR_TASKS])}"
    )


def task_name(name_or_path: str | os.PathLike) -> str:
    """How a dataset is named in results: hub ids (without revision) and synthetic names as given, local
    paths by folder name."""
    path = Path(split_copy_of(str(name_or_path))[0])
    return path.resolve().name if path.exists() else split_revision(str(name_or_path))[0]


# ------------------------------------------------------------------ loading


def load_task(name_or_path: str | os.PathLike, split: str = SPLIT, protocol: str = PROTOCOL) -> RetrievalTask:
    """Load a dataset by hub id (`owner/name` or `owner/name@revision`), local path or synthetic task name.

    A local folder with `corpus`, `queries` and `qrels` is BEIR; one with `<language>-corpus`,
    `<language>-queries` and `<language>-qrels` folders is mteb's per-language layout; any other local
    dataset is QA. On the hub, the dataset's configs decide likewise. Under the `mteb` protocol, the
    ViDoRe v2 tasks mteb splits by language are split the same way, and so is a local copy of one: a folder
    named as the hub dataset (`benchmarks.local_copy_of`) or given as `PATH=owner/name`. A local copy is
    scored by its benchmark's main score.

    Raises:
        ValueError: the dataset cannot be read, or lacks what evaluation needs.
    """
    check_protocol(protocol)
    name, copy_of = split_copy_of(str(name_or_path))
    name, revision = split_revision(name)
    if name in SYNTHETIC_BEIR_TASKS:
        name = str(synthetic_docs()[name])
    path = Path(name)
    display = task_name(name)
    if path.exists():
        copy_of = copy_of or local_copy_of(path)
        try:
            task = _load_local_task(path, split, protocol, display, copy_of)
        except OSError as err:
            raise ValueError(f"{name} could not be read as a dataset: {err}") from err
        task.copy_of = copy_of.path if copy_of else None
        return task
    if name in SYNTHETIC_TASKS:
        return qa_task(load_split(name, split), display, protocol)
    _check_dataset_name(name)
    task = _load_hub_task(name, split, revision, protocol)
    task.revision = revision
    return task


def _load_local_task(
    path: Path, split: str, protocol: str, display: str, copy_of: BenchmarkTask | None
) -> RetrievalTask:
    languages = copy_of.languages if copy_of else ()
    if _is_beir_dir(path):
        parts = {part: load_split(path / part, split) for part in BEIR_COLUMNS}
        subsets = (
            _by_language(parts["queries"], languages, display) if protocol == MTEB and languages else None
        )
        return beir_task(parts["corpus"], parts["queries"], parts["qrels"], display, subsets)
    languages = _config_languages((p.name for p in path.iterdir() if p.is_dir()), languages)
    if languages:
        return per_language_task(lambda config: load_split(path / config, split), languages, display)
    return qa_task(load_split(path, split), display, protocol)


def _load_hub_task(name: str, split: str, revision: str | None, protocol: str) -> RetrievalTask:
    import datasets

    pinned = {"revision": revision} if revision else {}  # no revision: the hub's main branch
    known = KNOWN_TASKS.get(name)

    def load(config: str | None = None):
        return datasets.load_dataset(name, config, split=split, **pinned)

    try:
        if name in VIDORE_V1_TASKS:
            configs = set()
        else:
            configs = set(datasets.get_dataset_config_names(name, **pinned))
        languages = _config_languages(configs, known.languages if known else ())
        if languages:
            return per_language_task(load, languages, name)
        if set(BEIR_COLUMNS) <= configs:
            parts = {part: load(part) for part in BEIR_COLUMNS}
            subsets = None
            if protocol == MTEB and known is not None and known.languages:
                subsets = _by_language(parts["queries"], known.languages, name)
            return beir_task(parts["corpus"], parts["queries"], parts["qrels"], name, subsets)
        ds = load() if pinned else datasets.load_dataset(name, split=split)
    except (OSError, ConnectionError, datasets.exceptions.DatasetNotFoundError) as err:
        raise ValueError(
            f"could not load {name!r} (split {split!r}"
            + (f", revision {revision}" if revision else "")
            + f") from the Hugging Face Hub: {err}. It needs network access or a populated HF cache; or pass "
            "the path of a local copy"
        ) from err
    return qa_task(ds, name, protocol)
