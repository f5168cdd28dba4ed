"""Synthetic document pages in the schemas of `vidore/colpali_train_set` and the ViDoRe v1 test sets,
and each test set's BEIR mirror as mteb mirrors the ViDoRe v1 QA sets (`mteb/<task>_beir`).

Every query names attributes that are visible on its page (kind of page, main colour, orientation),
so even the tiny offline model can learn the retrieval task in a few CPU minutes. `synthetic_docs()`
renders them once per cache; `data.load_split("synthetic", ...)` and `tasks.load_task` are how the rest
of the kit reads them. `mirror_qa_rows` is how a QA test set becomes its BEIR mirror.
"""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Hashable, Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from .files import build_folder
from .tiny import cache_dir

SYNTHETIC = "synthetic"
SYNTHETIC_VERSION = 4
COLOURS = {
    "red": (214, 39, 40),
    "blue": (31, 90, 200),
    "green": (44, 160, 44),
    "orange": (255, 127, 14),
    "purple": (128, 60, 180),
    "teal": (23, 160, 160),
    "brown": (140, 86, 40),
    "pink": (230, 100, 180),
}
CHART_KINDS = ("bar chart", "line chart", "pie chart")
DOCUMENT_KINDS = ("table", "report", "invoice")
KINDS = CHART_KINDS + DOCUMENT_KINDS
ORIENTATIONS = ("portrait", "landscape")
# ViDoRe-v1-style synthetic test tasks: name -> the page kinds it contains.
SYNTHETIC_TASKS = {"synthetic_charts_test": CHART_KINDS, "synthetic_documents_test": DOCUMENT_KINDS}
# Their BEIR mirrors (folders `corpus`, `queries`, `qrels`): mirror name -> the QA task it mirrors.
SYNTHETIC_BEIR_TASKS = {f"{name}_beir": name for name in SYNTHETIC_TASKS}
TRAIN_SET_NAME = "colpali_train_set"

_TITLES = (
    "Quarterly revenue",
    "Annual summary",
    "Sales by region",
    "Budget costs",
    "Figure values",
    "Report title",
)
_QUERY_TEMPLATES = (  # each names all three attributes: one page per test set answers a query
    "Which {orientation} page shows {a} {colour} {kind}?",
    "Find the {colour} {kind} in {orientation} layout",
    "{orientation} page with {a} {colour} {kind}",
    "Where is the {orientation} {kind} drawn in {colour}?",
    "{colour} {kind}, {orientation}",
)
_WORDS = "total revenue sales costs budget summary annual quarterly values rows columns text".split()


def _shade(rgb: tuple[int, int, int], amount: float) -> tuple[int, int, int]:
    """Mix a colour with white (amount > 0) or black (amount < 0)."""
    target = 255 if amount > 0 else 0
    return tuple(round(c + (target - c) * abs(amount)) for c in rgb)


def _text_lines(draw, box, rng, n, font, colour=(60, 60, 60)):
    x0, y0, x1, y1 = box
    step = max(10, (y1 - y0) // max(n, 1))
    for i in range(n):
        y = y0 + i * step
        if y + 8 > y1:
            break
        words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 8)))
        draw.text((x0, y), words, fill=colour, font=font)


