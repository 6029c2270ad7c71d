"""The local engine, in two passes. First, record work (rules, dedup keys, signatures, tokens) in a pool of
worker processes on chunks of documents, each result spilled to disk and the dedup inputs kept in
compact arrays (`work_files`). Then the dedup decisions over those arrays, and a second pass over the
spilled results that splits, writes and counts them in input order. The result is the same for any
number of workers or chunk size, and, since dedup keeps the smallest stable key (`dedup`), for any input
order too."""

from __future__ import annotations

import multiprocessing
import os
import signal
import tempfile
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from cptkit.config import PrepareConfig
from cptkit.corpus import DUPLICATE_REASONS, KEEP, Tally, assign_splits
from cptkit.engines import PrepareJob
from cptkit.engines.work_files import DedupStore, ResultSpill
from cptkit.parquet_files import open_parquet
from cptkit.prepared_files import PreparedWriter
from cptkit.processes import die_with_parent
from cptkit.records import DocResult, RecordProcessor
from cptkit.sources import ERROR, ID, TEXT


def run(job: PrepareJob, advance: Callable[[int], None]) -> Tally:
    parquet = open_parquet(job.snapshot)
    metadata_columns = _metadata_columns(parquet)
    tally = Tally()
    # A hidden ".*.tmp" name: a killed run's leftovers are removed by the next one (artifacts.invalidate).
    with tempfile.TemporaryDirectory(prefix=".prepare-work.", suffix=".tmp", dir=job.directory) as work:
        spill = ResultSpill(Path(work) / "results.arrow")
        with DedupStore(parquet.metadata.num_rows, job.config.dedup, Path(work)) as store:
            try:
                for batch, results in _record_results(parquet, job):
                    spill.write(batch.select([ID, *metadata_columns]), results)
                    store.add(batch.column(ID), results)
                    tally.count_steps(results)
                    advance(len(results))
            finally:
                spill.close()
            fates = iter(store.fates().tolist())
        with PreparedWriter(
            job.directory, job.tokenizer_path is not None, job.config.shard_documents, job.train_jsonl
        ) as writer:
            for batch, results in spill.read():
                for r in results:
                    if r.status == "keep" and (fate := next(fates)) != KEEP:
                        r.drop(DUPLICATE_REASONS[fate])
                ids = batch.column(ID).to_pylist()
                metadata = batch.select(metadata_columns).to_pylist() if metadata_columns else [{}] * len(ids)
                splits = assign_splits(ids, results, job.config.split)
                writer.write(ids, metadata, results, splits)
                tally.add(results, splits)
    return tally


_PROCESSOR: RecordProcessor | None = None


def _init_worker(config: PrepareConfig, tokenizer_path: str | None, parent_pid: int) -> None:
    global _PROCESSOR
    # A killed prepare must not leave its workers running (and holding memory) under init.
    die_with_parent(signal.SIGKILL, parent_pid)
    # One process per core already; the tokenizer's own thread pool would oversubscribe them.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _PROCESSOR = RecordProcessor(config, tokenizer_path)


def _run_chunk(texts: Sequence[str | None], errors: Sequence[str | None]) -> list[DocResult]:
    assert _PROCESSOR is not None
    return _PROCESSOR.process(texts, errors)


def _worker_count(config: PrepareConfig, documents: int) -> int:
    # Starting processes costs about a second; small inputs are faster in this one.
    return 1 if documents < 4 * config.chunk_size else config.worker_count


def _record_results(parquet: pq.ParquetFile, job: PrepareJob) -> Iterator[tuple[pa.RecordBatch, list[DocResult]]]:
    """(batch, results) in input order, with a bounded number of chunks in flight."""
    config = job.config
    batches = parquet.iter_batches(batch_size=config.chunk_size, columns=[ID, TEXT, ERROR, *_metadata_columns(parquet)])
    workers = _worker_count(config, parquet.metadata.num_rows)
    if workers == 1:
        processor = RecordProcessor(config, job.tokenizer_path)
        for batch in batches:
            yield batch, processor.process(batch.column(TEXT).to_pylist(), batch.column(ERROR).to_pylist())
        return
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(
        workers, mp_context=context, initializer=_init_worker, initargs=(config, job.tokenizer_path, os.getpid())
    ) as pool:
        window: deque[tuple[pa.RecordBatch, Future[list[DocResult]]]] = deque()
        for batch in batches:
            future = pool.submit(_run_chunk, batch.column(TEXT).to_pylist(), batch.column(ERROR).to_pylist())
            window.append((batch, future))
            if len(window) >= 3 * workers:
                done_batch, done = window.popleft()
                yield done_batch, done.result()
        while window:
            done_batch, done = window.popleft()
            yield done_batch, done.result()


def _metadata_columns(parquet: pq.ParquetFile) -> list[str]:
    return [n for n in parquet.schema_arrow.names if n not in (ID, TEXT, ERROR)]
