"""ViDoRe evaluation semantics (QA and BEIR formats) against hand-computed metrics.

A stand-in model makes the scores exact: a page becomes one token, the one-hot vector of its
colour; a query becomes one token, a vector the test chooses. So score(query, page) is that
vector's entry at the page's colour, and every NDCG below can be worked out by hand.
"""

import math

import pytest
import torch
from datasets import Dataset, DatasetDict, Features, Value
from datasets import Image as ImageFeature
from PIL import Image
from transformers import BatchFeature

from colqwen3_lib import evaluation as ev

COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200), (200, 30, 200)]
DIM = len(COLOURS)


def page(colour: int) -> Image.Image:
    return Image.new("RGB", (40, 40), COLOURS[colour])


class FakeProcessor:
    """Pages -> their colour index; queries -> the vector `vectors[query]`. Counts what it processed."""

    def __init__(self, vectors: dict[str, list[float]]):
        self.vectors = vectors
        self.images_seen: list[int] = []
        self.queries_seen: list[str] = []

    def process_images(self, images):
        colours = [COLOURS.index(image.convert("RGB").getpixel((0, 0))) for image in images]
        self.images_seen.extend(colours)
        return BatchFeature(
            {"pixel_values": torch.tensor(colours), "attention_mask": torch.ones(len(colours), 1)}
        )

    def process_queries(self, queries):
        self.queries_seen.extend(queries)
        vectors = torch.tensor([self.vectors[q] for q in queries], dtype=torch.float32)
        return BatchFeature({"query_vectors": vectors, "attention_mask": torch.ones(len(queries), 1)})


class FakeModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the model a device

    def forward(self, attention_mask, pixel_values=None, query_vectors=None):
        if pixel_values is not None:
            return torch.nn.functional.one_hot(pixel_values, DIM).float()[:, None, :]  # (batch, 1, dim)
        return query_vectors[:, None, :]  # (batch, 1, dim)


def qa_dataset(rows: list[tuple]) -> Dataset:
    """rows of (query or None, colour, image_filename) -> a ViDoRe v1 QA dataset."""
    features = Features(
        {
            "query": Value("string"),
            "image": ImageFeature(),
            "image_filename": Value("string"),
            "answer": Value("string"),
        }
    )
    return Dataset.from_dict(
        {
            "query": [r[0] for r in rows],
            "image": [page(r[1]) for r in rows],
            "image_filename": [r[2] for r in rows],
            "answer": ["-"] * len(rows),
        },
        features=features,
    )


LOG2_3 = math.log2(3)

# ------------------------------------------------------------------ metrics


def test_metrics_single_relevant_page_at_rank_three():
    metrics = ev.retrieval_metrics({"q": {"d1": 1}}, {"q": {"d1": 0.2, "d2": 0.9, "d3": 0.5}})
    assert metrics["ndcg_at_1"] == 0.0
    assert metrics["ndcg_at_3"] == pytest.approx(1 / math.log2(4))
    assert metrics["ndcg_at_5"] == pytest.approx(0.5)
    assert metrics["mrr_at_1"] == 0.0 and metrics["mrr_at_3"] == pytest.approx(1 / 3)
    assert metrics["recall_at_1"] == 0.0 and metrics["recall_at_3"] == 1.0
    assert metrics["map_at_5"] == pytest.approx(1 / 3)
    assert metrics["precision_at_1"] == 0.0
    expected = {f"{m}_at_{k}" for m in ("ndcg", "map", "recall", "precision", "mrr") for k in ev.K_VALUES}
    assert set(metrics) == expected


def test_metrics_graded_relevance_and_unjudged_queries():
    qrels = {"q1": {"d2": 2, "d3": 1}, "q2": {"d1": 1}}
    run = {
        "q1": {"d0": 0.9, "d1": 0.1, "d2": 0.5, "d3": 0.3},  # ranks d0, d2, d3, d1
        "q2": {"d0": 0.1, "d1": 0.8},
        "q3": {"d0": 0.5},  # no judgements: not averaged
    }
    metrics = ev.retrieval_metrics(qrels, run)
    q1_ndcg = (2 / LOG2_3 + 1 / 2) / (2 + 1 / LOG2_3)  # gain = relevance, discount log2(rank + 1)
    assert metrics["ndcg_at_5"] == pytest.approx((q1_ndcg + 1) / 2)
    assert metrics["ndcg_at_1"] == pytest.approx(0.5)
    assert metrics["mrr_at_5"] == pytest.approx((1 / 2 + 1) / 2)


