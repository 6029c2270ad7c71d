"""One optimizer step, and the set-up it runs in: shared by train and by the preflight's timed steps, so
the preflight measures exactly what training will do.

A step is `gradient_accumulation_steps` micro batches of packed blocks; the loss is the mean over every
labelled token of the step (across processes too), so accumulation and multiple processes give the same
update as one big batch.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from types import MethodType
from typing import Any

import numpy as np

from cptkit.choices import TrainingChoices
from cptkit.config import TrainingConfig
from cptkit.errors import ConfigError
from cptkit.fsdp import no_sync, shard, sharded
from cptkit.memory import PeakMemory
from cptkit.models import TrainableModel
from cptkit.packing import IGNORE, Blocks, PackedRow


@dataclass
class TrainingSetup:
    accelerator: Any  # accelerate.Accelerator
    loaded: TrainableModel
    model: Any  # the CausalLMLoss around loaded.model, as accelerate prepared it
    optimizer: Any
    memory: PeakMemory  # reset before the model was loaded
    sharded: bool = False  # the model is sharded with FSDP (training.distributed fsdp, several processes)

    @property
    def device(self) -> Any:
        return self.accelerator.device


def set_up(
    model_dir: Path, tc: TrainingConfig, choices: TrainingChoices, scheduler_factory: Any = None
) -> tuple[TrainingSetup, Any]:
    """The accelerator, the model loaded for training (with the resolved `tc`), its loss wrapper and the
    AdamW optimizer, prepared by accelerate; and the scheduler `scheduler_factory(optimizer, processes)`
    makes, if given (made before accelerate wraps the optimizer, as accelerate expects). Returns
    (TrainingSetup, scheduler or None)."""
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    from cptkit.loss import CausalLMLoss
    from cptkit.models import load_for_training

    device = torch.device(choices.device.value)
    # accelerate keeps its state in process-wide singletons; a second training in one process (the demo,
    # a notebook, the preflight before train) may use another precision, which accelerate refuses unless the
    # state is reset first. The process group itself (partial state) is kept, so this is safe under
    # `accelerate launch` too.
    AcceleratorState._reset_state()
    GradientState._reset_state()
    accelerator = Accelerator(mixed_precision=choices.mixed_precision, cpu=device.type == "cpu")
    is_sharded = sharded(tc.distributed, accelerator.num_processes)
    if is_sharded and choices.mixed_precision == "fp16":
        # fp16 needs a gradient scaler whose skipped steps agree across the shards (FSDP's own), not accelerate's.
        raise ConfigError(
            [
                "error: training.precision auto chose fp16 on this device, and training.distributed fsdp trains in "
                "bf16 or fp32: set training.precision"
            ]
        )
    memory = PeakMemory(accelerator.device)
    memory.reset()
    torch.manual_seed(tc.seed)
    loaded = load_for_training(model_dir, tc, accelerator.device, for_fsdp=is_sharded)
    model = CausalLMLoss(loaded.model)
    param_groups = loaded.param_groups
    if is_sharded:
        # accelerate would wrap the sharded model in DDP (it applies FSDP only on GPUs): it prepares nothing,
        # and the forward runs under the autocast it would have added.
        param_groups = shard(model, loaded.model, param_groups)
        if choices.mixed_precision == "bf16":
            autocast = torch.autocast(accelerator.device.type, torch.bfloat16)
            model.forward = MethodType(autocast(type(model).forward), model)  # type: ignore[method-assign]
    optimizer = torch.optim.AdamW(param_groups, lr=tc.learning_rate, weight_decay=tc.weight_decay)
    scheduler = scheduler_factory(optimizer, accelerator.num_processes) if scheduler_factory is not None else None
    if not is_sharded:
        model, optimizer = accelerator.prepare(model, optimizer)
    return TrainingSetup(accelerator, loaded, model, optimizer, memory, is_sharded), scheduler


@dataclass(frozen=True)
class StepResult:
    loss: float  # mean next-token loss over the step's labelled tokens, all processes
    learning_rate: float  # the rate this update was made with
    real_tokens: int  # all processes
    replay_tokens: int  # all processes


def labelled_tokens(rows: list[PackedRow]) -> int:
    """Tokens that get a loss: labels shift by one, so a block's first label is never predicted."""
    return sum(int((r.labels[1:] != IGNORE).sum()) for r in rows)


