"""The methods that go through databricks-sdk (statement, delta via Unity Catalog, volume), with the real
WorkspaceClient talking to the REST stand-in on 127.0.0.1; authentication by token, OAuth M2M and
profile; failures; and a scan of everything written and printed for the secrets."""

from __future__ import annotations

import datetime as dt
import errno
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from conftest import make_doc, write_config
from cptkit.config import Config, load_config
from cptkit.datasets import SNAPSHOT, datasets
from cptkit.errors import SourceError
from cptkit.extract import extract
from test_databricks_standins import (  # noqa: F401 (fixtures)
    CLIENT_SECRET,
    STORAGE_SECRET,
    TABLE,
    TOKEN,
    DuckWarehouse,
    Workspace,
    fast_retries_fixture,
    page,
    versioned_table,
    workspace_fixture,
    write_pages,
)

SOURCE = {"id_column": "id", "text_column": "body", "metadata_columns": ["title"]}


def load(tmp_path: Path, ws: Workspace, source: dict[str, Any], **connection: Any) -> Config:
    return load_config(
        write_config(
            tmp_path / "cfg.yaml",
            {
                "data": {"output_dir": str(tmp_path / "out")},
                "databricks": {"host": ws.url, "token": TOKEN, "warehouse_id": "wh-1", **connection},
                "source": {"type": "databricks", "table": TABLE, **source},
            },
        ),
        env_file=tmp_path / "no.env",
    )


def run(cfg: Config, force: bool = False) -> dict[str, Any]:
    return extract(datasets(cfg)[0], force=force).manifest


def snapshot(cfg: Config) -> dict[str, dict[str, Any]]:
    return {r["id"]: r for r in pq.read_table(cfg.data.output_dir / "raw" / SNAPSHOT).to_pylist()}


# -- statement execution --------------------------------------------------------------------------


def test_statement_method_streams_chunks_after_the_warehouse_starts(tmp_path: Path, workspace: Workspace) -> None:
    table = versioned_table(tmp_path / "pages")
    workspace.warehouse = DuckWarehouse({TABLE: table})
    workspace.pending_polls = 2  # a stopped warehouse starting
    workspace.chunk_rows = 2
    cfg = load(
        tmp_path, workspace, {**SOURCE, "method": "statement", "filter": [{"column": "id", "op": "!=", "value": 0}]}
    )
    manifest = run(cfg)
    assert manifest["rows"] == 5 and manifest["delta_version"] == 3
    # two statements (the version lookup, the read), each polled twice while PENDING: 1 + 2 seconds
    assert manifest["incremental"]["waited_for_warehouse_seconds"] == 6.0
    rows = snapshot(cfg)
    assert sorted(rows) == ["1", "3", "4", "5", "6"] and rows["1"]["title"] == "Title 1"
    submitted = [s["body"] for s in workspace.statements.values()]
    assert submitted[-1]["parameters"] == [{"name": "f0", "value": "0", "type": "BIGINT"}]
    assert submitted[-1]["warehouse_id"] == "wh-1"
    chunk_calls = [p for m, p, _ in workspace.requests if "/result/chunks/" in p]
    downloads = [(p, auth) for m, p, auth in workspace.requests if p.startswith("/external/")]
    assert len(chunk_calls) == 2 and len(downloads) == 1 + 3 and all(auth is None for _, auth in downloads)


def test_statement_watermark_increments(tmp_path: Path, workspace: Workspace) -> None:
    path = tmp_path / "pages"
    write_pages(path, [page(i, hours=i) for i in range(3)])
    workspace.warehouse = DuckWarehouse({TABLE: path})
    cfg = load(
        tmp_path, workspace, {**SOURCE, "method": "statement", "mode": "watermark", "watermark_column": "updated_at"}
    )
    assert run(cfg)["rows"] == 3
    write_pages(path, [page(1, body="edited", hours=7), page(7, hours=8)])
    second = run(cfg)
    assert (second["incremental"]["upserted"], second["rows"]) == (2, 4)
    params = {p["name"]: p for p in list(workspace.statements.values())[-1]["body"]["parameters"]}
    assert params["wm"]["type"] == "TIMESTAMP" and params["wm"]["value"].startswith("2024-01-01T02:00:00")
    write_pages(path, [page(8, hours=9)])
    assert run(cfg)["rows"] == 5 and snapshot(cfg)["1"]["text"] == "edited"


