"""The train stage: continual pretraining with replay, packed document-isolated sequences, a forgetting
monitor, exact resume and MLflow tracking.

The loop is written out on `accelerate` (no `Trainer`); one optimizer step is `training_step`'s, which the
preflight times too. `train()` reads as set-up (`_set_up`), loop (`_loop`), finish (`_finish`).
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from cptkit.artifacts import (
    MANIFEST,
    disk_full_errors,
    invalidate,
    new_manifest,
    read_json,
    up_to_date,
    write_json_atomic,
)
from cptkit.budget import fit_budget
from cptkit.checkpoints import (
    STATE,
    TrainerState,
    clean_partial,
    list_checkpoints,
    load_checkpoint,
    process_rng,
    restore_rng_states,
    rng_states,
    save_checkpoint,
)
from cptkit.choices import TrainingChoices
from cptkit.config import Config, TrainingConfig, masked_dict
from cptkit.distributed import launched_as_group, process_rank
from cptkit.errors import StageError
from cptkit.folders import claim
from cptkit.forgetting import BEST, forgetting_check
from cptkit.fsdp import gathered, load_gathered, load_sharded_checkpoint, save_sharded_checkpoint
from cptkit.model_folder import SUMMARY
from cptkit.packing import Blocks, BlockStream, sequence_blocks
from cptkit.processes import die_with_parent
from cptkit.progress import console, detail, duration, event
from cptkit.results import ChoiceRecord, TrainingSummary
from cptkit.schedule import lr_factor
from cptkit.stage import StageResult
from cptkit.tracking import Tracker, open_tracker
from cptkit.train_data import TrainData, load_train_data, planned_steps, train_fingerprint
from cptkit.training_step import TrainingSetup, eval_loss, optimizer_step, set_up

CHECKPOINTS = "checkpoints"


# ---------------------------------------------------------------- the stage


@dataclass(frozen=True)
class TrainResult(StageResult):
    summary: TrainingSummary | None = None


def train(
    config: Config,
    force: bool = False,
    tracker_factory: Callable[..., Tracker] = open_tracker,
) -> TrainResult:
    """Train, resume from the latest checkpoint of the same configuration, or skip when up to date."""
    if launched_as_group():
        # torchrun's agent starts each process in a session of its own: a SIGKILL of the launcher's group
        # would leave them training (and writing) on their own.
        die_with_parent()
    # Under a multi-process launch only the main process writes the outputs, so only it holds the folder.
    if process_rank() != 0:
        return _train(config, force, tracker_factory)
    with claim(config.output_dir, "train"):
        return _train(config, force, tracker_factory)


def _train(config: Config, force: bool, tracker_factory: Callable[..., Tracker]) -> TrainResult:
    data = load_train_data(config)
    out = config.output_dir
    fingerprint = train_fingerprint(config, data)
    existing = up_to_date(out, fingerprint, fingerprint)
    if existing is not None and not force:
        return TrainResult(existing, out, skipped=True, summary=TrainingSummary.read(out / SUMMARY))
    run = _set_up(config, data, fingerprint, force, tracker_factory)
    try:
        _loop(run)
    except Exception:
        if run.tracker is not None:
            run.tracker.end("FAILED")
        raise
    except BaseException:  # KeyboardInterrupt: the checkpoints stay, and the next run resumes
        if run.tracker is not None:
            run.tracker.end("KILLED")
        raise
    return _finish(run, config, fingerprint)


@dataclass
class _Run:
    """What the training loop works with: set up once, then advanced step by step."""

    tc: TrainingConfig  # auto resolved: what this run trains with
    choices: TrainingChoices
    model_dir: Path
    setup: TrainingSetup
    scheduler: Any
    plan: dict[str, int]  # "total": the step count the schedule reads (a time budget sets it, then may lower it)
    cap_steps: int  # the most steps: max_steps or num_epochs
    stream: BlockStream
    epoch0: Blocks
    domain_val: Blocks
    general_val: Blocks | None
    state: TrainerState
    trainable: dict[str, Any]  # name -> the trainable parameter
    tracker: Tracker | None
    ckpt_root: Path
    started: float = 0.0  # when the loop's time started counting (the base model's validation included)
    seconds_before: float = 0.0  # train seconds of the run's earlier part (a resumed run)

    @property
    def budget(self) -> float | None:
        return self.tc.max_minutes * 60 if self.tc.max_minutes is not None else None

    def validate(self, step: int) -> dict[str, float]:
        """Validation losses of the domain (and general) sets, logged and recorded."""
        tc, device, accelerator = self.tc, self.setup.device, self.setup.accelerator
        # The processes share the passes' batches (the same numbers as one process).
        result = {
            "eval/domain_loss": eval_loss(
                self.setup.model, self.domain_val, tc.eval_max_sequences, tc.micro_batch_size, device, accelerator
            )
        }
        if self.general_val is not None:
            result["eval/general_loss"] = eval_loss(
                self.setup.model, self.general_val, tc.eval_max_sequences, tc.micro_batch_size, device, accelerator
            )
        if self.tracker is not None:
            self.tracker.log_metrics(result, step)
        self.state.evals.append({"step": step, **result})
        return result

    def forgetting_check(self, result: dict[str, float]) -> bool:
        """The forgetting monitor on the main process (it keeps the best weights); True: every process stops."""
        accelerator = self.setup.accelerator
        weights = self.trainable
        if self.setup.sharded and self.tc.max_general_loss_increase is not None:
            weights = gathered(self.setup.model, trainable_only=True)  # the best weights are kept whole
        stop = accelerator.is_main_process and forgetting_check(self.state, result, self.tc, weights, self.ckpt_root)
        return bool(_from_main(accelerator, stop))

    @property
    def trainable_only(self) -> bool:
        """Checkpoints and sharded state hold the trainable weights only (the adapters; all for full)."""
        return self.tc.method != "full"


def _all_rng_states(accelerator: Any) -> list[dict[str, Any]]:
    """Every process's RNG states, in process order (dropout masks differ by process: each resumes its own)."""
    if accelerator.num_processes == 1:
        return [rng_states()]
    from accelerate.utils import gather_object

    return list(gather_object([rng_states()]))


