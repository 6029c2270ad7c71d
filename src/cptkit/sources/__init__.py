"""Where documents come from. `open_source` turns a `source:` config section into a Source."""

from __future__ import annotations

from cptkit.config import (
    CsvSourceConfig,
    DeltaSourceConfig,
    FilesSourceConfig,
    JsonlSourceConfig,
    ParquetSourceConfig,
)
from cptkit.sources.base import ERROR, ID, TEXT, Source
from cptkit.sources.local import CsvSource, DeltaSource, FilesSource, JsonlSource, ParquetSource

__all__ = ["ERROR", "ID", "TEXT", "Source", "open_source"]

SourceConfigType = JsonlSourceConfig | ParquetSourceConfig | CsvSourceConfig | DeltaSourceConfig | FilesSourceConfig


def open_source(config: SourceConfigType) -> Source:
    """The Source for a config section. A new source type is one more branch here."""
    if isinstance(config, JsonlSourceConfig):
        return JsonlSource(config)
    if isinstance(config, ParquetSourceConfig):
        return ParquetSource(config)
    if isinstance(config, CsvSourceConfig):
        return CsvSource(config)
    if isinstance(config, DeltaSourceConfig):
        return DeltaSource(config)
    return FilesSource(config)
