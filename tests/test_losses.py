"""The contrastive losses against loop-based reference computations and hand-checked values, and
multi-process in-batch negatives (pages gathered across processes) against one process."""

import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from colqwen3_lib.data import ContrastiveCollator, load_pairs
from colqwen3_lib.losses import (
    ColbertContrastiveLoss,
    contrastive_loss,
    gather_with_grad,
    maxsim_scores,
    paired_scores,
)


def _random_embeddings(n: int, max_tokens: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    """(n, max_tokens, dim) unit vectors, left-padded with zero rows to random lengths, like ColQwen3 outputs."""
    embs = F.normalize(torch.randn(n, max_tokens, dim, generator=generator), dim=-1)
    for i in range(n):
        n_pad = int(torch.randint(0, max_tokens - 1, (1,), generator=generator))
        embs[i, :n_pad] = 0
    return embs


def _loop_score(q: torch.Tensor, p: torch.Tensor, normalize: bool = True) -> float:
    """MaxSim by hand: for each real query token, the best real page token; summed (and averaged)."""
    q_tokens = [t for t in q if t.abs().sum() > 0]
    p_tokens = [t for t in p if t.abs().sum() > 0]
    total = sum(max(float(qt @ pt) for pt in p_tokens) for qt in q_tokens)
    return total / len(q_tokens) if normalize else total


def _loop_losses(qs, ps, tau, offset=0, hard=None, weight=0.5):
    ce, pairwise, hard_terms = [], [], []
    for i, q in enumerate(qs):
        scores = [_loop_score(q, p) / tau for p in ps]
        pos = scores[offset + i]
        ce.append(-pos + math.log(sum(math.exp(s) for s in scores)))
        hardest = max(s for j, s in enumerate(scores) if j != offset + i)
        pairwise.append(math.log1p(math.exp(hardest - pos)))
        if hard is not None:
            hard_terms.append(math.log1p(math.exp(_loop_score(q, hard[i]) / tau - pos)))
    out = {"ce": sum(ce) / len(ce), "pairwise": sum(pairwise) / len(pairwise)}
    if hard is not None:
        mean_hard = sum(hard_terms) / len(hard_terms)
        out = {k: (1 - weight) * v + weight * mean_hard for k, v in out.items()}
    return out


@pytest.fixture
def generator():
    return torch.Generator().manual_seed(0)


def test_maxsim_scores_match_a_loop_and_ignore_padding(generator):
    qs = _random_embeddings(3, 6, 8, generator)
    ps = _random_embeddings(5, 9, 8, generator)
    expected = torch.tensor([[_loop_score(q, p) for p in ps] for q in qs])
    assert maxsim_scores(qs, ps) == pytest.approx(expected, abs=1e-5)
    raw = torch.tensor([[_loop_score(q, p, normalize=False) for p in ps] for q in qs])
    assert maxsim_scores(qs, ps, normalize=False) == pytest.approx(raw, abs=1e-5)
    # Extra padding changes nothing.
    padded = F.pad(ps, (0, 0, 4, 0))
    assert maxsim_scores(qs, padded) == pytest.approx(expected, abs=1e-5)
    assert paired_scores(qs, ps[:3]) == pytest.approx(torch.diagonal(expected[:, :3]), abs=1e-5)


@pytest.mark.parametrize("loss", ["ce", "pairwise"])
@pytest.mark.parametrize("offset", [0, 2])
def test_losses_match_a_loop(generator, loss, offset):
    qs = _random_embeddings(4, 5, 16, generator)
    ps = _random_embeddings(7, 8, 16, generator)
    for tau in (0.02, 0.5):
        expected = _loop_losses(qs, ps, tau, offset)[loss]
        got = ColbertContrastiveLoss(loss, tau=tau)(qs, ps, offset=offset)
        assert float(got) == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("loss", ["ce", "pairwise"])
def test_hard_negatives_are_blended_with_the_in_batch_term(generator, loss):
    qs = _random_embeddings(4, 5, 16, generator)
    ps = _random_embeddings(4, 8, 16, generator)
    hard = _random_embeddings(4, 6, 16, generator)
    for weight in (0.5, 0.25):
        expected = _loop_losses(qs, ps, 0.1, hard=hard, weight=weight)[loss]
        got = ColbertContrastiveLoss(loss, tau=0.1, hard_negative_weight=weight)(
            qs, ps, hard_negative_embeddings=hard
        )
        assert float(got) == pytest.approx(expected, rel=1e-4)


def test_hand_checked_values():
    pad = [0.0, 0.0]
    # Query 0 has two real tokens, query 1 one (plus padding); page 0 one real token.
    qs = torch.tensor([[[1.0, 0.0], [0.0, -1.0]], [[0.0, 1.0], pad]])
    ps = torch.tensor([[[0.6, 0.8], pad], [[1.0, 0.0], [0.0, 1.0]]])
    # MaxSim: q0.p0 = 0.6 + (-0.8) = -0.2 (padding is not a 0 that wins the max), /2 tokens = -0.1
    #         q0.p1 = 1 + 0 = 1, /2 = 0.5;  q1.p0 = 0.8;  q1.p1 = 1.
    assert maxsim_scores(qs, ps).flatten().tolist() == pytest.approx([-0.1, 0.5, 0.8, 1.0])
    # tau 0.5 doubles them. With two pages, InfoNCE = softplus(negative - positive) = pairwise:
    # q0: softplus(1.0 - (-0.2)) = log(1 + e^1.2) = 1.463282; q1: softplus(1.6 - 2.0) = log(1 + e^-0.4) = 0.513015.
    expected = (1.463282 + 0.513015) / 2
    for loss in ("ce", "pairwise"):
        assert float(ColbertContrastiveLoss(loss, tau=0.5)(qs, ps)) == pytest.approx(expected, abs=1e-5)
    # A third page that q0 likes more than its own: InfoNCE sums over both negatives, pairwise takes the hardest.
    ps3 = torch.cat([ps, torch.tensor([[[1.0, 0.0], [0.0, -1.0]]])])  # q0.p2 = (1 + 1) / 2 = 1; q1.p2 = 0
    ce = ColbertContrastiveLoss("ce", tau=0.5)(qs, ps3)
    q0 = 0.2 + math.log(math.exp(-0.2) + math.exp(1.0) + math.exp(2.0))
    q1 = -2.0 + math.log(math.exp(1.6) + math.exp(2.0) + math.exp(0.0))
    assert float(ce) == pytest.approx((q0 + q1) / 2, abs=1e-5)
    pairwise = ColbertContrastiveLoss("pairwise", tau=0.5)(qs, ps3)
    assert float(pairwise) == pytest.approx(
        (math.log1p(math.exp(2.2)) + math.log1p(math.exp(-0.4))) / 2, abs=1e-5
    )


def test_gradients_flow_to_queries_and_pages(generator):
    qs = _random_embeddings(3, 4, 8, generator).requires_grad_()
    ps = _random_embeddings(3, 5, 8, generator).requires_grad_()
    for loss in ("ce", "pairwise"):
        qs.grad = ps.grad = None
        ColbertContrastiveLoss(loss)(qs, ps).backward()
        assert qs.grad.abs().sum() > 0 and ps.grad.abs().sum() > 0
        assert torch.isfinite(qs.grad).all() and torch.isfinite(ps.grad).all()


def test_a_perfect_retriever_has_a_small_loss():
    eye = torch.eye(4).unsqueeze(1)  # (4, 1, 4): query i and page i are the same one-token vector
    for loss in ("ce", "pairwise"):
        assert float(ColbertContrastiveLoss(loss, tau=0.02)(eye, eye)) < 1e-6


def test_gather_without_distributed_is_the_identity(generator):
    ps = _random_embeddings(2, 3, 4, generator)
    gathered, offset = gather_with_grad(ps)
    assert gathered is ps and offset == 0


def test_invalid_settings_are_refused(generator):
    with pytest.raises(ValueError, match="not one of"):
        ColbertContrastiveLoss("triplet")
    with pytest.raises(ValueError, match="tau"):
        ColbertContrastiveLoss("ce", tau=0)
    qs = _random_embeddings(3, 4, 8, generator)
    with pytest.raises(ValueError, match="need at least"):
        ColbertContrastiveLoss("ce")(qs, qs, offset=1)


# ---------------------------------------------------------------------------------- multi-process


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

    torch.manual_seed(0)  # the same newly initialised head in every process
    model = ColQwen3.from_pretrained(
        "tiny"
    ).eval()  # eval: no dropout, so processes compute the same function
    processor = ColQwen3Processor.from_pretrained("tiny", max_num_visual_tokens=16)
    pairs = load_pairs("synthetic", "train")
    local = rows[rank * len(rows) // world : (rank + 1) * len(rows) // world]
    batch = ContrastiveCollator(processor)([pairs[i] for i in local])
    loss = contrastive_loss(model, batch, ColbertContrastiveLoss("ce"))
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
    from datasets import Image

    from colqwen3_lib import ColQwen3Processor

    processor = ColQwen3Processor.from_pretrained("tiny", max_num_visual_tokens=16)
    pairs = load_pairs("synthetic", "train")
    images = pairs.dataset.cast_column("image", Image(decode=True))["image"][:64]
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
