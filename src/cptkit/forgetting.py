"""The forgetting monitor of training: the general validation loss may rise at most
training.max_general_loss_increase above the base model's; the best domain loss within that budget is
kept (best.safetensors among the checkpoints), and a run that exceeds it stops there."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cptkit.artifacts import disk_full_errors
from cptkit.checkpoints import TrainerState
from cptkit.config import TrainingConfig
from cptkit.progress import console

BEST = "best.safetensors"


def forgetting_check(
    state: TrainerState, result: dict[str, float], tc: TrainingConfig, trainable: dict[str, Any], ckpt_root: Path
) -> bool:
    """Track the best evaluation within the general-loss budget; True when the budget is exceeded."""
    budget = tc.max_general_loss_increase
    general = result.get("eval/general_loss")
    if budget is None or general is None or state.base_general_loss is None:
        return False
    increase = general - state.base_general_loss
    if increase > budget:
        best_step = state.best["step"] if state.best else 0
        state.stopped_reason = (
            f"general validation loss rose by {increase:.4f} (> training.max_general_loss_increase {budget}) "
            f"at step {state.step}; keeping step {best_step}" + (" (the base model)" if best_step == 0 else "")
        )
        console.print(f"train: stopping: {state.stopped_reason}", style="yellow")
        return True
    if state.best is None or result["eval/domain_loss"] < state.best["eval/domain_loss"]:
        state.best = {"step": state.step, **result}
        _save_best(ckpt_root, trainable)
    return False


def _save_best(ckpt_root: Path, trainable: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    from cptkit.artifacts import atomic_path

    ckpt_root.mkdir(parents=True, exist_ok=True)
    with atomic_path(ckpt_root / BEST) as tmp, disk_full_errors("checkpoint", ckpt_root / BEST):
        save_file({k: v.detach().cpu().contiguous() for k, v in trainable.items()}, str(tmp))
