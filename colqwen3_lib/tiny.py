"""The offline stand-in for a real Qwen3-VL checkpoint, and the `tiny` sentinel that selects it.

`make_tiny_checkpoint` writes a miniature Qwen3-VL-Instruct checkpoint in the hub's file layout
(config, safetensors saved from `Qwen3VLForConditionalGeneration`, a Qwen tokenizer with the real
special-token ids, image/video processor configs, a chat template), so that the exact code that
loads `Qwen/Qwen3-VL-2B-Instruct` can be exercised with no network. `resolve_model_path("tiny")`
builds it once per cache and returns its folder.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from pathlib import Path

import torch

from .architectures import SPECIAL_TOKENS, TINY, real_config_dict
from .files import build_folder, safetensors_problem

logger = logging.getLogger(__name__)

CACHE_ENV = "COLQWEN3_CACHE"
TINY_VERSION = 1  # bump when the tiny checkpoint's contents change, so caches rebuild

# Words the synthetic pages and queries use; each becomes one BPE token so queries stay short.
_WORDS = (
    "which what where find show shows showing page pages document with the a an of in on and is for "
    "bar line pie chart charts table tables report reports invoice invoices slide slides graph plot "
    "red blue green orange purple teal brown pink gray grey black yellow navy colour color coloured "
    "portrait landscape wide tall square layout drawn header total totals revenue quarterly annual "
    "summary sales costs budget figure values rows columns text title describe image query"
).split()

_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "<|im_start|>{{ message['role'] }}\n"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' or 'image' in item -%}<|vision_start|><|image_pad|><|vision_end|>"
    "{%- elif item['type'] == 'video' or 'video' in item -%}<|vision_start|><|video_pad|><|vision_end|>"
    "{%- elif 'text' in item -%}{{ item['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}<|im_end|>\n"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|im_start|>assistant\n{%- endif -%}"
)

_IMAGE_PROCESSOR = {
    "size": {"longest_edge": 16777216, "shortest_edge": 65536},
    "patch_size": 16,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "processor_class": "Qwen3VLProcessor",
    "image_processor_type": "Qwen2VLImageProcessorFast",
}
_VIDEO_PROCESSOR = {
    "size": {"longest_edge": 25165824, "shortest_edge": 4096},
    "patch_size": 16,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "processor_class": "Qwen3VLProcessor",
    "video_processor_type": "Qwen3VLVideoProcessor",
}


def _byte_level_alphabet() -> list[str]:
    """The 256 printable stand-ins GPT-2/Qwen byte-level BPE uses for raw bytes."""
    from tokenizers import pre_tokenizers

    return sorted(pre_tokenizers.ByteLevel.alphabet())


def _tiny_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A small byte-level BPE: every byte, plus one token per course word (with and without a space)."""
    vocab = {ch: i for i, ch in enumerate(_byte_level_alphabet())}
    merges: list[tuple[str, str]] = []
    # Merges apply by rank, so space-prefixed chains go first: " page" -> "Ġpage", not "Ġ" + "page".
    spaced = ["Ġ" + w for w in _WORDS] + ["Ġ" + w.capitalize() for w in _WORDS]
    for piece in spaced + [w.capitalize() for w in _WORDS] + list(_WORDS):
        current = piece[0]
        for ch in piece[1:]:
            if current + ch not in vocab:
                vocab[current + ch] = len(vocab)
                merges.append((current, ch))
            current += ch
    vocab.update(SPECIAL_TOKENS)
    return vocab, merges


def _write_tokenizer(path: Path) -> None:
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

    vocab, merges = _tiny_vocab_and_merges()
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, model_max_length=262144)
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS)})
    tokenizer.save_pretrained(path)


