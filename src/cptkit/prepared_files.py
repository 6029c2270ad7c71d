"""The files prepare writes into a dataset's folder, and the writer that appends documents to them in
input order, through temporary names renamed together when all went well.

Tokens (and, when train.jsonl is not written, the training text) go to sharded Parquet folders,
`train_tokens/part-00000.parquet` and on, a new shard every `prepare.shard_documents` documents: a shard
is a unit a cluster can write or read on its own, and no single file grows with the corpus. Shards are cut
by document count in input order, so every engine writes the same shards for the same input.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cptkit.artifacts import atomic_dir, atomic_path
from cptkit.corpus import TRAIN_SPLIT
from cptkit.datasets import DROPPED, QUARANTINE, TRAIN, TRAIN_TEXT, TRAIN_TOKENS, VAL, VAL_TOKENS
from cptkit.parquet_files import open_parquet
from cptkit.records import DocResult

TOKENS_SCHEMA = pa.schema([("id", pa.string()), ("input_ids", pa.list_(pa.int32()))])
# The training text when it is not written as JSON lines: the same fields, metadata as a JSON object.
TEXT_SCHEMA = pa.schema([("id", pa.string()), ("text", pa.string()), ("metadata", pa.string())])
SHARD_FOLDERS = (TRAIN_TOKENS, VAL_TOKENS, TRAIN_TEXT)
# Documents per Parquet row group of a shard.
_BATCH_ROWS = 1024
# Names older cptkit versions wrote (single token files), removed when a folder is prepared again.
_OLD_NAMES = ("train_tokens.parquet", "val_tokens.parquet")


def token_lists(arrays: Sequence[np.ndarray | None]) -> pa.ListArray:
    """int32 token arrays as one Arrow list column (None for a document without tokens)."""
    lengths = [0 if a is None else len(a) for a in arrays]
    offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    present = [a for a in arrays if a is not None]
    values = pa.array(np.concatenate(present) if present else np.zeros(0, np.int32), pa.int32())
    mask = pa.array([a is None for a in arrays]) if len(present) < len(arrays) else None
    return pa.ListArray.from_arrays(pa.array(offsets), values, mask=mask)


def shard_files(folder: Path) -> list[Path]:
    """A shard folder's files in order."""
    return sorted(folder.glob("part-*.parquet"))


def output_files(directory: Path) -> list[str]:
    """The prepared files in a dataset's folder, as paths relative to it (what the manifest lists)."""
    names = [n for n in (TRAIN, VAL, QUARANTINE, DROPPED) if (directory / n).is_file()]
    for folder in SHARD_FOLDERS:
        names += [f"{folder}/{p.name}" for p in shard_files(directory / folder)]
    return names


def describe_shards(directory: Path) -> dict[str, list[dict[str, Any]]]:
    """Each shard folder's files with their documents, tokens (token shards) and sha256, for the manifest.
    Reads one row group at a time."""
    out: dict[str, list[dict[str, Any]]] = {}
    for folder in SHARD_FOLDERS:
        files = shard_files(directory / folder)
        if not files:
            continue
        out[folder] = []
        for path in files:
            parquet = open_parquet(path)
            entry: dict[str, Any] = {"file": f"{folder}/{path.name}", "documents": parquet.metadata.num_rows}
            if "input_ids" in parquet.schema_arrow.names:
                tokens, max_id = 0, -1
                # Row group by row group: Arrow's default batch (65,536 documents) held a whole shard
                # (the manifest step's peak RSS rose from 441 to 956 MB at 200 MB of text).
                for batch in parquet.iter_batches(batch_size=_BATCH_ROWS, columns=["input_ids"]):
                    values = np.asarray(batch.column(0).flatten(), dtype=np.int32)
                    tokens += len(values)
                    max_id = max(max_id, int(values.max()) if len(values) else -1)
                entry.update(tokens=tokens, max_token_id=max_id)
            entry["sha256"] = _sha256(path)
            out[folder].append(entry)
    return out


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