def _from_main(accelerator: Any, value: Any) -> Any:
    """The main process's `value`, in every process (a broadcast; `value` itself with one process)."""
    if accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value], from_process=0)[0]


def _set_up(
    config: Config, data: TrainData, fingerprint: str, force: bool, tracker_factory: Callable[..., Tracker]
) -> _Run:
    """Choices, checkpoints, model, optimizer and schedule, data stream, tracking: a run ready to loop
    (resumed where a checkpoint of the same configuration is)."""
    import torch

    from cptkit.choices import resolve_training
    from cptkit.models import resolve_model

    model_dir = resolve_model(config.model.name)
    choices = resolve_training(config.training, model_dir)
    tc = choices.apply(config.training)
    _print_choices(choices)
    ckpt_root = config.output_dir / CHECKPOINTS

    stream = BlockStream(
        data.domain_train, data.replay_train, config.data.replay_ratio, tc.seed, data.separator, tc.max_seq_length
    )
    plan: dict[str, int] = {}
    per_epoch = stream.blocks_per_epoch()

    def schedule(optimizer: Any, processes: int) -> Any:
        # With a time budget this is the most the run may take; the budget fixes the count after a few steps.
        plan["total"] = planned_steps(tc, per_epoch, processes)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, plan["total"], tc))

    setup, scheduler = set_up(model_dir, tc, choices, schedule)
    accelerator = setup.accelerator
    cap_steps = plan["total"]
    trainable = {n: p for n, p in setup.loaded.model.named_parameters() if p.requires_grad}
    # The main process alone touches the folder and decides where the run resumes; every process follows it.
    found: list[Path | None] = [None]
    if accelerator.is_main_process:
        clean_partial(ckpt_root)
        invalidate(config.output_dir)
        distributed = "fsdp" if setup.sharded else "ddp"
        found = [_resume_state(ckpt_root, fingerprint, force, tc, accelerator.num_processes, distributed)]
        if found[0] is None:
            shutil.rmtree(ckpt_root, ignore_errors=True)
    resume_from = _from_main(accelerator, found[0])
    if resume_from is not None:
        if setup.sharded:  # every process reads its shard
            state, scheduler_state, rng = load_sharded_checkpoint(resume_from, setup, tc.method != "full")
        else:
            state, weights, optim_state, rng = load_checkpoint(resume_from)
            _load_trainable(trainable, weights)
            setup.optimizer.load_state_dict(optim_state["optimizer"])
            scheduler_state = optim_state["scheduler"]
        plan["total"] = state.planned_steps or cap_steps
        scheduler.load_state_dict(scheduler_state)
        restore_rng_states(process_rng(rng, accelerator.process_index))
        console.print(f"train: resuming from {resume_from} (step {state.step} of {plan['total']})")
    else:
        state = TrainerState(
            fingerprint=fingerprint,
            method=tc.method,
            precision=tc.precision,
            processes=accelerator.num_processes,
            distributed="fsdp" if setup.sharded else "ddp",
        )

    epoch0 = stream.epoch_blocks(0)
    run_name = config.run_name("cpt", f"{dt.datetime.now():%Y%m%d-%H%M%S}")
    tracker = tracker_factory(config.tracking, state.run_id, run_name) if setup.accelerator.is_main_process else None
    if tracker is not None and state.run_id is None:
        state.run_id = tracker.run_id
        _log_run_start(tracker, config, data, setup.loaded.description, epoch0, per_epoch, cap_steps, choices)
    _print_plan(setup.loaded.description, epoch0, per_epoch, plan["total"], tc, accelerator.num_processes)
    if setup.sharded:
        processes = accelerator.num_processes
        console.print(f"train: the model is sharded over {processes} processes (FSDP2)", highlight=False)
    elif tc.distributed == "fsdp":
        console.print(
            "train: note: training.distributed fsdp shards the model over processes; with one process it is trained "
            "whole (launch several: cptkit train --processes N)",
            highlight=False,
        )
    if tc.max_minutes is not None and state.planned_steps is None:
        console.print(
            f"train: time budget {duration(tc.max_minutes * 60)} (training.max_minutes): the step count (at most "
            f"{cap_steps:,}) follows from the speed of the first steps",
            highlight=False,
        )
    return _Run(
        tc=tc,
        choices=choices,
        model_dir=model_dir,
        setup=setup,
        scheduler=scheduler,
        plan=plan,
        cap_steps=cap_steps,
        stream=stream,
        epoch0=epoch0,
        domain_val=sequence_blocks(data.domain_val, data.separator, tc.max_seq_length),
        general_val=(
            sequence_blocks(data.general_val, data.separator, tc.max_seq_length)
            if data.general_val is not None
            else None
        ),
        state=state,
        trainable=trainable,
        tracker=tracker,
        ckpt_root=ckpt_root,
    )


