"""ColQwen3: a Qwen3-VL backbone whose last hidden states are projected to multi-vector embeddings.

Also here: how a model is loaded (`ColQwen3.from_pretrained`, and `load_model` with a LoRA adapter
checked against its base), which attention kernel and dtype it runs with, `random_model` (a published
architecture with random weights), and `embed_batch` (a processed batch -> one embedding per item).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import os
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig
from transformers.models.qwen3_vl import Qwen3VLConfig, Qwen3VLModel

from . import formats
from .architectures import real_config
from .fingerprint import check_fingerprint, restore_base_head
from .formats import CheckpointError
from .processor import ColQwen3Processor, saved_by_kit
from .reference import EMBEDDING_DIM, MAX_VISUAL_TOKENS
from .tiny import resolve_model_path

logger = logging.getLogger(__name__)

HEAD = formats.HEAD
ATTENTION_IMPLEMENTATIONS = ("flash_attention_2", "sdpa", "eager")
INSTRUCT_KEY_MAPPING = formats.INSTRUCT_KEY_MAPPING
FLASH_ATTN_HINT = (
    'install it with `pip install flash-attn --no-build-isolation`, or pass attn_implementation="sdpa" '
    '(or "eager") to silence this'
)


def use_bf16(device: str | torch.device | None = None) -> bool:
    """Whether to run in bf16: on a CUDA device that supports it (default: the current one, if any)."""
    if device is not None and torch.device(device).type != "cuda":
        return False
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def default_dtype(device: str | torch.device | None = None) -> torch.dtype:
    """bf16 where `use_bf16`, else float32."""
    return torch.bfloat16 if use_bf16(device) else torch.float32


def device_of(device_map) -> torch.device:
    """Where `from_pretrained(device_map=...)` puts a model: the CPU when no device_map is given."""
    if device_map is None:
        return torch.device("cpu")
    if isinstance(device_map, dict):
        places = [
            torch.device("cuda", v) if isinstance(v, int) else torch.device(v)
            for v in device_map.values()
            if v != "disk"
        ]
        return next((p for p in places if p.type == "cuda"), torch.device("cpu"))
    if isinstance(device_map, int):
        return torch.device("cuda", device_map)
    if device_map in ("auto", "balanced", "balanced_low_0", "sequential"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device_map)


def resolve_attn_implementation(requested: str | None, device: str | torch.device | None = None) -> str:
    """Pick the attention kernel: flash_attention_2 -> sdpa -> eager, logging which and why.

    Args:
        requested: What the caller asked for (`flash_attention_2`, `sdpa`, `eager`, or None for the
            best available).
        device: Where the model will run; None means the CPU (where a model loaded without a
            device_map stays).

    Returns:
        The implementation to pass to transformers.

    Raises:
        ValueError: `requested` is not one of the three names.
    """
    if requested is not None and requested not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation={requested!r} is not one of {ATTENTION_IMPLEMENTATIONS}")
    device = torch.device(device if device is not None else "cpu")
    if requested in (None, "flash_attention_2"):
        if device.type != "cuda":
            reason = f"flash_attention_2 needs a CUDA GPU and the model goes to the {device.type.upper()}"
        elif importlib.util.find_spec("flash_attn") is None:
            reason = f"the flash-attn package is not installed ({FLASH_ATTN_HINT})"
        elif torch.cuda.get_device_capability(device) < (8, 0):
            reason = "flash-attn 2 needs an Ampere or newer GPU (compute capability 8.0+)"
        else:
            logger.info("attention: flash_attention_2 (requested or best available)")
            return "flash_attention_2"
        (logger.warning if requested else logger.info)(f"attention: using sdpa because {reason}")
        return "sdpa"
    if requested == "sdpa" and not hasattr(F, "scaled_dot_product_attention"):
        logger.warning("attention: using eager because this torch has no scaled_dot_product_attention")
        return "eager"
    logger.info(f"attention: {requested} (requested)")
    return requested


@contextmanager
def quiet_transformers():
    """Hold back transformers' info/warning messages and progress bars (its load report, "Loading weights")."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


