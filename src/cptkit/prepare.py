"""The prepare stage: raw snapshot -> normalized, filtered, deduplicated, redacted, split and tokenized
training data, with every document accounted for.

Record-level work (rules, hashing, MinHash, tokenizing) runs in worker processes on chunks of
documents; corpus-level decisions (exact and near dedup, split, writing) run in the main process in
input order, so the result is the same for any number of workers.
Always: documents_in == documents_kept + sum(dropped) + quarantined.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import time
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import xxhash

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
from cptkit.config import Config, PrepareConfig, section_fingerprint
from cptkit.datasets import Dataset
from cptkit.dedup import MinHasher, NearDuplicateIndex, exact_key
from cptkit.errors import StageError
from cptkit.extract import SNAPSHOT, StageResult
from cptkit.folders import claim
from cptkit.processes import die_with_parent
from cptkit.progress import progress_bar
from cptkit.rules.language import detect_language
from cptkit.rules.normalize import normalize
from cptkit.rules.quality import quality_issue
from cptkit.rules.redact import redact
from cptkit.sources import ERROR, ID, TEXT
from cptkit.tokenization import TokenizerInfo, resolve_tokenizer

TRAIN, VAL = "train.jsonl", "val.jsonl"
TRAIN_TOKENS, VAL_TOKENS = "train_tokens.parquet", "val_tokens.parquet"
QUARANTINE, DROPPED = "quarantine.jsonl", "dropped.jsonl"
TOKENS_SCHEMA = pa.schema([("id", pa.string()), ("input_ids", pa.list_(pa.int32()))])
_QUARANTINE_PREVIEW_CHARS = 1000


# ---------------------------------------------------------------- record level (pure, per document)


@dataclass(frozen=True)
class RecordOutcome:
    text: str | None  # the transformed text when kept by the record rules
    reason: str | None  # why it was dropped
    redactions: dict[str, int]


def apply_rules(text: str, config: PrepareConfig) -> RecordOutcome:
    """Normalize, redact, then apply the quality and language filters to one document."""
    text = normalize(text, config.normalize)
    if not text.strip():
        return RecordOutcome(None, "empty", {})
    redactions: dict[str, int] = {}
    if config.redact.enabled:
        text, redactions = redact(text, config.redact)
    issue = quality_issue(text, config.quality)
    if issue is not None:
        return RecordOutcome(None, issue, redactions)
    if config.language.enabled:
        lang, score = detect_language(text)
        if lang not in config.language.languages or score < config.language.min_score:
            return RecordOutcome(None, "language", redactions)
    return RecordOutcome(text, None, redactions)


def quarantine_reason(text: str | None, error: str | None, max_bytes: int) -> str | None:
    if error is not None:
        return error
    if text is None:
        return "null_text"
    if len(text) * 4 > max_bytes and len(text.encode("utf-8")) > max_bytes:
        return "oversize"
    return None


# ---------------------------------------------------------------- chunk work (in worker processes)


@dataclass
class DocResult:
    status: str  # "keep" (passed the record rules), "drop" or "quarantine"
    reason: str | None
    text: str | None
    key: bytes | None = None
    signature: np.ndarray | None = None
    tokens: np.ndarray | None = None
    redactions: dict[str, int] | None = None


class ChunkWorker:
    def __init__(self, config: PrepareConfig, tokenizer_path: str | None) -> None:
        self.config = config
        self.minhasher = MinHasher(config.dedup.num_perm, config.dedup.shingle_words) if config.dedup.near else None
        self.tokenizer = None
        if tokenizer_path is not None:
            from tokenizers import Tokenizer

            self.tokenizer = Tokenizer.from_file(tokenizer_path)

    def process(self, texts: list[str | None], errors: list[str | None]) -> list[DocResult]:
        results: list[DocResult] = []
        for text, error in zip(texts, errors, strict=True):
            reason = quarantine_reason(text, error, self.config.max_document_bytes)
            if reason is not None:
                preview = text[:_QUARANTINE_PREVIEW_CHARS] if text is not None else None
                results.append(DocResult("quarantine", reason, preview))
                continue
            assert text is not None
            outcome = apply_rules(text, self.config)
            if outcome.text is None:
                results.append(DocResult("drop", outcome.reason, None, redactions=outcome.redactions))
                continue
            results.append(
                DocResult(
                    "keep",
                    None,
                    outcome.text,
                    key=exact_key(outcome.text) if self.config.dedup.exact else None,
                    signature=self.minhasher.signature(outcome.text) if self.minhasher else None,
                    redactions=outcome.redactions,
                )
            )
        if self.tokenizer is not None:
            kept = [r for r in results if r.status == "keep"]
            encodings = self.tokenizer.encode_batch([r.text for r in kept], add_special_tokens=False)
            for r, enc in zip(kept, encodings, strict=True):
                r.tokens = np.asarray(enc.ids, dtype=np.int32)
        return results


_WORKER: ChunkWorker | None = None


def _init_worker(config: PrepareConfig, tokenizer_path: str | None, parent_pid: int) -> None:
    global _WORKER
    # A killed prepare must not leave its workers running (and holding memory) under init.
    die_with_parent(signal.SIGKILL, parent_pid)
    # One process per core already; the tokenizer's own thread pool would oversubscribe them.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER = ChunkWorker(config, tokenizer_path)


def _run_chunk(texts: list[str | None], errors: list[str | None]) -> list[DocResult]:
    assert _WORKER is not None
    return _WORKER.process(texts, errors)


# ---------------------------------------------------------------- corpus level (main process)


def split_of(doc_id: str, val_ratio: float, seed: int) -> str:
    """'train' or 'val', from a hash of the id: the same on every machine and for every run."""
    h = xxhash.xxh64_intdigest(doc_id.encode("utf-8", "surrogatepass"), seed=seed & 0xFFFFFFFFFFFFFFFF)
    return "val" if h / 2**64 < val_ratio else "train"


class _Outputs:
    """The stage's output files, written through temporary names and renamed together at the end."""

    def __init__(self, directory: Path, tokenize: bool) -> None:
        self.directory = directory
        self.names = [TRAIN, VAL, QUARANTINE, DROPPED] + ([TRAIN_TOKENS, VAL_TOKENS] if tokenize else [])
        self.files: dict[str, IO[str]] = {}
        self.token_writers: dict[str, pq.ParquetWriter] = {}
        self.token_buffers: dict[str, tuple[list[str], list[np.ndarray]]] = {}

    def __enter__(self) -> _Outputs:
        import contextlib

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

    def write(self, name: str, record: dict[str, Any]) -> None:
        self.files[name].write(json.dumps(record, ensure_ascii=False, default=str) + "\n")

    def add_tokens(self, name: str, doc_id: str, tokens: np.ndarray) -> None:
        ids, arrays = self.token_buffers[name]
        ids.append(doc_id)
        arrays.append(tokens)
        if len(ids) >= 1024:
            self._flush(name)

    def _flush(self, name: str) -> None:
        ids, arrays = self.token_buffers[name]
        if not ids:
            return
        offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
        np.cumsum([len(a) for a in arrays], out=offsets[1:])
        values = pa.array(np.concatenate(arrays) if arrays else np.zeros(0, np.int32), pa.int32())
        column = pa.ListArray.from_arrays(pa.array(offsets), values)
        self.token_writers[name].write_batch(
            pa.RecordBatch.from_arrays([pa.array(ids, pa.string()), column], schema=TOKENS_SCHEMA)
        )
        self.token_buffers[name] = ([], [])

    def __exit__(self, exc_type: Any, *rest: Any) -> None:
        # On an exception, atomic_path renames nothing and removes the temporary files.
        if exc_type is None:
            for name in self.token_writers:
                self._flush(name)
        self._exit.__exit__(exc_type, *rest)


