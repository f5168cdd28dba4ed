"""How much memory does a ColQwen3 training step need, and what to do when it does not fit.

`estimate_memory` predicts the peak memory of one training step (forward of a batch of queries
and a batch of pages, in-batch contrastive loss, backward, AdamW step) from the model's config
alone, by counting what is resident and what autograd saves for backward:

- weights: every parameter, in the model dtype (LoRA adapters in float32, as peft keeps them);
- trainable + optimizer: AdamW keeps two states per trainable parameter, in its dtype;
- gradients: one per trainable parameter, alive after backward and during the optimizer step;
- activations: the tensors saved for backward, counted per token and per layer (below);
- workspace: short-lived buffers at the peak (the loss's similarity block and its gradient, one
  layer's gradient buffers, the optimizer's temporaries).

Peak = weights + trainable/optimizer + the largest of five moments: the vision tower's forward
(one block's temporaries over all patches, plus the unpadded float32 copy of the pixels that
`ColQwen3.forward` makes), the end of the pages' forward, the start of backward (all activations
and the loss's gradient), the end of the text backward (text gradients + the vision tower's
activations, full fine-tuning only), the optimizer step (all gradients + AdamW temporaries).
The batch (float32 pixels) is alive throughout.

Saved for backward, per token and per decoder layer (h hidden, q/k query/key-value widths,
I MLP width, a bytes per activation element):
- the float32 inputs of the four RMSNorms (layer, post-attention, q_norm, k_norm): 4 (2h + q + k);
- full fine-tuning: normed inputs of q/k/v and gate/up (for the weight gradients), the attention
  inputs and output, 4 MLP intermediates: a (4h + 5q + k + 4I) with sdpa (keys/values repeated to
  all heads under a padding mask), a (4h + 3q + 3k + 4I) with flash_attention_2;
- LoRA (frozen base weights save nothing for their own gradients): attention tensors plus
  3 MLP intermediates, a (4q + 3I) (sdpa), plus per adapted projection of input width w the
  dropout output (float32) and its mask (1 byte on CUDA, 4 on CPU): (4 + mask)(5h + q + I);
- eager attention also stores the float32 softmax (and its copy in the model dtype): heads x seq.
Gradient checkpointing keeps only each layer's input (a h) and recomputes one layer at a time.
The vision tower runs on patches (4 per visual token); with LoRA nothing in it needs gradients,
so it saves nothing. Pages are `max_visual_tokens + 20` tokens, queries `query_len + 10`.
"""

from __future__ import annotations

import functools
import gc
import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any, TypeVar

import torch

logger = logging.getLogger(__name__)

GIB = 2**30
MODEL_SIZES = ("tiny", "2b", "4b", "8b")
PAGE_PROMPT_TOKENS = 20  # chat-template tokens around a page's visual tokens
QUERY_AUGMENTATION_TOKENS = 10
PATCHES_PER_VISUAL_TOKEN = 4  # a 2x2 block of 16-px patches merges into one visual token
LORA_TARGETS = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "custom_text_proj",
)
OPTIMIZER_STATES = {"adamw": 2, "sgd": 0, "sgd_momentum": 1}
ATTENTION = ("flash_attention_2", "sdpa", "eager")
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_FP32 = 4
_LORA_BYTES = 4  # peft keeps adapter weights (and so their inputs) in float32

# The reference README's recommended per-device batches: 2B 64; 4B 32-48; 8B 16-32 (both ends).
RECOMMENDED = (("2b", 64), ("4b", 48), ("4b", 32), ("8b", 32), ("8b", 16))


