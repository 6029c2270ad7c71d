"""Sources on local disk or object storage: JSONL, Parquet, CSV, Delta tables and folders of files."""

from __future__ import annotations

import codecs
import csv
import hashlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from cptkit.config import (
    CsvSourceConfig,
    DeltaSourceConfig,
    FilesSourceConfig,
    JsonlSourceConfig,
    ParquetSourceConfig,
    SourceBase,
)
from cptkit.errors import SourceError
from cptkit.parquet_files import open_parquet
from cptkit.secrets import mask_url, scrub
from cptkit.sources.base import ERROR, ID, TEXT, canonical_batch, content_id, strings_column


def _list_files(path: Path, suffixes: tuple[str, ...]) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
        if not files:
            raise SourceError(f"{path}: no {'/'.join(suffixes)} files in this folder")
        return files
    raise SourceError(f"{path}: no such file or folder")


def _stat_fingerprint(files: list[Path], root: Path) -> str:
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(root) if f != root else f.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


class _FileBased:
    suffixes: tuple[str, ...] = ()

    def __init__(self, config: SourceBase, path: Path) -> None:
        self.config = config
        self.path = path

    def files(self) -> list[Path]:
        return _list_files(self.path, self.suffixes)

    def input_fingerprint(self) -> str | None:
        return _stat_fingerprint(self.files(), self.path)

    def table_version(self) -> int | None:
        return None

    def describe(self) -> dict[str, Any]:
        c = self.config
        return {
            "type": getattr(c, "type", "?"),
            "path": str(self.path),
            "files": len(self.files()),
            "text_column": c.text_column,
            "id_column": c.id_column,
            "metadata_columns": list(c.metadata_columns),
        }


class JsonlSource(_FileBased):
    """One JSON object per line. Read line by line so a bad line becomes one quarantined row instead
    of failing the whole file (pyarrow's JSON reader stops at the first bad line)."""

    suffixes = (".jsonl", ".json", ".ndjson")

    def __init__(self, config: JsonlSourceConfig) -> None:
        super().__init__(config, config.path)

    def batches(self) -> Iterator[pa.RecordBatch]:
        c = self.config
        size = c.batch_size
        offset = 0
        for file in self.files():
            buf: list[tuple[Any, Any, dict[str, Any], str | None]] = []
            with file.open("rb") as fh:
                for lineno, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    buf.append(self._parse(line, file, lineno))
                    if len(buf) >= size:
                        yield self._batch(buf, offset)
                        offset += len(buf)
                        buf = []
            if buf:
                yield self._batch(buf, offset)
                offset += len(buf)

    def _parse(self, line: bytes, file: Path, lineno: int) -> tuple[Any, Any, dict[str, Any], str | None]:
        return parse_json_line(line, f"{file.name}:{lineno}", self.config)

    def _batch(self, rows: list[tuple[Any, Any, dict[str, Any], str | None]], offset: int) -> pa.RecordBatch:
        meta = {m: strings_column([r[2].get(m) for r in rows]) for m in self.config.metadata_columns}
        return canonical_batch([r[0] for r in rows], [r[1] for r in rows], meta, offset, errors=[r[3] for r in rows])


def parse_json_line(line: bytes, where: str, config: SourceBase) -> tuple[Any, Any, dict[str, Any], str | None]:
    """One JSONL line as (raw text, raw id, object, error); `where` (file:line) is the id of a bad line."""
    try:
        # utf-8-sig: a byte-order mark (Windows editors write one at the start of a file, and it stays at
        # the start of a line when such files are concatenated) is not part of the JSON.
        decoded = line.decode("utf-8-sig")
    except UnicodeDecodeError:
        return None, where, {}, "undecodable_bytes"
    try:
        obj = json.loads(decoded)
    except json.JSONDecodeError:
        return None, where, {}, "invalid_json"
    if not isinstance(obj, dict):
        return None, where, {}, "not_a_json_object"
    raw_id = obj.get(config.id_column) if config.id_column else None
    if config.text_column not in obj:
        return None, raw_id or where, obj, f"missing_column ({config.text_column})"
    return obj[config.text_column], raw_id, obj, None


