"""Training checkpoints: everything needed to continue a run exactly where it stopped.

A checkpoint holds the trainable weights (safetensors), the optimizer and scheduler states, every RNG
state (of every process), the step, the loss history and the MLflow run id. It is written to a temporary folder and
renamed into place, so a run killed while saving leaves the previous checkpoint as the latest.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cptkit.artifacts import disk_full_errors

STATE = "trainer_state.json"
WEIGHTS = "trainable.safetensors"
OPTIMIZER = "optimizer.pt"
RNG = "rng.pt"


@dataclass
class TrainerState:
    step: int = 0  # optimizer steps completed
    tokens: int = 0  # real (non-padding) training tokens consumed
    replay_tokens: int = 0
    losses: list[float] = field(default_factory=list)
    learning_rates: list[float] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)  # each optimizer step's wall time
    evals: list[dict[str, float]] = field(default_factory=list)
    base_general_loss: float | None = None
    best: dict[str, Any] | None = None  # best eval within the forgetting budget
    stopped_reason: str | None = None
    run_id: str | None = None
    fingerprint: str = ""
    train_seconds: float = 0.0  # the training loop's wall time, evaluations (the base model's too) included
    eval_seconds: float = 0.0  # of which spent on validation losses
    # What training.method/precision auto chose: a checkpoint of another choice does not resume this run.
    method: str = ""
    precision: str = ""
    processes: int = 1  # processes of the run: the global batch and each one's share depend on it
    distributed: str = "ddp"  # fsdp: the weights and optimizer state are sharded (cptkit.fsdp's format)
    # The step count training.max_minutes gave, fixed once from the measured speed; None: not derived.
    planned_steps: int | None = None


def checkpoint_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:07d}"


def list_checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / STATE).is_file())


def save_checkpoint(
    root: Path,
    state: TrainerState,
    trainable: dict[str, Any],
    optimizer_state: dict[str, Any],
    keep: int,
    rngs: list[dict[str, Any]] | None = None,
) -> Path:
    """Save a checkpoint; `rngs`: every process's RNG states, in process order (default: this process's)."""
    import torch
    from safetensors.torch import save_file

    root.mkdir(parents=True, exist_ok=True)
    final = checkpoint_dir(root, state.step)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    try:
        # Inside the cleanup: a full disk is recognized by its free space, before the partial files go.
        with disk_full_errors("checkpoint", final):
            save_file({k: v.detach().cpu().contiguous() for k, v in trainable.items()}, str(tmp / WEIGHTS))
            torch.save(optimizer_state, tmp / OPTIMIZER)
            torch.save({"processes": rngs or [rng_states()]}, tmp / RNG)
            (tmp / STATE).write_text(json.dumps(asdict(state)), encoding="utf-8")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path) -> tuple[TrainerState, dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(state, trainable weights, optimizer state, rng states)."""
    import torch
    from safetensors.torch import load_file

    state = TrainerState(**json.loads((path / STATE).read_text(encoding="utf-8")))
    weights = load_file(str(path / WEIGHTS))
    optimizer = torch.load(path / OPTIMIZER, map_location="cpu", weights_only=False)
    rng = torch.load(path / RNG, map_location="cpu", weights_only=False)
    return state, weights, optimizer, rng


def clean_partial(root: Path) -> None:
    """Remove temporary folders left by a run killed while saving."""
    if root.is_dir():
        for tmp in root.glob(".tmp-*"):
            shutil.rmtree(tmp, ignore_errors=True)


def rng_states() -> dict[str, Any]:
    import torch

    states: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def process_rng(saved: dict[str, Any], process_index: int) -> dict[str, Any]:
    """Process `process_index`'s RNG states from a checkpoint's (a run on fewer processes: the main one's;
    a checkpoint from before multi-process training holds one process's states as they are)."""
    per_process = saved.get("processes")
    if per_process is None:
        return saved
    found: dict[str, Any] = per_process[process_index] if process_index < len(per_process) else per_process[0]
    return found


def restore_rng_states(states: dict[str, Any]) -> None:
    import torch

    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
