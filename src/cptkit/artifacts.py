"""Stage outputs on disk: atomic writes and manifests.

A stage removes its old manifest first, writes every output to a temporary file renamed into place,
and writes its manifest last. So "manifest present and matching" means "done", and a run killed at any
moment leaves nothing a rerun mistakes for complete.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import json
import os
import shutil
import tempfile
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cptkit import __version__
from cptkit.errors import CptkitError, StageError

MANIFEST = "manifest.json"
# Less free space than this after a failed write means the disk filled up (see disk_full_errors).
_NEARLY_FULL_BYTES = 16 << 20
_NO_SPACE = {errno.ENOSPC: "no space left on device", getattr(errno, "EDQUOT", -1): "disk quota exceeded"}
_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary path next to `final`; rename it into place only when the block succeeds."""
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp creates 0600; outputs should be as readable as any file
    try:
        yield tmp_path
        os.replace(tmp_path, final)
    finally:
        tmp_path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary folder next to `final`; it replaces `final` only when the block succeeds."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
        replace_dir(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a finished folder into place, replacing an older one."""
    if not final.exists():
        os.rename(tmp, final)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".old", dir=final.parent))
    os.rename(final, old / final.name)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def disk_full_errors(what: str, path: Path) -> Iterator[None]:
    """Turn a write that failed for want of disk space into one StageError: "no space left on device while
    writing <what> <path>". torch.save reports a full disk only as a RuntimeError of its zip writer
    ("unexpected pos ..."), so a RuntimeError with (almost) no space left on `path`'s file system counts as
    one too: use this inside the cleanup of the partial files, which would free the space again."""
    try:
        yield
    except CptkitError:
        raise
    except Exception as exc:
        reason = _no_space_reason(exc, path)
        if reason is None:
            raise
        # The failed writer's frames hold the partial file open (torch's zip writer is not closed on
        # error): drop their locals, so that the space is free again while the error is handled.
        for error in _chain(exc):
            traceback.clear_frames(error.__traceback__)
        raise StageError(f"{reason} while writing {what} {path}") from exc


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and the errors it was raised from or while handling."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        yield cause
        cause = cause.__cause__ or cause.__context__


def _no_space_reason(exc: BaseException, path: Path) -> str | None:
    for cause in _chain(exc):
        if isinstance(cause, OSError) and cause.errno in _NO_SPACE:
            return _NO_SPACE[cause.errno]
        text = str(cause)
        # safetensors and other Rust writers put the OS error in their message.
        if "No space left on device" in text or "os error 28" in text:
            return _NO_SPACE[errno.ENOSPC]
        if "Disk quota exceeded" in text:
            return "disk quota exceeded"
    if isinstance(exc, RuntimeError) and _free_bytes(path) < _NEARLY_FULL_BYTES:
        return _NO_SPACE[errno.ENOSPC]
    return None


def _free_bytes(path: Path) -> int:
    for folder in (path, *path.parents):
        if folder.exists():
            return shutil.disk_usage(folder).free
    return _NEARLY_FULL_BYTES  # nothing to measure: not taken for a full disk


def write_json_atomic(path: Path, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n", encoding="utf-8")


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def describe_outputs(directory: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    return {n: {"bytes": (directory / n).stat().st_size} for n in names}


def new_manifest(stage: str, config_fingerprint: str, input_fingerprint: str | None) -> dict[str, Any]:
    return {
        "stage": stage,
        "cptkit_version": __version__,
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "config_fingerprint": config_fingerprint,
        "input_fingerprint": input_fingerprint,
    }


def up_to_date(directory: Path, config_fingerprint: str, input_fingerprint: str | None) -> dict[str, Any] | None:
    """The existing manifest when the stage's outputs are complete for these fingerprints, else None."""
    manifest = read_json(directory / MANIFEST)
    if manifest is None or input_fingerprint is None:
        return None
    if (manifest.get("config_fingerprint"), manifest.get("input_fingerprint")) != (
        config_fingerprint,
        input_fingerprint,
    ):
        return None
    for name, info in (manifest.get("outputs") or {}).items():
        path = directory / name
        if not path.exists() or output_bytes(path) != info.get("bytes"):
            return None
    return manifest


def output_bytes(path: Path) -> int:
    """A manifest's size of an output: a file's bytes, or the sum of a folder's files."""
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def invalidate(directory: Path) -> None:
    """Remove a stage's manifest before it starts rewriting its outputs, and the temporary files a
    killed run left behind."""
    (directory / MANIFEST).unlink(missing_ok=True)
    if directory.is_dir():
        for stale in directory.glob(".*.tmp"):
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)  # an engine's work folder
            else:
                stale.unlink(missing_ok=True)
