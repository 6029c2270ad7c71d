"""Where documents come from. `open_source` turns a `source:` config section into a Source."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cptkit.config import (
    CsvSourceConfig,
    DatabricksSourceConfig,
    DeltaSourceConfig,
    FilesSourceConfig,
    JsonlSourceConfig,
    ParquetSourceConfig,
)
from cptkit.sources.base import ERROR, ID, TEXT, Source
from cptkit.sources.local import CsvSource, DeltaSource, FilesSource, JsonlSource, ParquetSource

__all__ = ["ERROR", "ID", "TEXT", "Source", "open_source"]

SourceConfigType = (
    JsonlSourceConfig
    | ParquetSourceConfig
    | CsvSourceConfig
    | DeltaSourceConfig
    | FilesSourceConfig
    | DatabricksSourceConfig
)


def open_source(
    config: SourceConfigType,
    *,
    connect: Callable[[], Any] | None = None,
    workspace: Callable[[], Any] | None = None,
    spark: Callable[[], Any] | None = None,
) -> Source:
    """The Source for a config section. A new source type is one more branch here. `connect` (a DB-API
    connection factory) and `workspace` (a databricks-sdk WorkspaceClient factory) replace the default
    Databricks connections; `spark` (a factory of a `databricks_spark.SparkWarehouse`) reads a Databricks
    table with Spark instead. Other sources ignore them."""
    if isinstance(config, JsonlSourceConfig):
        return JsonlSource(config)
    if isinstance(config, ParquetSourceConfig):
        return ParquetSource(config)
    if isinstance(config, CsvSourceConfig):
        return CsvSource(config)
    if isinstance(config, DeltaSourceConfig):
        if config.mode != "full":
            from cptkit.sources.delta_incremental import IncrementalDeltaSource

            return IncrementalDeltaSource(config)
        return DeltaSource(config)
    if isinstance(config, DatabricksSourceConfig):
        from cptkit.sources.databricks import DatabricksSource

        return DatabricksSource(config, connect=connect, workspace=workspace, spark=spark)
    return FilesSource(config)
