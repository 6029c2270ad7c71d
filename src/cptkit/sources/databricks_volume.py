"""Files in a Unity Catalog Volume, through the SDK's Files API: one document per file, or per line of a
.jsonl file. The id is the path under `volume_path` (with `:<line>` for JSONL lines without an id)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from typing import Any

import pyarrow as pa

from cptkit.config import DatabricksSourceConfig
from cptkit.sources.base import canonical_batch, strings_column
from cptkit.sources.databricks_client import Retrying
from cptkit.sources.documents import document_text
from cptkit.sources.local import parse_json_line

PATH = "path"


class VolumeReader:
    def __init__(self, config: DatabricksSourceConfig, retrying: Retrying, workspace: Callable[[], Any]) -> None:
        self.config = config
        self._retrying = retrying
        self._workspace_factory = workspace
        self._workspace: Any = None
        self._listing: list[tuple[str, int | None, int | None]] | None = None
        self.root = str(config.volume_path).rstrip("/")
        self.suffixes = tuple(e.lower() if e.startswith(".") else f".{e.lower()}" for e in config.extensions)

    def _w(self) -> Any:
        if self._workspace is None:
            self._workspace = self._workspace_factory()
        return self._workspace

    def listing(self) -> list[tuple[str, int | None, int | None]]:
        """(path, size, last modified) of every file under the root with a configured suffix, sorted."""
        if self._listing is None:

            def walk() -> list[tuple[str, int | None, int | None]]:
                found, folders = [], [self.root]
                while folders:
                    folder = folders.pop()
                    for entry in self._w().files.list_directory_contents(folder):
                        if entry.is_directory:
                            folders.append(str(entry.path).rstrip("/"))
                        elif str(entry.path).lower().endswith(self.suffixes):
                            found.append((str(entry.path), entry.file_size, entry.last_modified))
                return sorted(found)

            self._listing = self._retrying.call(f"list {self.root}", walk)
        return self._listing

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for path, size, modified in self.listing():
            h.update(f"{path}\0{size}\0{modified}\n".encode())
        return h.hexdigest()[:16]

    def batches(self) -> Iterator[pa.RecordBatch]:
        rows: list[tuple[Any, Any, dict[str, Any], str | None, str]] = []
        offset = 0
        for path, _size, _modified in self.listing():
            rel = path[len(self.root) :].lstrip("/")

            def download(p: str = path) -> bytes:
                return bytes(self._w().files.download(p).contents.read())

            raw = self._retrying.call(f"download {path}", download)
            if rel.lower().endswith(".jsonl"):
                for lineno, line in enumerate(raw.splitlines(), 1):
                    if line.strip():
                        text, raw_id, obj, err = parse_json_line(line, f"{rel}:{lineno}", self.config)
                        rows.append((text, raw_id, obj, err, rel))
            else:
                text, err = document_text(rel, raw)
                rows.append((text, rel, {}, err, rel))
            while len(rows) >= self.config.batch_size:
                chunk, rows = rows[: self.config.batch_size], rows[self.config.batch_size :]
                yield self._batch(chunk, offset)
                offset += len(chunk)
        if rows:
            yield self._batch(rows, offset)

    def _batch(self, rows: list[tuple[Any, Any, dict[str, Any], str | None, str]], offset: int) -> pa.RecordBatch:
        meta = {PATH: pa.array([r[4] for r in rows], pa.string())}
        for m in self.config.metadata_columns:
            if m != PATH:
                meta[m] = strings_column([r[2].get(m) for r in rows])
        return canonical_batch([r[0] for r in rows], [r[1] for r in rows], meta, offset, errors=[r[3] for r in rows])
