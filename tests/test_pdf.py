"""PDF pages in and out: sizes survive the round trip, and unreadable PDFs get one clear error."""

import hashlib
import random
import struct

import pytest
from PIL import Image

from colqwen3_lib.pdf import pdf_to_pages, write_pdf, write_synthetic_pdf
from colqwen3_lib.synthetic import SYNTHETIC_TASKS, render_page

pytest.importorskip("pypdfium2")

# The standard security handler, revision 2 (RC4, 40-bit key), enough to write a PDF that needs a password.
PASSWORD_PAD = bytes.fromhex("28BF4E5E4E758A4164004E56FFFA01082E2E00B6D0683E802F0CA9FE6453697A")


def _rc4(key: bytes, data: bytes) -> bytes:
    s, j = list(range(256)), 0
    for i in range(256):
        j = (j + s[i] + key[i % len(key)]) % 256
        s[i], s[j] = s[j], s[i]
    out, i, j = bytearray(), 0, 0
    for byte in data:
        i = (i + 1) % 256
        j = (j + s[i]) % 256
        s[i], s[j] = s[j], s[i]
        out.append(byte ^ s[(s[i] + s[j]) % 256])
    return bytes(out)


def _encrypted_pdf(path, password: str):
    """A one-page, 200 x 300 pt PDF that opens only with `password` (it holds no strings or streams)."""
    padded = (password.encode() + PASSWORD_PAD)[:32]
    owner = _rc4(hashlib.md5(padded).digest()[:5], padded)
    doc_id, permissions = b"0123456789abcdef", -4
    key = hashlib.md5(padded + owner + struct.pack("<i", permissions) + doc_id).digest()[:5]
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 200 300] >>",
        b"<< /Filter /Standard /V 1 /R 2 /O <%s> /U <%s> /P %d >>"
        % (owner.hex().encode(), _rc4(key, PASSWORD_PAD).hex().encode(), permissions),
    ]
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    ids = b"<%s>" % doc_id.hex().encode()
    out += b"trailer\n<< /Size %d /Root 1 0 R /Encrypt 4 0 R /ID [%s %s] >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1,
        ids,
        ids,
        xref,
    )
    path.write_bytes(bytes(out))
    return path


@pytest.fixture(scope="module")
def images():
    rng = random.Random(0)
    return [
        render_page(kind, "blue", o, rng)
        for kind in ("bar chart", "table")
        for o in ("portrait", "landscape")
    ]


@pytest.mark.parametrize("dpi", [72, 100, 150])
def test_round_trip_keeps_page_count_and_sizes(images, tmp_path, dpi):
    path = write_pdf(tmp_path / "pages.pdf", images, dpi=dpi)
    pages = pdf_to_pages(path, dpi=dpi)
    assert [p.size for p in pages] == [i.size for i in images]
    assert all(p.mode == "RGB" for p in pages)


