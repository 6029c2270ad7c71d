"""The files prepare writes into a dataset's folder, and the writer that appends documents to them in
input order, through temporary names renamed together when all went well."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cptkit.artifacts import atomic_path
from cptkit.corpus import TRAIN_SPLIT
from cptkit.datasets import DROPPED, QUARANTINE, TRAIN, TRAIN_TOKENS, VAL, VAL_TOKENS
from cptkit.records import DocResult

TOKENS_SCHEMA = pa.schema([("id", pa.string()), ("input_ids", pa.list_(pa.int32()))])
# Documents per Parquet row group of the token files.
_TOKEN_BATCH_ROWS = 1024


def token_lists(arrays: Sequence[np.ndarray | None]) -> pa.ListArray:
    """int32 token arrays as one Arrow list column (None for a document without tokens)."""
    lengths = [0 if a is None else len(a) for a in arrays]
    offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    present = [a for a in arrays if a is not None]
    values = pa.array(np.concatenate(present) if present else np.zeros(0, np.int32), pa.int32())
    mask = pa.array([a is None for a in arrays]) if len(present) < len(arrays) else None
    return pa.ListArray.from_arrays(pa.array(offsets), values, mask=mask)


def output_names(tokenize: bool) -> list[str]:
    return [TRAIN, VAL, QUARANTINE, DROPPED] + ([TRAIN_TOKENS, VAL_TOKENS] if tokenize else [])


class PreparedWriter:
    """Writes train/val JSON lines (id, text, metadata), the token files, quarantined documents (id,
    reason, a preview) and dropped ones (id, reason)."""

    def __init__(self, directory: Path, tokenize: bool) -> None:
        self.directory = directory
        self.names = output_names(tokenize)
        self.files: dict[str, IO[str]] = {}
        self.token_writers: dict[str, pq.ParquetWriter] = {}
        self.token_buffers: dict[str, tuple[list[str], list[np.ndarray]]] = {}

    def __enter__(self) -> PreparedWriter:
        self._exit = contextlib.ExitStack()
        for name in self.names:
            tmp = self._exit.enter_context(atomic_path(self.directory / name))
            if name.endswith(".jsonl"):
                self.files[name] = self._exit.enter_context(tmp.open("w", encoding="utf-8"))
            else:
                writer = pq.ParquetWriter(tmp, TOKENS_SCHEMA, compression="zstd")
                self._exit.callback(writer.close)
                self.token_writers[name] = writer
                self.token_buffers[name] = ([], [])
        return self

    def write(
        self,
        ids: Sequence[str],
        metadata: Sequence[dict[str, Any]],
        results: Sequence[DocResult],
        splits: Sequence[str | None],
    ) -> None:
        """Append one batch of documents, in order; `splits` holds each kept document's split."""
        for doc_id, meta, r, split in zip(ids, metadata, results, splits, strict=True):
            if r.status == "quarantine":
                self._write_line(QUARANTINE, {"id": doc_id, "reason": r.reason, "text_preview": r.text})
            elif r.status == "drop":
                self._write_line(DROPPED, {"id": doc_id, "reason": r.reason})
            else:
                train = split == TRAIN_SPLIT
                self._write_line(TRAIN if train else VAL, {"id": doc_id, "text": r.text, **meta})
                if r.tokens is not None:
                    self._add_tokens(TRAIN_TOKENS if train else VAL_TOKENS, doc_id, r.tokens)

    def _write_line(self, name: str, record: dict[str, Any]) -> None:
        self.files[name].write(json.dumps(record, ensure_ascii=False, default=str) + "\n")

    def _add_tokens(self, name: str, doc_id: str, tokens: np.ndarray) -> None:
        ids, arrays = self.token_buffers[name]
        ids.append(doc_id)
        arrays.append(tokens)
        if len(ids) >= _TOKEN_BATCH_ROWS:
            self._flush(name)

    def _flush(self, name: str) -> None:
        ids, arrays = self.token_buffers[name]
        if not ids:
            return
        self.token_writers[name].write_batch(
            pa.RecordBatch.from_arrays([pa.array(ids, pa.string()), token_lists(arrays)], schema=TOKENS_SCHEMA)
        )
        self.token_buffers[name] = ([], [])

    def __exit__(self, exc_type: Any, *rest: Any) -> None:
        # On an exception, atomic_path renames nothing and removes the temporary files.
        if exc_type is None:
            for name in self.token_writers:
                self._flush(name)
        self._exit.__exit__(exc_type, *rest)