class ColQwen3(Qwen3VLModel):
    """Qwen3-VL backbone + a linear head to `dim`-dimensional, L2-normalised token embeddings.

    Call it with the output of `ColQwen3Processor.process_images` or `.process_queries`; it returns
    a (batch, seq_len, dim) tensor, zero on padding tokens.

    Args:
        config: A `Qwen3VLConfig`. Its `embedding_dim` attribute (default 128) sets the head size.
        mask_non_image_embeddings: Keep only the image-token embeddings of pages (zeros elsewhere).
    """

    def __init__(self, config: Qwen3VLConfig, mask_non_image_embeddings: bool = False):
        super().__init__(config)
        self.dim = int(getattr(config, "embedding_dim", EMBEDDING_DIM))
        config.embedding_dim = self.dim
        self.custom_text_proj = nn.Linear(config.text_config.hidden_size, self.dim)
        self.mask_non_image_embeddings = mask_non_image_embeddings
        self.post_init()

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *model_args,
        dim: int | None = None,
        mask_non_image_embeddings: bool = False,
        warn_new_head: bool = True,
        attn_implementation: str | None = None,
        **kwargs,
    ) -> ColQwen3:
        """Load a ColQwen3 in any known format (`formats.FORMATS`), or a Qwen3-VL(-Instruct) checkpoint with a fresh head.

        Every tensor is accounted for: a missing backbone weight raises instead of leaving a silently
        random backbone, and so does a tensor the format does not explain. `custom_text_proj` may be
        newly initialised only for a checkpoint that has no head (Instruct), and a warning says so.
        No remote code runs: other layouts (TomoroAI, OpenSearch-AI, colpali-engine, SauerkrautLM)
        are renamed onto ColQwen3's weights by their format's key mapping.

        Args:
            pretrained_model_name_or_path: Hub id, local directory, or `tiny` for the offline checkpoint.
            dim: Embedding size. Default: the checkpoint's (its config's head-size field, or the
                shape of its saved head), else 128. For a Matryoshka head (Ops-Colqwen3), the number
                of outputs to keep (default: the config's `dims`).
            mask_non_image_embeddings: See the class docstring.
            warn_new_head: Warn when the head is newly initialised (`load_model` turns it off while an
                adapter may still bring the head).
            attn_implementation: `flash_attention_2`, `sdpa` or `eager`; flash-attn falls back to
                sdpa with one warning when it cannot run where the model goes (`device_map`; the CPU
                without one).
            **kwargs: Passed to `transformers.PreTrainedModel.from_pretrained` (`torch_dtype`/`dtype`,
                `device_map`, `revision`, ...).

        Raises:
            formats.CheckpointError: (a RuntimeError and a ValueError) The checkpoint lacks backbone weights or its
                head, has tensors its format does not explain, weights of other shapes than its config.json
                gives (a head of another size: pass `dim`), a damaged weights file or a config.json that is
                not JSON.
            ValueError: The checkpoint is in no known format (or one the kit refuses).
        """
        path = resolve_model_path(pretrained_model_name_or_path)
        if "torch_dtype" in kwargs and "dtype" not in kwargs:
            kwargs["dtype"] = kwargs.pop("torch_dtype")
        config_kwargs = {
            k: kwargs[k] for k in ("revision", "token", "cache_dir", "local_files_only") if k in kwargs
        }
        checkpoint = formats.read_checkpoint(path, **config_kwargs)
        fmt = formats.detect(checkpoint)
        if fmt.adapter:
            raise ValueError(
                f"{path} is a PEFT adapter; load its base model and pass the adapter to load_model"
            )
        logger.info(f"{path}: {fmt.title}")
        config = kwargs.pop("config", None)
        if config is None:
            qwen3_vl = checkpoint.model_type == formats.QWEN3_VL
            config = (
                AutoConfig.from_pretrained(path, **config_kwargs)
                if qwen3_vl
                else formats.backbone_config(checkpoint)
            )
        keep = None
        if fmt.matryoshka_field:  # load the whole head, then keep its first `dim` (or config) outputs
            keep, dim = dim or checkpoint.config.get(fmt.matryoshka_field), None
        if dim is None:
            dim = getattr(config, "embedding_dim", None) or fmt.checkpoint_dim(checkpoint)
        config.embedding_dim = int(dim or EMBEDDING_DIM)
        kwargs.setdefault("key_mapping", fmt.key_mapping)
        _check_shapes(path, config, formats.mapped_shapes(checkpoint, fmt))
        attn_implementation = resolve_attn_implementation(
            attn_implementation, device_of(kwargs.get("device_map"))
        )
        with quiet_transformers():  # its load report and progress bar: the checks below say what matters
            model, info = super().from_pretrained(
                path,
                *model_args,
                config=config,
                attn_implementation=attn_implementation,
                output_loading_info=True,
                **kwargs,
            )
        missing = [k for k in info["missing_keys"] if not k.startswith(HEAD)]
        if missing:
            raise CheckpointError(
                f"{path} is missing {len(missing)} backbone weights (e.g. {missing[:3]}); loading it would give a "
                "randomly initialised backbone. Point to a Qwen3-VL(-Instruct) or ColQwen3 checkpoint."
            )
        if fmt.heads and any(k.startswith(HEAD) for k in info["missing_keys"]):
            raise CheckpointError(
                f"{path} ({fmt.name} format) lacks its projection head ({' or '.join(fmt.heads)}); "
                "loading it would give a randomly initialised head"
            )
        unexplained = sorted(k for k in info["unexpected_keys"] if not fmt.is_extra(k))
        if unexplained:
            raise CheckpointError(
                f"{path} ({fmt.name} format) has {len(unexplained)} weights ColQwen3 has no place for "
                f"(e.g. {unexplained[:3]}); loading it would silently drop them."
            )
        if info.get("mismatched_keys"):
            raise CheckpointError(
                f"{path} has weights of another shape: {info['mismatched_keys'][:3]}. If the saved head has "
                "another size, pass dim=<that size>."
            )
        if warn_new_head and any(k.startswith(HEAD) for k in info["missing_keys"]):
            logger.warning(
                f"Loaded the Qwen3-VL backbone from {path}; {HEAD} (hidden {config.text_config.hidden_size} -> "
                f"{model.dim}) is newly initialised: train it (e.g. with LoRA) before using the embeddings."
            )
        if keep:
            formats.keep_first_outputs(model, int(keep))
        model.loading_info = info
        model.checkpoint_format = fmt
        model.mask_non_image_embeddings = mask_non_image_embeddings
        return model

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """Embed a processed batch of pages or queries: (batch, seq_len, dim), zero on padding."""
        if pixel_values is not None and pixel_values.dim() == 3:
            # The processor pads pixel_values per image; the backbone wants them concatenated.
            n_patches = image_grid_thw.prod(dim=1)  # (batch,)
            pixel_values = torch.cat([pv[:n] for pv, n in zip(pixel_values, n_patches.tolist())])
        for key in ("use_cache", "return_dict", "output_hidden_states", "labels"):
            kwargs.pop(key, None)
        hidden = (
            super()
            .forward(
                input_ids=input_ids,
                attention_mask=attention_mask,
                pixel_values=pixel_values,
                image_grid_thw=image_grid_thw,
                use_cache=False,
                return_dict=True,
                **kwargs,
            )
            .last_hidden_state
        )  # (batch, seq_len, hidden)
        proj = self.custom_text_proj(hidden)  # (batch, seq_len, dim)
        proj = F.normalize(proj, dim=-1) * attention_mask.unsqueeze(-1).to(proj.dtype)
        if pixel_values is not None and self.mask_non_image_embeddings:
            proj = proj * (input_ids == self.config.image_token_id).unsqueeze(-1).to(proj.dtype)
        return proj

    @property
    def patch_size(self) -> int:
        return self.config.vision_config.patch_size

    @property
    def spatial_merge_size(self) -> int:
        return self.config.vision_config.spatial_merge_size


