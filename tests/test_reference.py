"""The kit against the reference itself: colpali-engine 0.3.18, installed without its dependencies into the
kit's cache (`<cache>/peers/`) the first time, and imported from there.

Compared on the tiny checkpoint: the processors' outputs (pages of several sizes and modes, queries), the
embeddings both ways at colpali-engine's 320 dims (full checkpoints and LoRA adapters), the losses, the
LoRA targets, and the training arguments of the reference script. Where the kit deliberately differs
(transparent and 16-bit pages, visual-token caps under the checkpoint's minimum, zero padding that can win
a max), the test says so and checks the kit against what it promises instead.
"""

import contextlib
import importlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from colqwen3_lib import ColQwen3, ColQwen3Processor, load_model
from colqwen3_lib.config import NO_EVAL, TrainConfig, default_config
from colqwen3_lib.files import build_folder
from colqwen3_lib.fingerprint import BASE_HEAD_FILE
from colqwen3_lib.lora import REFERENCE_TARGETS, lora_config, prepare_for_training
from colqwen3_lib.losses import ColbertContrastiveLoss, maxsim_scores
from colqwen3_lib.tiny import cache_dir
from colqwen3_lib.training import train

pytestmark = [
    pytest.mark.reference,
    # colpali-engine 0.3.18 passes min_pixels/max_pixels to its processor calls: transformers' deprecation
    # notice about the peer, not the kit.
    pytest.mark.filterwarnings("ignore:Passing `min_pixels` and `max_pixels`:FutureWarning"),
]

PEER = "colpali-engine==0.3.18"
ATOL = 1e-6
DIM = 320  # colpali-engine's ColQwen3 hard-codes its head to 320 outputs
QUERIES = ["red pie chart", "Which page shows a blue table in landscape layout?", "été 2024: café, naïve"]
# What pip prints when it cannot reach the package index (the only reason to skip).
NO_NETWORK = (
    "connection broken by",
    "Could not fetch URL",
    "NewConnectionError",
    "Failed to establish a new connection",
    "Temporary failure in name resolution",
    "Name or service not known",
    "Network is unreachable",
    "Max retries exceeded",
    "ConnectTimeout",
    "ProxyError",
)

# scripts/configs/qwen3/train_colqwen3_model.py (illuin-tech/colpali, unchanged since ColQwen3 was added):
# its TrainingArguments, its LoraConfig and its argparse defaults, as TrainConfig / lora_config name them.
REFERENCE_SCRIPT = dict(
    num_train_epochs=5,
    per_device_train_batch_size=64,
    gradient_checkpointing=True,
    per_device_eval_batch_size=16,
    save_steps=500,
    logging_steps=10,
    eval_steps=100,
    warmup_steps=100,
    lr=2e-4,
    save_total_limit=1,
    max_visual_tokens=768,
    trainer="hf",
    loss="ce",
    tau=0.02,
)
REFERENCE_LORA = dict(r=32, lora_alpha=32, lora_dropout=0.1, init_lora_weights="gaussian", bias="none")
REFERENCE_REGEX = (
    r"(.*(model)(?!.*visual).*(down_proj|gate_proj|up_proj|k_proj|q_proj|v_proj|o_proj).*$"
    r"|.*(custom_text_proj).*$)"
)


# ------------------------------------------------------------------------------------------ the peer


def _install(target: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-input", "--disable-pip-version-check"]
    cmd += ["--retries", "1", "--timeout", "20", "--target", str(target), PEER]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        output = done.stdout + done.stderr
        unreachable = [line for line in output.splitlines() if any(marker in line for marker in NO_NETWORK)]
        if unreachable:
            pytest.skip(f"pip cannot reach the package index to install {PEER}: {unreachable[-1].strip()}")
        raise RuntimeError(f"pip install {PEER} failed:\n{output}")


@pytest.fixture(scope="session")
def peer_dir() -> Path:
    """colpali-engine 0.3.18 without its dependencies (they are the kit's), installed once per cache."""
    from filelock import FileLock

    path = cache_dir() / "peers" / PEER.replace("==", "-")
    if not (path / "colpali_engine").is_dir():
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path) + ".lock"):
            if not (path / "colpali_engine").is_dir():
                build_folder(path, _install)
    return path


