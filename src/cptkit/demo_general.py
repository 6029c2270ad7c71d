"""General (non-domain) text for the demo, from files that ship inside the `gensim` wheel on PyPI:
a shortened English Wikipedia dump (replay and the held-out general set) and the Lee news corpus (a
second held-out set in a genre neither training stream contains).

Only the data files are taken from the wheel; gensim itself is never imported or installed.
"""

from __future__ import annotations

import bz2
import contextlib
import io
import json
import subprocess
import sys
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path
from typing import Any

from cptkit.artifacts import atomic_path
from cptkit.errors import CptkitError
from cptkit.tokenization import cache_dir

GENSIM_VERSION = "4.4.0"
WIKI_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
LEE_MEMBER = "gensim/test/test_data/lee_background.cor"
_DROP_TAGS = {"ref", "references", "gallery", "math", "timeline", "score"}


def gensim_wheel() -> Path:
    """The gensim wheel, fetched once from PyPI with pip into the cptkit cache."""
    folder = cache_dir() / "gensim-wheel"
    found = sorted(folder.glob(f"gensim-{GENSIM_VERSION}-*.whl"))
    if found:
        return found[0]
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(folder)]
    proc = subprocess.run([*cmd, f"gensim=={GENSIM_VERSION}"], capture_output=True, text=True, check=False)
    found = sorted(folder.glob(f"gensim-{GENSIM_VERSION}-*.whl"))
    if proc.returncode != 0 or not found:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise CptkitError(f"cannot fetch the gensim {GENSIM_VERSION} wheel (the demo's general text) with pip: {last}")
    return found[0]


def wikipedia_articles(wheel: Path) -> list[dict[str, Any]]:
    """Articles of the shortened dump (redirects dropped), wiki markup stripped with mwparserfromhell."""
    import mwparserfromhell

    data = bz2.decompress(zipfile.ZipFile(wheel).read(WIKI_MEMBER))
    rows: list[dict[str, Any]] = []
    for _, element in ET.iterparse(io.BytesIO(data)):
        if not element.tag.endswith("}page"):
            continue
        ns = element.find("{*}ns")
        title = element.findtext("{*}title") or ""
        text = element.findtext("{*}revision/{*}text") or ""
        redirect = element.find("{*}redirect") is not None or text.lstrip().upper().startswith("#REDIRECT")
        if ns is not None and ns.text == "0" and not redirect and text.strip():
            code = mwparserfromhell.parse(text)
            # Citations, galleries and formulas read as noise once their markup is gone.
            for tag in code.filter_tags(recursive=True):
                if str(tag.tag).strip().lower() in _DROP_TAGS:
                    with contextlib.suppress(ValueError):
                        code.remove(tag)
            plain = code.strip_code(normalize=True, collapse=True)
            rows.append({"id": f"wiki:{element.findtext('{*}id')}", "title": title, "text": _tidy(plain)})
        element.clear()
    return rows


def lee_news(wheel: Path) -> list[dict[str, Any]]:
    """The Lee Background Corpus: one news article per line."""
    raw = zipfile.ZipFile(wheel).read(LEE_MEMBER).decode("latin-1")
    return [{"id": f"lee:{i}", "text": line.strip()} for i, line in enumerate(raw.splitlines()) if line.strip()]


def _tidy(text: str) -> str:
    # strip_code leaves image captions' option words ("thumb|...") and runs of blank lines behind.
    lines = [ln.strip() for ln in text.splitlines()]
    kept = [ln for ln in lines if not ln.lower().startswith(("thumb|", "left|", "right|"))]
    out: list[str] = []
    for ln in kept:
        if ln or (out and out[-1]):
            out.append(ln)
    return "\n".join(out).strip()


def write_general_corpora(folder: Path) -> dict[str, Path]:
    """`wikipedia.jsonl` and `news.jsonl` under `folder`, written once."""
    targets = {"wikipedia": folder / "wikipedia.jsonl", "news": folder / "news.jsonl"}
    if all(p.is_file() for p in targets.values()):
        return targets
    wheel = gensim_wheel()
    for name, rows in (("wikipedia", wikipedia_articles(wheel)), ("news", lee_news(wheel))):
        with atomic_path(targets[name]) as tmp, tmp.open("w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return targets
