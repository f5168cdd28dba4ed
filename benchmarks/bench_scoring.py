"""MaxSim throughput: `score_multi_vector` against the plain einsum reference, measured in one run.

    python benchmarks/bench_scoring.py                 # 64 queries x 20 tokens vs 1,000 pages x 768 tokens
    python benchmarks/bench_scoring.py --pages 250     # quicker; the reference alone needs ~4 GB at 1,000 pages

Runs alternate (fast, reference, plain matrix multiply) so that a busy machine slows all of them
alike; medians are reported. The plain matrix multiply is the same product without the max and the
sum: the rate any exact MaxSim built on a matrix multiply can at best reach on this machine.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from colqwen3_lib.scoring import score_multi_vector, score_multi_vector_reference


def _timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def _plain_matmul(q: torch.Tensor, p: torch.Tensor, pages_per_block: int = 8) -> None:
    """(query tokens x dim) @ (dim x page tokens), block by block, results thrown away."""
    q_t = q.reshape(-1, q.shape[-1]).T.contiguous()  # (dim, n_q * q_tokens)
    out = torch.empty(pages_per_block * p.shape[1], q_t.shape[1])
    for start in range(0, p.shape[0], pages_per_block):
        block = p[start : start + pages_per_block].reshape(-1, p.shape[-1])  # (c * p_tokens, dim)
        torch.mm(block, q_t, out=out[: block.shape[0]])


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=64)
    parser.add_argument("--query-tokens", type=int, default=20)
    parser.add_argument("--pages", type=int, default=1000)
    parser.add_argument("--page-tokens", type=int, default=768)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each; medians are reported")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    generator = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(
        torch.randn(args.queries, args.query_tokens, args.dim, generator=generator), dim=-1
    )  # (n_q, q_tokens, dim)
    p = torch.nn.functional.normalize(
        torch.randn(args.pages, args.page_tokens, args.dim, generator=generator), dim=-1
    )  # (n_p, p_tokens, dim)
    gflop = 2 * args.queries * args.query_tokens * args.pages * args.page_tokens * args.dim / 1e9

    times: dict[str, list[float]] = {"fast": [], "reference": [], "matmul": []}
    max_diff = 0.0
    for _ in range(args.repeats):
        elapsed, fast = _timed(lambda: score_multi_vector(q, p))
        times["fast"].append(elapsed)
        elapsed, reference = _timed(lambda: score_multi_vector_reference(q, p))
        times["reference"].append(elapsed)
        max_diff = max(max_diff, (fast - reference).abs().max().item())
        del reference
        times["matmul"].append(_timed(lambda: _plain_matmul(q, p))[0])
    median = {name: statistics.median(values) for name, values in times.items()}

    print(
        f"MaxSim: {args.queries} queries x {args.query_tokens} tokens vs {args.pages} pages x "
        f"{args.page_tokens} tokens x {args.dim} dims, float32, {torch.get_num_threads()} threads, "
        f"median of {args.repeats} alternating runs ({gflop:.0f} GFLOP each)"
    )
    for name, label in (
        ("reference", "einsum reference"),
        ("fast", "score_multi_vector"),
        ("matmul", "plain matmul"),
    ):
        runs = ", ".join(f"{t:.2f}" for t in times[name])
        print(f"  {label:<19} {median[name]:8.2f} s  {gflop / median[name]:7.1f} GFLOP/s   (runs: {runs} s)")
    ratio = median["reference"] / median["fast"]
    share = median["matmul"] / median["fast"]
    print(f"  speed-up over the reference: {ratio:.2f}x")
    print(f"  share of the plain matmul rate: {share:.0%}")
    print(f"  max |fast - reference| = {max_diff:.1e}")
    return {"speedup": ratio, "matmul_share": share, "max_abs_diff": max_diff, **median}


if __name__ == "__main__":
    main()