def optimizer_step(
    setup: TrainingSetup, rows: list[PackedRow], tc: TrainingConfig, scheduler: Any = None
) -> StepResult:
    """One optimizer step over this process's `rows` (micro batches of tc.micro_batch_size)."""
    import torch

    accelerator, model, optimizer = setup.accelerator, setup.model, setup.optimizer
    processes = accelerator.num_processes
    micro = [rows[i : i + tc.micro_batch_size] for i in range(0, len(rows), tc.micro_batch_size)]
    # One all-reduce for the step's counts: the loss is normalised by the labelled tokens of every process.
    counts = [labelled_tokens(rows), sum(r.real_tokens for r in rows), sum(r.replay_tokens for r in rows)]
    global_count, real_tokens, replay_tokens = (
        int(c) for c in accelerator.reduce(torch.tensor(counts, device=setup.device), "sum").tolist()
    )
    loss_sum = 0.0
    for k, group in enumerate(micro):
        # Gradients are synchronised across processes once per step, on its last micro batch.
        sync = contextlib.nullcontext() if k == len(micro) - 1 else no_sync(accelerator, model)
        with sync:
            total, _ = model(*block_tensors(group, setup.device))
            # DDP and FSDP average the processes' gradients; times `processes`, that average is the gradient of the
            # summed loss of every process's tokens over the global token count: one big batch's.
            accelerator.backward(total * processes / max(global_count, 1))
            loss_sum += float(total.detach())
    if tc.max_grad_norm is not None:
        accelerator.clip_grad_norm_(model.parameters(), tc.max_grad_norm)
    lr = float(optimizer.param_groups[0]["lr"])
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    loss_sum = float(accelerator.reduce(torch.tensor(loss_sum, device=setup.device), "sum"))
    return StepResult(
        loss=loss_sum / max(global_count, 1),
        learning_rate=lr,
        real_tokens=real_tokens,
        replay_tokens=replay_tokens,
    )


def block_tensors(rows: list[PackedRow] | list[tuple[np.ndarray, np.ndarray, np.ndarray]], device: Any) -> Any:
    """(input_ids, position_ids, labels) of `rows` as batch tensors on `device`."""
    import torch

    return tuple(torch.from_numpy(np.stack([r[i] for r in rows])).to(device) for i in range(3))


def eval_loss(
    model: Any, blocks: Blocks, max_sequences: int | None, batch_size: int, device: Any, accelerator: Any = None
) -> float:
    """Mean next-token loss over the first `max_sequences` blocks; `model` is a CausalLMLoss.

    With the `accelerator` of several processes, each runs its share of the batches (batch k on process
    k mod N) and the per-batch sums are all-reduced, then added in batch order: the result is bit for bit
    one process's. Every process runs as many forwards (the last round's spares repeat batch 0 and are not
    counted), since a DDP forward broadcasts buffers and an FSDP forward gathers parameters, collectively."""
    import torch

    n = len(blocks) if max_sequences is None else min(len(blocks), max_sequences)
    processes = 1 if accelerator is None else accelerator.num_processes
    rank = 0 if accelerator is None else accelerator.process_index
    starts = list(range(0, n, batch_size))
    sums = torch.zeros((len(starts), 2), dtype=torch.float64)  # (loss sum, labelled tokens) per batch
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for first in range(0, len(starts), processes):
            k = first + rank
            start = starts[k] if k < len(starts) else starts[0]
            rows = [blocks.block(i) for i in range(start, min(start + batch_size, n))]
            s, c = model(*block_tensors(rows, device))
            if k < len(starts):
                sums[k, 0], sums[k, 1] = float(s), int(c)
    if was_training:
        model.train()
    if processes > 1:  # each entry is one process's value plus zeros: exact
        sums = accelerator.reduce(sums.to(device), "sum").cpu()
    total = 0.0
    for value in sums[:, 0].tolist():
        total += value
    return total / max(int(sums[:, 1].sum()), 1)