def test_metrics_need_judged_queries():
    with pytest.raises(ValueError, match="relevance judgements"):
        ev.retrieval_metrics({"a": {"d": 1}}, {"b": {"d": 1.0}})


# ------------------------------------------------------------------ QA format


# Rows: a distractor, a query asked twice about different pages, a page listed twice (same image),
# and a filename with two different images.
QA_ROWS = [
    (None, 0, "p0.png"),
    ("A", 1, "p1.png"),
    ("B", 2, "p2.png"),
    ("A", 3, "p3.png"),
    (None, 2, "p2.png"),
    ("C", 4, "p4.png"),
    (None, 5, "p4.png"),
]
#                  colour: 0    1    2    3    4    5
QA_VECTORS = {
    "A": [0.9, 0.8, 0.0, 0.5, 0.1, 0.0],  # ranks p0, p1, p3, p4, p2: its last row's page p3 is third
    "B": [0.1, 0.2, 0.7, 0.3, 0.0, 0.0],  # p2 first
    "C": [0.6, 0.0, 0.0, 0.0, 0.2, 0.95],  # p4 first only through its second image (the max)
}


@pytest.fixture(scope="module")
def qa_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("qa") / "tiny_qa_test"
    DatasetDict(test=qa_dataset(QA_ROWS)).save_to_disk(str(path))
    return path


def test_qa_task_structure(qa_dir):
    task = ev.load_task(qa_dir)
    assert task.name == "tiny_qa_test" and task.format == ev.QA
    assert task.queries == ["A", "B", "C"]  # de-duplicated, distractors dropped
    assert len(task.images) == 6  # rows 2 and 4 hold the same image
    assert task.n_documents == 5  # distinct filenames
    relevant = {q: next(iter(task.qrels[qid])) for q, qid in zip(task.queries, task.query_ids)}
    assert relevant == {"A": "p3.png", "B": "p2.png", "C": "p4.png"}
    assert all(list(judged.values()) == [1] for judged in task.qrels.values())


def test_qa_metrics_match_hand_computed_values(qa_dir):
    processor = FakeProcessor(QA_VECTORS)
    results = ev.evaluate_model(FakeModel(), processor, [str(qa_dir)], show_progress=False)
    result = results["tiny_qa_test"]
    assert (result["n_queries"], result["n_pages"], result["n_images"]) == (3, 5, 6)
    metrics = result["metrics"]
    assert metrics["ndcg_at_1"] == pytest.approx(2 / 3)
    assert metrics["ndcg_at_5"] == pytest.approx((0.5 + 1 + 1) / 3)  # A: 1 / log2(3 + 1)
    assert metrics["ndcg_at_10"] == pytest.approx((0.5 + 1 + 1) / 3)
    assert metrics["recall_at_1"] == pytest.approx(2 / 3) and metrics["recall_at_3"] == 1.0
    assert metrics["mrr_at_10"] == pytest.approx((1 / 3 + 1 + 1) / 3)
    # Each distinct image and each distinct query went through the model exactly once.
    assert sorted(processor.images_seen) == [0, 1, 2, 3, 4, 5]
    assert sorted(processor.queries_seen) == ["A", "B", "C"]


def test_qa_run_takes_the_max_over_a_pages_images(qa_dir):
    task = ev.load_task(qa_dir)
    scores = torch.zeros(3, len(task.images))
    scores[2] = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])  # image i scores (i + 1) / 10 for query C
    run = ev.build_run(task, scores)
    assert set(run["2"]) == {"p0.png", "p1.png", "p2.png", "p3.png", "p4.png"}
    assert run["2"]["p4.png"] == pytest.approx(0.6)  # max of its two images (0.5 and 0.6)