@pytest.fixture(scope="module")
def colpali(peer_dir):
    """colpali_engine, imported from the peer folder. Importing it registers a key mapping for every `qwen3_vl`
    checkpoint in transformers; that registry, sys.path and sys.modules are put back afterwards."""
    conversion_mapping = pytest.importorskip(
        "transformers.conversion_mapping", reason="colpali-engine 0.3.18 needs transformers 5"
    )
    get_mapping = conversion_mapping.get_checkpoint_conversion_mapping
    get_mapping("qwen3_vl")  # builds the registry, so that what colpali-engine adds can be taken out again
    registry = conversion_mapping._checkpoint_conversion_mapping_cache
    before = registry.get("qwen3_vl", None)
    sys.path.insert(0, str(peer_dir))
    try:
        engine = importlib.import_module("colpali_engine")
        assert Path(engine.__file__).is_relative_to(peer_dir)
        importlib.import_module("colpali_engine.loss.late_interaction_losses")
        yield engine
    finally:
        sys.path.remove(str(peer_dir))
        for name in [m for m in sys.modules if m == "colpali_engine" or m.startswith("colpali_engine.")]:
            del sys.modules[name]
        registry.pop("qwen3_vl", None)
        if before is not None:
            registry["qwen3_vl"] = before


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model's ops are too small to share out: one thread is fastest on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _losses(colpali):
    return colpali.loss.late_interaction_losses


# --------------------------------------------------------------------------------------------- pages


def _pages() -> list[Image.Image]:
    """Pages of several sizes (a scan-sized A4 among them) and of every mode the two processors treat alike."""
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (700, 500, 3), dtype=np.uint8)
    opaque = np.concatenate([noise[:256, :256], np.full((256, 256, 1), 255, np.uint8)], axis=2)
    return [
        Image.new("RGB", (100, 140), (200, 30, 30)),
        Image.new("RGB", (1240, 1754), (250, 250, 245)),
        Image.fromarray(noise).convert("L").resize((300, 90)),
        Image.fromarray(noise).quantize(16),  # mode P, no transparency
        Image.fromarray(noise[:300, :400]).convert("CMYK"),
        Image.fromarray(opaque, "RGBA"),  # alpha 255 everywhere
        Image.fromarray(noise[:64, :480]),  # long and thin
    ]


def _same_batch(kit, peer):
    assert set(kit) == set(peer)
    for key in kit:
        assert torch.equal(kit[key], peer[key]), key


@pytest.mark.parametrize("cap", [64, 768])
def test_processors_turn_pages_into_the_same_inputs(colpali, tiny_path, cap):
    kit = ColQwen3Processor.from_pretrained(tiny_path, max_num_visual_tokens=cap)
    peer = colpali.models.ColQwen3Processor.from_pretrained(str(tiny_path), max_num_visual_tokens=cap)
    pages = _pages()
    _same_batch(kit.process_images(pages), peer.process_images(pages))
    for page in pages[:2]:  # alone, without the batch's padding
        _same_batch(kit.process_images([page]), peer.process_images([page]))
        assert kit.get_n_patches(page.size, 2) == peer.get_n_patches(page.size, 2)


def test_processors_turn_queries_into_the_same_inputs(colpali, tiny_path):
    kit = ColQwen3Processor.from_pretrained(tiny_path)
    peer = colpali.models.ColQwen3Processor.from_pretrained(str(tiny_path))
    assert kit.query_prefix == peer.query_prefix == ""
    _same_batch(kit.process_queries(QUERIES), peer.process_queries(QUERIES))
    _same_batch(kit.process_queries(QUERIES[:1]), peer.process_queries(QUERIES[:1]))


