"""The `type: databricks` source: a Unity Catalog table read through a SQL warehouse (`sql`), the Statement
Execution API (`statement`) or its Delta files (`delta`), or the files of a Volume (`volume`); in full,
watermark or change-data-feed mode.

Connections are built at the edge and can be passed in: `connect` makes a DB-API connection (default
databricks-sql-connector), `workspace` makes a databricks-sdk WorkspaceClient (default from the SDK's
unified configuration), `spark` makes a `Warehouse` that runs the same queries on a SparkSession
(`prepare.engine: spark`; then a table is read by Spark whatever `method` says, and only a Volume or a
Delta `path` keeps its own reader). Every read pins the table version it saw first, so the snapshot, the
manifest's `delta_version` and the next increment agree.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from cptkit.config import DatabricksSourceConfig, section_fingerprint
from cptkit.errors import SourceError
from cptkit.secrets import mask_url
from cptkit.sources.databricks_client import Retrying, config_secrets, warehouse_id, workspace_client
from cptkit.sources.databricks_delta import DeltaReader, filter_expression
from cptkit.sources.databricks_sql import (
    CHANGE_TYPE,
    COMMIT_VERSION,
    KEEP,
    WATERMARK,
    ConnectorWarehouse,
    Query,
    StatementWarehouse,
    Warehouse,
    changes_query,
    connect_sql_warehouse,
    count_query,
    history_query,
    snapshot_query,
)
from cptkit.sources.databricks_volume import VolumeReader
from cptkit.sources.incremental import DELETE, OP, SEQ, UPSERT, Read, WatermarkTracker, decode_value
from cptkit.sources.local import canonical_from_arrow

_UNSET: Any = object()


class DatabricksSource:
    def __init__(
        self,
        config: DatabricksSourceConfig,
        *,
        connect: Callable[[], Any] | None = None,
        workspace: Callable[[], Any] | None = None,
        spark: Callable[[], Warehouse] | None = None,
    ) -> None:
        self.config = config
        # Spark reads catalog tables; a Volume's files and a Delta folder keep their readers.
        self._spark = spark if config.method != "volume" and config.path is None else None
        # How the table is read: "spark" runs the sql method's queries on a SparkSession.
        self.method = "spark" if self._spark is not None else config.method
        self.secrets = config_secrets(config)
        self.retrying = Retrying(config.max_retries, config.timeout_seconds, self.secrets)
        self._connect = connect
        self._workspace_factory = workspace
        self._workspace: Any = None
        self._warehouse: Warehouse | None = None
        self._delta: DeltaReader | None = None
        self._volume: VolumeReader | None = None
        self._version: Any = _UNSET

    # -- edges -----------------------------------------------------------------------------------

    def workspace(self) -> Any:
        if self._workspace is None:
            factory = self._workspace_factory or (lambda: workspace_client(self.config, self.secrets))
            self.retrying.start_clock()
            self._workspace = factory()
        return self._workspace

    def warehouse(self) -> Warehouse:
        if self._warehouse is None:
            c = self.config
            self.retrying.start_clock()
            if self._spark is not None:
                self._warehouse = self._spark()
            elif c.method == "sql":
                connect = self._connect or connect_sql_warehouse(c, self.secrets)
                self._warehouse = ConnectorWarehouse(connect, self.retrying, c.batch_size)
            else:
                w = self.workspace()
                self._warehouse = StatementWarehouse(
                    w, warehouse_id(c, w.config), self.retrying, c.timeout_seconds, c.batch_size
                )
        return self._warehouse

    def delta(self) -> DeltaReader:
        if self._delta is None:
            self._delta = DeltaReader(self.config, self.retrying, self.workspace if self.config.path is None else None)
        return self._delta

    def volume(self) -> VolumeReader:
        if self._volume is None:
            self._volume = VolumeReader(self.config, self.retrying, self.workspace)
        return self._volume

    def close(self) -> None:
        if self._warehouse is not None:
            self._warehouse.close()
            self._warehouse = None

    # -- the Source interface --------------------------------------------------------------------

    def where(self) -> str:
        """What is read, for messages, manifests and fingerprints (a path's credentials masked)."""
        c = self.config
        if c.method == "volume":
            return str(c.volume_path)
        if c.path is not None:
            return mask_url(c.path)
        return f"{c.catalog}.{c.schema_}.{c.table}"

    def table_version(self) -> int | None:
        """The pinned version, else the table's current one (looked up once per source)."""
        if self._version is _UNSET:
            c = self.config
            if c.method == "volume":
                self._version = None
            elif c.version is not None:
                self._version = c.version
            elif self.method == "delta":
                self._version = self.delta().current_version()
            else:
                self._version = self._history_version()
        return self._version  # type: ignore[no-any-return]

    def _history_version(self) -> int | None:
        try:
            table = self.warehouse().rows(history_query(self.config))
        except SourceError as exc:
            # A view has no Delta history: it can be read in full mode, without a version. A host that cannot
            # be reached or keeps failing is no view.
            failed = ("not found", "401", "403", "reach", "gave up after")
            if self.config.mode != "full" or any(w in str(exc) for w in failed):
                raise
            return None
        if table.num_rows == 0 or "version" not in table.column_names:
            return None
        return int(table.column("version")[0].as_py())

    def input_fingerprint(self) -> str | None:
        if self.config.method == "volume":
            return f"{self.where()}#{self.volume().fingerprint()}"
        version = self.table_version()
        return None if version is None else f"{self.where()}@v{version}"

    def describe(self) -> dict[str, Any]:
        c = self.config
        return {
            "type": "databricks",
            "method": self.method,
            "host": mask_url(c.host) if c.host is not None else None,
            "table": self.where(),
            "version": self.table_version(),
            "mode": c.mode,
            "text": c.text_expression if c.text_expression is not None else c.text_column,
            "id_column": c.id_column,
            "metadata_columns": list(c.metadata_columns),
            "filter": [cond.model_dump() for cond in c.filter],
            "watermark_column": c.watermark_column,
        }

    def batches(self) -> Iterator[pa.RecordBatch]:
        """A full snapshot (for readers without state, such as evaluation sets)."""
        return self.read(None).batches

    def state_key(self) -> str:
        c = self.config
        shaping = c.model_dump(
            include={
                "method", "catalog", "schema_", "table", "path", "volume_path", "extensions", "text_column",
                "text_expression", "id_column", "metadata_columns", "filter", "mode", "watermark_column",
            }
        )  # fmt: skip
        return section_fingerprint(shaping)

    # -- reads -----------------------------------------------------------------------------------

    def read(self, previous: dict[str, Any] | None) -> Read:
        c = self.config
        details: dict[str, Any] = {}
        if c.method == "volume":
            return Read(self._finish(self.volume().batches(), details), False, lambda: {}, details=details)
        version = self.table_version()
        usable = previous is not None and previous.get("key") == self.state_key() and c.mode != "full"
        if usable and c.mode == "cdf":
            assert previous is not None
            start = int(previous["version"]) + 1
            if version is None:
                raise SourceError(f"{self.where()}: mode cdf needs a Delta table with a version history")
            query = changes_query(c, start, version) if self.method != "delta" else None
            raw = self._raw_changes(start, version) if start <= version else iter(())
            cdf_state = {"key": self.state_key(), "mode": "cdf", "version": version}
            batches = self._canonical(raw, None, changes=True)
            details.update(changes_from_version=start, changes_to_version=version)
            return Read(self._finish(batches, details), True, lambda: cdf_state, self._shown(query), details)
        watermark = None
        if usable and c.mode == "watermark":
            assert previous is not None
            saved = previous.get("watermark")
            if saved is not None:
                watermark = {"value": decode_value(saved["value"]), "id": decode_value(saved["id"])}
                details["after_watermark"] = {"value": saved["value"]["value"], "id": saved["id"]["value"]}
        tracker = WatermarkTracker((watermark["value"], watermark["id"]) if watermark else None)
        query = snapshot_query(c, version, watermark) if self.method != "delta" else None
        raw = self._raw_snapshot(version, watermark)
        batches = self._canonical(raw, tracker if c.mode == "watermark" else None, changes=watermark is not None)

        def state() -> dict[str, Any]:
            out: dict[str, Any] = {"key": self.state_key(), "mode": c.mode, "version": version}
            if c.mode == "watermark":
                out["watermark"] = tracker.state()
            return out

        return Read(self._finish(batches, details), watermark is not None, state, self._shown(query), details)

    def _shown(self, query: Query | None) -> str | None:
        return query.shown() if query is not None else None

    def _raw_snapshot(self, version: int | None, watermark: dict[str, Any] | None) -> Iterator[pa.RecordBatch]:
        if self.method == "delta":
            assert version is not None
            return self.delta().snapshot(version, watermark)
        return self.warehouse().stream(snapshot_query(self.config, version, watermark))

    def _raw_changes(self, start: int, end: int) -> Iterator[pa.RecordBatch]:
        if self.method == "delta":
            return self.delta().changes(start, end)
        return self.warehouse().stream(changes_query(self.config, start, end))

    def _canonical(
        self, raw: Iterator[pa.RecordBatch], tracker: WatermarkTracker | None, changes: bool
    ) -> Iterator[pa.RecordBatch]:
        c = self.config
        offset = 0
        for batch in raw:
            if batch.num_rows == 0:
                continue
            names = batch.schema.names
            ids = batch.column("id") if "id" in names else None
            if tracker is not None and ids is not None:
                tracker.update(batch.column(WATERMARK), ids)
            meta = {m: batch.column(m) for m in c.metadata_columns}
            out = canonical_from_arrow(batch.column("text"), ids, meta, offset)
            offset += batch.num_rows
            if changes:
                delete = pc.scalar(False)
                if KEEP in names:
                    delete = pc.invert(pc.fill_null(batch.column(KEEP).cast(pa.bool_()), False))
                if CHANGE_TYPE in names:
                    delete = pc.or_(delete, pc.equal(batch.column(CHANGE_TYPE), "delete"))
                ops = pc.if_else(delete, pa.scalar(DELETE), pa.scalar(UPSERT))
                if not isinstance(ops, pa.Array):  # a scalar condition broadcasts to a scalar
                    ops = pa.array([ops.as_py()] * batch.num_rows, pa.string())
                seq = (
                    batch.column(COMMIT_VERSION).cast(pa.int64())
                    if COMMIT_VERSION in names
                    else pa.nulls(batch.num_rows, pa.int64())
                )
                out = out.append_column(OP, ops).append_column(SEQ, seq)
            yield out

    def _finish(self, batches: Iterator[pa.RecordBatch], details: dict[str, Any]) -> Iterator[pa.RecordBatch]:
        try:
            yield from batches
        finally:
            details.update(self.retrying.summary())
            if self._delta is not None and self._delta.credential_refreshes:
                details["credential_refreshes"] = self._delta.credential_refreshes
            if isinstance(self._warehouse, StatementWarehouse) and self._warehouse.waited_for_warehouse:
                details["waited_for_warehouse_seconds"] = round(self._warehouse.waited_for_warehouse, 1)
            self.close()

    # -- dry run ---------------------------------------------------------------------------------

    def dry_run(self, previous: dict[str, Any] | None) -> dict[str, Any]:
        """What a real run would read: the query (or Delta/Volume read), the column mapping, a row count."""
        c = self.config
        out: dict[str, Any] = {
            "source": self.where(),
            "method": self.method,
            "mode": c.mode,
            "columns": {
                "id": c.id_column or ("path under volume_path" if c.method == "volume" else "hash of the text"),
                "text": c.text_expression if c.text_expression is not None else c.text_column,
                **{m: m for m in c.metadata_columns},
            },
        }
        try:
            if c.method == "volume":
                files = self.volume().listing()
                out.update(query=f"Files API listing of {c.volume_path} ({', '.join(self.volume().suffixes)})")
                out.update(files=len(files), rows=len(files), rows_note="documents; .jsonl files hold one per line")
                return out
            version = self.table_version()
            out["version"] = version
            usable = previous is not None and previous.get("key") == self.state_key() and c.mode != "full"
            if usable and c.mode == "cdf":
                assert previous is not None and version is not None
                start = int(previous["version"]) + 1
                out["increment"] = f"changes from version {start} to {version}"
                if self.method == "delta":
                    out["query"] = f"deltalake load_cdf({self.where()}, {start}, {version})"
                    out["rows"] = (
                        sum(b.num_rows for b in self.delta().changes(start, version)) if start <= version else 0
                    )
                else:
                    query = changes_query(c, start, version)
                    out["query"] = query.shown()
                    out["rows"] = self._count(query) if start <= version else 0
                return out
            watermark = None
            if usable and c.mode == "watermark" and previous is not None and previous.get("watermark"):
                saved = previous["watermark"]
                watermark = {"value": decode_value(saved["value"]), "id": decode_value(saved["id"])}
                out["increment"] = f"rows after {c.watermark_column} = {watermark['value']!r} (id {watermark['id']!r})"
            if self.method == "delta":
                assert version is not None
                expr = filter_expression(c.filter)
                out["query"] = f"deltalake read of {self.where()} at version {version}" + (
                    f" where {expr}" if expr is not None else ""
                )
                out["rows"] = sum(b.num_rows for b in self.delta().snapshot(version, watermark))
            else:
                query = snapshot_query(c, version, watermark)
                out["query"] = query.shown()
                out["rows"] = self._count(query)
            return out
        finally:
            self.close()

    def _count(self, query: Query) -> int:
        table = self.warehouse().rows(count_query(query))
        return int(table.column(0)[0].as_py()) if table.num_rows else 0
