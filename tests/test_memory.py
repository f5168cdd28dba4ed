"""The memory estimator: parameter counts (against the built models, LoRA as training builds it), the
breakdown, and how the peak moves with each setting. Its accuracy against a measured step is in
test_measure.py; what to do when training does not fit, in test_oom.py."""

import pytest
import torch

from colqwen3_lib import memory
from colqwen3_lib.memory import TrainingSetup, estimate_memory

CPU = dict(model_size="tiny", dtype="float32", attn_implementation="sdpa", device="cpu")


def _meta_model(size: str):
    from colqwen3_lib.architectures import real_config
    from colqwen3_lib.model import ColQwen3

    config = real_config(size)
    with torch.device("meta"):
        return ColQwen3(config)


@pytest.mark.parametrize("size", ["tiny", "2b", "8b"])
def test_parameter_count_matches_the_built_model(size):
    model = _meta_model(size)
    counted = memory.count_parameters(size)
    assert counted.base == sum(p.numel() for p in model.parameters())
    assert counted.vision == sum(p.numel() for p in model.visual.parameters())
    assert counted.embedding == model.language_model.embed_tokens.weight.numel()


@pytest.mark.parametrize("head_in_full", [False, True])
def test_lora_parameter_count_matches_the_model_training_builds(head_in_full):
    """LoRA as `lora.prepare_for_training` applies it: adapters on the language model's 7 projections and the
    head (the reference), or with `head_in_full` the head trained as a second copy (`modules_to_save`)."""
    from colqwen3_lib.lora import prepare_for_training
    from colqwen3_lib.model import random_model

    model = prepare_for_training(
        random_model("tiny", torch.float32),
        peft=True,
        gradient_checkpointing=False,
        lora_rank=32,
        head_in_full=head_in_full,
    )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    counted = memory.count_parameters("tiny", lora_rank=32, head_in_full=head_in_full)
    copy = counted.head if head_in_full else 0
    assert counted.lora + copy == trainable
    assert sum(p.numel() for p in model.parameters()) == counted.base + counted.lora + copy
    estimate = estimate_memory(model_size="tiny", lora_rank=32, head_in_full=head_in_full)
    assert estimate.trainable_params == trainable


def test_published_sizes_are_about_2_4_8_billion_parameters():
    billions = {size: memory.count_parameters(size).base / 1e9 for size in ("2b", "4b", "8b")}
    assert billions["2b"] == pytest.approx(2.1, abs=0.1)
    assert billions["4b"] == pytest.approx(4.4, abs=0.1)
    assert billions["8b"] == pytest.approx(8.1, abs=0.2)


@pytest.mark.parametrize(
    "setup",
    [
        TrainingSetup(),
        TrainingSetup(model_size="8b", lora=False, gradient_checkpointing=False, attn_implementation="eager"),
        TrainingSetup(**CPU, lora=False, batch_size=2),
    ],
)
def test_breakdown_adds_up_to_the_total(setup):
    estimate = estimate_memory(setup)
    parts = estimate.breakdown()
    assert all(value >= 0 for value in parts.values())
    assert sum(v for k, v in parts.items() if k != "total") == pytest.approx(parts["total"])
    assert estimate.total == max(estimate.phases.values())
    assert estimate.peak_phase in estimate.phases
    text = str(estimate)
    for label in ("weights", "trainable + optimizer", "gradients", "activations", "workspace", "total"):
        assert label in text


def test_lora_trains_only_the_adapters_and_the_head():
    lora, full = estimate_memory(lora=True), estimate_memory(lora=False)
    params = memory.count_parameters("2b", lora_rank=32)
    assert lora.trainable_params == params.lora  # the head's adapters are among them
    assert lora.all_gradients == 4 * params.lora  # float32 adapters; no gradient for the frozen base
    assert lora.weights == 2 * params.base  # bf16 base weights
    in_full = estimate_memory(lora=True, head_in_full=True)
    in_full_params = memory.count_parameters("2b", lora_rank=32, head_in_full=True)
    assert in_full.trainable_params == in_full_params.lora + in_full_params.head
    assert (
        in_full.all_gradients == 4 * in_full_params.lora + 2 * in_full_params.head
    )  # the bf16 copy of the head
    assert full.trainable_params == params.base
    # Every parameter is a weight, trained or not; full fine-tuning adds two AdamW states per parameter.
    assert (full.weights, full.trainable) == (2 * params.base, 2 * 2 * params.base)
    assert lora.total < full.total


@pytest.mark.parametrize("size", ["tiny", "2b", "8b"])
@pytest.mark.parametrize(
    "field, values",
    [
        ("batch_size", [1, 2, 8, 32, 64]),
        ("max_visual_tokens", [128, 512, 768, 1280]),
        ("query_len", [5, 20, 60]),
    ],
)
def test_peak_grows_with_batch_tokens_and_query_length(size, field, values):
    for lora in (True, False):
        totals = [estimate_memory(model_size=size, lora=lora, **{field: v}).total for v in values]
        assert totals == sorted(totals), f"{field} {values} -> {totals}"
        assert totals[-1] > totals[0]


def test_settings_that_save_memory_save_memory():
    base = TrainingSetup(
        model_size="2b", batch_size=16, gradient_checkpointing=False, attn_implementation="sdpa"
    )
    total = estimate_memory(base).total
    assert estimate_memory(base, gradient_checkpointing=True).total < total
    assert estimate_memory(base, attn_implementation="flash_attention_2").total < total
    assert estimate_memory(base, attn_implementation="eager").total > total
    assert estimate_memory(base, dtype="float32").total > total
    assert estimate_memory(base, lora=False).total > total
    assert estimate_memory(base, lora=False, optimizer="sgd").total < estimate_memory(base, lora=False).total
    sizes = [estimate_memory(base, model_size=s).total for s in ("tiny", "2b", "4b", "8b")]
    assert sizes == sorted(sizes)


