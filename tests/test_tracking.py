"""The MLflow adapter against a real MLflow on SQLite, one database per test."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cptkit.config import Config, TrackingConfig, masked_dict
from cptkit.errors import CptkitError
from cptkit.secrets import MASK as SECRET_MASK
from cptkit.tracking import (
    MAX_PARAM_VALUE_LENGTH,
    MlflowTracker,
    NullTracker,
    Tracker,
    flatten_params,
    open_tracker,
    resolve_tracking_uri,
)

mlflow = pytest.importorskip("mlflow")
MlflowClient = mlflow.MlflowClient

TOKEN = "dapi0123456789abcdef0123456789abcdef"


@pytest.fixture(scope="session")
def template_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty, migrated MLflow database. Creating one takes seconds; copying it takes none."""
    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture(autouse=True)
def _mlflow_state(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No tracking URI from the caller's shell; the adapter leaves MLflow's active run alone."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    yield
    assert mlflow.active_run() is None
    mlflow.end_run()


@pytest.fixture
def db_uri(tmp_path: Path, template_db: Path) -> str:
    shutil.copy(template_db, tmp_path / "mlflow.db")
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def tracking(uri: str, **kwargs: Any) -> TrackingConfig:
    return TrackingConfig(tracking_uri=uri, experiment_name="cpt-test", log_system_metrics=False, **kwargs)


def config_with_secret(uri: str) -> Config:
    return Config.model_validate(
        {
            "source": {"type": "jsonl", "path": "docs.jsonl", "metadata_columns": ["team", "lang"]},
            "databricks": {"host": "https://adb-1.azuredatabricks.net", "token": TOKEN},
            "tracking": tracking(uri).model_dump(),
        }
    )


def test_a_run_records_params_metrics_artifacts_inputs_and_tags(db_uri: str, tmp_path: Path) -> None:
    config = config_with_secret(db_uri)
    tracker = open_tracker(config.tracking, None, "cpt-smoke")
    assert isinstance(tracker, MlflowTracker)
    assert tracker.run_id is not None
    tracker.log_params(masked_dict(config))
    tracker.log_metrics({"train/loss": 2.5, "train/lr": 1e-4}, step=1)
    tracker.log_metrics({"train/loss": 2.0}, step=2)
    tracker.log_dict({"steps": 2, "losses": [2.5, 2.0]}, "summary.json")
    report = tmp_path / "report.txt"
    report.write_text("all good\n", encoding="utf-8")
    tracker.log_artifact(report, "reports")
    tracker.log_input(
        "domain-train",
        "0123456789abcdef",
        {"type": "prepared", "path": "data/train"},
        "training",
        {
            "documents": 40,
            "tokens": 12345,
        },
    )
    tracker.log_input(
        "replay-train", "fedcba9876543210", {"type": "prepared", "path": "data/replay"}, "training", {"documents": 10}
    )
    tracker.log_input("domain-val", "a" * 64, {"path": "data/val"}, "validation", {"documents": 8})
    tracker.set_tags({"cptkit.stage": "train", "cptkit.model": "tiny"})
    tracker.end()
    assert "MLFLOW_TRACKING_URI" not in os.environ  # no process-wide tracking URI was set

    client = MlflowClient(tracking_uri=db_uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "cpt-smoke"
    assert client.get_experiment(run.info.experiment_id).name == "cpt-test"
    params = run.data.params
    assert params["training.learning_rate"] == "2e-05"
    assert params["training.lora.r"] == "16"
    assert params["training.lora.target_modules"] == "all-linear"
    assert params["model.tokenizer"] == "None"
    assert params["prepare.tokenize"] == "True"  # a word that merely starts with "token" is no secret
    assert params["source.metadata_columns"] == '["team", "lang"]'
    assert params["databricks.token"] == SECRET_MASK
    assert params["tracking.experiment_name"] == "cpt-test"
    assert params.keys() == flatten_params(masked_dict(config)).keys()

    history = {
        key: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]
        for key in ("train/loss", "train/lr")
    }
    assert history == {"train/loss": [(1, 2.5), (2, 2.0)], "train/lr": [(1, 1e-4)]}

    assert sorted(a.path for a in client.list_artifacts(run.info.run_id)) == ["reports", "summary.json"]
    assert [a.path for a in client.list_artifacts(run.info.run_id, "reports")] == ["reports/report.txt"]
    local = Path(client.download_artifacts(run.info.run_id, "summary.json", str(tmp_path)))
    assert json.loads(local.read_text()) == {"steps": 2, "losses": [2.5, 2.0]}

    inputs = {i.dataset.name: i for i in run.inputs.dataset_inputs}
    assert sorted(inputs) == ["domain-train", "domain-val", "replay-train"]
    train = inputs["domain-train"]
    assert train.dataset.digest == "0123456789abcdef"
    assert train.dataset.source_type == "prepared"
    assert json.loads(train.dataset.source) == {"type": "prepared", "path": "data/train"}
    assert json.loads(train.dataset.profile) == {"documents": 40, "tokens": 12345}
    assert {t.key: t.value for t in train.tags} == {"mlflow.data.context": "training"}
    assert inputs["domain-val"].dataset.digest == "a" * 36  # MLflow's digest limit
    assert inputs["domain-val"].dataset.source_type == "cptkit"
    assert {t.key: t.value for t in inputs["domain-val"].tags} == {"mlflow.data.context": "validation"}

    assert run.data.tags["cptkit.stage"] == "train"
    assert run.data.tags["cptkit.model"] == "tiny"
    assert run.data.tags["mlflow.runName"] == "cpt-smoke"


def test_resuming_continues_the_same_run(db_uri: str, caplog: pytest.LogCaptureFixture) -> None:
    config = tracking(db_uri)
    params = {"training": {"learning_rate": 1e-4, "max_steps": 4}, "model": {"name": "tiny"}}
    first = open_tracker(config, None, "cpt-resume")
    first.log_params(params)
    first.log_input("domain-train", "0123456789abcdef", {"path": "data/train"}, "training", {"documents": 4})
    first.log_metrics({"train/loss": 3.0}, step=1)
    first.log_metrics({"train/loss": 2.5}, step=2)
    first.end("KILLED")
    assert MlflowClient(tracking_uri=db_uri).get_run(first.run_id).info.status == "KILLED"

    second = open_tracker(config, first.run_id, "another-name")
    assert second.run_id == first.run_id
    client = MlflowClient(tracking_uri=db_uri)
    assert client.get_run(first.run_id).info.status == "RUNNING"
    second.log_params(params)  # identical values: nothing to log, no error
    with caplog.at_level(logging.WARNING, logger="cptkit.tracking"):
        second.log_params({**params, "training": {"learning_rate": 1e-4, "max_steps": 8}})
    assert "training.max_steps" in caplog.text
    second.log_input("domain-train", "0123456789abcdef", {"path": "data/train"}, "training", {"documents": 4})
    second.log_metrics({"train/loss": 2.0}, step=3)
    second.end()

    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "cpt-resume"
    assert run.data.params == {"training.learning_rate": "0.0001", "training.max_steps": "4", "model.name": "tiny"}
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(1, 3.0), (2, 2.5), (3, 2.0)]
    assert [i.dataset.name for i in run.inputs.dataset_inputs] == ["domain-train"]
    runs = client.search_runs([run.info.experiment_id])
    assert [r.info.run_id for r in runs] == [first.run_id]


