"""Output folders: which folders a stage may write into, and one run at a time in each.

A stage writes only into a folder that is absent, empty, or marked as cptkit's (a marker file naming the
stage that writes there), so a mistyped `output_dir` can never replace or delete a user's own files. While
it writes, the stage holds an exclusive OS lock on the folder (flock on a lock file inside it): the kernel
releases it on any exit, SIGKILL included, so a crashed run never leaves a stale lock, and a second run on
the same folder fails at once naming the holder's pid (or waits, when asked).
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime as dt
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from cptkit import __version__
from cptkit.artifacts import read_json, write_json_atomic
from cptkit.errors import StageError

MARKER = ".cptkit-output.json"
LOCK = ".cptkit.lock"
_OWN_FILES = {MARKER, LOCK}
# Before markers existed, a stage's manifest.json said which stage wrote the folder; such folders are
# adopted (a rerun of an older cptkit's outputs must keep working).
_LEGACY_MANIFEST = "manifest.json"

# Set by the CLI's --wait: block until the folder is free instead of failing at once.
wait_for_lock: contextvars.ContextVar[bool] = contextvars.ContextVar("cptkit_wait_for_lock", default=False)

# Locks this process holds, by folder: a stage called inside another stage's claim (the demo, a notebook
# calling stages in turn) must not deadlock on its own lock.
_held: dict[Path, tuple[int, int]] = {}


def owner(directory: Path) -> str | None:
    """The stage that marked `directory` as its output, or None when it is not marked."""
    marker = read_json(directory / MARKER)
    if marker is not None and marker.get("tool") == "cptkit" and isinstance(marker.get("stage"), str):
        return str(marker["stage"])
    legacy = read_json(directory / _LEGACY_MANIFEST)
    if legacy is not None and "cptkit_version" in legacy and isinstance(legacy.get("stage"), str):
        return str(legacy["stage"])
    return None


def check_writable(directory: Path, stage: str) -> None:
    """Raise StageError, naming the folder, unless `stage` may write into `directory`."""
    if not directory.exists():
        return
    if not directory.is_dir():
        raise StageError(f"{directory}: not a folder; {stage} needs a folder for its outputs")
    marked_by = owner(directory)
    if marked_by is not None:
        if marked_by != stage:
            raise StageError(
                f"{directory}: holds the outputs of cptkit {marked_by}; {stage} needs a folder of its own "
                "(choose another output folder)"
            )
        return
    foreign = _foreign_entries(directory)
    if foreign:
        shown = ", ".join(sorted(foreign)[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise StageError(
            f"{directory}: folder holds files cptkit did not write ({shown}); {stage} writes only into an "
            "empty folder or one it created: choose another output folder or empty this one"
        )


@contextlib.contextmanager
def claim(directory: Path, stage: str) -> Iterator[None]:
    """Check that `stage` may write into `directory`, lock it for this process, mark it as the stage's,
    and release the lock on leaving (the kernel releases it if the process dies)."""
    directory = Path(os.path.abspath(directory))
    if directory in _held:
        fd, depth = _held[directory]
        _held[directory] = (fd, depth + 1)
        try:
            yield
        finally:
            fd, depth = _held[directory]
            _held[directory] = (fd, depth - 1)
        return
    check_writable(directory, stage)
    directory.mkdir(parents=True, exist_ok=True)
    fd = _lock(directory)
    try:
        # Checked again under the lock: another run may have marked the folder for another stage meanwhile.
        check_writable(directory, stage)
        _write_marker(directory, stage)
        _held[directory] = (fd, 1)
        yield
        _record_fingerprint(directory, stage)
    finally:
        _held.pop(directory, None)
        os.close(fd)  # releases the flock


def _lock(directory: Path) -> int:
    path = directory / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            if not wait_for_lock.get():
                raise StageError(
                    f"{directory}: another cptkit run ({holder}) is writing this folder; wait for it to finish "
                    "or rerun with --wait"
                ) from None
            from cptkit.progress import console, event

            console.print(
                f"waiting for {directory}: another cptkit run ({holder}) is writing it", highlight=False, soft_wrap=True
            )
            event("waiting", folder=str(directory), holder=holder)
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _holder(fd: int) -> str:
    text = os.pread(fd, 64, 0).decode(errors="replace").strip()
    return f"pid {text}" if text.isdigit() else "pid unknown"


def _foreign_entries(directory: Path) -> list[str]:
    """Entries that no cptkit stage wrote: anything but cptkit's own files and folders that are (below
    their own cptkit files and marked subfolders) empty or marked."""
    foreign = []
    for entry in directory.iterdir():
        if entry.name in _OWN_FILES:
            continue
        if entry.is_dir() and not entry.is_symlink() and (owner(entry) is not None or not _foreign_entries(entry)):
            continue
        foreign.append(entry.name)
    return foreign


def _write_marker(directory: Path, stage: str) -> None:
    previous = read_json(directory / MARKER) or {}
    marker = {
        "tool": "cptkit",
        "stage": stage,
        "cptkit_version": __version__,
        "config_fingerprint": previous.get("config_fingerprint") if previous.get("stage") == stage else None,
        "updated_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "note": f"written by cptkit {stage}; cptkit writes into this folder only while this file is here",
    }
    write_json_atomic(directory / MARKER, marker)


def _record_fingerprint(directory: Path, stage: str) -> None:
    """After a successful stage: the marker names the config fingerprint of the manifest it wrote."""
    manifest = read_json(directory / _LEGACY_MANIFEST)
    marker = read_json(directory / MARKER)
    if manifest is None or marker is None or manifest.get("stage") != stage:
        return
    marker["config_fingerprint"] = manifest.get("config_fingerprint")
    write_json_atomic(directory / MARKER, marker)
