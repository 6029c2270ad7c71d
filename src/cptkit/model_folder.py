"""The trained-model folder train writes and evaluate, register and export read: its saved config and
summary, and the folders the later stages write inside it.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from cptkit.artifacts import read_json
from cptkit.config import Config, TrainingConfig

ADAPTER_CONFIG = "adapter_config.json"  # peft's: present where train saved adapters, not full weights
SUMMARY = "training_summary.json"  # train's summary: steps, tokens, losses, evaluations
TRAINED_CONFIG = "cptkit_config.yaml"  # the resolved config the model was trained with (secrets masked)
EVALUATION_DIR = "evaluation"  # evaluate's outputs
RESULTS = "results.json"
REGISTRATION_DIR = "registration"  # its manifest.json records the last registration of this model


def trained_training_config(cpt_dir: Path, fallback: TrainingConfig) -> TrainingConfig:
    """The training section the model in `cpt_dir` was trained with (saved next to it by train), else
    inferred from what the folder holds."""
    saved = cpt_dir / TRAINED_CONFIG
    if saved.is_file():
        data = yaml.safe_load(saved.read_text(encoding="utf-8")) or {}
        if isinstance(data.get("training"), dict):
            try:
                return TrainingConfig.model_validate(data["training"])
            except ValueError:
                pass  # written by another cptkit version; infer below
    if (cpt_dir / ADAPTER_CONFIG).is_file():
        method = "qlora" if fallback.method == "qlora" else "lora"
        return fallback.model_copy(update={"method": method})
    return fallback.model_copy(update={"method": "full"})


def trained_base_model(cpt_dir: Path) -> str | None:
    """The base model a trained folder names: the model.name it was trained from, else the base in its
    adapter config."""
    saved = cpt_dir / TRAINED_CONFIG
    if saved.is_file():
        data = yaml.safe_load(saved.read_text(encoding="utf-8")) or {}
        name = (data.get("model") or {}).get("name") if isinstance(data, dict) else None
        if isinstance(name, str) and name:
            return name
    adapter = read_json(cpt_dir / ADAPTER_CONFIG) or {}
    base = adapter.get("base_model_name_or_path")
    return str(base) if base else None


def evaluation_dir(config: Config) -> Path:
    return config.output_dir / EVALUATION_DIR
