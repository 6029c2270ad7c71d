"""The Databricks source's config, the SQL warehouse path (its real query text run by DuckDB through the
same code that calls databricks-sql-connector), incremental extraction, dry runs and SQL injection."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from databricks.sql.exc import RequestError

from conftest import write_config
from cptkit.config import Config, load_config
from cptkit.datasets import SNAPSHOT, datasets
from cptkit.errors import ConfigError, SourceError
from cptkit.extract import extract
from cptkit.sources.incremental import STATE
from test_databricks_standins import (  # noqa: F401 (fixtures)
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


def load(tmp_path: Path, source: dict[str, Any], **connection: Any) -> Config:
    return load_config(
        write_config(
            tmp_path / "cfg.yaml",
            {
                "data": {"output_dir": str(tmp_path / "out")},
                "databricks": {"host": "https://adb-1.azuredatabricks.net", "token": TOKEN, **connection},
                "source": {"type": "databricks", "table": TABLE, "http_path": "/sql/1.0/warehouses/w1", **source},
            },
        ),
        env_file=tmp_path / "no.env",
    )


def run(cfg: Config, wh: DuckWarehouse, force: bool = False) -> dict[str, Any]:
    return extract(datasets(cfg)[0], force=force, connect=wh).manifest


def snapshot(cfg: Config) -> dict[str, dict[str, Any]]:
    rows = pq.read_table(cfg.data.output_dir / "raw" / SNAPSHOT).to_pylist()
    return {r["id"]: r for r in rows}


SOURCE = {"id_column": "id", "text_column": "body", "metadata_columns": ["title", "lang"]}


# -- config ---------------------------------------------------------------------------------------


def test_env_variables_fill_the_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / ".env").write_text(
        f"DATABRICKS_HOST=https://dbc-1.cloud.databricks.com\nDATABRICKS_TOKEN={TOKEN}\nDATABRICKS_CATALOG=lake\n"
        "DATABRICKS_SCHEMA=docs\nDATABRICKS_TABLE=pages\nDATABRICKS_WAREHOUSE_ID=abc123\n",
        encoding="utf-8",
    )
    cfg = load_config(None, ["source.type=databricks", "source.method=statement"], env_file=tmp_path / ".env")
    source = cfg.source
    assert source is not None and source.type == "databricks"
    assert (source.catalog, source.schema_, source.table) == ("lake", "docs", "pages")
    assert source.host == "https://dbc-1.cloud.databricks.com" and source.warehouse_id == "abc123"
    assert source.token is not None and source.token.get_secret_value() == TOKEN
    # a three-part table wins over DATABRICKS_CATALOG / SCHEMA
    cfg = load_config(None, ["source.type=databricks", "source.table=other.s.t"], env_file=tmp_path / ".env")
    assert cfg.source is not None and (cfg.source.catalog, cfg.source.schema_, cfg.source.table) == ("other", "s", "t")


def test_config_errors_are_reported_together(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load(
            tmp_path,
            {"filter": [{"column": "lang", "op": "in", "value": "en"}, {"column": "id", "op": "is null", "value": 1}]},
        )
    text = "\n".join(err.value.problems)
    assert "source.filter.0" in text and "in needs a non-empty list" in text
    assert "source.filter.1" in text and "is null takes no value" in text
    with pytest.raises(ConfigError) as err:
        load(tmp_path, {"table": "a.b", "mode": "watermark", "text_expression": "body || (SELECT 1)"})
    text = "\n".join(err.value.problems)
    assert "use table, or catalog.schema.table" in text
    assert "watermark_column" in text and "id_column" in text and "keyword SELECT" in text


@pytest.mark.parametrize(
    "settings",
    [
        {"table": "pages`; DROP TABLE `lake`.`docs`.`canary"},
        {"table": "lake.docs.pages` --"},
        {"catalog": "lake`.`docs`.`canary` --", "table": "pages"},
        {"text_column": "body` FROM `lake`.`docs`.`canary` --"},
        {"id_column": "id`, (SELECT 1) AS `x"},
        {"metadata_columns": ["title`; DROP TABLE canary; --"]},
        {"watermark_column": "updated_at` > 0 --", "mode": "watermark", "id_column": "id"},
        {"filter": [{"column": "lang` = 'en' OR 1=1 --", "value": "en"}]},
        {"text_expression": "body) FROM x; DROP TABLE canary; --"},
        {"text_expression": "concat(body, ';') /* comment */"},
        {"text_expression": "body FROM `lake`.`docs`.`canary` UNION SELECT secret"},
        {"text_expression": "'\\' || body"},
        {"text_expression": ":param"},
    ],
)
def test_injection_in_identifiers_is_refused_at_config_time(tmp_path: Path, settings: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        load(tmp_path, {"table": "pages", "catalog": "lake", "schema": "docs", **settings})


def test_injection_through_values_and_odd_names_reads_nothing_else(tmp_path: Path) -> None:
    """Values that look like SQL are bound, and names that pass validation are quoted: the canary table
    survives, no extra statement runs, and each query holds only our own text."""
    wh = DuckWarehouse({TABLE: versioned_table(tmp_path / "pages")})
    wh.con.execute('CREATE TABLE "lake"."docs"."canary" AS SELECT 1 AS x')
    attack = "en' OR '1'='1'; DROP TABLE lake.docs.canary; --"
    cfg = load(tmp_path, {**SOURCE, "filter": [{"column": "lang", "value": attack}]})
    assert run(cfg, wh)["rows"] == 0  # the whole string is one value that no row has
    cfg = load(tmp_path, {**SOURCE, "filter": [{"column": "lang", "op": "in", "value": [attack, "en"]}]})
    assert run(cfg, wh)["rows"] == 6
    for name in ("lake;DROP", "lake'--", 'lake"'):
        cfg = load(tmp_path, {**SOURCE, "catalog": name, "schema": "docs", "table": "pages"})
        with pytest.raises(SourceError, match=r"not found|does not exist"):
            run(cfg, wh)
    assert "lake.docs.canary" in wh.table_names()
    for text, params in wh.queries:
        if params:
            assert attack not in text and all(f":{k}" in text for k in params)


# -- the SQL path ---------------------------------------------------------------------------------


def test_sql_full_read_pins_the_version_and_maps_columns(tmp_path: Path) -> None:
    wh = DuckWarehouse({TABLE: versioned_table(tmp_path / "pages")})
    cfg = load(
        tmp_path,
        {
            **SOURCE,
            "text_expression": "concat_ws(chr(10), title, body)",
            "filter": [{"column": "id", "op": ">=", "value": 1}],
            "batch_size": 2,
        },
    )
    manifest = run(cfg, wh)
    assert manifest["delta_version"] == 3 and manifest["rows"] == 5
    assert manifest["query"].startswith(
        "SELECT concat_ws(chr(10), title, body) AS `text`, `id` AS `id`, `title`, `lang` FROM `lake`.`docs`.`pages` "
        "VERSION AS OF 3 WHERE (`id` >= :f0) ORDER BY `id`"
    )
    rows = snapshot(cfg)
    assert sorted(rows) == ["1", "3", "4", "5", "6"]
    assert rows["1"]["text"] == "Title 1\nBody of page 1, revised." and rows["1"]["lang"] == "en"
    assert wh.connects == 1 and wh.closed == 1
    # the same version again is up to date; a pinned older version is read as of that version
    assert extract(datasets(cfg)[0], connect=wh).skipped
    cfg = load(tmp_path, {**SOURCE, "version": 0})
    assert run(cfg, wh)["delta_version"] == 0
    assert sorted(snapshot(cfg)) == ["0", "1", "2", "3", "4"]


def test_missing_rows_are_kept_and_marked(tmp_path: Path) -> None:
    path = tmp_path / "pages"
    write_pages(path, [page(1), page(2, body=None), page(3, body="")])
    import pyarrow as pa
    from deltalake import write_deltalake

    write_deltalake(str(path), pa.table({"id": [4], "body": [None]}), mode="append", schema_mode="merge")
    cfg = load(tmp_path, {**SOURCE, "metadata_columns": []})
    assert run(cfg, DuckWarehouse({TABLE: path}))["malformed_rows"] == {"null_text": 1}
    rows = snapshot(cfg)
    assert rows["3"]["text"] == "" and rows["4"]["error"] == "null_text" and len(rows) == 4


def test_watermark_increments_across_three_extractions(tmp_path: Path) -> None:
    path = tmp_path / "pages"
    write_pages(path, [page(i, hours=0) for i in range(3)])  # three rows share one watermark: ties by id
    wh = DuckWarehouse({TABLE: path})
    cfg = load(tmp_path, {**SOURCE, "mode": "watermark", "watermark_column": "updated_at"})
    first = run(cfg, wh)
    assert first["rows"] == 3 and not first["incremental"]["applied_changes"]
    state = json.loads((cfg.data.output_dir / "raw" / STATE).read_text())
    assert (
        state["watermark"]["value"]["value"].startswith("2024-01-01T00:00:00")
        and state["watermark"]["id"]["value"] == 2
    )

    write_pages(path, [page(3, hours=0), page(1, body="Page 1 edited.", hours=2), page(4, hours=3)])
    second = run(cfg, wh)
    inc = second["incremental"]
    assert (inc["applied_changes"], inc["upserted"], inc["deleted"]) == (True, 3, 0)
    assert second["rows"] == 5  # page 1 appears twice in the table; the document is replaced by id
    assert "`updated_at` > :wm OR (`updated_at` = :wm AND `id` > :wm_id)" in second["query"]
    rows = snapshot(cfg)
    assert rows["1"]["text"] == "Page 1 edited." and sorted(rows) == ["0", "1", "2", "3", "4"]

    write_pages(path, [page(5, hours=4)])
    third = run(cfg, wh)
    assert third["incremental"]["upserted"] == 1 and third["rows"] == 6
    assert json.loads((cfg.data.output_dir / "raw" / STATE).read_text())["watermark"]["id"]["value"] == 5
    # nothing new: the version did not move, so the stage is up to date
    assert extract(datasets(cfg)[0], connect=wh).skipped


def test_cdf_increments_replace_and_delete_by_id(tmp_path: Path) -> None:
    from deltalake import DeltaTable

    path = tmp_path / "pages"
    write_pages(path, [page(i) for i in range(4)])
    wh = DuckWarehouse({TABLE: path})
    cfg = load(tmp_path, {**SOURCE, "mode": "cdf", "filter": [{"column": "lang", "value": "en"}]})
    assert run(cfg, wh)["rows"] == 4

    DeltaTable(str(path)).update(updates={"body": "'Page 1 new.'"}, predicate="id = 1")
    DeltaTable(str(path)).delete("id = 2")
    write_pages(path, [page(9)])
    second = run(cfg, wh)
    inc = second["incremental"]
    assert (inc["changes_from_version"], inc["changes_to_version"]) == (1, 3)
    assert (inc["upserted"], inc["deleted"], second["rows"], second["delta_version"]) == (2, 1, 4, 3)
    assert "FROM table_changes(:tbl, :v_from, :v_to)" in second["query"]
    rows = snapshot(cfg)
    assert sorted(rows) == ["0", "1", "3", "9"] and rows["1"]["text"] == "Page 1 new."

    # an update that leaves the filter removes the document; a delete then re-insert keeps the last
    DeltaTable(str(path)).update(updates={"lang": "'de'"}, predicate="id = 3")
    DeltaTable(str(path)).delete("id = 9")
    write_pages(path, [page(9, body="Nine again.")])
    third = run(cfg, wh)
    assert (third["incremental"]["deleted"], third["incremental"]["upserted"], third["rows"]) == (1, 1, 3)
    rows = snapshot(cfg)
    assert sorted(rows) == ["0", "1", "9"] and rows["9"]["text"] == "Nine again."

    # --force rereads the table in full and gives the same snapshot
    before = snapshot(cfg)
    forced = run(cfg, wh, force=True)
    assert not forced["incremental"]["applied_changes"] and snapshot(cfg) == before


def test_interrupted_increment_neither_loses_nor_duplicates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cptkit import extract as extract_module

    path = tmp_path / "pages"
    write_pages(path, [page(i, hours=i) for i in range(3)])
    wh = DuckWarehouse({TABLE: path})
    cfg = load(tmp_path, {**SOURCE, "mode": "watermark", "watermark_column": "updated_at", "batch_size": 1})
    run(cfg, wh)
    state_before = (cfg.data.output_dir / "raw" / STATE).read_text()
    write_pages(path, [page(3, hours=3), page(4, hours=4)])

    # killed mid-read: the old snapshot and state stay as they were
    wh.execute_errors = []
    real = extract_module._write_snapshot

    def dies(tmp: Path, batches: Any, advance: Any) -> Any:
        next(iter(batches))
        raise KeyboardInterrupt

    monkeypatch.setattr(extract_module, "_write_snapshot", dies)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, wh)
    assert sorted(snapshot(cfg)) == ["0", "1", "2"]
    assert (cfg.data.output_dir / "raw" / STATE).read_text() == state_before
    assert not list((cfg.data.output_dir / "raw").glob(".*.tmp"))

    # killed after the snapshot was replaced but before the state was saved: the rerun reapplies the
    # same increment onto the new snapshot, which changes nothing
    monkeypatch.setattr(extract_module, "_write_snapshot", real)
    monkeypatch.setattr(extract_module, "write_json_atomic", _die_on_state)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, wh)
    assert sorted(snapshot(cfg)) == ["0", "1", "2", "3", "4"]
    monkeypatch.undo()
    manifest = run(cfg, wh)
    assert manifest["incremental"]["upserted"] == 2 and manifest["rows"] == 5
    assert sorted(snapshot(cfg)) == ["0", "1", "2", "3", "4"]


def _die_on_state(path: Path, data: Any) -> None:
    if path.name == STATE:
        raise KeyboardInterrupt
    raise AssertionError("the manifest must not be written before the state")


def test_dry_run_prints_query_mapping_and_count_and_writes_nothing(
    tmp_path: Path, cli: Any, monkeypatch: pytest.MonkeyPatch, workspace: Workspace
) -> None:
    """Through the CLI and `databricks.sql.connect` itself (replaced by the DuckDB stand-in): the
    arguments cptkit gives the connector, with the token from the SDK's unified config."""
    wh = DuckWarehouse({TABLE: versioned_table(tmp_path / "pages")})
    seen: dict[str, Any] = {}

    def fake_connect(**kwargs: Any) -> DuckWarehouse:
        seen.update(kwargs)
        return wh()

    monkeypatch.setattr("databricks.sql.connect", fake_connect)
    cfg = load(tmp_path, {**SOURCE, "filter": [{"column": "lang", "value": "en"}]}, host=workspace.url)
    result = cli("extract", "--config", str(tmp_path / "cfg.yaml"), "--dry-run")
    assert result.exit_code == 0, result.output
    out = result.output
    assert "dry run, nothing written" in out and "rows: 6" in out
    assert "FROM `lake`.`docs`.`pages` VERSION AS OF 3 WHERE (`lang` = :f0)" in out and ":f0 = 'en'" in out
    assert "text <- body" in out and "id <- id" in out and "title <- title" in out
    assert not cfg.data.output_dir.exists()
    # what cptkit asks of databricks-sql-connector
    host, port = workspace.url.removeprefix("http://").split(":")
    assert (seen["server_hostname"], seen["_port"], seen["http_path"]) == (host, int(port), "/sql/1.0/warehouses/w1")
    assert seen["use_cloud_fetch"] is True
    assert seen["credentials_provider"]()() == {"Authorization": f"Bearer {TOKEN}"}
    assert TOKEN not in out


