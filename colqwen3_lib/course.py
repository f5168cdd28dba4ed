"""Run the course notebooks in order with papermill.

    python -m colqwen3_lib.course                                  # tiny profile, offline, CPU
    python -m colqwen3_lib.course --profile 2b --output-dir runs/2b
    python -m colqwen3_lib.course -p MAX_STEPS 40 --only 03_lora_training 04_vidore_eval

Writes, under the output directory: each executed notebook, its `metrics.json` (in a folder named
after the notebook), an HTML rendering of each executed notebook plus `index.html` (the pages link each
other: index, previous and next notebook), and
`summary.json` / `summary.md` with per-notebook status, time and metrics. The training notebook's
adapter is passed on to the evaluation notebook. A failing notebook stops the run with its name,
cell and error; what earlier notebooks produced stays.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import sys
import tempfile
import time
from html import escape
from pathlib import Path

from .reference import (
    LR,
    MAX_VISUAL_TOKENS,
    MODEL_IDS,
    NUM_TRAIN_EPOCHS,
    RECOMMENDED_BATCHES,
    TRAIN_DATASET,
)

NOTEBOOKS = (
    "00_setup_check",
    "01_processor_and_visual_tokens",
    "02_model_and_late_interaction",
    "03_lora_training",
    "04_vidore_eval",
    "05_troubleshooting_oom",
    "06_search_your_documents",
)
TRAINING_NOTEBOOK = "03_lora_training"  # its adapter (metrics' `adapter_path`) goes to the notebooks after it
# Shared parameters per profile; each notebook receives the ones its parameters cell declares.
# `tiny` keeps every notebook's own defaults, which are the offline CPU settings.
_REAL = {
    "MAX_VISUAL_TOKENS": MAX_VISUAL_TOKENS,
    "TRAIN_DATASET": TRAIN_DATASET,
    "EVAL_DATASETS": "vidore-v1",
    "LOSS": "pairwise",
    "LR": LR,
    "MAX_STEPS": -1,
    "NUM_TRAIN_EPOCHS": NUM_TRAIN_EPOCHS,
    "GRADIENT_CHECKPOINTING": True,
    "TRAINER": "hf",
}


def _real_profile(size: str) -> dict[str, object]:
    """The reference settings for one model size, at the smallest recommended per-device batch."""
    batch = min(b for s, b in RECOMMENDED_BATCHES if s == size)
    profile = {
        **_REAL,
        "BASE_MODEL_PATH": MODEL_IDS[size],
        "MODEL_SIZE": size,
        "PER_DEVICE_TRAIN_BATCH_SIZE": batch,
    }
    if size == "8b":  # 16 per device, accumulated to the 32 at the top of the recommended range
        profile["GRADIENT_ACCUMULATION_STEPS"] = 2
    return profile


PROFILES: dict[str, dict[str, object]] = {
    "tiny": {"BASE_MODEL_PATH": "tiny"},
    **{s: _real_profile(s) for s in MODEL_IDS},
}
DEFAULT_NOTEBOOKS_DIR = Path(__file__).resolve().parents[1] / "notebooks"


class NotebookFailed(RuntimeError):
    """A course notebook raised; the message names the notebook, the cell and the error."""


def _parse_value(text: str):
    """`-p KEY VALUE`: Python literals (numbers, True, None, quoted strings) or plain strings."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def declared_parameters(notebook: Path) -> dict[str, str]:
    """The parameters a notebook declares, with the type its parameters cell gives each (`bool`, `int`, ...)."""
    import papermill

    return {
        name: info["inferred_type_name"] for name, info in papermill.inspect_notebook(str(notebook)).items()
    }


BOOLEAN_WORDS = {
    "true": True,
    "false": False,
    "yes": True,
    "no": False,
    "on": True,
    "off": False,
    "1": True,
    "0": False,
}


def as_declared(key: str, value, type_name: str):
    """`-p KEY VALUE` as the notebook declares KEY: a bool from true/false, yes/no, on/off or 1/0 in any case; a
    number where a number is declared.

    Raises:
        ValueError: the value is not of the declared kind.
    """
    if type_name == "bool":
        word = str(value).strip().lower()
        if word not in BOOLEAN_WORDS:
            raise ValueError(f"-p {key} takes true or false (or yes/no, on/off, 1/0), got {value!r}")
        return BOOLEAN_WORDS[word]
    if type_name in ("int", "float") and (isinstance(value, str | bool) or value is None):
        raise ValueError(f"-p {key} takes a number, got {value!r}")
    return value


