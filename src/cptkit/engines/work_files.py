"""What the local engine keeps between its two passes, so that its memory does not grow with the text:
each document's result on disk (`ResultSpill`, Arrow IPC in input order) and the dedup inputs in
compact arrays (`DedupStore`: ids, exact keys and band hashes in memory, signatures on disk, read back
memory-mapped for candidate pairs only)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import cast

import numpy as np
import pyarrow as pa

from cptkit.config import DedupConfig
from cptkit.corpus import duplicate_fates
from cptkit.dedup import content_keys, lsh_bands
from cptkit.prepared_files import token_lists
from cptkit.records import DocResult, Status

_STATUS, _REASON, _TEXT, _TOKENS = "__cptkit_status", "__cptkit_reason", "__cptkit_text", "__cptkit_tokens"
_RESULT_FIELDS = [
    pa.field(_STATUS, pa.string()),
    pa.field(_REASON, pa.string()),
    pa.field(_TEXT, pa.large_string()),
    pa.field(_TOKENS, pa.list_(pa.int32())),
]
# LZ4 costs little CPU and roughly halves the disk the spilled text takes.
_IPC_OPTIONS = pa.ipc.IpcWriteOptions(compression="lz4")


class ResultSpill:
    """Each batch's documents (id, metadata) with their record results, written in order and read back
    batch by batch."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._writer: pa.ipc.RecordBatchFileWriter | None = None

    def write(self, batch: pa.RecordBatch, results: Sequence[DocResult]) -> None:
        """`batch`: the snapshot's id and metadata columns."""
        columns = [
            pa.array([r.status for r in results], pa.string()),
            pa.array([r.reason for r in results], pa.string()),
            pa.array([r.text for r in results], pa.large_string()),
            token_lists([r.tokens for r in results]),
        ]
        out = pa.RecordBatch.from_arrays([*batch.columns, *columns], schema=pa.schema([*batch.schema, *_RESULT_FIELDS]))
        if self._writer is None:
            self._writer = pa.ipc.new_file(self.path, out.schema, options=_IPC_OPTIONS)
        self._writer.write_batch(out)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()

    def read(self) -> Iterator[tuple[pa.RecordBatch, list[DocResult]]]:
        """(id and metadata columns, results without step counts) per batch, in the order written."""
        if self._writer is None:
            return
        # Read into buffers, not memory-mapped: every mapped page read would stay resident until the end
        # of the pass, and the process's memory would grow with the size of the corpus.
        with pa.OSFile(str(self.path)) as source:
            reader = pa.ipc.open_file(source)
            for i in range(reader.num_record_batches):
                batch = reader.get_batch(i)
                yield batch.drop_columns([f.name for f in _RESULT_FIELDS]), _results(batch)


def _results(batch: pa.RecordBatch) -> list[DocResult]:
    tokens = batch.column(_TOKENS)
    offsets = np.asarray(tokens.offsets)
    values = np.asarray(tokens.values, dtype=np.int32)
    present = np.asarray(tokens.is_valid())
    statuses = batch.column(_STATUS).to_pylist()
    reasons = batch.column(_REASON).to_pylist()
    texts = batch.column(_TEXT).to_pylist()
    # Each document's tokens copied out of the batch: the writer holds documents until it has a batch
    # of their split (val fills slowly), and a view would keep the whole batch's buffer alive with it.
    return [
        DocResult(
            cast(Status, statuses[i]),
            reasons[i],
            texts[i],
            tokens=values[offsets[i] : offsets[i + 1]].copy() if present[i] else None,
        )
        for i in range(len(batch))
    ]


class DedupStore:
    """The dedup inputs of every document that passed the record steps, in input order: ids (Arrow
    strings), exact keys (two uint64) and band hashes (one uint64 per band) in memory; signatures
    (uint32) appended to a file. `capacity` bounds the number of documents."""

    def __init__(self, capacity: int, config: DedupConfig, directory: Path) -> None:
        self.config = config
        self.count = 0
        self.ids: list[pa.Array] = []
        self.keys = np.zeros((capacity, 2), dtype=np.uint64)
        bands = lsh_bands(config.threshold, config.num_perm).bands if config.near else 0
        self.bands = np.zeros((capacity, bands), dtype=np.uint64)
        self.signature_path = directory / "signatures.u32"
        self._signatures = self.signature_path.open("wb") if config.near else None

    def __enter__(self) -> DedupStore:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._signatures is not None:
            self._signatures.close()

    def add(self, ids: pa.Array, results: Sequence[DocResult]) -> None:
        positions = [i for i, r in enumerate(results) if r.status == "keep"]
        if not positions:
            return
        kept = [results[i] for i in positions]
        rows = slice(self.count, self.count + len(kept))
        self.ids.append(ids.take(pa.array(positions, pa.int64())))
        self.keys[rows] = content_keys([r.key or b"" for r in kept])
        if self._signatures is not None:
            self.bands[rows] = np.stack([r.bands for r in kept if r.bands is not None])
            signatures = np.stack([r.signature for r in kept if r.signature is not None])
            self._signatures.write(signatures.astype("<u4").tobytes())
        self.count += len(kept)

    def fates(self) -> np.ndarray:
        """`corpus.duplicate_fates` of the documents added, in the order added."""
        signatures = None
        if self._signatures is not None:
            self._signatures.close()
            if self.count:
                shape = (self.count, self.config.num_perm)
                signatures = np.memmap(self.signature_path, dtype="<u4", mode="r", shape=shape)
        ids = pa.concat_arrays(self.ids) if self.ids else pa.array([], pa.string())
        bands = self.bands[: self.count] if self._signatures is not None else None
        return duplicate_fates(ids, self.keys[: self.count], bands, signatures, self.config)
