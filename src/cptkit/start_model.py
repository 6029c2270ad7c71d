"""`training.init_from`: the trained model an update starts from.

It is a cptkit trained-model folder, named directly or through the registry (`models:/name@alias`,
`models:/name/version`): register logs each version's folder (adapter or full weights, trained
embeddings, saved config, summary, the record of the documents it learned) to the version's run, and
tags the version with where, so that a scheduled job on a fresh machine starts from the champion with
nothing but the registry. The start must have the same base and method as the run: its weights are
loaded into the model that training builds, before the first step.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cptkit.artifacts import MANIFEST, read_json
from cptkit.config import Config, TrainingConfig
from cptkit.errors import ConfigError, CptkitError
from cptkit.model_folder import trained_base_model, trained_training_config

# The version tag register writes: the runs:/ URI of the trained-model folder logged with the version.
FOLDER_TAG = "cptkit.trained_folder"
FOLDER_ARTIFACT = "cptkit_model"

_URI = re.compile(r"^models:/(?P<name>[^@/]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")


@dataclass(frozen=True)
class StartModel:
    spec: str  # what training.init_from says
    folder: Path  # a trained-model folder (train's manifest, saved config, weights)
    training: TrainingConfig  # how it was trained
    base: str | None  # the model.name it was trained from
    identity: str  # changes when the start changes (an alias moved, a folder retrained)
    name: str | None = None  # registered model name, when named through the registry
    version: str | None = None


def resolve_start(config: Config) -> StartModel | None:
    """The model `training.init_from` names, or None when unset. A folder is used in place; a registry
    version's folder is downloaded once into the cptkit cache."""
    spec = config.training.init_from
    if spec is None:
        return None
    name = version = None
    if spec.startswith("models:/"):
        name, version, folder = _from_registry(config, spec)
    else:
        folder = Path(spec)
    manifest = read_json(folder / MANIFEST)
    if manifest is None or manifest.get("stage") != "train":
        raise ConfigError(
            [f"config error: training.init_from: {spec}: not a cptkit output folder (no finished training there)"]
        )
    identity = f"{manifest.get('config_fingerprint')}:{manifest.get('created_at')}"
    training = trained_training_config(folder, config.training)
    return StartModel(spec, folder, training, trained_base_model(folder), identity, name, version)


def _from_registry(config: Config, spec: str) -> tuple[str, str, Path]:
    from cptkit.registry import Registry
    from cptkit.tokenization import cache_dir

    match = _URI.match(spec)
    if match is None:
        raise ConfigError([f"config error: training.init_from: {spec}: use models:/name@alias or models:/name/version"])
    name = match["name"]
    registry = Registry.open(config.tracking, config.register_)
    version = match["version"] or registry.alias_version(name, match["alias"])
    if version is None:
        raise CptkitError(f"training.init_from: {spec}: {name} has no alias {match['alias']} in {registry.where()}")
    uri = registry.version_tags(name, version).get(FOLDER_TAG)
    if not uri:
        raise CptkitError(
            f"training.init_from: {spec}: version {version} carries no cptkit model folder (tag {FOLDER_TAG}); "
            "give the output folder it was trained into instead"
        )
    key = hashlib.sha256(f"{registry.where()}\0{name}\0{version}\0{uri}".encode()).hexdigest()[:16]
    target = cache_dir() / "init_from" / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', name)[:60]}-v{version}-{key}"
    if not (target / MANIFEST).is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
        try:
            downloaded = registry.download(uri, tmp)
            try:
                os.rename(downloaded, target)
            except OSError:
                if not (target / MANIFEST).is_file():  # another process downloaded the same version first
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return name, version, target


def check_start(start: StartModel, config: Config) -> Config:
    """The config to train with from `start`: the same base and method (an `auto` method takes the
    start's), the same adapter shape. A mismatch is a config error naming both."""
    tc, theirs = config.training, start.training
    if tc.distributed == "fsdp":
        raise ConfigError(
            [f"config error: training.init_from: {start.spec}: an update trains with distributed ddp, not fsdp"]
        )
    if start.base is not None and not _same_model(start.base, config.model.name):
        raise ConfigError(
            [
                f"config error: training.init_from: {start.spec} was trained on base {start.base}, "
                f"and model.name is {config.model.name}"
            ]
        )
    method = theirs.method if tc.method == "auto" else tc.method
    if method != theirs.method:
        raise ConfigError(
            [
                f"config error: training.init_from: {start.spec} was trained with method {theirs.method}, "
                f"and training.method is {tc.method}"
            ]
        )
    if method != "full" and theirs.lora != tc.lora:
        raise ConfigError(
            [
                f"config error: training.init_from: {start.spec} has adapters {_lora(theirs)}, "
                f"and training.lora is {_lora(tc)}"
            ]
        )
    return config.model_copy(update={"training": tc.model_copy(update={"method": method})})


def _same_model(a: str, b: str) -> bool:
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def _lora(tc: TrainingConfig) -> str:
    lora = tc.lora
    return f"r={lora.r} alpha={lora.alpha:g} targets={lora.target_modules} rslora={lora.use_rslora}"


def load_start(model: Any, start: StartModel) -> None:
    """Put the start's trained weights into `model` (built for training as the start was)."""
    from cptkit.models.saved import load_trained_weights

    load_trained_weights(model, start.folder)
