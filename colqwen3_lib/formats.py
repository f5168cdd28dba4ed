"""The public ColQwen3-family checkpoint layouts the kit loads without remote code.

`FORMATS` is one table: for each layout, how it shows in `config.json` and in its weight names, how
its weight names map onto `ColQwen3`'s (a transformers `key_mapping`: regex -> replacement, every
matching rule applied in order), where its head size is written, which of its tensors ColQwen3 has
no use for (a generation head), and the query and page prompts it was trained with.

- `detect_format(path)`: the entry for a checkpoint or PEFT adapter (a local folder; a hub id is
  judged by its `config.json` alone). An unknown layout raises a `ValueError` naming what was found.
- `prompts_for(path)` / `apply_prompts(processor, prompts)`: configure a `ColQwen3Processor` with the
  prompts of that format (`load_model` does it).
- `backbone_config`, `checkpoint_dim`, `keep_first_outputs`: what `ColQwen3.from_pretrained` needs to
  build the model (the Qwen3-VL config, the head size, Matryoshka truncation).

Where each layout was learnt (read, not copied):
- kit: `ColQwen3.save_pretrained` in this repository (`model.py`).
- Qwen3-VL-Instruct: the hub checkpoints (`model.visual.*`, `model.language_model.*`, `lm_head.*`).
- colpali-engine: illuin-tech/colpali `colpali_engine/models/qwen3/colqwen3/{modeling,processing}_colqwen3.py`
  (v0.3.18; head hard-coded to 320, no query prefix) and `colpali_engine/utils/processing_utils.py`;
  its LoRA recipe in `scripts/configs/qwen3/train_colqwen3_model.py`.
- TomoroAI tomoro-colqwen3-embed-4b/-8b: the hub's remote code as copied in goodhamgupta/serving
  (`modeling_colqwen3.py`, `configuration_colqwen3.py`, `processing_colqwen3.py`); the mapping in
  illuin-tech/colpali pull request #401 and vllm-project/vllm `vllm/model_executor/models/colqwen3.py`.
- OpenSearch-AI Ops-Colqwen3-4B: vllm-project/vllm `vllm/model_executor/models/colqwen3.py` and
  `vllm/transformers_utils/configs/colqwen3.py`; the publisher's classes as contributed to
  embeddings-benchmark/mteb (`ops_colqwen3_models.py`); xellDart/Crane
  `crane-core/src/models/colqwen3_emb/model.rs` (prompts of the current hub processor).
- VAGOsolutions SauerkrautLM-ColQwen3: VAGOsolutions/sauerkrautlm-colpali
  `sauerkrautlm_colpali/models/qwen3/colqwen3/{modeling,processing}_colqwen3.py`, `utils/processing_utils.py`.
- nvidia nemotron-colembed-vl (refused): vLLM's registry (`Qwen3VLNemotronEmbedModel`) and the
  model's remote code (`Qwen3VLNemotronEmbedConfig`, bidirectional attention mask).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .files import safetensors_problem
from .processor import QUERY_PREFIX, ColQwen3Processor
from .tiny import resolve_model_path

HEAD = "custom_text_proj"
# A Qwen3-VL-Instruct checkpoint stores the backbone under `model.`; ColQwen3 holds it at the top level.
INSTRUCT_KEY_MAPPING = {r"^model\.visual": "visual", r"^model\.language_model": "language_model"}
QWEN3_VL = "qwen3_vl"


@dataclass(frozen=True)
class Prompts:
    """What `ColQwen3Processor` puts around queries and pages (10 augmentation tokens in every format)."""

    query_prefix: str
    query_augmentation_token: str
    visual_prompt_prefix: str


# colpali-engine: BaseVisualRetrieverProcessor's query prefix is empty and its ColQwen3Processor keeps it;
# the kit follows it (a processor the kit saved carries its own prefix, see `processor.saved_by_kit`).
KIT_PROMPTS = Prompts(
    QUERY_PREFIX,  # ""
    ColQwen3Processor.query_augmentation_token,  # "<|endoftext|>"
    ColQwen3Processor.visual_prompt_prefix,
)
COLPALI_PROMPTS = KIT_PROMPTS
# Tomoro: no prefix; the augmentation token is the tokenizer's pad token (`<|endoftext|>` for Qwen3-VL);
# its page prompt (prefix + suffix) is the same string as the kit's.
TOMORO_PROMPTS = COLPALI_PROMPTS
OPS_PROMPTS = Prompts(
    "Query: ",
    "<|endoftext|>",
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe the image.<|im_end|>\n"
    "<|im_start|>assistant\n<|endoftext|>",
)
SAUERKRAUT_PROMPTS = Prompts(
    "Query: ", KIT_PROMPTS.query_augmentation_token, KIT_PROMPTS.visual_prompt_prefix
)


@dataclass(frozen=True)
class Checkpoint:
    """What a folder (or hub id) shows: its config and, where readable, its tensor names and shapes."""

    path: str
    config: dict  # config.json, or adapter_config.json for a PEFT adapter
    tensors: dict[str, tuple[int, ...]] | None  # None: not readable here (a hub id, .bin weights)
    adapter: bool = False

    @property
    def model_type(self) -> str | None:
        return self.config.get("model_type")

    def has(self, name: str) -> bool:
        return self.tensors is not None and name in self.tensors

    def any_key(self, pattern: str) -> bool:
        return self.tensors is not None and any(re.search(pattern, k) for k in self.tensors)


@dataclass(frozen=True)
class Format:
    """One checkpoint layout: how to recognise it, map its weights onto ColQwen3, and prompt it."""

    name: str
    title: str
    recognise: Callable[[Checkpoint], bool]
    prompts: Prompts
    key_mapping: dict[str, str] = field(default_factory=dict)
    heads: tuple[str, ...] = (HEAD,)  # the head's names in the checkpoint; () for none
    dim_fields: tuple[str, ...] = ()  # config.json fields holding the head size (else its weight's shape)
    published_dim: int | None = None
    matryoshka_field: str | None = None  # config field: keep the head's first n outputs (Ops `dims`)
    extra_keys: tuple[str, ...] = ()  # regexes (after key_mapping) of tensors ColQwen3 does not use
    adapter: bool = False
    refused: str | None = None  # why the kit cannot reproduce it

    def checkpoint_dim(self, checkpoint: Checkpoint) -> int | None:
        """The head size: from the config fields, else from the saved head's weight, else None."""
        for name in self.dim_fields:
            if checkpoint.config.get(name):
                return int(checkpoint.config[name])
        for head in self.heads:
            shape = (checkpoint.tensors or {}).get(f"{head}.weight")
            if shape:
                return int(shape[0])
        return None

    def is_extra(self, key: str) -> bool:
        return any(re.search(pattern, key) for pattern in self.extra_keys)


