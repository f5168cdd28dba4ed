"""Shared fixtures: the offline tiny checkpoint, the synthetic pages, one short training run, and the
hand-made ViDoRe datasets, each built once per test session for every module that needs it."""

import os
import tempfile
from pathlib import Path

import pytest

# Generated checkpoints and pages go to a cache of their own, reused across local runs.
os.environ.setdefault("COLQWEN3_CACHE", str(Path(tempfile.gettempdir()) / "colqwen3-test-cache"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# `make test` runs one pytest-xdist worker per core. Each worker, and every process it starts (training
# launches, notebook kernels), computes on one thread: workers that each took every core would fight for them.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"


@pytest.fixture(scope="session")
def tiny_path() -> Path:
    from colqwen3_lib.tiny import tiny_checkpoint_path

    return tiny_checkpoint_path()


@pytest.fixture(scope="session")
def processor(tiny_path):
    from colqwen3_lib import ColQwen3Processor

    return ColQwen3Processor.from_pretrained("tiny", max_num_visual_tokens=64)


@pytest.fixture(scope="session")
def model(tiny_path):
    import torch

    from colqwen3_lib import ColQwen3

    return ColQwen3.from_pretrained("tiny", torch_dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def synthetic(tiny_path):
    from colqwen3_lib.synthetic import synthetic_docs

    return synthetic_docs()


# ------------------------------------------------------------------------------------- training runs


def _small_config(output_dir, **overrides):
    """The tiny run, shrunk to test speed: 8 pairs per step, 16 visual tokens, a few steps."""
    from colqwen3_lib.config import NO_EVAL, default_config

    settings = dict(
        peft=True,
        per_device_train_batch_size=8,
        max_visual_tokens=16,
        max_steps=4,
        save_steps=2,
        warmup_steps=1,
        eval_dataset=NO_EVAL,
    )
    return default_config(output_dir, "tiny", **{**settings, **overrides})


@pytest.fixture(scope="session")
def small_config():
    """`small_config(output_dir, **overrides)`: a `TrainConfig` for a few quick LoRA steps of the tiny model."""
    return _small_config


@pytest.fixture(scope="session")
def torch_run(tmp_path_factory, synthetic):
    """An uninterrupted 4-step LoRA run of the torch loop (checkpoints at 2 and 4 would be kept)."""
    from colqwen3_lib.training import train

    return train(_small_config(tmp_path_factory.mktemp("torch-run"), trainer="torch"))


# ------------------------------------------------------------------------- hand-made ViDoRe datasets

# Page colours: a stand-in model (test_evaluation.py) turns a page into the one-hot vector of its colour.
COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200), (200, 30, 200)]

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


def _page(colour: int):
    from PIL import Image

    return Image.new("RGB", (40, 40), COLOURS[colour])


def _qa_dataset(rows: list[tuple] = QA_ROWS):
    """rows of (query or None, colour, image_filename) -> a ViDoRe v1 QA dataset."""
    from datasets import Dataset, Features, Value
    from datasets import Image as ImageFeature

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
            "image": [_page(r[1]) for r in rows],
            "image_filename": [r[2] for r in rows],
            "answer": ["-"] * len(rows),
        },
        features=features,
    )


@pytest.fixture(scope="session")
def page_colours():
    return COLOURS


@pytest.fixture(scope="session")
def qa_dataset():
    """`qa_dataset(rows=QA_ROWS)`: rows of (query or None, colour index, image_filename) -> a QA dataset."""
    return _qa_dataset


@pytest.fixture(scope="session")
def qa_dir(tmp_path_factory):
    """`QA_ROWS` saved as a local ViDoRe v1 (QA) test set named `tiny_qa_test`."""
    from datasets import DatasetDict

    path = tmp_path_factory.mktemp("qa") / "tiny_qa_test"
    DatasetDict(test=_qa_dataset(QA_ROWS)).save_to_disk(str(path))
    return path


@pytest.fixture(scope="session")
def beir_dir(tmp_path_factory):
    """A local BEIR-format test set `tiny_beir`: 5 pages (colours 0-4), 3 queries, graded qrels."""
    from datasets import Dataset, DatasetDict, Features, Value
    from datasets import Image as ImageFeature

    path = tmp_path_factory.mktemp("beir") / "tiny_beir"
    corpus = Dataset.from_dict(
        {"corpus-id": [0, 1, 2, 3, 4], "image": [_page(c) for c in range(5)]},
        features=Features({"corpus-id": Value("int64"), "image": ImageFeature()}),
    )
    queries = Dataset.from_dict({"query-id": [1, 2, 3], "query": ["first", "second", "unjudged"]})
    # Query id 1 equals corpus id 1: ids live in separate namespaces, nothing is dropped.
    qrels = Dataset.from_dict({"query-id": [1, 1, 2], "corpus-id": [2, 3, 1], "score": [2, 1, 1]})
    for name, ds in (("corpus", corpus), ("queries", queries), ("qrels", qrels)):
        DatasetDict(test=ds).save_to_disk(str(path / name))
    return path


@pytest.fixture(scope="session")
def per_language_dir(tmp_path_factory):
    """A local test set `tiny_v3` in mteb's per-language layout (ViDoRe v3's): english and french queries with
    the same ids over one corpus of pages c0, c1, c2 (colours 0-2); q2 is judged c1 (2) in english, c2 in french."""
    from datasets import Dataset, DatasetDict

    path = tmp_path_factory.mktemp("per_language") / "tiny_v3"
    corpus = Dataset.from_dict({"id": [f"c{c}" for c in range(3)], "image": [_page(c) for c in range(3)]})
    parts = {
        "english": (["first", "second"], [("q1", "c0", 1), ("q2", "c1", 2)]),
        "french": (["premier", "second fr"], [("q1", "c0", 1), ("q2", "c2", 1)]),
    }
    for language, (texts, judged) in parts.items():
        queries = Dataset.from_dict({"id": ["q1", "q2"], "text": texts, "language": [language] * 2})
        qrels = Dataset.from_dict(
            {
                column: [row[i] for row in judged]
                for i, column in enumerate(("query-id", "corpus-id", "score"))
            }
        )
        for part, ds in (("corpus", corpus), ("queries", queries), ("qrels", qrels)):
            DatasetDict(test=ds).save_to_disk(str(path / f"{language}-{part}"))
    return path


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need CUDA; without it they are reported as skipped, with the reason."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# ------------------------------------------------------------------------------------------ a real browser


@pytest.fixture(scope="session")
def chromium():
    """(Chromium's path, playwright's `sync_playwright`), to open the course's pages in a real browser."""
    import shutil

    path = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if path is None:
        pytest.skip(
            "no Chromium here: `apt-get install chromium` (.ci/run installs it) to open the HTML in a browser"
        )
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed: `pip install -e .[dev]`")
    return path, sync_playwright