class _Shards:
    """Rows of one schema written to `folder/part-NNNNN.parquet`, a new file every `per_shard` rows."""

    def __init__(self, folder: Path, schema: pa.Schema, per_shard: int) -> None:
        self.folder, self.schema, self.per_shard = folder, schema, per_shard
        self.rows: list[list[Any]] = [[] for _ in schema.names]
        self.writer: pq.ParquetWriter | None = None
        self.in_shard = 0
        self.shards = 0

    def add(self, *values: Any) -> None:
        for column, value in zip(self.rows, values, strict=True):
            column.append(value)
        self.in_shard += 1
        if len(self.rows[0]) >= _BATCH_ROWS or self.in_shard >= self.per_shard:
            self._flush()
        if self.in_shard >= self.per_shard:
            self._close_shard()

    def _flush(self) -> None:
        if not self.rows[0]:
            return
        if self.writer is None:
            path = self.folder / f"part-{self.shards:05d}.parquet"
            self.writer = pq.ParquetWriter(path, self.schema, compression="zstd")
        arrays = [
            token_lists(column) if field.name == "input_ids" else pa.array(column, field.type)
            for field, column in zip(self.schema, self.rows, strict=True)
        ]
        self.writer.write_batch(pa.RecordBatch.from_arrays(arrays, schema=self.schema))
        self.rows = [[] for _ in self.schema.names]

    def _close_shard(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
            self.shards += 1
        self.in_shard = 0

    def close(self) -> None:
        self._flush()
        self._close_shard()


class PreparedWriter:
    """Writes train/val JSON lines (id, text, metadata), the token shards, quarantined documents (id,
    reason, a preview) and dropped ones (id, reason). With `train_jsonl` off, the training text goes to
    `train_text/` shards instead of train.jsonl."""

    def __init__(self, directory: Path, tokenize: bool, shard_documents: int, train_jsonl: bool = True) -> None:
        self.directory = directory
        self.tokenize, self.shard_documents, self.train_jsonl = tokenize, shard_documents, train_jsonl
        self.files: dict[str, IO[str]] = {}
        self.shards: dict[str, _Shards] = {}

    def __enter__(self) -> PreparedWriter:
        self._exit = contextlib.ExitStack()
        for name in [TRAIN, VAL, QUARANTINE, DROPPED]:
            if name == TRAIN and not self.train_jsonl:
                continue
            tmp = self._exit.enter_context(atomic_path(self.directory / name))
            self.files[name] = self._exit.enter_context(tmp.open("w", encoding="utf-8"))
        folders = ([TRAIN_TOKENS, VAL_TOKENS] if self.tokenize else []) + ([] if self.train_jsonl else [TRAIN_TEXT])
        for folder in folders:
            tmp_dir = self._exit.enter_context(atomic_dir(self.directory / folder))
            schema = TEXT_SCHEMA if folder == TRAIN_TEXT else TOKENS_SCHEMA
            self.shards[folder] = _Shards(tmp_dir, schema, self.shard_documents)
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
                if train and not self.train_jsonl:
                    self.shards[TRAIN_TEXT].add(doc_id, r.text, json.dumps(meta, ensure_ascii=False, default=str))
                else:
                    self._write_line(TRAIN if train else VAL, {"id": doc_id, "text": r.text, **meta})
                if r.tokens is not None:
                    # A copy: a view would keep the engine's whole batch alive until the shard's rows are
                    # written (up to 1,024 documents, ~20 batches apart for the validation split).
                    tokens = np.array(r.tokens, dtype=np.int32)
                    self.shards[TRAIN_TOKENS if train else VAL_TOKENS].add(doc_id, tokens)

    def _write_line(self, name: str, record: dict[str, Any]) -> None:
        self.files[name].write(json.dumps(record, ensure_ascii=False, default=str) + "\n")

    def __exit__(self, exc_type: Any, *rest: Any) -> None:
        # On an exception, atomic_path and atomic_dir rename nothing and remove the temporary files.
        if exc_type is None:
            for shards in self.shards.values():
                shards.close()
            self._remove_unwritten()
        else:
            for shards in self.shards.values():
                with contextlib.suppress(Exception):
                    shards.close()
        self._exit.__exit__(exc_type, *rest)

    def _remove_unwritten(self) -> None:
        """Outputs of an earlier preparation that this one does not write: they would look current."""
        stale = [*_OLD_NAMES, TRAIN_TEXT if self.train_jsonl else TRAIN]
        if not self.tokenize:
            stale += [TRAIN_TOKENS, VAL_TOKENS]
        for name in stale:
            path = self.directory / name
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
