"""ViDoRe evaluation (embed, score by MaxSim, measure) in the QA, BEIR and per-language layouts, under both
protocols, against hand-computed metrics.

A stand-in model makes the scores exact: a page becomes one token, the one-hot vector of its
colour; a query becomes one token, a vector the test chooses. So score(query, page) is that
vector's entry at the page's colour, and every NDCG below can be worked out by hand. The datasets
(`qa_dir`: `QA_ROWS`, `beir_dir`, `per_language_dir`) are built in conftest.py.
"""

import math

import pytest
import torch
from datasets import DatasetDict
from transformers import BatchFeature

from colqwen3_lib.evaluation import build_run, evaluate_model, top_k_run, top_pages
from colqwen3_lib.metrics import MTEB, MTEB_DECIMALS, VIDORE_BENCHMARK
from colqwen3_lib.tasks import BEIR, load_task

LOG2_3 = math.log2(3)


@pytest.fixture
def fake_processor(page_colours):
    class FakeProcessor:
        """Pages -> their colour index; queries -> the vector `vectors[query]`. Counts what it processed."""

        def __init__(self, vectors: dict[str, list[float]]):
            self.vectors = vectors
            self.images_seen: list[int] = []
            self.queries_seen: list[str] = []

        def process_images(self, images, device=None, pad_pixel_values=True):
            colours = [page_colours.index(image.convert("RGB").getpixel((0, 0))) for image in images]
            self.images_seen.extend(colours)
            return BatchFeature(
                {"pixel_values": torch.tensor(colours), "attention_mask": torch.ones(len(colours), 1)}
            )

        def process_queries(self, queries):
            self.queries_seen.extend(queries)
            vectors = torch.tensor([self.vectors[q] for q in queries], dtype=torch.float32)
            return BatchFeature({"query_vectors": vectors, "attention_mask": torch.ones(len(queries), 1)})

    return FakeProcessor


@pytest.fixture
def fake_model(page_colours):
    dim = len(page_colours)

    class FakeModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the model a device

        def forward(self, attention_mask, pixel_values=None, query_vectors=None):
            if pixel_values is not None:
                return torch.nn.functional.one_hot(pixel_values, dim).float()[:, None, :]  # (batch, 1, dim)
            return query_vectors[:, None, :]  # (batch, 1, dim)

    return FakeModel()


# ------------------------------------------------------------------ QA format

#                  colour: 0    1    2    3    4    5
QA_VECTORS = {
    "A": [0.9, 0.8, 0.0, 0.5, 0.1, 0.0],  # ranks p0, p1, p3, p4, p2: its last row's page p3 is third
    "B": [0.1, 0.2, 0.7, 0.3, 0.0, 0.0],  # p2 first
    "C": [0.6, 0.0, 0.0, 0.0, 0.2, 0.95],  # p4 first only through its second image (the max)
}


def test_qa_metrics_match_hand_computed_values(qa_dir, fake_model, fake_processor):
    processor = fake_processor(QA_VECTORS)
    results = evaluate_model(
        fake_model, processor, [str(qa_dir)], show_progress=False, protocol=VIDORE_BENCHMARK
    )
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
    task = load_task(qa_dir, protocol=VIDORE_BENCHMARK)
    scores = torch.zeros(3, len(task.images))
    scores[2] = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])  # image i scores (i + 1) / 10 for query C
    run = build_run(task, scores)
    assert set(run["2"]) == {"p0.png", "p1.png", "p2.png", "p3.png", "p4.png"}
    assert run["2"]["p4.png"] == pytest.approx(0.6)  # max of its two images (0.5 and 0.6)


def test_a_dataset_that_cannot_be_evaluated_is_named(tmp_path, qa_dataset, fake_model, fake_processor):
    DatasetDict(test=qa_dataset().remove_columns("image_filename")).save_to_disk(str(tmp_path / "broken"))
    with pytest.raises(ValueError, match="broken.*image_filename"):
        evaluate_model(
            fake_model, fake_processor(QA_VECTORS), [str(tmp_path / "broken")], show_progress=False
        )


# ------------------------------------------------------------------ BEIR format

