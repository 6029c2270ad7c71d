"""Checks of a model folder's files before loading: a missing or damaged file is one line naming it, not
a library's error about something else."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cptkit.errors import CptkitError
from cptkit.model_folder import ADAPTER_CONFIG
from cptkit.models.text import first_line

if TYPE_CHECKING:
    pass


# Trained embeddings of an adapter run live next to the adapter: peft saves only its own weights.
EMBEDDINGS_FILE = "embeddings.safetensors"


# Loaders report a missing or damaged file in their own terms: peft takes a folder without adapter weights
# for a hub id ("Repo id must be in the form..."), safetensors says "invalid header length" without naming
# the file. These checks read only the JSON files and the safetensors headers, so they cost nothing.

_WEIGHTS_INDEX = "model.safetensors.index.json"
_ADAPTER_WEIGHTS = "adapter_model.safetensors"


def check_model_files(folder: Path) -> None:
    """A model folder's config.json and every safetensors weights file it has (or its index lists) are
    present and readable; a folder of pickled weights only (pytorch_model.bin) is left to transformers."""
    _check_json(folder / "config.json")
    weights = sorted(folder.glob("*.safetensors"))
    index = folder / _WEIGHTS_INDEX
    if index.is_file():
        weight_map = _check_json(index).get("weight_map")
        listed = sorted(set(weight_map.values())) if isinstance(weight_map, dict) else []
        for name in listed:
            if not (folder / name).is_file():
                raise CptkitError(f"{folder / name}: model weights missing (listed in {index.name})")
        weights = [folder / name for name in listed] or weights
    if not weights:
        if any(folder.glob("pytorch_model*.bin")):
            return
        raise CptkitError(f"{folder}: model weights missing (no *.safetensors file next to config.json)")
    for path in weights:
        _check_safetensors(path)


def check_adapter_files(folder: Path) -> None:
    """What `save_trained` writes for an adapter run is present and readable: the adapter config, its
    weights, and the trained embeddings when there are any."""
    _check_json(folder / ADAPTER_CONFIG)
    weights = folder / _ADAPTER_WEIGHTS
    if not weights.is_file():
        raise CptkitError(f"{weights}: adapter weights missing ({ADAPTER_CONFIG} is there; train again, or restore it)")
    _check_safetensors(weights)
    if (folder / EMBEDDINGS_FILE).is_file():
        _check_safetensors(folder / EMBEDDINGS_FILE)


def _check_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CptkitError(f"{path}: missing") from None
    except OSError as exc:
        raise CptkitError(f"{path}: cannot be read ({exc.strerror or type(exc).__name__})") from None
    except ValueError as exc:  # not JSON, or not UTF-8
        raise CptkitError(f"{path}: not valid JSON ({first_line(exc)}); the file is damaged") from None
    if not isinstance(data, dict):
        raise CptkitError(f"{path}: not valid JSON (expected an object, found {type(data).__name__})")
    return data


def _check_safetensors(path: Path) -> None:
    from safetensors import SafetensorError, safe_open

    try:
        # Opening parses the header and checks that the file is as long as the header says.
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except SafetensorError as exc:
        reason = first_line(exc).removeprefix("Error while deserializing header: ")
        raise CptkitError(
            f"{path}: not a valid safetensors file ({reason}); the file is damaged or was cut short"
        ) from None
    except OSError as exc:
        raise CptkitError(f"{path}: cannot be read ({exc.strerror or type(exc).__name__})") from None