def _loop(run: _Run) -> None:
    """Optimizer steps until the planned count (or the forgetting monitor stops the run), with validation,
    checkpoints and the time budget's refits on the way."""
    tc, state, setup = run.tc, run.state, run.setup
    accelerator = setup.accelerator
    blocks_per_step = tc.micro_batch_size * tc.gradient_accumulation_steps
    global_blocks_per_step = blocks_per_step * accelerator.num_processes
    run.started = time.perf_counter()  # the time budget counts the base model's validation pass too
    run.seconds_before = state.train_seconds
    if state.step == 0 and not state.evals:
        base = run.validate(0)
        state.eval_seconds += time.perf_counter() - run.started
        state.base_general_loss = base.get("eval/general_loss")
        console.print("train: base model " + _format_eval(base))
        run.forgetting_check(base)  # the base is the first "best"

    setup.model.train()
    loop_started = time.perf_counter()
    steps_before = state.step
    step_times: list[float] = []  # this process's optimizer steps, validation and checkpoints excluded
    while state.step < run.plan["total"]:
        step_started = time.perf_counter()
        # Process p takes the p-th share of the global step's blocks: the blocks one process with gradient
        # accumulation N would take in its p-th group of micro batches.
        first = state.step * global_blocks_per_step + accelerator.process_index * blocks_per_step
        step = optimizer_step(setup, list(run.stream.batch(first, blocks_per_step)), tc, run.scheduler)
        state.step += 1
        state.tokens += step.real_tokens
        state.replay_tokens += step.replay_tokens
        state.losses.append(step.loss)
        state.learning_rates.append(step.learning_rate)
        elapsed = time.perf_counter() - step_started
        step_times.append(elapsed)
        state.step_seconds.append(round(elapsed, 4))
        if run.budget is not None:
            _refit_budget(run, step_times)
        total_steps = run.plan["total"]
        speed = step.real_tokens / max(elapsed, 1e-9)
        if run.tracker is not None and (state.step % tc.logging_steps == 0 or state.step == total_steps):
            run.tracker.log_metrics(
                {
                    "train/loss": step.loss,
                    "train/learning_rate": step.learning_rate,
                    "train/tokens_per_second": speed,
                    "train/replay_share": state.replay_tokens / max(state.tokens, 1),
                    "train/tokens": state.tokens,
                },
                state.step,
            )
        # From this process's own steps so far (validation passes included: they recur).
        eta = (time.perf_counter() - loop_started) / (state.step - steps_before) * (total_steps - state.step)
        detail(
            f"train: step {state.step}/{total_steps} loss {step.loss:.4f} lr {step.learning_rate:.2e} "
            f"{speed:,.0f} tok/s, ETA {duration(eta)}"
        )
        event(
            "train_step",
            step=state.step,
            total_steps=total_steps,
            loss=step.loss,
            learning_rate=step.learning_rate,
            tokens_per_second=speed,
            eta_seconds=eta,
        )
        if state.step % tc.eval_steps == 0 or state.step == total_steps:
            eval_started = time.perf_counter()
            result = run.validate(state.step)
            state.eval_seconds += time.perf_counter() - eval_started
            detail(f"train: step {state.step} " + _format_eval(result))
            event("train_eval", step=state.step, **{k.split("/")[-1]: v for k, v in result.items()})
            if run.forgetting_check(result):
                break
        if state.step % tc.save_steps == 0 and state.step < total_steps:
            state.train_seconds = run.seconds_before + time.perf_counter() - run.started
            rngs = _all_rng_states(accelerator)  # a collective: every process takes part
            if setup.sharded:  # every process writes its shard
                save_sharded_checkpoint(
                    run.ckpt_root, state, setup, run.scheduler, tc.save_total_limit, rngs, run.trainable_only
                )
            elif accelerator.is_main_process:
                optim_state = {"optimizer": setup.optimizer.state_dict(), "scheduler": run.scheduler.state_dict()}
                save_checkpoint(run.ckpt_root, state, run.trainable, optim_state, tc.save_total_limit, rngs)
    state.train_seconds = run.seconds_before + time.perf_counter() - run.started