def _saved_head(c: Checkpoint, model_types: tuple[str, ...] = (QWEN3_VL,)) -> tuple[int, ...] | None:
    """The shape of a saved `custom_text_proj` in a checkpoint of one of `model_types` (None if none)."""
    if c.model_type not in model_types or c.tensors is None:
        return None
    return c.tensors.get(f"{HEAD}.weight") or c.tensors.get(f"base_model.model.{HEAD}.weight")


def _is_sauerkraut(c: Checkpoint) -> bool:
    # Its loader parses any model_type as qwen3_vl, and names it `colqwen3` when none is given.
    head = _saved_head(c, (QWEN3_VL, "colqwen3"))
    return head is not None and "embedding_dim" not in c.config and ("dim" in c.config or head[0] == 128)


def _is_colpali(c: Checkpoint) -> bool:
    return _saved_head(c) is not None and "embedding_dim" not in c.config


def _is_instruct(c: Checkpoint) -> bool:
    # Without readable weights (a hub id) a qwen3_vl config is taken as the kit/Instruct family, as before.
    return c.model_type == QWEN3_VL and "embedding_dim" not in c.config and _saved_head(c) is None


_HEAD_FROM_ADAPTER = {r"^base_model\.model\.custom_text_proj": HEAD}
_BARE_OR_MODEL = {r"^base_model\.model\.": "", r"^model\.": ""}

