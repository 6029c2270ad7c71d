"""The extract stage: copy the configured source into a raw Parquet snapshot with a manifest.

The snapshot keeps every row the source yields, malformed ones included (with their `error`), so that
prepare can account for each document. Its content fingerprint is what prepare keys on.

With `prepare.engine: spark` (`spark` given), a Databricks table is read by Spark (`databricks_spark`);
other sources keep their readers.

An incremental source (Databricks watermark or change-data-feed mode) reads only what changed since the
state saved by the last successful run and applies it to the previous snapshot by id. The new snapshot
replaces the old one atomically and the state is saved after it, so an interrupted run loses nothing and
duplicates nothing: the next run starts again from the last saved state.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Iterator
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
    read_json,
    up_to_date,
    write_json_atomic,
)
from cptkit.config import Config, DatabricksSourceConfig, SparkConfig, section_fingerprint
from cptkit.datasets import SNAPSHOT, Dataset
from cptkit.folders import check_writable, claim
from cptkit.progress import progress_bar
from cptkit.sources import ERROR, ID, TEXT, Source, open_source
from cptkit.sources.incremental import STATE, Applied, IncrementalSource, Read, apply_changes, spool_changes
from cptkit.stage import StageResult


@dataclass(frozen=True)
class DryRunResult:
    """What extract would read (query, column mapping, row count); nothing was written."""

    plan: dict[str, Any]


def extract(
    dataset: Dataset,
    force: bool = False,
    *,
    connect: Callable[[], Any] | None = None,
    workspace: Callable[[], Any] | None = None,
    spark: SparkConfig | None = None,
) -> StageResult:
    """Snapshot one dataset's source into `<dataset dir>/raw`. `connect` / `workspace` replace the default
    Databricks connections (see `open_source`); `spark` (prepare.spark, when prepare.engine is spark) reads
    a Databricks table with Spark. `force` rereads everything, incremental sources included."""
    # The prepared data goes to the raw folder's parent: refuse a user's folder before writing anything there.
    check_writable(dataset.directory, "prepare")
    source = open_source(dataset.source, connect=connect, workspace=workspace, spark=_spark_reader(dataset, spark))
    try:
        with claim(dataset.raw_dir, "extract"):
            return _extract(dataset, source, force)
    finally:
        if isinstance(source, IncrementalSource):
            source.close()


def dry_run(
    dataset: Dataset,
    *,
    connect: Callable[[], Any] | None = None,
    workspace: Callable[[], Any] | None = None,
    spark: SparkConfig | None = None,
) -> DryRunResult:
    """The query, column mapping and row count a real extract would use; writes nothing."""
    source = open_source(dataset.source, connect=connect, workspace=workspace, spark=_spark_reader(dataset, spark))
    if isinstance(source, IncrementalSource):
        try:
            plan = source.dry_run(_saved_state(dataset.raw_dir, source))
        finally:
            source.close()
    else:
        c = dataset.source
        plan = {
            "source": source.describe(),
            "columns": {
                "id": getattr(c, "id_column", None) or "hash of the text",
                "text": getattr(c, "text_column", "text"),
                **{m: m for m in getattr(c, "metadata_columns", [])},
            },
            "rows": sum(batch.num_rows for batch in source.batches()),
        }
    return DryRunResult({"dataset": dataset.name, **plan})


def spark_settings(config: Config) -> SparkConfig | None:
    """prepare.spark when prepare.engine is spark: then extract reads Databricks tables with Spark too."""
    return config.prepare.spark if config.prepare.engine == "spark" else None


def _spark_reader(dataset: Dataset, spark: SparkConfig | None) -> Callable[[], Any] | None:
    """The factory of the Spark reader of a Databricks table (its session started only when read)."""
    source = dataset.source
    if spark is None or not isinstance(source, DatabricksSourceConfig):
        return None

    def reader() -> Any:
        from cptkit.engines.spark_session import is_remote, session
        from cptkit.sources.databricks_client import config_secrets
        from cptkit.sources.databricks_spark import SparkWarehouse

        # The same connection as the source's own: a Databricks Connect session authenticates with it.
        work_dir = None if is_remote(spark) else dataset.raw_dir
        dataset.raw_dir.mkdir(parents=True, exist_ok=True)
        return SparkWarehouse(session(spark, source), work_dir, source.batch_size, config_secrets(source))

    return reader


def _saved_state(out: Path, source: IncrementalSource) -> dict[str, Any] | None:
    """The state of the last successful run, when it matches the snapshot on disk and these settings."""
    if not (out / SNAPSHOT).is_file():
        return None
    state = read_json(out / STATE)
    return state if state is not None and state.get("key") == source.state_key() else None


def extract_fingerprint(dataset: Dataset) -> str:
    # A rotated token or client secret does not change what is read.
    if isinstance(dataset.source, DatabricksSourceConfig):
        return section_fingerprint(dataset.source.model_dump(exclude={"token", "client_secret"}))
    return section_fingerprint(dataset.source)


def _extract(dataset: Dataset, source: Source, force: bool) -> StageResult:
    out = dataset.raw_dir
    config_fp = extract_fingerprint(dataset)
    input_fp = source.input_fingerprint()
    existing = up_to_date(out, config_fp, input_fp)
    if existing is not None and not force:
        return StageResult(existing, out, skipped=True)

    previous = None
    if isinstance(source, IncrementalSource):
        previous = None if force else _saved_state(out, source)
        read = source.read(previous)
    else:
        read = Read(source.batches(), changes=False, state=dict)
    invalidate(out)
    started = time.perf_counter()
    description = source.describe()
    applied = Applied()
    with atomic_path(out / SNAPSHOT) as tmp, progress_bar(f"extract {dataset.name}", None) as advance:
        if read.changes:
            spool = out / f".changes.{os.getpid()}.tmp"  # a killed run's spool is removed by invalidate()
            try:
                final, changed_rows = spool_changes(_counted(read.batches, advance), spool)
                batches = apply_changes(out / SNAPSHOT, spool if changed_rows else None, final, applied)
                stats = _write_snapshot(tmp, batches, lambda n: None)
            finally:
                spool.unlink(missing_ok=True)
        else:
            stats = _write_snapshot(tmp, read.batches, advance)
    state = read.state()
    if state:
        write_json_atomic(out / STATE, state)  # only now: the snapshot it describes is in place

    manifest = new_manifest("extract", config_fp, input_fp)
    manifest.update(
        dataset=dataset.name,
        source=description,
        delta_version=source.table_version(),
        rows=stats["rows"],
        bytes=stats["bytes"],
        malformed_rows=stats["malformed"],
        content_fingerprint=stats["digest"],
        outputs=describe_outputs(out, [SNAPSHOT]),
        seconds=round(time.perf_counter() - started, 3),
    )
    if read.query is not None:
        manifest["query"] = read.query
    if isinstance(source, IncrementalSource):
        manifest["incremental"] = {
            "mode": description.get("mode"),
            "from_state": previous,
            "applied_changes": read.changes,
            "upserted": applied.upserted if read.changes else stats["rows"],
            "deleted": applied.deleted,
            "unchanged": applied.unchanged,
            "state": state,
            **read.details,
        }
    write_json_atomic(out / MANIFEST, manifest)
    return StageResult(manifest, out, skipped=False)


def _counted(batches: Iterator[pa.RecordBatch], advance: Callable[[int], None]) -> Iterator[pa.RecordBatch]:
    for batch in batches:
        advance(batch.num_rows)
        yield batch


def _write_snapshot(tmp: Path, batches: Iterator[pa.RecordBatch], advance: Callable[[int], None]) -> dict[str, Any]:
    digest = hashlib.sha256()
    rows = text_bytes = 0
    malformed: dict[str, int] = {}
    schema: pa.Schema | None = None
    writer: pq.ParquetWriter | None = None
    try:
        for batch in batches:
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
    return {"rows": rows, "bytes": text_bytes, "malformed": malformed, "digest": digest.hexdigest()[:32]}


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