def _refit_budget(run: _Run, step_times: list[float]) -> None:
    """Fix (or lower) the step count for training.max_minutes after a step, and fit the schedule to it."""
    assert run.budget is not None
    state = run.state
    spent = run.seconds_before + time.perf_counter() - run.started
    trainable_count = sum(p.numel() for p in run.trainable.values())
    fitted = fit_budget(run.tc, run.budget - spent, state, step_times, run.plan["total"], trainable_count)
    # Each process times its own steps: the main process's count is the one every process follows.
    fitted = _from_main(run.setup.accelerator, fitted)
    if fitted is None:
        return
    first = state.planned_steps is None
    state.planned_steps = run.plan["total"] = fitted
    # The scheduler has set the next step's rate on the old count: set it on the new one.
    run.scheduler.last_epoch -= 1
    run.scheduler.step()
    what = f"{fitted:,} steps fit the time budget" if first else "behind the time budget: ends at step"
    console.print(
        f"train: {what}{'' if first else f' {fitted:,}'} ({duration(run.budget - spent)} left after "
        f"{state.step} steps); the learning-rate schedule ends there",
        highlight=False,
    )
    event("train_budget", planned_steps=fitted, step=state.step, budget_seconds=run.budget)
    if run.tracker is not None:
        run.tracker.log_metrics({"data/total_steps": fitted}, state.step)


def _finish(run: _Run, config: Config, fingerprint: str) -> TrainResult:
    """Keep the best weights where the forgetting monitor stopped the run, write the trained model and its
    summary, end the MLflow run: on the main process, while the others wait."""
    state, tc, out = run.state, run.tc, config.output_dir
    loaded = run.setup.loaded
    summary = _summary(state, tc, run.epoch0, run.plan["total"], loaded.description, run.choices, run.cap_steps)
    # This process's part of the run (a resumed run's earlier part is not included).
    summary = replace(summary, peak_memory_bytes=run.setup.memory.peak_bytes(), peak_memory_kind=run.setup.memory.kind)
    whole: dict[str, Any] | None = None
    if run.setup.sharded:  # collectives: the best weights sent to every shard, then all gathered to the main process
        accelerator = run.setup.accelerator
        if _from_main(accelerator, state.best is not None and state.stopped_reason is not None):
            best: dict[str, Any] = {}
            if accelerator.is_main_process:
                from safetensors.torch import load_file

                best = load_file(str(run.ckpt_root / BEST))
            load_gathered(run.setup.model, best)
        whole = gathered(run.setup.model, trainable_only=run.trainable_only)
    if run.setup.accelerator.is_main_process:
        _write_trained(run, config, fingerprint, summary, whole)
    run.setup.accelerator.wait_for_everyone()
    return TrainResult(read_json(out / MANIFEST) or {}, out, skipped=False, summary=summary)