TEMPLATES = Path(__file__).parent / "templates"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_NOTE = (
    "*Interactive in JupyterLab (`make lab`): this widget redraws the figure for other values. The static figure "
    "of its default state is shown above.*"
)
# The kernel's own log (its "running over TCP" notice, "KeyboardInterrupt caught in kernel" at shutdown) is not
# the learner's business; errors still show.
KERNEL_ARGUMENTS = ["--IPKernelApp.log_level=ERROR"]


# How long one wait for a kernel message lasts before the socket is asked again (see `_kernel_client_class`).
MESSAGE_POLL_S = 1.0


def _kernel_client_class():
    """An async kernel client that waits for messages in `MESSAGE_POLL_S` slices.

    A ZeroMQ socket signals new messages once (edge-triggered). Under load the client's event loop can miss
    that signal, and a reply already delivered then sits unread until the cell's timeout, with the kernel idle.
    Asking the socket again after each slice turns a missed signal into a delay of at most a second.
    """
    from queue import Empty

    from jupyter_client.asynchronous import AsyncKernelClient
    from jupyter_client.channels import AsyncZMQSocketChannel

    class PollingChannel(AsyncZMQSocketChannel):
        async def get_msg(self, timeout=None):
            deadline = None if timeout is None else time.monotonic() + timeout
            while True:
                left = MESSAGE_POLL_S if deadline is None else max(0.0, deadline - time.monotonic())
                try:
                    return await super().get_msg(timeout=min(MESSAGE_POLL_S, left))
                except Empty:
                    if deadline is not None and time.monotonic() >= deadline:
                        raise

    class PollingKernelClient(AsyncKernelClient):
        shell_channel_class = PollingChannel
        iopub_channel_class = PollingChannel
        stdin_channel_class = PollingChannel
        control_channel_class = PollingChannel

    return PollingKernelClient


def _kernel_manager_class(folder: Path):
    """papermill's kernel manager: the polling client above, and kernels that talk over Unix sockets in
    `folder`, not TCP ports, so no other process can take a port from under a running course (and the kernel
    prints no "running over TCP" notice). Windows, which has no Unix sockets, and a `folder` too deep for a
    socket's path keep TCP."""
    import itertools

    import zmq
    from jupyter_client.manager import AsyncKernelManager

    client = _kernel_client_class()
    kernels = itertools.count()
    longest = getattr(zmq, "IPC_PATH_MAX_LEN", 103)

    class CourseKernelManager(AsyncKernelManager):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.client_factory = client
            path = str(folder / f"kernel{next(kernels)}")
            if os.name != "nt" and len(path) + len("-5") <= longest:  # the channels are <path>-1 ... <path>-5
                self.transport = "ipc"
                self.ip = path

    return CourseKernelManager


# No cell of the tiny course runs a minute on a laptop: a cell still running after 10 minutes is stuck, and the
# run stops with its name instead of waiting for ever. Real models get no limit.
TINY_CELL_TIMEOUT_S = 600


def render_html(executed: Path, target: Path) -> None:
    """An executed notebook as one HTML page that reads offline: nothing is fetched from a CDN, and each
    widget output (which would need the widget manager) is replaced by a note pointing to its static figure.
    Its navigation bars stay empty until `link_pages`."""
    import nbformat
    from nbconvert import HTMLExporter

    nb = nbformat.read(executed, as_version=4)
    nb.metadata.pop("widgets", None)
    if nb.cells and nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# "):
        nb.metadata.setdefault("title", notebook_intro(executed)[0])  # the page's title: its H1
    for cell in nb.cells:
        for i, output in enumerate(cell.get("outputs", [])):
            if WIDGET_VIEW in output.get("data", {}):
                cell.outputs[i] = nbformat.v4.new_output("display_data", data={"text/markdown": WIDGET_NOTE})
    exporter = HTMLExporter(extra_template_basedirs=[str(TEMPLATES)], template_name="offline")
    body, _ = exporter.from_notebook_node(nb)
    target.write_text(body)


