"""What every stage returns: its manifest, the folder it wrote, and whether it was up to date."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class StageResult:
    manifest: dict[str, Any]
    directory: Path
    skipped: bool
