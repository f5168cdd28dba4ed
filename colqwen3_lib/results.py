"""Evaluation results on disk and as tables: per-task JSON, `results.json`, summary, benchmark and comparison
tables."""

from __future__ import annotations

import csv
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

from .benchmarks import BENCHMARKS
from .metrics import HEADLINE, SUMMARY_METRICS

RESULTS_FILE = "results.json"
SUMMARY_STEM = "summary"
COMPARISON_STEM = "comparison"


STAGING_DIR = ".evaluating"  # a run's files, inside the output folder, until it has succeeded
PARTIAL_DIR = "partial-evaluation"  # a failed run's finished tasks, when an earlier evaluation is kept


def evaluation_files(output_dir: str | os.PathLike) -> list[Path]:
    """The files of an evaluation in `output_dir`: its task JSONs and `results.json`, and with them the summary
    tables; none when no JSON of an evaluation is there."""
    output_dir = Path(output_dir)
    found = []
    for file in sorted(output_dir.glob("*.json")) if output_dir.is_dir() else []:
        try:
            data = json.loads(file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(data, dict) and (file.name == RESULTS_FILE or {"task", "metrics"} <= data.keys()):
            found.append(file)
    if not found:  # summary tables alone are no evaluation: they may be a user's own
        return []
    return found + [t for t in (output_dir / f"{SUMMARY_STEM}{s}" for s in (".csv", ".md")) if t.exists()]


def clear_previous_results(output_dir: str | os.PathLike) -> list[Path]:
    """Remove an earlier evaluation's files from `output_dir` (`evaluation_files`); other files are left alone.

    Returns what was removed, so that the caller can say so.
    """
    removed = evaluation_files(output_dir)
    for file in removed:
        file.unlink()
    return removed


def publish(staging: Path, output_dir: Path) -> list[Path]:
    """Move a run's files from `staging` into `output_dir`, in place of an earlier evaluation's; returns what was
    replaced. Other files in `output_dir` are left alone."""
    removed = clear_previous_results(output_dir)
    for file in sorted(staging.iterdir()):
        os.replace(file, output_dir / file.name)
    staging.rmdir()
    return removed


def write_task_result(name: str, result: dict, output_dir: str | os.PathLike, metadata: dict) -> Path:
    """Write one task's result as `<task>.json` (so a later failure loses nothing already measured)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / f"{name.replace('/', '_')}.json"
    path.write_text(json.dumps({"task": name, "metadata": metadata, **result}, indent=2) + "\n")
    return path


def write_results(
    results: dict[str, dict], output_dir: str | os.PathLike, metadata: dict | None = None
) -> Path:
    """Write one JSON per task (`<task>.json`), `results.json` (all tasks, their benchmarks' scores) and the
    summary tables (`summary.csv`: one row per task and their average; `summary.md`: that and, below it,
    each benchmark's main score).

    Returns:
        The path of `results.json`.
    """
    output_dir = Path(output_dir)
    metadata = dict(metadata or {})
    metadata.setdefault("timestamp", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    protocols = sorted({r["protocol"] for r in results.values() if "protocol" in r})
    if len(protocols) == 1:
        metadata.setdefault("protocol", protocols[0])
    for name, result in results.items():
        write_task_result(name, result, output_dir, metadata)
    path = output_dir / RESULTS_FILE
    benchmarks = benchmark_rows(results)
    path.write_text(
        json.dumps({"metadata": metadata, "results": results, "benchmarks": benchmarks}, indent=2) + "\n"
    )
    _write_table(summary_rows(results), output_dir / SUMMARY_STEM)
    if benchmarks:
        with open(output_dir / f"{SUMMARY_STEM}.md", "a") as f:
            f.write("\nBenchmarks: the mean over their tasks of their main score, x 100.\n\n")
            f.write(markdown_table(benchmarks) + "\n")
    return path


def summary_rows(results: dict[str, dict], metrics: Sequence[str] = SUMMARY_METRICS) -> list[dict]:
    """One row per task plus `average` (the mean over tasks): task, n_queries, n_pages and `metrics`."""
    rows = [
        {
            "task": name,
            "n_queries": r["n_queries"],
            "n_pages": r["n_pages"],
            **{m: r["metrics"][m] for m in metrics},
        }
        for name, r in results.items()
    ]
    if rows:
        rows.append(
            {
                "task": "average",
                "n_queries": sum(r["n_queries"] for r in rows),
                "n_pages": sum(r["n_pages"] for r in rows),
                **{m: sum(r[m] for r in rows) / len(rows) for m in metrics},
            }
        )
    return rows


def benchmark_rows(results: dict[str, dict]) -> list[dict]:
    """One row per benchmark (and protocol) whose tasks `results` holds: its main score averaged over them.

    Rows: benchmark (its name), protocol, main_score (the metric), score, tasks ("evaluated/public", and
    the private tasks it leaves out). A benchmark missing tasks is not the leaderboard's number: see `tasks`.
    """
    groups: dict[tuple[str, str], list[dict]] = {}
    for result in results.values():
        if result.get("benchmark") and result.get("protocol") in BENCHMARKS:
            groups.setdefault((result["protocol"], result["benchmark"]), []).append(result)
    rows = []
    for (protocol, alias), members in groups.items():
        bench = BENCHMARKS[protocol][alias]
        tasks = f"{len(members)}/{len(bench.tasks)}" + (
            f" (+{len(bench.private)} private)" if bench.private else ""
        )
        rows.append(
            {
                "benchmark": bench.name,
                "protocol": protocol,
                "main_score": bench.main_score,
                "score": sum(r["metrics"][bench.main_score] for r in members) / len(members),
                "tasks": tasks,
            }
        )
    return rows


def rounded(value, digits: int = 4):
    """`value` with every float in it (in dicts and lists too) rounded to `digits` decimals, for display."""
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, dict):
        return {key: rounded(item, digits) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [rounded(item, digits) for item in value]
    return value


def markdown_table(rows: list[dict]) -> str:
    """Rows as a Markdown table; metric values (floats) shown x100 with two decimals."""
    if not rows:
        return ""
    columns = list(rows[0])
    lines = [
        "| " + " | ".join(columns) + " |",
        "|" + "|".join("---:" if isinstance(rows[0][c], int | float) else "---" for c in columns) + "|",
    ]
    for row in rows:
        cells = [
            f"{row[c] * 100:+.2f}"
            if c.startswith("delta")
            else f"{row[c] * 100:.2f}"
            if isinstance(row[c], float)
            else str(row[c])
            for c in columns
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _write_table(rows: list[dict], stem: Path) -> None:
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["task"])
        writer.writeheader()
        writer.writerows(rows)
    stem.with_suffix(".md").write_text("Scores x 100.\n\n" + markdown_table(rows) + "\n")


def read_results(path: str | os.PathLike) -> dict[str, dict]:
    """Task -> result from `results.json`, one task's JSON, or an output directory.

    Raises:
        ValueError: nothing readable as results there.
    """
    path = Path(path)
    if path.is_dir():
        if (path / RESULTS_FILE).exists():
            path = path / RESULTS_FILE
        else:
            found = {}
            for file in sorted(path.glob("*.json")):
                found.update(read_results(file))
            if not found:
                raise ValueError(
                    f"{path} holds no evaluation results (no {RESULTS_FILE}, no task JSON files)"
                )
            return found
    if not path.exists():
        raise ValueError(f"no results at {path}; pass a results.json, a task JSON or an output directory")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not JSON: {err}") from err
    if isinstance(data, dict) and isinstance(data.get("results"), dict):
        return data["results"]
    if isinstance(data, dict) and "task" in data and isinstance(data.get("metrics"), dict):
        return {data["task"]: data}
    raise ValueError(
        f"{path} is not an evaluation result file (expected keys 'results', or 'task' and 'metrics')"
    )


def compare_results(
    before: dict[str, dict] | str | os.PathLike,
    after: dict[str, dict] | str | os.PathLike,
    metrics: Sequence[str] = HEADLINE,
) -> list[dict]:
    """Per-task before/after/delta of `metrics` for the tasks both have, plus their `average`.

    Raises:
        ValueError: the two results share no task.
    """
    before = before if isinstance(before, dict) else read_results(before)
    after = after if isinstance(after, dict) else read_results(after)
    common = [name for name in before if name in after]
    if not common:
        raise ValueError(f"the two results share no task: {sorted(before)} vs {sorted(after)}")
    rows = []
    for name in common:
        row: dict = {"task": name}
        for m in metrics:
            old, new = before[name]["metrics"][m], after[name]["metrics"][m]
            row.update({f"{m} before": old, f"{m} after": new, f"delta {m}": new - old})
        rows.append(row)
    average = {"task": "average"}
    for column in rows[0]:
        if column != "task":
            average[column] = sum(r[column] for r in rows) / len(rows)
    rows.append(average)
    return rows


def write_comparison(rows: list[dict], output_dir: str | os.PathLike) -> Path:
    """Write `comparison.csv` and `comparison.md`; returns the Markdown path."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    _write_table(rows, output_dir / COMPARISON_STEM)
    return output_dir / f"{COMPARISON_STEM}.md"