def notebook_intro(notebook: Path) -> tuple[str, str]:
    """A notebook's title (its H1) and what it teaches (the paragraph under the title)."""
    import nbformat

    text = "".join(nbformat.read(notebook, as_version=4).cells[0].source).strip().split("\n\n")
    title = text[0].lstrip("# ").strip()
    return title, " ".join(text[1].split()) if len(text) > 1 else ""


def _intro(notebooks_dir: Path, name: str) -> tuple[str, str]:
    """`notebook_intro` of a course notebook; its name and no description when its source is not there."""
    source = notebooks_dir / f"{name}.ipynb"
    return notebook_intro(source) if source.exists() else (name, "")


# The navigation bar at the top and the bottom of each notebook page: the offline template writes it empty,
# `link_pages` fills it in.
NAV = re.compile(r'(<nav [^>]*class="course-nav"[^>]*>).*?(</nav>)', re.DOTALL)


def link_pages(output_dir: str | Path, notebooks_dir: str | Path = DEFAULT_NOTEBOOKS_DIR) -> None:
    """Fill the navigation bars of the notebook pages in `output_dir/html`: a link to the landing page and to
    the previous and next notebook, in course order, among the pages that folder holds. A run of some
    notebooks (`--only`) thus links past the pages it lacks, and no link points to a missing page.

    Args:
        output_dir: The course run's folder: `index.html` and `html/<notebook>.html`.
        notebooks_dir: Where the source notebooks are, for their titles.
    """
    html = Path(output_dir) / "html"
    pages = [name for name in NOTEBOOKS if (html / f"{name}.html").exists()]
    titles = {name: escape(_intro(Path(notebooks_dir), name)[0]) for name in pages}
    index = ['<a href="../index.html">Course index</a>'] if (html.parent / "index.html").exists() else []
    for before, name, after in zip([None, *pages], pages, [*pages[1:], None]):
        links = list(index)
        if before:
            links.append(f'<a rel="prev" href="{before}.html">&larr; {titles[before]}</a>')
        if after:
            links.append(f'<a rel="next" href="{after}.html">{titles[after]} &rarr;</a>')
        _fill_bars(html / f"{name}.html", "".join(links))


def _fill_bars(page: Path, links: str) -> None:
    text = page.read_text()
    linked = NAV.sub(lambda bar: bar[1] + links + bar[2], text)
    if linked != text:
        page.write_text(linked)


# The metrics the landing page shows for each notebook (the rest are in summary.json).
KEY_METRICS = {
    "00_setup_check": ("ok", "attention"),
    "01_processor_and_visual_tokens": ("visual_tokens", "query_tokens"),
    "02_model_and_late_interaction": ("top1_accuracy", "embedding_dim"),
    "03_lora_training": ("steps", "first_loss", "final_loss", "train_seconds"),
    "04_vidore_eval": ("ndcg_at_5_untrained", "ndcg_at_5"),
    "05_troubleshooting_oom": ("predicted_gib", "max_abs_error", "suggested_batch_size"),
    "06_search_your_documents": ("n_pages", "reload_identical"),
}


def _inline_code(text: str) -> str:
    """Markdown's `code` spans as <code>."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", text)


def _shown(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return escape(str(value))


def _write_summary(output_dir: Path, rows: list[dict], notebooks_dir: Path = DEFAULT_NOTEBOOKS_DIR) -> None:
    (output_dir / "summary.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = ["| notebook | status | seconds | metrics |", "| --- | --- | --- | --- |"]
    for row in rows:
        metrics = ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
            for k, v in row.get("metrics", {}).items()
            if isinstance(v, int | float | str) and not isinstance(v, bool)
        )
        lines.append(f"| {row['notebook']} | {row['status']} | {row['seconds']:.1f} | {metrics} |")
    (output_dir / "summary.md").write_text("\n".join(lines) + "\n")
    (output_dir / "index.html").write_text(_landing_page(output_dir, rows, notebooks_dir))


def _landing_page(output_dir: Path, rows: list[dict], notebooks_dir: Path) -> str:
    """index.html: each notebook's title, what it teaches, its time, key metrics, and the total time."""
    items = []
    for row in rows:
        name = row["notebook"]
        title, teaches = _intro(notebooks_dir, name)
        link = (
            f'<a href="html/{name}.html">{escape(title)}</a>'
            if (output_dir / "html" / f"{name}.html").exists()
            else escape(title)
        )
        shown = [k for k in KEY_METRICS.get(name, ()) if k in row.get("metrics", {})]
        metrics = "".join(f"<li><code>{k}</code> {_shown(row['metrics'][k])}</li>" for k in shown)
        status = "" if row["status"] == "ok" else f' <strong class="failed">{escape(row["status"])}</strong>'
        items.append(
            f"<tr><td>{link}{status}<p>{_inline_code(escape(teaches))}</p></td><td class='time'>{row['seconds']:.0f} s</td>"
            f"<td><ul>{metrics}</ul></td></tr>"
        )
    total = sum(r["seconds"] for r in rows)
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'><title>ColQwen3 course run</title><style>"
        "body{font-family:sans-serif;max-width:60em;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;width:100%}td{border-top:1px solid #ccc;padding:.6em;vertical-align:top}"
        "td p{margin:.3em 0 0;color:#555;font-size:.92em}ul{margin:0;padding-left:1.1em}.failed{color:#b00}"
        ".time{white-space:nowrap}"
        "</style></head><body><h1>ColQwen3 course run</h1>"
        f"<p>{len(rows)} notebooks, {total:.0f} s in all. Each page below reads offline.</p>"
        f"<table><tr><th>notebook</th><th>time</th><th>key metrics</th></tr>{''.join(items)}</table></body></html>\n"
    )


