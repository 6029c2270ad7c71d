"""Training sharded over processes (`training.distributed: fsdp`): the model sharded with torch's FSDP2,
checkpoints written by every process (its own shard) with torch.distributed.checkpoint, and the trained
weights gathered on the main process to be saved in the same format as an unsharded run's.

FSDP2 (`torch.distributed.fsdp.fully_shard`), not FSDP1: it shards each parameter on its own (a DTensor),
so frozen base weights and trainable LoRA weights share a layer without FSDP1's flat parameters and
`use_orig_params`, 4-bit weights stored in the compute dtype shard like any other tensor, and its sharded
state dicts are what torch.distributed.checkpoint reads and writes. It is torch's supported FSDP (FSDP1 is
deprecated). The model is sharded here rather than by accelerate: accelerate 1.15 ignores its FSDP plugin
on a CPU, and `accelerate launch --cpu --use_fsdp` refuses to start.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from cptkit.artifacts import disk_full_errors
from cptkit.checkpoints import OPTIMIZER, RNG, STATE, TrainerState, checkpoint_dir, list_checkpoints

SHARDS = "sharded"  # the torch.distributed.checkpoint folder inside a checkpoint: one file per process
_PREFIX = "model."  # CausalLMLoss holds the language model as `model`


def sharded(distributed: str, processes: int) -> bool:
    """Whether a run shards its model: training.distributed fsdp on more than one process."""
    return distributed == "fsdp" and processes > 1


def shard(loss_model: Any, lm: Any, param_groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Shard `loss_model` (a CausalLMLoss around `lm`) over the process group: each transformer block on its
    own (its weights are gathered only while it runs), the rest (embeddings, final norm, a tied head) with
    the root. Returns `param_groups` with the sharded parameters (FSDP replaces every parameter)."""
    from torch.distributed.fsdp import fully_shard

    names = {id(p): n for n, p in loss_model.named_parameters()}
    grouped = [[names[id(p)] for p in group["params"]] for group in param_groups]
    base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
    blocks = set(getattr(base, "_no_split_modules", None) or [])
    for module in lm.modules():
        if type(module).__name__ in blocks:
            fully_shard(module)
    fully_shard(loss_model)
    params = dict(loss_model.named_parameters())
    return [{**group, "params": [params[n] for n in names]} for group, names in zip(param_groups, grouped, strict=True)]


def no_sync(accelerator: Any, model: Any) -> contextlib.AbstractContextManager[None]:
    """Gradients kept local for a micro batch that is not a step's last: FSDP's switch for a sharded model
    (accelerate's no_sync knows only DDP), accelerate's otherwise."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):
        return _fsdp_no_sync(model)
    return accelerator.no_sync(model)  # type: ignore[no-any-return]


@contextlib.contextmanager
def _fsdp_no_sync(model: Any) -> Iterator[None]:
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def _options(trainable_only: bool, **kwargs: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=trainable_only, **kwargs)


def gathered(loss_model: Any, trainable_only: bool) -> dict[str, Any]:
    """The whole weights (only the trainable ones with `trainable_only`), named as in the language model,
    on the main process's CPU; an empty dict on the others. A collective: every process calls it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    full = get_model_state_dict(loss_model, options=_options(trainable_only, full_state_dict=True, cpu_offload=True))
    # A tied head comes back under its own name too; an unsharded model's files hold it once.
    aliases = {n for n, _ in loss_model.named_parameters(remove_duplicate=False)} - dict(
        loss_model.named_parameters()
    ).keys()
    return {name.removeprefix(_PREFIX): tensor for name, tensor in full.items() if name not in aliases}


def load_gathered(loss_model: Any, weights: dict[str, Any]) -> None:
    """Load `weights` (as `gathered` returns them, read on the main process; the others pass {}) into the
    sharded model: the main process's values are sent to every process's shard. A collective."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    full = {_PREFIX + name: tensor for name, tensor in weights.items()}
    set_model_state_dict(
        loss_model, full, options=_options(True, full_state_dict=True, broadcast_from_rank0=True, strict=False)
    )


def save_sharded_checkpoint(
    root: Path,
    state: TrainerState,
    setup: Any,
    scheduler: Any,
    keep: int,
    rngs: list[dict[str, Any]],
    trainable_only: bool,
) -> None:
    """A checkpoint of a sharded run: every process writes its shard of the trainable weights and optimizer
    state (torch.distributed.checkpoint), the main process the scheduler, RNG and trainer states. Written
    under a temporary name that every process knows, renamed into place by the main process once complete
    (the trainer state last), so a group killed while saving leaves the previous checkpoint the latest. A
    collective: every process calls it."""
    import torch
    from torch.distributed.checkpoint import state_dict_saver
    from torch.distributed.checkpoint.state_dict import get_state_dict

    accelerator = setup.accelerator
    final = checkpoint_dir(root, state.step)
    tmp = root / f".tmp-{final.name}"  # clean_partial removes it after a kill
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    model_state, optimizer_state = get_state_dict(setup.model, setup.optimizer, options=_options(trainable_only))
    with disk_full_errors("checkpoint", final):
        # Every process writes its own files; the main process writes the metadata once all have.
        state_dict_saver.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=tmp / SHARDS)
        if not accelerator.is_main_process:
            return
        torch.save({"scheduler": scheduler.state_dict()}, tmp / OPTIMIZER)
        torch.save({"processes": rngs}, tmp / RNG)
        (tmp / STATE).write_text(json.dumps(asdict(state)), encoding="utf-8")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def load_sharded_checkpoint(path: Path, setup: Any, trainable_only: bool) -> tuple[TrainerState, Any, Any]:
    """Load a sharded checkpoint into the sharded model and optimizer (each process reads its shard; the
    run has as many processes as the one that wrote it). Returns (trainer state, scheduler state, the
    RNG states of every process). A collective."""
    import torch
    from torch.distributed.checkpoint import state_dict_loader
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optimizer_state = get_state_dict(setup.model, setup.optimizer, options=_options(trainable_only))
    both: dict[str, Any] = {"model": model_state, "optimizer": optimizer_state}
    state_dict_loader.load(both, checkpoint_id=path / SHARDS)
    set_state_dict(
        setup.model,
        setup.optimizer,
        model_state_dict=both["model"],
        optim_state_dict=both["optimizer"],
        # The frozen weights are not in the checkpoint (they come from the base model); a trainable one
        # missing from it has already failed the load above.
        options=_options(trainable_only, strict=not trainable_only),
    )
    state = TrainerState(**json.loads((path / STATE).read_text(encoding="utf-8")))
    scheduler = torch.load(path / OPTIMIZER, map_location="cpu", weights_only=False)["scheduler"]
    rng = torch.load(path / RNG, map_location="cpu", weights_only=False)
    return state, scheduler, rng
