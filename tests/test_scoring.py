"""The chunked MaxSim scorer against the einsum reference and a per-pair loop."""

import importlib.util
from pathlib import Path

import pytest
import torch

from colqwen3_lib.scoring import score_multi_vector, score_multi_vector_reference


def normalised(*shape, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(*shape, generator=generator), dim=-1)


def per_pair(qs, ps):
    """score(q, p) = sum_i max_j <q_i, p_j>, one pair at a time."""
    return torch.tensor([[(q @ p.T).max(dim=1).values.sum().item() for p in ps] for q in qs])


@pytest.mark.parametrize("max_chunk_bytes", [1, 4096, None])  # one page per chunk, a few, the default
@pytest.mark.parametrize("batch_size", [1, 3, 128])
def test_equal_length_pages_match_the_reference(batch_size, max_chunk_bytes):
    qs, ps = normalised(7, 5, 32), normalised(11, 13, 32, seed=1)
    expected = score_multi_vector_reference(qs, ps)
    as_tensor = score_multi_vector(qs, ps, batch_size=batch_size, max_chunk_bytes=max_chunk_bytes)
    as_lists = score_multi_vector(list(qs), list(ps), batch_size=batch_size, max_chunk_bytes=max_chunk_bytes)
    assert as_tensor.shape == (7, 11) and as_tensor.dtype == torch.float32
    torch.testing.assert_close(as_tensor, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(as_lists, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("max_chunk_bytes", [1, 2000, None])
def test_ragged_pages_and_queries_match_a_per_pair_loop(max_chunk_bytes):
    qs = [normalised(n, 16, seed=n) for n in (3, 1, 8, 5)]
    ps = [normalised(n, 16, seed=100 + n) for n in (4, 1, 30, 12, 7, 7, 100, 2)]  # unsorted lengths
    scores = score_multi_vector(qs, ps, batch_size=3, max_chunk_bytes=max_chunk_bytes)
    torch.testing.assert_close(scores, per_pair(qs, ps), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("as_tensor", [False, True])
def test_the_gpu_layout_gives_the_same_exact_scores(monkeypatch, as_tensor):
    """A GPU lays each block out query tokens x page tokens (the CPU the other way round): checked here on the CPU."""
    from colqwen3_lib import scoring

    monkeypatch.setattr(scoring, "_page_major", lambda device: False)
    qs = [normalised(n, 16, seed=n) for n in (3, 1, 8, 5)]
    ps = [normalised(n, 16, seed=100 + n) for n in (4, 1, 30, 12, 7, 7, 100, 2)]
    pages = torch.nn.utils.rnn.pad_sequence(ps, batch_first=True) if as_tensor else ps
    for cap in (1, 2000, None):
        scores = score_multi_vector(qs, pages, batch_size=3, max_chunk_bytes=cap)
        torch.testing.assert_close(scores, per_pair(qs, ps), atol=1e-5, rtol=1e-5)


def test_padding_never_changes_a_score():
    """All of a page's similarities below 0: zero padding (the reference) would lift them to 0; ours does not."""
    q = [torch.tensor([[1.0, 0.0]])]
    ps = [torch.tensor([[-1.0, 0.0]]), torch.tensor([[-0.5, 0.0], [-0.2, 0.0], [-0.9, 0.0]])]
    torch.testing.assert_close(score_multi_vector(q, ps), torch.tensor([[-1.0, -0.2]]))


def test_bf16_embeddings_score_in_float32():
    qs, ps = normalised(4, 6, 32), normalised(9, 20, 32, seed=2)
    scores = score_multi_vector(qs.bfloat16(), ps.bfloat16())
    assert scores.dtype == torch.float32
    expected = score_multi_vector_reference(qs.bfloat16().float(), ps.bfloat16().float())
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)


def test_zero_padded_queries_add_nothing():
    q = normalised(1, 4, 16)
    padded = torch.cat([q, torch.zeros(1, 3, 16)], dim=1)  # (1, 7, 16), as a padded batch holds it
    ps = [normalised(n, 16, seed=n) for n in (5, 9)]
    torch.testing.assert_close(
        score_multi_vector(padded, ps), score_multi_vector(q, ps), atol=1e-6, rtol=1e-6
    )


def test_errors():
    with pytest.raises(ValueError, match="no query embeddings"):
        score_multi_vector([], [torch.ones(2, 4)])
    with pytest.raises(ValueError, match="query dim 4 != page dim 8"):
        score_multi_vector([torch.ones(2, 4)], [torch.ones(2, 8)])
    with pytest.raises(ValueError, match="non-empty"):
        score_multi_vector([torch.ones(2, 4)], [torch.ones(0, 4)])
    with pytest.raises(ValueError, match="batch_size"):
        score_multi_vector([torch.ones(2, 4)], [torch.ones(2, 4)], batch_size=0)


def test_a_zero_padded_page_tensor_scores_like_its_unpadded_pages():
    """ColQwen3 pads on the left with zero rows; pad_sequence pads on the right: neither may win a max."""
    q = [torch.tensor([[1.0, 0.0]])]
    pages = [torch.tensor([[-1.0, 0.0]]), torch.tensor([[-0.5, 0.0], [-0.2, 0.0], [-0.9, 0.0]])]
    right = torch.nn.utils.rnn.pad_sequence(pages, batch_first=True)  # (2, 3, 2)
    left = torch.stack([right[0].roll(2, dims=0), right[1]])  # the short page padded on the left
    for padded in (right, left):
        torch.testing.assert_close(score_multi_vector(q, padded), torch.tensor([[-1.0, -0.2]]))


def test_benchmark_runs_and_reports_the_ratios(capsys):
    path = Path(__file__).parents[1] / "benchmarks" / "bench_scoring.py"
    spec = importlib.util.spec_from_file_location("bench_scoring", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    argv = ["--queries", "4", "--query-tokens", "3", "--pages", "6", "--min-page-tokens", "5"]
    report = bench.main(argv + ["--page-tokens", "10", "--dim", "8", "--repeats", "1"])
    for case in ("list of pages", "padded tensor"):
        assert report[case]["max_abs_error"] < 1e-5 and report[case]["matmul_share"] > 0
    assert "of the plain matrix-product rate" in capsys.readouterr().out


VIEWS = {
    "aten::slice",
    "aten::select",
    "aten::unbind",
    "aten::view",
    "aten::reshape",
    "aten::t",
    "aten::transpose",
}


def _operators_launched(fn) -> list[str]:
    """The torch operators `fn` calls at top level, as the profiler records them, views (no kernel) left out."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sorted(
        event.name
        for event in prof.events()
        if event.cpu_parent is None and event.name.startswith("aten::") and event.name not in VIEWS
    )


@pytest.mark.parametrize("as_tensor", [False, True], ids=["list", "padded tensor"])
def test_the_operators_one_call_runs_do_not_grow_with_the_number_of_pages(as_tensor):
    """No per-page loop: on a GPU each operator is a kernel launch, and one per page costs more than the maths.

    In one chunk, 10 and 200 ragged pages (5-40 tokens) run the same operators; of a padded 3-D tensor only
    views are taken per page."""
    qs = [normalised(n, 16, seed=n) for n in (3, 7, 5)]
    launched = []
    for n_pages in (10, 200):
        lengths = torch.randint(5, 41, (n_pages,), generator=torch.Generator().manual_seed(n_pages)).tolist()
        ps = [normalised(n, 16, seed=i) for i, n in enumerate(lengths)]
        pages = torch.nn.utils.rnn.pad_sequence(ps, batch_first=True) if as_tensor else ps
        launched.append(_operators_launched(lambda p=pages: score_multi_vector(qs, p, max_chunk_bytes=2**30)))
    assert launched[0] == launched[1]
    assert 0 < len(launched[0]) < 100


def test_operators_grow_with_chunks_only():
    """Each chunk adds the same operators: 12 pages of 20 tokens in 1, 2 and 4 chunks."""
    qs = [normalised(4, 16)]
    ps = [normalised(20, 16, seed=i) for i in range(12)]
    per_page_block = 20 * 4 * 4  # one page's similarities: 20 tokens x 4 query tokens x 4 bytes
    n = [
        len(_operators_launched(lambda c=c: score_multi_vector(qs, ps, max_chunk_bytes=c * per_page_block)))
        for c in (12, 6, 3)
    ]
    assert n[1] > n[0] and n[2] - n[0] == 3 * (n[1] - n[0])
