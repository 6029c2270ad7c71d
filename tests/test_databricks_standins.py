"""Local stand-ins for a Databricks workspace, and tests that they behave like the real thing where cptkit
depends on it.

- `DuckWarehouse`: a DB-API connection (the methods cptkit calls on databricks-sql-connector) over DuckDB,
  with three-part names through ATTACH. Its tables are real Delta tables written with deltalake,
  materialized at the version a query asks for. The query text cptkit sends runs unchanged except for
  three Databricks-only pieces the stand-in answers itself: `:name` markers become DuckDB's `$name`,
  `DESCRIBE HISTORY t LIMIT 1` is answered from the Delta log, `VERSION AS OF n` loads version n, and
  `table_changes(...)` is a DuckDB macro over deltalake's change data feed.
- `Workspace`: an HTTP server on 127.0.0.1 answering the REST endpoints the real databricks-sdk
  WorkspaceClient calls (Unity Catalog tables and temporary credentials, Files API, Statement Execution
  with EXTERNAL_LINKS + ARROW_STREAM, OAuth M2M token), as the public API reference documents them.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import re
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

TOKEN = "dapi-TEST-TOKEN-5f2c9a71e0b84d3c"
CLIENT_SECRET = "dose-CLIENT-SECRET-8a7b6c5d4e3f"
STORAGE_SECRET = "aws-SECRET-ACCESS-KEY-1234567890"
TABLE = "lake.docs.pages"
BASE = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)


def page(i: int, body: str | None = None, hours: int = 0, lang: str = "en") -> dict[str, Any]:
    return {
        "id": i,
        "title": f"Title {i}",
        "body": body if body is not None else f"Body of page {i}.",
        "lang": lang,
        "updated_at": BASE + dt.timedelta(hours=hours),
    }


def write_pages(path: Path, rows: list[dict[str, Any]], mode: str = "append") -> None:
    from deltalake import write_deltalake

    schema = pa.schema(
        [
            ("id", pa.int64()),
            ("title", pa.string()),
            ("body", pa.string()),
            ("lang", pa.string()),
            ("updated_at", pa.timestamp("us", tz="UTC")),
        ]
    )
    write_deltalake(
        str(path),
        pa.Table.from_pylist(rows, schema=schema),
        mode=mode,  # type: ignore[arg-type]
        configuration={"delta.enableChangeDataFeed": "true"} if not path.exists() else None,
    )


def versioned_table(path: Path) -> Path:
    """v0: pages 0-4; v1: pages 5-6 appended; v2: page 1 updated; v3: page 2 deleted."""
    from deltalake import DeltaTable

    write_pages(path, [page(i) for i in range(5)])
    write_pages(path, [page(5, hours=5), page(6, hours=6)])
    DeltaTable(str(path)).update(
        updates={"body": "'Body of page 1, revised.'", "updated_at": "'2024-01-01T10:00:00Z'"}, predicate="id = 1"
    )
    DeltaTable(str(path)).delete("id = 2")
    return path


# ---------------------------------------------------------------------------------------------------
# The SQL warehouse stand-in.

_NAME = re.compile(r"`([^`]+)`\.`([^`]+)`\.`([^`]+)`(?: VERSION AS OF (\d+))?")


class DuckWarehouse:
    """A DB-API connection factory and connection over DuckDB and real Delta tables."""

    def __init__(self, tables: dict[str, Path]) -> None:
        import duckdb

        self.tables = {name: str(path) for name, path in tables.items()}
        self.con = duckdb.connect()
        self.queries: list[tuple[str, dict[str, Any] | None]] = []
        self.connects = 0
        self.connect_errors: list[Exception] = []
        self.execute_errors: list[Exception] = []
        self.closed = 0
        for name in self.tables:
            catalog, schema, _ = name.split(".")
            if catalog not in {
                r[0] for r in self.con.execute("SELECT database_name FROM duckdb_databases()").fetchall()
            }:
                self.con.execute(f"ATTACH ':memory:' AS \"{catalog}\"")
            self.con.execute(f'CREATE SCHEMA IF NOT EXISTS "{catalog}"."{schema}"')
        self.con.execute(
            "CREATE MACRO table_changes(name, s, e) AS TABLE SELECT * FROM "
            "query_table(replace(name, '`', '') || '__changes') WHERE _commit_version BETWEEN s AND e"
        )

    # the factory cptkit calls
    def __call__(self) -> DuckWarehouse:
        self.connects += 1
        if self.connect_errors:
            raise self.connect_errors.pop(0)
        return self

    def cursor(self) -> DuckCursor:
        return DuckCursor(self)

    def close(self) -> None:
        self.closed += 1

    def table_names(self) -> list[str]:
        rows = self.con.execute("SELECT database_name, schema_name, table_name FROM duckdb_tables()").fetchall()
        return sorted(".".join(r) for r in rows)

    def _materialize(self, sql: str, params: dict[str, Any] | None) -> str:
        from deltalake import DeltaTable

        def load(match: re.Match[str]) -> str:
            name = ".".join(match.group(1, 2, 3))
            if name in self.tables:
                version = int(match.group(4)) if match.group(4) else None
                table = pa.table(DeltaTable(self.tables[name], version=version).to_pyarrow_table())
                self._replace(name, table)
            return match.group(0).split(" VERSION AS OF ")[0]

        sql = _NAME.sub(load, sql)
        if "table_changes(" in sql and params:
            name = str(params["tbl"]).replace("`", "")
            if name in self.tables:
                delta = DeltaTable(self.tables[name])
                changes = pa.RecordBatchReader.from_stream(delta.load_cdf(starting_version=0)).read_all()
                self._replace(name + "__changes", changes)
        return sql

    def _replace(self, name: str, table: pa.Table) -> None:
        catalog, schema, tbl = name.split(".")
        self.con.register("_incoming", table)
        self.con.execute(f'CREATE OR REPLACE TABLE "{catalog}"."{schema}"."{tbl}" AS SELECT * FROM _incoming')
        self.con.unregister("_incoming")


def _duckdb_params(sql: str) -> str:
    """`:name` markers (databricks-sql-connector's named style) as DuckDB's `$name`, outside literals."""
    parts = re.split(r"('[^']*')", sql)
    return "".join(p if p.startswith("'") else re.sub(r"(?<![:\w]):([A-Za-z_]\w*)", r"$\1", p) for p in parts)


class DuckCursor:
    def __init__(self, owner: DuckWarehouse) -> None:
        self.owner = owner
        self._reader: Any = None
        self._pending: list[pa.RecordBatch] = []
        self._done = False

    def execute(self, operation: str, parameters: dict[str, Any] | None = None) -> DuckCursor:
        import duckdb

        self.owner.queries.append((operation, parameters))
        if self.owner.execute_errors:
            raise self.owner.execute_errors.pop(0)
        history = re.fullmatch(r"DESCRIBE HISTORY `([^`]+)`\.`([^`]+)`\.`([^`]+)` LIMIT 1", operation)
        if history:
            from deltalake import DeltaTable

            name = ".".join(history.groups())
            if name not in self.owner.tables:
                raise duckdb.CatalogException(f"Catalog Error: Table with name {name} does not exist!")
            version = DeltaTable(self.owner.tables[name]).version()
            self._reader = pa.table({"version": [version], "operation": ["WRITE"]}).to_reader()
            return self
        sql = _duckdb_params(self.owner._materialize(operation, parameters))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self._reader = self.owner.con.execute(sql, parameters or {}).to_arrow_reader(1000)
        return self

    def fetchmany_arrow(self, size: int) -> pa.Table:
        batches, rows = [], 0
        schema = self._reader.schema
        while rows < size:
            try:
                batch = self._reader.read_next_batch()
            except StopIteration:
                break
            batches.append(batch)
            rows += batch.num_rows
        table = pa.Table.from_batches(batches, schema=schema)
        return table

    def close(self) -> None:
        self._reader = None


# ---------------------------------------------------------------------------------------------------
# The workspace REST stand-in.


def _json(data: Any, status: int = 200) -> Response:
    return Response(json.dumps(data), status=status, content_type="application/json")


def _error(status: int, code: str, message: str) -> Response:
    return _json({"error_code": code, "message": message}, status)


class Workspace:
    """Answers the databricks-sdk's REST calls from local data."""

    def __init__(self, server: HTTPServer, warehouse: DuckWarehouse | None = None) -> None:
        self.server = server
        self.url = server.url_for("/").rstrip("/")
        self.warehouse = warehouse
        self.tables: dict[str, Path] = {}
        self.table_ids: dict[str, str] = {}
        self.volume_root: Path | None = None
        self.requests: list[tuple[str, str, str | None]] = []
        self.credential_requests = 0
        self.credential_lifetime_s = 3600.0
        self.pending_polls = 0  # statement polls answered PENDING before it runs
        self.chunk_rows = 3
        self.statements: dict[str, dict[str, Any]] = {}
        self.access_token = TOKEN
        self.failures: list[tuple[str, Response]] = []  # (path prefix, response) answered once each
        server.expect_request(re.compile(".*")).respond_with_handler(self.handle)

    def handle(self, request: Request) -> Response:
        path = request.path
        auth = request.headers.get("Authorization")
        self.requests.append((request.method, path, auth))
        if path == "/.well-known/databricks-config":  # host metadata: where OAuth discovery lives
            return _json({"oidc_endpoint": f"{self.url}/oidc", "workspace_id": "1234567890"})
        if path == "/oidc/.well-known/oauth-authorization-server":
            return _json(
                {
                    "authorization_endpoint": f"{self.url}/oidc/v1/authorize",
                    "token_endpoint": f"{self.url}/oidc/v1/token",
                }
            )
        if path == "/oidc/v1/token":
            return self._token(request)
        if path.startswith("/external/"):
            return self._external(path, auth)
        for i, (prefix, response) in enumerate(self.failures):
            if path.startswith(prefix):
                del self.failures[i]
                return response
        if auth != f"Bearer {self.access_token}":
            return _error(401, "UNAUTHENTICATED", "Invalid access token.")
        if path.startswith("/api/2.1/unity-catalog/tables/"):
            return self._table(path.removeprefix("/api/2.1/unity-catalog/tables/"))
        if path == "/api/2.0/unity-catalog/temporary-table-credentials":
            return self._credentials(request)
        if path.startswith("/api/2.0/fs/directories"):
            return self._listing(path.removeprefix("/api/2.0/fs/directories"))
        if path == "/api/2.0/fs/create-download-url":
            return _error(404, "NOT_FOUND", "presigned downloads are not enabled")
        if path.startswith("/api/2.0/fs/files"):
            return self._file(path.removeprefix("/api/2.0/fs/files"))
        if path.startswith("/api/2.0/sql/statements"):
            return self._statements(request, path.removeprefix("/api/2.0/sql/statements"))
        return _error(404, "ENDPOINT_NOT_FOUND", f"no endpoint {path}")

    # -- OAuth M2M
    def _token(self, request: Request) -> Response:
        import base64

        basic = request.headers.get("Authorization", "").removeprefix("Basic ")
        _client_id, _, secret = base64.b64decode(basic).decode().partition(":") if basic else ("", "", "")
        if secret != CLIENT_SECRET:
            return _json({"error": "invalid_client", "error_description": "bad client credentials"}, 401)
        return _json({"access_token": self.access_token, "token_type": "Bearer", "expires_in": 3600})

    # -- Unity Catalog
    def _table(self, full_name: str) -> Response:
        if full_name not in self.tables:
            return _error(404, "TABLE_DOES_NOT_EXIST", f"Table '{full_name}' does not exist.")
        table_id = self.table_ids.setdefault(full_name, str(uuid.uuid4()))
        catalog, schema, name = full_name.split(".")
        return _json(
            {
                "name": name,
                "catalog_name": catalog,
                "schema_name": schema,
                "full_name": full_name,
                "table_type": "MANAGED",
                "data_source_format": "DELTA",
                "storage_location": self.tables[full_name].resolve().as_uri(),
                "table_id": table_id,
            }
        )

    def _credentials(self, request: Request) -> Response:
        body = request.get_json()
        if body.get("operation") != "READ" or body.get("table_id") not in self.table_ids.values():
            return _error(400, "INVALID_PARAMETER_VALUE", "unknown table id")
        self.credential_requests += 1
        expires = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=self.credential_lifetime_s)
        return _json(
            {
                "aws_temp_credentials": {
                    "access_key_id": "ASIA-TEST",
                    "secret_access_key": STORAGE_SECRET,
                    "session_token": f"session-{self.credential_requests}-abcdef",
                },
                "expiration_time": int(expires.timestamp() * 1000),
                "url": "s3://bucket/tables/x",
            }
        )

    # -- Files API
    def _local(self, volume_path: str) -> Path | None:
        if self.volume_root is None or not volume_path.startswith("/Volumes/"):
            return None
        return self.volume_root / volume_path.removeprefix("/Volumes/")

    def _listing(self, directory: str) -> Response:
        local = self._local(directory)
        if local is None or not local.is_dir():
            return _error(404, "NOT_FOUND", f"The directory {directory} does not exist.")
        contents = [
            {
                "path": f"{directory.rstrip('/')}/{p.name}" + ("/" if p.is_dir() else ""),
                "name": p.name,
                "is_directory": p.is_dir(),
                **(
                    {}
                    if p.is_dir()
                    else {"file_size": p.stat().st_size, "last_modified": int(p.stat().st_mtime * 1000)}
                ),
            }
            for p in sorted(local.iterdir())
        ]
        return _json({"contents": contents})

    def _file(self, file_path: str) -> Response:
        local = self._local(file_path)
        if local is None or not local.is_file():
            return _error(404, "NOT_FOUND", f"The file {file_path} does not exist.")
        data = local.read_bytes()
        return Response(data, content_type="application/octet-stream", headers={"Content-Length": str(len(data))})

    # -- Statement Execution
    def _statements(self, request: Request, rest: str) -> Response:
        if request.method == "POST" and rest == "":
            return self._submit(request.get_json())
        match = re.fullmatch(r"/([^/]+)(/cancel|/result/chunks/(\d+))?", rest)
        if not match or match.group(1) not in self.statements:
            return _error(404, "NOT_FOUND", "no such statement")
        statement = self.statements[match.group(1)]
        if match.group(2) == "/cancel":
            statement["state"] = "CANCELED"
            return _json({})
        if match.group(3) is not None:
            return _json(self._chunk(match.group(1), int(match.group(3))))
        return _json(self._status(match.group(1)))

    def _submit(self, body: dict[str, Any]) -> Response:
        assert body["disposition"] == "EXTERNAL_LINKS" and body["format"] == "ARROW_STREAM"
        assert self.warehouse is not None
        statement_id = str(uuid.uuid4())
        params = {p["name"]: _typed(p) for p in body.get("parameters", [])}
        record: dict[str, Any] = {"state": "PENDING", "polls": 0, "body": body}
        try:
            cursor = self.warehouse.cursor().execute(body["statement"], params or None)
            record["table"] = cursor._reader.read_all()
        except Exception as exc:  # the API answers 200 with state FAILED
            record["error"] = {"error_code": "BAD_REQUEST", "message": str(exc).splitlines()[0]}
        self.statements[statement_id] = record
        return _json(self._status(statement_id))

    def _status(self, statement_id: str) -> dict[str, Any]:
        record = self.statements[statement_id]
        if record["state"] == "PENDING":
            if record["polls"] < self.pending_polls:
                record["polls"] += 1
                return {"statement_id": statement_id, "status": {"state": "PENDING"}}
            record["state"] = "FAILED" if "error" in record else "SUCCEEDED"
        if record["state"] != "SUCCEEDED":
            return {"statement_id": statement_id, "status": {"state": record["state"], "error": record.get("error")}}
        table: pa.Table = record["table"]
        chunks = max(1, -(-table.num_rows // self.chunk_rows))
        return {
            "statement_id": statement_id,
            "status": {"state": "SUCCEEDED"},
            "manifest": {
                "format": "ARROW_STREAM",
                "total_chunk_count": chunks,
                "total_row_count": table.num_rows,
                "truncated": False,
                "schema": {"column_count": table.num_columns, "columns": [{"name": n} for n in table.column_names]},
            },
            "result": self._chunk(statement_id, 0),
        }

    def _chunk(self, statement_id: str, index: int) -> dict[str, Any]:
        table: pa.Table = self.statements[statement_id]["table"]
        chunks = max(1, -(-table.num_rows // self.chunk_rows))
        expires = (dt.datetime.now(dt.UTC) + dt.timedelta(minutes=15)).isoformat().replace("+00:00", "Z")
        link = {
            "chunk_index": index,
            "row_offset": index * self.chunk_rows,
            "row_count": min(self.chunk_rows, table.num_rows - index * self.chunk_rows),
            "external_link": f"{self.url}/external/{statement_id}/{index}?X-Amz-Signature=presigned-{index}",
            "expiration": expires,
        }
        if index + 1 < chunks:
            link["next_chunk_index"] = index + 1
            link["next_chunk_internal_link"] = f"/api/2.0/sql/statements/{statement_id}/result/chunks/{index + 1}"
        return {"chunk_index": index, "external_links": [link]}

    def _external(self, path: str, auth: str | None) -> Response:
        if auth is not None:  # presigned cloud URLs must be fetched without the workspace token
            return Response("Authorization header sent to cloud storage", status=400)
        _, _, statement_id, index = path.split("/")
        table: pa.Table = self.statements[statement_id]["table"]
        part = table.slice(int(index) * self.chunk_rows, self.chunk_rows)
        sink = io.BytesIO()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(part)
        return Response(sink.getvalue(), content_type="application/vnd.apache.arrow.stream")


def _typed(param: dict[str, Any]) -> Any:
    value, kind = param.get("value"), param.get("type", "STRING")
    if value is None:
        return None
    if kind == "BIGINT":
        return int(value)
    if kind == "DOUBLE":
        return float(value)
    if kind == "BOOLEAN":
        return value == "true"
    if kind == "TIMESTAMP":
        return dt.datetime.fromisoformat(value)
    if kind == "DATE":
        return dt.date.fromisoformat(value)
    return value


@pytest.fixture(name="workspace")
def workspace_fixture(tmp_path: Path) -> Iterator[Workspace]:
    with HTTPServer(host="127.0.0.1") as server:
        yield Workspace(server)


@pytest.fixture(autouse=True, name="fast_retries")
def fast_retries_fixture(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Retries and polls sleep a millisecond; the delays they asked for are recorded."""
    import time

    from cptkit.sources import databricks_client

    asked: list[float] = []

    def sleep(seconds: float) -> None:
        asked.append(seconds)
        time.sleep(0.001)

    monkeypatch.setattr(databricks_client, "SLEEP", sleep)
    return asked


# ---------------------------------------------------------------------------------------------------
# The stand-ins against what cptkit relies on.


def test_duck_warehouse_reads_delta_versions_and_changes(tmp_path: Path) -> None:
    table = versioned_table(tmp_path / "pages")
    wh = DuckWarehouse({TABLE: table})
    conn = wh()
    cur = conn.cursor().execute("DESCRIBE HISTORY `lake`.`docs`.`pages` LIMIT 1")
    assert cur.fetchmany_arrow(10).column("version").to_pylist() == [3]
    cur = conn.cursor().execute("SELECT `id` FROM `lake`.`docs`.`pages` VERSION AS OF 0 ORDER BY `id`")
    assert cur.fetchmany_arrow(100).column("id").to_pylist() == [0, 1, 2, 3, 4]
    cur = conn.cursor().execute(
        "SELECT `id`, `_change_type` FROM table_changes(:tbl, :a, :b) WHERE `_change_type` <> 'update_preimage' "
        "ORDER BY `_commit_version`",
        {"tbl": "`lake`.`docs`.`pages`", "a": 2, "b": 3},
    )
    assert cur.fetchmany_arrow(100).to_pylist() == [
        {"id": 1, "_change_type": "update_postimage"},
        {"id": 2, "_change_type": "delete"},
    ]


def test_workspace_answers_the_real_sdk(workspace: Workspace, tmp_path: Path) -> None:
    from databricks.sdk import WorkspaceClient
    from databricks.sdk.core import Config
    from databricks.sdk.errors import NotFound, Unauthenticated

    workspace.tables[TABLE] = versioned_table(tmp_path / "pages")
    w = WorkspaceClient(config=Config(host=workspace.url, token=TOKEN))
    info = w.tables.get(TABLE)
    assert info.storage_location and info.storage_location.startswith("file://")
    with pytest.raises(NotFound):
        w.tables.get("lake.docs.missing")
    bad = WorkspaceClient(config=Config(host=workspace.url, token="dapi-wrong-token"))
    with pytest.raises(Unauthenticated):
        bad.tables.get(TABLE)
