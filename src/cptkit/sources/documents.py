"""Text from one document file: plain text and Markdown as-is, HTML without its tags, PDF through pypdf."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path


def read_document(path: Path) -> tuple[str | None, str | None]:
    """Return (text, None), or (None, reason) when the file cannot be turned into text."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        return None, f"unreadable_file ({exc.strerror or type(exc).__name__})"
    return document_text(path.name, raw)


def document_text(name: str, raw: bytes) -> tuple[str | None, str | None]:
    """The text of a document's bytes, by the suffix of its name (for files that are not on local disk)."""
    suffix = Path(name).suffix.lower()
    if suffix == ".pdf":
        return _pdf_text(raw)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        return None, "undecodable_bytes"
    if suffix in (".html", ".htm"):
        return html_text(text), None
    return text, None


def html_text(html: str) -> str:
    """Visible text of an HTML page: scripts, styles and tags removed, block elements on their own lines."""
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(html, "html.parser")
    for tag in soup(["script", "style", "noscript", "template"]):
        tag.decompose()
    return soup.get_text("\n")


def _pdf_text(raw: bytes) -> tuple[str | None, str | None]:
    import io

    from pypdf import PdfReader
    from pypdf.errors import PyPdfError

    try:
        with _quiet_pypdf():
            reader = PdfReader(io.BytesIO(raw))
            if reader.is_encrypted:
                return None, "encrypted_pdf"
            pages = [page.extract_text() or "" for page in reader.pages]
    except (PyPdfError, ValueError, KeyError, TypeError) as exc:
        return None, f"unreadable_pdf ({type(exc).__name__})"
    return "\n\n".join(p.strip() for p in pages if p.strip()), None


@contextlib.contextmanager
def _quiet_pypdf() -> Iterator[None]:
    """Keep pypdf's log lines ("EOF marker not found") and warnings about a damaged file off the console:
    a file it cannot read is quarantined with a reason, and one it reads despite them is kept."""
    logger = logging.getLogger("pypdf")  # pypdf's modules log through children of this logger
    level = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)
