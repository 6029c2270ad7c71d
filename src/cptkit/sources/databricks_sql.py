"""SQL for a Unity Catalog table, and the two ways to run it: a SQL warehouse through a DB-API connection
(databricks-sql-connector) and the Statement Execution API (through the SDK).

The query text is built only from validated, backtick-quoted names and fixed keywords; every value from
the config (filter values, watermarks, table names given to functions) is a named bound parameter.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import decimal
import io
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import pyarrow as pa

from cptkit.config import DatabricksSourceConfig, FilterCondition, identifier_problem
from cptkit.errors import SourceError
from cptkit.secrets import Secrets
from cptkit.sources import databricks_client
from cptkit.sources.databricks_client import Retrying, translate

# Internal result columns; the canonical batch never keeps them.
WATERMARK, KEEP, CHANGE_TYPE, COMMIT_VERSION = "_cptkit_watermark", "_cptkit_keep", "_change_type", "_commit_version"


@dataclass(frozen=True)
class Query:
    text: str
    params: dict[str, Any] = field(default_factory=dict)

    def shown(self) -> str:
        """The text with its parameters listed, for --dry-run and manifests (parameters hold no secrets)."""
        if not self.params:
            return self.text
        return self.text + "\n-- parameters: " + ", ".join(f":{k} = {v!r}" for k, v in self.params.items())


def quote(name: str, *, table_part: bool = False) -> str:
    problem = identifier_problem(name, table_part=table_part)
    if problem:  # config validation already refused it; this keeps the builder safe on its own
        raise SourceError(f"refusing the SQL name {name!r}: {problem}")
    return f"`{name}`"


def table_name(config: DatabricksSourceConfig) -> str:
    parts = [config.catalog, config.schema_, config.table]
    if not all(parts):
        raise SourceError("catalog, schema and table are required")
    return ".".join(quote(str(p), table_part=True) for p in parts)


def select_list(config: DatabricksSourceConfig) -> str:
    text = config.text_expression if config.text_expression is not None else quote(config.text_column)
    items = [f"{text} AS `text`"]
    if config.id_column:
        items.append(f"{quote(config.id_column)} AS `id`")
    items += [quote(m) for m in config.metadata_columns]
    return ", ".join(items)


_OPS = {"=": "=", "!=": "<>", "<": "<", "<=": "<=", ">": ">", ">=": ">=", "like": "LIKE"}


def filter_clause(conditions: list[FilterCondition], params: dict[str, Any]) -> str | None:
    parts = []
    for i, cond in enumerate(conditions):
        column = quote(cond.column)
        if cond.op in ("is null", "is not null"):
            parts.append(f"{column} {cond.op.upper()}")
        elif cond.op in ("in", "not in"):
            assert isinstance(cond.value, list)
            names = []
            for j, value in enumerate(cond.value):
                params[f"f{i}_{j}"] = value
                names.append(f":f{i}_{j}")
            parts.append(f"{column} {cond.op.upper()} ({', '.join(names)})")
        else:
            params[f"f{i}"] = cond.value
            parts.append(f"{column} {_OPS[cond.op]} :f{i}")
    return " AND ".join(f"({p})" for p in parts) if parts else None


def history_query(config: DatabricksSourceConfig) -> Query:
    return Query(f"DESCRIBE HISTORY {table_name(config)} LIMIT 1")


def snapshot_query(
    config: DatabricksSourceConfig, version: int | None, watermark: dict[str, Any] | None = None
) -> Query:
    """Rows of the table at `version`: all of them (filtered), or for watermark mode those after the
    saved watermark, each with a flag saying whether it still meets the filter."""
    params: dict[str, Any] = {}
    source = table_name(config) + (f" VERSION AS OF {int(version)}" if version is not None else "")
    columns = select_list(config)
    where = filter_clause(config.filter, params)
    if config.mode == "watermark":
        columns += f", {quote(str(config.watermark_column))} AS `{WATERMARK}`"
    if watermark is not None:  # an increment: newer rows, ties broken by id; filter decides keep or delete
        assert config.id_column is not None
        wm, ident = quote(str(config.watermark_column)), quote(config.id_column)
        params["wm"], params["wm_id"] = watermark["value"], watermark["id"]
        keep = f"CASE WHEN {where} THEN TRUE ELSE FALSE END" if where else "TRUE"
        columns += f", {keep} AS `{KEEP}`"
        where = f"{wm} > :wm OR ({wm} = :wm AND {ident} > :wm_id)"
    text = f"SELECT {columns} FROM {source}"
    if where:
        text += f" WHERE {where}"
    if config.id_column:
        text += f" ORDER BY {quote(config.id_column)}"  # a stable order makes the snapshot reproducible
    return Query(text, params)


def changes_query(config: DatabricksSourceConfig, start: int, end: int) -> Query:
    """The change data feed between two versions (inclusive); update pre-images are not needed."""
    params: dict[str, Any] = {}
    where = filter_clause(config.filter, params)
    keep = f"CASE WHEN {where} THEN TRUE ELSE FALSE END" if where else "TRUE"
    params.update(tbl=table_name(config), v_from=int(start), v_to=int(end))
    text = (
        f"SELECT {select_list(config)}, `{CHANGE_TYPE}`, `{COMMIT_VERSION}`, {keep} AS `{KEEP}` "
        f"FROM table_changes(:tbl, :v_from, :v_to) WHERE `{CHANGE_TYPE}` <> 'update_preimage' "
        f"ORDER BY `{COMMIT_VERSION}`"
    )
    return Query(text, params)


def count_query(query: Query) -> Query:
    text = query.text.split(" ORDER BY ")[0]
    return Query(f"SELECT count(*) AS `n` FROM ({text}) AS `q`", query.params)


# ---------------------------------------------------------------------------------------------------
# Runners: one interface (rows for small results, stream for big ones) over two transports.


class Warehouse(ABC):
    """Runs a query and returns Arrow."""

    def rows(self, query: Query) -> pa.Table:
        return pa.Table.from_batches(list(self.stream(query)))

    @abstractmethod
    def stream(self, query: Query) -> Iterator[pa.RecordBatch]: ...

    def close(self) -> None:  # most transports hold nothing to close
        return None


class ConnectorWarehouse(Warehouse):
    """A DB-API connection: databricks-sql-connector in production (cloud fetch on, `:name` parameters,
    `fetchmany_arrow`), any connection with the same methods in tests."""

    def __init__(self, connect: Callable[[], Any], retrying: Retrying, batch_size: int) -> None:
        self._connect = connect
        self._retrying = retrying
        self._batch_size = batch_size
        self._connection: Any = None

    def _conn(self) -> Any:
        if self._connection is None:
            self._connection = self._retrying.call("connect to the SQL warehouse", self._connect)
        return self._connection

    def stream(self, query: Query) -> Iterator[pa.RecordBatch]:
        conn = self._conn()
        cursor = conn.cursor()
        try:

            def execute() -> None:
                cursor.execute(query.text, query.params or None)

            self._retrying.call("run the query on the SQL warehouse", execute)
            while True:
                try:
                    table = cursor.fetchmany_arrow(self._batch_size)
                except Exception as exc:
                    raise translate(exc, "read query results", self._retrying.secrets) from None
                if table.num_rows == 0:
                    break
                yield from table.to_batches(max_chunksize=self._batch_size)
        finally:
            with contextlib.suppress(Exception):  # a cursor whose connection failed: not worth a second error
                cursor.close()

    def close(self) -> None:
        if self._connection is not None:
            try:
                self._connection.close()
            finally:
                self._connection = None


def connect_sql_warehouse(config: DatabricksSourceConfig, secrets: Secrets) -> Callable[[], Any]:
    """The connection factory for databricks-sql-connector, authenticated by the SDK's unified config."""
    from cptkit.sources.databricks_client import sdk_config, warehouse_http_path

    try:
        from databricks import sql
    except ImportError:
        raise SourceError(
            "method sql needs databricks-sql-connector: pip install databricks-sql-connector "
            "(or use method: statement, which needs only databricks-sdk)"
        ) from None
    cfg = sdk_config(config, secrets)
    http_path = warehouse_http_path(config, cfg)
    # The connector takes a bare host name and a port (it always speaks https); a user:password@ part
    # would only end up in its URLs and logs, the credentials come from the SDK.
    url = urlsplit(str(cfg.host) if "://" in str(cfg.host) else f"https://{cfg.host}")
    port = {"_port": url.port} if url.port else {}

    def connect() -> Any:
        return sql.connect(
            server_hostname=url.hostname,
            http_path=http_path,
            **port,
            credentials_provider=lambda: cfg.authenticate,
            use_cloud_fetch=True,
            user_agent_entry="cptkit",
            _retry_stop_after_attempts_count=config.max_retries + 1,
            _retry_stop_after_attempts_duration=config.timeout_seconds,
            _socket_timeout=min(900.0, config.timeout_seconds),
        )

    return connect


