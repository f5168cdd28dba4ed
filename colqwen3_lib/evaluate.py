"""Evaluate a ColQwen3 checkpoint (and LoRA adapter) on ViDoRe, or compare two result files.

    python -m colqwen3_lib.evaluate --model-path tiny --datasets synthetic --output-dir runs/eval
    python -m colqwen3_lib.evaluate --model-path Qwen/Qwen3-VL-2B-Instruct --adapter runs/colqwen3 \\
        --datasets vidore-v1 vidore-v2 vidore-v3 --output-dir runs/eval-vidore [--protocol vidore-benchmark]
    python -m colqwen3_lib.evaluate --compare runs/eval-before runs/eval-after [--output-dir runs/compare]
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import time
from pathlib import Path

from . import evaluation as ev
from . import results as rs
from .benchmarks import VIDORE_V1, VIDORE_V2, VIDORE_V3
from .metrics import PROTOCOL, PROTOCOLS
from .model import ATTENTION_IMPLEMENTATIONS, load_model
from .reference import MAX_VISUAL_TOKENS
from .synthetic import SYNTHETIC
from .tasks import SPLIT, expand_datasets


def positive_int(text: str) -> int:
    """argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m colqwen3_lib.evaluate",
        description="NDCG@k on ViDoRe (QA, BEIR and mteb's per-language layouts), as mteb computes it for the "
        "public leaderboard (--protocol mteb, the default) or as vidore-benchmark does.",
    )
    parser.add_argument("--model-path", help="hub id, local checkpoint, or `tiny` for the offline checkpoint")
    parser.add_argument("--adapter", help="directory of a LoRA adapter saved by PeftModel.save_pretrained")
    parser.add_argument(
        "--datasets",
        nargs="+",
        default=[SYNTHETIC],
        help=f"ViDoRe hub ids (owner/name or owner/name@revision), local dataset paths, `{SYNTHETIC}` (default: "
        f"the offline test sets), `{VIDORE_V1}`, `{VIDORE_V2}` or `{VIDORE_V3}` (each benchmark's public tasks at "
        "the revisions mteb pins); space- or comma-separated",
    )
    parser.add_argument(
        "--protocol",
        choices=PROTOCOLS,
        default=PROTOCOL,
        help="how datasets are read and scored: `mteb` (default; the public leaderboard's: k up to 1000, "
        "QA sets as their BEIR mirrors, language subsets averaged) or `vidore-benchmark`",
    )
    parser.add_argument("--output-dir", help="where the result files go (required to evaluate)")
    parser.add_argument("--split", default=SPLIT)
    parser.add_argument(
        "--batch-size", type=positive_int, default=ev.BATCH_SIZE, help="pages per forward pass"
    )
    parser.add_argument("--query-batch-size", type=positive_int, default=ev.QUERY_BATCH_SIZE)
    parser.add_argument(
        "--score-batch-size", type=positive_int, default=ev.SCORE_BATCH_SIZE, help="queries per MaxSim block"
    )
    parser.add_argument(
        "--max-visual-tokens",
        type=positive_int,
        help=f"visual tokens per page (default: the trained processor's, else {MAX_VISUAL_TOKENS})",
    )
    parser.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda when available)")
    parser.add_argument("--attn-implementation", choices=ATTENTION_IMPLEMENTATIONS)
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    parser.add_argument(
        "--compare",
        nargs=2,
        metavar=("BEFORE", "AFTER"),
        help="compare two results (results.json, a task JSON or an output directory) instead of evaluating",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.compare:
            rows = rs.compare_results(*args.compare)
            print(rs.markdown_table(rows))
            if args.output_dir:
                print(f"\nwrote {rs.write_comparison(rows, args.output_dir)} (and .csv)")
            return 0
        if not args.model_path or not args.output_dir:
            parser.error(
                "--model-path and --output-dir are needed to evaluate (or use --compare BEFORE AFTER)"
            )
        expand_datasets(args.datasets, args.protocol)  # every name checked before the model loads
        out = Path(args.output_dir)
        if out.exists() and not out.is_dir():
            raise ValueError(f"--output-dir {out} is a file; give a folder")
        earlier = rs.evaluation_files(out)
        others = (
            sorted(p.name for p in out.iterdir() if p.name not in (rs.STAGING_DIR, rs.PARTIAL_DIR))
            if out.is_dir()
            else []
        )
        if others and not earlier:
            raise ValueError(
                f"--output-dir {out} holds files that are no evaluation's ({', '.join(others[:3])}"
                + (", ..." if len(others) > 3 else "")
                + "): an evaluation writes results.json, summary.csv/.md and one JSON per task there. "
                "Choose a new or empty folder"
            )
        start = time.perf_counter()
        model, processor = load_model(
            args.model_path,
            adapter=args.adapter,
            max_visual_tokens=args.max_visual_tokens,
            device=args.device,
            attn_implementation=args.attn_implementation,
        )
        metadata = {
            "model_path": args.model_path,
            "adapter": args.adapter,
            "datasets": args.datasets,
            "protocol": args.protocol,
            "split": args.split,
            "max_visual_tokens": processor.max_num_visual_tokens,
            "batch_size": args.batch_size,
            "device": str(next(model.parameters()).device),
            "dtype": str(next(model.parameters()).dtype),
        }
        if earlier:
            print(
                f"replacing an earlier evaluation in {out} ({len(earlier)} files), kept until this one succeeds"
            )
        staging = out / rs.STAGING_DIR
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        try:
            results = ev.evaluate_model(
                model,
                processor,
                args.datasets,
                split=args.split,
                batch_size=args.batch_size,
                query_batch_size=args.query_batch_size,
                score_batch_size=args.score_batch_size,
                show_progress=not args.no_progress,
                on_task_done=lambda name, result: rs.write_task_result(name, result, staging, metadata),
                protocol=args.protocol,
            )
            metadata["seconds"] = round(time.perf_counter() - start, 2)
            rs.write_results(results, staging, metadata)
        except BaseException:
            _keep_finished_tasks(staging, out, bool(earlier))
            raise
        rs.publish(staging, out)
        path = out / rs.RESULTS_FILE
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(rs.markdown_table(rs.summary_rows(results)))
    benchmarks = rs.benchmark_rows(results)
    if benchmarks:
        print("\n" + rs.markdown_table(benchmarks))
    print(f"\nwrote {path}, one JSON per task and summary.csv/.md in {args.output_dir}")
    return 0


def _keep_finished_tasks(staging: Path, out: Path, earlier: bool) -> None:
    """After a failure: the tasks finished so far go into `out`, or, where an earlier evaluation is, beside it
    in `out/partial-evaluation` (the earlier one stays whole)."""
    if not any(staging.iterdir()):
        staging.rmdir()
    elif earlier:
        partial = out / rs.PARTIAL_DIR
        shutil.rmtree(partial, ignore_errors=True)
        os.replace(staging, partial)
        print(
            f"the earlier evaluation in {out} is kept; the tasks finished before the error are in {partial}"
        )
    else:
        rs.publish(staging, out)


if __name__ == "__main__":
    sys.exit(main())