def test_resuming_a_missing_run_says_so(db_uri: str) -> None:
    with pytest.raises(CptkitError, match=r"cannot resume MLflow run 0123456789abcdef0123456789abcdef") as err:
        open_tracker(tracking(db_uri), "0123456789abcdef0123456789abcdef", "cpt")
    assert db_uri in str(err.value)
    assert "\n" not in str(err.value)


def test_secrets_never_reach_mlflow(db_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABRICKS_TOKEN", TOKEN)
    config = config_with_secret(db_uri)
    tracker = open_tracker(config.tracking, None, "cpt-secret")
    tracker.log_params(masked_dict(config))
    # The adapter masks by itself too: raw secrets under secret keys, and the token's value anywhere.
    tracker.log_params({"raw": {"databricks": {"token": TOKEN}, "note": f"uses {TOKEN}", "hosts": [TOKEN]}})
    tracker.set_tags({"auth_token": TOKEN, "note": f"token={TOKEN}"})
    tracker.log_dict(
        {"databricks": {"host": "h", "token": TOKEN, "client_secret": "s3cr3t-value"}, "log": [f"Bearer {TOKEN}"]},
        "config.yaml",
    )
    tracker.log_input("domain-train", "0123", {"uri": f"https://h/x?token={TOKEN}", "password": "pw"}, "training", {})
    tracker.end()

    client = MlflowClient(tracking_uri=db_uri)
    run = client.get_run(tracker.run_id)
    assert run.data.params["databricks.token"] == SECRET_MASK
    assert run.data.params["raw.databricks.token"] == SECRET_MASK
    assert run.data.params["raw.note"] == f"uses {SECRET_MASK}"
    assert run.data.tags["auth_token"] == SECRET_MASK
    assert run.data.tags["note"] == f"token={SECRET_MASK}"
    dumped = Path(client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path / "dl"))).read_text()
    assert "s3cr3t-value" not in dumped
    assert json.loads(run.inputs.dataset_inputs[0].dataset.source)["password"] == SECRET_MASK

    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "mlflow.db" for p in files)
    assert any("mlruns" in p.parts for p in files)  # the artifact store
    leaks = [p for p in files if TOKEN.encode() in p.read_bytes()]
    assert leaks == []


