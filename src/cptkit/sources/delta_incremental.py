"""A local (or object-store) `type: delta` source in watermark or change-data-feed mode.

The Databricks source already reads a Delta table folder by path (`method: delta`, `path`) in every
mode, with its state, watermark tracking and change feed; this source is that reader under the local
source's configuration, so the two modes behave the same whether the table is in Unity Catalog or a
folder on this machine (the demo's table).
"""

from __future__ import annotations

from typing import Any

from cptkit.config import DatabricksSourceConfig, DeltaSourceConfig
from cptkit.sources.databricks import DatabricksSource
from cptkit.sources.incremental import Read


def _as_databricks(config: DeltaSourceConfig) -> DatabricksSourceConfig:
    return DatabricksSourceConfig.model_validate(
        {
            "type": "databricks",
            "method": "delta",
            "path": config.path,
            "mode": config.mode,
            "watermark_column": config.watermark_column,
            "text_column": config.text_column,
            "id_column": config.id_column,
            "metadata_columns": list(config.metadata_columns),
            "batch_size": config.batch_size,
            "storage_options": {k: v.get_secret_value() for k, v in config.storage_options.items()},
            "max_retries": 0,
        }
    )


class IncrementalDeltaSource:
    """`type: delta` with `mode: watermark | cdf` (an `IncrementalSource`)."""

    def __init__(self, config: DeltaSourceConfig) -> None:
        self.config = config
        self._reader = DatabricksSource(_as_databricks(config))

    def state_key(self) -> str:
        return self._reader.state_key()

    def read(self, previous: dict[str, Any] | None) -> Read:
        return self._reader.read(previous)

    def dry_run(self, previous: dict[str, Any] | None) -> dict[str, Any]:
        return {**self._reader.dry_run(previous), "type": "delta"}

    def close(self) -> None:
        self._reader.close()

    def table_version(self) -> int | None:
        return self._reader.table_version()

    def input_fingerprint(self) -> str | None:
        return self._reader.input_fingerprint()

    def describe(self) -> dict[str, Any]:
        c = self.config
        return {
            "type": "delta",
            "path": self._reader.where(),
            "version": self.table_version(),
            "mode": c.mode,
            "watermark_column": c.watermark_column,
            "text_column": c.text_column,
            "id_column": c.id_column,
            "metadata_columns": list(c.metadata_columns),
        }

    def batches(self) -> Any:
        return self._reader.batches()
