"""`cptkit doctor`: the measured capability of this machine and what cptkit would choose for a config
(device, precision, training method, evaluation precision), with the reasons, without training anything.

The model's shape comes from its config alone: a local folder or .gguf (converted once, as training would),
or a hub id's config.json (downloaded alone, not the weights)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cptkit.capability import Capability
from cptkit.choices import Choice, TrainingChoices, choose_device, choose_eval_precision, decide_training
from cptkit.config import Config
from cptkit.errors import CptkitError


@dataclass(frozen=True)
class Diagnosis:
    devices: list[str]  # present, best first
    capability: Capability
    cache_file: Path
    training: TrainingChoices
    evaluate_precision: Choice

    def as_dict(self) -> dict[str, Any]:
        return {
            "devices": self.devices,
            "capability": self.capability.as_dict(),
            "cache_file": str(self.cache_file),
            "training": self.training.as_dict() | {"capability": None},  # given once, above
            "evaluate_precision": {"value": self.evaluate_precision.value, "reason": self.evaluate_precision.reason},
            "warnings": self.warnings,
        }

    @property
    def warnings(self) -> list[str]:
        found = list(self.training.warnings)
        if self.evaluate_precision.warning:
            found.append(self.evaluate_precision.warning)
        return found


def diagnose(config: Config, refresh: bool = False) -> Diagnosis:
    from cptkit.capability import available_devices, cache_path, probe
    from cptkit.models import model_shape

    devices = available_devices()
    device = choose_device(devices, config.training.method)
    cap = probe(device.value, refresh=refresh)
    shape = model_shape(_config_dir(config.model.name), config.training) if config.training.method == "auto" else None
    choices = decide_training(config.training, cap, device, shape)
    evaluation = choose_eval_precision(cap, config.evaluate.precision)
    return Diagnosis(devices, cap, cache_path(device.value), choices, evaluation)


def _config_dir(name: str) -> Path:
    """A folder holding the model's config.json: the resolved model for local names, else the hub's
    config.json alone."""
    from cptkit.models import resolve_model

    path = Path(name).expanduser()
    if name == "smollm2-135m" or path.exists() or name.endswith(".gguf") or name.count("/") != 1:
        return resolve_model(name)
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(name, "config.json")).parent
    except Exception as exc:  # offline, gated, unknown: say so in one line
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CptkitError(
            f"model.name: cannot read {name}'s config.json from the hub to estimate its memory ({first}); "
            "set model.name to a local folder, or training.method to qlora or lora"
        ) from None