def _check_shapes(path: str, config, shapes: dict[str, tuple[int, ...]]) -> None:
    """Compare a checkpoint's tensor shapes (under ColQwen3's names) with those its config gives, before loading.

    Raises:
        CheckpointError: they differ; for the head alone, the message names the `dim` that loads it.
    """
    if not shapes:  # a hub id: its shapes are known once downloaded, and transformers checks them then
        return
    with torch.device("meta"):
        expected = {name: tuple(p.shape) for name, p in ColQwen3(copy.deepcopy(config)).named_parameters()}
    conflicts = [k for k, shape in shapes.items() if k in expected and expected[k] != shape]
    if not conflicts:
        return
    if all(k.startswith(HEAD) for k in conflicts):
        saved = shapes[f"{HEAD}.weight"][0] if f"{HEAD}.weight" in shapes else shapes[conflicts[0]][0]
        raise CheckpointError(
            f"{path}'s head has {saved} outputs, not the {config.embedding_dim} asked for (by dim=, or its config): "
            f"pass dim={saved}, or load another checkpoint for {config.embedding_dim}-dimensional embeddings"
        )
    first = conflicts[0]
    raise CheckpointError(
        f"{path}'s weights do not fit its config.json: {len(conflicts)} tensors of other shapes, e.g. {first} is "
        f"{list(shapes[first])} in the weights and {list(expected[first])} by the config (hidden_size "
        f"{config.text_config.hidden_size}, {config.text_config.num_hidden_layers} layers). Is config.json the one "
        "saved with these weights?"
    )


