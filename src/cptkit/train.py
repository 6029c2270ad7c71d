"""The train stage: continual pretraining with replay, packed document-isolated sequences, a forgetting
monitor, exact resume and MLflow tracking.

The loop is written out on `accelerate` (no `Trainer`): one optimizer step is `gradient_accumulation_steps`
micro batches of packed blocks; the loss is the mean over every labelled token of the step, so
accumulation and multiple processes give the same update as one big batch.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
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
from cptkit.checkpoints import (
    STATE,
    TrainerState,
    clean_partial,
    list_checkpoints,
    load_checkpoint,
    restore_rng_states,
    save_checkpoint,
)
from cptkit.choices import TrainingChoices
from cptkit.config import Config, TrainingConfig, masked_dict, section_fingerprint
from cptkit.datasets import Dataset, datasets
from cptkit.errors import ConfigError, StageError
from cptkit.folders import claim
from cptkit.memory import PeakMemory
from cptkit.model_folder import SUMMARY
from cptkit.packing import SEPARATOR_TOKEN, Blocks, BlockStream, TokenDocs, sequence_blocks
from cptkit.progress import console, detail, duration, event
from cptkit.results import ChoiceRecord, TrainingSummary
from cptkit.schedule import lr_factor
from cptkit.stage import StageResult
from cptkit.tracking import Tracker, open_tracker

CHECKPOINTS = "checkpoints"
BEST = "best.safetensors"


# ---------------------------------------------------------------- data


@dataclass(frozen=True)
class TrainData:
    domain_train: TokenDocs
    domain_val: TokenDocs
    replay_train: TokenDocs | None
    general_val: TokenDocs | None
    separator: int
    manifests: dict[str, dict[str, Any]]  # dataset name -> prepare manifest


def read_tokens(path: Path) -> TokenDocs:
    column = pq.read_table(path, columns=["input_ids"]).column("input_ids").combine_chunks()
    values = column.values.to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
    offsets = column.offsets.to_numpy().astype(np.int64)
    return TokenDocs(values, offsets - offsets[0])


def _dataset_tokens(dataset: Dataset) -> tuple[TokenDocs, TokenDocs, dict[str, Any]]:
    manifest = read_json(dataset.directory / MANIFEST)
    if manifest is None or manifest.get("stage") != "prepare":
        raise StageError(f"{dataset.directory}: the {dataset.name} data is not prepared; run `cptkit prepare` first")
    if manifest.get("tokenizer") is None:
        raise StageError(
            f"{dataset.directory}: the {dataset.name} data was prepared without tokens; "
            "set prepare.tokenize: true and run `cptkit prepare`"
        )
    return read_tokens(dataset.tokens("train")), read_tokens(dataset.tokens("val")), manifest


def separator_id(tokenizer_info: dict[str, Any]) -> int:
    """The token between packed documents: `<|endoftext|>` where the vocabulary has it (the pretraining
    separator of most small models, also of instruct variants whose eos is a chat token), else eos."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(tokenizer_info["path"])
    found = tok.token_to_id(SEPARATOR_TOKEN)
    if found is not None:
        return int(found)
    if tokenizer_info.get("eos_token_id") is not None:
        return int(tokenizer_info["eos_token_id"])
    raise StageError(f"tokenizer {tokenizer_info['name']} has neither {SEPARATOR_TOKEN} nor an eos token")


def require_replay_source(config: Config) -> None:
    if config.data.replay_ratio > 0 and config.data.replay is None:
        raise ConfigError(
            [
                f"config error: data.replay: required when data.replay_ratio > 0 (it is {config.data.replay_ratio}); "
                "set a replay source, or data.replay_ratio: 0 to train on domain text only"
            ]
        )


