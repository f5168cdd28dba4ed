"""Shared fixtures: one offline tiny checkpoint and one set of synthetic pages per test session."""

import os
import tempfile
from pathlib import Path

import pytest

# Generated checkpoints and pages go to a cache of their own, reused across local runs.
os.environ.setdefault("COLQWEN3_CACHE", str(Path(tempfile.gettempdir()) / "colqwen3-test-cache"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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
    from colqwen3_lib.data import synthetic_docs

    return synthetic_docs()


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need CUDA; without it they are reported as skipped, with the reason."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