def random_model(
    size: str,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    dim: int = EMBEDDING_DIM,
) -> ColQwen3:
    """A ColQwen3 with the published `size` architecture and random weights, for memory/speed measurements."""
    config = real_config(size)
    config.embedding_dim = dim
    with torch.device(device):
        model = ColQwen3(config)
    return model.to(dtype=dtype)


def embed_batch(model: torch.nn.Module, batch) -> list[torch.Tensor]:
    """Run the model on a processed batch: each item's (n_tokens, dim) embeddings, padding removed, on the CPU.

    The batch's embeddings come back to the CPU in one copy (not one per item: on a GPU each copy waits for
    the device), and are split there.
    """
    batch = batch.to(next(model.parameters()).device)
    embeddings = model(**batch).cpu()  # (batch, seq_len, dim)
    mask = batch["attention_mask"].bool().cpu()  # (batch, seq_len)
    return [e[m] for e, m in zip(embeddings, mask)]


# ------------------------------------------------------------------ loading a model and an adapter


def _config_of(path: str) -> dict | None:
    config = Path(path) / "config.json"
    if not config.exists():
        return None
    data = json.loads(config.read_text())
    for key in (
        "_name_or_path",
        "transformers_version",
        "dtype",
        "torch_dtype",
        "architectures",
        "embedding_dim",
    ):
        data.pop(key, None)
    return data


def _same_base(adapter_base: str, model_path: str) -> bool:
    """Whether an adapter's recorded base model is the checkpoint at `model_path` (by path, hub id or config)."""
    if not adapter_base:
        return True
    names = [adapter_base, model_path]
    resolved = [
        os.path.normpath(resolve_model_path(n)) if n == "tiny" else os.path.normpath(n) for n in names
    ]
    if resolved[0] == resolved[1]:
        return True
    configs = [_config_of(r) for r in resolved]
    if configs[0] is not None and configs[1] is not None:
        return configs[0] == configs[1]
    # A hub id against a local copy of it (a plain folder, or the HF cache's models--owner--name/snapshots/...).
    hub, local = (names[0], resolved[1]) if configs[0] is None else (names[1], resolved[0])
    hub_name = hub.rstrip("/").split("/")[-1].lower()
    local_lower = local.lower()
    return (
        local_lower.rstrip("/").split("/")[-1] == hub_name
        or f"models--{hub.replace('/', '--')}".lower() in local_lower
    )