def test_statement_failures(tmp_path: Path, workspace: Workspace) -> None:
    workspace.warehouse = DuckWarehouse({TABLE: versioned_table(tmp_path / "pages")})
    with pytest.raises(SourceError, match="column"):
        run(load(tmp_path, workspace, {**SOURCE, "method": "statement", "text_column": "content"}))
    with pytest.raises(SourceError, match=r"not found|does not exist"):
        run(load(tmp_path, workspace, {**SOURCE, "method": "statement", "table": "lake.docs.gone"}))
    workspace.pending_polls = 100
    with pytest.raises(SourceError, match=r"still PENDING after waiting .*s for SQL warehouse wh-1") as err:
        run(load(tmp_path, workspace, {**SOURCE, "method": "statement", "timeout_seconds": 5, "version": 1}))
    assert "start the warehouse or raise source.timeout_seconds" in str(err.value)
    assert any(p.endswith("/cancel") for _, p, _ in workspace.requests)


# -- delta via Unity Catalog ----------------------------------------------------------------------


def test_delta_method_resolves_the_table_and_reads_its_files(tmp_path: Path, workspace: Workspace) -> None:
    workspace.tables[TABLE] = versioned_table(tmp_path / "pages")
    cfg = load(
        tmp_path, workspace, {**SOURCE, "method": "delta", "filter": [{"column": "id", "op": "in", "value": [1, 3, 4]}]}
    )
    manifest = run(cfg)
    assert manifest["rows"] == 3 and manifest["delta_version"] == 3
    assert snapshot(cfg)["1"]["text"] == "Body of page 1, revised."
    assert workspace.credential_requests == 1
    # a pinned version
    cfg = load(tmp_path, workspace, {**SOURCE, "method": "delta", "version": 0})
    assert run(cfg)["rows"] == 5 and snapshot(cfg)["1"]["text"] == "Body of page 1."


def test_delta_credentials_are_refreshed_before_they_expire(tmp_path: Path, workspace: Workspace) -> None:
    path = tmp_path / "pages"
    for i in range(4):  # four commits, four files
        write_pages(path, [page(i)])
    workspace.tables[TABLE] = path
    workspace.credential_lifetime_s = 60  # shorter than the refresh margin: renewed before every file
    manifest = run(load(tmp_path, workspace, {**SOURCE, "method": "delta"}))
    assert manifest["rows"] == 4
    assert manifest["incremental"]["credential_refreshes"] >= 3 and workspace.credential_requests >= 4


def test_delta_cdf_across_three_extractions(tmp_path: Path, workspace: Workspace) -> None:
    from deltalake import DeltaTable

    path = tmp_path / "pages"
    write_pages(path, [page(i) for i in range(4)])
    workspace.tables[TABLE] = path
    cfg = load(tmp_path, workspace, {**SOURCE, "method": "delta", "mode": "cdf"})
    assert run(cfg)["rows"] == 4
    DeltaTable(str(path)).delete("id = 0")
    DeltaTable(str(path)).update(updates={"body": "'three'"}, predicate="id = 3")
    second = run(cfg)
    assert (second["incremental"]["deleted"], second["incremental"]["upserted"], second["rows"]) == (1, 1, 3)
    write_pages(path, [page(10), page(11)])
    DeltaTable(str(path)).delete("id = 10")
    third = run(cfg)
    assert (third["incremental"]["upserted"], third["rows"], third["delta_version"]) == (1, 4, 4)
    assert sorted(snapshot(cfg)) == ["1", "11", "2", "3"] and snapshot(cfg)["3"]["text"] == "three"


