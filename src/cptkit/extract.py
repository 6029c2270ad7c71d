"""The extract stage: copy the configured source into a raw Parquet snapshot with a manifest.

The snapshot keeps every row the source yields, malformed ones included (with their `error`), so that
prepare can account for each document. Its content fingerprint is what prepare keys on.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cptkit.artifacts import (
    MANIFEST,
    atomic_path,
    describe_outputs,
    invalidate,
    new_manifest,
    up_to_date,
    write_json_atomic,
)
from cptkit.config import section_fingerprint
from cptkit.datasets import Dataset
from cptkit.progress import progress_bar
from cptkit.sources import ERROR, ID, TEXT, open_source

SNAPSHOT = "documents.parquet"


@dataclass(frozen=True)
class StageResult:
    manifest: dict[str, Any]
    directory: Path
    skipped: bool


def extract(dataset: Dataset, force: bool = False) -> StageResult:
    """Snapshot one dataset's source into `<dataset dir>/raw`."""
    source = open_source(dataset.source)
    out = dataset.raw_dir
    config_fp = section_fingerprint(dataset.source)
    input_fp = source.input_fingerprint()
    existing = up_to_date(out, config_fp, input_fp)
    if existing is not None and not force:
        return StageResult(existing, out, skipped=True)

    invalidate(out)
    started = time.perf_counter()
    description = source.describe()
    digest = hashlib.sha256()
    rows = text_bytes = 0
    malformed: dict[str, int] = {}
    schema: pa.Schema | None = None
    with atomic_path(out / SNAPSHOT) as tmp, progress_bar(f"extract {dataset.name}", None) as advance:
        writer: pq.ParquetWriter | None = None
        try:
            for batch in source.batches():
                if schema is None:
                    schema = batch.schema
                    writer = pq.ParquetWriter(tmp, schema, compression="zstd")
                elif batch.schema != schema:
                    batch = batch.cast(schema)
                assert writer is not None
                writer.write_batch(batch)
                rows += batch.num_rows
                text_bytes += int(pc.sum(pc.binary_length(batch.column(TEXT))).as_py() or 0)
                _update_digest(digest, batch)
                for reason in batch.column(ERROR).drop_null().to_pylist():
                    malformed[reason] = malformed.get(reason, 0) + 1
                advance(batch.num_rows)
            if writer is None:  # an empty source still leaves a valid, empty snapshot
                empty = pa.schema([(ID, pa.string()), (TEXT, pa.large_string()), (ERROR, pa.string())])
                writer = pq.ParquetWriter(tmp, empty, compression="zstd")
        finally:
            if writer is not None:
                writer.close()

    manifest = new_manifest("extract", config_fp, input_fp)
    manifest.update(
        dataset=dataset.name,
        source=description,
        delta_version=source.table_version(),
        rows=rows,
        bytes=text_bytes,
        malformed_rows=malformed,
        content_fingerprint=digest.hexdigest()[:32],
        outputs=describe_outputs(out, [SNAPSHOT]),
        seconds=round(time.perf_counter() - started, 3),
    )
    write_json_atomic(out / MANIFEST, manifest)
    return StageResult(manifest, out, skipped=False)


def _update_digest(digest: Any, batch: pa.RecordBatch) -> None:
    for doc_id, text, err in zip(
        batch.column(ID).to_pylist(),
        batch.column(TEXT).to_pylist(),
        batch.column(ERROR).to_pylist(),
        strict=True,
    ):
        digest.update(doc_id.encode())
        digest.update(b"\0")
        digest.update((text if text is not None else f"\x01{err}").encode("utf-8", "surrogatepass"))
        digest.update(b"\n")
