"""Streaming a Parquet file holds memory for about one row group, not for the file."""

from __future__ import annotations

import ast
import random
import string
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

import cptkit
from cptkit.parquet_files import open_parquet

PACKAGE = Path(cptkit.__file__).parent


def _write(path: Path, row_groups: int, rows: int, chars: int) -> None:
    rng = random.Random(0)
    alphabet = string.ascii_letters + " "
    with pq.ParquetWriter(path, pa.schema([("text", pa.string())]), compression="zstd") as writer:
        for _ in range(row_groups):
            texts = ["".join(rng.choices(alphabet, k=chars)) for _ in range(rows)]
            writer.write_table(pa.table({"text": texts}))


def test_streaming_a_file_holds_about_one_row_group(tmp_path: Path) -> None:
    path = tmp_path / "docs.parquet"
    _write(path, row_groups=24, rows=64, chars=16_000)  # ~1 MB of text per row group, 24 MB in all
    before = pa.total_allocated_bytes()
    peak = 0
    for batch in open_parquet(path).iter_batches(batch_size=16):
        assert batch.num_rows
        peak = max(peak, pa.total_allocated_bytes() - before)
    # pyarrow's default (pre-buffering) held every row group read so far: ~20 MB at the end here.
    assert peak < 6_000_000, f"{peak:,} bytes of Arrow memory held while streaming 24 row groups"


def test_every_parquet_reader_in_cptkit_goes_through_open_parquet() -> None:
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "parquet_files.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "ParquetFile":
                offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert offenders == []
