"""Sharded training (`sharding.py`, `configs/fsdp.yaml`), as far as a machine without a GPU can test it.

accelerate shards only on GPUs: launched with the FSDP configuration on the CPU, its processes run plain
data parallelism (asserted below, so that this file says when that changes). What is tested instead, on two
gloo processes: the configuration as `accelerate launch` reads it, the tiny model wrapped by accelerate's own
FSDP2 preparation with that configuration, the gradient cache's step under it against one process holding the
whole batch, and the full weights gathered for saving. The HF Trainer's sharded checkpoints need a GPU.
"""

import os
import socket
import types
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from test_grad_cache import _batch, _largest_difference, _model, _step  # the tiny model and batches

from colqwen3_lib import ColQwen3
from colqwen3_lib.grad_cache import grad_cache_step
from colqwen3_lib.losses import ColbertContrastiveLoss
from colqwen3_lib.sharding import FSDP_ENV, full_state_dict, is_sharded
from colqwen3_lib.training import train

CONFIG = Path(__file__).parent.parent / "configs" / "fsdp.yaml"
ROWS = list(range(8))
CHUNK = 3
LAYER_CLASSES = ("Qwen3VLTextDecoderLayer", "Qwen3VLVisionBlock")  # those configs/fsdp.yaml names


def _launch_env() -> dict[str, str]:
    """The environment `accelerate launch --config_file configs/fsdp.yaml` gives each process."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(CONFIG), "-m", "colqwen3_lib.train"])
    args, _, _ = _validate_launch_command(args)
    return prepare_multi_gpu_env(args)


def test_accelerate_reads_the_configuration_as_fsdp2_of_every_layer(tiny_path):
    from accelerate.utils import FullyShardedDataParallelPlugin
    from transformers.trainer_pt_utils import get_module_class_from_name

    env = _launch_env()
    assert env[FSDP_ENV] == "true" and env["FSDP_VERSION"] == "2"
    assert env["FSDP_STATE_DICT_TYPE"] == "FULL_STATE_DICT"  # checkpoints as single safetensors files
    assert env["FSDP_ACTIVATION_CHECKPOINTING"] == "false"  # the kit's own gradient checkpointing
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    model = ColQwen3.from_pretrained("tiny")
    assert tuple(plugin.transformer_cls_names_to_wrap) == LAYER_CLASSES
    for name in LAYER_CLASSES:  # they exist in ColQwen3
        assert get_module_class_from_name(model, name) is not None, name


def test_the_torch_loop_is_refused_under_fsdp_before_anything_is_written(tmp_path, monkeypatch, small_config):
    monkeypatch.setenv(FSDP_ENV, "true")
    with pytest.raises(ValueError, match="--trainer torch does not run under FSDP.*--trainer hf"):
        train(small_config(tmp_path / "run", trainer="torch"))
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------ two processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fsdp_worker(rank: int, world: int, port: int, peft: bool, env: dict, out_file: Path) -> None:
    """One of two processes: accelerate's state under the FSDP configuration, then accelerate's FSDP2 wrap by hand."""
    from accelerate import Accelerator, PartialState
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    torch.set_num_threads(1)
    os.environ.update(env)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        OMP_NUM_THREADS="1",
    )
    PartialState(cpu=True)  # as training.train starts it without a GPU
    distributed_type = Accelerator().distributed_type.value
    model = _model(peft, 0.0, checkpointing=True)
    stub = types.SimpleNamespace(  # what fsdp2_prepare_model reads of an Accelerator that would run FSDP
        state=types.SimpleNamespace(fsdp_plugin=FullyShardedDataParallelPlugin()),
        mixed_precision="no",
        is_main_process=rank == 0,
        device=torch.device("cpu"),
    )
    model = fsdp2_prepare_model(stub, model)
    from torch.distributed.fsdp import FSDPModule

    layers = [m for m in model.modules() if type(m).__name__.removeprefix("FSDP") in LAYER_CLASSES]
    groups = {
        "layers": len(layers),
        "layers_sharded": sum(isinstance(m, FSDPModule) for m in layers),
        "embeddings_sharded": isinstance(model.get_input_embeddings(), FSDPModule),
    }
    batch = _batch(ROWS[rank * 4 : (rank + 1) * 4], hard_negatives=True)
    loss = grad_cache_step(model, batch, ColbertContrastiveLoss("ce"), CHUNK)
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None}
    state = full_state_dict(model)  # every process gathers; the main one keeps it
    if rank == 0:
        model.save_pretrained(out_file.parent / "saved", state_dict=state)  # as training.py saves
    torch.save(
        {
            "distributed_type": distributed_type,
            "sharded": is_sharded(model),
            "groups": groups,
            "loss": float(loss),
            "grads": grads,
            "state": state,
        },
        out_file,
    )
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("peft", [False, True], ids=["full", "lora"])
def test_the_gradient_cache_under_fsdp2_matches_one_process_and_the_weights_gather(tiny_path, tmp_path, peft):
    """Full fine-tuning (the 8B case) and LoRA, sharded over two gloo processes with 4 rows each."""
    env = {k: v for k, v in _launch_env().items() if k.startswith(("FSDP_", "ACCELERATE_USE_FSDP"))}
    port, ctx = _free_port(), mp.get_context("spawn")
    files = [tmp_path / f"rank{rank}.pt" for rank in range(2)]
    procs = [ctx.Process(target=_fsdp_worker, args=(r, 2, port, peft, env, files[r])) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    ranks = [torch.load(f) for f in files]

    # The limitation: on the CPU, accelerate makes these processes data-parallel, not FSDP.
    assert {r["distributed_type"] for r in ranks} == {"MULTI_CPU"}
    # What accelerate's FSDP2 preparation does with the configuration: every decoder layer and vision block
    # a shard group of its own (the token embeddings too), the rest in the root's.
    for result in ranks:
        assert result["sharded"] and result["groups"] == dict(
            layers=4, layers_sharded=4, embeddings_sharded=True
        )

    model = _model(peft, 0.0, checkpointing=True)
    unsharded_state = {k: v.clone() for k, v in model.state_dict().items()}
    whole_loss, whole = _step(model, _batch(ROWS, hard_negatives=True), ColbertContrastiveLoss("ce"), "whole")
    assert (ranks[0]["loss"] + ranks[1]["loss"]) / 2 == pytest.approx(whole_loss, rel=1e-5)
    for result in ranks:  # FSDP averages the processes' gradients, as DDP does
        assert _largest_difference(result["grads"], whole) < 1e-5

    gathered = ranks[0]["state"]
    assert ranks[1]["state"] is None and gathered.keys() == unsharded_state.keys()
    for key, value in unsharded_state.items():
        assert torch.equal(gathered[key], value), key
    saved = tmp_path / "saved"
    if peft:
        from peft import PeftModel

        base = ColQwen3.from_pretrained("tiny", dtype=torch.float32)
        reloaded = PeftModel.from_pretrained(base, saved)
        expected = {k: v for k, v in unsharded_state.items() if "lora_" in k}
        got = {k: v for k, v in reloaded.state_dict().items() if "lora_" in k}
    else:
        reloaded = ColQwen3.from_pretrained(saved, dtype=torch.float32)
        expected = {k: v for k, v in unsharded_state.items()}
        got = reloaded.state_dict()
    assert expected and expected.keys() <= got.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