class StatementWarehouse(Warehouse):
    """The Statement Execution API: EXTERNAL_LINKS + ARROW_STREAM, polled until done, one chunk at a time.
    Chunk links are presigned URLs, fetched without the workspace token and refreshed when expired."""

    def __init__(
        self, workspace: Any, warehouse_id: str, retrying: Retrying, timeout_seconds: float, batch_size: int
    ) -> None:
        self._w = workspace
        self._warehouse = warehouse_id
        self._retrying = retrying
        self._timeout = timeout_seconds
        self._batch_size = batch_size
        self.waited_for_warehouse = 0.0

    def stream(self, query: Query) -> Iterator[pa.RecordBatch]:
        from databricks.sdk.service.sql import (
            Disposition,
            ExecuteStatementRequestOnWaitTimeout,
            Format,
            StatementState,
        )

        secrets = self._retrying.secrets
        response = self._retrying.call(
            "submit the statement",
            lambda: self._w.statement_execution.execute_statement(
                statement=query.text,
                warehouse_id=self._warehouse,
                parameters=[_statement_parameter(k, v) for k, v in query.params.items()] or None,
                disposition=Disposition.EXTERNAL_LINKS,
                format=Format.ARROW_STREAM,
                wait_timeout="10s",
                on_wait_timeout=ExecuteStatementRequestOnWaitTimeout.CONTINUE,
            ),
        )
        statement_id = response.statement_id
        started = time.monotonic()
        delay = 1.0
        while response.status is not None and response.status.state in (StatementState.PENDING, StatementState.RUNNING):
            elapsed = time.monotonic() - started
            if elapsed + delay > self._timeout:
                state = response.status.state.value
                with contextlib.suppress(Exception):  # the time-out below is the error worth reporting
                    self._w.statement_execution.cancel_execution(statement_id)
                raise SourceError(
                    f"the statement was still {state} after waiting {elapsed:.1f}s for SQL warehouse "
                    f"{self._warehouse} (a stopped warehouse is started on demand); start the warehouse or raise "
                    "source.timeout_seconds"
                )
            databricks_client.SLEEP(delay)
            self.waited_for_warehouse += delay
            delay = min(10.0, delay * 2)
            response = self._retrying.call(
                "poll the statement", lambda: self._w.statement_execution.get_statement(statement_id)
            )
        state = response.status.state if response.status is not None else None
        if state != StatementState.SUCCEEDED:
            error = response.status.error if response.status is not None else None
            code = getattr(getattr(error, "error_code", None), "value", None) or "ERROR"
            message = secrets.scrub(str(getattr(error, "message", None) or state))
            raise translate(RuntimeError(f"[{code}] {message}"), "the statement failed", secrets)
        if response.manifest is not None and response.manifest.truncated:
            raise SourceError("the statement result was truncated by the API's byte limit; narrow the query")
        result = response.result
        links = list(result.external_links or []) if result is not None else []
        while links:
            next_index = None
            for link in links:
                yield from self._chunk_batches(statement_id, link)
                next_index = link.next_chunk_index
            if next_index is None:
                break
            chunk = self._chunk(statement_id, next_index)
            links = list(chunk.external_links or [])

    def _chunk_batches(self, statement_id: str, link: Any) -> Iterator[pa.RecordBatch]:
        if _expires_soon(link.expiration):
            link = self._fresh_link(statement_id, link.chunk_index)
        try:
            data = self._download(link)
        except _ExpiredLink:
            data = self._download(self._fresh_link(statement_id, link.chunk_index))
        if data[:4] == b"\x04\x22\x4d\x18":  # an LZ4 frame around the Arrow stream
            import lz4.frame

            data = lz4.frame.decompress(data)
        try:
            reader = pa.ipc.open_stream(io.BytesIO(data))
            for batch in reader:
                yield from pa.Table.from_batches([batch]).to_batches(max_chunksize=self._batch_size)
        except pa.ArrowInvalid as exc:
            raise SourceError(f"a result chunk is not an Arrow stream ({str(exc).splitlines()[0]})") from None

    def _chunk(self, statement_id: str, chunk_index: int) -> Any:
        return self._retrying.call(
            f"fetch result chunk {chunk_index}",
            lambda: self._w.statement_execution.get_statement_result_chunk_n(statement_id, chunk_index),
        )

    def _fresh_link(self, statement_id: str, chunk_index: int) -> Any:
        chunk = self._chunk(statement_id, chunk_index)
        links = [x for x in (chunk.external_links or []) if x.chunk_index == chunk_index]
        if not links:
            raise SourceError(f"the API returned no link for result chunk {chunk_index}")
        return links[0]

    def _download(self, link: Any) -> bytes:
        import requests

        url = str(link.external_link)
        self._retrying.secrets.add(url)  # the URL itself is a credential

        def get() -> bytes:
            # Presigned: the workspace token must not be sent to cloud storage.
            response = requests.get(url, headers=dict(link.http_headers or {}), timeout=min(300.0, self._timeout))
            if response.status_code in (400, 403) and _expires_soon(link.expiration, margin=0):
                raise _ExpiredLink()
            response.raise_for_status()
            return response.content

        try:
            return self._retrying.call("download a result chunk", get)
        except SourceError as exc:
            if "403" in str(exc) or "400" in str(exc):
                raise _ExpiredLink() from None
            raise


