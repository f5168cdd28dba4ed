"""What fine-tuning trains: LoRA on the language model's projections and the head (the reference's), or the
head in full (`modules_to_save`, the kit's opt-in), and the optimizer groups that give the head its own rate."""

import pytest
import torch

from colqwen3_lib.lora import (
    LORA_PROJECTIONS,
    PROJECTION_TARGETS,
    REFERENCE_TARGETS,
    lora_config,
    optimizer_groups,
    prepare_for_training,
)
from colqwen3_lib.model import random_model
from colqwen3_lib.training import build_model, train


def test_lora_config_defaults_alpha_to_the_rank():
    assert (lora_config().r, lora_config().lora_alpha, lora_config().lora_dropout) == (32, 32, 0.1)
    config = lora_config(8, alpha=16, dropout=0.0)
    assert (config.r, config.lora_alpha, config.lora_dropout) == (8, 16, 0.0)
    # colpali-engine's train_colqwen3_model.py, verbatim: the head is a LoRA target, nothing is saved in full
    reference = r"(.*(model)(?!.*visual).*(down_proj|gate_proj|up_proj|k_proj|q_proj|v_proj|o_proj).*$|.*(custom_text_proj).*$)"
    assert (config.target_modules, config.modules_to_save) == (
        reference,
        None,
    ) and REFERENCE_TARGETS == reference
    in_full = lora_config(head_in_full=True)
    assert (in_full.target_modules, in_full.modules_to_save) == (PROJECTION_TARGETS, ["custom_text_proj"])


def test_lora_targets_the_language_model_only(torch_run):
    trainable = [name for name, p in torch_run.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or "custom_text_proj" in n for n in trainable)
    assert not any("visual" in n for n in trainable)
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert any(f"{proj}.lora_A" in n for n in trainable), proj
    assert any("custom_text_proj" in n for n in trainable)


def test_full_fine_tuning_trains_every_weight_and_lora_only_adapters_and_head():
    full = prepare_for_training(random_model("tiny", torch.float32), peft=False, gradient_checkpointing=False)
    assert all(p.requires_grad for p in full.parameters())
    lora = prepare_for_training(random_model("tiny", torch.float32), peft=True, gradient_checkpointing=False)
    trained = {name for name, p in lora.named_parameters() if p.requires_grad}
    n_layers = len(lora.base_model.model.language_model.layers)
    assert len([n for n in trained if "lora_A" in n]) == n_layers * len(LORA_PROJECTIONS) + 1  # + the head's
    assert sorted(n.split("custom_text_proj.")[1] for n in trained if "custom_text_proj" in n) == [
        "lora_A.default.weight",
        "lora_B.default.weight",
    ]
    in_full = prepare_for_training(
        random_model("tiny", torch.float32), peft=True, gradient_checkpointing=False, head_in_full=True
    )
    trained = {name for name, p in in_full.named_parameters() if p.requires_grad}
    assert len([n for n in trained if "lora_A" in n]) == n_layers * len(LORA_PROJECTIONS)
    assert len([n for n in trained if "custom_text_proj" in n]) == 2  # the head's copy: weight and bias


def test_optimizer_groups_put_the_head_at_its_own_rate():
    model = prepare_for_training(random_model("tiny", torch.float32), peft=True, gradient_checkpointing=False)
    trained = [p for p in model.parameters() if p.requires_grad]
    (one,) = optimizer_groups(model, 1e-4)
    assert one["lr"] == 1e-4 and len(one["params"]) == len(trained)
    rest, head = optimizer_groups(model, 1e-4, head_lr=1e-2)
    assert (rest["lr"], head["lr"]) == (1e-4, 1e-2)
    assert len(head["params"]) == 2 and len(rest["params"]) + 2 == len(trained)


@pytest.mark.parametrize("trainer", ["torch", "hf"])
@pytest.mark.parametrize("head_in_full", [False, True])
def test_head_lr_sets_the_heads_step_and_lr_the_lora_layers(tmp_path, trainer, head_in_full, small_config):
    """Adam's first step moves every parameter with a gradient by its learning rate (times the gradient's
    sign). A LoRA pair starts with B = 0, so only B moves (A gets no gradient yet)."""
    from transformers import set_seed

    config = small_config(
        tmp_path / "run",
        trainer=trainer,
        lr=1e-4,
        head_lr=1e-2,
        max_steps=1,
        warmup_steps=0,
        head_in_full=head_in_full,
    )
    set_seed(config.seed)  # the initial weights the run starts from
    start = {k: v.detach().clone() for k, v in build_model(config)[0].named_parameters() if v.requires_grad}
    trained = dict(train(config).model.named_parameters())
    moved = {name: float((trained[name].detach() - before).abs().max()) for name, before in start.items()}
    head = {
        key.split("custom_text_proj.")[1]: step for key, step in moved.items() if "custom_text_proj" in key
    }
    lora = [step for key, step in moved.items() if "lora_" in key and "custom_text_proj" not in key]
    expected = (
        {"modules_to_save.default.weight": 1e-2, "modules_to_save.default.bias": 1e-2}
        if head_in_full
        else {"lora_A.default.weight": 0.0, "lora_B.default.weight": 1e-2}
    )
    assert head == pytest.approx(expected, rel=0.01, abs=1e-9)
    assert max(lora) == pytest.approx(1e-4, rel=0.01)