def prepare_fingerprint(config: Config, tokenizer: TokenizerInfo | None) -> str:
    # Worker count and chunk size change speed, not results.
    rules = config.prepare.model_dump(mode="python", exclude={"workers", "chunk_size"})
    return section_fingerprint(rules, tokenizer.fingerprint if tokenizer else None)


def prepare(config: Config, dataset: Dataset, force: bool = False) -> StageResult:
    """Prepare one dataset's raw snapshot into `dataset.directory`."""
    with claim(dataset.directory, "prepare"):
        return _prepare(config, dataset, force)


def _prepare(config: Config, dataset: Dataset, force: bool) -> StageResult:
    pc = config.prepare
    raw = dataset.raw_dir
    extract_manifest = read_json(raw / MANIFEST)
    snapshot = raw / SNAPSHOT
    if extract_manifest is None or not snapshot.is_file():
        raise StageError(f"{raw}: no raw snapshot of the {dataset.name} data; run `cptkit extract` first")
    tokenizer = resolve_tokenizer(config.model.tokenizer or config.model.name) if pc.tokenize else None
    out = dataset.directory
    config_fp = prepare_fingerprint(config, tokenizer)
    input_fp = str(extract_manifest.get("content_fingerprint"))
    existing = up_to_date(out, config_fp, input_fp)
    if existing is not None and not force:
        return StageResult(existing, out, skipped=True)

    invalidate(out)
    started = time.perf_counter()
    parquet = pq.ParquetFile(snapshot)
    metadata_columns = _meta(parquet)
    documents_in = parquet.metadata.num_rows
    counts: Counter[str] = Counter()
    dropped: Counter[str] = Counter()
    quarantined: Counter[str] = Counter()
    redactions: Counter[str] = Counter()
    tokens = Counter[str]()
    chars_in = chars_kept = 0
    seen_keys: set[bytes] = set()
    near = NearDuplicateIndex(pc.dedup.threshold, pc.dedup.num_perm) if pc.dedup.near else None

    with (
        _Outputs(out, tokenizer is not None) as outputs,
        progress_bar(f"prepare {dataset.name}", documents_in) as advance,
    ):
        for batch, results in _process(parquet, pc, tokenizer):
            ids = batch.column(ID).to_pylist()
            metas = batch.select(metadata_columns).to_pylist() if metadata_columns else [{}] * len(ids)
            for doc_id, meta, r in zip(ids, metas, results, strict=True):
                if r.redactions:
                    redactions.update(r.redactions)
                if r.status == "quarantine":
                    quarantined[r.reason or "?"] += 1
                    outputs.write(QUARANTINE, {"id": doc_id, "reason": r.reason, "text_preview": r.text})
                    continue
                reason = r.reason
                if r.status == "keep":
                    assert r.text is not None
                    chars_in += len(r.text)
                    if r.key is not None and r.key in seen_keys:
                        reason = "exact_duplicate"
                    elif near is not None and r.signature is not None and near.seen_before(r.signature):
                        reason = "near_duplicate"
                    if r.key is not None:
                        seen_keys.add(r.key)
                if reason is not None:
                    dropped[reason] += 1
                    outputs.write(DROPPED, {"id": doc_id, "reason": reason})
                    continue
                assert r.text is not None
                split = split_of(doc_id, pc.split.val_ratio, pc.split.seed)
                counts[split] += 1
                chars_kept += len(r.text)
                outputs.write(TRAIN if split == "train" else VAL, {"id": doc_id, "text": r.text, **meta})
                if r.tokens is not None:
                    tokens[split] += len(r.tokens)
                    outputs.add_tokens(TRAIN_TOKENS if split == "train" else VAL_TOKENS, doc_id, r.tokens)
            advance(len(ids))

    kept = counts["train"] + counts["val"]
    n_dropped = sum(dropped.values())
    n_quarantined = sum(quarantined.values())
    if documents_in != kept + n_dropped + n_quarantined:  # the accounting identity; a bug if it fails
        raise StageError(
            f"accounting mismatch: {documents_in} in != {kept} kept + {n_dropped} dropped + {n_quarantined} quarantined"
        )
    seconds = time.perf_counter() - started
    manifest = new_manifest("prepare", config_fp, input_fp)
    manifest.update(
        dataset=dataset.name,
        documents_in=documents_in,
        documents_kept=kept,
        dropped=dict(sorted(dropped.items())),
        quarantined=n_quarantined,
        quarantined_by_reason=dict(sorted(quarantined.items())),
        train_documents=counts["train"],
        val_documents=counts["val"],
        characters_kept=chars_kept,
        redactions=dict(sorted(redactions.items())),
        tokenizer=asdict(tokenizer) if tokenizer else None,
        train_tokens=tokens["train"] if tokenizer else None,
        val_tokens=tokens["val"] if tokenizer else None,
        source=extract_manifest.get("source"),
        outputs=describe_outputs(out, outputs.names),
        seconds=round(seconds, 3),
        input_megabytes_per_second=round(int(extract_manifest.get("bytes", 0)) / 1e6 / max(seconds, 1e-9), 3),
    )
    write_json_atomic(out / MANIFEST, manifest)
    return StageResult(manifest, out, skipped=False)


def _worker_count(config: PrepareConfig, documents: int) -> int:
    n = config.workers or (os.cpu_count() or 1)
    # Starting processes costs about a second; small inputs are faster in this one.
    return 1 if documents < 4 * config.chunk_size else n


def _process(
    parquet: pq.ParquetFile, config: PrepareConfig, tokenizer: TokenizerInfo | None
) -> Iterator[tuple[pa.RecordBatch, list[DocResult]]]:
    """(batch, results) in input order, with a bounded number of chunks in flight."""
    batches = parquet.iter_batches(batch_size=config.chunk_size, columns=[ID, TEXT, ERROR, *_meta(parquet)])
    tok_path = tokenizer.path if tokenizer else None
    workers = _worker_count(config, parquet.metadata.num_rows)
    if workers == 1:
        worker = ChunkWorker(config, tok_path)
        for batch in batches:
            yield batch, worker.process(batch.column(TEXT).to_pylist(), batch.column(ERROR).to_pylist())
        return
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(
        workers, mp_context=context, initializer=_init_worker, initargs=(config, tok_path, os.getpid())
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


def _meta(parquet: pq.ParquetFile) -> list[str]:
    return [n for n in parquet.schema_arrow.names if n not in (ID, TEXT, ERROR)]
