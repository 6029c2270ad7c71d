"""The Spark engine: the same outputs as the local engine, with the record work on a SparkSession.

Spark reads the snapshot with its Parquet reader and runs `RecordProcessor` (the same code as the local
engine) in `mapInArrow`; each document's result (status, reason, text, exact key, band hashes, signature,
tokens, step counts) comes back as Arrow columns with its row number in the snapshot, and Spark writes
them to a work folder. The dedup decisions run on Spark too (`spark_dedup`: the same definition as
`corpus.duplicate_fates`, as DataFrame operations), and each document's fate is joined to its result; Spark
writes them ordered by row number. The driver then streams those files and writes the prepared files in
input order with `PreparedWriter`, taking ids and metadata from the snapshot itself, so that their values
are the ones the local engine writes. It holds nothing per document.

Through Databricks Connect the session shares no file with this machine: the snapshot is sent to it as
data (pieces of local data, numbered rows), the results stay on the cluster (a local checkpoint) and the
ordered results are streamed back into the same writer loop.

pyspark is an optional extra (`pip install 'cptkit[spark]'`) and needs Java; it is imported on use. Where the
session comes from is `spark_session`.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cptkit.config import PrepareConfig
from cptkit.corpus import DUPLICATE_REASONS, KEEP, Tally, assign_splits
from cptkit.engines import PrepareJob
from cptkit.engines.spark_dedup import FATE, duplicate_fates
from cptkit.engines.spark_session import first_line, is_remote, session
from cptkit.errors import CptkitError, StageError
from cptkit.parquet_files import open_parquet
from cptkit.prepared_files import PreparedWriter, token_lists
from cptkit.records import DocResult, RecordProcessor, Status
from cptkit.sources import ERROR, ID, TEXT

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, Row, SparkSession

MakeProcessor = Callable[[PrepareConfig, str | None], RecordProcessor]

_POSITION, _STATUS, _REASON, _KEY = "position", "status", "reason", "key"
_BANDS, _SIGNATURE, _TOKENS, _COUNTS = "bands", "signature", "tokens", "counts"
# uint64 band hashes and uint32 signature values travel as Spark's signed longs and ints (same bits).
_RESULT_SCHEMA = pa.schema(
    [
        (_POSITION, pa.int64()),
        (ID, pa.string()),
        (_STATUS, pa.string()),
        (_REASON, pa.string()),
        (TEXT, pa.string()),
        (_KEY, pa.binary()),
        (_BANDS, pa.list_(pa.int64())),
        (_SIGNATURE, pa.list_(pa.int32())),
        (_TOKENS, pa.list_(pa.int32())),
        (_COUNTS, pa.string()),  # the step counts as JSON
    ]
)
_RESULT_DDL = (
    f"{_POSITION} long, {ID} string, {_STATUS} string, {_REASON} string, {TEXT} string, {_KEY} binary, "
    f"{_BANDS} array<long>, {_SIGNATURE} array<int>, {_TOKENS} array<int>, {_COUNTS} string"
)
_WRITTEN_COLUMNS = [_POSITION, _STATUS, _REASON, TEXT, _TOKENS, _COUNTS, FATE]
_WRITTEN_SCHEMA = pa.schema([*(_RESULT_SCHEMA.field(n) for n in _WRITTEN_COLUMNS[:-1]), (FATE, pa.int8())])
# Spark's default localRelationCacheThreshold: the size of a piece of the snapshot sent to the session.
_DEFAULT_PIECE_BYTES = 64 << 20
# Marks the one line a failed task reports, so the driver can find it in Spark's error text.
_TASK_ERROR = "cptkit-task-error:"


def run(job: PrepareJob, advance: Callable[[int], None], make_processor: MakeProcessor = RecordProcessor) -> Tally:
    """`make_processor` builds each task's record processor (a parameter so that tests can make one fail)."""
    spark = session(job.config.spark, job.connection)
    if is_remote(job.config.spark):
        # Databricks Connect: the cluster cannot read this machine's files, nor this machine the cluster's.
        return _write(job, _remote_results(spark, job, make_processor), advance)
    # A hidden ".*.tmp" name: a killed run's leftovers are removed by the next one (artifacts.invalidate).
    with tempfile.TemporaryDirectory(prefix=".prepare-work.", suffix=".tmp", dir=job.directory) as work:
        files = _ordered_results(spark, job, Path(work), make_processor)
        return _write(job, _read(files, _WRITTEN_COLUMNS), advance)