def test_stopped_warehouse_is_retried_with_backoff_and_reported(tmp_path: Path, fast_retries: list[float]) -> None:
    wh = DuckWarehouse({TABLE: versioned_table(tmp_path / "pages")})
    starting = "TEMPORARILY_UNAVAILABLE: the SQL warehouse is starting"
    wh.connect_errors = [RequestError(starting), RequestError(starting)]
    cfg = load(tmp_path, {**SOURCE})
    manifest = run(cfg, wh)
    assert manifest["rows"] == 6 and wh.connects == 3
    assert manifest["incremental"]["retries"] == 2 and manifest["incremental"]["waited_seconds"] == 3.0
    assert fast_retries == [1.0, 2.0]

    wh.connect_errors = [RequestError(starting)] * 10
    cfg = load(tmp_path, {**SOURCE, "max_retries": 2, "version": 1})
    with pytest.raises(SourceError) as err:
        run(cfg, wh)
    message = str(err.value)
    assert "not running" in message and "gave up after 3 attempt(s)" in message and "3.0s of it waiting" in message


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (
            RequestError("Error during request to server: 403 Forbidden", context={"http-code": 403}),
            "permission denied",
        ),
        (RequestError(f"HTTP 401 Unauthorized: Bearer {TOKEN}", context={"http-code": 401}), "not authenticated"),
        (RequestError("Max retries exceeded: connection refused"), "cannot reach|gave up"),
    ],
)
def test_connection_failures_are_one_clear_line(tmp_path: Path, error: Exception, expected: str) -> None:
    wh = DuckWarehouse({TABLE: versioned_table(tmp_path / "pages")})
    wh.connect_errors = [error] * 10
    cfg = load(tmp_path, {**SOURCE, "max_retries": 1})
    with pytest.raises(SourceError, match=expected) as err:
        run(cfg, wh)
    assert TOKEN not in str(err.value) and "\n" not in str(err.value)


