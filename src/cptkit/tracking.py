"""Experiment tracking: the one module that talks to MLflow.

The training loop logs through the small `Tracker` interface and never asks whether tracking is on:
`open_tracker` returns a `NullTracker` when it is off. The MLflow adapter works through an
`MlflowClient` bound to one tracking URI (no process-wide active run or tracking URI), masks secrets
before anything leaves the process, and turns vendor errors into `CptkitError`.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import time
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

from pydantic import SecretStr

from cptkit import network
from cptkit.errors import CptkitError
from cptkit.secrets import MASK, Secrets, env_secrets, is_secret_key, mask_data, mask_url

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from cptkit.config import TrackingConfig

log = logging.getLogger(__name__)

# MLflow's limits (mlflow.utils.validation); values beyond them are truncated here rather than by
# the server, which may reject them instead.
MAX_PARAM_VALUE_LENGTH = 6000
MAX_TAG_VALUE_LENGTH = 8000
MAX_DATASET_DIGEST_LENGTH = 36
RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")

# Characters MLflow accepts in param and tag names; a mapping with other keys is logged as JSON.
_VALID_KEY = re.compile(r"^[\w\-. /]+$")


class Tracker(Protocol):
    """What the training loop logs. Implementations: `MlflowTracker`, and `NullTracker` when off."""

    run_id: str | None

    def log_params(self, params: Mapping[str, Any]) -> None: ...

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...

    def log_dict(self, data: Mapping[str, Any], artifact_file: str) -> None: ...

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None: ...

    def log_input(
        self, name: str, fingerprint: str, source: Mapping[str, Any], context: str, counts: Mapping[str, Any]
    ) -> None: ...

    def set_tags(self, tags: Mapping[str, str]) -> None: ...

    def end(self, status: str = "FINISHED") -> None: ...


class NullTracker:
    """Tracking is off: every call does nothing."""

    def __init__(self) -> None:
        self.run_id: str | None = None

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def log_dict(self, data: Mapping[str, Any], artifact_file: str) -> None:
        pass

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        pass

    def log_input(
        self, name: str, fingerprint: str, source: Mapping[str, Any], context: str, counts: Mapping[str, Any]
    ) -> None:
        pass

    def set_tags(self, tags: Mapping[str, str]) -> None:
        pass

    def end(self, status: str = "FINISHED") -> None:
        pass


# ---------------------------------------------------------------------------------------------------
# Pure helpers: URIs, secrets, params.


def resolve_tracking_uri(configured: str, env: Mapping[str, str]) -> str:
    """The tracking URI to use: MLFLOW_TRACKING_URI wins over the config. A plain path becomes a
    `sqlite:///` URI (a folder gets `mlflow.db` inside it), and a relative SQLite path is made absolute
    so that the store does not move with the working directory."""
    uri = (env.get("MLFLOW_TRACKING_URI") or configured).strip()
    scheme = urlsplit(uri).scheme
    if uri in ("databricks", "databricks-uc"):  # a workspace, credentials from the environment or ~/.databrickscfg
        return uri
    if len(scheme) <= 1:  # no scheme, or a Windows drive letter
        path = Path(uri).expanduser()
        if path.is_dir():
            path = path / "mlflow.db"
        return "sqlite:///" + path.resolve().as_posix()
    if scheme == "sqlite" and uri.startswith("sqlite:///"):
        rest = uri.removeprefix("sqlite:///")
        db_path, sep, query = rest.partition("?")
        if db_path and db_path != ":memory:" and not Path(db_path).is_absolute():
            return f"sqlite:///{Path(db_path).resolve().as_posix()}{sep}{query}"
    return uri


def check_tracking(config: TrackingConfig, env: Mapping[str, str] | None = None) -> None:
    """`check_store` for the configured tracking store, when tracking is on: run before a stage loads a
    model, so that an unusable store is reported in seconds, not after the model has loaded."""
    if config.enabled:
        check_store(resolve_tracking_uri(config.tracking_uri, os.environ if env is None else env))


def check_store(uri: str) -> None:
    """Fail at once, in one line, where MLflow would retry for minutes: a tracking server that refuses
    connections or whose name does not resolve (MLflow retries HTTP requests about 2 minutes), and a
    SQLite database that cannot be written (MLflow retries creating its engine 10 times, about 100 s)."""
    scheme = urlsplit(uri).scheme
    if scheme in ("http", "https"):
        reason = network.unreachable(uri)
        if reason is not None:
            raise CptkitError(f"MLflow tracking at {mask_url(uri)}: cannot open the tracking store: {reason}")
    elif scheme == "sqlite" and uri.startswith("sqlite:///"):
        path = uri.removeprefix("sqlite:///").partition("?")[0]
        if path and path != ":memory:":
            problem = sqlite_write_problem(Path(path))
            if problem is not None:
                raise CptkitError(f"MLflow tracking at {uri}: cannot open the tracking store: {problem}")


def sqlite_write_problem(path: Path) -> str | None:
    """Why the SQLite database at `path` cannot be written, or None. A write is tried and rolled back, so
    a read-only folder (where SQLite cannot create its journal) and a file that is no database are found
    too. A missing folder is left to MLflow, which creates it."""
    import sqlite3
    from urllib.parse import quote

    if not path.parent.is_dir():
        return None
    try:
        con = sqlite3.connect(f"file:{quote(str(path))}?mode=rwc", uri=True, timeout=5, isolation_level=None)
    except sqlite3.Error as exc:
        return f"{path}: {exc} (is its folder writable?)"
    try:
        con.execute("BEGIN IMMEDIATE")
        con.execute("CREATE TABLE cptkit_write_check (x)")
        con.execute("ROLLBACK")
    except sqlite3.OperationalError as exc:
        if "locked" in str(exc) or "busy" in str(exc):
            return None  # another process is writing: MLflow waits for it
        return f"{path}: {exc} (is it and its folder writable?)"
    except sqlite3.Error as exc:
        return f"{path}: {exc}"
    finally:
        con.close()
    return None


def flatten_params(params: Mapping[str, Any]) -> dict[str, str]:
    """MLflow params from a nested mapping (e.g. `masked_dict(config)`): dotted keys
    (`training.learning_rate`), lists and odd mappings as JSON, secrets masked, values truncated to
    MLflow's limit."""
    flat: dict[str, str] = {}
    _flatten(params, "", flat)
    return {k: truncate(v, MAX_PARAM_VALUE_LENGTH) for k, v in flat.items()}


