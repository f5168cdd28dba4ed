"""The attention fallback chain flash_attention_2 -> sdpa -> eager, and the one log line that explains it."""

import importlib.util
import logging

import pytest
import torch

from colqwen3_lib import model as model_module
from colqwen3_lib.model import resolve_attn_implementation

LOGGER = "colqwen3_lib.model"
INSTALL_HINT = "pip install flash-attn --no-build-isolation"  # the reference README's fix


@pytest.fixture
def fake_gpu(monkeypatch):
    """Pretend a CUDA device of a given compute capability exists, with or without flash-attn installed."""

    def setup(flash_installed: bool, capability: tuple[int, int] = (9, 0)):
        real_find_spec = importlib.util.find_spec

        def find_spec(name, *args, **kwargs):
            if name == "flash_attn":
                return object() if flash_installed else None
            return real_find_spec(name, *args, **kwargs)

        monkeypatch.setattr(model_module.importlib.util, "find_spec", find_spec)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)

    return setup


def _resolve(caplog, requested, device):
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        chosen = resolve_attn_implementation(requested, device)
    records = [r for r in caplog.records if r.name == LOGGER]
    assert len(records) == 1, f"expected one log line, got {[r.getMessage() for r in records]}"
    return chosen, records[0]


def test_cpu_picks_sdpa_and_says_why(caplog):
    chosen, record = _resolve(caplog, None, "cpu")
    assert chosen == "sdpa"
    assert record.levelno == logging.INFO
    assert "needs a CUDA GPU" in record.getMessage()


def test_flash_request_on_cpu_falls_back_with_a_warning(caplog):
    chosen, record = _resolve(caplog, "flash_attention_2", "cpu")
    assert chosen == "sdpa"
    assert record.levelno == logging.WARNING
    assert "flash_attention_2 needs a CUDA GPU" in record.getMessage()


def test_gpu_with_flash_attn_picks_flash(caplog, fake_gpu):
    fake_gpu(flash_installed=True)
    for requested in (None, "flash_attention_2"):
        chosen, record = _resolve(caplog, requested, "cuda")
        assert chosen == "flash_attention_2"
        assert "flash_attention_2" in record.getMessage()


@pytest.mark.parametrize("requested, level", [(None, logging.INFO), ("flash_attention_2", logging.WARNING)])
def test_gpu_without_flash_attn_falls_back_to_sdpa_with_the_install_hint(caplog, fake_gpu, requested, level):
    fake_gpu(flash_installed=False)
    chosen, record = _resolve(caplog, requested, "cuda")
    assert chosen == "sdpa"
    assert record.levelno == level
    assert "not installed" in record.getMessage()
    assert INSTALL_HINT in record.getMessage()


def test_pre_ampere_gpu_does_not_get_flash_attention(caplog, fake_gpu):
    fake_gpu(flash_installed=True, capability=(7, 5))  # e.g. a T4
    chosen, record = _resolve(caplog, None, "cuda")
    assert chosen == "sdpa"
    assert "compute capability 8.0" in record.getMessage()


@pytest.mark.parametrize("requested", ["sdpa", "eager"])
def test_explicit_sdpa_or_eager_is_kept(caplog, requested):
    chosen, record = _resolve(caplog, requested, "cpu")
    assert chosen == requested
    assert requested in record.getMessage()


def test_sdpa_falls_back_to_eager_without_the_torch_kernel(caplog, monkeypatch):
    monkeypatch.delattr(model_module.F, "scaled_dot_product_attention")
    chosen, record = _resolve(caplog, "sdpa", "cpu")
    assert chosen == "eager"
    assert record.levelno == logging.WARNING
    assert "scaled_dot_product_attention" in record.getMessage()


def test_unknown_implementation_is_refused():
    with pytest.raises(ValueError, match="not one of"):
        resolve_attn_implementation("flash_attention_3", "cpu")


def test_from_pretrained_uses_the_resolved_implementation(tiny_path):
    from colqwen3_lib import ColQwen3

    best = ColQwen3.from_pretrained(tiny_path, torch_dtype=torch.float32)
    eager = ColQwen3.from_pretrained(tiny_path, torch_dtype=torch.float32, attn_implementation="eager")
    assert best.config._attn_implementation == "sdpa"  # no GPU here
    assert eager.config._attn_implementation == "eager"
