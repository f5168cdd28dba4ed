"""PDFs as page images, and a PDF of synthetic pages to search offline.

- `pdf_to_pages(path, dpi)`: render every page of a PDF with PDFium (`pypdfium2`) as an RGB image.
- `write_pdf(path, images, dpi)`: write images as the pages of one PDF (Pillow), each page
  `pixels * 72 / dpi` points, so `pdf_to_pages` at the same dpi gives the images' sizes back.
- `write_synthetic_pdf(path, dpi)`: the synthetic ViDoRe test pages as one PDF, with the query written
  for each page, so that a search over the PDF can be scored.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from .data import decode_image, load_split
from .synthetic import SYNTHETIC_TASKS

logger = logging.getLogger(__name__)

DPI = 100  # the processor resizes pages to its visual-token cap; 100 dpi is enough for 768 tokens
POINTS_PER_INCH = 72
PDFIUM_PASSWORD_ERROR = 4  # FPDF_ERR_PASSWORD: the document is encrypted and the password does not open it
# PDFium's page size limit is far above what a page needs: a page is rendered at most this many pixels (about
# 20,000 x 20,000 pt at 100 dpi would be 770 million, 2.3 GB of RGB), and scaled down to it with a warning.
MAX_PAGE_PIXELS = 40_000_000


def pdf_to_pages(
    path: str | os.PathLike, dpi: int = DPI, password: str | None = None, max_pages: int | None = None
) -> list[Image.Image]:
    """Render the pages of a PDF as RGB images.

    A page of w x h points comes out as round(w * dpi / 72) x round(h * dpi / 72) pixels; a page that would
    pass `MAX_PAGE_PIXELS` is rendered at the lower dpi that reaches it, with a warning.

    Args:
        path: The PDF file.
        dpi: Resolution, in pixels per inch (10-1200).
        password: For an encrypted PDF.
        max_pages: Render only the first pages; None renders all.

    Returns:
        One RGB image per page, in order.

    Raises:
        FileNotFoundError: `path` does not exist.
        ValueError: `path` is not a PDF PDFium can read, is encrypted and `password` does not open it,
            has no pages, or `dpi` is out of range.
    """
    import pypdfium2 as pdfium

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; pass the path of a PDF file")
    if not path.is_file():
        raise ValueError(f"{path} is not a file; pass the path of a PDF file")
    if not 10 <= dpi <= 1200:
        raise ValueError(f"dpi must be between 10 and 1200, got {dpi}")
    try:
        document = pdfium.PdfDocument(str(path), password=password)
    except pdfium.PdfiumError as err:
        if _declares_no_pages(
            path
        ):  # PDFium opens no document without pages, and says "Success" (or a stale code)
            raise ValueError(f"{path} has no pages; there is nothing to render") from err
        if getattr(err, "err_code", None) == PDFIUM_PASSWORD_ERROR:
            raise ValueError(
                f"{path} is encrypted and "
                + ("the password given does not open it" if password else "needs a password")
                + ": pass it as pdf_to_pages(path, password=...), or save an unprotected copy"
            ) from err
        raise ValueError(
            f"{path} is not a readable PDF ({err}); is it damaged or another kind of file?"
        ) from err
    pages = []
    try:
        if len(document) == 0:
            raise ValueError(f"{path} has no pages; there is nothing to render")
        for number in range(len(document) if max_pages is None else min(max_pages, len(document))):
            page = document[number]
            width, height = page.get_size()  # points
            scale = dpi / POINTS_PER_INCH
            if width * height * scale**2 > MAX_PAGE_PIXELS:
                bounded = (MAX_PAGE_PIXELS / (width * height)) ** 0.5
                logger.warning(
                    f"{path} page {number + 1} is {width:.0f} x {height:.0f} pt: at {dpi} dpi it would be "
                    f"{round(width * scale)} x {round(height * scale)} px; rendering it at "
                    f"{bounded * POINTS_PER_INCH:.1f} dpi instead ({MAX_PAGE_PIXELS / 1e6:.0f} million pixels at most)"
                )
                scale = bounded
            image = page.render(scale=scale).to_pil().convert("RGB")
            # PDFium rounds the pixel size up, and a page size in float32 can be a hair over N px.
            pages.append(image.crop((0, 0, round(width * scale), round(height * scale))))
            page.close()
    finally:
        document.close()
    return pages


def _declares_no_pages(path: Path) -> bool:
    """Whether a small file is a PDF whose page tree holds no pages (`/Count 0`)."""
    if path.stat().st_size > 2**20:
        return False
    data = path.read_bytes()
    return data.startswith(b"%PDF") and re.search(rb"/Count\s+0\b", data) is not None


def write_pdf(path: str | os.PathLike, images: Sequence[Image.Image], dpi: int = DPI) -> Path:
    """Write images as the pages of one PDF, each page pixels * 72 / dpi points in size.

    Returns:
        The PDF's path.
    """
    if not images:
        raise ValueError("no images given; a PDF needs at least one page")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pages = [image.convert("RGB") for image in images]
    pages[0].save(path, "PDF", save_all=True, append_images=pages[1:], resolution=float(dpi))
    return path


def write_synthetic_pdf(
    path: str | os.PathLike, dpi: int = DPI, tasks: Sequence[str] = tuple(SYNTHETIC_TASKS)
) -> list[str | None]:
    """Write the pages of the synthetic ViDoRe test tasks into one PDF, in order.

    Each query names the kind, colour and orientation of its page, and no other page of these tasks
    has all three, so each query has exactly one relevant page.

    Args:
        path: The PDF to write.
        dpi: Resolution the page images are placed at (render at the same dpi to get them back).
        tasks: Synthetic test tasks whose pages go in (`synthetic.SYNTHETIC_TASKS`).

    Returns:
        The query written for each page, in page order; None for the distractor pages.
    """
    images, queries = [], []
    for task in tasks:
        rows = load_split(task, "test")
        images += [decode_image(value, f"{task} row {i}") for i, value in enumerate(rows["image"])]
        queries += list(rows["query"])
    write_pdf(path, images, dpi)
    return queries