def check_adapter(adapter_dir: str | os.PathLike, model: torch.nn.Module, model_path: str) -> dict:
    """Check that a PEFT adapter fits a base model before loading it.

    Returns:
        The adapter's config (`adapter_config.json`).

    Raises:
        ValueError: not an adapter directory, trained on another base model, or weights whose
            shapes or modules do not exist in `model`.
    """
    from safetensors import safe_open

    adapter_dir = Path(adapter_dir)
    config_file = adapter_dir / "adapter_config.json"
    if not config_file.exists():
        raise ValueError(
            f"{adapter_dir} is not a PEFT adapter directory: it has no adapter_config.json "
            "(pass the folder written by PeftModel.save_pretrained, or give a full model with --model-path)"
        )
    config = json.loads(config_file.read_text())
    base = config.get("base_model_name_or_path") or ""
    if not _same_base(base, model_path):
        raise ValueError(
            f"adapter {adapter_dir} was trained on {base!r}, but the base model is {model_path!r}; "
            f"pass --model-path {base} (or a local copy of that checkpoint)"
        )
    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.exists():
        raise ValueError(
            f"adapter {adapter_dir} has no adapter_model.safetensors; save it with safe_serialization"
        )
    modules = dict(model.named_modules())
    problems = []
    with safe_open(str(weights), "pt") as f:
        for key in f.keys():
            shape = tuple(f.get_slice(key).get_shape())
            name = key.removeprefix("base_model.model.")
            for marker, axis, attr in ((".lora_A.", 1, "in_features"), (".lora_B.", 0, "out_features")):
                if marker in name:
                    module_name = name.split(marker)[0]
                    module = modules.get(module_name)
                    if module is None:
                        problems.append(f"{module_name} (no such module)")
                    elif hasattr(module, attr) and getattr(module, attr) != shape[axis]:
                        problems.append(
                            f"{module_name}: adapter {attr} {shape[axis]} != model {getattr(module, attr)}"
                        )
                    break
            else:  # a fully saved module (modules_to_save), e.g. custom_text_proj.weight
                module_name, _, param = name.rpartition(".")
                module = modules.get(module_name)
                tensor = getattr(module, param, None) if module is not None else None
                if tensor is None:
                    problems.append(f"{name} (no such parameter)")
                elif tuple(tensor.shape) != shape:
                    problems.append(f"{name}: adapter shape {list(shape)} != model {list(tensor.shape)}")
    if problems:
        raise ValueError(
            f"adapter {adapter_dir} does not fit the base model {model_path!r}: {len(problems)} mismatch(es), e.g. "
            + "; ".join(problems[:3])
            + ". Load the base model the adapter was trained on (and the same embedding dim)"
        )
    return config


def adapter_dim(adapter: str | os.PathLike) -> int | None:
    """The head size a PEFT adapter was trained with (its LoRA on the head, or the head saved in full); None if
    it leaves the head alone (or is no adapter: `check_adapter` says so)."""
    if not (Path(adapter) / "adapter_config.json").exists():
        return None
    shapes = formats.read_checkpoint(adapter).tensors or {}
    for key in (f"base_model.model.{HEAD}.lora_B.weight", f"base_model.model.{HEAD}.weight"):
        if key in shapes:
            return int(shapes[key][0])
    return None


def apply_adapter(model: ColQwen3, adapter: str | os.PathLike, model_path: str = ""):
    """Check a PEFT adapter against `model` (shapes, base fingerprint), restore the initial head saved with it,
    and wrap `model` with it: a `PeftModel` (call `.merge_and_unload()` for a plain ColQwen3).

    Raises:
        ValueError: the adapter does not fit `model` or was trained on other base weights.
    """
    from peft import PeftModel

    model_path = model_path or str(model.name_or_path)
    config = check_adapter(adapter, model, model_path)
    check_fingerprint(adapter, model, model_path)
    new_head = any(k.startswith(HEAD) for k in getattr(model, "loading_info", {}).get("missing_keys", []))
    if (
        new_head
        and not restore_base_head(adapter, model)
        and HEAD not in (config.get("modules_to_save") or [])
    ):
        logger.warning(
            f"the base model has no {HEAD} and adapter {adapter} saves neither it nor its initial head: its "
            "embeddings come from a freshly initialised head, not the one it was trained with"
        )
    try:
        with warnings.catch_warnings():  # peft reads transformers' deprecated `is_gradient_checkpointing`
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            return PeftModel.from_pretrained(model, str(adapter))
    except (RuntimeError, ValueError, KeyError) as err:
        raise ValueError(f"adapter {adapter} could not be loaded onto {model_path!r}: {err}") from err