def _flatten(value: Mapping[str, Any], prefix: str, out: dict[str, str]) -> None:
    for raw_key, item in value.items():
        key = f"{prefix}{raw_key}"
        if is_secret_key(str(raw_key)) or isinstance(item, SecretStr):
            out[key] = MASK
        elif isinstance(item, Mapping) and item and all(_VALID_KEY.match(str(k)) for k in item):
            _flatten(item, f"{key}.", out)
        elif isinstance(item, Mapping | list | tuple):
            out[key] = json.dumps(mask_data(item), sort_keys=True, default=str)
        else:
            out[key] = str(item)


def truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------------------
# The MLflow adapter.


def open_tracker(config: TrackingConfig, run_id: str | None, run_name: str) -> Tracker:
    """The tracker for a training run: a `NullTracker` when tracking is off, else an MLflow run
    (a new one, or the run `run_id` continued when training resumes)."""
    if not config.enabled:
        return NullTracker()
    return MlflowTracker.open(config, run_id, run_name, os.environ)


class MlflowTracker:
    """Logs one MLflow run through a client bound to one tracking URI."""

    def __init__(
        self,
        client: MlflowClient,
        tracking_uri: str,
        run_id: str,
        secrets: Secrets,
        system_metrics: Any | None = None,
    ) -> None:
        self.run_id: str | None = run_id
        self.tracking_uri = tracking_uri
        self._run_id = run_id
        self._client = client
        self._secrets = secrets
        self._system_metrics = system_metrics
        self._ended = False

    @classmethod
    def open(cls, config: TrackingConfig, run_id: str | None, run_name: str, env: Mapping[str, str]) -> MlflowTracker:
        if importlib.util.find_spec("mlflow") is None:
            raise CptkitError("tracking.enabled is true but mlflow is not installed: pip install mlflow")
        from mlflow import MlflowClient

        uri = resolve_tracking_uri(config.tracking_uri, env)
        secrets = Secrets(env_secrets(env))
        check_store(uri)
        with vendor_errors(uri, "open the tracking store", secrets):
            client = MlflowClient(tracking_uri=uri)  # builds the store: connects, creates or migrates a database
            if run_id is None:
                run_id = create_run(client, uri, config.experiment_name, secrets.scrub(run_name))
                resumed = False
            else:
                _continue_run(client, uri, run_id)
                resumed = True
        monitor = _start_system_metrics(uri, run_id, resumed) if config.log_system_metrics else None
        return cls(client, uri, run_id, secrets, monitor)

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        flat = {k: self._secrets.scrub(v) for k, v in flatten_params(params).items()}
        with self._errors("log params"):
            # A resumed run already holds its params, and MLflow refuses to change one.
            logged = self._client.get_run(self._run_id).data.params
            changed = sorted(k for k, v in flat.items() if k in logged and logged[k] != v)
            if changed:
                log.warning("MLflow params keep their first value on resume; not logging the new %s", changed)
            new = [Param(k, v) for k, v in flat.items() if k not in logged]
            if new:
                self._client.log_batch(self._run_id, params=new)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(key, float(value), now, step) for key, value in metrics.items()]
        with self._errors("log metrics"):
            self._client.log_batch(self._run_id, metrics=batch)

    def log_dict(self, data: Mapping[str, Any], artifact_file: str) -> None:
        """Write `data` as a JSON (or, for a .yaml/.yml name, YAML) artifact."""
        with self._errors(f"log {artifact_file}"):
            self._client.log_dict(self._run_id, mask_data(data, self._secrets), artifact_file)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Upload a file, or a folder's contents, under `artifact_path`."""
        if not path.exists():
            raise CptkitError(f"cannot log {path} to MLflow: it does not exist")
        with self._errors(f"log artifact {path}"):
            if path.is_dir():
                self._client.log_artifacts(self._run_id, str(path), artifact_path)
            else:
                self._client.log_artifact(self._run_id, str(path), artifact_path)

    def log_input(
        self, name: str, fingerprint: str, source: Mapping[str, Any], context: str, counts: Mapping[str, Any]
    ) -> None:
        """Record a dataset the run used: `name` and `fingerprint` (the digest) identify it, `source`
        says where it came from (its `type` key, if any, becomes the source type), `context` is
        training or validation, and `counts` become the dataset profile."""
        from mlflow.entities import Dataset, DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        source_data = mask_data(source, self._secrets)
        dataset = Dataset(
            name=self._secrets.scrub(name),
            digest=fingerprint[:MAX_DATASET_DIGEST_LENGTH],
            source_type=str(source_data.get("type", "cptkit")),
            source=json.dumps(source_data, sort_keys=True, default=str),
            profile=json.dumps(mask_data(counts, self._secrets), sort_keys=True, default=str),
        )
        dataset_input = DatasetInput(dataset, tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])
        with self._errors(f"log input {name}"):
            self._client.log_inputs(self._run_id, datasets=[dataset_input])

    def set_tags(self, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        masked = mask_data(dict(tags), self._secrets)
        batch = [RunTag(k, truncate(str(v), MAX_TAG_VALUE_LENGTH)) for k, v in masked.items()]
        with self._errors("set tags"):
            self._client.log_batch(self._run_id, tags=batch)

    def end(self, status: str = "FINISHED") -> None:
        """Stop system metrics and mark the run ended. A second call does nothing."""
        if status not in RUN_STATUSES:
            raise ValueError(f"run status must be one of {RUN_STATUSES}, got {status!r}")
        if self._ended:
            return
        self._ended = True
        if self._system_metrics is not None:
            # Stopped first, so its last samples land while the run is still RUNNING.
            self._system_metrics.finish()
            self._system_metrics = None
        with self._errors("end the run"):
            self._client.set_terminated(self._run_id, status)

    def _errors(self, action: str) -> AbstractContextManager[None]:
        return vendor_errors(self.tracking_uri, action, self._secrets)


def create_run(client: MlflowClient, uri: str, experiment_name: str, run_name: str) -> str:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking.context.registry import resolve_tags
    from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME

    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        try:
            experiment_id = client.create_experiment(experiment_name)
        except MlflowException as exc:
            # Another process may have created it in the meantime.
            experiment = client.get_experiment_by_name(experiment_name)
            if experiment is None:
                raise exc from None
            experiment_id = experiment.experiment_id
    elif experiment.lifecycle_stage == "deleted":
        raise CptkitError(
            f"MLflow experiment {experiment_name!r} at {mask_url(uri)} is deleted: restore it "
            f"(mlflow experiments restore) or set another tracking.experiment_name"
        )
    else:
        experiment_id = experiment.experiment_id
    # The same context tags (user, source, git commit) as mlflow.start_run would set; a git remote's URL
    # can carry a token (https://user:token@host/repo.git).
    tags = mask_data(resolve_tags({MLFLOW_RUN_NAME: run_name}))
    run = client.create_run(experiment_id, tags=tags, run_name=run_name)
    return str(run.info.run_id)


def _continue_run(client: MlflowClient, uri: str, run_id: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise CptkitError(
                f"cannot resume MLflow run {run_id}: no such run at {mask_url(uri)} "
                f"(deleted, or another tracking store?)"
            ) from None
        raise
    if run.info.lifecycle_stage == "deleted":
        raise CptkitError(f"cannot resume MLflow run {run_id} at {mask_url(uri)}: the run is deleted")
    client.update_run(run_id, status="RUNNING")


def _start_system_metrics(uri: str, run_id: str, resumed: bool) -> Any | None:
    if importlib.util.find_spec("psutil") is None:
        log.warning("tracking.log_system_metrics needs psutil (pip install psutil); not logging system metrics")
        return None
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    # What mlflow.start_run(log_system_metrics=True) starts, bound to this URI rather than the global one;
    # a resumed run continues the system/ metric steps where they stopped.
    monitor = SystemMetricsMonitor(run_id, resume_logging=resumed, tracking_uri=uri)  # type: ignore[no-untyped-call]
    monitor.start()  # type: ignore[no-untyped-call]
    return monitor


def _is_vendor_error(exc: BaseException) -> bool:
    from mlflow.exceptions import MlflowException

    vendor_modules = ("sqlalchemy", "alembic", "requests", "urllib3", "databricks", "google", "botocore", "azure")
    return isinstance(exc, MlflowException | OSError) or type(exc).__module__.startswith(vendor_modules)


@contextmanager
def vendor_errors(uri: str, action: str, secrets: Secrets) -> Iterator[None]:
    """Turn an MLflow, database, network or file error into one CptkitError line that names the URI."""
    try:
        yield
    except CptkitError:
        raise
    except Exception as exc:
        if not _is_vendor_error(exc):
            raise
        raise CptkitError(f"MLflow tracking at {mask_url(uri)}: cannot {action}: {_reason(exc, secrets)}") from exc


def _reason(exc: BaseException, secrets: Secrets) -> str:
    """The most telling line of a vendor error: the innermost OS error (a refused connection, a
    missing folder) when there is one, else the error's own first line."""
    chosen, seen = exc, set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, OSError) and str(cause):
            chosen = cause
        cause = cause.__cause__ or cause.__context__
    lines = [line.strip() for line in str(chosen).splitlines() if line.strip()]
    text = lines[0] if lines else type(chosen).__name__
    return truncate(secrets.scrub(" ".join(text.split())), 300)