def test_missing_table_and_column(tmp_path: Path) -> None:
    wh = DuckWarehouse({TABLE: versioned_table(tmp_path / "pages")})
    with pytest.raises(SourceError, match="not found"):
        run(load(tmp_path, {**SOURCE, "table": "lake.docs.nope"}), wh)
    with pytest.raises(SourceError, match="column"):
        run(load(tmp_path, {**SOURCE, "text_column": "content"}), wh)


def test_cli_error_is_one_line_and_exit_code(
    tmp_path: Path, cli: Any, monkeypatch: pytest.MonkeyPatch, workspace: Workspace
) -> None:
    wh = DuckWarehouse({TABLE: versioned_table(tmp_path / "pages")})
    monkeypatch.setattr("databricks.sql.connect", lambda **kw: wh())
    load(tmp_path, {**SOURCE, "text_column": "content"}, host=workspace.url)
    result = cli("extract", "--config", str(tmp_path / "cfg.yaml"))
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "column" in lines[0]


def test_missing_sql_connector_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    import databricks

    monkeypatch.setitem(sys.modules, "databricks.sql", None)
    monkeypatch.delattr(databricks, "sql", raising=False)
    cfg = load(tmp_path, {**SOURCE})
    with pytest.raises(SourceError, match="pip install databricks-sql-connector"):
        extract(datasets(cfg)[0])


