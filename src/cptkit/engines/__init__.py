"""Engines that run prepare's steps over a raw snapshot. An engine is a function `run(job, advance) ->
Tally`: it writes the prepared files of `job` into `job.directory` (see `prepared_files`) and returns what
it counted; the prepare stage checks the accounting and writes the manifest."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from cptkit.config import DatabricksConnection, PrepareConfig


@dataclass(frozen=True)
class PrepareJob:
    """What an engine is given: plain, picklable data."""

    snapshot: Path  # the raw snapshot (Parquet with id, text, error and metadata columns)
    directory: Path  # where the prepared files go
    config: PrepareConfig
    tokenizer_path: str | None  # a tokenizer.json; None when prepare.tokenize is off
    train_jsonl: bool = True  # the training text as train.jsonl, else as train_text/ shards
    # Authenticates a Databricks Connect session (prepare.spark.remote), as it does the Databricks source.
    connection: DatabricksConnection | None = field(default=None, repr=False)
