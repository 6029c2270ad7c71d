"""With prepare.engine: spark, a Databricks table is read by Spark (no SQL warehouse, no credential
vending), into the same snapshot as any other reader; and with prepare.spark.remote: databricks the session
is a Databricks Connect one, authenticated like the Databricks source. The Connect module is a stand-in
that records what cptkit asks of it and returns the shared local[2] test session."""

from __future__ import annotations

import json
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from conftest import make_doc, write_config, write_jsonl
from test_databricks_standins import TOKEN, Workspace, workspace_fixture  # noqa: F401 (fixtures)
from test_spark_engine import crafted_rows, needs_spark, outputs

TABLE = "spark_catalog.default.cptkit_pages"


def rows() -> list[dict[str, Any]]:
    """Ordered by id, as the table is read; a null text, an exact duplicate and a short document."""
    out: list[dict[str, Any]] = [{"id": f"p{i:02d}", "body": make_doc(i), "team": f"t{i % 3}"} for i in range(12)]
    out += [
        {"id": "p90", "body": make_doc(4), "team": "copy"},
        {"id": "p91", "body": None, "team": "t0"},
        {"id": "p92", "body": "Too short.", "team": None},
    ]
    return out


@pytest.fixture(name="table")
def table_fixture(spark: Any, tmp_path: Path) -> Iterator[str]:
    """The rows as a catalog table of the test session, stored (unordered) under tmp_path."""
    shuffled = rows()[::-1]
    frame = spark.createDataFrame(shuffled, "id string, body string, team string").repartition(3)
    frame.write.option("path", str(tmp_path / "table")).saveAsTable(TABLE)
    yield TABLE
    spark.sql(f"DROP TABLE IF EXISTS {TABLE}")


