"""The train stage as one Python call, for launchers that start processes running a function rather than a
command: pyspark's `TorchDistributor` (a Databricks GPU cluster, or `local_mode` on one machine), the
serverless GPU `@distributed` decorator, or a notebook on one GPU.

Each started process calls `run_train` with the same arguments; the launcher's environment (RANK,
WORLD_SIZE, MASTER_ADDR, ...) makes them one group, exactly as under `torchrun`, and the stage behaves as
`cptkit train` does there: the main process writes outputs, checkpoints and MLflow. Every process returns
the main process's summary, a plain dict, since launchers return the value of whichever process they pick.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cptkit.config import load_config
from cptkit.distributed import launched_as_group, process_rank
from cptkit.errors import ConfigError, CptkitError
from cptkit.progress import LogFormat, console, error_console, set_log_format
from cptkit.secrets import scrub, scrub_logs
from cptkit.tracking import check_tracking
from cptkit.train import train


def run_train(
    config_path: str | Path | None = None,
    overrides: Sequence[str] = (),
    force: bool = False,
    environment: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Train as `cptkit train -c config_path --set ...` would in this process, and return the run's
    `training_summary.json` as a dict (`TrainingSummary.from_json` reads it back).

    `environment` is set in this process first: on a cluster the workers do not inherit a notebook's
    credentials, so the notebook passes what MLflow on the workspace needs (DATABRICKS_HOST and
    DATABRICKS_TOKEN); they are masked in every line cptkit prints.

    A user mistake (`CptkitError`) is raised as it is in a process of its own (a notebook); in a process of
    a launched group it is printed as the CLI prints it, `error: ...` on one line, and the process exits
    with the CLI's code, so that the launcher's log shows the cause instead of a traceback per process.
    """
    os.environ.update(environment or {})
    scrub_logs()
    if process_rank() != 0:  # the main process prints, as under `cptkit train --processes N`
        set_log_format(LogFormat.quiet)
        console.quiet = True
    try:
        config = load_config(Path(config_path) if config_path is not None else None, list(overrides))
        check_tracking(config.tracking)  # before the model loads: an unusable store fails in seconds
        result = train(config, force=force)
    except CptkitError as exc:
        if not launched_as_group():
            raise
        lines = exc.problems if isinstance(exc, ConfigError) else [f"error: {exc}"]
        for line in lines:
            error_console.print(scrub(line), style="red", markup=False, highlight=False, soft_wrap=True)
        raise SystemExit(exc.exit_code) from None
    assert result.summary is not None  # train always returns one
    return _main_process_value(result.summary.to_json())


def _main_process_value(value: dict[str, Any]) -> dict[str, Any]:
    """The main process's `value` in every process of the group (this process's own without a group). Each
    process's summary differs in what it measured itself (its peak memory, its time); launchers pick any
    process's return value (TorchDistributor's `local_mode` keeps the last one written)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    holder: list[Any] = [value]
    dist.broadcast_object_list(holder, src=0)
    return dict(holder[0])
