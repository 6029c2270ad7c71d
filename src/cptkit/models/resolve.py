"""Resolve a model name to a local Hugging Face folder: a local folder as is, a hub id downloaded (config,
weights, tokenizer; never pickles or code), a .gguf file (or the embedded `smollm2-135m`) dequantized once
into a cached float32 copy that bitsandbytes can quantize like any other checkpoint."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from cptkit.errors import CptkitError
from cptkit.models.text import first_line
from cptkit.tokenization import SMOLLM2, cache_dir, smollm2_gguf

if TYPE_CHECKING:
    pass


# Bump when the conversion changes, so that older cached copies are not reused.
_GGUF_CONVERTER_VERSION = 1
SOURCE_FILE = "cptkit_source.json"
# What a training run needs from a hub repository: config, weights, tokenizer; never pickles or code.
_HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.tiktoken", "merges.txt", "vocab.txt"]
# Some repositories also carry the original (non-transformers) weights; training never reads them.
_HUB_SKIP = ["consolidated*", "original/*"]
_HUB_HINT = "set model.name to a local model folder or a .gguf file"
_STALE_TEMP_SECONDS = 3600


def resolve_model(name: str) -> Path:
    """A local Hugging Face model folder (config.json, safetensors weights, tokenizer files) for a
    local folder, a .gguf file, `smollm2-135m`, or a hub id."""
    if name == SMOLLM2:
        return _converted_gguf(smollm2_gguf())
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CptkitError(f"model.name: {name} is a folder without config.json; is it a Hugging Face model folder?")
        return path.resolve()
    if path.is_file():
        if path.suffix != ".gguf":
            raise CptkitError(
                f"model.name: {name} is a file but not a .gguf model; give a model folder or a .gguf file"
            )
        return _converted_gguf(path)
    if name.endswith(".gguf") or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise CptkitError(f"model.name: {name}: no such file or directory")
    return _download(name)


def _download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (
            GatedRepoError,
            HfHubHTTPError,
            HFValidationError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError:
        raise CptkitError("downloading from the hub needs huggingface_hub: pip install huggingface_hub") from None
    try:
        folder = Path(str(snapshot_download(repo_id, allow_patterns=_HUB_FILES, ignore_patterns=_HUB_SKIP)))
    except HFValidationError:
        raise CptkitError(
            f"model.name: '{repo_id}' is neither an existing local path nor a hub id (owner/name)"
        ) from None
    except GatedRepoError:
        raise CptkitError(
            f"model '{repo_id}' is gated: accept its terms on huggingface.co and log in (hf auth login or "
            f"HF_TOKEN), or {_HUB_HINT}"
        ) from None
    except RepositoryNotFoundError:
        raise CptkitError(
            f"model '{repo_id}' was not found on the Hugging Face hub (or is private: log in with hf auth login "
            f"or HF_TOKEN), and there is no local folder of that name; {_HUB_HINT}"
        ) from None
    except RevisionNotFoundError:
        raise CptkitError(f"model '{repo_id}': revision not found on the hub; {_HUB_HINT}") from None
    except LocalEntryNotFoundError:
        raise CptkitError(
            f"cannot download model '{repo_id}': the hub is unreachable (offline?) and it is not in the local "
            f"hub cache; {_HUB_HINT}"
        ) from None
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        reason = "not authorized (log in with hf auth login or HF_TOKEN)" if status in (401, 403) else f"HTTP {status}"
        raise CptkitError(f"cannot download model '{repo_id}': {reason}; {_HUB_HINT}") from None
    except OSError as exc:
        raise CptkitError(f"cannot download model '{repo_id}' ({first_line(exc)}); {_HUB_HINT}") from None
    if not (folder / "config.json").is_file():
        raise CptkitError(f"model '{repo_id}' on the hub has no config.json; is it a transformers model?")
    if not any(folder.glob("*.safetensors")):
        raise CptkitError(
            f"model '{repo_id}' on the hub has no safetensors weights (cptkit does not load pickled .bin files); "
            f"{_HUB_HINT}"
        )
    return folder


def gguf_cache_path(gguf: Path) -> Path:
    """Where the float copy of a .gguf file is cached: keyed by its path, size and modification time."""
    st = gguf.stat()
    stamp = f"gguf-v{_GGUF_CONVERTER_VERSION}:{gguf.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    key = hashlib.sha256(stamp.encode()).hexdigest()[:16]
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", gguf.stem)[:60]
    return cache_dir() / "models" / f"{stem}-{key}"


def _converted_gguf(gguf: Path) -> Path:
    target = gguf_cache_path(gguf)
    # The folder is renamed into place complete, so its presence means a finished conversion.
    if (target / "config.json").is_file():
        return target
    _convert_gguf(gguf, target)
    return target


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantize a GGUF file into a float32 safetensors folder with its tokenizer.

    float32 because dequantized values (an integer times a float16 scale plus a float16 offset) need
    more mantissa than bfloat16 has: a float32 copy is exact, and QLoRA re-quantizes from exact values.
    """
    if importlib.util.find_spec("gguf") is None:
        raise CptkitError("loading a .gguf model needs the gguf package: pip install gguf")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_dirs(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        with _gguf_errors(gguf):
            loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        # A model loaded from GGUF carries a gguf quantization config and refuses save_pretrained; a
        # model built from its config without that, holding the same tensors, saves as a plain checkpoint.
        # Built on the meta device and given the loaded tensors, so memory holds one copy of the weights.
        config = copy.deepcopy(loaded.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # type: ignore[no-untyped-call]
        model.load_state_dict(loaded.state_dict(), strict=True, assign=True)
        model.tie_weights()
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        st = gguf.stat()
        source = {"gguf": str(gguf.resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "dtype": "float32"}
        (tmp / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n", encoding="utf-8")
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():  # else another process finished the same conversion first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _gguf_errors(gguf: Path) -> Iterator[None]:
    try:
        yield
    except (ValueError, NotImplementedError, KeyError, OSError, ImportError) as exc:
        first = first_line(exc)
        hint = ""
        if "not supported" in first or "Unknown gguf model_type" in first:
            hint = "; transformers converts GGUF files of common architectures only (llama, mistral, qwen2, phi3, ...)"
        raise CptkitError(f"cannot convert {gguf} to a trainable model: {first}{hint}") from None


def remove_stale_temp_dirs(target: Path) -> None:
    """Remove what conversions killed long ago left behind (a live one keeps its folder recent)."""
    cutoff = time.time() - _STALE_TEMP_SECONDS
    for stale in target.parent.glob(f".{target.name}.*.tmp"):
        with contextlib.suppress(OSError):
            if stale.stat().st_mtime < cutoff:
                shutil.rmtree(stale, ignore_errors=True)
