"""Training on several local processes: which process is the main one, and the launcher behind
`cptkit train --processes N` (torch's elastic launcher, the one `torchrun` runs, on loopback).

Under any launcher (`torchrun`, `accelerate launch`, `cptkit train --processes N`) every process runs the
same train stage; accelerate's process group gives each its share of the global batch, and only the main
process writes outputs, checkpoints and MLflow.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import uuid
from pathlib import Path


def process_rank() -> int:
    """This process's rank in its launcher's group (0 when not launched as a group)."""
    return int(os.environ.get("RANK", "0"))


def group_size() -> int:
    """The number of processes of this process's launcher's group (1 when not launched as a group)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched_as_group() -> bool:
    return group_size() > 1


def threads_per_process(processes: int) -> int:
    """The CPU threads each of `processes` local processes gets: the cores this process may use, shared."""
    return max(1, len(os.sched_getaffinity(0)) // processes)


def launch_local(processes: int, args: list[str], debug: bool = False) -> int:
    """Run `python -m cptkit *args` as `processes` local processes on loopback (gloo on CPU, NCCL on GPUs);
    return 0, or the exit code of the process that failed first. The processes print their own errors."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if not debug:  # the agent's lines (rendezvous, "failed (exitcode: 1)") repeat what the processes print
        logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    # torch's launcher would set 1 thread per process (and say so): share this machine's cores instead.
    os.environ.setdefault("OMP_NUM_THREADS", str(threads_per_process(processes)))
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=processes,
        run_id=str(uuid.uuid4()),
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",  # a free port, as `torchrun --standalone` does
        max_restarts=0,
        monitor_interval=0.1,
    )
    try:
        elastic_launch(config, sys.executable)("-m", "cptkit", *args)
    except ChildFailedError as exc:
        _, first = exc.get_first_failure()
        return first.exitcode if first.exitcode > 0 else 1
    return 0


def lost_the_main_process(exc: BaseException) -> bool:
    """Whether `exc` is another process's view of a failure of the main process: a collective whose peer
    closed its connection (gloo). The main process has printed the cause; repeating it as an internal
    error of every other process would bury it."""
    return (
        launched_as_group()
        and process_rank() != 0
        and isinstance(exc, RuntimeError)
        and any(text in str(exc) for text in ("Connection closed by peer", "Connection reset by peer"))
    )


def accelerate_cpu_processes() -> int | None:
    """The process count of an `accelerate launch --cpu --num_processes N` that started this process.

    accelerate starts one process for `--cpu` (more only through mpirun with --mpirun_hostfile), so the
    user's N processes would silently be one; train starts them itself instead. Read from the launcher's
    command line, the only place accelerate leaves N; None elsewhere (and on systems without /proc)."""
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() != "true" or launched_as_group():
        return None
    with contextlib.suppress(OSError):
        args = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().decode(errors="replace").split("\0")
        return requested_processes(args)
    return None


def requested_processes(launcher_args: list[str]) -> int | None:
    """N of `accelerate launch ... --num_processes N ...` (before the script or module), or None. The
    launcher runs as `accelerate launch`, `accelerate-launch` or `python -m accelerate.commands.launch`."""
    starts = [
        i
        for i, arg in enumerate(launcher_args)
        if arg in ("launch", "accelerate.commands.launch") or Path(arg).name == "accelerate-launch"
    ]
    if not starts:
        return None
    options = launcher_args[starts[0] + 1 :]
    for i, arg in enumerate(options):
        if arg in ("-m", "--module") or arg.endswith(".py"):  # what follows is the program's own arguments
            break
        name, _, value = arg.partition("=")
        if name in ("--num_processes", "--num-processes"):
            value = value or (options[i + 1] if i + 1 < len(options) else "")
            return int(value) if value.isdigit() and int(value) > 1 else None
    return None