def test_qa_errors_name_the_problem(tmp_path):
    no_filename = qa_dataset(QA_ROWS).remove_columns("image_filename")
    with pytest.raises(ValueError, match="image_filename"):
        ev.qa_task(no_filename, "broken")
    with pytest.raises(ValueError, match="empty"):
        ev.qa_task(qa_dataset(QA_ROWS).select([]), "empty_set")
    with pytest.raises(ValueError, match="no queries"):
        ev.qa_task(qa_dataset([(None, 0, "a.png"), (None, 1, "b.png")]), "distractors_only")
    with pytest.raises(ValueError, match="neither a local path nor a Hugging Face Hub id"):
        ev.load_task("no_such_dataset")
    (tmp_path / "no_data").mkdir()
    with pytest.raises(ValueError, match="no_data could not be read as a dataset"):
        ev.load_task(tmp_path / "no_data")
    DatasetDict(test=no_filename).save_to_disk(str(tmp_path / "broken"))
    with pytest.raises(ValueError, match="broken.*image_filename"):
        ev.evaluate_model(
            FakeModel(), FakeProcessor(QA_VECTORS), [str(tmp_path / "broken")], show_progress=False
        )


# ------------------------------------------------------------------ BEIR format

BEIR_VECTORS = {
    "first": [0.9, 0.1, 0.5, 0.3, 0.0, 0.0],  # ranks 0, 2, 3, 1, 4
    "second": [0.1, 0.8, 0.0, 0.0, 0.2, 0.0],  # ranks 1, 4, 0, ...
    "unjudged": [0.5, 0.0, 0.0, 0.0, 0.0, 0.0],
}


@pytest.fixture(scope="module")
def beir_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("beir") / "tiny_beir"
    corpus = Dataset.from_dict(
        {"corpus-id": [0, 1, 2, 3, 4], "image": [page(c) for c in range(5)]},
        features=Features({"corpus-id": Value("int64"), "image": ImageFeature()}),
    )
    queries = Dataset.from_dict({"query-id": [1, 2, 3], "query": ["first", "second", "unjudged"]})
    # Query id 1 equals corpus id 1: ids live in separate namespaces, nothing is dropped.
    qrels = Dataset.from_dict({"query-id": [1, 1, 2], "corpus-id": [2, 3, 1], "score": [2, 1, 1]})
    for name, ds in (("corpus", corpus), ("queries", queries), ("qrels", qrels)):
        DatasetDict(test=ds).save_to_disk(str(path / name))
    return path


def test_beir_graded_relevance(beir_dir):
    results = ev.evaluate_model(FakeModel(), FakeProcessor(BEIR_VECTORS), [beir_dir], show_progress=False)
    result = results["tiny_beir"]
    assert result["format"] == ev.BEIR and (result["n_queries"], result["n_pages"]) == (3, 5)
    metrics = result["metrics"]
    first = (2 / LOG2_3 + 1 / 2) / (2 + 1 / LOG2_3)  # relevant 2 at rank 2, relevant 1 at rank 3
    assert metrics["ndcg_at_5"] == pytest.approx((first + 1) / 2)  # the unjudged query is not averaged
    assert metrics["ndcg_at_1"] == pytest.approx(0.5)
    assert metrics["recall_at_1"] == pytest.approx(0.5) and metrics["recall_at_3"] == 1.0
    assert metrics["mrr_at_10"] == pytest.approx((1 / 2 + 1) / 2)


def test_beir_missing_column(beir_dir, tmp_path):
    import shutil

    broken = tmp_path / "broken_beir"
    shutil.copytree(beir_dir, broken)
    shutil.rmtree(broken / "qrels")
    qrels = Dataset.from_dict({"query-id": [1], "corpus-id": [2]})
    DatasetDict(test=qrels).save_to_disk(str(broken / "qrels"))
    with pytest.raises(ValueError, match=r"qrels.*\['score'\]"):
        ev.load_task(broken)


# ------------------------------------------------------------------ dataset names


def test_names_expand_to_tasks():
    from colqwen3_lib.data import SYNTHETIC_TASKS

    assert ev.expand_datasets(["synthetic"]) == list(SYNTHETIC_TASKS)
    assert ev.expand_datasets(["vidore-v1"]) == list(ev.VIDORE_V1_TASKS)
    assert len(ev.VIDORE_V1_TASKS) == 10
    assert ev.expand_datasets(["vidore/docvqa_test_subsampled,vidore/tatdqa_test"]) == [
        "vidore/docvqa_test_subsampled",
        "vidore/tatdqa_test",
    ]


