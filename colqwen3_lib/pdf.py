"""PDFs as page images, and a PDF of synthetic pages to search offline.

- `pdf_to_pages(path, dpi)`: render every page of a PDF with PDFium (`pypdfium2`) as an RGB image.
- `write_pdf(path, images, dpi)`: write images as the pages of one PDF (Pillow), each page
  `pixels * 72 / dpi` points, so `pdf_to_pages` at the same dpi gives the images' sizes back.
- `write_synthetic_pdf(path, dpi)`: the synthetic ViDoRe test pages as one PDF, with the query written
  for each page, so that a search over the PDF can be scored.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from .data import decode_image, load_split
from .synthetic import SYNTHETIC_TASKS

DPI = 100  # the processor resizes pages to its visual-token cap; 100 dpi is enough for 768 tokens
POINTS_PER_INCH = 72
PDFIUM_PASSWORD_ERROR = 4  # FPDF_ERR_PASSWORD: the document is encrypted and the password does not open it


def pdf_to_pages(
    path: str | os.PathLike, dpi: int = DPI, password: str | None = None, max_pages: int | None = None
) -> list[Image.Image]:
    """Render the pages of a PDF as RGB images.

    A page of w x h points comes out as round(w * dpi / 72) x round(h * dpi / 72) pixels.

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
        if getattr(err, "err_code", None) == PDFIUM_PASSWORD_ERROR:
            raise ValueError(
                f"{path} is encrypted and "
                + ("the password given does not open it" if password else "needs a password")
                + ": pass it as pdf_to_pages(path, password=...), or save an unprotected copy"
            ) from err
        raise ValueError(
            f"{path} is not a readable PDF ({err}); is it damaged or another kind of file?"
        ) from err
    scale = dpi / POINTS_PER_INCH
    pages = []
    try:
        if len(document) == 0:
            raise ValueError(f"{path} has no pages")
        for number in range(len(document) if max_pages is None else min(max_pages, len(document))):
            page = document[number]
            width, height = page.get_size()  # points
            image = page.render(scale=scale).to_pil().convert("RGB")
            # PDFium rounds the pixel size up, and a page size in float32 can be a hair over N px.
            pages.append(image.crop((0, 0, round(width * scale), round(height * scale))))
            page.close()
    finally:
        document.close()
    return pages


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
