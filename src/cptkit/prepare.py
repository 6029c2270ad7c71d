"""The prepare stage: raw snapshot -> normalized, filtered, deduplicated, redacted, split and tokenized
training data, with every document accounted for.

The stage claims the dataset's folder, skips when its manifest is up to date, runs an engine over the
snapshot (`engines.local`: record steps in worker processes, then the corpus decisions, which do not
depend on input order) and writes the manifest last.
Always: documents_in == documents_kept + sum(dropped) + quarantined.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from cptkit.artifacts import (
    MANIFEST,
    describe_outputs,
    invalidate,
    new_manifest,
    read_json,
    up_to_date,
    write_json_atomic,
)
from cptkit.config import Config, DatabricksConnection, PrepareConfig, section_fingerprint
from cptkit.corpus import TRAIN_SPLIT, VAL_SPLIT, Tally
from cptkit.datasets import Dataset
from cptkit.dedup import SEMANTICS as DEDUP_SEMANTICS
from cptkit.engines import PrepareJob
from cptkit.engines import local as local_engine
from cptkit.errors import StageError
from cptkit.folders import claim
from cptkit.parquet_files import open_parquet
from cptkit.prepared_files import describe_shards, output_files
from cptkit.progress import progress_bar
from cptkit.rules.steps import Redact
from cptkit.stage import StageResult
from cptkit.tokenization import TokenizerInfo, resolve_tokenizer


def prepare_fingerprint(config: Config, tokenizer: TokenizerInfo | None) -> str:
    # The engine, worker count and chunk size change speed, not results; a new dedup definition does.
    # Sharding and the train text's format change the files, not the data: the manifest lists the files.
    speed_only = {"engine", "spark", "workers", "chunk_size", "shard_documents", "train_jsonl"}
    rules = config.prepare.model_dump(mode="python", exclude=speed_only)
    return section_fingerprint(rules, tokenizer.fingerprint if tokenizer else None, DEDUP_SEMANTICS, LAYOUT)


# The files a prepared folder holds (`prepared_files`); a new layout makes older folders out of date.
LAYOUT = "parquet-shards-v1"
# prepare.train_jsonl: auto writes train.jsonl up to this much raw text: one JSON-lines file of many GB is
# rarely wanted (nothing in cptkit reads it; it is for people and other tools).
TRAIN_JSONL_AUTO_BYTES = 1_000_000_000


def _train_jsonl(pc: PrepareConfig, extract_manifest: dict[str, Any]) -> bool:
    if pc.train_jsonl == "auto":
        return int(extract_manifest.get("bytes", 0)) <= TRAIN_JSONL_AUTO_BYTES
    return pc.train_jsonl


def _run_engine(job: PrepareJob, advance: Callable[[int], None]) -> Tally:
    if job.config.engine == "spark":
        from cptkit.engines import spark  # pyspark is an optional extra

        return spark.run(job, advance)
    return local_engine.run(job, advance)


def prepare(config: Config, dataset: Dataset, force: bool = False) -> StageResult:
    """Prepare one dataset's raw snapshot into `dataset.directory`."""
    with claim(dataset.directory, "prepare"):
        return _prepare(config, dataset, force)


def _prepare(config: Config, dataset: Dataset, force: bool) -> StageResult:
    pc = config.prepare
    raw = dataset.raw_dir
    extract_manifest = read_json(raw / MANIFEST)
    snapshot = dataset.snapshot
    if extract_manifest is None or not snapshot.is_file():
        raise StageError(f"{raw}: no raw snapshot of the {dataset.name} data; run `cptkit extract` first")
    tokenizer = resolve_tokenizer(config.model.tokenizer_name) if pc.tokenize else None
    out = dataset.directory
    config_fp = prepare_fingerprint(config, tokenizer)
    input_fp = str(extract_manifest.get("content_fingerprint"))
    existing = up_to_date(out, config_fp, input_fp)
    if existing is not None and not force:
        return StageResult(existing, out, skipped=True)

    invalidate(out)
    started = time.perf_counter()
    documents_in = open_parquet(snapshot).metadata.num_rows
    connection = dataset.source if isinstance(dataset.source, DatabricksConnection) else config.databricks
    job = PrepareJob(
        snapshot, out, pc, tokenizer.path if tokenizer else None, _train_jsonl(pc, extract_manifest), connection
    )
    with progress_bar(f"prepare {dataset.name}", documents_in) as advance:
        tally = _run_engine(job, advance)
    tally.check(documents_in)
    seconds = time.perf_counter() - started
    manifest = new_manifest("prepare", config_fp, input_fp)
    manifest.update(
        dataset=dataset.name,
        documents_in=documents_in,
        documents_kept=tally.kept.total(),
        dropped=dict(sorted(tally.dropped.items())),
        dedup_semantics=DEDUP_SEMANTICS,
        quarantined=tally.quarantined.total(),
        quarantined_by_reason=dict(sorted(tally.quarantined.items())),
        train_documents=tally.kept[TRAIN_SPLIT],
        val_documents=tally.kept[VAL_SPLIT],
        characters_kept=tally.characters_kept,
        redactions=dict(sorted(tally.step_counts.get(Redact.name, {}).items())),
        tokenizer=asdict(tokenizer) if tokenizer else None,
        train_tokens=tally.tokens[TRAIN_SPLIT] if tokenizer else None,
        val_tokens=tally.tokens[VAL_SPLIT] if tokenizer else None,
        source=extract_manifest.get("source"),
        train_text="train.jsonl" if job.train_jsonl else "train_text/",
        shards=describe_shards(out),
        outputs=describe_outputs(out, output_files(out)),
        seconds=round(seconds, 3),
        input_megabytes_per_second=round(int(extract_manifest.get("bytes", 0)) / 1e6 / max(seconds, 1e-9), 3),
    )
    write_json_atomic(out / MANIFEST, manifest)
    return StageResult(manifest, out, skipped=False)