def _write(job: PrepareJob, batches: Iterator[pa.RecordBatch], advance: Callable[[int], None]) -> Tally:
    """Write the prepared files from the results in snapshot order, taking ids and metadata from the snapshot."""
    snapshot = open_parquet(job.snapshot)
    metadata_columns = [n for n in snapshot.schema_arrow.names if n not in (ID, TEXT, ERROR)]
    documents = _SnapshotRows(snapshot, [ID, *metadata_columns], job.config.chunk_size)
    tally = Tally()
    done = 0
    with PreparedWriter(
        job.directory, job.tokenizer_path is not None, job.config.shard_documents, job.train_jsonl
    ) as writer:
        for batch in batches:
            positions = np.asarray(batch.column(_POSITION))
            if not np.array_equal(positions, np.arange(done, done + len(batch))):
                raise StageError(f"{job.snapshot}: Spark returned rows {positions[:3]}... where {done} was next")
            results = _written_results(batch)
            tally.count_steps(results)
            for r, fate in zip(results, batch.column(FATE).to_pylist(), strict=True):
                if r.status == "keep" and fate != KEEP:
                    r.drop(DUPLICATE_REASONS[fate])
            rows = documents.take(len(batch))
            ids = rows.column(ID).to_pylist()
            metadata = rows.select(metadata_columns).to_pylist() if metadata_columns else [{}] * len(ids)
            splits = assign_splits(ids, results, job.config.split)
            writer.write(ids, metadata, results, splits)
            tally.add(results, splits)
            done += len(batch)
            advance(len(batch))
    return tally