def load_train_data(config: Config) -> TrainData:
    require_replay_source(config)
    sets = {d.name: d for d in datasets(config)}
    domain_train, domain_val, domain_manifest = _dataset_tokens(sets["domain"])
    manifests = {"domain": domain_manifest}
    replay_train = general_val = None
    if "replay" in sets:
        replay_train, general_val, manifests["replay"] = _dataset_tokens(sets["replay"])
        if manifests["replay"]["tokenizer"]["fingerprint"] != domain_manifest["tokenizer"]["fingerprint"]:
            raise StageError("the domain and replay data were tokenized differently; rerun `cptkit prepare`")
    if len(domain_train) == 0:
        raise StageError(f"{sets['domain'].directory}: no domain training documents were kept by prepare")
    return TrainData(
        domain_train,
        domain_val,
        replay_train if config.data.replay_ratio > 0 else None,
        general_val,
        separator_id(domain_manifest["tokenizer"]),
        manifests,
    )


def train_fingerprint(config: Config, data: TrainData) -> str:
    inputs = {name: (m["config_fingerprint"], m["input_fingerprint"]) for name, m in data.manifests.items()}
    return section_fingerprint(config.training, config.model, config.data.replay_ratio, inputs)


def planned_steps(tc: TrainingConfig, blocks_per_epoch: int, num_processes: int = 1) -> int:
    """Optimizer steps of a run: training.max_steps, else enough for num_epochs passes over the epoch's blocks."""
    global_blocks_per_step = tc.micro_batch_size * tc.gradient_accumulation_steps * num_processes
    return tc.max_steps or max(1, math.ceil(tc.num_epochs * blocks_per_epoch / global_blocks_per_step))


# ---------------------------------------------------------------- device, precision, method, time budget

# Steps timed before a time budget (training.max_minutes) fixes the step count: the first step of a process
# is not timed (it pays for allocation and kernel selection); then _BUDGET_TIMED_STEPS, fewer when they
# already take a quarter of the budget. Their median is the speed (steps slowed by other work, or still
# warming up, do not set it unless they are most of them).
_BUDGET_TIMED_STEPS = 5
_BUDGET_TIMED_SHARE = 0.25
_BUDGET_RECENT_STEPS = 5
# A checkpoint's cost for the budget: its bytes (weights and two AdamW moments) at a slow disk's rate.
_SAVE_BYTES_PER_SECOND = 100e6


def choose_for_training(config: Config, model_dir: Path) -> TrainingChoices:
    """Device, precision and method for this machine (auto resolved from the measured capability)."""
    from cptkit.choices import resolve_training

    return resolve_training(config.training, model_dir)


def print_choices(choices: TrainingChoices, prefix: str) -> None:
    for line in choices.lines():
        console.print(f"{prefix}: {line}", highlight=False, markup=False, soft_wrap=True)
    for warning in choices.warnings:
        console.print(f"{prefix}: warning: {warning}", style="yellow", highlight=False, markup=False, soft_wrap=True)


def budget_steps(
    tc: TrainingConfig, remaining: float, done: int, cap: int, step_seconds: float, eval_seconds: float, trainable: int
) -> int:
    """The step count that fits the rest of training.max_minutes at the measured speed."""
    from cptkit.schedule import steps_within

    save_seconds = trainable * 12 / _SAVE_BYTES_PER_SECOND
    return steps_within(remaining, done, cap, step_seconds, eval_seconds, save_seconds, tc.eval_steps, tc.save_steps)


def _tensors(rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]], device: Any) -> tuple[Any, Any, Any]:
    import torch

    ids, pos, labels = (torch.from_numpy(np.stack(col)).to(device) for col in zip(*rows, strict=True))
    return ids, pos, labels


def eval_loss(model: Any, blocks: Blocks, max_sequences: int | None, batch_size: int, device: Any) -> float:
    """Mean next-token loss over the first `max_sequences` blocks; `model` is a CausalLMLoss."""
    import torch

    n = len(blocks) if max_sequences is None else min(len(blocks), max_sequences)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, n, batch_size):
            rows = [blocks.block(i) for i in range(start, min(start + batch_size, n))]
            s, c = model(*_tensors(rows, device))
            total += float(s)
            count += int(c)
    if was_training:
        model.train()
    return total / max(count, 1)


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
    # Under a multi-process launch only the main process writes the outputs, so only it holds the folder.
    if int(os.environ.get("RANK", "0")) != 0:
        return _train(config, force, tracker_factory)
    with claim(config.output_dir, "train"):
        return _train(config, force, tracker_factory)