def test_plain_delta_path_and_cdf_gap(tmp_path: Path, workspace: Workspace) -> None:
    path = versioned_table(tmp_path / "pages")
    cfg = load_config(
        write_config(
            tmp_path / "cfg.yaml",
            {
                "data": {"output_dir": "out"},
                "source": {"type": "databricks", "method": "delta", "path": str(path), **SOURCE},
            },
        ),
        env_file=tmp_path / "no.env",
    )
    assert run(cfg)["rows"] == 6 and workspace.requests == []


def test_delta_not_found_and_permission(tmp_path: Path, workspace: Workspace) -> None:
    from test_databricks_standins import _error

    with pytest.raises(SourceError, match="not found"):
        run(load(tmp_path, workspace, {**SOURCE, "method": "delta"}))
    workspace.tables[TABLE] = versioned_table(tmp_path / "pages")
    workspace.failures.append(
        (
            "/api/2.0/unity-catalog/temporary-table-credentials",
            _error(403, "PERMISSION_DENIED", "EXTERNAL USE SCHEMA required"),
        )
    )
    with pytest.raises(SourceError, match=r"permission denied.*EXTERNAL USE SCHEMA"):
        run(load(tmp_path, workspace, {**SOURCE, "method": "delta"}))


# -- volume ---------------------------------------------------------------------------------------


def test_volume_files_one_document_each_and_jsonl_lines(tmp_path: Path, workspace: Workspace) -> None:
    import json

    from test_sources import _tiny_pdf

    root = tmp_path / "volumes"
    folder = root / "lake" / "docs" / "raw" / "manuals"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("\ufeffplain text", encoding="utf-8")  # with a byte-order mark
    (folder / "sub" / "b.md").write_text("# Title\n\nbody", encoding="utf-8")
    (folder / "c.pdf").write_bytes(_tiny_pdf("Hello from a PDF"))
    (folder / "d.jsonl").write_text(
        "\ufeff"  # a byte-order mark before the first line
        + json.dumps({"id": "x1", "body": "first line"})
        + "\n{broken\n"
        + json.dumps({"id": "x3", "body": "third"})
        + "\n",
        encoding="utf-8",
    )
    (folder / "e.txt").write_bytes(b"bad \xff")
    (folder / "image.png").write_bytes(b"\x89PNG")
    workspace.volume_root = root
    cfg = load(
        tmp_path,
        workspace,
        {"method": "volume", "volume_path": "/Volumes/lake/docs/raw/manuals", "text_column": "body", "id_column": "id"},
    )
    manifest = run(cfg)
    rows = snapshot(cfg)
    assert sorted(rows) == ["a.txt", "c.pdf", "d.jsonl:2", "e.txt", "sub/b.md", "x1", "x3"]
    assert rows["c.pdf"]["text"] == "Hello from a PDF" and rows["x3"]["path"] == "d.jsonl"
    assert rows["a.txt"]["text"] == "plain text" and rows["x1"]["text"] == "first line"
    assert rows["d.jsonl:2"]["error"] == "invalid_json" and rows["e.txt"]["error"] == "undecodable_bytes"
    assert manifest["malformed_rows"] == {"invalid_json": 1, "undecodable_bytes": 1}
    assert extract(datasets(cfg)[0]).skipped  # the listing did not change
    with pytest.raises(SourceError, match="not found"):
        run(load(tmp_path, workspace, {"method": "volume", "volume_path": "/Volumes/lake/docs/nope"}))


# -- authentication -------------------------------------------------------------------------------


