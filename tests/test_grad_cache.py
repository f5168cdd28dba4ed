"""The gradient cache (`grad_cache.py`) is exact: one step gives the loss and the gradient of every trained tensor
that the batch gives without it, on one process and on two (DDP, gloo); training with it gives the weights that
training without it gives, with both trainers, and a resume may change the chunk size.

What "without it" means depends on dropout. Dropout masks are drawn per forward pass: the masks drawn for a chunk
of 3 rows are not the rows' masks in a forward of the whole batch. With dropout on, the reference is therefore the
same chunks run forward with autograd kept, from the same random state (what the cache must reproduce when it
re-runs each chunk); with dropout off, it is the plain whole-batch step (`losses.contrastive_loss`). The tiny model
runs in float32; LoRA's B matrices start random (at their zero init, LoRA dropout would change nothing).
"""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from colqwen3_lib import ColQwen3, ColQwen3Processor
from colqwen3_lib import grad_cache as grad_cache_module
from colqwen3_lib.data import ContrastiveCollator, load_pairs
from colqwen3_lib.grad_cache import chunk_rows, chunked_loss, grad_cache_step, split_rows, sync_control
from colqwen3_lib.lora import prepare_for_training
from colqwen3_lib.losses import ColbertContrastiveLoss, contrastive_loss, loss_over_processes, sub_batch
from colqwen3_lib.training import train

CHUNK = 3  # 8 rows: chunks of 3, 3 and 2
TOLERANCE = 1e-5  # largest gradient difference, relative to the largest gradient of the same tensor
DROPOUT = 0.1


# ------------------------------------------------------------------------------------------ helpers


def _batch(rows: list[int], hard_negatives: bool = False, visual_tokens: int = 16) -> dict:
    """Collated synthetic pairs (16 visual tokens); with hard negatives, the pages of rows 100 further on."""
    processor = ColQwen3Processor.from_pretrained("tiny", max_num_visual_tokens=visual_tokens)
    pairs = load_pairs("synthetic", "train")
    items = [pairs[i] for i in rows]
    if hard_negatives:
        for i, item in zip(rows, items):
            item["neg_image"] = pairs[i + 100]["image"]
    return ContrastiveCollator(processor)(items)


def _model(peft: bool, dropout: float, checkpointing: bool) -> torch.nn.Module:
    """The tiny model in float32, prepared as training prepares it, with dropout `dropout` where it trains.

    LoRA: LoRA dropout, and B matrices drawn at random. Full fine-tuning: the text attention's dropout
    (Qwen3-VL's attention_dropout, 0 in its config).
    """
    torch.manual_seed(0)  # the same new head in every process
    model = ColQwen3.from_pretrained("tiny", dtype=torch.float32)
    model = prepare_for_training(model, peft, checkpointing, lora_rank=8, lora_dropout=dropout)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(0.05 * torch.randn(parameter.shape, generator=generator))
    if not peft:
        for module in model.modules():
            if type(module).__name__ == "Qwen3VLTextAttention":
                module.attention_dropout = dropout
    return model


def _set_dropout(model: torch.nn.Module, p: float) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = p
        if type(module).__name__ == "Qwen3VLTextAttention":
            module.attention_dropout = p


def _same_chunks_with_autograd(model, batch: dict, loss_fn, chunk_size: int) -> torch.Tensor:
    """The reference with dropout on: every chunk forward with autograd kept, in the cache's order, one backward."""
    embeddings = {
        prefix: torch.cat(
            [model(**c) for c in split_rows(sub_batch(batch, prefix), chunk_rows(batch, prefix, chunk_size))]
        )
        for prefix in ("query_", "doc_", "neg_doc_")
        if f"{prefix}input_ids" in batch
    }
    loss = loss_over_processes(loss_fn, embeddings["query_"], embeddings["doc_"], embeddings.get("neg_doc_"))
    loss.backward()
    return loss.detach()


def _take_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def _largest_difference(got: dict, expected: dict) -> float:
    """max over tensors of max|got - expected| / max|expected|; the same tensors must have gradients."""
    assert got.keys() == expected.keys()
    return max(
        float((got[k] - expected[k]).abs().max() / expected[k].abs().max().clamp(min=1e-30)) for k in got
    )