def load_model(
    model_path: str,
    adapter: str | os.PathLike | None = None,
    max_visual_tokens: int | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    attn_implementation: str | None = None,
    seed: int = 0,
    warn_new_head: bool = True,
):
    """Load a ColQwen3 (and optionally a LoRA adapter, merged) with its processor, ready to evaluate.

    Args:
        model_path: Hub id, local checkpoint or `tiny`.
        adapter: Directory of a PEFT adapter saved by `PeftModel.save_pretrained`.
        max_visual_tokens: Visual tokens per page. None keeps the cap of a processor saved with the
            adapter or the fine-tuned model, and uses 768 on a base checkpoint's processor.
        device: Default: CUDA when available, else CPU.
        dtype: Default: bf16 on a GPU that supports it, else float32.
        attn_implementation: See `ColQwen3.from_pretrained`.
        seed: Seeds a head that the checkpoint lacks, so that an untrained model evaluates reproducibly.
        warn_new_head: Warn when the model ends up with a newly initialised head (off where an untrained
            model is wanted, e.g. the "before" row of a comparison).

    Returns:
        (model in eval mode, processor with the query/page prompts of the checkpoint's format, or of
        the adapter's: colpali-engine adapters get colpali-engine's, the kit's the kit's).

    Raises:
        ValueError: the adapter does not fit the base model, or was trained on other base weights
            (`fingerprint.py`); `device` is CUDA and there is no GPU.
    """
    try:
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise ValueError(
            f"device {device!r} is not a device torch knows; pass cpu, cuda or cuda:N (or none)"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device {device} was asked for, but no CUDA GPU is visible; pass --device cpu (or none)"
        )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(
            f"device {device} was asked for, but this machine has no Apple GPU; pass --device cpu (or none)"
        )
    if device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(
            f"device {device} is not one the kit runs on; pass cpu, cuda, cuda:N or mps (or none)"
        )
    model_path = str(model_path)
    # Build the tiny checkpoint first, so that building it draws nothing from the seed of the new head.
    resolve_model_path(model_path)
    torch.manual_seed(seed)
    # A base without a head gets one of the size the adapter was trained with (e.g. 320, colpali-engine's).
    new_head_dim = adapter_dim(adapter) if adapter is not None else None
    model = ColQwen3.from_pretrained(
        model_path,
        dim=new_head_dim if new_head_dim and not formats.detect_format(model_path).heads else None,
        dtype=dtype or default_dtype(device),
        attn_implementation=attn_implementation,
        device_map={"": device} if device.type == "cuda" else None,
        warn_new_head=warn_new_head and adapter is None,  # with an adapter, warned below if it brings no head
    )
    new_head = any(k.startswith(HEAD) for k in model.loading_info["missing_keys"])
    processor_dir = resolve_model_path(model_path)
    trained = not new_head
    if adapter is not None:
        model = apply_adapter(model, adapter, str(model_path)).merge_and_unload()
        if any((Path(adapter) / f).exists() for f in ("processor_config.json", "preprocessor_config.json")):
            processor_dir, trained = str(adapter), True
    processor = ColQwen3Processor.from_pretrained(processor_dir)
    # The prompts the weights were trained with: those saved with the kit's processor, else the
    # checkpoint format's, or the adapter's recipe's.
    if not saved_by_kit(processor_dir):
        formats.apply_prompts(
            processor, (formats.prompts_for(adapter) if adapter else model.checkpoint_format.prompts)
        )
    if max_visual_tokens is not None or not trained:
        processor.set_max_num_visual_tokens(max_visual_tokens or MAX_VISUAL_TOKENS)
    return model.to(device).eval(), processor