@pytest.fixture(name="no_databricks_calls")
def no_databricks_calls_fixture(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """A warehouse connection or workspace client would fail the test: Spark must read the table."""
    calls: list[str] = []

    def refuse(what: str) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            calls.append(what)
            raise AssertionError(f"{what} was contacted")

        return call

    monkeypatch.setattr("databricks.sql.connect", refuse("databricks.sql.connect"))
    monkeypatch.setattr("databricks.sdk.WorkspaceClient", refuse("WorkspaceClient"))
    return calls


def databricks_config(path: Path, tokenizer: Path, **extra: Any) -> Path:
    source = {"type": "databricks", "table": TABLE, "id_column": "id", "text_column": "body"}
    return write_config(
        path,
        {
            "model": {"name": str(tokenizer)},
            "databricks": {"host": "https://adb-1.azuredatabricks.net", "token": TOKEN},
            "source": {**source, "metadata_columns": ["team"], **extra.pop("source", {})},
            "data": {"output_dir": "remote"},
            "prepare": {"engine": "spark", "split": {"val_ratio": 0.3}, **extra.pop("prepare", {})},
        },
    )


@needs_spark
def test_a_databricks_table_read_by_spark_prepares_like_the_same_rows_read_locally(
    spark: Any, table: str, cli: Any, tiny_tokenizer_dir: Path, no_databricks_calls: list[str]
) -> None:
    from cptkit.config import load_config
    from cptkit.datasets import datasets
    from cptkit.extract import dry_run, extract, spark_settings
    from cptkit.prepare import prepare

    cfg = databricks_config(Path("remote.yaml"), tiny_tokenizer_dir)
    # As in a notebook on a cluster (README, recipe 2): the active session reads the table.
    config = load_config(cfg)
    (dataset,) = datasets(config)
    plan = dry_run(dataset, spark=spark_settings(config)).plan
    assert (plan["method"], plan["rows"]) == ("spark", 15) and "ORDER BY `id`" in plan["query"]
    assert not extract(dataset, spark=spark_settings(config)).skipped
    assert not list(Path("remote/raw").glob(".*.tmp"))  # Spark's part files are gone
    manifest = json.loads(Path("remote/raw/manifest.json").read_text(encoding="utf-8"))
    assert manifest["source"]["method"] == "spark" and manifest["rows"] == 15
    assert "ORDER BY `id`" in manifest["query"]

    write_jsonl(Path("docs.jsonl"), rows())
    local = write_config(
        Path("local.yaml"),
        {
            "model": {"name": str(tiny_tokenizer_dir)},
            "source": {"type": "jsonl", "path": "docs.jsonl", "id_column": "id", "text_column": "body"}
            | {"metadata_columns": ["team"]},
            "data": {"output_dir": "local"},
            "prepare": {"split": {"val_ratio": 0.3}},
        },
    )
    assert cli("extract", "-c", str(local)).exit_code == 0
    snapshot = {name: pq.read_table(f"{name}/raw/documents.parquet") for name in ("remote", "local")}
    assert snapshot["remote"].to_pylist() == snapshot["local"].to_pylist()
    assert snapshot["remote"].schema.names == ["id", "text", "error", "team"]
    assert (
        manifest["content_fingerprint"]
        == json.loads(Path("local/raw/manifest.json").read_text())["content_fingerprint"]
    )

    assert not prepare(config, dataset).skipped
    assert cli("prepare", "-c", str(local)).exit_code == 0
    assert outputs(Path("remote")) == outputs(Path("local"))
    assert outputs(Path("remote"))["manifest"]["documents_kept"] == 12
    assert no_databricks_calls == []


@needs_spark
def test_a_missing_table_on_spark_is_one_line(spark: Any, cli: Any, tiny_tokenizer_dir: Path) -> None:
    cfg = databricks_config(Path("c.yaml"), tiny_tokenizer_dir, source={"table": "spark_catalog.default.nothing"})
    done = cli("extract", "-c", str(cfg))
    assert done.exit_code == 1
    line = done.output.strip()
    assert line.startswith("error: ") and "\n" not in line and "not found" in line, line
    assert "Traceback" not in done.output and "at org.apache" not in done.output


class _Builder:
    """What cptkit asks of DatabricksSession.builder, recorded."""

    def __init__(self, calls: list[tuple[str, Any]], session: Any, fail: str | None) -> None:
        self._calls, self._session, self._fail = calls, session, fail

    def sdkConfig(self, config: Any) -> _Builder:
        self._calls.append(("sdkConfig", config))
        return self

    def getOrCreate(self) -> Any:
        self._calls.append(("getOrCreate", None))
        if self._fail is not None:
            raise RuntimeError(self._fail)
        return self._session


def fake_connect(monkeypatch: pytest.MonkeyPatch, session: Any, fail: str | None = None) -> list[tuple[str, Any]]:
    calls: list[tuple[str, Any]] = []
    module = types.ModuleType("databricks.connect")
    module.DatabricksSession = types.SimpleNamespace(builder=_Builder(calls, session, fail))  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "databricks.connect", module)
    return calls