FORMATS: tuple[Format, ...] = (
    Format(
        name="nemotron-colembed",
        title="nvidia nemotron-colembed-vl (model_type qwen3_vl_nemotron_embed)",
        recognise=lambda c: c.model_type == "qwen3_vl_nemotron_embed",
        prompts=KIT_PROMPTS,
        refused=(
            "it runs Qwen3-VL with bidirectional attention (its remote code builds a bidirectional mask) and "
            "embeds the last hidden states without a projection head; ColQwen3's causal backbone would give "
            "other embeddings (load it with its own remote code, or with vLLM)"
        ),
    ),
    Format(
        name="tomoro",
        title="TomoroAI tomoro-colqwen3-embed (model_type colqwen3, vlm.* + embedding_proj_layer)",
        recognise=lambda c: (
            c.model_type == "colqwen3" and (c.tensors is None or c.has("embedding_proj_layer.weight"))
        ),
        prompts=TOMORO_PROMPTS,
        key_mapping={
            r"^vlm\.model\.visual": "visual",
            r"^vlm\.model\.language_model": "language_model",
            r"^vlm\.lm_head": "lm_head",
            r"^embedding_proj_layer": HEAD,
        },
        heads=("embedding_proj_layer",),
        dim_fields=("embed_dim",),
        published_dim=320,
        extra_keys=(r"^lm_head\.",),
    ),
    Format(
        name="ops",
        title="OpenSearch-AI Ops-Colqwen3 (model_type ops_colqwen3, hidden-size head, Matryoshka `dims`)",
        recognise=lambda c: c.model_type == "ops_colqwen3",
        prompts=OPS_PROMPTS,
        key_mapping=_BARE_OR_MODEL,
        heads=(HEAD, f"base_model.model.{HEAD}", f"model.{HEAD}"),
        published_dim=2560,
        matryoshka_field="dims",
        extra_keys=(r"^lm_head\.",),
    ),
    Format(
        name="kit",
        title="this kit's ColQwen3.save_pretrained (model_type qwen3_vl with embedding_dim)",
        recognise=lambda c: c.model_type == QWEN3_VL and "embedding_dim" in c.config,
        prompts=KIT_PROMPTS,
        key_mapping=INSTRUCT_KEY_MAPPING,
        dim_fields=("embedding_dim",),
        published_dim=128,
        extra_keys=(r"^lm_head\.",),
    ),
    Format(
        name="sauerkraut",
        title="VAGOsolutions SauerkrautLM-ColQwen3 (qwen3_vl or colqwen3, custom_text_proj, `dim` or 128-d)",
        recognise=_is_sauerkraut,
        prompts=SAUERKRAUT_PROMPTS,
        key_mapping={**_HEAD_FROM_ADAPTER, **INSTRUCT_KEY_MAPPING},
        heads=(HEAD, f"base_model.model.{HEAD}"),
        dim_fields=("dim",),
        published_dim=128,
        extra_keys=(r"^lm_head\.",),
    ),
    Format(
        name="colpali-engine",
        title="colpali-engine ColQwen3 (qwen3_vl, custom_text_proj without embedding_dim; 320-d)",
        recognise=_is_colpali,
        prompts=COLPALI_PROMPTS,
        key_mapping={**_HEAD_FROM_ADAPTER, **INSTRUCT_KEY_MAPPING},
        heads=(HEAD, f"base_model.model.{HEAD}"),
        published_dim=320,
        extra_keys=(r"^lm_head\.",),
    ),
    Format(
        name="qwen3-vl-instruct",
        title="Qwen3-VL(-Instruct) backbone with no head (a fresh custom_text_proj is initialised)",
        recognise=_is_instruct,
        prompts=KIT_PROMPTS,
        key_mapping=INSTRUCT_KEY_MAPPING,
        heads=(),
        extra_keys=(r"^lm_head\.",),
    ),
    Format(
        name="colpali-engine-adapter",
        title="PEFT adapter with LoRA on custom_text_proj (colpali-engine's recipe)",
        recognise=lambda c: c.adapter and c.any_key(rf"\.{HEAD}\.lora_A\."),
        prompts=COLPALI_PROMPTS,
        adapter=True,
    ),
    Format(
        name="kit-adapter",
        title="any other PEFT adapter, e.g. the kit's (custom_text_proj in modules_to_save)",
        recognise=lambda c: c.adapter,
        prompts=KIT_PROMPTS,
        adapter=True,
    ),
)

FORMATS_BY_NAME = {f.name: f for f in FORMATS}

# ------------------------------------------------------------------------------------------- reading


class CheckpointError(RuntimeError, ValueError):
    """A checkpoint that cannot be loaded as it is: a damaged file, or weights and config.json that disagree."""


