"""MaxSim throughput on the case users meet: variable-length pages, against colpali-engine, in one run.

    pip install --no-deps --target /tmp/colpali colpali-engine==0.3.18   # the peer, without its dependencies
    python benchmarks/bench_scoring.py --peer-path /tmp/colpali          # 64 queries x 20 tokens vs 500 pages
    python benchmarks/bench_scoring.py --pages 100 --repeats 1           # quicker

Pages have 600-768 tokens (128 dims, float32), as the evaluation hands them to the scorer: a list of
unpadded embeddings. The same pages are also scored as one zero-padded (pages, 768, dim) tensor, the
other form both scorers accept. Per case, three contenders run in alternation (so that a busy machine
slows all alike) and medians are reported:
- `colqwen3_lib.scoring.score_multi_vector`;
- colpali-engine 0.3.18's `BaseVisualRetrieverProcessor.score_multi_vector` (`--peer-path`; skipped
  with a message when it is not importable);
- the plain matrix products alone (64-page blocks of real tokens, results thrown away): the rate any
  exact MaxSim built on a matrix multiply can at best reach on this machine.
It checks the kit against a per-pair MaxSim (loops over pages) to 1e-5, and prints the ratios the kit
promises: at least 2x colpali-engine and at least 75% of the plain matrix-product rate.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from colqwen3_lib.scoring import score_multi_vector

TARGET_VS_PEER = 2.0
TARGET_MATMUL_SHARE = 0.75


def _timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def _plain_matmul(queries: list[torch.Tensor], pages: list[torch.Tensor], pages_per_block: int = 64) -> None:
    """(page tokens x dim) @ (dim x query tokens), 64 pages at a time, results thrown away."""
    q_t = torch.cat(queries).T.contiguous()  # (dim, all query tokens)
    blocks = [torch.cat(pages[i : i + pages_per_block]) for i in range(0, len(pages), pages_per_block)]
    out = torch.empty(max(b.shape[0] for b in blocks), q_t.shape[1])
    start = time.perf_counter()
    for block in blocks:
        torch.mm(block, q_t, out=out[: block.shape[0]])
    return time.perf_counter() - start


def per_pair_maxsim(queries: list[torch.Tensor], pages: list[torch.Tensor]) -> torch.Tensor:
    """The definition, one page at a time: (n_queries, n_pages)."""
    q = torch.nn.utils.rnn.pad_sequence(queries, batch_first=True)  # zero rows add 0
    return torch.stack([torch.einsum("qnd,sd->qns", q, p).amax(dim=2).sum(dim=1) for p in pages], dim=1)


def _peer():
    try:
        from colpali_engine.utils.processing_utils import BaseVisualRetrieverProcessor
    except ImportError as err:
        print(
            f"colpali-engine is not importable ({err}); for the side-by-side numbers run "
            "`pip install --no-deps --target /tmp/colpali colpali-engine==0.3.18` and pass --peer-path /tmp/colpali"
        )
        return None
    return BaseVisualRetrieverProcessor.score_multi_vector


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=64)
    parser.add_argument("--query-tokens", type=int, default=20)
    parser.add_argument("--pages", type=int, default=500)
    parser.add_argument("--min-page-tokens", type=int, default=600)
    parser.add_argument("--page-tokens", type=int, default=768)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each; medians are reported")
    parser.add_argument("--peer-path", help="folder colpali-engine was installed into with --target")
    args = parser.parse_args(argv)
    if args.peer_path:
        sys.path.insert(0, args.peer_path)
    peer = _peer()

    generator = torch.Generator().manual_seed(0)
    queries = list(
        torch.nn.functional.normalize(
            torch.randn(args.queries, args.query_tokens, args.dim, generator=generator), dim=-1
        )
    )
    lengths = torch.randint(
        args.min_page_tokens, args.page_tokens + 1, (args.pages,), generator=generator
    ).tolist()
    pages = [
        torch.nn.functional.normalize(torch.randn(n, args.dim, generator=generator), dim=-1) for n in lengths
    ]
    padded = torch.nn.utils.rnn.pad_sequence(pages, batch_first=True)  # (pages, max tokens, dim), zero-padded
    gflop = 2 * args.queries * args.query_tokens * sum(lengths) * args.dim / 1e9

    exact = per_pair_maxsim(queries, pages)
    print(
        f"MaxSim: {args.queries} queries x {args.query_tokens} tokens vs {args.pages} pages of "
        f"{args.min_page_tokens}-{args.page_tokens} tokens x {args.dim} dims, float32, {torch.get_num_threads()} "
        f"threads; {gflop:.1f} GFLOP; median of {args.repeats} alternating runs"
    )
    report = {}
    for case, page_input in (("list of pages", pages), ("padded tensor", padded)):
        times: dict[str, list[float]] = {"kit": [], "colpali-engine": [], "matmul": []}
        for _ in range(args.repeats):
            elapsed, kit = _timed(lambda p=page_input: score_multi_vector(queries, p))
            times["kit"].append(elapsed)
            if peer is not None:
                times["colpali-engine"].append(_timed(lambda p=page_input: peer(queries, p, device="cpu"))[0])
            times["matmul"].append(_plain_matmul(queries, pages))
        error = (kit - exact).abs().max().item()
        median = {name: statistics.median(t) for name, t in times.items() if t}
        print(f"\n{case}:")
        for name, seconds in median.items():
            print(f"  {name:<15} {seconds:7.2f} s  {gflop / seconds:6.1f} GFLOP/s")
        share = median["matmul"] / median["kit"]
        line = f"  kit at {share:.0%} of the plain matrix-product rate (target {TARGET_MATMUL_SHARE:.0%})"
        if "colpali-engine" in median:
            line += f"; {median['colpali-engine'] / median['kit']:.2f}x colpali-engine (target {TARGET_VS_PEER:.0f}x)"
        print(line)
        print(f"  max |kit - per-pair MaxSim| = {error:.1e} (tolerance 1e-5)")
        report[case] = {**median, "matmul_share": share, "max_abs_error": error}
    return report


if __name__ == "__main__":
    main()