def _write_trained(
    run: _Run, config: Config, fingerprint: str, summary: TrainingSummary, whole: dict[str, Any] | None
) -> None:
    """`whole`: a sharded model's gathered weights (the best ones already loaded), saved in their place."""
    state, out = run.state, config.output_dir
    if state.best is not None and state.stopped_reason is not None and whole is None:
        from safetensors.torch import load_file

        _load_trainable(run.trainable, load_file(str(run.ckpt_root / BEST)))
    try:
        # The saved config names what was trained (auto resolved), for evaluate, register and export.
        with disk_full_errors("the trained model", out):
            _write_outputs(
                config.model_copy(update={"training": run.tc}),
                run.setup.loaded.model,
                run.model_dir,
                summary,
                fingerprint,
                whole,
            )
    except BaseException:  # the run has no model: its MLflow run must not stay RUNNING
        if run.tracker is not None:
            run.tracker.end("FAILED")
        raise
    if run.tracker is not None:
        run.tracker.log_dict(summary.to_json(), SUMMARY)
        if summary.final_loss is not None:  # None only for a run of no steps
            run.tracker.log_metrics({"train/final_loss": summary.final_loss}, state.step)
        run.tracker.end("FINISHED")
    shutil.rmtree(run.ckpt_root, ignore_errors=True)


def _resume_state(
    ckpt_root: Path, fingerprint: str, force: bool, tc: TrainingConfig, processes: int, distributed: str = "ddp"
) -> Path | None:
    """The checkpoint to resume from: the latest one of this same run (same fingerprint, the same method
    and precision where auto chose them, the same number of processes, sharded or not)."""
    found = list_checkpoints(ckpt_root)
    if not found or force:
        return None
    latest = found[-1]
    state = read_json(latest / STATE) or {}
    if state.get("fingerprint") != fingerprint:
        console.print(f"train: {ckpt_root} holds checkpoints of a different configuration; starting a new run")
        return None
    chosen = (state.get("method") or tc.method, state.get("precision") or tc.precision)
    if chosen != (tc.method, tc.precision):
        console.print(
            f"train: {ckpt_root} holds checkpoints trained with {chosen[0]} in {chosen[1]}, and this machine "
            f"chooses {tc.method} in {tc.precision}; starting a new run"
        )
        return None
    if state.get("processes", 1) != processes:
        console.print(
            f"train: {ckpt_root} holds checkpoints of a run on {state.get('processes', 1)} processes, and this one "
            f"runs on {processes}; starting a new run"
        )
        return None
    if state.get("distributed", "ddp") != distributed:
        console.print(
            f"train: {ckpt_root} holds checkpoints of a {state.get('distributed', 'ddp')} run, and this one is "
            f"{distributed}; starting a new run"
        )
        return None
    return latest


def _load_trainable(trainable: dict[str, Any], weights: dict[str, Any]) -> None:
    import torch

    missing = set(trainable) - set(weights)
    if missing:
        raise StageError(f"checkpoint does not match the model: missing {sorted(missing)[:3]}")
    with torch.no_grad():
        for name, param in trainable.items():
            param.copy_(weights[name].to(param.device, param.dtype))


def _print_choices(choices: TrainingChoices) -> None:
    for line in choices.lines():
        console.print(f"train: {line}", highlight=False, markup=False, soft_wrap=True)
    for warning in choices.warnings:
        console.print(f"train: warning: {warning}", style="yellow", highlight=False, markup=False, soft_wrap=True)


def _format_eval(result: dict[str, float]) -> str:
    return ", ".join(f"{k.split('/')[-1]} {v:.4f}" for k, v in result.items())


def _print_plan(
    description: Any, epoch0: Blocks, per_epoch: int, total_steps: int, tc: TrainingConfig, processes: int
) -> None:
    per_step = f"{tc.micro_batch_size}x{tc.gradient_accumulation_steps}"
    if processes > 1:
        per_step += f"x{processes} processes = {tc.micro_batch_size * tc.gradient_accumulation_steps * processes}"
    console.print(
        f"train: {description}\n"
        f"train: {per_epoch:,} blocks of {tc.max_seq_length} tokens per epoch, packing efficiency "
        f"{epoch0.efficiency:.1%}, replay share {epoch0.replay_share:.1%}; {total_steps:,} steps of "
        f"{per_step} blocks; precision {tc.precision}",
        highlight=False,
    )