def test_where_the_kits_processor_differs_on_purpose(colpali, tiny_path):
    """Three deliberate differences; each checks what the kit does instead."""
    kit = ColQwen3Processor.from_pretrained(tiny_path, max_num_visual_tokens=64)
    peer = colpali.models.ColQwen3Processor.from_pretrained(str(tiny_path), max_num_visual_tokens=64)
    # 1. A transparent page: the kit composites it onto white, as a viewer shows it; colpali-engine's
    #    convert("RGB") drops the alpha channel and shows what lies under it (here black).
    transparent = Image.new("RGBA", (200, 200), (0, 0, 0, 0))
    transparent.paste((200, 30, 30, 255), (50, 50, 150, 150))
    white = Image.alpha_composite(Image.new("RGBA", (200, 200), "white"), transparent).convert("RGB")
    _same_batch(kit.process_images([transparent]), peer.process_images([white]))
    assert not torch.equal(
        kit.process_images([transparent])["pixel_values"], peer.process_images([transparent])["pixel_values"]
    )
    # 2. A 16-bit greyscale scan: the kit maps its 0-65535 range onto 8 bits; convert("RGB") clips it at 255.
    scan = Image.fromarray(np.linspace(0, 65535, 200 * 200).reshape(200, 200).astype(np.uint16))
    eight_bit = Image.fromarray((np.asarray(scan, dtype=np.float32) / 257).astype(np.uint8))
    _same_batch(kit.process_images([scan]), peer.process_images([eight_bit]))
    assert not torch.equal(
        kit.process_images([scan])["pixel_values"], peer.process_images([scan])["pixel_values"]
    )
    # 3. A cap under the checkpoint's minimum page size (64 visual tokens here, and in Qwen3-VL's own processor):
    #    the kit lowers the minimum with the cap; colpali-engine keeps it, so a small page grows to 64+ tokens.
    #    (Both round a page smaller than the minimum up past it: 100x140 px is 20 tokens at cap 16, 70 at 64.)
    small = [Image.new("RGB", (100, 140), "white")]
    kit.set_max_num_visual_tokens(16)
    low = colpali.models.ColQwen3Processor.from_pretrained(str(tiny_path), max_num_visual_tokens=16)
    kit_tokens = int(kit.process_images(small)["image_grid_thw"].prod() // 4)
    peer_tokens = int(low.process_images(small)["image_grid_thw"].prod() // 4)
    assert (kit_tokens, peer_tokens) == (20, 70)


# ------------------------------------------------------------------------------------ full checkpoints


def _inputs(processor):
    return processor.process_images(_pages()[:3]), processor.process_queries(QUERIES)


@torch.no_grad()
def _embed(model, batches):
    return [model(**batch) for batch in batches]


def _assert_same(kit, peer, atol=ATOL):
    for a, b in zip(kit, peer):
        assert a.dtype == b.dtype == torch.float32 and a.shape == b.shape and a.shape[-1] == DIM
        torch.testing.assert_close(a, b, atol=atol, rtol=0)


def _differ(a, b) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


@pytest.fixture(scope="module")
def kit_320(tiny_path, tmp_path_factory):
    """A full kit checkpoint with a seeded 320-output head (`ColQwen3.save_pretrained`) and its processor."""
    folder = tmp_path_factory.mktemp("kit-320")
    torch.manual_seed(320)
    ColQwen3.from_pretrained(tiny_path, dim=DIM, dtype=torch.float32).save_pretrained(folder)
    ColQwen3Processor.from_pretrained(tiny_path, max_num_visual_tokens=768).save_pretrained(folder)
    return folder


def test_colpali_engine_loads_a_kit_checkpoint_with_the_same_embeddings(colpali, kit_320):
    kit_model, kit_processor = load_model(str(kit_320), device="cpu", dtype=torch.float32)
    peer_model, info = colpali.models.ColQwen3.from_pretrained(
        str(kit_320), torch_dtype=torch.float32, output_loading_info=True
    )
    assert not any(info.values()), info  # every tensor loaded, none left over
    peer_processor = colpali.models.ColQwen3Processor.from_pretrained(str(kit_320))  # the kit's saved cap
    kit_inputs, peer_inputs = _inputs(kit_processor), _inputs(peer_processor)
    for kit_batch, peer_batch in zip(kit_inputs, peer_inputs):
        _same_batch(kit_batch, peer_batch)
    _assert_same(_embed(kit_model, kit_inputs), _embed(peer_model.eval(), peer_inputs))


def test_the_kit_loads_a_colpali_engine_checkpoint_with_the_same_embeddings(colpali, tiny_path, tmp_path):
    torch.manual_seed(3)
    peer_model = colpali.models.ColQwen3.from_pretrained(str(tiny_path), torch_dtype=torch.float32).eval()
    peer_model.save_pretrained(tmp_path)
    peer_processor = colpali.models.ColQwen3Processor.from_pretrained(
        str(tiny_path), max_num_visual_tokens=768
    )
    peer_processor.save_pretrained(tmp_path)
    kit_model, kit_processor = load_model(str(tmp_path), device="cpu", dtype=torch.float32)
    assert kit_model.checkpoint_format.name == "colpali-engine" and kit_model.dim == DIM
    kit_inputs, peer_inputs = _inputs(kit_processor), _inputs(peer_processor)
    for kit_batch, peer_batch in zip(kit_inputs, peer_inputs):
        _same_batch(kit_batch, peer_batch)
    _assert_same(_embed(kit_model, kit_inputs), _embed(peer_model, peer_inputs))


# --------------------------------------------------------------------------------------------- adapters


def _one_step(output_dir, base, **overrides):
    """One LoRA step of the tiny recipe at a learning rate that moves every adapter (no warmup)."""
    settings = dict(
        train_dataset="synthetic",
        peft=True,
        per_device_train_batch_size=8,
        max_visual_tokens=16,
        lr=5e-3,
        max_steps=1,
        warmup_steps=0,
        save_steps=100,
        eval_dataset=NO_EVAL,
        gradient_checkpointing=False,
        num_threads=1,
    )
    return train(default_config(output_dir, base, **{**settings, **overrides})).output_dir


def _peft_on_colpali(colpali, base, adapter):
    from peft import PeftModel

    model = colpali.models.ColQwen3.from_pretrained(str(base), torch_dtype=torch.float32)
    return PeftModel.from_pretrained(model, str(adapter)).eval()


def test_a_kit_adapter_on_a_base_with_a_head_loads_in_colpali_engine(colpali, kit_320, tmp_path):
    """Trained without --dim: the base's 320-output head is kept (and adapted with LoRA, the reference's way)."""
    adapter = _one_step(tmp_path / "run", str(kit_320))
    assert not (adapter / BASE_HEAD_FILE).exists()  # the base has its head: nothing to restore
    kit_model, processor = load_model(str(kit_320), adapter=adapter, device="cpu", dtype=torch.float32)
    inputs = _inputs(processor)
    kit = _embed(kit_model, inputs)
    assert _differ(kit, _embed(load_model(str(kit_320), device="cpu", dtype=torch.float32)[0], inputs)) > 1e-3
    _assert_same(kit, _embed(_peft_on_colpali(colpali, kit_320, adapter), inputs))
    # colpali-engine's own way: from_pretrained on the adapter folder loads its base, then the adapter.
    by_folder = colpali.models.ColQwen3.from_pretrained(str(adapter), torch_dtype=torch.float32).eval()
    _assert_same(kit, _embed(by_folder, inputs))


def test_a_colpali_engine_adapter_loads_in_the_kit(colpali, kit_320, tmp_path):
    """colpali-engine's training wraps its model with the script's LoraConfig and saves the adapter."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(4)
    base = colpali.models.ColQwen3.from_pretrained(str(kit_320), torch_dtype=torch.float32)
    config = LoraConfig(**REFERENCE_LORA, task_type="FEATURE_EXTRACTION", target_modules=REFERENCE_REGEX)
    peer = get_peft_model(base, config)
    with torch.no_grad():  # gaussian init leaves lora_B at zero: move it, as training would
        for name, param in peer.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    peer.save_pretrained(tmp_path)
    kit_model, processor = load_model(str(kit_320), adapter=tmp_path, device="cpu", dtype=torch.float32)
    inputs = _inputs(processor)
    _assert_same(_embed(kit_model, inputs), _embed(peer.eval(), inputs))


def test_a_kit_adapter_on_a_headless_base_needs_its_saved_initial_head(colpali, tiny_path, tmp_path):
    """On Qwen3-VL-Instruct (or tiny) the head starts random; LoRA on the head stores only its update, so the
    kit saves the initial head as base_head.safetensors. colpali-engine does not read that file: its own new
    random head gives other embeddings, until that head is loaded into it before the adapter."""
    adapter = _one_step(tmp_path / "run", "tiny", dim=DIM)
    kit_model, processor = load_model("tiny", adapter=adapter, device="cpu", dtype=torch.float32)
    assert kit_model.dim == DIM  # the head's size comes from the adapter
    inputs = _inputs(processor)
    kit = _embed(kit_model, inputs)
    torch.manual_seed(1)  # not the seed training started from: colpali-engine draws a head of its own
    assert _differ(kit, _embed(_peft_on_colpali(colpali, tiny_path, adapter), inputs)) > 1e-2
    from peft import PeftModel

    base = colpali.models.ColQwen3.from_pretrained(str(tiny_path), torch_dtype=torch.float32)
    base.custom_text_proj.load_state_dict(load_file(str(adapter / BASE_HEAD_FILE)))
    _assert_same(kit, _embed(PeftModel.from_pretrained(base, str(adapter)).eval(), inputs))


def test_a_head_in_full_adapter_on_a_headless_base_loads_in_colpali_engine(colpali, tiny_path, tmp_path):
    """--head-in-full saves the whole trained head with the adapter (modules_to_save): nothing else is needed."""
    adapter = _one_step(tmp_path / "run", "tiny", dim=DIM, head_in_full=True)
    assert not (adapter / BASE_HEAD_FILE).exists()
    kit_model, processor = load_model("tiny", adapter=adapter, device="cpu", dtype=torch.float32)
    inputs = _inputs(processor)
    kit = _embed(kit_model, inputs)
    _assert_same(kit, _embed(_peft_on_colpali(colpali, tiny_path, adapter), inputs))
    by_folder = colpali.models.ColQwen3.from_pretrained(str(adapter), torch_dtype=torch.float32).eval()
    _assert_same(kit, _embed(by_folder, inputs))


# ---------------------------------------------------------------------------------------------- losses


def _batch(n, lengths, seed, positive=True, dim=16):
    """n zero-padded (left, as the processor pads) unit-vector sequences; with `positive`, every dot product
    between two of them is >= 0, so a padding zero never beats a real token. In float64: at tau 0.02 float32
    rounding alone moves a loss by 1e-6 to 1e-5, and both losses keep float64."""
    generator = torch.Generator().manual_seed(seed)
    out = torch.zeros(n, max(lengths), dim, dtype=torch.float64)
    for i, length in enumerate(lengths[:n]):
        tokens = torch.randn(length, dim, generator=generator, dtype=torch.float64)
        tokens = tokens.abs() if positive else tokens
        out[i, max(lengths) - length :] = F.normalize(tokens, dim=-1)
    return out


@pytest.fixture(scope="module")
def embeddings():
    """4 queries (this process's) against 12 pages (3 processes' worth) and one hard negative per query."""
    queries = _batch(4, [5, 9, 7, 12], seed=0)
    pages = _batch(12, [20, 31, 17, 25, 40, 22, 19, 33, 28, 21, 36, 24], seed=1)
    hard = _batch(4, [18, 27, 23, 30], seed=2)
    return queries, pages, hard


def _same_loss(kit_loss, kit_args, peer_loss, peer_args):
    """The same value, and the same gradients on real tokens. colpali-engine's also reach padding query tokens
    (a zero token's max still picks a page token); the model's attention-mask product stops those."""
    leaves = [t.clone().requires_grad_() for t in kit_args[:2]]
    kit_value = kit_loss(*leaves, *kit_args[2:])
    kit_grads = torch.autograd.grad(kit_value, leaves)
    peer_leaves = [t.clone().requires_grad_() for t in peer_args[:2]]
    peer_value = peer_loss(*peer_leaves, *peer_args[2:])
    peer_grads = torch.autograd.grad(peer_value, peer_leaves)
    assert kit_value.item() == pytest.approx(peer_value.item(), abs=ATOL, rel=ATOL)
    for embeddings, a, b in zip(kit_args, kit_grads, peer_grads):
        real = embeddings.ne(0).any(-1)  # (batch, tokens)
        torch.testing.assert_close(a[real], b[real], atol=ATOL, rtol=ATOL)
        assert not a[~real].any()


@pytest.mark.parametrize("offset", [0, 4])
def test_ce_is_colbert_loss(colpali, embeddings, offset):
    queries, pages, _ = embeddings
    kit = TrainConfig(output_dir="-", loss="ce").loss_function()
    peer = _losses(colpali).ColbertLoss(temperature=0.02, normalize_scores=True)
    _same_loss(kit, (queries, pages, offset), peer, (queries, pages, offset))
    bare = ColbertContrastiveLoss("ce", tau=0.02, normalize_scores=True)
    _same_loss(bare, (queries, pages, offset), peer, (queries, pages, offset))


@pytest.mark.parametrize("offset", [0, 4])
@pytest.mark.parametrize("tau", [None, 0.02])
def test_pairwise_is_colbert_pairwise_ce_loss(colpali, embeddings, offset, tau):
    """The reference's pairwise: raw summed scores at temperature 1; `TrainConfig(tau=...)` (`--pairwise-tau`)
    replaces that 1."""
    queries, pages, _ = embeddings
    kit = TrainConfig(output_dir="-", loss="pairwise", tau=tau).loss_function()
    peer = _losses(colpali).ColbertPairwiseCELoss(temperature=tau or 1.0, normalize_scores=False)
    _same_loss(kit, (queries, pages, offset), peer, (queries, pages, offset))


@pytest.mark.parametrize("offset", [0, 4])
@pytest.mark.parametrize("weight", [0.5, 0.25])
@pytest.mark.parametrize("loss", ["ce", "pairwise"])
def test_hard_negatives_are_colbert_negative_losses(colpali, embeddings, loss, weight, offset):
    """kit hard_negative_weight = 1 - colpali-engine's in_batch_term_weight; its negatives are (B, n_neg, L, D)."""
    queries, pages, hard = embeddings
    config = TrainConfig(output_dir="-", loss=loss, hard_negative_weight=weight)
    losses = _losses(colpali)
    cls = losses.ColbertNegativeCELoss if loss == "ce" else losses.ColbertPairwiseNegativeCELoss
    peer = cls(
        temperature=config.tau, normalize_scores=config.normalize_scores, in_batch_term_weight=1 - weight
    )
    kit = config.loss_function()
    # positional order: the kit's (queries, pages, offset, hard), colpali-engine's (queries, pages, negs, offset)
    _same_loss(kit, (queries, pages, offset, hard), peer, (queries, pages, hard.unsqueeze(1), offset))


def test_where_zero_padding_wins_the_kit_scores_each_pair_exactly(colpali):
    """Deliberately not colpali-engine's: pages zero-padded to one length, where every real token of a page
    scores below 0 for some query token. colpali-engine's max then picks a padding zero (a score of 0); the
    kit masks padding, so each score is the MaxSim of the query and the page alone, whatever the padding."""
    queries = _batch(3, [4, 6, 5], seed=5)  # every component >= 0
    pages = _batch(6, [8, 30, 12, 9, 20, 15], seed=6)
    pages[::2] = -pages[::2]  # pages 0, 2, 4: every real token scores below 0 against every query token
    per_pair = torch.tensor(
        dtype=torch.float64,
        data=[
            [(q[q.ne(0).any(-1)] @ p[p.ne(0).any(-1)].T).amax(dim=1).sum().item() for p in pages]
            for q in queries
        ],
    )
    kit_scores = maxsim_scores(queries, pages, normalize=False)
    torch.testing.assert_close(kit_scores, per_pair, atol=ATOL, rtol=0)
    peer_scores = torch.einsum("bnd,csd->bcns", queries, pages).amax(dim=3).sum(dim=2)  # colpali-engine's
    assert (peer_scores - per_pair).abs().max() > 0.1  # padding won somewhere
    n_tokens = queries.ne(0).any(-1).sum(1, keepdim=True)
    kit = TrainConfig(output_dir="-", loss="ce").loss_function()
    expected = F.cross_entropy(per_pair / n_tokens / 0.02, torch.arange(3))
    assert kit(queries, pages).item() == pytest.approx(expected.item(), abs=ATOL, rel=ATOL)
    peer = _losses(colpali).ColbertLoss(temperature=0.02, normalize_scores=True)
    with contextlib.redirect_stdout(None):  # it prints when normalised scores leave [0, 1]
        assert abs(peer(queries, pages).item() - expected.item()) > 1e-3


# ----------------------------------------------------------------------------------------- the recipe


def _lora_modules(model) -> set[str]:
    from peft.tuners.lora import LoraLayer

    return {name for name, module in model.named_modules() if isinstance(module, LoraLayer)}


def test_lora_targets_the_modules_the_reference_regex_selects(colpali, tiny_path):
    from peft import LoraConfig, get_peft_model

    assert REFERENCE_TARGETS == REFERENCE_REGEX
    peer_base = colpali.models.ColQwen3.from_pretrained(str(tiny_path), torch_dtype=torch.float32)
    peer = _lora_modules(
        get_peft_model(peer_base, LoraConfig(**REFERENCE_LORA, target_modules=REFERENCE_REGEX))
    )
    kit_base = ColQwen3.from_pretrained(tiny_path, dim=DIM, dtype=torch.float32)
    kit = _lora_modules(prepare_for_training(kit_base, peft=True, gradient_checkpointing=False))
    assert kit == peer and "base_model.model.custom_text_proj" in kit
    assert not any(".visual." in name for name in kit)
    # --head-in-full: the same projections, the head trained in full instead.
    kit_base = ColQwen3.from_pretrained(tiny_path, dim=DIM, dtype=torch.float32)
    in_full = prepare_for_training(kit_base, peft=True, gradient_checkpointing=False, head_in_full=True)
    assert _lora_modules(in_full) == peer - {"base_model.model.custom_text_proj"}


def test_train_config_defaults_are_the_reference_scripts():
    config = TrainConfig(output_dir="-")
    for name, value in REFERENCE_SCRIPT.items():
        assert getattr(config, name) == value, name
    assert config.normalize_scores is True  # ColbertLoss(temperature=tau, normalize_scores=True)
    pairwise = TrainConfig(output_dir="-", loss="pairwise")  # ColbertPairwiseCELoss(normalize_scores=False)
    assert (pairwise.tau, pairwise.normalize_scores) == (1.0, False)
    # A new head has 128 outputs unless --dim says otherwise (320: colpali-engine's).
    assert config.dim is None and ColQwen3.from_pretrained("tiny").dim == 128
    lora = lora_config()
    for name, value in REFERENCE_LORA.items():
        assert getattr(lora, name) == value, name
    assert lora.target_modules == REFERENCE_REGEX and not lora.modules_to_save
    # What the kit does not reproduce (docs/training.md, "Reference script vs kit"): the script's TrainingArguments
    # leave seed at 42, dataloader_drop_last off and bf16 off (its model is loaded in bf16); it sets
    # dataloader_num_workers=8 and its LoraConfig task_type="FEATURE_EXTRACTION".
    assert (config.seed, config.dataloader_num_workers, lora.task_type) == (0, 0, None)
