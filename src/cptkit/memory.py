"""Peak memory of a stretch of work, measured the same way by training and by the preflight of `cptkit
run`, so that the estimate and the real run can be compared: the process's resident memory on a CPU,
the memory torch allocated on a GPU."""

from __future__ import annotations

import resource
import sys
from pathlib import Path
from typing import Any

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


class PeakMemory:
    """`reset()` starts a measurement; `peak_bytes()` is the highest usage since then."""

    def __init__(self, device: Any) -> None:
        self.cuda = getattr(device, "type", str(device)) == "cuda"
        self.kind = "GPU memory allocated" if self.cuda else "process RSS"
        self._resettable = True

    def reset(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return
        # Linux keeps the RSS high-water mark (VmHWM) per process; writing 5 to clear_refs resets it to the
        # current RSS (so an outer `/usr/bin/time -v` then also reports the peak from here on, which for a
        # process that trains is the training's). Elsewhere the peak can only be read since the process started.
        try:
            _CLEAR_REFS.write_text("5")
        except OSError:
            self._resettable = False
            self.kind = "process RSS since start"

    def peak_bytes(self) -> int:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            return int(torch.cuda.max_memory_allocated())
        if self._resettable:
            for line in _STATUS.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB on Linux