def _step(model, batch, loss_fn, how: str, seed: int = 7, no_sync=None):
    torch.manual_seed(seed)
    if how == "cache":
        loss = grad_cache_step(model, batch, loss_fn, CHUNK, no_sync=no_sync)
    elif how == "chunks":
        loss = _same_chunks_with_autograd(model, batch, loss_fn, CHUNK)
    else:
        loss = contrastive_loss(model, batch, loss_fn)
        loss.backward()
    return float(loss.detach()), _take_grads(_unwrap(model))


def _unwrap(model):
    return getattr(model, "module", model)


CASES = {  # (peft, loss, hard negatives, gradient checkpointing)
    "lora-ce-checkpointing": (True, "ce", False, True),
    "lora-pairwise-hard-negatives": (True, "pairwise", True, False),
    "full-ce-hard-negatives-checkpointing": (False, "ce", True, True),
    "full-pairwise": (False, "pairwise", False, False),
}


# -------------------------------------------------------------------------------------- one process


def test_split_rows_keeps_every_tensor_and_its_padding(tiny_path):
    batch = sub_batch(_batch(list(range(8))), "doc_")
    chunks = split_rows(batch, CHUNK)
    assert [c["input_ids"].shape[0] for c in chunks] == [3, 3, 2]
    for key, value in batch.items():
        torch.testing.assert_close(torch.cat([c[key] for c in chunks]), value, rtol=0, atol=0)
    concatenated = dict(batch, pixel_values=torch.cat(list(batch["pixel_values"])))  # (all patches, pixels)
    with pytest.raises(ValueError, match="pixel_values has shape .* pad pixel_values per page"):
        split_rows(concatenated, CHUNK)
    with pytest.raises(ValueError, match="at least 1"):
        split_rows(batch, 0)


@pytest.mark.parametrize("case", sorted(CASES))
def test_with_dropout_one_step_equals_the_same_chunks_run_with_autograd(tiny_path, case):
    peft, loss, hard, checkpointing = CASES[case]
    model = _model(peft, DROPOUT, checkpointing)
    batch, loss_fn = _batch(list(range(8)), hard), ColbertContrastiveLoss(loss)
    cached_loss, cached = _step(model, batch, loss_fn, "cache")
    reference_loss, reference = _step(model, batch, loss_fn, "chunks")
    assert cached_loss == pytest.approx(reference_loss, rel=1e-6)
    assert _largest_difference(cached, reference) < TOLERANCE
    assert set(cached) == {n for n, p in model.named_parameters() if p.requires_grad}
    # Dropout was on: other random draws give another gradient.
    _, other_draws = _step(model, batch, loss_fn, "chunks", seed=8)
    assert _largest_difference(other_draws, reference) > 1e-3


@pytest.mark.parametrize("case", sorted(CASES))
def test_without_dropout_one_step_equals_the_whole_batch_at_once(tiny_path, case):
    peft, loss, hard, checkpointing = CASES[case]
    model = _model(peft, 0.0, checkpointing)
    batch, loss_fn = _batch(list(range(8)), hard), ColbertContrastiveLoss(loss)
    cached_loss, cached = _step(model, batch, loss_fn, "cache")
    whole_loss, whole = _step(model, batch, loss_fn, "whole")
    assert cached_loss == pytest.approx(whole_loss, rel=1e-6)
    assert _largest_difference(cached, whole) < TOLERANCE


def test_queries_go_as_many_at_a_time_as_hold_a_page_chunks_tokens(tiny_path):
    """8 queries of 20 tokens against pages of 77: a chunk of 3 pages holds 231 tokens, so all 8 queries (160
    tokens) make one chunk: two forward passes of queries per step, not six; the gradient is the same."""
    model = _model(True, 0.0, False)
    batch, loss_fn = _batch(list(range(8)), visual_tokens=64), ColbertContrastiveLoss("ce")
    assert (batch["query_input_ids"].shape[1], batch["doc_input_ids"].shape[1]) == (20, 77)
    calls = []
    forward = model.forward
    model.forward = lambda **kw: calls.append("page" if "pixel_values" in kw else "query") or forward(**kw)
    _, cached = _step(model, batch, loss_fn, "cache")
    assert calls.count("query") == 2 and calls.count("page") == 2 * 3
    model.forward = forward
    _, whole = _step(model, batch, loss_fn, "whole")
    assert _largest_difference(cached, whole) < TOLERANCE