BEIR_VECTORS = {
    "first": [0.9, 0.1, 0.5, 0.3, 0.0, 0.0],  # ranks 0, 2, 3, 1, 4
    "second": [0.1, 0.8, 0.0, 0.0, 0.2, 0.0],  # ranks 1, 4, 0, ...
    "unjudged": [0.5, 0.0, 0.0, 0.0, 0.0, 0.0],
}


def test_beir_graded_relevance(beir_dir, fake_model, fake_processor):
    results = evaluate_model(
        fake_model, fake_processor(BEIR_VECTORS), [beir_dir], show_progress=False, protocol=VIDORE_BENCHMARK
    )
    result = results["tiny_beir"]
    assert result["format"] == BEIR and (result["n_queries"], result["n_pages"]) == (3, 5)
    metrics = result["metrics"]
    first = (2 / LOG2_3 + 1 / 2) / (2 + 1 / LOG2_3)  # relevant 2 at rank 2, relevant 1 at rank 3
    assert metrics["ndcg_at_5"] == pytest.approx((first + 1) / 2)  # the unjudged query is not averaged
    assert metrics["ndcg_at_1"] == pytest.approx(0.5)
    assert metrics["recall_at_1"] == pytest.approx(0.5) and metrics["recall_at_3"] == 1.0
    assert metrics["mrr_at_10"] == pytest.approx((1 / 2 + 1) / 2)


# ------------------------------------------------------------------ looking at results


def test_top_pages_ranks_the_pages_of_a_task_for_one_query(qa_dir, fake_model, fake_processor):
    task = load_task(qa_dir, protocol=VIDORE_BENCHMARK)
    pages = top_pages(fake_model, fake_processor(QA_VECTORS), task, "B", k=3)
    assert len(pages) == 3
    assert [p["score"] for p in pages] == sorted((p["score"] for p in pages), reverse=True)
    assert pages[0]["document"] == "p2.png" and pages[0]["relevant"] == 1  # B's page ranks first
    assert all(p["relevant"] == 0 for p in pages[1:])
    assert all(p["image"].size == (40, 40) for p in pages)


# ------------------------------------------------------------------ the mteb protocol


def test_mteb_scores_a_qa_set_as_its_beir_mirror(qa_dir, fake_model, fake_processor):
    """Image i is document i (colour i): A is relevant at its rows' pages 1 and 3, C only at page 4 (page 5,
    the other image of p4.png, is a document of its own)."""
    processor = fake_processor(QA_VECTORS)
    result = evaluate_model(fake_model, processor, [qa_dir], show_progress=False, protocol=MTEB)[
        "tiny_qa_test"
    ]
    assert (result["protocol"], result["n_queries"], result["n_pages"]) == (MTEB, 3, 6)
    assert result["benchmark"] is None and result["main_score"] == "ndcg_at_5"
    metrics = result["metrics"]
    a = (1 / LOG2_3 + 1 / 2) / (1 + 1 / LOG2_3)  # A ranks 0, 1, 3: relevant at 2 and 3
    assert metrics["ndcg_at_5"] == round((a + 1 + 0.5) / 3, MTEB_DECIMALS)  # C ranks 5, 0, 4
    assert metrics["recall_at_1"] == round(1 / 3, MTEB_DECIMALS)
    assert metrics["mrr_at_10"] == pytest.approx((1 / 2 + 1 + 1 / 3) / 3)


def test_mteb_drops_queries_without_judgements_before_embedding(beir_dir, fake_model, fake_processor):
    processor = fake_processor(BEIR_VECTORS)
    result = evaluate_model(fake_model, processor, [beir_dir], show_progress=False, protocol=MTEB)[
        "tiny_beir"
    ]
    assert result["n_queries"] == 2 and sorted(processor.queries_seen) == ["first", "second"]
    first = (2 / LOG2_3 + 1 / 2) / (2 + 1 / LOG2_3)
    assert result["metrics"]["ndcg_at_5"] == round((first + 1) / 2, MTEB_DECIMALS)