@needs_spark
def test_databricks_connect_is_authenticated_like_the_source_and_streams_the_table(
    spark: Any, table: str, cli: Any, tiny_tokenizer_dir: Path, workspace: Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = fake_connect(monkeypatch, spark)
    cfg = databricks_config(
        Path("c.yaml"),
        tiny_tokenizer_dir,
        prepare={"spark": {"remote": "databricks", "cluster_id": "0123-456789-abcdef"}},
    )
    text = Path("c.yaml").read_text(encoding="utf-8").replace("https://adb-1.azuredatabricks.net", workspace.url)
    Path("c.yaml").write_text(text, encoding="utf-8")
    done = cli("extract", "-c", str(cfg))
    assert done.exit_code == 0, done.output
    (name, sdk), _ = calls
    assert name == "sdkConfig" and (sdk.host, sdk.token, sdk.cluster_id) == (workspace.url, TOKEN, "0123-456789-abcdef")
    # Streamed over the session (the cluster's files are not this machine's): the same snapshot.
    snapshot = pq.read_table("remote/raw/documents.parquet").to_pylist()
    assert [r["id"] for r in snapshot] == [r["id"] for r in rows()]
    assert snapshot[0]["team"] == "t0" and snapshot[-2]["error"] == "null_text"

    # A failed connection is one line without the token, even where the vendor's message holds it.
    calls = fake_connect(monkeypatch, spark, fail=f"bad request: token={TOKEN}\n  at grpc")
    done = cli("extract", "-c", str(cfg), "--force")
    assert done.exit_code == 1
    assert done.output.startswith("error: prepare.spark.remote=databricks: no Databricks Connect session: bad request")
    for path in [Path("remote/raw/manifest.json"), *Path(".").rglob("*.json")]:
        assert TOKEN not in path.read_text(encoding="utf-8")
    assert TOKEN not in done.output


def test_missing_databricks_connect_is_one_line_naming_the_extra(
    monkeypatch: pytest.MonkeyPatch, cli: Any, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "databricks.connect", None)
    cfg = write_config(
        tmp_path / "c.yaml",
        {
            "databricks": {"host": "https://adb-1.azuredatabricks.net", "token": TOKEN},
            "source": {"type": "databricks", "table": "lake.docs.pages", "text_column": "body"},
            "prepare": {"engine": "spark", "spark": {"remote": "databricks", "serverless": True}},
        },
    )
    done = cli("extract", "-c", str(cfg))
    assert done.exit_code == 1
    assert done.output.strip() == (
        "error: prepare.spark.remote is databricks, but databricks-connect is not installed: "
        "pip install 'cptkit[databricks-connect]' (in an environment without pyspark, which it replaces)"
    )


def test_cluster_id_and_serverless_need_remote() -> None:
    from cptkit.config import load_config
    from cptkit.errors import ConfigError

    with pytest.raises(ConfigError, match="cluster_id and serverless are for remote: databricks"):
        load_config(None, ["prepare.spark.cluster_id=c1"])
    with pytest.raises(ConfigError, match="not both"):
        remote = ["prepare.spark.remote=databricks", "prepare.spark.serverless=true"]
        load_config(None, [*remote, "prepare.spark.cluster_id=c1"])
    spark = load_config(None, ["prepare.spark.remote=databricks", "prepare.spark.serverless=true"]).prepare.spark
    assert spark.remote == "databricks" and spark.serverless


def test_results_spark_wrote_out_of_reach_are_an_error_not_an_empty_snapshot(tmp_path: Path) -> None:
    """On a cluster, a local path can mean dbfs:/ to Spark: the driver would find no part files."""
    from cptkit.errors import SourceError
    from cptkit.secrets import Secrets
    from cptkit.sources.databricks_spark import SparkWarehouse
    from cptkit.sources.databricks_sql import Query

    written: list[str] = []
    frame = types.SimpleNamespace(write=types.SimpleNamespace(parquet=written.append))
    session = types.SimpleNamespace(sql=lambda text, args=None: frame)
    warehouse = SparkWarehouse(session, tmp_path, 100, Secrets())
    with pytest.raises(SourceError, match=r"cannot read them .*put data.output_dir under /Volumes/"):
        list(warehouse.stream(Query("SELECT 1")))
    assert len(written) == 1 and not list(tmp_path.iterdir())  # the work folder is gone


@needs_spark
def test_prepare_through_databricks_connect_sends_the_snapshot_as_data_and_writes_the_local_outputs(
    spark: Any, cli: Any, tiny_tokenizer_dir: Path, workspace: Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pyspark.sql import DataFrameReader, DataFrameWriter, SparkSession

    write_jsonl(Path("docs.jsonl"), crafted_rows())
    cfg = write_config(
        Path("c.yaml"),
        {
            "model": {"name": str(tiny_tokenizer_dir)},
            "databricks": {"host": workspace.url, "token": TOKEN},
            "source": {"type": "jsonl", "path": "docs.jsonl", "id_column": "id"},
            "data": {"output_dir": "out"},
            "prepare": {
                "max_document_bytes": 20_000,
                "chunk_size": 4,
                "shard_documents": 5,
                "split": {"val_ratio": 0.3},
                "redact": {"enabled": True},
            },
        },
    )
    assert cli("extract", "-c", str(cfg)).exit_code == 0
    assert cli("prepare", "-c", str(cfg)).exit_code == 0
    local = outputs(Path("out"))

    calls = fake_connect(monkeypatch, spark)
    # Any file path handed to the session would be one the cluster cannot read (or this machine cannot).
    paths: list[str] = []

    def spy(name: str, method: Any) -> Any:
        def call(self: Any, *args: Any, **kwargs: Any) -> Any:
            paths.append(f"{name}{args}")
            return method(self, *args, **kwargs)

        return call

    for cls, names in ((DataFrameReader, ("parquet", "load")), (DataFrameWriter, ("parquet", "save"))):
        for name in names:
            monkeypatch.setattr(cls, name, spy(f"{cls.__name__}.{name}", getattr(cls, name)))
    pieces: list[int] = []
    create = SparkSession.createDataFrame

    def counted(self: Any, data: Any, *args: Any, **kwargs: Any) -> Any:
        pieces.append(data.num_rows)
        return create(self, data, *args, **kwargs)

    monkeypatch.setattr(SparkSession, "createDataFrame", counted)
    # A small threshold: the snapshot goes up in several pieces, as a large one would.
    size = pq.read_table("out/raw/documents.parquet", columns=["id", "text", "error"]).nbytes
    spark.conf.set("spark.sql.session.localRelationCacheThreshold", str(size // 3))
    try:
        remote = ["--set", "prepare.engine=spark", "--set", "prepare.spark.remote=databricks"]
        done = cli("prepare", "-c", str(cfg), "--force", *remote, "--set", "prepare.spark.cluster_id=c-1")
    finally:
        spark.conf.unset("spark.sql.session.localRelationCacheThreshold")
    assert done.exit_code == 0, done.output
    (name, sdk), _ = calls
    assert name == "sdkConfig" and (sdk.host, sdk.token, sdk.cluster_id) == (workspace.url, TOKEN, "c-1")
    assert outputs(Path("out")) == local
    assert paths == []
    assert len(pieces) in (3, 4) and sum(pieces) == local["manifest"]["documents_in"]
    assert not list(Path("out").glob(".*.tmp"))


@needs_spark
def test_a_failed_task_through_databricks_connect_is_one_line_and_writes_nothing(
    spark: Any, tmp_path: Path, workspace: Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pyarrow as pa
    from pyspark import cloudpickle

    import test_spark_engine
    from cptkit.config import DatabricksConfig, PrepareConfig, SparkConfig
    from cptkit.engines import PrepareJob
    from cptkit.engines import spark as spark_engine
    from cptkit.errors import StageError

    fake_connect(monkeypatch, spark)
    cloudpickle.register_pickle_by_value(test_spark_engine)  # the failing processor, for Spark's workers
    texts = [make_doc(i) for i in range(6)]
    texts[4] += " BOOM"
    snapshot = tmp_path / "snapshot.parquet"
    pq.write_table(pa.table({"id": [f"d{i}" for i in range(6)], "text": texts, "error": [None] * 6}), snapshot)
    (tmp_path / "out").mkdir()
    config = PrepareConfig(tokenize=False, spark=SparkConfig(remote="databricks", cluster_id="c-1"))
    connection = DatabricksConfig(host=workspace.url, token=TOKEN)
    job = PrepareJob(snapshot, tmp_path / "out", config, None, connection=connection)
    with pytest.raises(StageError) as failed:
        spark_engine.run(job, lambda n: None, make_processor=test_spark_engine._FailsOnBoom)
    assert str(failed.value) == "prepare on Spark: document 'd4': ValueError: cannot handle this text"
    assert not list((tmp_path / "out").iterdir())