class CsvSource(_FileBased):
    """CSV through the standard library reader with surrogateescape, so undecodable bytes mark one row
    as malformed instead of failing the file."""

    suffixes = (".csv",)

    def __init__(self, config: CsvSourceConfig) -> None:
        super().__init__(config, config.path)
        self.csv_config = config

    def batches(self) -> Iterator[pa.RecordBatch]:
        c = self.csv_config
        csv.field_size_limit(sys.maxsize)
        offset = 0
        for file in self.files():
            with file.open("r", encoding=_without_bom(c.encoding), errors="surrogateescape", newline="") as fh:
                reader = csv.DictReader(fh, delimiter=c.delimiter)
                header = reader.fieldnames or []
                needed = [c.text_column, *([c.id_column] if c.id_column else []), *c.metadata_columns]
                missing = [col for col in needed if col not in header]
                if missing:
                    raise SourceError(f"{file}: missing column(s) {missing}; columns are {header}")
                rows: list[dict[str, Any]] = []
                for row in reader:
                    rows.append(row)
                    if len(rows) >= c.batch_size:
                        yield self._batch(rows, offset)
                        offset += len(rows)
                        rows = []
                if rows:
                    yield self._batch(rows, offset)
                    offset += len(rows)

    def _batch(self, rows: list[dict[str, Any]], offset: int) -> pa.RecordBatch:
        c = self.csv_config
        meta = {m: strings_column([r.get(m) for r in rows]) for m in c.metadata_columns}
        ids = [r.get(c.id_column) for r in rows] if c.id_column else None
        return canonical_batch([r.get(c.text_column) for r in rows], ids, meta, offset)


def _without_bom(encoding: str) -> str:
    """The codec that reads `encoding` and drops a leading byte-order mark: for UTF-8, utf-8-sig (Excel's
    "CSV UTF-8" starts with one, which would otherwise be part of the first column's name). The UTF-16
    and UTF-32 codecs drop theirs already."""
    try:
        name = codecs.lookup(encoding).name
    except LookupError:
        return encoding  # open() reports the unknown encoding
    return "utf-8-sig" if name == "utf-8" else encoding


def _arrow_batches(batches: Iterator[pa.RecordBatch], config: SourceBase, where: str) -> Iterator[pa.RecordBatch]:
    """Canonical batches from typed Arrow batches (Parquet, Delta)."""
    offset = 0
    for batch in batches:
        texts = batch.column(config.text_column)
        ids = batch.column(config.id_column) if config.id_column else None
        meta = {m: batch.column(m) for m in config.metadata_columns}
        yield canonical_from_arrow(texts, ids, meta, offset)
        offset += batch.num_rows


def canonical_from_arrow(
    texts: pa.Array, ids: pa.Array | None, meta: dict[str, pa.Array], offset: int
) -> pa.RecordBatch:
    """A canonical batch from typed Arrow columns (Parquet, Delta, a SQL warehouse's results)."""
    if pa.types.is_string(texts.type) or pa.types.is_large_string(texts.type):
        return _fast_string_batch(texts, ids, meta, offset)
    id_values = ids.to_pylist() if ids is not None else None
    return canonical_batch(texts.to_pylist(), id_values, meta, offset)


def _fast_string_batch(texts: pa.Array, ids: pa.Array | None, meta: dict[str, pa.Array], offset: int) -> pa.RecordBatch:
    """The common case, a string text column, mostly stays in Arrow; only ids need Python."""
    texts = texts.cast(pa.large_string())
    errors = pc.if_else(pc.is_null(texts), pa.scalar("null_text"), pa.scalar(None, pa.string()))
    raw_ids = ids.cast(pa.string()).to_pylist() if ids is not None else [None] * len(texts)
    text_values = texts.to_pylist() if any(i in (None, "") for i in raw_ids) else None
    out_ids = []
    for i, raw in enumerate(raw_ids):
        if raw not in (None, ""):
            out_ids.append(raw)
        elif text_values is not None and text_values[i] is not None:
            out_ids.append(content_id(text_values[i]))
        else:
            out_ids.append(f"row-{offset + i}")
    return pa.RecordBatch.from_pydict({ID: pa.array(out_ids, pa.string()), TEXT: texts, ERROR: errors, **meta})


def _check_columns(schema: pa.Schema, config: SourceBase, where: str) -> list[str]:
    needed = [config.text_column, *([config.id_column] if config.id_column else []), *config.metadata_columns]
    missing = [c for c in needed if c not in schema.names]
    if missing:
        raise SourceError(f"{where}: missing column(s) {missing}; columns are {schema.names}")
    return list(dict.fromkeys(needed))


