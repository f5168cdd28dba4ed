"""End-to-end demo: checkpoint -> embed pages and queries -> MaxSim -> top-5 per query.

python -m colqwen3_lib.demo                       # offline: tiny checkpoint, synthetic pages
python -m colqwen3_lib.demo --model-path Qwen/Qwen3-VL-2B-Instruct --dataset vidore/docvqa_test_subsampled
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from .data import load_split
from .evaluate import positive_int
from .evaluation import embed_images, embed_queries
from .model import HEAD, ColQwen3
from .processor import ColQwen3Processor


def run(model_path: str, dataset: str, n_queries: int, max_visual_tokens: int, batch_size: int) -> list[dict]:
    """Retrieve the top-5 pages of `dataset`'s test split for its first `n_queries` queries."""
    rows = load_split(dataset, "test")  # first: a missing dataset fails before the model loads
    processor = ColQwen3Processor.from_pretrained(model_path, max_num_visual_tokens=max_visual_tokens)
    model = ColQwen3.from_pretrained(model_path, torch_dtype=torch.float32).eval()
    pages = rows.select_columns(["image", "image_filename"])
    queries = [(q, f) for q, f in zip(rows["query"], rows["image_filename"]) if q is not None][:n_queries]

    start = time.perf_counter()
    page_embs = embed_images(model, processor, list(pages["image"]), batch_size)
    query_embs = embed_queries(model, processor, [q for q, _ in queries])
    scores = processor.score(query_embs, page_embs)  # (n_queries, n_pages)
    elapsed = time.perf_counter() - start

    results = []
    filenames = list(pages["image_filename"])
    for (query, relevant), row in zip(queries, scores):
        top = row.topk(min(5, len(filenames)))
        results.append(
            {
                "query": query,
                "relevant": relevant,
                "top5": [(filenames[int(i)], float(s)) for s, i in zip(top.values, top.indices)],
            }
        )
    print(f"{len(page_embs)} pages and {len(queries)} queries embedded and scored in {elapsed:.2f} s")
    if any(k.startswith(HEAD) for k in model.loading_info["missing_keys"]):
        print(
            "(the projection head is untrained, so rankings are near chance: train it with colqwen3_lib.train)"
        )
    print()
    for r in results:
        print(f"Q: {r['query']}")
        for rank, (name, score) in enumerate(r["top5"], 1):
            mark = "  <- relevant" if name == r["relevant"] else ""
            print(f"   {rank}. {score:7.3f}  {name}{mark}")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-path", default="tiny", help="hub id, local checkpoint or `tiny` (default)")
    parser.add_argument(
        "--dataset", default="synthetic_charts_test", help="ViDoRe-format test set (hub id or path)"
    )
    parser.add_argument("--n-queries", type=positive_int, default=3, help="queries to show (default 3)")
    parser.add_argument(
        "--max-visual-tokens", type=positive_int, default=64, help="visual tokens per page (default 64)"
    )
    parser.add_argument(
        "--batch-size", type=positive_int, default=16, help="pages per forward pass (default 16)"
    )
    args = parser.parse_args(argv)
    try:
        run(args.model_path, args.dataset, args.n_queries, args.max_visual_tokens, args.batch_size)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