@dataclass(frozen=True)
class TrainingSetup:
    """One ColQwen3 training configuration, as far as memory is concerned.

    Args:
        model_size: `tiny`, `2b`, `4b` or `8b` (the published architectures, no download).
        dtype: Model dtype: `bfloat16`, `float16` or `float32`.
        lora: LoRA on the language model's projections and `custom_text_proj` (else full fine-tuning).
        lora_rank: LoRA rank r.
        optimizer: `adamw` (two states per trainable parameter), `sgd_momentum` (one) or `sgd` (none).
        batch_size: Per-device batch: this many queries and this many pages per step.
        max_visual_tokens: Visual tokens per page (pages are assumed to reach the cap).
        query_len: Query tokens before the 10 augmentation tokens (`Query: ` prefix included).
        gradient_checkpointing: Recompute each layer in backward instead of storing its activations.
        attn_implementation: `flash_attention_2`, `sdpa` or `eager`.
        device: `cuda` or `cpu` (dropout masks are bytes on CUDA, floats on CPU; AdamW's foreach
            temporaries only on CUDA).
        embedding_dim: Size of the multi-vector embeddings.
    """

    model_size: str = "2b"
    dtype: str = "bfloat16"
    lora: bool = True
    lora_rank: int = 32
    optimizer: str = "adamw"
    batch_size: int = 64
    max_visual_tokens: int = 768
    query_len: int = 20
    gradient_checkpointing: bool = True
    attn_implementation: str = "flash_attention_2"
    device: str = "cuda"
    embedding_dim: int = 128

    def __post_init__(self):
        if self.dtype not in _DTYPE_BYTES:
            raise ValueError(f"dtype={self.dtype!r} is not one of {sorted(_DTYPE_BYTES)}")
        if self.optimizer not in OPTIMIZER_STATES:
            raise ValueError(f"optimizer={self.optimizer!r} is not one of {sorted(OPTIMIZER_STATES)}")
        if self.attn_implementation not in ATTENTION:
            raise ValueError(f"attn_implementation={self.attn_implementation!r} is not one of {ATTENTION}")
        if self.device not in ("cuda", "cpu"):
            raise ValueError(f"device={self.device!r} must be 'cuda' or 'cpu'")
        for name in ("batch_size", "max_visual_tokens", "query_len", "lora_rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class Shape:
    """The architecture numbers the estimate needs, read from a `Qwen3VLConfig`."""

    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    attention_bias: bool
    v_hidden: int
    v_intermediate: int
    v_depth: int
    v_heads: int
    v_patch_dim: int  # in_channels * temporal_patch * patch^2 (pixels per patch)
    v_positions: int
    merge: int  # spatial_merge_size^2
    deepstack: int
    out_hidden: int

    @classmethod
    def from_config(cls, config) -> Shape:
        t, v = config.text_config, config.vision_config
        return cls(
            vocab=t.vocab_size,
            hidden=t.hidden_size,
            intermediate=t.intermediate_size,
            layers=t.num_hidden_layers,
            heads=t.num_attention_heads,
            kv_heads=t.num_key_value_heads,
            head_dim=getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads,
            attention_bias=bool(getattr(t, "attention_bias", False)),
            v_hidden=v.hidden_size,
            v_intermediate=v.intermediate_size,
            v_depth=v.depth,
            v_heads=v.num_heads,
            v_patch_dim=v.in_channels * v.temporal_patch_size * v.patch_size**2,
            v_positions=v.num_position_embeddings,
            merge=v.spatial_merge_size**2,
            deepstack=len(v.deepstack_visual_indexes),
            out_hidden=v.out_hidden_size,
        )

    @property
    def q_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim


@dataclass(frozen=True)
class ParameterCount:
    """Parameters of a ColQwen3, by part."""

    embedding: int
    text_layers: int
    vision: int
    head: int
    lora: int

    @property
    def base(self) -> int:
        return self.embedding + self.text_layers + self.vision + self.head


@dataclass(frozen=True)
class MemoryEstimate:
    """Predicted peak memory of one training step, in bytes, and what it is made of.

    `weights + trainable + gradients + activations + workspace == total`; the last three are what
    is alive at `peak_phase` (`vision forward`, `pages forward`, `backward`, `vision backward` or
    `optimizer step`); `phases` gives the total at each of them.
    """

    setup: TrainingSetup
    weights: int
    trainable: int
    gradients: int
    activations: int
    workspace: int
    peak_phase: str
    trainable_params: int
    all_gradients: int
    phases: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.weights + self.trainable + self.gradients + self.activations + self.workspace

    @property
    def total_gib(self) -> float:
        return self.total / GIB

    def breakdown(self) -> dict[str, float]:
        """Each part in GiB, and the total."""
        parts = ("weights", "trainable", "gradients", "activations", "workspace", "total")
        return {name: getattr(self, name) / GIB for name in parts}

    def __str__(self) -> str:
        s = self.setup
        mode = f"LoRA r={s.lora_rank}" if s.lora else "full fine-tuning"
        ckpt = "with" if s.gradient_checkpointing else "without"
        lines = [
            f"ColQwen3-{s.model_size} {s.dtype}, {mode}, batch {s.batch_size}, {s.max_visual_tokens} visual tokens, "
            f"{s.attn_implementation}, {ckpt} gradient checkpointing (peak at {self.peak_phase}):"
        ]
        labels = {"trainable": "trainable + optimizer"}
        lines += [f"  {labels.get(k, k):<22} {v:8.2f} GiB" for k, v in self.breakdown().items()]
        return "\n".join(lines)


def _bytes(dtype: str | torch.dtype) -> int:
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPE_BYTES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(_DTYPE_BYTES)}")
    return _DTYPE_BYTES[name]


def model_shape(model_size_or_config) -> Shape:
    """The `Shape` of a model size (`tiny`, `2b`, `4b`, `8b`) or of a `Qwen3VLConfig`."""
    if isinstance(model_size_or_config, str):
        return _published_shape(model_size_or_config.lower())
    return Shape.from_config(model_size_or_config)


