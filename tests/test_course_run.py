"""The whole course, tiny profile, executed with papermill as `make course` runs it, with few training steps.

This checks the wiring: every notebook runs, writes its metrics, and hands its results on (the training
notebook's adapter reaches the evaluation notebook). That training reaches the learning target is proven
once, by the slow test in test_training.py, not here.
"""

import json
import math
import re
from pathlib import Path

import pytest

from colqwen3_lib.course import NOTEBOOKS, run_course

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"

pytestmark = [pytest.mark.notebooks, pytest.mark.slow]

TRAINING_STEPS = 10  # enough to move the adapter; the notebook's own default (300) is for learning


@pytest.fixture(scope="module")
def course(tmp_path_factory):
    out = tmp_path_factory.mktemp("course")
    rows = run_course("tiny", out, {"MAX_STEPS": TRAINING_STEPS}, progress=False)
    return out, {row["notebook"]: row for row in rows}


def test_every_notebook_runs_and_writes_its_metrics(course):
    out, rows = course
    assert list(rows) == list(NOTEBOOKS)
    assert all(row["status"] == "ok" for row in rows.values())
    for name in NOTEBOOKS:
        assert json.loads((out / name / "metrics.json").read_text()) == rows[name]["metrics"]
        assert (out / "html" / f"{name}.html").stat().st_size > 10_000  # rendered, figures embedded
    summary = json.loads((out / "summary.json").read_text())
    assert [r["notebook"] for r in summary] == list(NOTEBOOKS)


def test_setup_check_passes_on_this_machine(course):
    metrics = course[1]["00_setup_check"]["metrics"]
    assert metrics["ok"] and metrics["tiny_ok"] and metrics["n_failures"] == 0


def test_processor_notebook_respects_the_cap(course):
    metrics = course[1]["01_processor_and_visual_tokens"]["metrics"]
    assert 0 < metrics["visual_tokens"] <= metrics["max_visual_tokens"]
    assert metrics["grid"][0] * metrics["grid"][1] == metrics["visual_tokens"]


def test_model_notebook_embeds_with_the_checkpoints_head(course):
    metrics = course[1]["02_model_and_late_interaction"]["metrics"]
    assert metrics["embedding_dim"] == 128


def test_training_notebook_trains_the_steps_asked_and_hands_its_adapter_on(course):
    out, rows = course
    metrics = rows["03_lora_training"]["metrics"]
    assert metrics["steps"] == TRAINING_STEPS  # the course runner's parameter reached the notebook
    assert math.isfinite(metrics["first_loss"]) and math.isfinite(metrics["final_loss"])
    assert (out / "03_lora_training" / "adapter" / "adapter_model.safetensors").exists()
    assert metrics["adapter_path"] == str(out / "03_lora_training" / "adapter")


def test_evaluation_notebook_evaluates_the_trained_adapter(course):
    metrics = course[1]["04_vidore_eval"]["metrics"]
    assert metrics["trained"]
    assert metrics["ndcg_at_5_untrained"] < 0.4  # near chance: 24 queries over 32 pages per task
    assert 0.0 <= metrics["ndcg_at_5"] <= 1.0
    assert metrics["ndcg_at_5"] != metrics["ndcg_at_5_untrained"]  # the adapter changed the rankings


def test_oom_notebook_estimates_within_tolerance(course):
    metrics = course[1]["05_troubleshooting_oom"]["metrics"]
    assert metrics["max_abs_error"] <= 0.25
    assert metrics["finder_batch_size"] <= 24  # the simulated device fails above 24
    # The gradient cache: the same batch in less memory, measured and predicted.
    assert metrics["grad_cache_predicted_gib"] < metrics["predicted_gib"]
    assert metrics["grad_cache_measured_mib"] < metrics["no_cache_measured_mib"]
    assert metrics["grad_cache_max_abs_error"] <= 0.1


# Output a learner should never see in an executed notebook: warnings, errors, tracebacks, raw log lines.
NOISE = ("Warning", "WARNING", "ERROR", "Error", "Traceback", "USDT:", "LOAD REPORT", "[W1", "[IPKernelApp]")


