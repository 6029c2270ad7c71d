"""Child processes that must not outlive cptkit: the scoring server, prepare's workers."""

from __future__ import annotations

import contextlib
import os
import signal
import sys


def die_with_parent(sig: int = signal.SIGTERM, parent_pid: int | None = None) -> None:
    """In a child process: ask Linux to send `sig` when the parent dies, even by SIGKILL (elsewhere this
    does nothing). With `parent_pid`, a child whose parent already died before the request exits now."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, sig)
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(1)  # orphaned between fork and the request: nobody will read our results