def _read_json(file: Path) -> dict:
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(
            f"{file} is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}): restore it from where "
            "the checkpoint came from"
        ) from None


def _tensor_shapes(folder: Path, weights: str) -> dict[str, tuple[int, ...]] | None:
    """Every tensor's name and shape, read from the safetensors headers only (None if there are none).

    Raises:
        CheckpointError: a weights file is cut off or its header is unreadable.
    """
    from safetensors import safe_open

    index = folder / f"{weights}.safetensors.index.json"
    if index.exists():
        files = sorted({folder / shard for shard in _read_json(index)["weight_map"].values()})
    else:
        files = sorted(folder.glob(f"{weights}*.safetensors"))
    if not files:
        return None
    shapes = {}
    for file in files:
        problem = safetensors_problem(file)
        if problem:
            raise CheckpointError(f"{file} {problem}: download or copy it again")
        with safe_open(str(file), "pt") as f:
            shapes.update({key: tuple(f.get_slice(key).get_shape()) for key in f.keys()})
    return shapes


def read_checkpoint(path: str | os.PathLike, **hub_kwargs) -> Checkpoint:
    """Read a checkpoint's or adapter's config and tensor shapes (`tiny` and hub ids accepted).

    Args:
        path: Local folder, hub id, or `tiny`.
        **hub_kwargs: `revision`, `token`, `cache_dir`, `local_files_only` for a hub id's `config.json`.

    Raises:
        ValueError: a local folder with neither `config.json` nor `adapter_config.json`, a path that does
            not exist, or a hub id that cannot be read.
    """
    path = resolve_model_path(path)
    folder = Path(path)
    if folder.is_dir():
        has_weights = any(folder.glob("model*.safetensors")) or any(folder.glob("pytorch_model*.bin"))
        if (folder / "adapter_config.json").exists() and not has_weights:
            config = _read_json(folder / "adapter_config.json")
            return Checkpoint(path, config, _tensor_shapes(folder, "adapter_model"), adapter=True)
        if not (folder / "config.json").exists():
            found = sorted(p.name for p in folder.iterdir())[:10]
            raise ValueError(
                f"{path} has no config.json (nor adapter_config.json); found {found}. Point to a checkpoint folder."
            )
        return Checkpoint(path, _read_json(folder / "config.json"), _tensor_shapes(folder, "model"))
    from transformers import PretrainedConfig

    if folder.exists() or path.count("/") != 1 or path.startswith((".", "/", "~")):
        raise ValueError(
            f"{path} does not exist: no such checkpoint folder, and it is not a hub id (owner/name)"
        )
    try:
        config, _ = PretrainedConfig.get_config_dict(path, **hub_kwargs)
    except OSError as err:
        raise ValueError(
            f"could not read {path} from the Hugging Face Hub ({err}): it needs network access or a populated HF "
            "cache; or pass the path of a local copy"
        ) from err
    return Checkpoint(path, config, None)


def mapped_shapes(checkpoint: Checkpoint, fmt: Format) -> dict[str, tuple[int, ...]]:
    """The checkpoint's tensor shapes under the names ColQwen3 gives them (`fmt.key_mapping`, as transformers
    applies it: every matching rule, in order)."""
    shapes = {}
    for key, shape in (checkpoint.tensors or {}).items():
        for pattern, replacement in fmt.key_mapping.items():
            key = re.sub(pattern, replacement, key)
        shapes[key] = shape
    return shapes


def detect(checkpoint: Checkpoint) -> Format:
    """The format of a read checkpoint.

    Raises:
        ValueError: a layout no entry recognises, or one the kit refuses (with the reason).
    """
    for fmt in FORMATS:
        if fmt.recognise(checkpoint):
            if fmt.refused:
                raise ValueError(
                    f"{checkpoint.path} is a {fmt.title} checkpoint, which the kit does not load: {fmt.refused}"
                )
            if fmt.name == "ops":
                _check_ops_label(checkpoint)
            return fmt
    tensors = checkpoint.tensors or {}
    prefixes = sorted({".".join(k.split(".")[:2]) for k in tensors})[:8]
    heads = sorted(k for k in tensors if "proj" in k and "layers." not in k and "blocks." not in k)[:4]
    supported = "; ".join(f"{f.name}: {f.title}" for f in FORMATS if not f.refused)
    raise ValueError(
        f"{checkpoint.path} is in no known ColQwen3 layout: model_type={checkpoint.model_type!r}, "
        f"architectures={checkpoint.config.get('architectures')}, weight prefixes {prefixes or 'unreadable'}, "
        f"head-like tensors {heads or 'none'}. Supported formats: {supported}."
    )