def _outputs(path):
    import nbformat

    for index, cell in enumerate(nbformat.read(path, as_version=4).cells):
        for output in cell.get("outputs", []):
            text = output.get("text") or "".join(
                str(v) for k, v in output.get("data", {}).items() if k.startswith("text/")
            )
            yield index, output.get("name", output["output_type"]), text


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_no_warning_or_error_reaches_the_outputs(course, name):
    out, _ = course
    noisy = [
        f"cell {index} ({kind}): {text.strip()[:200]}"
        for index, kind, text in _outputs(out / f"{name}.ipynb")
        if kind == "stderr" or any(marker in text for marker in NOISE)
    ]
    assert not noisy, "\n".join(noisy)


def test_the_landing_page_lists_every_notebook_with_its_time(course):
    out, rows = course
    page = (out / "index.html").read_text()
    for name in NOTEBOOKS:
        assert f'href="html/{name}.html"' in page
    assert f"{len(NOTEBOOKS)} notebooks" in page and "What ColQwen3 adds to Qwen3-VL" in page


def _open_offline(browser, path) -> dict:
    """Open a page from disk with every request off the machine blocked; what it asked for and what went wrong."""
    seen = {"outside": [], "failed": [], "errors": []}

    def route(route):
        if route.request.url.startswith("file:"):
            return route.continue_()
        seen["outside"].append(route.request.url)
        return route.abort()

    page = browser.new_page()
    page.route("**/*", route)
    page.on("requestfailed", lambda request: seen["failed"].append(request.url))
    page.on("pageerror", lambda error: seen["errors"].append(str(error)))
    page.on(
        "console", lambda message: seen["errors"].append(message.text) if message.type == "error" else None
    )
    page.goto(path.as_uri(), wait_until="load")
    seen["text"] = page.inner_text("body")
    seen["widgets"] = page.locator(".jupyter-widgets, .widget-area").count()
    page.close()
    return seen


def test_every_page_reads_offline_in_a_real_browser(course, chromium):
    """Opened from disk in headless Chromium with every request off the machine blocked: nothing is asked
    for, nothing fails, no script error, no widget left blank, no error text on the page."""
    out, _ = course
    executable, sync_playwright = chromium
    pages = [out / "index.html", *(out / "html" / f"{name}.html" for name in NOTEBOOKS)]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        for path in pages:
            seen = _open_offline(browser, path)
            assert not (seen["outside"] or seen["failed"] or seen["errors"]), (path.name, seen)
            assert "Traceback" not in seen["text"] and "Error:" not in seen["text"], path.name
            assert seen["widgets"] == 0, path.name  # widgets became notes: none is left blank
        browser.close()


def test_a_reader_goes_through_the_course_by_its_links_in_a_real_browser(course, chromium):
    """From the landing page into the first notebook, then "next" to the last one, "previous" back one, and
    "Course index" home: each click lands on the page it names."""
    from colqwen3_lib.course import notebook_intro

    out, _ = course
    executable, sync_playwright = chromium
    titles = [notebook_intro(NOTEBOOK_DIR / f"{name}.ipynb")[0] for name in NOTEBOOKS]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        page = browser.new_page()
        page.goto((out / "index.html").as_uri())
        page.click(f"text={titles[0]}")
        visited = [page.locator("h1").first.inner_text().strip(" ¶")]
        while page.locator("nav.course-nav a[rel=next]").count():
            page.locator("nav.course-nav a[rel=next]").first.click()
            visited.append(page.locator("h1").first.inner_text().strip(" ¶"))
        assert visited == titles
        page.locator("nav.course-nav a[rel=prev]").last.click()  # the bar at the bottom
        assert page.locator("h1").first.inner_text().strip(" ¶") == titles[-2]
        page.click("text=Course index")
        assert page.url == (out / "index.html").as_uri()
        browser.close()


def test_search_notebook_indexes_the_pdf_reloads_it_and_pools_it(course):
    from colqwen3_lib.data import load_split
    from colqwen3_lib.synthetic import SYNTHETIC_TASKS

    metrics = course[1]["06_search_your_documents"]["metrics"]
    assert metrics["trained"]  # the adapter of 03 reached 06 too
    assert metrics["n_pages"] == sum(len(load_split(t, "test")) for t in SYNTHETIC_TASKS)  # every PDF page
    assert 0 < metrics["n_queries"] < metrics["n_pages"]  # distractor pages have no query
    assert metrics["reload_identical"]
    assert metrics["pool_factors"] == [1, 2, 3]
    vectors, size = metrics["vectors"], metrics["index_mb"]
    assert vectors["1"] == round(metrics["tokens_per_page"] * metrics["n_pages"])
    for factor in ("2", "3"):
        assert vectors[factor] <= vectors["1"] / int(factor)  # n_tokens // factor per page
        assert size[factor] == pytest.approx(size["1"] / int(factor), rel=0.1)  # the index shrinks with it
        assert metrics["search_ms"][factor] > 0
    assert all(0.0 <= ndcg <= 1.0 for ndcg in metrics["ndcg_at_5"].values())