def _train(config: Config, force: bool, tracker_factory: Callable[..., Tracker]) -> TrainResult:
    import torch
    from accelerate import Accelerator

    data = load_train_data(config)
    out = config.output_dir
    fingerprint = train_fingerprint(config, data)
    existing = up_to_date(out, fingerprint, fingerprint)
    if existing is not None and not force:
        return TrainResult(existing, out, skipped=True, summary=TrainingSummary.read(out / SUMMARY))

    from cptkit.models import load_for_training, resolve_model

    model_dir = resolve_model(config.model.name)
    choices = choose_for_training(config, model_dir)
    tc = choices.apply(config.training)  # auto resolved: what this run trains with
    print_choices(choices, "train")
    ckpt_root = out / CHECKPOINTS
    clean_partial(ckpt_root)
    invalidate(out)
    state, resume_from = _resume_state(ckpt_root, fingerprint, force, tc)

    device = torch.device(choices.device.value)
    # accelerate keeps its state in process-wide singletons; a second train() in one process (the demo,
    # a notebook) may use another precision, which accelerate refuses unless the state is reset first.
    # The process group itself (partial state) is kept, so this is safe under `accelerate launch` too.
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state()
    GradientState._reset_state()
    accelerator = Accelerator(mixed_precision=choices.mixed_precision, cpu=device.type == "cpu")
    from cptkit.loss import CausalLMLoss

    memory = PeakMemory(accelerator.device)
    memory.reset()
    torch.manual_seed(tc.seed)
    loaded = load_for_training(model_dir, tc, accelerator.device)
    model = CausalLMLoss(loaded.model)
    optimizer = torch.optim.AdamW(loaded.param_groups, lr=tc.learning_rate, weight_decay=tc.weight_decay)

    stream = BlockStream(
        data.domain_train, data.replay_train, config.data.replay_ratio, tc.seed, data.separator, tc.max_seq_length
    )
    blocks_per_step = tc.micro_batch_size * tc.gradient_accumulation_steps
    global_blocks_per_step = blocks_per_step * accelerator.num_processes
    per_epoch = stream.blocks_per_epoch()
    # With a time budget this is the most the run may take; the budget fixes the count after a few steps.
    cap_steps = planned_steps(tc, per_epoch, accelerator.num_processes)
    plan = {"total": cap_steps}  # read by the schedule at every step: a time budget sets it, then may lower it
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, plan["total"], tc))
    model, optimizer = accelerator.prepare(model, optimizer)

    trainable = {n: p for n, p in loaded.model.named_parameters() if p.requires_grad}
    if resume_from is not None:
        state, weights, optim_state, rng = load_checkpoint(resume_from)
        plan["total"] = state.planned_steps or cap_steps
        _load_trainable(trainable, weights)
        optimizer.load_state_dict(optim_state["optimizer"])
        scheduler.load_state_dict(optim_state["scheduler"])
        restore_rng_states(rng)
        console.print(f"train: resuming from {resume_from} (step {state.step} of {plan['total']})")
    else:
        shutil.rmtree(ckpt_root, ignore_errors=True)
        state = TrainerState(fingerprint=fingerprint, method=tc.method, precision=tc.precision)

    domain_val = sequence_blocks(data.domain_val, data.separator, tc.max_seq_length)
    general_val = (
        sequence_blocks(data.general_val, data.separator, tc.max_seq_length) if data.general_val is not None else None
    )
    epoch0 = stream.epoch_blocks(0)
    run_name = config.tracking.run_name or f"cpt-{Path(config.model.name).name}-{dt.datetime.now():%Y%m%d-%H%M%S}"
    tracker = tracker_factory(config.tracking, state.run_id, run_name) if accelerator.is_main_process else None
    if tracker is not None and state.run_id is None:
        state.run_id = tracker.run_id
        _log_run_start(tracker, config, data, loaded.description, epoch0, per_epoch, cap_steps, choices)

    _print_plan(loaded.description, epoch0, per_epoch, plan["total"], tc)
    budget = tc.max_minutes * 60 if tc.max_minutes is not None else None
    if budget is not None and state.planned_steps is None:
        console.print(
            f"train: time budget {duration(budget)} (training.max_minutes): the step count (at most {cap_steps:,}) "
            "follows from the speed of the first steps",
            highlight=False,
        )

    def evaluate(step: int) -> dict[str, float]:
        result = {
            "eval/domain_loss": eval_loss(
                model, domain_val, tc.eval_max_sequences, tc.micro_batch_size, accelerator.device
            )
        }
        if general_val is not None:
            result["eval/general_loss"] = eval_loss(
                model, general_val, tc.eval_max_sequences, tc.micro_batch_size, accelerator.device
            )
        if tracker is not None:
            tracker.log_metrics(result, step)
        state.evals.append({"step": step, **result})
        return result

    started = time.perf_counter()  # the time budget counts the base model's validation pass too
    seconds_before = state.train_seconds
    if state.step == 0 and not state.evals:
        base = evaluate(0)
        state.eval_seconds += time.perf_counter() - started
        state.base_general_loss = base.get("eval/general_loss")
        console.print("train: base model " + _format_eval(base))
        _forgetting_check(state, base, tc, trainable, ckpt_root)  # the base is the first "best"

    model.train()
    loop_started = time.perf_counter()
    steps_before = state.step
    step_times: list[float] = []  # this process's optimizer steps, validation and checkpoints excluded
    trainable_count = sum(p.numel() for p in trainable.values())
    try:
        while state.step < plan["total"]:
            step_started = time.perf_counter()
            first = state.step * global_blocks_per_step + accelerator.process_index * blocks_per_step
            rows = list(stream.batch(first, blocks_per_step))
            micro = [rows[i : i + tc.micro_batch_size] for i in range(0, len(rows), tc.micro_batch_size)]
            label_count = sum(int((r[2][1:] != -100).sum()) for r in rows)
            global_count = int(accelerator.reduce(torch.tensor(label_count, device=accelerator.device), "sum"))
            step_loss = 0.0
            for k, group in enumerate(micro):
                sync = contextlib.nullcontext() if k == len(micro) - 1 else accelerator.no_sync(model)
                with sync:
                    ids, pos, labels = _tensors([(r[0], r[1], r[2]) for r in group], accelerator.device)
                    total, _ = model(ids, pos, labels)
                    accelerator.backward(total * accelerator.num_processes / max(global_count, 1))
                    step_loss += float(total.detach())
            if tc.max_grad_norm is not None:
                accelerator.clip_grad_norm_(model.parameters(), tc.max_grad_norm)
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            step_loss = float(accelerator.reduce(torch.tensor(step_loss, device=accelerator.device), "sum"))
            real = sum(r[3] for r in rows) * accelerator.num_processes
            replay_real = sum(r[4] for r in rows) * accelerator.num_processes
            state.step += 1
            state.tokens += real
            state.replay_tokens += replay_real
            state.losses.append(step_loss / max(global_count, 1))
            state.learning_rates.append(lr)
            elapsed = time.perf_counter() - step_started
            step_times.append(elapsed)
            state.step_seconds.append(round(elapsed, 4))
            if budget is not None:
                spent = seconds_before + time.perf_counter() - started
                fitted = _fit_budget(tc, budget - spent, state, step_times, plan["total"], trainable_count)
                if fitted is not None:
                    first = state.planned_steps is None
                    state.planned_steps = plan["total"] = fitted
                    # The scheduler has set the next step's rate on the old count: set it on the new one.
                    scheduler.last_epoch -= 1
                    scheduler.step()
                    what = f"{fitted:,} steps fit the time budget" if first else "behind the time budget: ends at step"
                    console.print(
                        f"train: {what}{'' if first else f' {fitted:,}'} ({duration(budget - spent)} left after "
                        f"{state.step} steps); the learning-rate schedule ends there",
                        highlight=False,
                    )
                    event("train_budget", planned_steps=fitted, step=state.step, budget_seconds=budget)
                    if tracker is not None:
                        tracker.log_metrics({"data/total_steps": fitted}, state.step)
            total_steps = plan["total"]
            if tracker is not None and (state.step % tc.logging_steps == 0 or state.step == total_steps):
                tracker.log_metrics(
                    {
                        "train/loss": state.losses[-1],
                        "train/learning_rate": lr,
                        "train/tokens_per_second": real / max(elapsed, 1e-9),
                        "train/replay_share": state.replay_tokens / max(state.tokens, 1),
                        "train/tokens": state.tokens,
                    },
                    state.step,
                )
            speed = real / max(elapsed, 1e-9)
            # From this process's own steps so far (validation passes included: they recur).
            eta = (time.perf_counter() - loop_started) / (state.step - steps_before) * (total_steps - state.step)
            detail(
                f"train: step {state.step}/{total_steps} loss {state.losses[-1]:.4f} lr {lr:.2e} "
                f"{speed:,.0f} tok/s, ETA {duration(eta)}"
            )
            event(
                "train_step",
                step=state.step,
                total_steps=total_steps,
                loss=state.losses[-1],
                learning_rate=lr,
                tokens_per_second=speed,
                eta_seconds=eta,
            )
            if state.step % tc.eval_steps == 0 or state.step == total_steps:
                eval_started = time.perf_counter()
                result = evaluate(state.step)
                state.eval_seconds += time.perf_counter() - eval_started
                detail(f"train: step {state.step} " + _format_eval(result))
                event("train_eval", step=state.step, **{k.split("/")[-1]: v for k, v in result.items()})
                if _forgetting_check(state, result, tc, trainable, ckpt_root):
                    break
            if state.step % tc.save_steps == 0 and state.step < total_steps:
                state.train_seconds = seconds_before + time.perf_counter() - started
                optim_state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
                if accelerator.is_main_process:
                    save_checkpoint(ckpt_root, state, trainable, optim_state, tc.save_total_limit)
    except Exception:
        if tracker is not None:
            tracker.end("FAILED")
        raise
    except BaseException:  # KeyboardInterrupt: the checkpoints stay, and the next run resumes
        if tracker is not None:
            tracker.end("KILLED")
        raise
    state.train_seconds = seconds_before + time.perf_counter() - started

    if state.best is not None and state.stopped_reason is not None:
        from safetensors.torch import load_file

        _load_trainable(trainable, load_file(str(ckpt_root / BEST)))
    summary = _summary(state, tc, epoch0, plan["total"], loaded.description, choices, cap_steps)
    # This process's part of the run (a resumed run's earlier part is not included).
    summary = replace(summary, peak_memory_bytes=memory.peak_bytes(), peak_memory_kind=memory.kind)
    if accelerator.is_main_process:
        try:
            # The saved config names what was trained (auto resolved), for evaluate, register and export.
            with disk_full_errors("the trained model", out):
                _write_outputs(
                    config.model_copy(update={"training": tc}), loaded.model, model_dir, summary, fingerprint
                )
        except BaseException:  # the run has no model: its MLflow run must not stay RUNNING
            if tracker is not None:
                tracker.end("FAILED")
            raise
        if tracker is not None:
            tracker.log_dict(summary.to_json(), SUMMARY)
            if summary.final_loss is not None:  # None only for a run of no steps
                tracker.log_metrics({"train/final_loss": summary.final_loss}, state.step)
            tracker.end("FINISHED")
        shutil.rmtree(ckpt_root, ignore_errors=True)
    manifest = read_json(out / MANIFEST) or {}
    return TrainResult(manifest, out, skipped=False, summary=summary)