class ParquetSource(_FileBased):
    suffixes = (".parquet",)

    def __init__(self, config: ParquetSourceConfig) -> None:
        super().__init__(config, config.path)

    def batches(self) -> Iterator[pa.RecordBatch]:
        for file in self.files():
            try:
                pf = open_parquet(file)
            except (pa.ArrowInvalid, OSError) as exc:
                raise SourceError(f"{file}: not a readable Parquet file ({exc})") from None
            columns = _check_columns(pf.schema_arrow, self.config, str(file))
            yield from _arrow_batches(
                pf.iter_batches(batch_size=self.config.batch_size, columns=columns), self.config, str(file)
            )


class DeltaSource:
    """A Delta table read with deltalake (delta-rs): a local folder or an object-store URI."""

    def __init__(self, config: DeltaSourceConfig) -> None:
        self.config = config
        self._table: Any = None

    def _open(self) -> Any:
        if self._table is None:
            from deltalake import DeltaTable
            from deltalake.exceptions import DeltaError, TableNotFoundError

            options = {k: v.get_secret_value() for k, v in self.config.storage_options.items()}
            try:
                self._table = DeltaTable(self.config.path, version=self.config.version, storage_options=options or None)
            except TableNotFoundError:
                raise SourceError(f"{self.where}: no Delta table there") from None
            except (DeltaError, OSError, ValueError) as exc:
                # delta-rs messages can echo storage options; keep only the first line, masked.
                first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise SourceError(f"{self.where}: cannot open Delta table ({scrub(first, options.values())})") from None
        return self._table

    def table_version(self) -> int | None:
        return int(self._open().version())

    @property
    def where(self) -> str:
        """The table's location for messages, manifests and fingerprints: a URL's user:password@ masked."""
        return mask_url(self.config.path)

    def input_fingerprint(self) -> str | None:
        return f"{self.where}@v{self.table_version()}"

    def describe(self) -> dict[str, Any]:
        c = self.config
        return {
            "type": "delta",
            "path": self.where,
            "version": self.table_version(),
            "text_column": c.text_column,
            "id_column": c.id_column,
            "metadata_columns": list(c.metadata_columns),
        }

    def batches(self) -> Iterator[pa.RecordBatch]:
        dataset = self._open().to_pyarrow_dataset()
        columns = _check_columns(dataset.schema, self.config, self.where)
        yield from _arrow_batches(
            iter(dataset.to_batches(columns=columns, batch_size=self.config.batch_size)),
            self.config,
            self.where,
        )


class FilesSource(_FileBased):
    """A folder of documents, one per file; the id is the path relative to the folder."""

    def __init__(self, config: FilesSourceConfig) -> None:
        super().__init__(config, config.path)
        self.files_config = config
        self.suffixes = tuple(e.lower() if e.startswith(".") else f".{e.lower()}" for e in config.extensions)

    def files(self) -> list[Path]:
        if not self.path.is_dir():
            raise SourceError(f"{self.path}: not a folder")
        return sorted(p for p in self.path.rglob("*") if p.is_file() and p.suffix.lower() in self.suffixes)

    def skipped_files(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for p in self.path.rglob("*"):
            if p.is_file() and p.suffix.lower() not in self.suffixes:
                counts[p.suffix.lower() or "(none)"] = counts.get(p.suffix.lower() or "(none)", 0) + 1
        return counts

    def describe(self) -> dict[str, Any]:
        return {
            "type": "files",
            "path": str(self.path),
            "files": len(self.files()),
            "extensions": list(self.suffixes),
            "skipped_files": self.skipped_files(),
        }

    def batches(self) -> Iterator[pa.RecordBatch]:
        from cptkit.sources.documents import read_document

        offset = 0
        rows: list[tuple[str, Any, str | None]] = []
        for file in self.files():
            rel = file.relative_to(self.path).as_posix()
            text, err = read_document(file)
            rows.append((rel, text, err))
            if len(rows) >= self.config.batch_size:
                yield self._batch(rows, offset)
                offset += len(rows)
                rows = []
        if rows:
            yield self._batch(rows, offset)

    @staticmethod
    def _batch(rows: list[tuple[str, Any, str | None]], offset: int) -> pa.RecordBatch:
        meta = {"path": pa.array([r[0] for r in rows], pa.string())}
        return canonical_batch([r[1] for r in rows], [r[0] for r in rows], meta, offset, errors=[r[2] for r in rows])