# -- into the pipeline ----------------------------------------------------------------------------


def test_cptkit_run_on_a_databricks_table_trains_like_the_same_table_read_locally(
    tmp_path: Path, cli: Any, monkeypatch: pytest.MonkeyPatch, workspace: Workspace, tiny_model_dir: Path
) -> None:
    """The warehouse path feeds prepare, train and evaluate: the prepared data equals that of the same
    Delta table read as a local `type: delta` source, and `cptkit run` goes through evaluation."""
    from conftest import SMALL_EVALUATION, make_doc, write_jsonl

    table = tmp_path / "pages"
    write_pages(table, [page(i, body=make_doc(i)) for i in range(30)])
    wh = DuckWarehouse({TABLE: table})
    monkeypatch.setattr("databricks.sql.connect", lambda **kwargs: wh())
    write_jsonl(tmp_path / "general.jsonl", [{"id": f"g{i}", "text": make_doc(1000 + i)} for i in range(12)])
    write_jsonl(tmp_path / "news.jsonl", [{"text": make_doc(2000 + i)} for i in range(3)])
    columns = {"id_column": "id", "text_column": "body", "metadata_columns": ["title"]}

    def config(name: str, source: dict[str, Any]) -> Path:
        return write_config(
            tmp_path / f"{name}.yaml",
            {
                "model": {"name": str(tiny_model_dir)},
                "databricks": {"host": workspace.url, "token": TOKEN},
                "source": {**source, **columns},
                "data": {
                    "output_dir": f"{name}/data",
                    "replay_ratio": 0.25,
                    "replay": {"type": "jsonl", "path": "general.jsonl", "id_column": "id"},
                },
                "prepare": {"split": {"val_ratio": 0.2}},
                "output_dir": f"{name}/model",
                "training": {
                    "method": "lora",
                    "max_steps": 3,
                    "max_seq_length": 64,
                    "micro_batch_size": 4,
                    "eval_steps": 3,
                    "warmup_steps": 1,
                    "precision": "fp32",
                    "eval_max_sequences": 2,
                },
                "evaluate": SMALL_EVALUATION,
                "tracking": {"enabled": False},
            },
        )

    remote = config("remote", {"type": "databricks", "table": TABLE, "http_path": "/sql/1.0/warehouses/w1"})
    local = config("local", {"type": "delta", "path": str(table)})
    assert cli("run", "--config", str(local), "--until", "prepare").exit_code == 0
    result = cli("run", "--config", str(remote), "--until", "evaluate")
    assert result.exit_code == 0, result.output
    assert "run: ran extract, prepare, train, evaluate" in " ".join(result.output.split())
    for split in ("train.jsonl", "val.jsonl"):
        assert (tmp_path / "remote/data" / split).read_bytes() == (tmp_path / "local/data" / split).read_bytes()
    manifest = json.loads((tmp_path / "remote/data/raw/manifest.json").read_text())
    assert manifest["rows"] == 30 and manifest["delta_version"] == 0
    results = json.loads((tmp_path / "remote/model/evaluation/results.json").read_text())
    assert results["sets"]["domain"]["documents"] > 0 and results["cpt"]["domain"]["perplexity"] > 0
    assert TOKEN not in result.output
