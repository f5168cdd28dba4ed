"""Training: collation, both trainers, resuming, reloading the adapter, out-of-memory handling,
multi-process in-batch negatives, and (slow) that the tiny model learns the synthetic pages."""

import io
import json
import os
import socket
import statistics
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from colqwen3_lib import training
from colqwen3_lib.training import (
    NO_EVAL,
    ContrastiveCollator,
    TrainingOutOfMemoryError,
    default_config,
    load_pairs,
    oom_advice,
    train,
)


def small_config(output_dir, **overrides):
    """The tiny run, shrunk to test speed: 8 pairs per step, 16 visual tokens, a few steps."""
    settings = dict(
        peft=True,
        per_device_train_batch_size=8,
        max_visual_tokens=16,
        max_steps=4,
        save_steps=2,
        warmup_steps=1,
        eval_dataset=NO_EVAL,
    )
    return default_config(output_dir, "tiny", **{**settings, **overrides})


def _adapter(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "adapter_model.safetensors")


def _assert_same_weights(a: dict, b: dict, atol=1e-5):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=1e-4, msg=key)


# ---------------------------------------------------------------------------------------------- data


def test_cached_collation_equals_the_processor():
    pairs = load_pairs("synthetic", "train")
    config = small_config("unused")
    _, processor = training.build_model(config)
    cached = ContrastiveCollator(processor, cache_pages=True)
    plain = ContrastiveCollator(processor)
    for rows in ([0, 1, 2, 3], [2, 5, 0, 7]):  # the second batch reuses cached pages next to new ones
        batch = [pairs[i] for i in rows]
        got, expected = cached(batch), plain(batch)
        assert got.keys() == expected.keys()
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], msg=key)


def _write_dataset(path: Path, images: list, queries: list, columns=("query", "image")) -> str:
    from datasets import Dataset, DatasetDict, Features, Image, Value

    rows = {"query": queries, "image": images}
    features = Features({"query": Value("string"), "image": Image()})
    split = Dataset.from_dict(
        {k: rows[k] for k in columns}, features=Features({k: features[k] for k in columns})
    )
    DatasetDict(train=split).save_to_disk(str(path))
    return str(path)


def _png(colour) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (64, 64), colour).save(out, format="PNG")
    return out.getvalue()


def test_a_missing_column_says_what_to_change(tmp_path):
    path = _write_dataset(
        tmp_path / "d", [{"bytes": _png("red"), "path": None}] * 2, ["a", "b"], columns=("image",)
    )
    with pytest.raises(
        ValueError, match=r"no 'query' column.*rename the columns or pass another --train-dataset"
    ):
        train(small_config(tmp_path / "out", train_dataset=path))


def test_an_unreadable_image_names_its_row(tmp_path):
    images = [{"bytes": _png(c), "path": None} for c in ("red", "blue", "green", "navy")]
    images[2] = {"bytes": b"not an image at all", "path": None}
    path = _write_dataset(tmp_path / "d", images, ["red page", "blue page", "green page", "navy page"])
    config = small_config(tmp_path / "out", train_dataset=path, per_device_train_batch_size=4, max_steps=1)
    with pytest.raises(ValueError, match=r"row 2: the image could not be decoded .*fix or remove that row"):
        train(config)


def test_a_batch_larger_than_the_data_says_what_fits(tmp_path):
    config = small_config(tmp_path / "out", per_device_train_batch_size=1000)
    with pytest.raises(ValueError, match=r"256 query-page pairs.*--per-device-train-batch-size 256 or less"):
        train(config)
    with pytest.raises(ValueError, match="at least 2 pages per step"):
        train(small_config(tmp_path / "out2", per_device_train_batch_size=1))


def test_a_non_empty_output_dir_is_never_overwritten(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="never overwritten.*--resume-from-checkpoint latest"):
        train(small_config(tmp_path))
    assert (tmp_path / "notes.txt").read_text() == "keep me"


# ------------------------------------------------------------------------------------------ trainers


@pytest.mark.parametrize("trainer", ["torch", "hf"])
def test_head_lr_sets_the_heads_step_and_lr_the_lora_layers(tmp_path, trainer):
    """Adam's first step moves every parameter by its learning rate (times the sign of its gradient)."""
    from transformers import set_seed

    config = small_config(
        tmp_path / "run", trainer=trainer, lr=1e-4, head_lr=1e-2, max_steps=1, warmup_steps=0
    )
    set_seed(config.seed)  # the initial weights the run starts from
    start = {
        k: v.detach().clone()
        for k, v in training.build_model(config)[0].named_parameters()
        if v.requires_grad
    }
    trained = dict(train(config).model.named_parameters())
    moved = {name: float((trained[name].detach() - before).abs().max()) for name, before in start.items()}
    head = [step for key, step in moved.items() if "custom_text_proj" in key]
    lora = [step for key, step in moved.items() if "lora_" in key]
    assert len(head) == 2 and len(lora) > 0
    assert head == pytest.approx([1e-2] * 2, rel=0.01)
    assert max(lora) == pytest.approx(1e-4, rel=0.01)