def test_oauth_m2m_and_profile_authenticate(
    tmp_path: Path, workspace: Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    workspace.tables[TABLE] = versioned_table(tmp_path / "pages")
    workspace.access_token = "m2m-access-token-0a1b2c3d"
    monkeypatch.setenv("DATABRICKS_CLIENT_ID", "sp-1")
    monkeypatch.setenv("DATABRICKS_CLIENT_SECRET", CLIENT_SECRET)
    cfg = load(tmp_path, workspace, {**SOURCE, "method": "delta"}, token=None)
    assert cfg.source is not None and cfg.source.client_secret is not None
    assert run(cfg)["rows"] == 6
    assert any(p == "/oidc/v1/token" for _, p, _ in workspace.requests)

    monkeypatch.delenv("DATABRICKS_CLIENT_ID")
    monkeypatch.delenv("DATABRICKS_CLIENT_SECRET")
    workspace.access_token = TOKEN
    (tmp_path / ".databrickscfg").write_text(f"[team]\nhost = {workspace.url}\ntoken = {TOKEN}\n", encoding="utf-8")
    monkeypatch.setenv("DATABRICKS_CONFIG_FILE", str(tmp_path / ".databrickscfg"))
    monkeypatch.setenv("DATABRICKS_CONFIG_PROFILE", "team")
    cfg = load_config(
        write_config(
            tmp_path / "p.yaml",
            {
                "data": {"output_dir": "p"},
                "source": {"type": "databricks", "method": "delta", "table": TABLE, **SOURCE},
            },
        ),
        env_file=tmp_path / "no.env",
    )
    assert cfg.source is not None and cfg.source.host is None and cfg.source.profile == "team"
    assert run(cfg)["rows"] == 6


def test_auth_failures(tmp_path: Path, workspace: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    workspace.tables[TABLE] = versioned_table(tmp_path / "pages")
    with pytest.raises(SourceError, match=r"not authenticated \(HTTP 401\)") as err:
        run(load(tmp_path, workspace, {**SOURCE, "method": "delta"}, token="dapi-expired-0000000000"))
    assert "dapi-expired-0000000000" not in str(err.value)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.databrickscfg
    with pytest.raises(SourceError, match="authentication is not configured"):
        run(load(tmp_path, workspace, {**SOURCE, "method": "delta"}, token=None, host=None))
    # a wrong host: nothing listens there; the SDK's bounded retries give up with one line
    with pytest.raises(SourceError, match="cannot reach the Databricks host") as err:
        run(load(tmp_path, workspace, {**SOURCE, "method": "delta", "timeout_seconds": 1}, host="http://127.0.0.1:9"))
    assert "\n" not in str(err.value)


# -- unreachable hosts ----------------------------------------------------------------------------

CPTKIT = [sys.executable, "-m", "cptkit"]
URL_TOKEN = "dapiURLTOKEN-0f9e8d7c6b5a"  # a token written into the host URL


def closed_port() -> int:
    """A loopback port nothing listens on: bound, noted, closed."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cli_config(tmp_path: Path, host: str, method: str = "statement", **source: Any) -> Path:
    return write_config(
        tmp_path / f"{method}.yaml",
        {
            "data": {"output_dir": "out"},
            "source": {
                "type": "databricks",
                "method": method,
                "table": TABLE,
                "host": host,
                "token": TOKEN,
                "warehouse_id": "wh-1",
                **source,
            },
        },
    )


def run_cli(*args: str, env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    result = subprocess.run([*CPTKIT, *args], capture_output=True, text=True, timeout=120, env=env)
    return result, time.monotonic() - started


@pytest.mark.parametrize("method", ["statement", "sql"])
@pytest.mark.parametrize("where", ["closed port", "unknown host"])
def test_an_unreachable_host_fails_fast_in_one_line(tmp_path: Path, method: str, where: str) -> None:
    """Default retry settings: a refused connection or a name that does not resolve is not retried, through
    the real CLI (the SDK's host-metadata probe and the SQL connector never get to retry it for minutes)."""
    host = "nonexistent.invalid" if where == "unknown host" else f"127.0.0.1:{closed_port()}"
    cfg = cli_config(tmp_path, f"http://cptuser:{URL_TOKEN}@{host}", method)
    for args in (["extract", "--dry-run"], ["extract"]):
        result, seconds = run_cli(*args, "-c", str(cfg))
        assert seconds < 15, (seconds, result.stderr)
        assert result.returncode == 1
        lines = result.stderr.splitlines()
        assert len(lines) == 1, result.stderr
        assert lines[0].startswith(f"error: cannot reach the Databricks host http://***@{host}")
        assert ("unknown host name" if where == "unknown host" else "Connection refused") in lines[0]
        assert "(failed after " in lines[0] and URL_TOKEN not in result.stderr + result.stdout


def test_the_sdk_host_metadata_warning_never_shows_the_url_token(tmp_path: Path) -> None:
    """The real SDK against a closed loopback port with a token in the host URL: behind a proxy, so the
    SDK itself connects (to the proxy, which refuses) and its host-metadata probe fails and warns with
    the URL. With --debug the warning and the traceback show, masked; without, one error line."""
    cfg = cli_config(tmp_path, f"http://cptuser:{URL_TOKEN}@127.0.0.1:{closed_port()}", timeout_seconds=2)
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("no_proxy", "http_proxy", "https_proxy")}
    env["HTTP_PROXY"] = f"http://127.0.0.1:{closed_port()}"

    debug, seconds = run_cli("extract", "--dry-run", "--debug", "-c", str(cfg), env=env)
    assert debug.returncode == 1 and seconds < 15, debug.stderr
    assert "Failed to fetch host metadata from http://***@127.0.0.1:" in debug.stderr  # the SDK's own warning
    assert "Traceback (most recent call last)" in debug.stderr
    quiet, seconds = run_cli("extract", "--dry-run", "-c", str(cfg), env=env)
    assert quiet.returncode == 1 and seconds < 15
    assert len(quiet.stderr.splitlines()) == 1 and "cannot reach the Databricks host" in quiet.stderr
    for output in (debug.stdout, debug.stderr, quiet.stdout, quiet.stderr):
        assert URL_TOKEN not in output and TOKEN not in output


def test_the_wall_time_in_a_final_error_includes_the_sdk_set_up(tmp_path: Path) -> None:
    """A host that accepts connections and never answers: the SDK's host-metadata probe times out inside
    its set-up, then the statement times out. The message counts both, as the clock on the wall does."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)  # connections complete in the kernel; nobody ever reads or answers
        host = f"http://127.0.0.1:{server.getsockname()[1]}"
        cfg = load_config(cli_config(tmp_path, host, timeout_seconds=2, max_retries=0), env_file=tmp_path / "no.env")
        started = time.monotonic()
        with pytest.raises(SourceError) as err:
            run(cfg)
        wall = time.monotonic() - started
    message = str(err.value)
    assert "timed out" in message.lower() and "\n" not in message
    reported = float(re.search(r"over (\d+\.\d)s", message).group(1))  # type: ignore[union-attr]
    assert reported > 0.8 * wall > 3  # the probe alone took 2 s or more


def test_refused_and_unknown_hosts_are_not_retried() -> None:
    import requests

    from cptkit.sources.databricks_client import is_transient

    def wrapped(inner: BaseException) -> BaseException:
        try:
            try:
                raise inner
            except OSError as exc:
                raise requests.ConnectionError("Max retries exceeded") from exc
        except requests.ConnectionError as outer:
            try:
                raise TimeoutError("Timed out after 0:02:00") from outer  # what the SDK raises
            except TimeoutError as sdk_error:
                return sdk_error

    assert not is_transient(wrapped(ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")))
    assert not is_transient(wrapped(socket.gaierror(socket.EAI_NONAME, "Name or service not known")))
    assert is_transient(wrapped(ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")))
    assert is_transient(wrapped(TimeoutError("read timed out")))


# -- secrets --------------------------------------------------------------------------------------


def test_no_secret_in_files_mlflow_or_output(
    tmp_path: Path, workspace: Workspace, cli: Any, monkeypatch: pytest.MonkeyPatch, tiny_tokenizer_dir: Path
) -> None:
    """A whole extract -> prepare through the CLI with a token, a token in the host URL (user:token@), an
    OAuth secret in the environment and temporary storage credentials; the config and manifests logged to
    MLflow on SQLite the way train logs them; then every file, the MLflow store and all output are searched
    for each secret."""
    from mlflow import MlflowClient

    from cptkit.config import masked_dict
    from cptkit.tracking import open_tracker

    workspace.tables[TABLE] = path = tmp_path / "pages"
    write_pages(path, [page(i, body=make_doc(i)) for i in range(12)])
    host = workspace.url.replace("http://", f"http://cptuser:{URL_TOKEN}@")
    masked_host = workspace.url.replace("http://", "http://***@")
    (tmp_path / ".env").write_text(f"DATABRICKS_HOST={host}\nDATABRICKS_TOKEN={TOKEN}\n", encoding="utf-8")
    write_config(
        tmp_path / "cfg.yaml",
        {
            "model": {"name": str(tiny_tokenizer_dir)},
            "data": {"output_dir": "data"},
            "source": {"type": "databricks", "method": "delta", "table": TABLE, **SOURCE},
            "prepare": {"split": {"val_ratio": 0.2}, "language": {"enabled": False}},
            "tracking": {"tracking_uri": "sqlite:///mlflow.db", "log_system_metrics": False},
        },
    )
    outputs = []
    runs = (["config", "show"], ["extract", "--dry-run"], ["extract"], ["prepare"], ["extract", "--debug"])
    for args in (*runs, ["--log-format", "json", "extract", "--dry-run"]):
        result = cli(*args, "--config", "cfg.yaml")
        assert result.exit_code == 0, result.output
        outputs.append(result.output)
    assert "token: '***'" in outputs[0] and f"host: {masked_host}" in outputs[0]
    assert "extract domain: 12 rows" in outputs[2]

    cfg = load_config(tmp_path / "cfg.yaml", env_file=tmp_path / ".env")
    tracker = open_tracker(cfg.tracking, None, "secrets-check")
    tracker.log_params(masked_dict(cfg))
    tracker.log_dict(masked_dict(cfg), "config.yaml")
    import json

    for name in ("data/raw/manifest.json", "data/manifest.json"):
        manifest = json.loads((tmp_path / name).read_text())
        assert manifest["source"]["host"] == masked_host
        tracker.log_dict(manifest, name)
        tracker.log_input("domain", str(manifest["input_fingerprint"]), manifest.get("source") or {}, "training", {})
    tracker.set_tags({"cptkit.source_host": host})  # the adapter masks what it is handed, too
    tracker.end()
    run_data = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(str(tracker.run_id)).data
    assert run_data.params["databricks.host"] == masked_host == run_data.tags["cptkit.source_host"]

    # failing runs print their errors too: a token the server no longer accepts, and a client secret
    # next to the token (the SDK refuses two auth methods, and its message lists the config)
    workspace.access_token = "rotated-server-token-zz"
    result = cli("extract", "--config", "cfg.yaml", "--force")
    assert result.exit_code == 1 and "not authenticated" in result.output
    outputs.append(result.output)
    monkeypatch.setenv("DATABRICKS_CLIENT_SECRET", CLIENT_SECRET)
    result = cli("extract", "--config", "cfg.yaml", "--force")
    assert result.exit_code == 1 and "more than one authorization method" in result.output
    outputs.append(result.output)

    secrets = [TOKEN, URL_TOKEN, CLIENT_SECRET, STORAGE_SECRET, "session-1-abcdef"]
    scanned = 0
    for file in tmp_path.rglob("*"):
        if file.is_file() and "pages" not in file.parts and file.name != ".env" and file.name != "cfg.yaml":
            data = file.read_bytes()
            scanned += 1
            for secret in secrets:
                assert secret.encode() not in data, f"{secret[:8]}... found in {file}"
    assert scanned > 10 and (tmp_path / "mlflow.db").is_file()
    for text in outputs:
        for secret in secrets:
            assert secret not in text


def test_watermark_timestamps_round_trip() -> None:
    from cptkit.sources.incremental import decode_value, encode_value

    for value in (dt.datetime(2024, 5, 1, 12, tzinfo=dt.UTC), dt.date(2024, 5, 1), 7, "k-9", None):
        assert decode_value(encode_value(value)) == value
