"""An adapter loads only on the base weights it was trained on: the fingerprint the kit writes beside it."""

import logging
import shutil

import pytest
import torch

from colqwen3_lib.fingerprint import FINGERPRINT_FILE, base_fingerprint
from colqwen3_lib.model import load_model
from colqwen3_lib.tiny import make_tiny_checkpoint


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, small_config, synthetic):
    from colqwen3_lib.training import train

    folder = tmp_path_factory.mktemp("adapter")
    train(small_config(folder, max_steps=2))
    return folder


@pytest.fixture(scope="module")
def other_base(tmp_path_factory):
    """The tiny checkpoint built with another seed: the same config.json, other weights."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("seed1") / "tiny", seed=1)


def test_every_saved_adapter_and_checkpoint_records_its_base(adapter):
    assert (adapter / FINGERPRINT_FILE).exists()
    assert (adapter / "checkpoint-2" / FINGERPRINT_FILE).exists()


def test_the_fingerprint_is_the_same_in_float32_and_bf16(model):
    bf16 = type(model).from_pretrained("tiny", dtype=torch.bfloat16)
    assert base_fingerprint(bf16) == base_fingerprint(model)


def test_an_adapter_on_other_base_weights_is_refused(adapter, other_base, tiny_path):
    # Same architecture and config.json: only the weights tell them apart.
    assert (other_base / "config.json").read_text() == (tiny_path / "config.json").read_text()
    with pytest.raises(ValueError, match="other base weights"):
        load_model(str(other_base), adapter=adapter)


def test_an_adapter_from_another_tool_loads_with_a_warning(adapter, tmp_path, caplog):
    foreign = tmp_path / "foreign"
    shutil.copytree(adapter, foreign, ignore=shutil.ignore_patterns("checkpoint-*"))
    (foreign / FINGERPRINT_FILE).unlink()
    with caplog.at_level(logging.WARNING, logger="colqwen3_lib.fingerprint"):
        model, _ = load_model("tiny", adapter=foreign)
    assert "records no base-model fingerprint" in caplog.text
    assert model is not None