def _log_run_start(
    tracker: Tracker,
    config: Config,
    data: TrainData,
    description: Any,
    epoch0: Blocks,
    per_epoch: int,
    total_steps: int,
    choices: TrainingChoices,
) -> None:
    masked = masked_dict(config)
    tracker.log_params(masked)
    tracker.log_dict(masked, "config.yaml")
    tracker.log_params(choices.params())
    tracker.log_dict(choices.as_dict(), "capability.json")
    for name, manifest in data.manifests.items():
        tracker.log_dict(manifest, f"data/{name}_manifest.json")
        counts = {k: manifest.get(k) for k in ("documents_kept", "train_documents", "val_documents", "train_tokens")}
        source = manifest.get("source") or {}
        tracker.log_input(f"{name}-train", str(manifest["input_fingerprint"]), source, "training", counts)
        tracker.log_input(f"{name}-val", str(manifest["input_fingerprint"]), source, "validation", counts)
    tracker.set_tags({"cptkit.model": config.model.name, "cptkit.method": choices.method.value})
    tracker.log_metrics(
        {
            "data/packing_efficiency": epoch0.efficiency,
            "data/blocks_per_epoch": per_epoch,
            "data/total_steps": total_steps,
        },
        0,
    )


def _summary(
    state: TrainerState,
    tc: TrainingConfig,
    epoch0: Blocks,
    total_steps: int,
    description: Any,
    choices: TrainingChoices,
    cap_steps: int,
) -> TrainingSummary:
    last_eval = state.evals[-1] if state.evals else {}
    return TrainingSummary(
        steps=state.step,
        planned_steps=total_steps,
        tokens=state.tokens,
        replay_tokens=state.replay_tokens,
        replay_share=state.replay_tokens / max(state.tokens, 1),
        # Training throughput: the loop's time less the validation passes.
        tokens_per_second=state.tokens / max(state.train_seconds - state.eval_seconds, 1e-9),
        train_seconds=round(state.train_seconds, 2),
        eval_seconds=round(state.eval_seconds, 2),
        final_loss=state.losses[-1] if state.losses else None,
        losses=state.losses,
        learning_rates=state.learning_rates,
        step_seconds=state.step_seconds,
        evals=state.evals,
        base_general_loss=state.base_general_loss,
        final_eval=last_eval,
        best=state.best,
        stopped_reason=state.stopped_reason,
        packing_efficiency=epoch0.efficiency,
        precision=tc.precision,
        method=tc.method,
        device=choices.device.value,
        choices={w: ChoiceRecord(value=c.value, reason=c.reason) for w, c in _named_choices(choices)},
        max_minutes=tc.max_minutes,
        # The budget's step count (None without training.max_minutes, or when the cap came first).
        derived_steps=state.planned_steps,
        max_planned_steps=cap_steps,
        model=str(description),
        mlflow_run_id=state.run_id,
    )


def _named_choices(choices: TrainingChoices) -> list[tuple[str, Any]]:
    return [("device", choices.device), ("precision", choices.precision), ("method", choices.method)]


def _write_outputs(
    config: Config,
    model: Any,
    model_dir: Path,
    summary: TrainingSummary,
    fingerprint: str,
    whole: dict[str, Any] | None = None,
) -> None:
    from transformers import AutoTokenizer

    from cptkit.models import save_trained

    out = config.output_dir
    out.mkdir(parents=True, exist_ok=True)
    staging = out / ".staging"
    shutil.rmtree(staging, ignore_errors=True)
    save_trained(model, staging / "model", whole)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(staging / "model")
    (staging / "model" / "cptkit_config.yaml").write_text(
        yaml.safe_dump(masked_dict(config), sort_keys=False), encoding="utf-8"
    )
    names = []
    for item in sorted((staging / "model").iterdir()):
        os.replace(item, out / item.name)
        names.append(item.name)
    shutil.rmtree(staging, ignore_errors=True)
    write_json_atomic(out / SUMMARY, summary.to_json())
    manifest = new_manifest("train", fingerprint, fingerprint)
    manifest.update(
        outputs={n: {"bytes": (out / n).stat().st_size} for n in [*names, SUMMARY] if (out / n).is_file()},
        base_model=config.model.name,
        base_model_path=str(model_dir),
        summary={
            "steps": summary.steps,
            "tokens": summary.tokens,
            "tokens_per_second": summary.tokens_per_second,
            "final_loss": summary.final_loss,
            "replay_share": summary.replay_share,
        },
    )
    write_json_atomic(out / MANIFEST, manifest)
