"""The base model's scoring outputs of an evaluation set, computed once and cached.

Every evaluation of an adapter scores the same sets with the same base: the base's half of the work
(its decoder over every window) is the same each time. What scoring needs from the base, its NLL and,
for drift, its full next-token distribution at every scored position, is a function of the decoder's
last hidden state there (the LM head is a plain linear layer over it: `loss.decoder_and_head`). So the
cache holds those hidden states, batch by batch: positions x hidden size (576 floats per token for
SmolLM2-135M) rather than positions x vocabulary (49,152), and the head applied to them again gives the
same distributions bit for bit, so cached and fresh results are equal, not close.

An entry is keyed by everything its numbers depend on: the base's files, the exact token ids of the set
(so the tokenizer, decontamination and caps are in it), the window settings and batch size (batches are
cut from the sorted windows), precision, device type, how the base is scored (the adapted model with its
adapter disabled, or a separately loaded copy) and the torch and transformers versions (`BaseIdentity`). It is written
to a temporary folder renamed into place when complete, so two concurrent evaluations never see half an
entry (both compute it; the second rename loses and its copy is removed). Entries are never evicted:
`rm -r <cache>/base_scores` frees the space.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from cptkit.errors import StageError
from cptkit.tokenization import cache_dir

FORMAT = 1
META = "meta.json"


def cache_root() -> Path:
    return cache_dir() / "base_scores"


# Files up to this size are hashed whole for the base model's fingerprint (config, tokenizer, chat
# template); larger ones (weights) by name, size and modification time, so that a 14 GB model is not read
# on every evaluation. The cache can then miss (a copied model), never hit a changed tokenizer.
_HASHED_WHOLE_BYTES = 32 << 20


def model_fingerprint(folder: Path) -> str:
    """A model folder's identity: small files by content, large ones by name, size and time. A hub
    snapshot's files link to blobs named by their content hash, which is part of the name used here."""
    parts = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        real = path.resolve()
        stat = real.stat()
        if stat.st_size <= _HASHED_WHOLE_BYTES:
            ident = hashlib.sha256(real.read_bytes()).hexdigest()
        else:
            ident = f"{real.name}:{stat.st_size}:{stat.st_mtime_ns}"
        parts.append(f"{path.relative_to(folder)}={ident}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class BaseIdentity:
    """What the base's outputs depend on besides its input: its files, how it is scored (`scored_as`:
    adapter switched off or loaded apart, and quantization), precision and device, with the torch and
    transformers versions. Every cached base result (windows, chat answers and their scores, the
    generated tasks' items) is keyed by it plus what was scored."""

    base_model_path: str
    scored_as: str
    precision: str
    device: str

    @functools.cached_property
    def _fingerprint(self) -> str:
        return model_fingerprint(Path(self.base_model_path))

    def key(self, kind: str, settings: dict[str, Any], content: Iterable[bytes]) -> str:
        """The entry of `content` (what was scored, exactly) of this `kind` under `settings`."""
        import torch
        import transformers

        h = hashlib.sha256()
        identity = {
            "format": FORMAT,
            "kind": kind,
            "base": self._fingerprint,
            "scored_as": self.scored_as,
            "precision": self.precision,
            "device": self.device,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        }
        h.update(json.dumps([identity, settings], sort_keys=True).encode())
        for part in content:
            h.update(len(part).to_bytes(8, "little"))
            h.update(part)
        return f"{kind}-{h.hexdigest()[:32]}"


def token_bytes(docs: Iterable[Sequence[int] | np.ndarray]) -> Iterator[bytes]:
    """Token id sequences as bytes, for a key."""
    for doc in docs:
        yield np.ascontiguousarray(doc, dtype=np.int64).tobytes()


class BaseOutputs:
    """The base runner's outputs at the scored positions, batch by batch: read from a complete cache
    entry where one exists, else computed and written to a new entry when the scoring completes. Used as a
    context manager around the scoring, so a failed scoring leaves no entry."""

    def __init__(self, key: str, root: Path | None = None) -> None:
        self.root = root if root is not None else cache_root()
        self.folder = self.root / key
        self.cached = (self.folder / META).is_file()
        self.batches = 0
        self._work: Path | None = None
        self._recording = not self.cached

    def output(
        self, index: int, positions: int, compute: Callable[[], tuple[str, Any]], device: Any
    ) -> tuple[str, Any]:
        """Batch `index`'s output ("hidden", states at its `positions` scored positions): the cached one,
        or `compute()`'s, recorded."""
        self.batches = max(self.batches, index + 1)
        if self.cached:
            import torch

            values = torch.load(self.folder / f"{index:06d}.pt", map_location=device, weights_only=True)
            if values.shape[0] != positions:
                raise StageError(
                    f"base-score cache {self.folder}: batch {index} holds {values.shape[0]} positions, not "
                    f"{positions}; remove that folder and evaluate again"
                )
            return "hidden", values
        out = compute()
        kind, values = out
        if kind != "hidden":  # a model without a plain LM head: its logits are too large to keep
            self._recording = False
        if self._recording:
            import torch

            if self._work is None:
                self.root.mkdir(parents=True, exist_ok=True)
                self._work = Path(tempfile.mkdtemp(prefix=f".{self.folder.name}.", suffix=".tmp", dir=self.root))
            torch.save(values.detach(), self._work / f"{index:06d}.pt")
        return out

    def __enter__(self) -> BaseOutputs:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        work, self._work = self._work, None
        if work is None:
            return
        try:
            if exc_type is None and self._recording:
                (work / META).write_text(json.dumps({"format": FORMAT, "batches": self.batches}), encoding="utf-8")
                try:
                    os.rename(work, self.folder)  # atomic; fails where another run's entry is already in place
                    return
                except OSError:
                    if not (self.folder / META).is_file():
                        raise
        finally:
            if work.exists():
                shutil.rmtree(work, ignore_errors=True)


def base_outputs_for(
    base: BaseIdentity | None,
    docs: Sequence[np.ndarray],
    context_length: int,
    stride: int,
    batch_size: int,
    kind: str = "windows",
) -> BaseOutputs | None:
    """The cache entry of `docs` scored in windows (`kind` "windows", an evaluation set) or as whole
    sequences (`kind` "chat", chat drift's prompts and answers); None without a `base` (the cache off).
    Batches are cut from the sorted windows, so the window settings and batch size are in the key."""
    if base is None:
        return None
    settings = {"context_length": context_length, "stride": stride, "batch_size": batch_size}
    return BaseOutputs(base.key(kind, settings, token_bytes(docs)))


# ---------------------------------------------------------------- small per-item results


def read_arrays(key: str) -> dict[str, np.ndarray] | None:
    """A cached set of arrays (the base's scores of the generated tasks' items), or None."""
    try:
        with np.load(cache_root() / f"{key}.npz") as data:
            return {name: data[name] for name in data.files}
    except (OSError, ValueError, KeyError):  # absent or unreadable: computed again
        return None


def write_arrays(key: str, arrays: dict[str, np.ndarray]) -> None:
    """Written whole or not at all (a temporary file renamed into place); a read-only cache is skipped."""
    root = cache_root()
    with contextlib.suppress(OSError):
        root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{key}.", suffix=".npz.tmp", dir=root)
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **arrays)  # type: ignore[arg-type]
            os.replace(tmp, root / f"{key}.npz")
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
