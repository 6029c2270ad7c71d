"""The model registry: the one module besides `tracking` that talks to MLflow.

It logs a transformers model to a run, registers it as a version, moves aliases, reads and writes
version tags, and loads a version back. `register` decides what to log and whether to promote; this
module only carries it out, with MLflow's errors turned into `CptkitError` lines.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cptkit.errors import CptkitError
from cptkit.secrets import Secrets, env_secrets, mask_data, mask_url
from cptkit.tracking import (
    MAX_TAG_VALUE_LENGTH,
    check_store,
    create_run,
    resolve_tracking_uri,
    truncate,
    vendor_errors,
)

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from cptkit.config import RegisterConfig, TrackingConfig

log = logging.getLogger(__name__)

UNITY_CATALOG = "databricks-uc"
MODEL_ARTIFACT = "model"
# The aliases register moves: every registered version that round-trips, and the one that passed the gate.
CHALLENGER = "challenger"
CHAMPION = "champion"
# Packages a registered model needs to load; their versions are the ones that trained it.
_RUNTIME_PACKAGES = ("torch", "transformers", "accelerate", "safetensors", "tokenizers", "sentencepiece")


@dataclass(frozen=True)
class LoggedModel:
    model_uri: str  # models:/m-... in MLflow 3
    model_id: str | None
    run_id: str


def resolve_registry_uri(configured: str | None, env: Mapping[str, str]) -> str | None:
    """MLFLOW_REGISTRY_URI wins over register.registry_uri; None means the tracking store's own registry."""
    return env.get("MLFLOW_REGISTRY_URI") or configured or None


def check_model_name(name: str, registry_uri: str | None) -> None:
    """Unity Catalog names models catalog.schema.model; the workspace and local registries take one name."""
    if registry_uri == UNITY_CATALOG:
        parts = name.split(".")
        if len(parts) != 3 or not all(parts):
            raise CptkitError(
                f"tracking.registered_model_name: {name!r} must be catalog.schema.model for Unity Catalog "
                f"(register.registry_uri: {UNITY_CATALOG})"
            )