@pytest.fixture(scope="module")
def torch_run(tmp_path_factory):
    """An uninterrupted 4-step LoRA run of the torch loop (checkpoints at 2 and 4 would be kept)."""
    return train(small_config(tmp_path_factory.mktemp("torch-run"), trainer="torch"))


def test_the_two_trainers_train_the_same(tmp_path):
    logged = {"hf": [], "torch": []}
    results = {
        name: train(
            small_config(tmp_path / name, trainer=name, lora_dropout=0.0, max_steps=3, save_steps=10),
            on_log=logged[name].append,
        )
        for name in ("hf", "torch")
    }
    for name, result in results.items():  # the live log (for loss curves) is what metrics.json records
        assert [e["step"] for e in logged[name]] == [1, 2, 3]
        assert [e["loss"] for e in logged[name]] == pytest.approx(
            [e["loss"] for e in result.metrics["train"]]
        )
    hf_losses = [e["loss"] for e in results["hf"].metrics["train"]]
    torch_losses = [e["loss"] for e in results["torch"].metrics["train"]]
    assert len(hf_losses) == len(torch_losses) == 3
    assert hf_losses == pytest.approx(torch_losses, rel=1e-3)
    _assert_same_weights(_adapter(tmp_path / "hf"), _adapter(tmp_path / "torch"), atol=1e-4)