def test_hub_ids_load_the_test_split(qa_dir, beir_dir, monkeypatch):
    """ViDoRe hub ids go through datasets.load_dataset(name[, config], split=...); offline, local stand-ins answer."""
    import datasets

    from colqwen3_lib.data import load_split

    calls = []

    def fake_load_dataset(name, config=None, split=None):
        calls.append((name, config, split))
        if name == "vidore/docvqa_test_subsampled":
            return load_split(qa_dir, split)
        if name == "vidore/esg_reports_v2":
            return load_split(beir_dir / config, split)
        raise ConnectionError(f"no network for {name}")

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.setattr(
        datasets,
        "get_dataset_config_names",
        lambda name: ["corpus", "queries", "qrels"] if name == "vidore/esg_reports_v2" else ["default"],
    )
    qa = ev.load_task("vidore/docvqa_test_subsampled")
    assert (qa.name, qa.format, qa.queries) == ("vidore/docvqa_test_subsampled", ev.QA, ["A", "B", "C"])
    assert calls == [("vidore/docvqa_test_subsampled", None, "test")]
    beir = ev.load_task("vidore/esg_reports_v2")
    assert beir.format == ev.BEIR and set(calls[1:]) == {
        ("vidore/esg_reports_v2", p, "test") for p in ev.BEIR_COLUMNS
    }
    with pytest.raises(ValueError, match="could not load 'owner/offline'.*local copy"):
        ev.load_task("owner/offline")


# ------------------------------------------------------------------ tables and comparison


def _result(ndcg5: float, ndcg10: float) -> dict:
    metrics = {m: 0.5 for m in ev.SUMMARY_METRICS} | {"ndcg_at_5": ndcg5, "ndcg_at_10": ndcg10}
    return {"format": "qa", "n_queries": 4, "n_pages": 8, "n_images": 8, "metrics": metrics, "seconds": {}}


def test_result_files_and_comparison(tmp_path):
    before = {"a": _result(0.2, 0.3), "b/c": _result(0.4, 0.5)}
    after = {"a": _result(0.5, 0.6), "b/c": _result(0.4, 0.7), "only_after": _result(1.0, 1.0)}
    ev.write_results(before, tmp_path / "before", {"model_path": "x"})
    ev.write_results(after, tmp_path / "after")
    assert (tmp_path / "before" / "b_c.json").exists()
    summary = (tmp_path / "before" / "summary.md").read_text()
    assert "| average | 8 | 16 | 30.00 | 40.00 |" in summary
    rows = ev.compare_results(tmp_path / "before", tmp_path / "after" / "results.json")
    assert [r["task"] for r in rows] == ["a", "b/c", "average"]
    assert rows[0]["delta ndcg_at_5"] == pytest.approx(0.3)
    assert rows[-1]["delta ndcg_at_10"] == pytest.approx((0.3 + 0.2) / 2)
    assert ev.read_results(tmp_path / "before" / "a.json")["a"]["metrics"]["ndcg_at_5"] == 0.2
    with pytest.raises(ValueError, match="share no task"):
        ev.compare_results({"x": _result(0, 0)}, {"y": _result(0, 0)})
    with pytest.raises(ValueError, match="not an evaluation result"):
        (tmp_path / "other.json").write_text("{}")
        ev.read_results(tmp_path / "other.json")


def test_top_pages_ranks_the_pages_of_a_task_for_one_query(qa_dir):
    task = ev.load_task(qa_dir)
    pages = ev.top_pages(FakeModel(), FakeProcessor(QA_VECTORS), task, "B", k=3)
    assert len(pages) == 3
    assert [p["score"] for p in pages] == sorted((p["score"] for p in pages), reverse=True)
    assert pages[0]["document"] == "p2.png" and pages[0]["relevant"] == 1  # B's page ranks first
    assert all(p["relevant"] == 0 for p in pages[1:])
    assert all(p["image"].size == (40, 40) for p in pages)