class Registry:
    """An MLflow tracking store and its model registry, bound to explicit URIs (no process-wide state
    except while `mlflow.transformers` runs, which only works through the fluent API)."""

    def __init__(self, client: MlflowClient, tracking_uri: str, registry_uri: str | None, secrets: Secrets):
        self.client = client
        self.tracking_uri = tracking_uri
        self.registry_uri = registry_uri
        self._secrets = secrets

    @classmethod
    def open(cls, tracking: TrackingConfig, register: RegisterConfig, env: Mapping[str, str] | None = None) -> Registry:
        from mlflow import MlflowClient

        env = os.environ if env is None else env
        uri = resolve_tracking_uri(tracking.tracking_uri, env)
        registry_uri = resolve_registry_uri(register.registry_uri, env)
        check_model_name(tracking.registered_model_name, registry_uri)
        secrets = Secrets(env_secrets(env))
        for store in dict.fromkeys([uri, registry_uri or uri]):
            check_store(store)
        with vendor_errors(uri, "open the tracking store", secrets):
            # Explicit: left None, MLflow would take the process-wide default, not this store's registry.
            client = MlflowClient(tracking_uri=uri, registry_uri=registry_uri or uri)
        return cls(client, uri, registry_uri, secrets)

    def where(self) -> str:
        return mask_url(self.registry_uri or self.tracking_uri)

    # ------------------------------------------------------------ logging and registering

    def log_transformers_model(
        self,
        run_id: str | None,
        experiment_name: str,
        model: Any,
        tokenizer: Any,
        *,
        base_model_path: str | None,
        pip_requirements: list[str],
        metadata: dict[str, Any],
        input_example: tuple[list[str], dict[str, Any]],
    ) -> LoggedModel:
        """Log `model` (a transformers model, or a peft model whose base is referenced by
        `base_model_path`) to run `run_id` (a new run when None) with the transformers flavor."""
        import mlflow

        with self._errors("log the model"), self._bound():
            if run_id is None:
                run_id = create_run(self.client, self.tracking_uri, experiment_name, "register")
            with mlflow.start_run(run_id=run_id):
                info = mlflow.transformers.log_model(
                    transformers_model={"model": model, "tokenizer": tokenizer},
                    name=MODEL_ARTIFACT,
                    task="text-generation",
                    # Without it, a peft model whose base is a local folder is logged with a reference
                    # that does not load the weights it was trained on.
                    base_model_path=base_model_path,
                    # Explicit, so MLflow neither infers them (importing torchvision) nor drifts from
                    # the versions that trained the model.
                    pip_requirements=pip_requirements,
                    input_example=input_example,
                    metadata=mask_data(metadata, self._secrets),
                )
        return LoggedModel(str(info.model_uri), getattr(info, "model_id", None), run_id)

    def mark_failed(self, logged: LoggedModel) -> None:
        """Set a logged model's status to FAILED (MLflow 3 logged models; nothing to do without an id). A
        failure here is logged, not raised: it must not hide the error that made the attempt fail."""
        if logged.model_id is None:
            return
        from mlflow.entities import LoggedModelStatus

        try:
            with self._errors(f"mark logged model {logged.model_id} failed"):
                self.client.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
        except CptkitError as exc:
            log.warning("%s", exc)

    def create_version(self, name: str, logged: LoggedModel, tags: Mapping[str, str], description: str) -> str:
        """Register `logged` as a new version of `name` (creating the registered model if needed)."""
        from mlflow.exceptions import MlflowException

        # Bound: a registry on the tracking store resolves models:/m-... through the process-wide tracking URI.
        with self._errors(f"register {name}"), self._bound():
            try:
                self.client.get_registered_model(name)
            except MlflowException as exc:
                if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"):
                    raise
                self.client.create_registered_model(name)
            version = self.client.create_model_version(
                name=name,
                source=logged.model_uri,
                run_id=logged.run_id,
                tags=self._tags(tags),
                description=description,
                model_id=logged.model_id,
            )
        return str(version.version)

    # ------------------------------------------------------------ aliases and tags

    def alias_version(self, name: str, alias: str) -> str | None:
        """The version `alias` points to, or None."""
        from mlflow.exceptions import MlflowException

        with self._errors(f"read alias {alias} of {name}"):
            try:
                return str(self.client.get_model_version_by_alias(name, alias).version)
            except MlflowException as exc:
                if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
                    return None
                raise

    def set_alias(self, name: str, alias: str, version: str) -> None:
        with self._errors(f"set alias {alias} on {name} version {version}"):
            self.client.set_registered_model_alias(name, alias, version)

    def version_tags(self, name: str, version: str) -> dict[str, str]:
        with self._errors(f"read {name} version {version}"):
            return dict(self.client.get_model_version(name, version).tags)

    def set_version_tags(self, name: str, version: str, tags: Mapping[str, str]) -> None:
        with self._errors(f"tag {name} version {version}"):
            for key, value in self._tags(tags).items():
                self.client.set_model_version_tag(name, version, key, value)

    def describe_version(self, name: str, version: str, description: str) -> None:
        with self._errors(f"describe {name} version {version}"):
            self.client.update_model_version(name, version, description=description)

    def log_folder(self, run_id: str, folder: Path, artifact_path: str) -> str:
        """Log the files of `folder` to run `run_id` under `artifact_path`; their runs:/ URI."""
        with self._errors(f"log {folder.name} to run {run_id}"):
            self.client.log_artifacts(run_id, str(folder), artifact_path)
        return f"runs:/{run_id}/{artifact_path}"

    def download(self, artifact_uri: str, destination: Path) -> Path:
        """The files at `artifact_uri` (runs:/...), downloaded under `destination`."""
        import mlflow
        from mlflow.environment_variables import MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR

        destination.mkdir(parents=True, exist_ok=True)
        shown = os.environ.get(MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.name)
        os.environ[MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.name] = "false"  # cptkit says what it downloads
        try:
            with self._errors(f"download {artifact_uri}"), self._bound():
                return Path(mlflow.artifacts.download_artifacts(artifact_uri=artifact_uri, dst_path=str(destination)))
        finally:
            if shown is None:
                os.environ.pop(MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.name, None)
            else:
                os.environ[MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.name] = shown

    def versions(self, name: str) -> list[tuple[str, dict[str, str], list[str]]]:
        """Every version of `name` as (version, tags, aliases), oldest first; empty when it is not registered."""
        with self._errors(f"list the versions of {name}"):
            found = self.client.search_model_versions("name = '" + name.replace("'", "''") + "'")
            # A search leaves the versions' aliases out: the registered model has them.
            aliases = dict(self.client.get_registered_model(name).aliases or {}) if found else {}
        by_version: dict[str, list[str]] = {}
        for alias, version in aliases.items():
            by_version.setdefault(str(version), []).append(alias)
        rows = [(str(v.version), dict(v.tags or {}), by_version.get(str(v.version), [])) for v in found]
        return sorted(rows, key=lambda row: int(row[0]))

    # ------------------------------------------------------------ loading back

    def load_components(self, model_uri: str) -> tuple[Any, Any]:
        """The model and tokenizer MLflow loads for `model_uri` (e.g. models:/name/3), on the CPU."""
        import mlflow

        with self._errors(f"load {model_uri}"), self._bound():
            components = mlflow.transformers.load_model(model_uri, return_type="components", device="cpu")
        return components["model"], components["tokenizer"]

    # ------------------------------------------------------------ helpers

    def _tags(self, tags: Mapping[str, str]) -> dict[str, str]:
        masked = mask_data(dict(tags), self._secrets)
        return {k: truncate(str(v), MAX_TAG_VALUE_LENGTH) for k, v in masked.items()}

    def _errors(self, action: str) -> Any:
        return vendor_errors(self.registry_uri or self.tracking_uri, action, self._secrets)

    @contextmanager
    def _bound(self) -> Iterator[None]:
        """Point MLflow's process-wide URIs at this store while a fluent-only API runs, then restore them
        (their module state and the environment variables MLflow sets for subprocesses)."""
        import mlflow
        from mlflow.tracking._model_registry import utils as registry_utils
        from mlflow.tracking._tracking_service import utils as tracking_utils

        saved_env = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
        saved_tracking, saved_registry = tracking_utils._tracking_uri, registry_utils._registry_uri
        mlflow.set_tracking_uri(self.tracking_uri)
        mlflow.set_registry_uri(self.registry_uri or self.tracking_uri)
        try:
            yield
        finally:
            mlflow.set_tracking_uri(saved_tracking)  # type: ignore[arg-type]
            registry_utils._registry_uri = saved_registry
            for key, value in saved_env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def save_transformers_model(
    folder: Path,
    model: Any,
    tokenizer: Any,
    pip_requirements: list[str],
    input_example: tuple[list[str], dict[str, Any]],
) -> None:
    """Write `model` as an MLflow transformers model (text-generation) into the existing, empty `folder`.
    The in-memory model, not a folder path: MLflow's local-checkpoint mode fails with transformers 5.
    The example's params become the signature's parameters (MLflow ignores any other a request sends)."""
    import mlflow

    staging = folder / ".saving"  # save_model wants a path that does not exist yet
    mlflow.transformers.save_model(
        transformers_model={"model": model, "tokenizer": tokenizer},
        path=str(staging),
        task="text-generation",
        pip_requirements=pip_requirements,
        input_example=input_example,
    )
    for item in staging.iterdir():
        item.rename(folder / item.name)
    staging.rmdir()


def pinned_requirements(peft: bool) -> list[str]:
    """Pinned requirements of the registered model: the installed versions that trained it (without a
    local build label such as +cpu, which no index serves)."""
    packages = [*_RUNTIME_PACKAGES, *(["peft"] if peft else [])]
    pins = []
    for package in packages:
        try:
            version = importlib_metadata.version(package)
        except importlib_metadata.PackageNotFoundError:
            continue
        pins.append(f"{package}=={version.split('+')[0]}")
    return pins
