"""The course run's HTML pages link each other: the landing page, and on every notebook page a bar at the top and
at the bottom with the index and the previous and next notebook. Built from small hand-made notebooks with stored
outputs, rendered as `run_course` renders them (no kernel runs here)."""

from html.parser import HTMLParser
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from colqwen3_lib.course import NOTEBOOKS, _write_summary, link_pages, render_html

NAMES = NOTEBOOKS[:3]
TITLES = {name: f"{name[:2]} · Page {name[:2]}" for name in NAMES}


@pytest.fixture
def sources(tmp_path) -> Path:
    """Three course notebooks, each an H1 title, a line on what it teaches, and a code cell with its output."""
    folder = tmp_path / "notebooks"
    folder.mkdir()
    for name in NAMES:
        code = new_code_cell("6 * 7", execution_count=1)
        code.outputs = [new_output("execute_result", data={"text/plain": "42"}, execution_count=1)]
        teaches = new_markdown_cell(f"# {TITLES[name]}\n\nWhat {name} teaches.")
        nbformat.write(new_notebook(cells=[teaches, code]), folder / f"{name}.ipynb")
    return folder


def _run(output_dir: Path, sources: Path, names) -> None:
    """What `run_course` writes after each notebook: its page, the landing page, every page's navigation."""
    (output_dir / "html").mkdir(parents=True, exist_ok=True)
    for name in names:
        render_html(sources / f"{name}.ipynb", output_dir / "html" / f"{name}.html")
    rows = [{"notebook": name, "status": "ok", "seconds": 1.0, "metrics": {}} for name in NOTEBOOKS]
    pages = [row for row in rows if (output_dir / "html" / f"{row['notebook']}.html").exists()]
    _write_summary(output_dir, pages, sources)
    link_pages(output_dir, sources)


class _Navigation(HTMLParser):
    """A page's links as (rel, href, text): those of each navigation bar, and the others."""

    def __init__(self):
        super().__init__()
        self.bars, self.others = [], []
        self._bar = self._link = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "nav" and attrs.get("class") == "course-nav":
            self._bar = []
            self.bars.append(self._bar)
        elif tag == "a" and "href" in attrs:
            self._link = [attrs.get("rel"), attrs["href"], ""]

    def handle_data(self, data):
        if self._link:
            self._link[2] += data

    def handle_endtag(self, tag):
        if tag == "nav":
            self._bar = None
        elif tag == "a" and self._link:
            (self.others if self._bar is None else self._bar).append(tuple(self._link))
            self._link = None


def _navigation(page: Path) -> _Navigation:
    parser = _Navigation()
    parser.feed(page.read_text())
    return parser


def _expected_bar(names, name):
    """The bar of `name`'s page in a run that rendered `names`: index, then previous and next among them."""
    at = names.index(name)
    bar = [(None, "../index.html", "Course index")]
    if at > 0:
        bar.append(("prev", f"{names[at - 1]}.html", f"← {TITLES[names[at - 1]]}"))
    if at < len(names) - 1:
        bar.append(("next", f"{names[at + 1]}.html", f"{TITLES[names[at + 1]]} →"))
    return bar


def _dangling(output_dir: Path) -> list[str]:
    """Every relative link of every page that points to no file."""
    missing = []
    for page in [output_dir / "index.html", *(output_dir / "html").glob("*.html")]:
        navigation = _navigation(page)
        for _, href, _ in [link for bar in navigation.bars for link in bar] + navigation.others:
            target = href.split("#")[0]
            if target and ":" not in target and not (page.parent / target).exists():
                missing.append(f"{page.name} -> {href}")
    return missing


def test_every_page_has_index_previous_and_next_at_top_and_bottom(sources, tmp_path):
    out = tmp_path / "run"
    _run(out, sources, NAMES)
    for name in NAMES:
        bars = _navigation(out / "html" / f"{name}.html").bars
        assert bars == [_expected_bar(list(NAMES), name)] * 2, name  # the same bar at the top and the bottom
    assert _navigation(out / "index.html").others == [
        (None, f"html/{name}.html", TITLES[name]) for name in NAMES
    ]
    assert not _dangling(out)


def test_a_partial_run_links_past_the_pages_it_lacks(sources, tmp_path):
    """`--only 00 02` renders two pages, which link each other; a later `--only 01` into the same folder
    slots its page in between, and the pages already there link to it."""
    out = tmp_path / "run"
    first, middle, last = NAMES
    _run(out, sources, [first, last])
    assert not (out / "html" / f"{middle}.html").exists()
    for name in (first, last):
        assert _navigation(out / "html" / f"{name}.html").bars == [_expected_bar([first, last], name)] * 2
    assert not _dangling(out)
    _run(out, sources, [middle])
    for name in NAMES:
        assert _navigation(out / "html" / f"{name}.html").bars == [_expected_bar(list(NAMES), name)] * 2
    assert not _dangling(out)


def test_a_page_whose_source_is_gone_is_linked_by_its_name(sources, tmp_path):
    out = tmp_path / "run"
    _run(out, sources, NAMES[:2])
    (sources / f"{NAMES[1]}.ipynb").unlink()
    link_pages(out, sources)
    assert ("next", f"{NAMES[1]}.html", f"{NAMES[1]} →") in _navigation(
        out / "html" / f"{NAMES[0]}.html"
    ).bars[0]


def test_a_reader_follows_the_links_in_a_real_browser(sources, tmp_path, chromium):
    """In headless Chromium, from disk, with every request off the machine blocked: from the landing page into
    the first notebook, `next` to the last, `previous` back to the first, then `Course index` home; each click
    lands on the page it names, and nothing is asked of the network."""
    out = tmp_path / "run"
    _run(out, sources, NAMES)
    executable, sync_playwright = chromium
    outside, errors = [], []

    def route(route):
        if route.request.url.startswith("file:"):
            return route.continue_()
        outside.append(route.request.url)
        return route.abort()

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        page = browser.new_page()
        page.route("**/*", route)
        page.on("pageerror", lambda error: errors.append(str(error)))

        def click(selector, bar=0):
            """Click the link in the top (0) or bottom (1) navigation bar and wait for its page."""
            with page.expect_navigation(wait_until="load"):
                page.locator("nav.course-nav").nth(bar).locator(selector).click()

        def on(name):
            assert page.locator("h1").first.inner_text().strip().rstrip("¶").strip() == TITLES[name]
            assert page.title() == TITLES[name]
            assert Path(page.url.removeprefix("file://")).name == f"{name}.html"

        page.goto((out / "index.html").as_uri(), wait_until="load")
        assert page.title() == "ColQwen3 course run"
        with page.expect_navigation(wait_until="load"):
            page.get_by_role("link", name=TITLES[NAMES[0]]).click()
        on(NAMES[0])
        assert page.locator("nav.course-nav a[rel=prev]").count() == 0
        for name in NAMES[1:]:
            click("a[rel=next]")
            on(name)
        assert page.locator("nav.course-nav a[rel=next]").count() == 0
        for at, name in enumerate(reversed(NAMES[:-1])):
            click("a[rel=prev]", bar=at % 2)  # the bar at the foot of the page works as well
            on(name)
        click("text=Course index", bar=1)
        assert page.title() == "ColQwen3 course run"
        browser.close()
    assert not outside and not errors, (outside, errors)