def _earlier_rows(output_dir: Path) -> dict[str, dict]:
    """The rows of an earlier run's summary.json in `output_dir`, by notebook (empty if none or unreadable)."""
    try:
        return {row["notebook"]: row for row in json.loads((output_dir / "summary.json").read_text())}
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        return {}


def _execute(
    notebooks_dir: Path, name: str, executed: Path, params: dict, profile: str, progress: bool, kernel_manager
) -> str | None:
    """Run one notebook with papermill into `executed`: None when every cell ran, else what stopped it."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    try:
        papermill.execute_notebook(
            str(notebooks_dir / f"{name}.ipynb"),
            str(executed),
            parameters=params,
            cwd=str(notebooks_dir),
            progress_bar=progress,
            extra_arguments=KERNEL_ARGUMENTS,
            execution_timeout=TINY_CELL_TIMEOUT_S if profile == "tiny" else None,
            kernel_manager_class=kernel_manager,
            # The last cell's outputs are in: stopping the kernel at once skips its exit, a garbage collection
            # over all of torch and transformers (about 1.5 s a notebook).
            shutdown_kernel="immediate",
        )
    except PapermillExecutionError as err:
        return (
            f"{name} failed in cell {err.exec_count} (cell index {err.cell_index}): {err.ename}: {err.evalue}"
        )
    except TimeoutError as err:  # nbclient's CellTimeoutError
        return f"{name} stopped: a cell ran past {TINY_CELL_TIMEOUT_S} s ({err})"
    return None


def run_course(
    profile: str = "tiny",
    output_dir: str | Path = "runs/tiny",
    parameters: dict[str, object] | None = None,
    only: list[str] | None = None,
    notebooks_dir: str | Path = DEFAULT_NOTEBOOKS_DIR,
    progress: bool = True,
) -> list[dict]:
    """Execute the course notebooks in order and collect their metrics.

    Args:
        profile: `tiny` (offline, CPU) or `2b`/`4b`/`8b` (real weights, GPU).
        output_dir: Where executed notebooks, metrics, HTML and the summary go.
        parameters: Extra parameters for every notebook that declares them (override the profile's).
        only: Run just these notebooks (by name), still in course order.
        notebooks_dir: Folder holding the `NN_slug.ipynb` notebooks.
        progress: Show papermill's per-cell progress bars.

    Returns:
        One row per notebook: name, status, seconds, metrics.

    Raises:
        NotebookFailed: a notebook raised; earlier results are kept and the summary says which failed.
        ValueError: unknown profile, notebook or parameter name.
    """

    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose one of {sorted(PROFILES)}")
    names = list(NOTEBOOKS) if not only else [n for n in NOTEBOOKS if n in only]
    unknown = set(only or ()) - set(NOTEBOOKS)
    if unknown:
        raise ValueError(f"unknown notebooks {sorted(unknown)}; the course has {list(NOTEBOOKS)}")
    output_dir = Path(output_dir).resolve()
    notebooks_dir = Path(notebooks_dir)
    declared_by = {name: declared_parameters(notebooks_dir / f"{name}.ipynb") for name in names}
    unused = set(parameters or ()) - set().union(*declared_by.values())
    types = {key: kind for declared in declared_by.values() for key, kind in declared.items()}
    if unused:
        known = sorted(set().union(*declared_by.values()))
        raise ValueError(
            f"no notebook run here declares the parameter(s) {sorted(unused)}; they declare {known}"
        )
    parameters = {key: as_declared(key, value, types[key]) for key, value in (parameters or {}).items()}
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"--output-dir {output_dir} is a file; give a folder")
    try:
        (output_dir / "html").mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(
            f"cannot write to --output-dir {output_dir} ({err.strerror}); choose a folder you can write to"
        ) from err
    shared = {**PROFILES[profile], **parameters}
    earlier = _earlier_rows(output_dir)  # a rerun into the same folder keeps the other notebooks' results
    # The adapter trained in 03 flows on to the notebooks after it (an earlier run's, on a rerun), never back to
    # 02, whose lesson is the untrained head; `-p ADAPTER_PATH` sets it for all.
    trained = earlier.get(TRAINING_NOTEBOOK, {}).get("metrics", {}).get("adapter_path")
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="colqwen3-kernels-") as kernels:  # their Unix sockets
        kernel_manager = _kernel_manager_class(Path(kernels))
        for position, name in enumerate(names, 1):
            work_dir = output_dir / name
            work_dir.mkdir(exist_ok=True)
            after_training = NOTEBOOKS.index(name) > NOTEBOOKS.index(TRAINING_NOTEBOOK)
            adapter = {"ADAPTER_PATH": trained} if trained and after_training else {}
            params = {
                k: v
                for k, v in {**adapter, **shared, "OUTPUT_DIR": str(work_dir)}.items()
                if k in declared_by[name]
            }
            print(
                f"[{position}/{len(names)}] {name} ({', '.join(f'{k}={v}' for k, v in params.items())})",
                flush=True,
            )
            executed = output_dir / f"{name}.ipynb"
            start = time.perf_counter()
            error = _execute(notebooks_dir, name, executed, params, profile, progress, kernel_manager)
            seconds = time.perf_counter() - start
            status = "failed" if error else "ok"
            metrics_file = work_dir / "metrics.json"
            metrics = json.loads(metrics_file.read_text()) if metrics_file.exists() and not error else {}
            rows.append(
                {"notebook": name, "status": status, "seconds": round(seconds, 2), "metrics": metrics}
            )
            if executed.exists():
                render_html(executed, output_dir / "html" / f"{name}.html")
            earlier[name] = rows[-1]
            _write_summary(output_dir, [earlier[n] for n in NOTEBOOKS if n in earlier], notebooks_dir)
            link_pages(output_dir, notebooks_dir)
            print(f"    {status} in {seconds:.1f} s", flush=True)
            if error:
                raise NotebookFailed(error + f" (executed notebook: {executed})")
            if "adapter_path" in metrics:
                trained = metrics["adapter_path"]
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--profile", default="tiny", choices=sorted(PROFILES), help="model and settings (default tiny)"
    )
    parser.add_argument("--output-dir", default=None, help="where results go (default runs/PROFILE)")
    parser.add_argument(
        "-p",
        "--parameter",
        nargs=2,
        action="append",
        default=[],
        metavar=("KEY", "VALUE"),
        help="override a notebook parameter, e.g. -p MAX_STEPS 40 (repeatable)",
    )
    parser.add_argument(
        "--only", nargs="+", default=None, metavar="NOTEBOOK", help="run only these notebooks"
    )
    parser.add_argument(
        "--notebooks-dir", default=str(DEFAULT_NOTEBOOKS_DIR), help="folder with the notebooks"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide per-cell progress bars")
    args = parser.parse_args(argv)
    output_dir = args.output_dir or f"runs/{args.profile}"
    parameters = {key: _parse_value(value) for key, value in args.parameter}
    start = time.perf_counter()
    try:
        rows = run_course(
            args.profile, output_dir, parameters, args.only, args.notebooks_dir, not args.no_progress
        )
    except NotebookFailed as err:
        print(f"\nCourse stopped: {err}", file=sys.stderr)
        return 1
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"\nCourse finished in {time.perf_counter() - start:.0f} s; results in {output_dir}/summary.md:\n")
    print((Path(output_dir) / "summary.md").read_text())
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