def test_null_tracker_accepts_every_call(tmp_path: Path) -> None:
    tracker: Tracker = open_tracker(TrackingConfig(enabled=False), None, "off")
    assert isinstance(tracker, NullTracker)
    assert tracker.run_id is None
    tracker.log_params({"a": {"b": 1}})
    tracker.log_metrics({"train/loss": 1.0}, step=1)
    tracker.log_dict({"a": 1}, "a.json")
    tracker.log_artifact(tmp_path / "missing.txt", "x")
    tracker.log_input("domain-train", "f", {}, "training", {})
    tracker.set_tags({"a": "b"})
    tracker.end("FAILED")
    assert list(tmp_path.iterdir()) == []


def test_an_unreachable_tracking_server_is_one_line_quickly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    start = time.monotonic()
    with pytest.raises(CptkitError) as err:
        open_tracker(tracking("http://user:pw@127.0.0.1:9"), None, "cpt")
    assert time.monotonic() - start < 15
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("MLflow tracking at http://***@127.0.0.1:9: cannot open the tracking store:")
    assert "pw" not in message


def closed_port() -> int:
    """A loopback port nothing listens on: bound, noted, closed."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def read_only_folder(tmp_path: Path) -> Path:
    """A folder no file can be created in: one without write permission, or, for root (whom permission
    bits do not stop), /proc."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        (folder / "probe").touch()
    except PermissionError:
        return folder
    return Path("/proc")


@pytest.fixture
def mlflow_default_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in list(os.environ):
        if var.startswith("MLFLOW_HTTP_REQUEST_"):
            monkeypatch.delenv(var)


@pytest.mark.usefixtures("mlflow_default_retries")
@pytest.mark.parametrize("host", ["closed port", "nonexistent.invalid"])
def test_an_unreachable_tracking_server_fails_fast_with_default_retries(host: str) -> None:
    """MLflow retries a refused connection or an unknown host for about 2 minutes by default."""
    netloc = f"127.0.0.1:{closed_port()}" if host == "closed port" else host
    start = time.monotonic()
    with pytest.raises(CptkitError) as err:
        open_tracker(tracking(f"http://user:{TOKEN}@{netloc}"), None, "cpt")
    assert time.monotonic() - start < 15
    message = str(err.value)
    assert message.startswith(f"MLflow tracking at http://***@{netloc}: cannot open the tracking store:")
    assert ("unknown host name" if host != "closed port" else "Connection refused") in message
    assert "\n" not in message and TOKEN not in message