def _write_tiny(path: Path, seed: int) -> None:
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    config_dict = real_config_dict(TINY)
    with torch.random.fork_rng(devices=[]):  # the caller's random state is left as it was
        torch.manual_seed(seed)
        model = Qwen3VLForConditionalGeneration(Qwen3VLConfig(**copy.deepcopy(config_dict)))
    model.save_pretrained(path, safe_serialization=True)
    _check_hub_layout(path / "model.safetensors")
    # Overwrite the config with the hub's own format (as written for the real checkpoints).
    config_dict["dtype"] = "float32"
    (path / "config.json").write_text(json.dumps(config_dict, indent=2) + "\n")
    (path / "generation_config.json").write_text(
        json.dumps(
            {"bos_token_id": 151643, "eos_token_id": [151645, 151643], "pad_token_id": 151643}, indent=2
        )
    )
    (path / "preprocessor_config.json").write_text(json.dumps(_IMAGE_PROCESSOR, indent=2) + "\n")
    (path / "video_preprocessor_config.json").write_text(json.dumps(_VIDEO_PROCESSOR, indent=2) + "\n")
    (path / "chat_template.json").write_text(json.dumps({"chat_template": _CHAT_TEMPLATE}, indent=2) + "\n")
    _write_tokenizer(path)


HUB_PREFIXES = ("model.language_model.", "model.visual.", "lm_head.")


def _check_hub_layout(weights: Path) -> None:
    """The tiny checkpoint must name its tensors as the hub's Qwen3-VL checkpoints do (`model.visual.*`,
    `model.language_model.*`): the loading code it stands in for is tested on exactly that layout.

    Raises:
        RuntimeError: transformers wrote other names. A library imported into this process can register its own
            renaming of Qwen3-VL checkpoints (colpali-engine does, under transformers versions without one).
    """
    from safetensors import safe_open

    with safe_open(str(weights), "pt") as f:
        odd = sorted(k for k in f.keys() if not k.startswith(HUB_PREFIXES))
    if odd:
        raise RuntimeError(
            f"transformers saved the tiny checkpoint with tensor names the hub's Qwen3-VL checkpoints do not use "
            f"(e.g. {odd[:2]}): something imported into this process changed how Qwen3-VL checkpoints are saved "
            "(colpali-engine registers its own renaming under some transformers versions). Build it in a fresh "
            "process: python -c 'from colqwen3_lib import resolve_model_path; resolve_model_path(\"tiny\")'"
        )


def make_tiny_checkpoint(path: str | os.PathLike, seed: int = 0, overwrite: bool = False) -> Path:
    """Write a miniature Qwen3-VL-Instruct checkpoint to `path`, with no network access.

    The files mirror the hub checkpoint (`config.json`, `model.safetensors` with keys
    `model.visual.*` / `model.language_model.*`, tokenizer with Qwen's special tokens, image and
    video processor configs, chat template). The same seed gives the same weights.

    Args:
        path: Directory to create. It is written atomically: a crash leaves no half checkpoint.
        seed: Seed for the random weights.
        overwrite: Replace an existing directory instead of raising.

    Returns:
        The checkpoint directory.

    Raises:
        FileExistsError: `path` exists, is not empty and `overwrite` is False.
    """
    path = Path(path)
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(f"{path} exists and is not empty; pass overwrite=True or choose another path")
    return build_folder(path, lambda tmp: _write_tiny(tmp, seed))


def cache_dir() -> Path:
    """Where the kit keeps generated checkpoints and data (`$COLQWEN3_CACHE`, else ~/.cache/colqwen3)."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "colqwen3")


def _damage(path: Path) -> str | None:
    """None if the cached checkpoint is whole, else what is wrong with it."""
    for name in ("config.json", "tokenizer_config.json", "preprocessor_config.json"):
        try:
            json.loads((path / name).read_text())
        except (OSError, json.JSONDecodeError) as err:
            return f"{name} is unreadable ({type(err).__name__})"
    problem = safetensors_problem(path / "model.safetensors")
    return f"model.safetensors {problem}" if problem else None


def tiny_checkpoint_path() -> Path:
    """The cached tiny checkpoint, built on first use and rebuilt if damaged (safe when several processes ask at once)."""
    from filelock import FileLock

    path = cache_dir() / f"tiny-qwen3-vl-v{TINY_VERSION}"
    if _damage(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path) + ".lock"):
            damage = _damage(path)
            if damage:
                if path.exists():
                    logger.warning(f"the cached tiny checkpoint {path} is damaged ({damage}): rebuilding it")
                make_tiny_checkpoint(path, overwrite=True)
    return path


def resolve_model_path(name_or_path: str | os.PathLike) -> str:
    """Map `tiny` to the offline tiny checkpoint (built on first use); pass anything else through."""
    if str(name_or_path) == TINY:
        return str(tiny_checkpoint_path())
    return str(name_or_path)
