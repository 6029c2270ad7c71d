"""Progress and the console. Everything user-facing goes to stderr so stdout stays parseable.

Three log formats (`cptkit --log-format ...`): `rich` (default) shows stage results, a line per training
step with its loss, speed and ETA, and progress bars on a terminal; `quiet` shows stage results and
errors only; `json` writes one JSON object per event on stdout (stage results, training steps and
evaluations, errors) for schedulers and CI, and nothing else but error lines on stderr.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import sys
from collections.abc import Callable, Iterator
from enum import StrEnum
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from cptkit.secrets import ScrubbedStream, scrub


class LogFormat(StrEnum):
    rich = "rich"
    quiet = "quiet"
    json = "json"


# Both print through a stream that masks secrets (URL userinfo, known credential values): whatever a
# stage or a library puts in a line, it is masked before it reaches the terminal or a log file.
console = Console(file=ScrubbedStream("stderr"))  # type: ignore[arg-type]
# Errors are shown in every format, on stderr.
error_console = Console(file=ScrubbedStream("stderr"))  # type: ignore[arg-type]
_format = "rich"


def set_log_format(fmt: LogFormat) -> None:
    global _format
    _format = LogFormat(fmt).value
    console.quiet = fmt == "json"


def log_format() -> str:
    return _format


def detail(text: str) -> None:
    """A line of progress inside a stage (a training step): in the rich format only."""
    if _format == "rich":
        console.print(text, highlight=False, markup=False, soft_wrap=True)


def event(name: str, /, **fields: Any) -> None:
    """One JSON line on stdout in the json format; nothing otherwise."""
    if _format != "json":
        return
    record = {"event": name, "time": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), **fields}
    sys.stdout.write(scrub(json.dumps(record, default=str)) + "\n")
    sys.stdout.flush()


def duration(seconds: float) -> str:
    """45 s, 3.2 min, 1.5 h."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


@contextlib.contextmanager
def progress_bar(description: str, total: int | None) -> Iterator[Callable[[int], None]]:
    """Yield `advance(n)`. Draws a bar on a terminal in the rich format; stays silent otherwise (CI logs,
    pipes, quiet and json formats)."""
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal or _format != "rich",
    ) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)