@functools.cache
def _published_shape(size: str) -> Shape:
    from .tiny import real_config

    return Shape.from_config(real_config(size))


def count_parameters(
    model_size_or_config, lora_rank: int | None = None, embedding_dim: int = 128
) -> ParameterCount:
    """Count a ColQwen3's parameters from its config (no weights are built).

    Args:
        model_size_or_config: `tiny`, `2b`, `4b`, `8b`, or a `Qwen3VLConfig`.
        lora_rank: Also count LoRA adapters of this rank on `LORA_TARGETS`.
        embedding_dim: Output size of `custom_text_proj`.
    """
    s = model_shape(model_size_or_config)
    h, q, kv, inter = s.hidden, s.q_width, s.kv_width, s.intermediate
    bias = (q + 2 * kv) if s.attention_bias else 0
    per_layer = h * q + 2 * h * kv + q * h + bias + 2 * s.head_dim + 3 * h * inter + 2 * h
    d, j, wide = s.v_hidden, s.v_intermediate, s.v_hidden * s.merge
    block = 2 * 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * j + j) + (j * d + d)
    merger_fc = (wide * wide + wide) + (wide * s.out_hidden + s.out_hidden)
    vision = (
        (s.v_patch_dim * d + d)  # patch embedding (a strided conv)
        + s.v_positions * d
        + s.v_depth * block
        + (2 * d + merger_fc)  # final merger, LayerNorm before the 2x2 shuffle
        + s.deepstack * (2 * wide + merger_fc)  # DeepStack mergers, LayerNorm after it
    )
    lora = 0
    if lora_rank:
        widths = [(h, q), (h, kv), (h, kv), (q, h), (h, inter), (h, inter), (inter, h)]
        lora = s.layers * sum(lora_rank * (i + o) for i, o in widths) + lora_rank * (h + embedding_dim)
    return ParameterCount(
        embedding=s.vocab * h,
        text_layers=s.layers * per_layer + h,
        vision=vision,
        head=h * embedding_dim + embedding_dim,
        lora=lora,
    )


def _text_layer_bytes(s: Shape, setup: TrainingSetup) -> int:
    """Bytes saved for backward by one decoder layer, per token (attention matrices excluded)."""
    a = _bytes(setup.dtype)
    h, q, k, inter = s.hidden, s.q_width, s.kv_width, s.intermediate
    norm_inputs = _FP32 * (2 * h + q + k)
    flash = setup.attn_implementation == "flash_attention_2"
    if not setup.lora:
        attention = 3 * q + 3 * k if flash else 5 * q + k
        return norm_inputs + a * (4 * h + attention + 4 * inter)
    attention = 2 * q + 2 * k if flash else 4 * q
    mask = 1 if setup.device == "cuda" else _LORA_BYTES
    adapters = (_LORA_BYTES + mask) * (5 * h + q + inter) + 7 * setup.lora_rank * _LORA_BYTES
    return norm_inputs + a * (attention + 3 * inter) + adapters


def _attention_matrix_bytes(heads: int, seq: int, setup: TrainingSetup) -> int:
    """Eager attention's saved softmax per token: float32, plus its copy when the model is not float32."""
    if setup.attn_implementation != "eager":
        return 0
    a = _bytes(setup.dtype)
    return heads * seq * (_FP32 + (a if a != _FP32 else 0))


def _text_extra_bytes(s: Shape, setup: TrainingSetup, seq: int) -> int:
    """Per token, outside the decoder layers: final norm, head, normalisation, ids, rotary tables, mask."""
    a = _bytes(setup.dtype)
    h, dim = s.hidden, setup.embedding_dim
    if setup.lora:
        mask = 1 if setup.device == "cuda" else _LORA_BYTES
        head = (_LORA_BYTES + mask) * h + setup.lora_rank * _LORA_BYTES
    else:
        head = 2 * a * h
    ids = 8 * 5  # input ids, attention mask, 3 M-RoPE position ids (int64)
    rotary = 2 * a * s.head_dim
    causal_mask = (
        0
        if setup.attn_implementation == "flash_attention_2"
        else seq * (a if setup.attn_implementation == "eager" else 1)
    )
    return _FP32 * h + head + 3 * a * dim + ids + rotary + causal_mask