def test_activations_dominate_large_batches_and_weights_small_ones():
    small = estimate_memory(model_size="8b", batch_size=1)
    large = estimate_memory(model_size="8b", batch_size=64, gradient_checkpointing=False)
    assert small.weights > small.activations
    assert large.activations > large.weights


def test_invalid_settings_are_refused():
    with pytest.raises(ValueError, match="dtype"):
        TrainingSetup(dtype="int8")
    with pytest.raises(ValueError, match="batch_size"):
        TrainingSetup(batch_size=0)
    with pytest.raises(ValueError, match="model_size='70b' is not one of"):
        estimate_memory(model_size="70b")


# ---------------------------------------------------------------- the gradient cache and several processes


@pytest.mark.parametrize("size", ["2b", "8b"])
@pytest.mark.parametrize("lora", [True, False])
def test_the_gradient_cache_peak_is_set_by_the_chunk_not_the_batch(size, lora):
    setup = TrainingSetup(model_size=size, lora=lora, batch_size=64)
    chunks = [estimate_memory(setup, grad_cache_chunk_size=c) for c in (1, 4, 16, 32)]
    assert [e.total for e in chunks] == sorted(e.total for e in chunks)
    assert chunks[1].total < estimate_memory(setup).total
    assert all(e.peak_phase in ("loss", "chunk forward", "chunk backward", "optimizer step") for e in chunks)
    # The batch still counts, through the cached embeddings and the loss: more pages, more memory at chunk 4.
    larger = estimate_memory(setup, batch_size=256, grad_cache_chunk_size=4)
    assert larger.total > chunks[1].total
    # One chunk of the whole batch needs what the plain step needs, plus (full fine-tuning) the gradients that
    # the queries' chunk has accumulated by the time the pages run.
    whole, plain = estimate_memory(setup, grad_cache_chunk_size=64), estimate_memory(setup)
    assert whole.total <= plain.total * 1.01 + (0 if lora else plain.all_gradients)


def test_the_gradient_cache_holds_the_whole_batch_loss_and_embeddings():
    """At chunk 1 the loss's similarity block (queries x pages of the whole batch), the embeddings and the frozen
    vision tower's outputs kept for the re-run dominate what changes with the batch; they are counted exactly
    (on the CPU: CUDA adds a margin, tested below)."""
    setup = TrainingSetup(model_size="2b", batch_size=64, grad_cache_chunk_size=1, device="cpu")
    at_loss = estimate_memory(setup).phases["loss"]
    doubled = estimate_memory(setup, batch_size=128).phases["loss"]
    a, seq_q, seq_p, dim = 2, 30, 788, 128
    block = lambda b: b * b * seq_q * seq_p * a  # noqa: E731
    cache = lambda b: b * (seq_q + seq_p) * dim * a  # noqa: E731
    pixels = lambda b: b * 768 * 4 * 1536 * 4  # noqa: E731
    kept = lambda b: b * 768 * 2048 * a * (1 + 3)  # noqa: E731  merged tokens + 3 DeepStack features, 2B's width
    grown = 3 * (block(128) - block(64)) + 2 * (cache(128) - cache(64)) + pixels(128) - pixels(64)
    grown += kept(128) - kept(64)
    assert doubled - at_loss == grown


def test_more_processes_mean_a_larger_similarity_block():
    one = estimate_memory(model_size="2b", batch_size=64, grad_cache_chunk_size=8, device="cpu")
    eight = estimate_memory(
        model_size="2b", batch_size=64, grad_cache_chunk_size=8, world_size=8, device="cpu"
    )
    a, seq_q, seq_p, dim = 2, 30, 788, 128
    block_growth = 64 * (8 - 1) * 64 * seq_q * seq_p * a  # 64 queries against 7 more processes' 64 pages
    gathered = 8 * 64 * seq_p * dim * a
    assert eight.phases["loss"] - one.phases["loss"] == 3 * block_growth + gathered
    assert eight.peak_phase == "loss"  # at 8 processes the loss, not the chunk, sets the peak
    assert estimate_memory(model_size="2b", world_size=8).total > estimate_memory(model_size="2b").total
    with pytest.raises(ValueError, match="world_size"):
        TrainingSetup(world_size=0)
    with pytest.raises(ValueError, match="grad_cache_chunk_size must be at least 1"):
        TrainingSetup(grad_cache_chunk_size=0)


def test_on_cuda_the_libraries_workspaces_and_a_margin_are_added(monkeypatch):
    """What a CUDA step holds beyond the count (measured on an H200): a fixed cost, and 2% of what is counted
    for activations and workspace; weights and optimizer states are exact and get nothing."""
    from colqwen3_lib import memory

    estimates = {}
    for label, fixed, margin in (
        ("counted", 0, 0.0),
        ("cuda", memory.CUDA_LIBRARY_BYTES, memory.CUDA_MARGIN),
    ):
        monkeypatch.setattr(memory, "CUDA_LIBRARY_BYTES", fixed)
        monkeypatch.setattr(memory, "CUDA_MARGIN", margin)
        estimates[label] = estimate_memory(model_size="2b", batch_size=16, device="cuda")
    counted, cuda = estimates["counted"], estimates["cuda"]
    assert cuda.peak_phase == counted.peak_phase
    assert (cuda.weights, cuda.trainable) == (counted.weights, counted.trainable)
    added = cuda.total - counted.total
    assert added == 96 * 2**20 + int(0.02 * (counted.activations + counted.workspace))
    assert (
        estimate_memory(model_size="tiny", batch_size=8, max_visual_tokens=256, device="cuda").total
        > 96 * 2**20
    )