class _ExpiredLink(Exception):
    pass


def _expires_soon(expiration: str | None, margin: float = 30.0) -> bool:
    if not expiration:
        return False
    try:
        when = dt.datetime.fromisoformat(expiration.replace("Z", "+00:00"))
    except ValueError:
        return False
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return (when - dt.datetime.now(dt.UTC)).total_seconds() < margin


def _statement_parameter(name: str, value: Any) -> Any:
    """A typed Statement Execution parameter: values travel as strings with a SQL type."""
    from databricks.sdk.service.sql import StatementParameterListItem

    if value is None:
        return StatementParameterListItem(name=name)
    if isinstance(value, bool):
        return StatementParameterListItem(name=name, value="true" if value else "false", type="BOOLEAN")
    if isinstance(value, int):
        return StatementParameterListItem(name=name, value=str(value), type="BIGINT")
    if isinstance(value, float):
        return StatementParameterListItem(name=name, value=repr(value), type="DOUBLE")
    if isinstance(value, decimal.Decimal):
        return StatementParameterListItem(name=name, value=str(value), type="DECIMAL(38,18)")
    if isinstance(value, dt.datetime):
        return StatementParameterListItem(name=name, value=value.isoformat(), type="TIMESTAMP")
    if isinstance(value, dt.date):
        return StatementParameterListItem(name=name, value=value.isoformat(), type="DATE")
    return StatementParameterListItem(name=name, value=str(value), type="STRING")