def _resume_state(
    ckpt_root: Path, fingerprint: str, force: bool, tc: TrainingConfig
) -> tuple[TrainerState, Path | None]:
    """The checkpoint to resume from: the latest one of this same run (same fingerprint, and the same
    method and precision where auto chose them)."""
    fresh = TrainerState(fingerprint=fingerprint, method=tc.method, precision=tc.precision)
    found = list_checkpoints(ckpt_root)
    if not found or force:
        return fresh, None
    latest = found[-1]
    state = read_json(latest / STATE) or {}
    if state.get("fingerprint") != fingerprint:
        console.print(f"train: {ckpt_root} holds checkpoints of a different configuration; starting a new run")
        return fresh, None
    chosen = (state.get("method") or tc.method, state.get("precision") or tc.precision)
    if chosen != (tc.method, tc.precision):
        console.print(
            f"train: {ckpt_root} holds checkpoints trained with {chosen[0]} in {chosen[1]}, and this machine "
            f"chooses {tc.method} in {tc.precision}; starting a new run"
        )
        return fresh, None
    return fresh, latest


def _fit_budget(
    tc: TrainingConfig, remaining: float, state: TrainerState, step_times: list[float], total: int, trainable: int
) -> int | None:
    """A new step count for training.max_minutes, or None to keep `total`.

    The count is fixed once enough steps are timed (after the untimed first one, _BUDGET_TIMED_STEPS, or
    fewer that took _BUDGET_TIMED_SHARE of the budget), from their median. After that it is only lowered,
    and only when the recent pace (the median of the last _BUDGET_RECENT_STEPS) would overrun the budget
    by more than a step: a machine that got busier still ends on time, and the schedule still ends at its
    final rate. The time a single slow step lost is in `remaining` already; it does not set the pace."""
    timed = step_times[1:]
    budget = tc.max_minutes * 60 if tc.max_minutes else 0.0
    per_eval = state.eval_seconds / max(len(state.evals), 1)
    if state.planned_steps is None:
        if len(timed) < _BUDGET_TIMED_STEPS and not (timed and sum(timed) >= _BUDGET_TIMED_SHARE * budget):
            return None
        return budget_steps(tc, remaining, state.step, total, float(np.median(timed)), per_eval, trainable)
    if not timed or state.step >= total:
        return None
    pace = float(np.median(timed[-_BUDGET_RECENT_STEPS:]))  # a slower stretch, not one slow step
    if budget_steps(tc, remaining + pace, state.step, total, pace, per_eval, trainable) >= total:
        return None  # on time, give or take a step
    return budget_steps(tc, remaining, state.step, total, pace, per_eval, trainable)


