"""Each source type, including malformed rows, on real files (a real Delta table written with deltalake)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import write_jsonl
from cptkit.config import load_config
from cptkit.errors import SourceError
from cptkit.sources import open_source
from cptkit.sources.base import content_id


def rows_of(source_settings: dict[str, object]) -> list[dict[str, object]]:
    cfg = load_config(None, [f"source.{k}={v}" for k, v in source_settings.items()])
    assert cfg.source is not None
    out: list[dict[str, object]] = []
    for batch in open_source(cfg.source).batches():
        out.extend(batch.to_pylist())
    return out


def test_jsonl_keeps_every_line_and_marks_malformed_ones(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    write_jsonl(path, [{"id": 1, "text": "hello", "lang": "en"}, {"id": 2, "text": None}, {"id": 3, "text": 7}])
    with path.open("ab") as fh:
        fh.write(b'{"id": 4, "text": "broken\n')
        fh.write(b'{"id": 5, "text": "bad \xff bytes"}\n')
        fh.write(b"[1, 2]\n")
        fh.write(b'{"id": 7, "body": "no text column"}\n')
        fh.write(b"\n")
        fh.write(b'{"text": "no id here"}\n')
    rows = rows_of({"type": "jsonl", "path": path, "id_column": "id", "metadata_columns": "[lang]", "batch_size": 2})
    assert [(r["id"], r["error"]) for r in rows] == [
        ("1", None),
        ("2", "null_text"),
        ("3", "non_string_text (int)"),
        ("in.jsonl:4", "invalid_json"),
        ("in.jsonl:5", "undecodable_bytes"),
        ("in.jsonl:6", "not_a_json_object"),
        ("7", "missing_column (text)"),
        (content_id("no id here"), None),
    ]
    assert rows[0]["text"] == "hello" and rows[0]["lang"] == "en"
    assert rows[1]["lang"] is None


def test_parquet_with_string_and_non_string_text(tmp_path: Path) -> None:
    pq.write_table(
        pa.table({"doc": ["a", None, "c"], "n": [1, 2, 3], "key": ["k1", None, "k3"]}), tmp_path / "a.parquet"
    )
    rows = rows_of(
        {
            "type": "parquet",
            "path": tmp_path / "a.parquet",
            "text_column": "doc",
            "id_column": "key",
            "metadata_columns": "[n]",
        }
    )
    assert [(r["id"], r["text"], r["error"], r["n"]) for r in rows] == [
        ("k1", "a", None, 1),
        ("row-1", None, "null_text", 2),
        ("k3", "c", None, 3),
    ]
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "ints.parquet")
    rows = rows_of({"type": "parquet", "path": tmp_path / "ints.parquet"})
    assert [r["error"] for r in rows] == ["non_string_text (int)"] * 2


def test_parquet_folder_is_read_in_name_order(tmp_path: Path) -> None:
    (tmp_path / "p").mkdir()
    pq.write_table(pa.table({"text": ["second"]}), tmp_path / "p" / "b.parquet")
    pq.write_table(pa.table({"text": ["first"]}), tmp_path / "p" / "a.parquet")
    assert [r["text"] for r in rows_of({"type": "parquet", "path": tmp_path / "p"})] == ["first", "second"]


def test_missing_column_names_the_file_and_the_columns(tmp_path: Path) -> None:
    pq.write_table(pa.table({"body": ["a"]}), tmp_path / "a.parquet")
    with pytest.raises(SourceError, match=r"a.parquet: missing column\(s\) \['text'\]; columns are \['body'\]"):
        rows_of({"type": "parquet", "path": tmp_path / "a.parquet"})


def test_missing_path_is_a_source_error(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="no such file or folder"):
        rows_of({"type": "jsonl", "path": tmp_path / "nope.jsonl"})


def test_csv_with_undecodable_bytes_marks_one_row(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    path.write_bytes(b'id,text,team\n1,"hello, world",a\n2,bad \xff byte,b\n3,,c\n')
    rows = rows_of({"type": "csv", "path": path, "id_column": "id", "metadata_columns": "[team]"})
    assert [(r["id"], r["text"], r["error"], r["team"]) for r in rows] == [
        ("1", "hello, world", None, "a"),
        ("2", None, "undecodable_bytes", "b"),
        ("3", "", None, "c"),
    ]


def test_a_damaged_pdf_is_quarantined_without_pypdf_noise_on_the_console(tmp_path: Path) -> None:
    """pypdf logs ("EOF marker not found") and warns about a damaged file; the quarantine reason is
    what the user needs, so the real CLI prints none of pypdf's lines."""
    import json
    import os
    import subprocess
    import sys

    import yaml

    root = tmp_path / "docs"
    root.mkdir()
    (root / "good.pdf").write_bytes(_tiny_pdf("Hello from a PDF"))
    (root / "cut.pdf").write_bytes(_tiny_pdf("Hello from a PDF")[:200])  # cut short: no xref, no %%EOF
    (root / "junk.pdf").write_bytes(b"not a pdf at all")
    config = {
        "source": {"type": "files", "path": str(root)},
        "data": {"output_dir": str(tmp_path / "data")},
        "prepare": {"tokenize": False},
    }
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    env = {**os.environ, "PYTHONWARNINGS": "always"}  # show warnings, as a user's environment might
    for stage in ("extract", "prepare"):
        done = subprocess.run(
            [sys.executable, "-m", "cptkit", stage, "--config", str(tmp_path / "cfg.yaml")],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        output = done.stdout + done.stderr
        for noise in ("EOF marker", "pypdf", "invalid pdf header", "Warning"):
            assert noise not in output, output
    quarantined = [json.loads(line) for line in (tmp_path / "data" / "quarantine.jsonl").read_text().splitlines()]
    reasons = {q["id"]: q["reason"] for q in quarantined}
    assert set(reasons) == {"cut.pdf", "junk.pdf"}
    assert all(reason.startswith("unreadable_pdf") for reason in reasons.values()), reasons


BOM = "\ufeff"  # what Windows editors and Excel's "CSV UTF-8" put at the start of a file


def test_a_byte_order_mark_is_not_part_of_the_first_row(tmp_path: Path) -> None:
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text(BOM + '{"id": "a", "text": "first"}\n{"id": "b", "text": "second"}\n', encoding="utf-8")
    rows = rows_of({"type": "jsonl", "path": jsonl, "id_column": "id"})
    assert [(r["id"], r["text"], r["error"]) for r in rows] == [("a", "first", None), ("b", "second", None)]

    csv_file = tmp_path / "in.csv"
    csv_file.write_text(BOM + "id,text\n1,first\n2,second\n", encoding="utf-8")
    rows = rows_of({"type": "csv", "path": csv_file, "id_column": "id"})
    assert [(r["id"], r["text"]) for r in rows] == [("1", "first"), ("2", "second")]

    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.txt").write_text(BOM + "plain text", encoding="utf-8")
    (folder / "b.md").write_text(BOM + "# Title", encoding="utf-8")
    (folder / "c.html").write_text(BOM + "<p>Para</p>", encoding="utf-8")
    rows = rows_of({"type": "files", "path": folder})
    assert [r["text"] for r in rows] == ["plain text", "# Title", "Para"]


def test_delta_table_reads_latest_or_a_pinned_version(tmp_path: Path) -> None:
    from deltalake import write_deltalake

    table = str(tmp_path / "cat" / "schema" / "docs")
    write_deltalake(table, pa.table({"id": ["a", "b"], "text": ["one", "two"], "title": ["A", "B"]}))
    write_deltalake(table, pa.table({"id": ["c"], "text": ["three"], "title": ["C"]}), mode="append")
    latest = rows_of({"type": "delta", "path": table, "id_column": "id", "metadata_columns": "[title]"})
    assert sorted(r["id"] for r in latest) == ["a", "b", "c"]
    pinned = rows_of({"type": "delta", "path": table, "id_column": "id", "version": 0})
    assert sorted(r["text"] for r in pinned) == ["one", "two"]

    cfg = load_config(None, ["source.type=delta", f"source.path={table}", "source.version=0"])
    assert cfg.source is not None
    src = open_source(cfg.source)
    assert src.table_version() == 0
    assert src.describe()["version"] == 0


def test_delta_path_that_is_not_a_table(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="no Delta table there"):
        rows_of({"type": "delta", "path": tmp_path})


def _tiny_pdf(text: str) -> bytes:
    """A valid one-page PDF with one line of text (byte offsets computed for the xref table)."""
    stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        b"/Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length " + str(len(stream)).encode() + b" >>\nstream\n" + stream + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for i, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += f"{i} 0 obj\n".encode() + body + b"\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    for off in offsets:
        out += f"{off:010d} 00000 n \n".encode()
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return bytes(out)


def test_folder_of_files(tmp_path: Path) -> None:
    root = tmp_path / "docs"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("plain text", encoding="utf-8")
    (root / "sub" / "b.md").write_text("# Title\n\nmarkdown body", encoding="utf-8")
    (root / "c.html").write_text(
        "<html><head><style>p {color: red}</style><script>alert(1)</script></head>"
        "<body><h1>Heading</h1><p>Para &amp; more</p></body></html>",
        encoding="utf-8",
    )
    (root / "d.pdf").write_bytes(_tiny_pdf("Hello from a PDF"))
    (root / "e.txt").write_bytes(b"bad \xff")
    (root / "f.pdf").write_bytes(b"%PDF-1.4 garbage")
    (root / "image.png").write_bytes(b"\x89PNG")
    rows = {r["id"]: r for r in rows_of({"type": "files", "path": root})}
    assert sorted(rows) == ["a.txt", "c.html", "d.pdf", "e.txt", "f.pdf", "sub/b.md"]
    assert rows["a.txt"]["text"] == "plain text"
    assert rows["sub/b.md"]["path"] == "sub/b.md"
    html = rows["c.html"]["text"]
    assert isinstance(html, str)
    assert "Heading" in html and "Para & more" in html and "alert" not in html and "color" not in html
    assert rows["d.pdf"]["text"] == "Hello from a PDF"
    assert rows["e.txt"]["error"] == "undecodable_bytes"
    assert str(rows["f.pdf"]["error"]).startswith("unreadable_pdf")

    cfg = load_config(None, ["source.type=files", f"source.path={root}"])
    assert cfg.source is not None
    assert open_source(cfg.source).describe()["skipped_files"] == {".png": 1}