def test_mteb_averages_a_tasks_language_subsets(per_language_dir, fake_model, fake_processor):
    vectors = {
        "first": [0.9, 0.1, 0.0, 0, 0, 0],  # c0 first: relevant
        "second": [0.1, 0.5, 0.9, 0, 0, 0],  # c2, c1: relevant c1 at 2
        "premier": [0.1, 0.9, 0.2, 0, 0, 0],  # c1, c2, c0: relevant c0 at 3
        "second fr": [0.0, 0.0, 0.9, 0, 0, 0],  # c2 first: relevant
    }
    result = evaluate_model(
        fake_model, fake_processor(vectors), [per_language_dir], show_progress=False, protocol=MTEB
    )["tiny_v3"]
    english = round((1 + 1 / LOG2_3) / 2, MTEB_DECIMALS)
    french = round((0.5 + 1) / 2, MTEB_DECIMALS)
    assert result["subsets"]["english"]["metrics"]["ndcg_at_5"] == english
    assert result["subsets"]["french"]["metrics"]["ndcg_at_5"] == french
    assert result["metrics"]["ndcg_at_5"] == pytest.approx((english + french) / 2)
    assert result["n_queries"] == 4


def test_top_k_run_keeps_trec_order_and_cuts(beir_dir):
    task = load_task(beir_dir, protocol=MTEB)
    scores = torch.tensor([[0.5, 0.5, 0.9, 0.5, 0.1]])  # images 0-4 are documents 0-4
    run = top_k_run(task, scores, ["1"], top_k=3)
    assert list(run["1"].items()) == [
        ("2", pytest.approx(0.9)),
        ("3", 0.5),
        ("1", 0.5),
    ]  # ties: larger id first


def test_prefetching_prepares_ahead_in_one_thread_and_keeps_the_order():
    """On a GPU the next batches are processed while the model runs: results in order, one worker thread (the
    processor is never called from two threads at once), never more than `ahead` jobs in advance."""
    import threading
    import time

    from colqwen3_lib.evaluation import _prefetched

    threads, running, most = set(), [0], [0]
    lock = threading.Lock()

    def prepare(job):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        threads.add(threading.get_ident())
        time.sleep(0.01)
        with lock:
            running[0] -= 1
        return job * 10

    got = []
    for value in _prefetched(list(range(7)), prepare, ahead=2):
        got.append(value)
    assert got == [j * 10 for j in range(7)]
    assert len(threads) == 1 and threading.get_ident() not in threads and most[0] == 1
    assert list(_prefetched([1, 2], lambda j: -j, ahead=0)) == [-1, -2]


def test_embedding_with_prefetching_gives_the_embeddings_without(model, processor, monkeypatch):
    from PIL import Image

    from colqwen3_lib import evaluation

    pages = [Image.new("RGB", size, colour) for size, colour in [((64, 96), "red"), ((200, 100), "blue")] * 3]
    queries = ["a red page", "a blue chart", "the total"] * 3
    plain = (
        evaluation.embed_images(model, processor, pages, batch_size=2),
        evaluation.embed_queries(model, processor, queries, batch_size=2),
    )
    monkeypatch.setattr(evaluation, "_prefetch_depth", lambda model: 2)
    ahead = (
        evaluation.embed_images(model, processor, pages, batch_size=2),
        evaluation.embed_queries(model, processor, queries, batch_size=2),
    )
    for a, b in zip(plain[0] + plain[1], ahead[0] + ahead[1]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_local_copy_of_a_v3_task_reports_ndcg_at_10_as_mteb_does(
    per_language_dir, fake_model, fake_processor
):
    vectors = {
        "first": [0.9, 0.1, 0.0, 0, 0, 0],
        "second": [0.1, 0.5, 0.9, 0, 0, 0],
        "premier": [0.1, 0.9, 0.2, 0, 0, 0],
        "second fr": [0.0, 0.0, 0.9, 0, 0, 0],
    }
    spec = f"{per_language_dir}=vidore/vidore_v3_hr_mteb_format"
    result = evaluate_model(fake_model, fake_processor(vectors), [spec], show_progress=False)["tiny_v3"]
    assert (result["benchmark"], result["main_score"]) == ("vidore-v3", "ndcg_at_10")
    assert result["copy_of"] == "vidore/vidore_v3_hr_mteb_format" and set(result["subsets"]) == {
        "english",
        "french",
    }
    plain = evaluate_model(fake_model, fake_processor(vectors), [per_language_dir], show_progress=False)[
        "tiny_v3"
    ]
    assert (plain["benchmark"], plain["main_score"]) == (None, "ndcg_at_5")