def test_outputs_are_written(torch_run):
    out = torch_run.output_dir
    for name in (
        "adapter_model.safetensors",
        "adapter_config.json",
        "processor_config.json",
        "tokenizer.json",
    ):
        assert (out / name).exists(), name
    config = json.loads((out / "training_config.json").read_text())
    assert (
        config["peft"] is True and config["max_visual_tokens"] == 16 and config["effective_batch_size"] == 8
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert [e["step"] for e in metrics["train"]] == [1, 2, 3, 4]
    assert all(e["loss"] > 0 for e in metrics["train"])
    assert metrics["summary"]["steps_per_second"] > 0
    lora = json.loads((out / "adapter_config.json").read_text())
    assert (lora["r"], lora["lora_alpha"], lora["lora_dropout"], lora["init_lora_weights"]) == (
        32,
        32,
        0.1,
        "gaussian",
    )
    assert lora["modules_to_save"] == ["custom_text_proj"]


def test_lora_targets_the_language_model_only(torch_run):
    trainable = [name for name, p in torch_run.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or "custom_text_proj" in n for n in trainable)
    assert not any("visual" in n for n in trainable)
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert any(f"{proj}.lora_A" in n for n in trainable), proj
    assert any("custom_text_proj" in n for n in trainable)


@pytest.mark.parametrize("trainer", ["torch", "hf"])
def test_resume_after_an_interruption_reaches_the_same_weights(tmp_path, torch_run, trainer):
    if trainer == "torch":
        reference = _adapter(torch_run.output_dir)
    else:
        reference = _adapter(train(small_config(tmp_path / "reference", trainer="hf")).output_dir)

    def interrupt(step, checkpoint):
        if checkpoint is not None and step == 2:
            raise KeyboardInterrupt  # as Ctrl-C right after the checkpoint at step 2

    out = tmp_path / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        train(small_config(out, trainer=trainer), hook=interrupt)
    assert training.latest_checkpoint(out) == out / "checkpoint-2"
    assert not (out / "adapter_model.safetensors").exists()  # no final model from an interrupted run
    result = train(small_config(out, trainer=trainer, resume_from_checkpoint="latest"))
    _assert_same_weights(_adapter(out), reference)
    assert result.metrics["summary"]["global_step"] == 4
    assert [e["step"] for e in result.metrics["train"]] == [
        1,
        2,
        3,
        4,
    ]  # the resumed run keeps the earlier log


def test_a_trained_adapter_reloads_with_the_same_embeddings(torch_run):
    from peft import PeftModel

    from colqwen3_lib import ColQwen3

    pages = [
        row["image"] for row in load_pairs("synthetic", "train").dataset.cast_column("image", _decoded())
    ][:3]
    batch_pages = torch_run.processor.process_images(pages)
    batch_queries = torch_run.processor.process_queries(["a red bar chart", "blue table"])
    with torch.no_grad():
        expected = [torch_run.model(**batch_pages), torch_run.model(**batch_queries)]
        reloaded = PeftModel.from_pretrained(ColQwen3.from_pretrained("tiny"), torch_run.output_dir).eval()
        got = [reloaded(**batch_pages), reloaded(**batch_queries)]
        merged = reloaded.merge_and_unload()
        got_merged = [merged(**batch_pages), merged(**batch_queries)]
    for e, g, m in zip(expected, got, got_merged):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(m, e, atol=1e-4, rtol=1e-3)


def _decoded():
    from datasets import Image

    return Image(decode=True)


def test_full_fine_tuning_saves_a_model_that_reloads(tmp_path):
    from colqwen3_lib import ColQwen3

    result = train(small_config(tmp_path, peft=False, max_steps=1, trainer="torch", lr=1e-3))
    trainable = sum(p.numel() for p in result.model.parameters() if p.requires_grad)
    assert trainable == sum(p.numel() for p in result.model.parameters())
    batch = result.processor.process_queries(["a red bar chart"])
    with torch.no_grad():
        torch.testing.assert_close(ColQwen3.from_pretrained(tmp_path).eval()(**batch), result.model(**batch))


# ------------------------------------------------------------------------------------- out of memory


def _oom_when(condition):
    """A `contrastive_loss` that raises CUDA's out-of-memory error whenever condition(inputs, model) holds."""
    real = training.contrastive_loss

    def patched(model, inputs, loss_fn):
        if condition(inputs, model):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return real(model, inputs, loss_fn)

    return patched


def test_out_of_memory_mid_run_explains_what_to_try_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    steps = []
    monkeypatch.setattr(training, "contrastive_loss", _oom_when(lambda inputs, model: len(steps) >= 2))
    config = small_config(tmp_path, peft=False, trainer="torch", lr=1e-4, max_steps=4)
    with pytest.raises(TrainingOutOfMemoryError) as caught:
        train(config, hook=lambda step, checkpoint: steps.append(step) if checkpoint is None else None)
    message = str(caught.value)
    assert "--per-device-train-batch-size 8 " in message and "--max-visual-tokens 16" in message
    assert "gradient checkpointing off" in message and "full fine-tuning" in message
    assert "--per-device-train-batch-size 4 --gradient-accumulation-steps 2" in message
    assert "--peft" in message and "drop --no-gradient-checkpointing" in message
    checkpoint = tmp_path / "checkpoint-2"
    assert f"--resume-from-checkpoint {checkpoint}" in message
    assert training.latest_checkpoint(tmp_path) == checkpoint
    assert load_file(checkpoint / "model.safetensors")  # intact: it loads


def test_out_of_memory_advice_for_the_reference_settings(tmp_path):
    message = oom_advice(default_config(tmp_path))
    assert "--per-device-train-batch-size 64" in message and "--max-visual-tokens 768" in message
    assert "gradient checkpointing on" in message
    assert "--per-device-train-batch-size 32 --gradient-accumulation-steps 2" in message
    assert "--max-visual-tokens 512" in message and "--peft" in message
    assert "No checkpoint was written yet" in message


def test_auto_batch_size_halves_the_batch_until_it_fits(tmp_path, monkeypatch):
    too_big = _oom_when(lambda inputs, model: inputs["doc_input_ids"].shape[0] > 4)
    monkeypatch.setattr(training, "contrastive_loss", too_big)
    with pytest.raises(TrainingOutOfMemoryError, match="--auto-batch-size"):
        train(small_config(tmp_path / "plain", per_device_train_batch_size=16, max_steps=2, trainer="torch"))
    result = train(
        small_config(
            tmp_path / "auto",
            per_device_train_batch_size=16,
            max_steps=2,
            auto_batch_size=True,
            trainer="torch",
        )
    )
    summary = result.metrics["summary"]
    assert (summary["per_device_train_batch_size"], summary["gradient_accumulation_steps"]) == (4, 4)
    assert summary["global_step"] == 2
    saved = json.loads((tmp_path / "auto" / "training_config.json").read_text())
    assert saved["effective_batch_size"] == 16 and saved["per_device_train_batch_size"] == 4


# ---------------------------------------------------------------------------------------- multi-process


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _embed_and_backprop(rank, world, rows, out_file, port):
    """One process: its share of the global batch; pages gathered across processes; loss and grads saved."""
    torch.set_num_threads(1)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    from colqwen3_lib import ColQwen3, ColQwen3Processor
    from colqwen3_lib.losses import ColbertContrastiveLoss

    torch.manual_seed(0)  # the same newly initialised head in every process
    model = ColQwen3.from_pretrained(
        "tiny"
    ).eval()  # eval: no dropout, so processes compute the same function
    processor = ColQwen3Processor.from_pretrained("tiny", max_num_visual_tokens=16)
    pairs = load_pairs("synthetic", "train")
    local = rows[rank * len(rows) // world : (rank + 1) * len(rows) // world]
    batch = ContrastiveCollator(processor)([pairs[i] for i in local])
    loss = training.contrastive_loss(model, batch, ColbertContrastiveLoss("ce"))
    loss.backward()
    names = (
        "custom_text_proj.weight",
        "language_model.layers.1.mlp.up_proj.weight",
        "visual.blocks.0.attn.qkv.weight",
    )
    grads = {n: p.grad for n, p in model.named_parameters() if n in names}
    torch.save(
        {"loss": loss.detach(), "grads": grads, "page_tokens": batch["doc_input_ids"].shape[1]}, out_file
    )
    if world > 1:
        torch.distributed.destroy_process_group()


def _short_then_long_rows(n: int) -> list[int]:
    """n rows: the first half the pages with fewest visual tokens, the second with most, so that the
    two processes' pages differ in length."""
    from colqwen3_lib import ColQwen3Processor

    processor = ColQwen3Processor.from_pretrained("tiny", max_num_visual_tokens=16)
    pairs = load_pairs("synthetic", "train")
    images = pairs.dataset.cast_column("image", _decoded())["image"][:64]
    tokens = [int(torch.tensor(processor.get_n_patches(im.size, 2)).prod()) for im in images]
    order = sorted(range(len(images)), key=lambda i: tokens[i])
    return order[: n // 2] + order[-(n // 2) :]


def _run_two_processes(tmp_path, rows):
    port = _free_port()
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(target=_embed_and_backprop, args=(rank, 2, rows, tmp_path / f"rank{rank}.pt", port))
        for rank in range(2)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]


def test_two_processes_see_each_others_pages_and_match_one_process(tmp_path):
    """Two gloo processes, 4 pairs each: the loss and the gradients equal one process's on all 8."""
    rows = _short_then_long_rows(8)
    _embed_and_backprop(0, 1, rows, tmp_path / "single.pt", 0)
    single = torch.load(tmp_path / "single.pt")
    ranks = _run_two_processes(tmp_path, rows)
    assert ranks[0]["page_tokens"] != ranks[1]["page_tokens"]  # the gather had to pad
    # Each process's loss is the mean over its own queries, against all 8 pages.
    assert float((ranks[0]["loss"] + ranks[1]["loss"]) / 2) == pytest.approx(float(single["loss"]), rel=1e-5)
    assert float(ranks[0]["loss"]) != pytest.approx(float(ranks[1]["loss"]), rel=1e-3)
    # DDP averages the processes' gradients: that average is the single-process gradient.
    for name, grad in single["grads"].items():
        averaged = (ranks[0]["grads"][name] + ranks[1]["grads"][name]) / 2
        torch.testing.assert_close(averaged, grad, atol=1e-6, rtol=1e-4, msg=name)


# ------------------------------------------------------------------------------------------- learning


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["ce", "pairwise"])
def test_the_tiny_model_learns_the_synthetic_pages(tmp_path, loss):
    """Held-out NDCG@5 from near chance to >= 0.8 with the tiny defaults (about 1 and 3 CPU minutes).

    Each loss with its own tiny defaults: pairwise takes 8 pages per step and a faster head
    (`TINY_PAIRWISE_DEFAULTS`), without which its hardest negative collapses the random tiny model.
    """
    from transformers import set_seed

    from colqwen3_lib.data import SYNTHETIC_TASKS, load_split

    config = default_config(tmp_path, "tiny", loss=loss, peft=True, trainer="torch")

    def ndcg(model, processor):
        tasks = [load_split(task, "test") for task in SYNTHETIC_TASKS]
        return statistics.mean(training.retrieval_ndcg(model, processor, task) for task in tasks)

    torch.set_num_threads(1)
    set_seed(config.seed)
    before = ndcg(*training.build_model(config))
    result = train(config)
    after = ndcg(result.model, result.processor)
    assert before < 0.3
    assert after >= 0.8  # the time it takes is measured by benchmarks/bench_training.py, not here