@pytest.mark.parametrize("peft", [True, False], ids=["lora", "full"])
def test_a_frozen_vision_tower_runs_once_per_page_chunk_and_the_gradient_stays_exact(tiny_path, peft):
    """Under LoRA nothing in the vision tower trains: the re-run takes its outputs from the graph-free pass
    (one vision forward per page chunk, not two). Under full fine-tuning it trains and runs again."""
    model = _model(peft, DROPOUT, False)
    batch, loss_fn = _batch(list(range(8)), hard_negatives=True), ColbertContrastiveLoss("ce")
    backbone = grad_cache_module.frozen_vision_backbone(model)
    assert (backbone is not None) == peft
    visual = next(m for m in model.modules() if hasattr(m, "get_image_features")).visual
    calls = []
    hook = visual.register_forward_hook(lambda *_: calls.append(1))
    _, cached = _step(model, batch, loss_fn, "cache")
    hook.remove()
    page_chunks = 2 * 3  # pages and hard negatives, 8 rows each in chunks of 3
    assert len(calls) == page_chunks * (1 if peft else 2)
    _, reference = _step(model, batch, loss_fn, "chunks")
    assert _largest_difference(cached, reference) < TOLERANCE
    assert "get_image_features" not in vars(backbone or visual)  # the model is left as it was


def test_restoring_the_random_state_is_what_makes_dropout_match(tiny_path, monkeypatch):
    model = _model(True, DROPOUT, True)
    batch, loss_fn = _batch(list(range(8))), ColbertContrastiveLoss("ce")
    _, reference = _step(model, batch, loss_fn, "chunks")
    after_reference = torch.get_rng_state()
    _, cached = _step(model, batch, loss_fn, "cache")
    assert torch.equal(torch.get_rng_state(), after_reference)  # the next step draws what it would without it
    monkeypatch.setattr(grad_cache_module.RandomState, "restore", lambda self: None)
    _, unrestored = _step(model, batch, loss_fn, "cache")
    assert _largest_difference(cached, reference) < TOLERANCE
    assert _largest_difference(unrestored, reference) > 1e-3


def test_the_loss_is_checked_before_any_gradient_is_computed(tiny_path):
    model = _model(True, DROPOUT, False)

    def refuse(loss):
        raise FloatingPointError(f"loss {float(loss.detach())}")

    with pytest.raises(FloatingPointError, match="loss"):
        grad_cache_step(model, _batch(list(range(8))), ColbertContrastiveLoss("ce"), CHUNK, check_loss=refuse)
    assert all(p.grad is None for p in model.parameters())


def test_evaluation_in_chunks_gives_the_whole_batch_loss(tiny_path):
    model = _model(True, 0.0, False).eval()
    batch, loss_fn = _batch(list(range(8)), hard_negatives=True), ColbertContrastiveLoss("ce")
    with torch.no_grad():
        whole = contrastive_loss(model, batch, loss_fn)
    assert float(chunked_loss(model, batch, loss_fn, CHUNK)) == pytest.approx(float(whole), rel=1e-6)


def test_deepspeed_is_refused_with_what_to_use_instead():
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    deepspeed = SimpleNamespace(distributed_type=DistributedType.DEEPSPEED)
    with pytest.raises(ValueError, match="does not run under DeepSpeed.*configs/fsdp.yaml"):
        sync_control(deepspeed, torch.nn.Linear(2, 2))
    assert sync_control(SimpleNamespace(distributed_type=DistributedType.NO), torch.nn.Linear(2, 2)) is None


# ------------------------------------------------------------------------------------ two processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


ROWS = list(range(8))


def _ddp_worker(rank: int, world: int, port: int, peft: bool, out_file: Path) -> None:
    """One of two DDP processes, each with 4 of the 8 rows: the cache's step with dropout on and off."""
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    model = _model(peft, DROPOUT, checkpointing=True)
    ddp = DistributedDataParallel(model)
    batch, loss_fn = (
        _batch(ROWS[rank * 4 : (rank + 1) * 4], hard_negatives=True),
        ColbertContrastiveLoss("ce"),
    )
    results = {
        "cache": _step(ddp, batch, loss_fn, "cache", seed=10 + rank, no_sync=ddp.no_sync),
        "chunks": _step(ddp, batch, loss_fn, "chunks", seed=10 + rank),
    }
    _set_dropout(model, 0.0)
    results["cache_without_dropout"] = _step(ddp, batch, loss_fn, "cache", no_sync=ddp.no_sync)
    torch.save(results, out_file)
    torch.distributed.destroy_process_group()


