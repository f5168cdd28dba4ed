"""The synthetic pages: the schemas of colpali_train_set and the ViDoRe v1 test sets, queries that name
what their page shows, and reproducibility."""

import numpy as np
import pytest

from colqwen3_lib.data import load_split
from colqwen3_lib.synthetic import (
    COLOURS,
    KINDS,
    ORIENTATIONS,
    SYNTHETIC_BEIR_TASKS,
    SYNTHETIC_TASKS,
    make_synthetic_docs,
    mirror_qa_rows,
)

TRAIN_COLUMNS = {
    "query",
    "image",
    "image_filename",
    "answer",
    "source",
    "options",
    "page",
    "model",
    "prompt",
    "answer_type",
}
QA_COLUMNS = {"query", "image", "image_filename", "answer", "source", "page"}


def test_train_set_has_the_colpali_train_set_schema(synthetic):
    for split in ("train", "test"):
        rows = load_split(synthetic["colpali_train_set"], split)
        assert set(rows.column_names) == TRAIN_COLUMNS
        assert all(isinstance(q, str) and q for q in rows["query"])


@pytest.mark.parametrize("task", sorted(SYNTHETIC_TASKS))
def test_test_tasks_have_the_vidore_qa_schema_with_distractors(synthetic, task):
    rows = load_split(synthetic[task], "test")
    assert QA_COLUMNS <= set(rows.column_names)
    queries = rows["query"]
    assert any(q is None for q in queries)  # distractor pages
    assert sum(q is not None for q in queries) >= len(queries) // 2
    assert len(set(rows["image_filename"])) == rows.num_rows  # every page distinct


def _attributes(answer: str) -> tuple[str, str, str]:
    colour = next(c for c in COLOURS if c in answer)
    kind = next(k for k in KINDS if f" {k} " in f" {answer} ")
    orientation = next(o for o in ORIENTATIONS if o in answer)
    return colour, kind, orientation


def test_queries_name_what_is_visible_on_their_page(synthetic):
    rows = load_split(synthetic["colpali_train_set"], "train")
    for query, answer in zip(rows["query"][:50], rows["answer"][:50]):
        assert all(attribute in query.lower() for attribute in _attributes(answer)), (query, answer)


@pytest.mark.parametrize("task", SYNTHETIC_TASKS)
def test_each_test_query_is_answered_by_its_page_alone(synthetic, task):
    """A QA test set has one relevant page per query: no other page may match what the query asks for."""
    rows = load_split(synthetic[task], "test")
    pages = [_attributes(answer) for answer in rows["answer"]]
    for query, page in zip(rows["query"], pages):
        if query is None:
            continue
        matches = [p for p in pages if all(attribute in query.lower() for attribute in p)]
        assert matches == [page], query


def test_the_main_colour_dominates_the_page(synthetic):
    rows = load_split(synthetic["colpali_train_set"], "train").select(range(40))
    names, palette = list(COLOURS), np.array(list(COLOURS.values()), dtype=float)
    for image, answer in zip(rows["image"], rows["answer"]):
        pixels = np.asarray(image, dtype=float).reshape(-1, 3)
        saturated = pixels[np.abs(pixels - pixels.mean(axis=1, keepdims=True)).sum(axis=1) > 100]
        assert len(saturated) > 0.01 * len(pixels), answer
        nearest = np.linalg.norm(saturated[:, None] - palette[None], axis=2).argmin(axis=1)
        assert names[np.bincount(nearest).argmax()] in answer  # most saturated pixels are the named colour


def test_same_seed_same_pages(tmp_path):
    a = make_synthetic_docs(tmp_path / "a", n_train=6, n_test=4, seed=1)
    b = make_synthetic_docs(tmp_path / "b", n_train=6, n_test=4, seed=1)
    c = make_synthetic_docs(tmp_path / "c", n_train=6, n_test=4, seed=2)
    ra, rb, rc = (load_split(x["colpali_train_set"], "train") for x in (a, b, c))
    assert ra["query"] == rb["query"]
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(ra["image"], rb["image"]))
    assert ra["query"] != rc["query"]


def test_pages_vary_in_size_and_orientation(synthetic):
    sizes = {image.size for image in load_split(synthetic["colpali_train_set"], "train")["image"]}
    assert len(sizes) > 20
    assert any(w > h for w, h in sizes) and any(h > w for w, h in sizes)


def test_too_many_test_pages_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="at most 48 distinct test pages"):
        make_synthetic_docs(tmp_path / "x", n_train=2, n_test=60)
    assert not (tmp_path / "x").exists()


def test_a_qa_set_is_mirrored_as_mtebs_beir_mirrors_are():
    """Distinct images in first-row order; distinct queries likewise; every row of a repeated query relevant."""
    mirror = mirror_qa_rows(["A", None, "B", "A", "A"], ["x", "y", "z", "w", "x"])
    assert mirror == {"corpus": [0, 1, 2, 3], "queries": ["A", "B"], "qrels": [(0, 0), (1, 2), (0, 3)]}


@pytest.mark.parametrize("mirror", sorted(SYNTHETIC_BEIR_TASKS))
def test_each_synthetic_test_set_has_its_beir_mirror(synthetic, mirror):
    qa = load_split(synthetic[SYNTHETIC_BEIR_TASKS[mirror]], "test")
    corpus, queries, qrels = (
        load_split(synthetic[mirror] / part, "test") for part in ("corpus", "queries", "qrels")
    )
    assert corpus["corpus-id"] == list(range(len(qa)))  # every page is distinct: one document per row
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(corpus["image"], qa["image"]))
    asked = [(row, query) for row, query in enumerate(qa["query"]) if query is not None]
    assert queries["query"] == [query for _, query in asked] and queries["query-id"] == list(
        range(len(asked))
    )
    assert list(zip(qrels["query-id"], qrels["corpus-id"], qrels["score"])) == [
        (i, row, 1) for i, (row, _) in enumerate(asked)
    ]


def test_building_the_pages_draws_no_progress_bar_and_leaves_the_bars_as_they_were(tmp_path, capsys):
    """The first notebook to need the pages builds them: that must not open it with ten "Saving the dataset"
    bars, and the user's own progress bars stay on."""
    import datasets

    datasets.enable_progress_bars()
    make_synthetic_docs(tmp_path / "docs", n_train=4, n_test=4)
    assert "Saving the dataset" not in capsys.readouterr().err
    assert not datasets.are_progress_bars_disabled()