def _ordered_results(spark: SparkSession, job: PrepareJob, work: Path, make_processor: MakeProcessor) -> list[Path]:
    """Run the record work on Spark; the result files, whose rows are in snapshot order."""
    # The row number within the snapshot file, from Spark's Parquet reader: the local engine's order.
    from pyspark.sql.functions import col

    # Absolute paths: the JVM's working folder need not be this process's.
    work = work.resolve()
    task = _record_task(job.config, job.tokenizer_path, make_processor)
    with _spark_errors(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # pyspark's notice about the pandas version
        snapshot = spark.read.parquet(str(job.snapshot.resolve()))
        documents = snapshot.select(ID, TEXT, ERROR, col("_metadata.row_index").alias(_POSITION))
        # Written once, then ordered from the files: ordering the task's output directly would run the
        # record work twice (once to sample the range boundaries).
        documents.mapInArrow(task, _RESULT_DDL).write.parquet(str(work / "results"))
        results = spark.read.schema(_RESULT_DDL).parquet(str(work / "results"))
        _with_fates(results, job.config).orderBy(_POSITION).write.parquet(str(work / "ordered"))
    # Part files are numbered in the order of the ranges they hold.
    return sorted((work / "ordered").glob("part-*.parquet"))


def _with_fates(results: DataFrame, config: PrepareConfig) -> DataFrame:
    """The results the writer reads, each with its dedup fate (null where the record steps dropped it)."""
    from pyspark.sql.functions import col

    fates = duplicate_fates(
        results.where(col(_STATUS) == "keep"),
        config.dedup,
        position=_POSITION,
        doc_id=ID,
        key=_KEY,
        bands=_BANDS,
        signature=_SIGNATURE,
    )
    return results.drop(_KEY, _BANDS, _SIGNATURE).join(fates, on=_POSITION, how="left")


def _remote_results(spark: SparkSession, job: PrepareJob, make_processor: MakeProcessor) -> Iterator[pa.RecordBatch]:
    """The record work on a session that shares no file with this machine: the snapshot goes up as data,
    the results stay on the cluster (checkpointed, so that the record work runs once) and come back in
    snapshot order, streamed."""
    task = _record_task(job.config, job.tokenizer_path, make_processor)
    with _spark_errors(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # pyspark's notice about the pandas version
        documents = _uploaded(spark, job.snapshot)
        results = documents.mapInArrow(task, _RESULT_DDL).localCheckpoint(eager=True)
        rows = _with_fates(results, job.config).select(*_WRITTEN_COLUMNS).orderBy(_POSITION).toLocalIterator()
        yield from _row_batches(rows, job.config.chunk_size)


def _uploaded(spark: SparkSession, snapshot: Path) -> DataFrame:
    """The snapshot's id, text and error columns with their row number, as a DataFrame of local data: a
    union of pieces of about `spark.sql.session.localRelationCacheThreshold` bytes each. Spark Connect
    uploads a piece of that size as an artifact (in chunks) instead of inlining it in the query plan, whose
    size is limited, and only one piece is in this process's memory at a time."""
    from functools import reduce

    piece_bytes = _cache_threshold(spark)
    parquet = open_parquet(snapshot)
    pieces: list[DataFrame] = []
    pending: list[pa.RecordBatch] = []
    pending_bytes = done = 0

    def upload() -> None:
        nonlocal pending, pending_bytes
        pieces.append(spark.createDataFrame(pa.Table.from_batches(pending)))
        pending, pending_bytes = [], 0

    for read in parquet.iter_batches(batch_size=1024, columns=[ID, TEXT, ERROR]):
        positions = pa.array(np.arange(done, done + read.num_rows, dtype=np.int64))
        batch = pa.RecordBatch.from_arrays([*read.columns, positions], [ID, TEXT, ERROR, _POSITION])
        done += read.num_rows
        while batch.num_rows:
            # The rows that about fill the piece, from the batch's mean row size.
            room = piece_bytes - pending_bytes
            take = min(batch.num_rows, max(1, -(-room * batch.num_rows // max(1, batch.nbytes))))
            pending.append(batch.slice(0, take))
            pending_bytes += pending[-1].nbytes
            batch = batch.slice(take)
            if pending_bytes >= piece_bytes:
                upload()
    if pending or not pieces:
        if not pending:  # an empty snapshot: one empty piece, for the schema
            fields = [parquet.schema_arrow.field(c) for c in (ID, TEXT, ERROR)]
            pending = [pa.RecordBatch.from_pylist([], schema=pa.schema([*fields, (_POSITION, pa.int64())]))]
        upload()
    return reduce(lambda a, b: a.union(b), pieces)


def _cache_threshold(spark: SparkSession) -> int:
    from pyspark.errors import PySparkException

    try:
        value = spark.conf.get("spark.sql.session.localRelationCacheThreshold")
    except PySparkException:  # a server without the setting
        value = None
    return int(value) if value else _DEFAULT_PIECE_BYTES


def _row_batches(rows: Iterator[Row], size: int) -> Iterator[pa.RecordBatch]:
    """Rows (`_WRITTEN_COLUMNS`) as Arrow batches of `size` rows of `_WRITTEN_SCHEMA`."""
    while chunk := list(islice(rows, size)):
        columns = list(zip(*chunk, strict=True))
        arrays = [pa.array(values, field.type) for values, field in zip(columns, _WRITTEN_SCHEMA, strict=True)]
        yield pa.RecordBatch.from_arrays(arrays, schema=_WRITTEN_SCHEMA)


def _record_task(
    config: PrepareConfig, tokenizer_path: str | None, make_processor: MakeProcessor
) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    def task(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        # One Python worker per core already; the tokenizer's own thread pool would oversubscribe them.
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        processor = make_processor(config, tokenizer_path)
        for batch in batches:
            for start in range(0, batch.num_rows, config.chunk_size):
                chunk = batch.slice(start, config.chunk_size)
                yield _result_batch(chunk, _process(processor, chunk))

    return task


def _process(processor: RecordProcessor, batch: pa.RecordBatch) -> list[DocResult]:
    texts, errors = batch.column(TEXT).to_pylist(), batch.column(ERROR).to_pylist()
    try:
        return processor.process(texts, errors)
    except Exception:
        # Find the document: one line naming it is what the driver reports, not a JVM stack trace.
        for doc_id, text, error in zip(batch.column(ID).to_pylist(), texts, errors, strict=True):
            try:
                processor.process([text], [error])
            except Exception as exc:
                raise RuntimeError(f"{_TASK_ERROR} document {doc_id!r}: {type(exc).__name__}: {exc}") from exc
        raise


def _result_batch(batch: pa.RecordBatch, results: Sequence[DocResult]) -> pa.RecordBatch:
    columns = [
        batch.column(_POSITION),
        batch.column(ID),
        pa.array([r.status for r in results], pa.string()),
        pa.array([r.reason for r in results], pa.string()),
        pa.array([r.text for r in results], pa.string()),
        pa.array([r.key for r in results], pa.binary()),
        _lists([r.bands for r in results], np.int64),
        _lists([r.signature for r in results], np.int32),
        token_lists([r.tokens for r in results]),
        pa.array([None if r.counts is None else json.dumps(r.counts) for r in results], pa.string()),
    ]
    return pa.RecordBatch.from_arrays(columns, schema=_RESULT_SCHEMA)


def _lists(arrays: list[np.ndarray | None], dtype: type[np.signedinteger[Any]]) -> pa.ListArray:
    """Arrays of unsigned integers as an Arrow list column of the signed type of their size (Spark has no
    unsigned types; the bits are kept)."""
    present = [a.view(dtype) for a in arrays if a is not None]
    offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
    np.cumsum([0 if a is None else len(a) for a in arrays], out=offsets[1:])
    values = pa.array(np.concatenate(present) if present else np.zeros(0, dtype))
    mask = pa.array([a is None for a in arrays]) if len(present) < len(arrays) else None
    return pa.ListArray.from_arrays(pa.array(offsets), values, mask=mask)


def _read(files: Sequence[Path], columns: list[str]) -> Iterator[pa.RecordBatch]:
    for path in files:
        yield from open_parquet(path).iter_batches(columns=columns)


def _rows(column: pa.Array, dtype: type[np.generic]) -> list[np.ndarray | None]:
    """A list column as one numpy array (viewed as `dtype`) per row, None where null."""
    lists = cast(pa.ListArray, column)
    offsets = np.asarray(lists.offsets)
    values = np.asarray(lists.values).view(dtype)
    present = np.asarray(lists.is_valid())
    return [values[offsets[i] : offsets[i + 1]] if present[i] else None for i in range(len(lists))]


def _written_results(batch: pa.RecordBatch) -> list[DocResult]:
    tokens = _rows(batch.column(_TOKENS), np.int32)
    reasons, texts = batch.column(_REASON).to_pylist(), batch.column(TEXT).to_pylist()
    counts = batch.column(_COUNTS).to_pylist()
    return [
        DocResult(
            cast(Status, status),
            reasons[i],
            texts[i],
            tokens=tokens[i],
            counts=None if counts[i] is None else json.loads(counts[i]),
        )
        for i, status in enumerate(batch.column(_STATUS).to_pylist())
    ]


class _SnapshotRows:
    """The snapshot's rows in order, taken `n` at a time whatever the batches they were read in."""

    def __init__(self, parquet: pq.ParquetFile, columns: list[str], batch_size: int) -> None:
        self._batches = parquet.iter_batches(batch_size=batch_size, columns=columns)
        self._pending = pa.schema([parquet.schema_arrow.field(c) for c in columns]).empty_table()

    def take(self, n: int) -> pa.Table:
        while self._pending.num_rows < n:
            batch = next(self._batches)
            self._pending = pa.concat_tables([self._pending, pa.Table.from_batches([batch])])
        rows, self._pending = self._pending.slice(0, n), self._pending.slice(n)
        return rows


@contextmanager
def _spark_errors() -> Iterator[None]:
    """Spark's errors as one line: a failed task's own line (the document and the error), else the first
    line of Spark's message; the JVM stack trace stays on the exception's cause (--debug)."""
    try:
        yield
    except CptkitError:
        raise
    except Exception as exc:
        from pyspark.errors import PySparkException

        try:
            from py4j.protocol import Py4JError
        except ImportError:  # databricks-connect's pyspark talks gRPC, not py4j
            spark_errors: tuple[type[Exception], ...] = (PySparkException,)
        else:
            spark_errors = (PySparkException, Py4JError)
        if not isinstance(exc, spark_errors):
            raise
        found = re.search(rf"{_TASK_ERROR} (.+)", str(exc))
        if found:
            raise StageError(f"prepare on Spark: {found.group(1).strip()}") from exc
        raise StageError(f"prepare on Spark failed: {first_line(exc)}") from exc