def _check_ops_label(checkpoint: Checkpoint) -> None:
    """Refuse a checkpoint labelled `ops_colqwen3` whose weights are not Ops' (it would load with Ops' prompts).

    Ops' head maps the hidden size onto itself and its config has no `embedding_dim`; the kit's head is
    `embedding_dim` x hidden. The weights decide which layout it really is.
    """
    head = next(
        (
            checkpoint.tensors[f"{h}.weight"]
            for h in FORMATS_BY_NAME["ops"].heads
            if checkpoint.has(f"{h}.weight")
        ),
        None,
    )
    hidden = (checkpoint.config.get("text_config") or {}).get("hidden_size")
    if "embedding_dim" not in checkpoint.config and (head is None or hidden is None or head[0] == hidden):
        return
    relabelled = Checkpoint(
        checkpoint.path, {**checkpoint.config, "model_type": QWEN3_VL}, checkpoint.tensors
    )
    really = next((f for f in FORMATS if f.recognise(relabelled) and not f.refused), None)
    shape = f"a {head[0]} x {head[1]} head" if head else "no head"
    raise CheckpointError(
        f"{checkpoint.path}: config.json says model_type 'ops_colqwen3' (Ops-Colqwen3), but the weights are not "
        f"Ops': they hold {shape} where Ops' maps the hidden size onto itself ({hidden} x {hidden})"
        + (", and config.json has the kit's embedding_dim" if "embedding_dim" in checkpoint.config else "")
        + ". Loaded as Ops it would get Ops' prompts ('Query: ') and embed queries wrongly. "
        + (
            f"The weights are in the layout of {really.title}: set model_type back to 'qwen3_vl' in config.json."
            if really
            else "Restore the config.json that came with these weights."
        )
    )


def detect_format(path: str | os.PathLike, **hub_kwargs) -> Format:
    """The format of the checkpoint or adapter at `path` (see `FORMATS`); raises ValueError if unknown."""
    return detect(read_checkpoint(path, **hub_kwargs))


def prompts_for(path: str | os.PathLike, **hub_kwargs) -> Prompts:
    """The query/page prompts of the checkpoint or adapter at `path`."""
    return detect_format(path, **hub_kwargs).prompts


def apply_prompts(processor: ColQwen3Processor, prompts: Prompts) -> ColQwen3Processor:
    """Set a processor's query prefix, augmentation token and page prompt (on this instance only)."""
    processor.query_prefix = prompts.query_prefix
    processor.query_augmentation_token = prompts.query_augmentation_token
    processor.visual_prompt_prefix = prompts.visual_prompt_prefix
    return processor


# ----------------------------------------------------------------------------------------- building


def backbone_config(checkpoint: Checkpoint):
    """A non-qwen3_vl config (Tomoro's, Ops') as the `Qwen3VLConfig` ColQwen3 is built from.

    These configs carry Qwen3-VL's `text_config`, `vision_config` and token ids at the top level, as
    Qwen3-VL's own does; their extra fields (`embed_dim`, `dims`, ...) are kept as attributes.
    """
    from transformers.models.qwen3_vl import Qwen3VLConfig

    data = {
        k: v for k, v in checkpoint.config.items() if k not in ("model_type", "architectures", "auto_map")
    }
    return Qwen3VLConfig.from_dict(data)


def keep_first_outputs(model: nn.Module, n: int) -> None:
    """Matryoshka truncation: keep the head's first `n` outputs (the same as slicing, then normalising)."""
    head = model.custom_text_proj
    if not 0 < n <= head.out_features:
        raise ValueError(
            f"cannot keep {n} of the head's {head.out_features} outputs; pick 1..{head.out_features}"
        )
    if n == head.out_features:
        return
    kept = nn.Linear(
        head.in_features, n, bias=head.bias is not None, device=head.weight.device, dtype=head.weight.dtype
    )
    with torch.no_grad():
        kept.weight.copy_(head.weight[:n])
        if head.bias is not None:
            kept.bias.copy_(head.bias[:n])
    model.custom_text_proj = kept
    model.dim = model.config.embedding_dim = n