def _vision_bytes_per_patch(s: Shape, setup: TrainingSetup) -> tuple[int, int, int, int]:
    """Per patch: (saved by the blocks, saved outside them, one block's saves, forward transient) bytes.

    The saves apply to full fine-tuning only (with LoRA the vision tower needs no gradients). The
    transient is the most a block (or the position-embedding step) holds at once while it runs:
    the float32 rotary temporaries, the attention buffers, or the MLP's two hidden tensors.
    """
    a = _bytes(setup.dtype)
    d, j = s.v_hidden, s.v_intermediate
    flash = setup.attn_implementation == "flash_attention_2"
    block = a * ((10 if flash else 11) * d + 2 * j)
    block += _attention_matrix_bytes(s.v_heads, PATCHES_PER_VISUAL_TOKEN * setup.max_visual_tokens, setup)
    mergers = a * (3 * d * s.deepstack + 4 * d)
    outside = mergers + 2 * _FP32 * (d // s.v_heads)
    kept = s.v_depth * (a * d if setup.gradient_checkpointing else block)
    rope = a * 4 * d + _FP32 * (5 * d if a != _FP32 else 3 * d)
    transient = max(rope, a * 8 * d, a * (3 * d + 2 * j), a * 10 * d) + 2 * _FP32 * (d // s.v_heads) + 48
    return kept, outside, block, transient


def estimate_memory(setup: TrainingSetup | None = None, *, config=None, **overrides: Any) -> MemoryEstimate:
    """Predict the peak memory of one ColQwen3 training step.

    The step runs queries, then pages (as colpali-engine's trainer does), the loss, backward and
    the optimizer step; the peak is the largest of these moments: end of the vision tower's
    forward, end of the pages' forward, start of backward, end of the text backward (vision
    backward), optimizer step.

    Args:
        setup: The configuration; defaults to `TrainingSetup()` (2B, bf16, LoRA, batch 64, 768 tokens).
        config: A `Qwen3VLConfig` to use instead of the published `setup.model_size` architecture.
        **overrides: Fields of `TrainingSetup` to change, e.g. `batch_size=32`.

    Returns:
        A `MemoryEstimate`; `str()` of it is a readable breakdown.
    """
    setup = replace(setup or TrainingSetup(), **overrides)
    arch = config if config is not None else setup.model_size
    s = model_shape(arch)
    a = _bytes(setup.dtype)
    cast = a if a != _FP32 else 0  # a copy made when float32 inputs meet a bf16/fp16 model
    params = count_parameters(arch, setup.lora_rank, setup.embedding_dim)

    # Resident: frozen weights; trainable parameters and their optimizer states.
    n_states = OPTIMIZER_STATES[setup.optimizer]
    if setup.lora:
        weights = a * params.base
        trainable_params, p_bytes = params.lora, _LORA_BYTES
        largest_trainable = max(s.hidden, s.intermediate) * setup.lora_rank
        text_grads = params.lora * p_bytes
    else:
        weights = 0
        trainable_params, p_bytes = params.base, a
        largest_trainable = params.embedding
        text_grads = (params.text_layers + params.head) * p_bytes
    trainable = trainable_params * p_bytes * (1 + n_states)
    all_gradients = trainable_params * p_bytes

    # Text activations: queries and pages are two forward passes, both kept for the loss.
    b = setup.batch_size
    seq_p = setup.max_visual_tokens + PAGE_PROMPT_TOKENS
    seq_q = setup.query_len + QUERY_AUGMENTATION_TOKENS
    layer = _text_layer_bytes(s, setup)
    per_layer = {seq: layer + _attention_matrix_bytes(s.heads, seq, setup) for seq in (seq_p, seq_q)}

    def text(seq: int) -> int:
        kept = a * s.hidden if setup.gradient_checkpointing else per_layer[seq]
        return b * seq * (s.layers * kept + _text_extra_bytes(s, setup, seq))

    text_q, text_p = text(seq_q), text(seq_p)
    loss = b * b * seq_q * seq_p * a  # the (queries x pages) similarity block amax keeps for backward

    # Pages' pixels: the processor's float32 batch, and the unpadded copy ColQwen3.forward makes.
    patches = b * setup.max_visual_tokens * PATCHES_PER_VISUAL_TOKEN
    pixels = patches * s.v_patch_dim * _FP32
    # Full fine-tuning in float32 saves that copy itself for the patch embedding's weight gradient.
    pixel_copy = 0 if not setup.lora and not cast else pixels
    kept, outside, block, transient = _vision_bytes_per_patch(s, setup)
    vision_saved = 0 if setup.lora else patches * (kept + outside + s.v_patch_dim * (cast or a))
    vision_ws = patches * transient

    # Backward workspace: one layer's gradient buffers, plus its recomputation under checkpointing.
    text_ws = b * seq_p * a * 2 * (s.hidden + s.intermediate)
    if setup.gradient_checkpointing:
        text_ws += b * seq_p * per_layer[seq_p]
    vision_bwd_ws = 0
    if not setup.lora:
        vision_bwd_ws = patches * a * 2 * (s.v_hidden + s.v_intermediate)
        vision_bwd_ws += patches * block if setup.gradient_checkpointing else 0
    if setup.optimizer == "sgd":
        optimizer_ws = 0
    elif setup.device == "cuda":
        optimizer_ws = trainable_params * p_bytes  # foreach AdamW: sqrt(exp_avg_sq) of every parameter
    else:
        optimizer_ws = 2 * largest_trainable * p_bytes  # one parameter at a time: sqrt, then its quotient

    # (gradients, activations, workspace) alive at each moment of the step.
    activations = text_q + text_p + pixels + loss + vision_saved
    moments = {
        "vision forward": (0, text_q + pixels + vision_saved, pixel_copy + vision_ws),
        "pages forward": (0, text_q + text_p + pixels + vision_saved, pixel_copy),
        "backward": (0, activations, max(2 * loss, text_ws)),
        "optimizer step": (all_gradients, pixels, optimizer_ws),  # the batch is still referenced
    }
    if not setup.lora:  # the vision tower's backward runs after the text layers'
        moments["vision backward"] = (text_grads, pixels + vision_saved, vision_bwd_ws)
    totals = {name: sum(parts) for name, parts in moments.items()}
    phase = max(totals, key=totals.get)
    gradients, alive, workspace = moments[phase]
    return MemoryEstimate(
        setup=setup,
        weights=weights,
        trainable=trainable,
        gradients=gradients,
        activations=alive,
        workspace=workspace,
        peak_phase=phase,
        trainable_params=trainable_params,
        all_gradients=all_gradients,
        phases={name: weights + trainable + v for name, v in totals.items()},
    )


@dataclass(frozen=True)
class Suggestion:
    """Settings that fit a memory budget: per-device batch, accumulation steps, and their estimate."""

    batch_size: int
    gradient_accumulation_steps: int
    effective_batch_size: int
    estimate: MemoryEstimate | None
    fits: bool
    note: str

    def as_dict(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k != "estimate"}
        out["estimated_gib"] = None if self.estimate is None else round(self.estimate.total_gib, 2)
        return out


def largest_batch_size(
    memory_bytes: float, setup: TrainingSetup | None = None, limit: int = 4096, **overrides
) -> int:
    """The largest per-device batch whose estimated peak stays under `memory_bytes` (0 if none)."""
    setup = replace(setup or TrainingSetup(), **overrides)
    if estimate_memory(setup, batch_size=1).total > memory_bytes:
        return 0
    low, high = 1, limit
    while low < high:  # peak grows with the batch: bisect
        mid = (low + high + 1) // 2
        if estimate_memory(setup, batch_size=mid).total <= memory_bytes:
            low = mid
        else:
            high = mid - 1
    return low


def gradient_accumulation_steps(
    effective_batch_size: int, per_device_batch_size: int, num_devices: int = 1
) -> int:
    """Accumulation steps so that per_device x devices x steps reaches `effective_batch_size`."""
    if per_device_batch_size < 1 or num_devices < 1:
        raise ValueError("per_device_batch_size and num_devices must be at least 1")
    return max(1, math.ceil(effective_batch_size / (per_device_batch_size * num_devices)))


def suggest_settings(
    memory_gib: float,
    setup: TrainingSetup | None = None,
    effective_batch_size: int | None = None,
    num_devices: int = 1,
    headroom: float = 0.9,
    **overrides,
) -> Suggestion:
    """The largest per-device batch that fits `memory_gib`, and the accumulation keeping the effective batch.

    In-batch negatives come from the per-device batch, so a smaller batch with accumulation trains
    a (slightly) different objective than the recommended one; the note says so.

    Args:
        memory_gib: Memory of one device (e.g. 80 for an H100 80GB).
        setup: The configuration; its `batch_size` is the wanted per-device batch.
        effective_batch_size: Batch to keep per optimizer step; default: `setup.batch_size` x devices.
        num_devices: Data-parallel devices.
        headroom: Share of the memory the estimate may use (CUDA context, allocator fragmentation).
        **overrides: Fields of `TrainingSetup` to change.
    """
    setup = replace(setup or TrainingSetup(), **overrides)
    wanted = effective_batch_size or setup.batch_size * num_devices
    budget = memory_gib * GIB * headroom
    batch = min(largest_batch_size(budget, setup), setup.batch_size)
    if batch == 0:
        estimate = estimate_memory(setup, batch_size=1)
        note = (
            f"does not fit: batch 1 needs ~{estimate.total_gib:.1f} GiB of {memory_gib:.0f} GiB; "
            + ("enable gradient checkpointing, " if not setup.gradient_checkpointing else "")
            + ("use LoRA, " if not setup.lora else "")
            + "lower max_visual_tokens or use a smaller model"
        )
        return Suggestion(0, 0, 0, estimate, False, note)
    per_device = math.ceil(wanted / num_devices)
    divisor = max(d for d in range(1, batch + 1) if per_device % d == 0)
    if batch < setup.batch_size and divisor * 2 > batch:
        batch = divisor  # e.g. 32 x 2 rather than 63 x 2: the effective batch stays exactly as wanted
    steps = gradient_accumulation_steps(wanted, batch, num_devices)
    estimate = estimate_memory(setup, batch_size=batch)
    if batch >= setup.batch_size:
        note = "fits"
    else:
        note = (
            f"needs gradient accumulation: batch {batch} x {steps} steps"
            + (f" x {num_devices} devices" if num_devices > 1 else "")
            + f" for an effective {batch * steps * num_devices} (in-batch negatives: {batch} per step)"
        )
    return Suggestion(batch, steps, batch * steps * num_devices, estimate, True, note)


def recommended_verdicts(memory_gib: float | None, **overrides) -> list[dict]:
    """Fits / needs gradient accumulation / does not fit, for each of the reference README's settings.

    Args:
        memory_gib: Memory of the GPU to judge; None when there is no GPU (nothing fits).
        **overrides: `TrainingSetup` fields shared by every row (default: bf16, LoRA r=32,
            768 visual tokens, flash_attention_2, gradient checkpointing).
    """
    rows = []
    for size, batch in RECOMMENDED:
        setup = TrainingSetup(model_size=size, batch_size=batch, **overrides)
        needed = estimate_memory(setup)
        row = {"model": size, "batch": batch, "needs_gib": round(needed.total_gib, 1)}
        if memory_gib is None:
            row.update(verdict="does not fit", detail="no CUDA GPU: real-size training needs one")
        else:
            s = suggest_settings(memory_gib, setup, effective_batch_size=batch)
            verdict = (
                "fits"
                if s.fits and s.batch_size >= batch
                else ("needs grad. accumulation" if s.fits else "does not fit")
            )
            row.update(
                verdict=verdict,
                detail=s.note,
                batch_that_fits=s.batch_size,
                accumulation=s.gradient_accumulation_steps,
            )
        rows.append(row)
    return rows


# ---------------------------------------------------------------- surviving out-of-memory errors

T = TypeVar("T")


def is_oom_error(error: BaseException) -> bool:
    """True for an out-of-memory error from CUDA, MPS, XPU or the CPU allocator."""
    from accelerate.utils.memory import should_reduce_batch_size

    return isinstance(error, torch.OutOfMemoryError) or should_reduce_batch_size(error)


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def find_batch_size(
    fn: Callable[[int], T], start_batch_size: int, min_batch_size: int = 1, factor: float = 0.5
) -> tuple[int, T]:
    """Call `fn(batch_size)`, shrinking the batch after each out-of-memory error until it runs.

    The equivalent of `accelerate.utils.find_executable_batch_size`, but it returns the batch size
    that worked, logs every retry, and raises a readable error when even `min_batch_size` fails.
    `fn` must free what it allocated when it raises (keep model, optimizer and batch local to it, or
    reuse them: a failed attempt's activations are released here before the retry).

    Args:
        fn: Runs the work (e.g. one training step, or the whole training) at a batch size.
        start_batch_size: First batch size to try.
        min_batch_size: Smallest batch size to try.
        factor: Multiplier applied after each failure (0.5 halves it).

    Returns:
        (the batch size that ran, what `fn` returned).

    Raises:
        torch.OutOfMemoryError: even `min_batch_size` runs out of memory (message: `oom_advice`).
    """
    if not 0 < factor < 1:
        raise ValueError(f"factor must be between 0 and 1, got {factor}")
    batch_size = start_batch_size
    while True:
        try:
            return batch_size, fn(batch_size)
        except Exception as error:
            if not is_oom_error(error):
                raise
            del error  # drop the traceback's references to the failed step's tensors
            _free_memory()
            if batch_size <= min_batch_size:
                raise torch.OutOfMemoryError(oom_advice(batch_size=batch_size)) from None
            smaller = max(min_batch_size, int(batch_size * factor))
            logger.warning(f"out of memory at batch size {batch_size}; retrying with {smaller}")
            batch_size = smaller


def oom_advice(
    setup: TrainingSetup | None = None, memory_gib: float | None = None, batch_size: int | None = None
) -> str:
    """What to change after an out-of-memory error, most effective first.

    Args:
        setup: The configuration that ran out of memory (adds an estimate and a suggested batch).
        memory_gib: The device's memory (default: the current CUDA device's, if any).
        batch_size: The per-device batch that failed, if `setup` is not given.
    """
    if memory_gib is None and torch.cuda.is_available():
        memory_gib = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / GIB
    batch = setup.batch_size if setup is not None else batch_size
    lines = [f"Out of memory{f' at per-device batch size {batch}' if batch else ''}. What helps, most first:"]
    if setup is not None and memory_gib is not None:
        estimate = estimate_memory(setup)
        suggestion = suggest_settings(memory_gib, setup)
        lines.append(f"  (estimated peak {estimate.total_gib:.1f} GiB on a {memory_gib:.0f} GiB device)")
        if suggestion.fits:
            lines.append(
                f"- --per-device-train-batch-size {suggestion.batch_size} with --gradient-accumulation-steps "
                f"{suggestion.gradient_accumulation_steps} keeps the effective batch of {setup.batch_size}"
            )
    lines += [
        f"- reduce the batch size (--per-device-train-batch-size {max(1, (batch or 64) // 2)}) and raise "
        "--gradient-accumulation-steps to match, or let --auto-batch-size find one",
        "- keep gradient checkpointing on (the default; drop --no-gradient-checkpointing)",
        "- use LoRA: --peft (frozen base weights need no gradients or optimizer states)",
        "- reduce max visual tokens: --max-visual-tokens 512",
        "- use --attn-implementation flash_attention_2 (pip install flash-attn --no-build-isolation), not eager",
        "See `python -m colqwen3_lib.doctor` for what fits this machine.",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------- measuring a real training step


def synthetic_batch(
    config, batch_size: int, max_visual_tokens: int, query_len: int, device: str | torch.device = "cpu"
) -> tuple[dict, dict]:
    """A batch of pages and one of queries shaped exactly like `ColQwen3Processor` output, with random content.

    Pages have `max_visual_tokens` image tokens (the last page one row fewer, so that the batch is
    padded as in training) and 20 prompt tokens; queries have `query_len` tokens (the last one 3
    fewer) and 10 augmentation tokens. Pixel values are padded per page to (batch, patches, pixels).
    """
    from .tiny import SPECIAL_TOKENS

    v = config.vision_config
    rows = max(d for d in range(1, int(max_visual_tokens**0.5) + 1) if max_visual_tokens % d == 0)
    cols = max_visual_tokens // rows
    merge = v.spatial_merge_size
    grids = [
        (rows - (1 if i == batch_size - 1 and batch_size > 1 and rows > 1 else 0), cols)
        for i in range(batch_size)
    ]
    g = torch.Generator().manual_seed(0)

    def left_pad(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        longest = max(map(len, seqs))
        ids = torch.tensor([[SPECIAL_TOKENS["<|endoftext|>"]] * (longest - len(s)) + s for s in seqs])
        mask = torch.tensor([[0] * (longest - len(s)) + [1] * len(s) for s in seqs])
        return ids.to(device), mask.to(device)

    filler = torch.randint(100, 5000, (PAGE_PROMPT_TOKENS,), generator=g).tolist()
    pages = [
        [SPECIAL_TOKENS["<|im_start|>"], *filler[:2], SPECIAL_TOKENS["<|vision_start|>"]]
        + [config.image_token_id] * (r * c)
        + [
            SPECIAL_TOKENS["<|vision_end|>"],
            *filler[2:15],
            SPECIAL_TOKENS["<|im_end|>"],
            SPECIAL_TOKENS["<|endoftext|>"],
        ]
        for r, c in grids
    ]
    ids, mask = left_pad(pages)
    grid_thw = torch.tensor([[1, r * merge, c * merge] for r, c in grids])
    n_patches = grid_thw.prod(dim=1)
    patch_dim = v.in_channels * v.temporal_patch_size * v.patch_size**2
    pixels = torch.zeros(batch_size, int(n_patches.max()), patch_dim)
    for i, n in enumerate(n_patches.tolist()):
        pixels[i, :n] = torch.randn(n, patch_dim, generator=g)
    page_batch = dict(
        input_ids=ids,
        attention_mask=mask,
        mm_token_type_ids=(ids == config.image_token_id).long(),
        pixel_values=pixels.to(device),
        image_grid_thw=grid_thw.to(device),
    )

    queries = [
        torch.randint(
            100,
            5000,
            (query_len - (3 if i == batch_size - 1 and batch_size > 1 and query_len > 3 else 0),),
            generator=g,
        ).tolist()
        + [SPECIAL_TOKENS["<|endoftext|>"]] * QUERY_AUGMENTATION_TOKENS
        for i in range(batch_size)
    ]
    q_ids, q_mask = left_pad(queries)
    return page_batch, dict(input_ids=q_ids, attention_mask=q_mask, mm_token_type_ids=torch.zeros_like(q_ids))


def build_training_model(setup: TrainingSetup, config=None, device: str | torch.device = "cpu"):
    """A ColQwen3 with random weights, prepared for training as `setup` says (LoRA, checkpointing, attention)."""
    import copy

    from .model import ColQwen3
    from .tiny import real_config

    config = copy.deepcopy(config) if config is not None else real_config(setup.model_size)
    config.embedding_dim = setup.embedding_dim
    config._attn_implementation = setup.attn_implementation
    with torch.device(device):
        model = ColQwen3(config)
    model = model.to(dtype=getattr(torch, setup.dtype))
    if setup.gradient_checkpointing:
        model.activation_checkpointing_enable()
    if setup.lora:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=setup.lora_rank, lora_alpha=setup.lora_rank, lora_dropout=0.1, target_modules=list(LORA_TARGETS)
        )
        model = get_peft_model(model, lora)
    return model.train()


def _live_bytes(*objects) -> int:
    """Bytes of the distinct storages of the tensors in `objects` (modules, optimizers, dicts, tensors)."""
    seen: dict[int, int] = {}

    def add(t):
        if isinstance(t, torch.Tensor):
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
        elif isinstance(t, dict):
            for v in t.values():
                add(v)
        elif isinstance(t, list | tuple):
            for v in t:
                add(v)

    for obj in objects:
        if isinstance(obj, torch.nn.Module):
            add(list(obj.parameters()) + list(obj.buffers()))
        elif isinstance(obj, torch.optim.Optimizer):
            add(list(obj.state.values()))
        else:
            add(obj)
    return sum(seen.values())


def _cpu_peak_bytes(fn: Callable[[], Any]) -> int:
    """Peak bytes allocated by `fn` above what was allocated when it started, on the CPU.

    The profiler's memory events (`profile_memory=True`) report every allocation and free of the
    CPU allocator with the allocator's running total: the CPU's equivalent of CUDA's
    `max_memory_allocated`, counting every tensor torch allocates (kernel-internal oneDNN scratch
    space excepted).
    """
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = []

    def walk(nodes):
        for node in nodes:
            if node.tag == _EventType.Allocation:
                events.append(
                    (node.start_time_ns, node.extra_fields.alloc_size, node.extra_fields.total_allocated)
                )
            walk(node.children)

    walk(prof.profiler.kineto_results.experimental_event_tree())
    if not events:
        return 0
    events.sort()
    start = events[0][2] - events[0][1]
    return max(total for _, _, total in events) - start


def measure_training_step(setup: TrainingSetup, config=None, steps: int = 2, seed: int = 0) -> int:
    """Measured peak memory (bytes) of a real ColQwen3 training step, random weights, no download.

    Runs `steps` steps (forward of queries and pages, `ColbertContrastiveLoss`, backward, AdamW step,
    `zero_grad(set_to_none=True)`) and measures the last one, when the optimizer states exist:
    `torch.cuda.max_memory_allocated` on CUDA; on the CPU, the bytes resident before the step
    (weights, optimizer states, the batch) plus the allocator's peak during it (`_cpu_peak_bytes`).

    Args:
        setup: The configuration (`setup.device` picks CPU or CUDA).
        config: A `Qwen3VLConfig` instead of the published `setup.model_size` architecture.
        steps: Steps to run (the first creates the optimizer states).
        seed: Seed for the random weights.
    """
    from .losses import ColbertContrastiveLoss

    if setup.optimizer != "adamw":
        raise ValueError("measure_training_step runs AdamW; set optimizer='adamw'")
    device = torch.device(setup.device)
    torch.manual_seed(seed)
    model = build_training_model(setup, config, device)
    base_config = model.config
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    loss_fn = ColbertContrastiveLoss()
    pages, queries = synthetic_batch(
        base_config, setup.batch_size, setup.max_visual_tokens, setup.query_len, device
    )

    def step():
        query_embeddings = model(**queries)  # (batch, query_tokens, dim)
        page_embeddings = model(**pages)  # (batch, page_tokens, dim)
        loss = loss_fn(query_embeddings, page_embeddings)
        del page_embeddings, query_embeddings
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(steps - 1):
        step()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        resident = _live_bytes(model, optimizer, pages, queries)
        peak = resident + _cpu_peak_bytes(step)
    model = optimizer = None  # release the weights before the next measurement
    _free_memory()
    return peak


def scaled_config(
    hidden: int = 512,
    intermediate: int = 1536,
    layers: int = 4,
    vision_hidden: int = 256,
    vision_depth: int = 4,
):
    """The 2B architecture shrunk (same vocabulary, head size, GQA ratio, DeepStack layout) for CPU measurements."""
    from .tiny import real_config

    config = real_config("2b")
    text, vision = config.text_config, config.vision_config
    text.hidden_size, text.intermediate_size, text.num_hidden_layers = hidden, intermediate, layers
    text.num_attention_heads = hidden // text.head_dim
    text.num_key_value_heads = max(1, text.num_attention_heads // 2)
    vision.hidden_size, vision.intermediate_size, vision.depth = (
        vision_hidden,
        4 * vision_hidden,
        vision_depth,
    )
    vision.num_heads = vision_hidden // 64
    vision.deepstack_visual_indexes = list(range(min(3, vision_depth)))
    vision.out_hidden_size = hidden
    return config