# What markdown may state that a run can contradict: a score (NDCG, accuracy), a time, a count of pages, queries or
# steps. Such a number must be in the notebook's own outputs, or its sentence must name the date it was measured
# on (a figure from another run, machine and day). Code spans are settings, not claims.
CLAIMS = re.compile(
    r"(?:NDCG@\d+|accuracy)[^.\d]{0,20}?(\d+\.\d+)"
    r"|(\d+(?:\.\d+)?)\s?(?:ms|s|min|seconds|minutes|hours)\b"
    r"|(\d+(?:,\d{3})*)\s(?:[a-z-]+\s)?(?:pages|queries|steps)\b"
)
DATED = re.compile(r"\b20\d\d-\d\d-\d\d\b")


def unsupported_numbers(path) -> list[str]:
    """The numbers a notebook's markdown states that neither its outputs show nor a date vouches for."""
    import nbformat

    shown = "\n".join(text for _, _, text in _outputs(path))
    found = []
    for cell in nbformat.read(path, as_version=4).cells:
        if cell.cell_type != "markdown":
            continue
        for sentence in re.split(r"(?<=[.;:])\s", re.sub(r"`[^`]*`", "", cell.source)):
            if DATED.search(sentence):
                continue
            for match in CLAIMS.finditer(sentence):
                number = next(group for group in match.groups() if group)
                if not re.search(rf"(?<![\d.]){re.escape(number)}(?![\d]|\.\d)", shown):
                    found.append(f"{number!r} in: {' '.join(sentence.split())[:160]}")
    return found


def test_the_number_check_catches_prose_that_its_outputs_contradict(tmp_path):
    import nbformat

    def notebook(markdown, output):
        nb = nbformat.v4.new_notebook()
        cell = nbformat.v4.new_code_cell("metrics")
        cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text=output)]
        nb.cells = [nbformat.v4.new_markdown_cell(markdown), cell]
        path = tmp_path / "notebook.ipynb"
        nbformat.write(nb, path)
        return path

    stated = "Pool factor 3 keeps NDCG@5 0.918 and searches in 0.05 ms over 64 synthetic pages."
    assert len(unsupported_numbers(notebook(stated, "NDCG@5 0.893 | 0.22 ms per query | 64 pages"))) == 2
    assert unsupported_numbers(notebook(stated, "0.918 in 0.05 ms/query; 64 pages")) == []
    dated = "On an H200 (2026-12-04) a step took 4.03 s."
    assert unsupported_numbers(notebook(dated, "")) == []
    assert unsupported_numbers(notebook("Set `MAX_STEPS` to 300 steps.", "")) == [
        "'300' in: Set to 300 steps."
    ]
    assert unsupported_numbers(notebook("Set it with `--max-steps 300`.", "")) == []


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_no_markdown_states_a_number_its_outputs_contradict(course, name):
    out, _ = course
    assert unsupported_numbers(out / f"{name}.ipynb") == []


def test_without_an_adapter_evaluation_and_search_say_so_and_keep_the_page_size_training_uses(tmp_path):
    """04 and 06 with no adapter from 03: a message in bold that says to run 03 first, and pages at the size 03
    trains at (the tiny run's cap), not silently at the processor's default."""
    from colqwen3_lib.config import TINY_DEFAULTS

    out = tmp_path / "run"
    only = ["04_vidore_eval", "06_search_your_documents"]
    rows = run_course("tiny", out, {"ADAPTER_PATH": ""}, only=only, progress=False)
    for row in rows:
        assert row["metrics"]["trained"] is False
        assert row["metrics"]["max_visual_tokens"] == TINY_DEFAULTS["max_visual_tokens"]
        said = [
            text
            for _, kind, text in _outputs(out / f"{row['notebook']}.ipynb")
            if "No trained adapter" in text
        ]
        assert len(said) == 1 and said[0].startswith("> **No trained adapter at ``: run notebook 03 first.**")