def test_a_sqlite_store_in_a_read_only_folder_fails_fast(tmp_path: Path) -> None:
    """MLflow retries creating its engine 10 times (about 100 s) when SQLite cannot write."""
    uri = f"sqlite:///{read_only_folder(tmp_path) / 'mlflow.db'}"
    start = time.monotonic()
    with pytest.raises(CptkitError) as err:
        open_tracker(tracking(uri), None, "cpt")
    assert time.monotonic() - start < 15
    assert str(err.value).startswith(f"MLflow tracking at {uri}: cannot open the tracking store: ")
    assert "\n" not in str(err.value)


def test_a_file_that_is_no_database_fails_fast(tmp_path: Path) -> None:
    (tmp_path / "mlflow.db").write_bytes(b"not a database, just text " * 100)
    start = time.monotonic()
    with pytest.raises(CptkitError, match="file is not a database"):
        open_tracker(tracking(f"sqlite:///{tmp_path / 'mlflow.db'}"), None, "cpt")
    assert time.monotonic() - start < 15


def test_an_unusable_sqlite_path_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("not a folder", encoding="utf-8")
    uri = f"sqlite:///{tmp_path / 'a-file' / 'mlflow.db'}"
    with pytest.raises(CptkitError) as err:
        open_tracker(tracking(uri), None, "cpt")
    assert str(err.value).startswith(f"MLflow tracking at {uri}: cannot open the tracking store:")
    assert "\n" not in str(err.value)


def test_the_environment_tracking_uri_wins(db_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", db_uri)
    tracker = open_tracker(tracking("sqlite:///configured.db"), None, "cpt-env")
    assert isinstance(tracker, MlflowTracker)
    assert tracker.tracking_uri == db_uri
    tracker.end()
    assert MlflowClient(tracking_uri=db_uri).get_run(tracker.run_id).info.status == "FINISHED"
    assert not (tmp_path / "configured.db").exists()


def test_tracking_uris_are_resolved(tmp_path: Path) -> None:
    assert resolve_tracking_uri("sqlite:///mlflow.db", {}) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert resolve_tracking_uri("runs/mlflow.db", {}) == f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    assert resolve_tracking_uri(str(tmp_path), {}) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert resolve_tracking_uri("sqlite:////abs/m.db?timeout=20", {}) == "sqlite:////abs/m.db?timeout=20"
    assert resolve_tracking_uri("databricks", {}) == "databricks"
    assert resolve_tracking_uri("https://mlflow.example.com", {}) == "https://mlflow.example.com"
    assert resolve_tracking_uri("sqlite:///mlflow.db", {"MLFLOW_TRACKING_URI": "databricks"}) == "databricks"


def test_params_are_flat_masked_and_truncated() -> None:
    flat = flatten_params(
        {
            "training": {"learning_rate": 2e-5, "lora": {"r": 8, "target_modules": ["q_proj", "v_proj"]}},
            "source": {"storage_options": {"AWS_SECRET_ACCESS_KEY": "x"}, "extra": {}, "weird": {"a=b": 1}},
            "databricks": {"token": "dapi-raw", "host": None},
            "long": "x" * 10_000,
        }
    )
    assert flat == {
        "training.learning_rate": "2e-05",
        "training.lora.r": "8",
        "training.lora.target_modules": '["q_proj", "v_proj"]',
        "source.storage_options": SECRET_MASK,
        "source.extra": "{}",
        "source.weird": '{"a=b": 1}',
        "databricks.token": SECRET_MASK,
        "databricks.host": "None",
        "long": "x" * (MAX_PARAM_VALUE_LENGTH - 3) + "...",
    }


def test_system_metrics_are_logged_and_stop_at_end(db_uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    tracker = open_tracker(tracking(db_uri).model_copy(update={"log_system_metrics": True}), None, "cpt-sys")
    assert any(t.name == "SystemMetricsMonitor" for t in threading.enumerate())
    time.sleep(1.0)
    tracker.end()
    assert not any(t.name == "SystemMetricsMonitor" for t in threading.enumerate())
    run = MlflowClient(tracking_uri=db_uri).get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert "system/cpu_utilization_percentage" in run.data.metrics
    assert "system/system_memory_usage_megabytes" in run.data.metrics