def _run_two(tmp_path: Path, target, *args) -> list[dict]:
    port, ctx = _free_port(), mp.get_context("spawn")
    files = [tmp_path / f"rank{rank}.pt" for rank in range(2)]
    procs = [ctx.Process(target=target, args=(rank, 2, port, *args, files[rank])) for rank in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return [torch.load(f) for f in files]


@pytest.mark.parametrize("peft", [True, False], ids=["lora", "full"])
def test_two_processes_with_the_cache_match_one_process_holding_the_whole_batch(tiny_path, tmp_path, peft):
    """DDP over gloo, 4 rows per process, chunks of 3 (3 + 1), pages gathered across processes.

    Dropout on: each process's step equals the same chunks run with autograd under DDP. Dropout off: the
    gradient DDP averages equals that of one process running all 8 rows at once without the cache. With
    full fine-tuning the vision tower is trained too: the one backward that syncs must reach it.
    """
    ranks = _run_two(tmp_path, _ddp_worker, peft)
    model = _model(peft, 0.0, checkpointing=True)
    whole_loss, whole = _step(model, _batch(ROWS, hard_negatives=True), ColbertContrastiveLoss("ce"), "whole")
    for result in ranks:
        (cached_loss, cached), (reference_loss, reference) = result["cache"], result["chunks"]
        assert cached_loss == pytest.approx(reference_loss, rel=1e-6)
        assert _largest_difference(cached, reference) < TOLERANCE
        assert _largest_difference(result["cache_without_dropout"][1], whole) < TOLERANCE
    # Each process's loss is the mean over its own queries, against all 8 pages.
    losses = [result["cache_without_dropout"][0] for result in ranks]
    assert sum(losses) / 2 == pytest.approx(whole_loss, rel=1e-5)
    assert losses[0] != pytest.approx(losses[1], rel=1e-3)


# ------------------------------------------------------------------------------------------ training


def _adapter(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "adapter_model.safetensors")


@pytest.mark.parametrize("trainer", ["hf", "torch"])
def test_training_with_the_cache_gives_the_weights_of_training_without(tmp_path, small_config, trainer):
    """3 steps of 4 pages x 2 accumulation steps, with an evaluation: the cache changes nothing but memory.

    At the reference's learning rate (2e-4): AdamW divides each gradient by its running size, so at a high
    rate float rounding in the near-zero gradients of the first steps shows in the weights.
    """
    settings = dict(
        trainer=trainer,
        lora_dropout=0.0,
        lr=2e-4,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_steps=3,
        save_steps=10,
        eval_dataset="synthetic",
        eval_steps=3,
        per_device_eval_batch_size=8,
    )
    plain = train(small_config(tmp_path / "plain", **settings))
    cached = train(small_config(tmp_path / "cached", grad_cache_chunk_size=CHUNK, **settings))
    assert [e["loss"] for e in cached.metrics["train"]] == pytest.approx(
        [e["loss"] for e in plain.metrics["train"]], rel=1e-5
    )
    assert cached.metrics["eval"][0]["eval_loss"] == pytest.approx(
        plain.metrics["eval"][0]["eval_loss"], rel=1e-5
    )
    expected, got = _adapter(tmp_path / "plain"), _adapter(tmp_path / "cached")
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-5, rtol=1e-4, msg=key)
    recorded = json.loads((tmp_path / "cached" / "training_config.json").read_text())
    assert recorded["grad_cache_chunk_size"] == CHUNK


@pytest.mark.parametrize("trainer", ["hf", "torch"])
def test_a_resume_may_change_the_chunk_size_and_continues_to_the_same_weights(
    tmp_path, small_config, trainer
):
    settings = dict(trainer=trainer, lora_dropout=0.0, lr=2e-4, max_steps=4, save_steps=2)
    train(small_config(tmp_path / "whole", grad_cache_chunk_size=CHUNK, **settings))
    run = tmp_path / "interrupted"

    def stop_after_the_first_checkpoint(step, checkpoint):
        if checkpoint is not None:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(
            small_config(run, grad_cache_chunk_size=CHUNK, **settings), hook=stop_after_the_first_checkpoint
        )
    train(small_config(run, grad_cache_chunk_size=2, resume_from_checkpoint="latest", **settings))
    history = json.loads((run / "run_history.json").read_text())
    assert history[-1]["changed"]["grad_cache_chunk_size"] == [CHUNK, 2]
    expected, got = _adapter(tmp_path / "whole"), _adapter(run)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-5, rtol=1e-4, msg=key)