def test_rendered_pages_look_like_the_images(images, tmp_path):
    """JPEG inside the PDF and PDFium's image smoothing change pixels a little, never the picture."""
    import numpy as np

    def blocks(image):  # 8x8-pixel block means: the picture, without its finest detail
        return np.asarray(image.resize((image.width // 8, image.height // 8), Image.BOX), dtype=float)

    pages = pdf_to_pages(write_pdf(tmp_path / "pages.pdf", images), dpi=100)
    for page, image in zip(pages, images):
        assert np.abs(blocks(page) - blocks(image)).mean() < 3  # of 255; measured 0.5-1.3
        assert np.abs(255 - blocks(image)).mean() > 10  # a blank page would be off by 16-41


def test_dpi_scales_the_pages(images, tmp_path):
    path = write_pdf(tmp_path / "pages.pdf", images, dpi=100)
    width, height = images[0].size
    assert pdf_to_pages(path, dpi=50, max_pages=1)[0].size == (round(width / 2), round(height / 2))
    assert len(pdf_to_pages(path, max_pages=2)) == 2


def test_synthetic_pdf_has_every_test_page_and_its_query(tmp_path):
    from colqwen3_lib.data import load_split

    queries = write_synthetic_pdf(tmp_path / "synthetic.pdf", dpi=72)
    rows = [load_split(task, "test") for task in SYNTHETIC_TASKS]
    assert queries == [q for r in rows for q in r["query"]]
    pages = pdf_to_pages(tmp_path / "synthetic.pdf", dpi=72)
    assert [p.size for p in pages] == [image.size for r in rows for image in r["image"]]
    assert sum(q is not None for q in queries) < len(queries)  # distractor pages have no query


def test_missing_pdf_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        pdf_to_pages(tmp_path / "missing.pdf")
    with pytest.raises(ValueError, match="is not a file"):
        pdf_to_pages(tmp_path)


def test_corrupt_or_other_files_are_refused(images, tmp_path):
    truncated = tmp_path / "truncated.pdf"
    truncated.write_bytes(write_pdf(tmp_path / "whole.pdf", images).read_bytes()[:300])
    image = tmp_path / "page.pdf"
    images[0].save(image, "PNG")
    for path in (truncated, image):
        with pytest.raises(ValueError, match="is not a readable PDF"):
            pdf_to_pages(path)


def test_encrypted_pdf_needs_its_password(tmp_path):
    path = _encrypted_pdf(tmp_path / "locked.pdf", "secret")
    with pytest.raises(ValueError, match="is encrypted and needs a password"):
        pdf_to_pages(path)
    with pytest.raises(ValueError, match="the password given does not open it"):
        pdf_to_pages(path, password="wrong")
    assert [p.size for p in pdf_to_pages(path, dpi=72, password="secret")] == [(200, 300)]


def test_bad_arguments_are_refused(images, tmp_path):
    path = write_pdf(tmp_path / "pages.pdf", images)
    with pytest.raises(ValueError, match="dpi must be between"):
        pdf_to_pages(path, dpi=0)
    with pytest.raises(ValueError, match="no images given"):
        write_pdf(tmp_path / "empty.pdf", [])
    assert isinstance(images[0], Image.Image)


def _blank_pdf(path, sizes):
    """A PDF of blank pages of the given (width, height) sizes in points (none: a PDF with no pages)."""
    import pypdfium2 as pdfium

    document = pdfium.PdfDocument.new()
    for width, height in sizes:
        document.new_page(width, height)
    document.save(str(path))
    document.close()
    return path


def test_a_pdf_without_pages_says_so_even_after_an_encrypted_one(tmp_path):
    empty = _blank_pdf(tmp_path / "empty.pdf", [])
    with pytest.raises(ValueError, match="empty.pdf has no pages"):
        pdf_to_pages(empty)
    with pytest.raises(ValueError, match="needs a password"):
        pdf_to_pages(_encrypted_pdf(tmp_path / "locked.pdf", "secret"))
    with pytest.raises(ValueError, match="empty.pdf has no pages"):  # not PDFium's stale password error
        pdf_to_pages(empty)


def test_a_page_of_absurd_size_is_rendered_within_the_pixel_bound(tmp_path, monkeypatch, caplog):
    """A 5,000 x 5,000 pt page would be 6,944 x 6,944 px at 100 dpi; under a bound of 1 million pixels it comes out
    1,000 x 1,000 px, with a warning that says at what dpi. Pages under the bound keep their size."""
    from colqwen3_lib import pdf

    monkeypatch.setattr(pdf, "MAX_PAGE_PIXELS", 1_000_000)
    path = _blank_pdf(tmp_path / "huge.pdf", [(5000, 5000), (200, 300)])
    with caplog.at_level("WARNING", logger="colqwen3_lib.pdf"):
        huge, small = pdf_to_pages(path)
    assert huge.size == (1000, 1000) and small.size == (278, 417)
    (message,) = [r.getMessage() for r in caplog.records]
    assert "page 1 is 5000 x 5000 pt" in message and "rendering it at 14.4 dpi" in message
