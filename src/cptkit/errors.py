"""The project's own error types. Vendor errors are translated into these at the adapter, and the CLI
turns them into one clear line and a non-zero exit."""

from __future__ import annotations


class CptkitError(Exception):
    """A problem the user can fix (bad input, bad config, missing file). Exit code 1."""

    exit_code = 1


class ConfigError(CptkitError):
    """The configuration is invalid. Carries every problem found, one line each. Exit code 2."""

    exit_code = 2

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


class SourceError(CptkitError):
    """A configured source cannot be read (missing path, unreadable table, missing column)."""


class StageError(CptkitError):
    """A stage cannot run because its inputs are missing or inconsistent."""