def _load_trainable(trainable: dict[str, Any], weights: dict[str, Any]) -> None:
    import torch

    missing = set(trainable) - set(weights)
    if missing:
        raise StageError(f"checkpoint does not match the model: missing {sorted(missing)[:3]}")
    with torch.no_grad():
        for name, param in trainable.items():
            param.copy_(weights[name].to(param.device, param.dtype))


def _forgetting_check(
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


def _format_eval(result: dict[str, float]) -> str:
    return ", ".join(f"{k.split('/')[-1]} {v:.4f}" for k, v in result.items())


def _print_plan(description: Any, epoch0: Blocks, per_epoch: int, total_steps: int, tc: TrainingConfig) -> None:
    console.print(
        f"train: {description}\n"
        f"train: {per_epoch:,} blocks of {tc.max_seq_length} tokens per epoch, packing efficiency "
        f"{epoch0.efficiency:.1%}, replay share {epoch0.replay_share:.1%}; {total_steps:,} steps of "
        f"{tc.micro_batch_size}x{tc.gradient_accumulation_steps} blocks; precision {tc.precision}",
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


def _write_outputs(config: Config, model: Any, model_dir: Path, summary: TrainingSummary, fingerprint: str) -> None:
    from transformers import AutoTokenizer

    from cptkit.models import save_trained

    out = config.output_dir
    out.mkdir(parents=True, exist_ok=True)
    staging = out / ".staging"
    shutil.rmtree(staging, ignore_errors=True)
    save_trained(model, staging / "model")
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