def render_page(kind: str, colour: str, orientation: str, rng: random.Random) -> Image.Image:
    """Draw one document page of `kind` whose main colour is `colour`."""
    base = COLOURS[colour]
    if orientation == "portrait":
        width = rng.randint(360, 520)
        height = int(width * rng.choice((1.29, 1.41, 1.5)))
    else:
        height = rng.randint(300, 400)
        width = int(height * rng.choice((1.33, 1.41, 1.78)))
    page = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(page)
    font = ImageFont.load_default(size=max(10, width // 36))
    small = ImageFont.load_default(size=max(8, width // 48))
    margin = width // 12
    draw.text((margin, margin // 2), rng.choice(_TITLES), fill=(20, 20, 20), font=font)
    top, bottom, left, right = margin + height // 12, height - margin, margin, width - margin

    if kind == "bar chart":
        draw.line([(left, top), (left, bottom), (right, bottom)], fill="black", width=2)
        n = rng.randint(4, 8)
        slot = (right - left) // n
        for i in range(n):
            h = rng.uniform(0.2, 0.95) * (bottom - top)
            x = left + i * slot + slot // 5
            draw.rectangle(
                [x, bottom - h, x + slot * 3 // 5, bottom], fill=_shade(base, rng.uniform(-0.2, 0.3))
            )
    elif kind == "line chart":
        for i in range(5):
            y = top + i * (bottom - top) // 4
            draw.line([(left, y), (right, y)], fill=(210, 210, 210), width=1)
        draw.line([(left, top), (left, bottom), (right, bottom)], fill="black", width=2)
        for series in range(rng.randint(1, 2)):
            n = rng.randint(6, 12)
            points = [
                (left + i * (right - left) / (n - 1), top + rng.uniform(0.05, 0.95) * (bottom - top))
                for i in range(n)
            ]
            if series == 0:  # shade the area under the first series
                draw.polygon([(left, bottom), *points, (right, bottom)], fill=_shade(base, 0.75))
            draw.line(points, fill=_shade(base, 0.35 * series), width=max(4, width // 80))
            for x, y in points:
                draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=base)
    elif kind == "pie chart":
        side = min(right - left, bottom - top) * rng.uniform(0.7, 0.95)
        cx, cy = (left + right) / 2, (top + bottom) / 2
        box = [cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2]
        cuts = sorted(rng.uniform(0, 360) for _ in range(rng.randint(2, 5)))
        for i, (a, b) in enumerate(zip([0, *cuts], [*cuts, 360])):
            draw.pieslice(box, a, b, fill=_shade(base, 0.12 * i), outline="white", width=2)
    elif kind == "table":
        rows, cols = rng.randint(5, 10), rng.randint(3, 5)
        row_h, col_w = (bottom - top) / rows, (right - left) / cols
        draw.rectangle([left, top, right, top + row_h], fill=base)
        for r in range(rows + 1):
            draw.line([(left, top + r * row_h), (right, top + r * row_h)], fill=(150, 150, 150), width=1)
        for c in range(cols + 1):
            draw.line([(left + c * col_w, top), (left + c * col_w, bottom)], fill=(150, 150, 150), width=1)
        for r in range(1, rows):
            for c in range(cols):
                draw.text(
                    (left + c * col_w + 4, top + r * row_h + 2),
                    f"{rng.randint(1, 999)}",
                    fill="black",
                    font=small,
                )
    elif kind == "report":
        band = height // 14
        draw.rectangle([left, top, right, top + band], fill=base)
        draw.rectangle([left - margin // 2, top, left - margin // 2 + max(4, width // 50), bottom], fill=base)
        _text_lines(draw, (left, top + band + 10, right, bottom), rng, rng.randint(14, 24), small)
    elif kind == "invoice":
        draw.rectangle([0, 0, width, margin * 2], fill=base)
        draw.text((margin, margin // 2), "INVOICE", fill="white", font=font)
        _text_lines(draw, (left, top + margin, right, bottom - margin * 2), rng, rng.randint(6, 10), small)
        draw.rectangle(
            [right - (right - left) // 2, bottom - margin * 2, right, bottom], outline=base, width=4
        )
        draw.text((right - (right - left) // 2 + 8, bottom - margin * 2 + 8), "Total", fill=base, font=font)
    else:
        raise ValueError(f"unknown page kind {kind!r}; choose one of {KINDS}")
    return page


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _query(rng: random.Random, kind: str, colour: str, orientation: str) -> str:
    text = rng.choice(_QUERY_TEMPLATES).format(
        kind=kind, colour=colour, orientation=orientation, a=_article(colour)
    )
    return text[0].upper() + text[1:]


def _rows(combos, rng, source: str, with_query) -> dict[str, list]:
    rows: dict[str, list] = {k: [] for k in ("query", "image", "image_filename", "answer", "source", "page")}
    for i, (kind, colour, orientation) in enumerate(combos):
        rows["image"].append(render_page(kind, colour, orientation, rng))
        rows["image_filename"].append(f"{source}/{kind.replace(' ', '_')}_{colour}_{orientation}_{i:05d}.png")
        rows["query"].append(_query(rng, kind, colour, orientation) if with_query(i) else None)
        rows["answer"].append(f"{_article(colour)} {colour} {kind} in {orientation} layout")
        rows["source"].append(source)
        rows["page"].append("1")
    return rows


def _train_split(n: int, rng: random.Random):
    from datasets import Dataset, Features, Value
    from datasets import Image as ImageFeature

    combos = [(rng.choice(KINDS), rng.choice(list(COLOURS)), rng.choice(ORIENTATIONS)) for _ in range(n)]
    rows = _rows(combos, rng, "synthetic", lambda i: True)
    rows.update(
        options=[None] * n, model=["template"] * n, prompt=["template"] * n, answer_type=["attributes"] * n
    )
    features = Features(
        {name: ImageFeature() if name == "image" else Value("string") for name in rows},
    )
    return Dataset.from_dict(rows, features=features)


def _test_task(kinds, n: int, rng: random.Random, distractor_share: float):
    """A ViDoRe-v1 QA test set: unique (kind, colour, orientation) pages; some have no query (distractors)."""
    from datasets import Dataset, Features, Value
    from datasets import Image as ImageFeature

    combos = [(k, c, o) for k in kinds for c in COLOURS for o in ORIENTATIONS]
    if n > len(combos):
        raise ValueError(f"at most {len(combos)} distinct test pages for kinds {kinds}; asked for {n}")
    combos = rng.sample(combos, n)
    n_distractors = round(n * distractor_share)
    rows = _rows(combos, rng, "synthetic", lambda i: i >= n_distractors)
    rows.update(model=["template"] * n, prompt=["template"] * n)
    features = Features({name: ImageFeature() if name == "image" else Value("string") for name in rows})
    return Dataset.from_dict(rows, features=features)


def image_key(value) -> str:
    """A content key for one stored image: a digest of its bytes (or of its path when only that is stored)."""
    if isinstance(value, dict):
        data = value.get("bytes")
        if data is None:
            path = value.get("path")
            if path is None:
                raise ValueError("an image holds neither bytes nor a path")
            data = Path(path).read_bytes() if os.path.exists(path) else str(path).encode()
        return hashlib.blake2b(data, digest_size=16).hexdigest()
    if isinstance(value, Image.Image):
        return hashlib.blake2b(
            value.tobytes() + repr((value.mode, value.size)).encode(), digest_size=16
        ).hexdigest()
    if isinstance(value, str | os.PathLike):
        return hashlib.blake2b(Path(value).read_bytes(), digest_size=16).hexdigest()
    raise ValueError(f"cannot read an image from a {type(value).__name__}; the image column must hold images")


def mirror_qa_rows(queries: Sequence[str | None], images: Sequence[Hashable]) -> dict[str, list]:
    """A ViDoRe v1 QA test set's rows as its BEIR mirror, the way mteb's `mteb/<task>_beir` were made.

    The corpus is the distinct images (by content), in order of their first row, with corpus id
    0, 1, ...; the queries are the distinct texts that are not None, in order of their first row, with
    query id 0, 1, ...; every row with a query gives one judgement (that query, that row's image,
    relevance 1), so each row of a repeated query is relevant.

    Args:
        queries: Each row's query (None on a distractor page).
        images: Each row's image content key (equal keys: the same image).

    Returns:
        {"corpus": [first row of each corpus id], "queries": [text of each query id],
        "qrels": [(query id, corpus id), ...] without repeats}.
    """
    corpus_id: dict[Hashable, int] = {}
    query_id: dict[str, int] = {}
    corpus, qrels = [], {}
    for row, (query, image) in enumerate(zip(queries, images)):
        if image not in corpus_id:
            corpus_id[image] = len(corpus)
            corpus.append(row)
        if query is not None:
            query_id.setdefault(query, len(query_id))
            qrels[(query_id[query], corpus_id[image])] = None
    return {"corpus": corpus, "queries": list(query_id), "qrels": list(qrels)}


def write_beir_mirror(ds, path: str | os.PathLike) -> Path:
    """Write the BEIR mirror of a QA test set (`mirror_qa_rows`): `path/{corpus,queries,qrels}`, split `test`."""
    from datasets import Dataset, DatasetDict, Features, Value
    from datasets import Image as ImageFeature

    raw = ds.cast_column("image", ImageFeature(decode=False))
    mirror = mirror_qa_rows(ds["query"], [image_key(value) for value in raw["image"]])
    corpus = Dataset.from_dict(
        {"corpus-id": list(range(len(mirror["corpus"]))), "image": raw.select(mirror["corpus"])["image"]},
        features=Features({"corpus-id": Value("int64"), "image": ImageFeature()}),
    )
    queries = Dataset.from_dict({"query-id": list(range(len(mirror["queries"]))), "query": mirror["queries"]})
    qrels = Dataset.from_dict(
        {
            "query-id": [q for q, _ in mirror["qrels"]],
            "corpus-id": [c for _, c in mirror["qrels"]],
            "score": [1] * len(mirror["qrels"]),
        }
    )
    path = Path(path)
    for part, rows in (("corpus", corpus), ("queries", queries), ("qrels", qrels)):
        DatasetDict(test=rows).save_to_disk(str(path / part))
    return path


def make_synthetic_docs(
    path: str | os.PathLike,
    n_train: int = 256,
    n_test: int = 32,
    seed: int = 0,
    distractor_share: float = 0.25,
) -> dict[str, Path]:
    """Render synthetic document pages and write them as Hugging Face datasets on disk.

    Writes `colpali_train_set` (splits `train`, `test`; schema of `vidore/colpali_train_set`),
    one ViDoRe-v1 QA test set per entry of `SYNTHETIC_TASKS` (split `test`, `n_test` distinct
    pages of which `distractor_share` have `query` None) and its BEIR mirror (`SYNTHETIC_BEIR_TASKS`,
    `write_beir_mirror`). Same seed, same pages.

    Args:
        path: Output directory (written atomically).
        n_train: Training pages (one query each).
        n_test: Pages per test task (at most 48) and in the train set's `test` split.
        seed: Random seed.
        distractor_share: Share of test pages without a query.

    Returns:
        Dataset name -> its directory (load with `load_split`).
    """
    import datasets
    from datasets import DatasetDict, load_from_disk

    if n_train < 1 or n_test < 2:
        raise ValueError(f"need n_train >= 1 and n_test >= 2, got {n_train} and {n_test}")
    path = Path(path)

    def write(tmp: Path) -> None:
        rng = random.Random(seed)
        train = DatasetDict(train=_train_split(n_train, rng), test=_train_split(n_test, rng))
        train.save_to_disk(str(tmp / TRAIN_SET_NAME))
        for name, kinds in SYNTHETIC_TASKS.items():
            DatasetDict(test=_test_task(kinds, n_test, rng, distractor_share)).save_to_disk(str(tmp / name))
        for mirror, name in SYNTHETIC_BEIR_TASKS.items():
            write_beir_mirror(load_from_disk(str(tmp / name))["test"], tmp / mirror)

    # Ten "Saving the dataset" bars would open the first notebook that needs the pages: a one-off build, silent.
    bars_were_on = not datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        build_folder(path, write)
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()
    return {name: path / name for name in (TRAIN_SET_NAME, *SYNTHETIC_TASKS, *SYNTHETIC_BEIR_TASKS)}


def synthetic_docs(n_train: int = 256, n_test: int = 32, seed: int = 0) -> dict[str, Path]:
    """The cached synthetic datasets for these settings, rendered on first use."""
    from filelock import FileLock

    path = cache_dir() / f"synthetic-v{SYNTHETIC_VERSION}-{n_train}-{n_test}-{seed}"
    names = (TRAIN_SET_NAME, *SYNTHETIC_TASKS, *SYNTHETIC_BEIR_TASKS)
    if not all((path / name).exists() for name in names):
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path) + ".lock"):
            if not all((path / name).exists() for name in names):
                make_synthetic_docs(path, n_train=n_train, n_test=n_test, seed=seed)
    return {name: path / name for name in names}
