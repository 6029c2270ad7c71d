"""`cptkit run`: extract, prepare, train, evaluate and register in order, with the preflight just before
training. Each stage skips itself when its manifest matches, so a rerun redoes only what a change touched,
and a run stopped by a failure continues where it stopped (training from its last checkpoint)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from functools import partial
from typing import TYPE_CHECKING, TypeVar

from cptkit.config import Config
from cptkit.datasets import datasets
from cptkit.errors import ConfigError, CptkitError
from cptkit.progress import console, event
from cptkit.stage import StageResult

if TYPE_CHECKING:
    from cptkit.evaluate import EvaluateResult
    from cptkit.preflight import Plan
    from cptkit.preflight_shape import ShapePlan
    from cptkit.register import RegisterResult
    from cptkit.train import TrainResult

R = TypeVar("R")


class Stage(StrEnum):
    extract = "extract"
    prepare = "prepare"
    train = "train"
    evaluate = "evaluate"
    register = "register"


STAGES = list(Stage)


class StageFailed(CptkitError):
    """A stage of the run failed: its cause, with the stage named; the cause's exit code."""

    def __init__(self, stage: str, cause: CptkitError) -> None:
        self.stage = stage
        self.exit_code = cause.exit_code
        text = "; ".join(cause.problems) if isinstance(cause, ConfigError) else str(cause)
        super().__init__(f"{stage} failed: {text}")


@dataclass(frozen=True)
class Reporters:
    """How each stage's result is shown (the CLI's print functions)."""

    extract: Callable[[StageResult], None]
    prepare: Callable[[StageResult], None]
    preflight: Callable[[Plan], None]
    train: Callable[[TrainResult], None]
    evaluate: Callable[[EvaluateResult], None]
    register: Callable[[RegisterResult], None]


@dataclass
class RunResult:
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    registered: RegisterResult | None = None


def select(first: Stage | None, last: Stage | None) -> list[Stage]:
    """The stages from `first` to `last`, in order."""
    start = STAGES.index(first) if first is not None else 0
    end = STAGES.index(last) if last is not None else len(STAGES) - 1
    if start > end:
        raise CptkitError(f"--from {STAGES[start].value} comes after --until {STAGES[end].value}")
    return STAGES[start : end + 1]


@dataclass(frozen=True)
class Options:
    force: bool = False  # rerun stages that are up to date
    preflight: bool = True  # the preflight (with its timed steps) before training
    label: str = "run"  # the prefix of the summary lines
    processes: int = 1  # training processes
    # Starts train in `processes` local processes (`force`), which print its result; needed when processes > 1.
    launch_train: Callable[[bool], None] | None = None


def run_pipeline(
    config: Config,
    stages: list[Stage],
    report: Reporters,
    options: Options = Options(),
    timings: dict[str, float] | None = None,
) -> RunResult:
    """Run `stages` in order; raise StageFailed naming the stage that failed. `timings` are of work done
    before (the demo's inputs), reported first."""
    result = RunResult(timings=dict(timings or {}))
    started = time.perf_counter() - sum(result.timings.values())
    try:
        for stage in stages:
            _run_stage(stage, config, report, result, options)
    finally:
        if result.timings:
            result.timings["total"] = time.perf_counter() - started
            _print_summary(result, options.label)
    return result


def _run_stage(stage: Stage, config: Config, report: Reporters, result: RunResult, options: Options) -> None:
    name, force = stage.value, options.force
    try:
        if stage is Stage.extract:
            from cptkit.extract import extract, spark_settings

            spark = spark_settings(config)
            done = [
                _timed(result, f"extract {d.name}", report.extract, partial(extract, d, force=force, spark=spark))
                for d in datasets(config)
            ]
            skipped = all(r.skipped for r in done)
        elif stage is Stage.prepare:
            from cptkit.prepare import prepare

            done = [
                _timed(result, f"prepare {d.name}", report.prepare, partial(prepare, config, d, force=force))
                for d in datasets(config)
            ]
            skipped = all(r.skipped for r in done)
        elif stage is Stage.train:
            from cptkit.preflight import preflight
            from cptkit.tracking import check_tracking
            from cptkit.train import train

            if options.preflight:
                name = "preflight"
                check_tracking(config.tracking)  # before the preflight measures: an unusable store fails in seconds
                started = time.perf_counter()
                report.preflight(preflight(config, processes=options.processes))
                result.timings["preflight"] = time.perf_counter() - started
            name = "train"
            if options.processes > 1 and (force or not _train_up_to_date(config)):
                assert options.launch_train is not None
                _timed(result, "train", lambda _: None, partial(options.launch_train, force))
                skipped = False
            else:
                skipped = _timed(result, "train", report.train, lambda: train(config, force=force)).skipped
        elif stage is Stage.evaluate:
            from cptkit.evaluate import evaluate

            skipped = _timed(result, "evaluate", report.evaluate, lambda: evaluate(config, force=force)).skipped
        else:
            if not config.tracking.enabled:
                console.print("register: not run: tracking.enabled is false (registering needs MLflow)", style="yellow")
                return
            from cptkit.register import register

            registered = _timed(result, "register", report.register, lambda: register(config))
            result.registered = registered
            skipped = registered.skipped
    except StageFailed:
        raise
    except CptkitError as exc:
        raise StageFailed(name, exc) from exc
    except Exception:
        console.print(f"run: {name} failed", style="red", highlight=False)
        raise
    (result.skipped if skipped else result.ran).append(stage.value)


def _train_up_to_date(config: Config) -> bool:
    from cptkit.artifacts import up_to_date
    from cptkit.train_data import load_train_data, train_fingerprint

    fingerprint = train_fingerprint(config, load_train_data(config))
    return up_to_date(config.output_dir, fingerprint, fingerprint) is not None


def dry_run(config: Config, processes: int = 1) -> Plan | ShapePlan:
    """The preflight alone (for `processes` training processes): counts from the source where the data is
    not prepared yet; writes nothing. Where the model's weights are not here but its shape is known, the
    memory estimate from the shape, with what could not be checked."""
    from cptkit.preflight import preflight
    from cptkit.preflight_shape import shape_plan

    try:
        return shape_plan(config) or preflight(config, measure=True, dry_run=True, processes=processes)
    except CptkitError as exc:
        raise StageFailed("preflight", exc) from exc


def _timed(result: RunResult, key: str, show: Callable[[R], None], fn: Callable[[], R]) -> R:
    started = time.perf_counter()
    out = fn()
    result.timings[key] = time.perf_counter() - started
    show(out)
    return out


def _print_summary(result: RunResult, label: str) -> None:
    parts = []
    if result.ran:
        parts.append("ran " + ", ".join(result.ran))
    if result.skipped:
        parts.append("skipped (up to date) " + ", ".join(result.skipped))
    if parts:
        console.print(f"{label}: " + "; ".join(parts), highlight=False, soft_wrap=True)
    times = ", ".join(f"{k} {v:.1f}s" for k, v in result.timings.items())
    console.print(f"{label}: stage times {times}", highlight=False, soft_wrap=True)
    event("run", ran=result.ran, skipped=result.skipped, seconds=result.timings)


def not_promoted(result: RunResult) -> str | None:
    """Why the registered model was not promoted to champion, or None."""
    return None if result.registered is None else result.registered.not_promoted()