@pytest.mark.skipif(
    shutil.which("accelerate", path=str(Path(sys.executable).parent)) is None, reason="no accelerate"
)
@pytest.mark.parametrize("trainer", ["hf", "torch"])
def test_accelerate_launch_with_the_cache_trains_as_without(tmp_path, trainer):
    """`accelerate launch` with two gloo processes (DDP), 4 pages each, 2 accumulation steps, LoRA dropout on.

    One chunk per process's batch: its dropout masks are those of the step without the cache, so the two runs
    must end on the same adapter, through each trainer's own step, loss scaling and `no_sync`.
    """
    accelerate = str(Path(sys.executable).parent / "accelerate")
    launch = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    launch += ["--mixed_precision", "no", "--dynamo_backend", "no", "-m", "colqwen3_lib.train"]
    run = ["--base-model-path", "tiny", "--peft", "--trainer", trainer, "--max-visual-tokens", "16"]
    run += ["--per-device-train-batch-size", "4", "--gradient-accumulation-steps", "2", "--max-steps", "3"]
    run += ["--save-steps", "10", "--warmup-steps", "1", "--eval-dataset", "none", "--num-threads", "1"]
    run += ["--lr", "2e-4"]  # the reference's: at the tiny run's 5e-3 AdamW magnifies float rounding (above)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    for name, extra in (("plain", []), ("cached", ["--grad-cache-chunk-size", "4"])):
        command = [*launch, "--output-dir", str(tmp_path / name), *run, *extra]
        done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
    recorded = json.loads((tmp_path / "cached" / "training_config.json").read_text())
    assert recorded["world_size"] == 2 and recorded["grad_cache_chunk_size"] == 4
    losses = [
        [e["loss"] for e in json.loads((tmp_path / n / "metrics.json").read_text())["train"]]
        for n in ("plain", "cached")
    ]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    expected, got = _adapter(tmp_path / "plain"), _adapter(tmp_path / "cached")
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-6, rtol=1e-5, msg=key)


def test_the_chunk_size_is_a_checked_setting_that_a_resume_may_change(tmp_path):
    from colqwen3_lib.config import TrainConfig
    from colqwen3_lib.runs import MUST_MATCH
    from colqwen3_lib.train import config_from_args

    config = config_from_args(["--output-dir", str(tmp_path), "--grad-cache-chunk-size", "8"])
    assert config.grad_cache_chunk_size == 8 and config.memory_setup().grad_cache_chunk_size == 8
    assert config_from_args(["--output-dir", str(tmp_path)]).grad_cache_chunk_size is None  # off by default
    with pytest.raises(ValueError, match="--grad-cache-chunk-size must be at least 1, got 0"):
        TrainConfig(output_dir=str(tmp_path), grad_cache_chunk_size=0)
    assert "grad_cache_chunk_size" not in MUST_MATCH  # it does not change what is trained


def test_auto_batch_size_halves_the_chunk_and_keeps_the_batch(tmp_path, monkeypatch, small_config, caplog):
    """With the cache on, an out-of-memory error shrinks the chunk: the batch, and its negatives, stay."""
    from colqwen3_lib import loop
    from colqwen3_lib.oom import TrainingOutOfMemoryError

    real = loop.grad_cache_step

    def out_of_memory_above_2(model, inputs, loss_fn, chunk_size, *args, **kwargs):
        if chunk_size > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return real(model, inputs, loss_fn, chunk_size, *args, **kwargs)

    monkeypatch.setattr(loop, "grad_cache_step", out_of_memory_above_2)
    settings = dict(trainer="torch", grad_cache_chunk_size=8, max_steps=2)
    with pytest.raises(TrainingOutOfMemoryError, match="Try, in this order: --grad-cache-chunk-size 4 "):
        train(small_config(tmp_path / "plain", **settings))
    with caplog.at_level("WARNING", logger="colqwen3_lib.oom"):
        train(small_config(tmp_path / "auto", auto_batch_size=True, **settings))
    assert "out of memory at gradient-cache chunk size 8; retrying with 4" in caplog.text
    saved = json.loads((tmp_path / "auto" / "training_config.json").read_text())
    assert (saved["grad_cache_chunk_size"], saved["per_device_train_batch_size"]) == (2, 8)
    assert saved["gradient_accumulation_steps"] == 1
