"""How much memory does a ColQwen3 training step need: the estimator.

`estimate_memory` predicts the peak memory of one training step (forward of a batch of queries
and a batch of pages, in-batch contrastive loss, backward, AdamW step) from the model's config
alone, by counting what is resident and what autograd saves for backward:

- weights: every parameter of the model, in the model dtype, frozen or trained;
- trainable + optimizer: what training adds to them: the LoRA adapters (in float32, as peft keeps them) and
  the head trained in full (a second copy of `custom_text_proj`, as `lora.lora_config` makes it), and
  AdamW's two states per trainable parameter, in its dtype (under full fine-tuning, the states alone);
- gradients: one per trainable parameter, alive after backward and during the optimizer step;
- activations: the tensors saved for backward, counted per token and per layer (below);
- workspace: short-lived buffers at the peak (the loss's similarity block and its gradient, one
  layer's gradient buffers, the optimizer's temporaries); on CUDA also the libraries' workspaces
  (`CUDA_LIBRARY_BYTES`) and a margin of `CUDA_MARGIN` on the activations and workspace, both measured.

Peak = weights + trainable/optimizer + the largest of five moments: the vision tower's forward
(one block's temporaries over all patches, plus the unpadded float32 copy of the pixels that
`ColQwen3.forward` makes), the end of the pages' forward, the start of backward (all activations
and the loss's gradient), the end of the text backward (text gradients + the vision tower's
activations, full fine-tuning only), the optimizer step (all gradients + AdamW temporaries).
The batch (float32 pixels) is alive throughout. With several processes the loss scores each query
against every process's pages (`world_size` x batch), which grows its similarity block.

With the gradient cache (`grad_cache_chunk_size`, `grad_cache.py`) the moments are those of one chunk:
the loss over the whole batch (its similarity block, with the batch's embeddings and their gradients, and
under LoRA the frozen vision tower's outputs for every page, kept for the re-run);
a page chunk's vision forward, end of forward and backward, each with the gradients of the chunks
before it and the cached embedding gradients alive; the optimizer step. The graph-free first pass
over the chunks holds less than the re-run of one, and is not counted.

Saved for backward, per token and per decoder layer (h hidden, q/k query/key-value widths,
I MLP width, a bytes per activation element):
- the float32 inputs of the four RMSNorms (layer, post-attention, q_norm, k_norm): 4 (2h + q + k);
- full fine-tuning: normed inputs of q/k/v and gate/up (for the weight gradients), the attention
  inputs and output, 4 MLP intermediates: a (4h + 5q + k + 4I) with sdpa (keys/values repeated to
  all heads under a padding mask), a (4h + 3q + 3k + 4I) with flash_attention_2;
- LoRA (frozen base weights save nothing for their own gradients): attention tensors plus
  3 MLP intermediates, a (4q + 3I) (sdpa), plus per adapted projection of input width w the
  dropout output (float32) and its mask (1 byte on CUDA, 4 on CPU): (4 + mask)(5h + q + I); the
  LoRA targets are those of `lora.lora_config`, the configuration training uses;
- eager attention also stores the float32 softmax (and its copy in the model dtype): heads x seq.
Gradient checkpointing keeps only each layer's input (a h) and recomputes one layer at a time.
The vision tower runs on patches (4 per visual token); with LoRA nothing in it needs gradients,
so it saves nothing. Pages are `max_visual_tokens + 20` tokens, queries `query_len + 10`.

What to do when it does not fit is in `oom.py`; measuring a real step, to check this, in `measure.py`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from .architectures import MODEL_SIZES, real_config
from .lora import LORA_PROJECTIONS
from .model import ATTENTION_IMPLEMENTATIONS
from .processor import N_QUERY_AUGMENTATION_TOKENS
from .reference import BATCH_SIZE, EMBEDDING_DIM, LORA_RANK, MAX_VISUAL_TOKENS

GIB = 2**30
PAGE_PROMPT_TOKENS = 20  # chat-template tokens around a page's visual tokens
PATCHES_PER_VISUAL_TOKEN = 4  # a 2x2 block of 16-px patches merges into one visual token
OPTIMIZER_STATES = {"adamw": 2, "sgd": 0, "sgd_momentum": 1}
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_FP32 = 4
_LORA_BYTES = 4  # peft keeps adapter weights (and so their inputs) in float32
# On CUDA, what the count above leaves out, measured on an H200 with torch 2.11 (2026-12-04,
# benchmarks/memory_accuracy_gpu.md): the libraries' workspaces that PyTorch's allocator holds for the whole
# step (cuBLAS, cuDNN; the tiny model's step peaked at 217 MiB where the count gave 125), and a margin on the
# activations and workspace for the allocator's rounding and kernels' temporaries (nine steps of the real
# 2B/4B/8B architectures peaked 0.4-3.5% above the count, the most where activations dominate).
CUDA_LIBRARY_BYTES = 96 * 2**20
CUDA_MARGIN = 0.02


@dataclass(frozen=True)
class TrainingSetup:
    """One ColQwen3 training configuration, as far as memory is concerned.

    Args:
        model_size: `tiny`, `2b`, `4b` or `8b` (the published architectures, no download); None for
            another architecture (then only `estimate_memory(setup, config=...)` can estimate it).
        dtype: Model dtype: `bfloat16`, `float16` or `float32`.
        lora: LoRA as training applies it (`lora.lora_config`), else full fine-tuning.
        head_in_full: With LoRA, the head is trained in full (`modules_to_save`) instead of LoRA-adapted.
        lora_rank: LoRA rank r.
        optimizer: `adamw` (two states per trainable parameter), `sgd_momentum` (one) or `sgd` (none).
        batch_size: Per-device batch: this many queries and this many pages per step.
        max_visual_tokens: Visual tokens per page (pages are assumed to reach the cap).
        query_len: Query tokens before the 10 augmentation tokens (any `query_prefix` included).
        gradient_checkpointing: Recompute each layer in backward instead of storing its activations.
        grad_cache_chunk_size: With the gradient cache (`grad_cache.py`), rows per forward pass; None: off.
        attn_implementation: `flash_attention_2`, `sdpa` or `eager`.
        device: `cuda` or `cpu` (dropout masks are bytes on CUDA, floats on CPU; AdamW's foreach
            temporaries only on CUDA).
        embedding_dim: Size of the multi-vector embeddings.
        world_size: Processes training together: every query is scored against the pages of all of them
            (gathered), so the loss's similarity block grows with it.
    """

    model_size: str | None = "2b"
    dtype: str = "bfloat16"
    lora: bool = True
    lora_rank: int = LORA_RANK
    head_in_full: bool = False
    optimizer: str = "adamw"
    batch_size: int = BATCH_SIZE
    max_visual_tokens: int = MAX_VISUAL_TOKENS
    query_len: int = 20
    gradient_checkpointing: bool = True
    grad_cache_chunk_size: int | None = None
    attn_implementation: str = "flash_attention_2"
    device: str = "cuda"
    embedding_dim: int = EMBEDDING_DIM
    world_size: int = 1

    def __post_init__(self):
        if self.dtype not in _DTYPE_BYTES:
            raise ValueError(f"dtype={self.dtype!r} is not one of {sorted(_DTYPE_BYTES)}")
        if self.optimizer not in OPTIMIZER_STATES:
            raise ValueError(f"optimizer={self.optimizer!r} is not one of {sorted(OPTIMIZER_STATES)}")
        if self.attn_implementation not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(
                f"attn_implementation={self.attn_implementation!r} is not one of {ATTENTION_IMPLEMENTATIONS}"
            )
        if self.model_size is not None and self.model_size.lower() not in MODEL_SIZES:
            raise ValueError(f"model_size={self.model_size!r} is not one of {MODEL_SIZES} (or None)")
        if self.device not in ("cuda", "cpu"):
            raise ValueError(f"device={self.device!r} must be 'cuda' or 'cpu'")
        for name in ("batch_size", "max_visual_tokens", "query_len", "lora_rank", "world_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.grad_cache_chunk_size is not None and self.grad_cache_chunk_size < 1:
            raise ValueError(
                f"grad_cache_chunk_size must be at least 1 (or None: off), got {self.grad_cache_chunk_size}"
            )


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
    `optimizer step`; with the gradient cache `loss`, `chunk vision forward`, `chunk forward`, `chunk
    backward`, `chunk vision backward` or `optimizer step`); `phases` gives the total at each of them.
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
            f"{s.attn_implementation}, {ckpt} gradient checkpointing"
            + (f", gradient cache in chunks of {s.grad_cache_chunk_size}" if s.grad_cache_chunk_size else "")
            + (f", pages of {s.world_size} processes" if s.world_size > 1 else "")
            + f" (peak at {self.peak_phase}):"
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
    if model_size_or_config is None:
        raise ValueError("no architecture: give a model size (tiny, 2b, 4b, 8b) or a Qwen3VLConfig")
    if isinstance(model_size_or_config, str):
        return _published_shape(model_size_or_config.lower())
    return Shape.from_config(model_size_or_config)


@functools.cache
def _published_shape(size: str) -> Shape:
    return Shape.from_config(real_config(size))


def count_parameters(
    model_size_or_config,
    lora_rank: int | None = None,
    embedding_dim: int = EMBEDDING_DIM,
    head_in_full: bool = False,
) -> ParameterCount:
    """Count a ColQwen3's parameters from its config (no weights are built).

    Args:
        model_size_or_config: `tiny`, `2b`, `4b`, `8b`, or a `Qwen3VLConfig`.
        lora_rank: Also count the LoRA adapters of this rank that `lora.lora_config` adds.
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
        widths = {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, inter),
            "up_proj": (h, inter),
            "down_proj": (inter, h),
        }
        lora = s.layers * sum(lora_rank * sum(widths[name]) for name in LORA_PROJECTIONS)
        if not head_in_full:  # the reference LoRA adapts the head too
            lora += lora_rank * (h + embedding_dim)
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
    if setup.lora and not setup.head_in_full:
        mask = 1 if setup.device == "cuda" else _LORA_BYTES
        head = (_LORA_BYTES + mask) * h + setup.lora_rank * _LORA_BYTES
    elif setup.lora:
        head = a * h  # the trained head's input, for its weight gradient
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
    params = count_parameters(arch, setup.lora_rank, setup.embedding_dim, setup.head_in_full)

    # Resident: the weights; the trainable copies (LoRA, a head in full) and their optimizer states.
    n_states = OPTIMIZER_STATES[setup.optimizer]
    if setup.lora:
        head = params.head if setup.head_in_full else 0  # trained in full: a copy, in the model dtype
        weights = a * params.base
        trainable_params = params.lora + head
        trainable_bytes = params.lora * _LORA_BYTES + head * a  # one copy of everything trained
        largest_trainable = max(max(s.hidden, s.intermediate) * setup.lora_rank * _LORA_BYTES, head * a)
        text_grads = trainable_bytes
    else:
        weights = a * params.base  # trained in place: no second copy
        trainable_params = params.base
        trainable_bytes = params.base * a
        largest_trainable = params.embedding * a
        text_grads = (params.text_layers + params.head) * a
    trainable = trainable_bytes * n_states + (trainable_bytes if setup.lora else 0)
    all_gradients = trainable_bytes

    # Text activations: queries and pages are two forward passes, both kept for the loss. With the gradient
    # cache, a forward pass with a graph holds one chunk of rows; the loss still sees the whole batch.
    b = setup.batch_size
    rows = min(setup.grad_cache_chunk_size or b, b)  # rows per forward pass that keeps its activations
    seq_p = setup.max_visual_tokens + PAGE_PROMPT_TOKENS
    seq_q = setup.query_len + N_QUERY_AUGMENTATION_TOKENS
    layer = _text_layer_bytes(s, setup)
    per_layer = {seq: layer + _attention_matrix_bytes(s.heads, seq, setup) for seq in (seq_p, seq_q)}

    def text(seq: int) -> int:
        kept = a * s.hidden if setup.gradient_checkpointing else per_layer[seq]
        return rows * seq * (s.layers * kept + _text_extra_bytes(s, setup, seq))

    text_q, text_p = text(seq_q), text(seq_p)
    pages = setup.world_size * b  # every process's pages, gathered
    loss = b * pages * seq_q * seq_p * a  # the (queries x pages) similarity block amax keeps for backward
    gathered = pages * seq_p * setup.embedding_dim * a if setup.world_size > 1 else 0

    # Pages' pixels: the processor's float32 batch (all pages), and the unpadded copy ColQwen3.forward makes
    # of the pages it embeds.
    patches_per_page = setup.max_visual_tokens * PATCHES_PER_VISUAL_TOKEN
    pixels = b * patches_per_page * s.v_patch_dim * _FP32
    patches = rows * patches_per_page
    # Full fine-tuning in float32 saves that copy itself for the patch embedding's weight gradient.
    pixel_copy = 0 if not setup.lora and not cast else patches * s.v_patch_dim * _FP32
    kept, outside, block, transient = _vision_bytes_per_patch(s, setup)
    vision_saved = 0 if setup.lora else patches * (kept + outside + s.v_patch_dim * (cast or a))
    vision_ws = patches * transient

    # Backward workspace: one layer's gradient buffers, plus its recomputation under checkpointing.
    text_ws = rows * seq_p * a * 2 * (s.hidden + s.intermediate)
    if setup.gradient_checkpointing:
        text_ws += rows * seq_p * per_layer[seq_p]
    vision_bwd_ws = 0
    if not setup.lora:
        vision_bwd_ws = patches * a * 2 * (s.v_hidden + s.v_intermediate)
        vision_bwd_ws += patches * block if setup.gradient_checkpointing else 0
    if setup.optimizer == "sgd":
        optimizer_ws = 0
    elif setup.device == "cuda":
        optimizer_ws = trainable_bytes  # foreach AdamW: sqrt(exp_avg_sq) of every parameter
    else:
        optimizer_ws = 2 * largest_trainable  # one parameter at a time: sqrt, then its quotient

    # (gradients, activations, workspace) alive at each moment of the step.
    if setup.grad_cache_chunk_size is None:
        activations = text_q + text_p + pixels + loss + gathered + vision_saved
        moments = {
            "vision forward": (0, text_q + pixels + vision_saved, pixel_copy + vision_ws),
            "pages forward": (0, text_q + text_p + pixels + vision_saved, pixel_copy),
            "backward": (0, activations, max(2 * loss, text_ws)),
            "optimizer step": (all_gradients, pixels, optimizer_ws),  # the batch is still referenced
        }
        if not setup.lora:  # the vision tower's backward runs after the text layers'
            moments["vision backward"] = (text_grads, pixels + vision_saved, vision_bwd_ws)
    else:
        # The gradient cache: the whole batch's embeddings (then, as large, their gradients) stay alive; the
        # loss runs on them; then one page chunk at a time re-runs with a graph while the parameter gradients
        # of the chunks before it add up. Its first, graph-free pass holds less than the re-run of a chunk.
        cache = b * (seq_q + seq_p) * setup.embedding_dim * a
        # A frozen vision tower (LoRA) runs once, in the graph-free pass: its outputs for every page (the merged
        # tokens and the DeepStack features, at the text's width) wait for the re-run, which takes the first
        # chunk's, so the other chunks' stay alive while it runs.
        per_page = setup.max_visual_tokens * s.hidden * a * (1 + s.deepstack) if setup.lora else 0
        kept, waiting = b * per_page, (b - rows) * per_page
        vision_forward = pixels + cache + kept + vision_saved
        moments = {
            "loss": (0, pixels + cache + kept + loss + gathered, 2 * loss + cache),
            "chunk vision forward": (all_gradients, vision_forward, pixel_copy + vision_ws),
            "chunk forward": (all_gradients, pixels + cache + waiting + text_p + vision_saved, pixel_copy),
            "chunk backward": (all_gradients, pixels + cache + waiting + text_p + vision_saved, text_ws),
            "optimizer step": (all_gradients, pixels, optimizer_ws),
        }
        if not setup.lora:
            moments["chunk vision backward"] = (all_gradients, pixels + cache + vision_saved, vision_bwd_ws)
    if setup.device == "cuda":
        moments = {
            name: (grads, alive, ws + CUDA_LIBRARY_BYTES + int(CUDA_MARGIN * (alive + ws)))
            for name, (grads, alive, ws) in moments.items()
        }
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
