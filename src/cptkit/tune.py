"""`cptkit tune`: the replay ratio and learning rate chosen from short pilot runs.

Each pilot is a real `train` on `tune.tokens_per_pilot` tokens at one (replay ratio, learning rate) of
the design, then `evaluate` of it (the same code as `cptkit evaluate`: domain and held-out losses,
drift; the base's scores come from the base-score cache after the first pilot). The pilots run one
after the other, each loading the base (train and evaluate are called as they are). A pilot's result is
written atomically to `<tune.output_dir>/pilots/<name>/pilot.json` when it is complete, so a killed
tune continues with the pilots not yet done. Then the law of tune_fit is fitted, the choice made, and
`fit.json`, `choice.json`, `tuned.yaml` and `tune_report.html` written. All pilots are MLflow child
runs of one parent run. The design, the law and its limits: docs/tune.md.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from cptkit.artifacts import MANIFEST, atomic_path, read_json, write_json_atomic
from cptkit.config import Config, section_fingerprint
from cptkit.datasets import domain_dir, replay_dir
from cptkit.errors import CptkitError
from cptkit.progress import console, event
from cptkit.results import EvaluationResults, TrainingSummary
from cptkit.tracking import Tracker, open_tracker
from cptkit.tune_fit import Choice, Fit, Observation, choose, design_points, fit_pilots

PILOTS = "pilots"
PILOT_RESULT = "pilot.json"
STATE = "tune_state.json"
FIT = "fit.json"
CHOICE = "choice.json"
TUNED = "tuned.yaml"
REPORT = "tune_report.html"
PARENT_TAG = "mlflow.parentRunId"  # what makes an MLflow run another's child in the UI


@dataclass(frozen=True)
class Pilot:
    index: int
    replay_ratio: float
    learning_rate: float
    steps: int

    @property
    def name(self) -> str:
        return f"pilot-{self.index:02d}"


@dataclass(frozen=True)
class PilotResult:
    """What a finished pilot measured (losses in nats per token)."""

    name: str
    fingerprint: str
    replay_ratio: float
    learning_rate: float
    steps: int
    tokens: int
    base_domain_loss: float
    domain_loss: float
    domain_gain: float
    adaptation: float
    forgetting: float  # ln(1 + relative_forgetting): the worst held-out set's loss increase
    relative_forgetting: float
    drift_kl: float | None
    tokens_per_second: float
    seconds: float
    mlflow_run_id: str | None

    def observation(self) -> Observation:
        return Observation(
            self.replay_ratio, self.learning_rate, self.tokens, self.domain_gain, self.forgetting, self.drift_kl
        )

    @classmethod
    def read(cls, path: Path) -> PilotResult | None:
        data = read_json(path)
        if data is None:
            return None
        try:
            return cls(**data)
        except TypeError:  # written by another version: run the pilot again
            return None


@dataclass(frozen=True)
class TunePlan:
    pilots: list[Pilot]
    tokens_per_step: int
    full_tokens: int | None  # None: known only after the pilots (training.max_minutes at their speed)


@dataclass(frozen=True)
class TuneResult:
    folder: Path
    pilots: list[PilotResult]
    ran: int  # pilots run now (the others were done before)
    fit: Fit
    choice: Choice
    tuned_config: Path
    report: Path


def plan_tune(config: Config) -> TunePlan:
    """The pilots of the design, each with the whole optimizer steps that hold tune.tokens_per_pilot."""
    tu, tc = config.tune, config.training
    if tu.replay_ratio[1] > 0 and config.data.replay is None:
        raise CptkitError(
            f"tune.replay_ratio: [{tu.replay_ratio[0]}, {tu.replay_ratio[1]}] tries replay, but data.replay is not "
            "set; set a replay source or tune.replay_ratio: [0, 0]"
        )
    tokens_per_step = tc.max_seq_length * tc.micro_batch_size * tc.gradient_accumulation_steps
    steps = max(1, math.ceil(tu.tokens_per_pilot / tokens_per_step))
    points = design_points(tu.design, tu.points, tu.replay_ratio, tu.learning_rate, tu.seed)
    pilots = [Pilot(i, r, lr, steps) for i, (r, lr) in enumerate(points)]
    return TunePlan(pilots, tokens_per_step, _full_tokens(config, tokens_per_step))


def _full_tokens(config: Config, tokens_per_step: int) -> int | None:
    """The full run's training tokens: tune.full_tokens, training.max_steps, or num_epochs over the prepared
    domain tokens (plus the replay share); None with training.max_minutes (from the pilots' speed)."""
    tc = config.training
    if config.tune.full_tokens is not None:
        return config.tune.full_tokens
    if tc.max_minutes is not None:
        return None
    if tc.max_steps is not None:
        return tc.max_steps * tokens_per_step
    manifest = read_json(domain_dir(config) / MANIFEST) or {}
    domain_tokens = manifest.get("train_tokens")
    if not isinstance(domain_tokens, int) or domain_tokens <= 0:
        raise CptkitError(
            f"tune: cannot tell the full run's tokens: {domain_dir(config)} has no prepared train_tokens; run "
            "`cptkit prepare` or set tune.full_tokens"
        )
    return int(domain_tokens * tc.num_epochs / (1 - config.data.replay_ratio))


def pilot_config(config: Config, pilot: Pilot) -> Config:
    """The user's config with the pilot's replay ratio, learning rate and steps; validation only at the
    start and end, no forgetting stop, no checkpoints but the last; evaluation of the loss and drift only
    (no tasks, no generations, no thresholds: the choice applies them)."""
    tc, ec = config.training, config.evaluate
    training = tc.model_copy(
        update={
            "learning_rate": pilot.learning_rate,
            "max_steps": pilot.steps,
            "max_minutes": None,
            "eval_steps": pilot.steps,
            "save_steps": pilot.steps,
            "save_total_limit": 1,
            "max_general_loss_increase": None,
        }
    )
    evaluate = ec.model_copy(
        update={
            "max_tokens": config.tune.eval_max_tokens or ec.max_tokens,
            "tasks": [],
            "generation": ec.generation.model_copy(update={"max_new_tokens": 0}),
            # The choice uses loss and drift only; the generated tasks and chat drift would cost each pilot
            # about as much as its loss evaluation again (measured on the demo).
            "domain_tasks": ec.domain_tasks.model_copy(update={"enabled": False}),
            "chat": ec.chat.model_copy(update={"enabled": False}),
            "min_adaptation": None,
            "max_forgetting": None,
            "max_drift_kl": None,
        }
    )
    tracking = config.tracking.model_copy(update={"run_name": f"{config.tracking.run_name or 'tune'}-{pilot.name}"})
    return config.model_copy(
        update={
            "training": training,
            "data": config.data.model_copy(update={"replay_ratio": pilot.replay_ratio}),
            "evaluate": evaluate,
            "tracking": tracking,
            "output_dir": config.tune.output_dir / PILOTS / pilot.name,
        }
    )


def _pilot_fingerprint(pc: Config) -> str:
    """The pilot's settings and the prepared data it trains and is evaluated on (a new prepare reruns it)."""
    prepared = []
    for folder in (domain_dir(pc), replay_dir(pc)):
        manifest = read_json(folder / MANIFEST) or {}
        prepared.append([manifest.get(k) for k in ("config_fingerprint", "input_fingerprint", "created_at")])
    return section_fingerprint(pc.model, pc.training, pc.data, pc.evaluate, str(pc.output_dir), prepared)


# ---------------------------------------------------------------- running


def tune(
    config: Config,
    config_data: dict[str, Any],
    tracker_factory: Callable[..., Tracker] = open_tracker,
    estimate: bool = True,
) -> TuneResult:
    """Run the pilots not yet done, fit, choose, and write the outputs. `config_data` is the user's config
    as written (with --set applied): tuned.yaml is that plus the chosen values."""
    out = config.tune.output_dir
    plan = plan_tune(config)
    done = {p.name: r for p in plan.pilots if (r := _finished(config, p)) is not None}
    todo = [p for p in plan.pilots if p.name not in done]
    _preflight_line(config, plan, todo, estimate)
    out.mkdir(parents=True, exist_ok=True)
    state = read_json(out / STATE) or {}
    parent = tracker_factory(config.tracking, state.get("parent_run_id"), f"{config.tracking.run_name or 'tune'}")
    if parent.run_id is not None and state.get("parent_run_id") != parent.run_id:
        write_json_atomic(out / STATE, {"parent_run_id": parent.run_id})
    try:
        parent.log_params(
            {
                "tune": config.tune.model_dump(mode="json"),
                "tune.pilot_steps": plan.pilots[0].steps,
                "tune.tokens_per_step": plan.tokens_per_step,
            }
        )
        for pilot in todo:
            done[pilot.name] = run_pilot(config, pilot, _child_factory(tracker_factory, parent.run_id))
        results = [done[p.name] for p in plan.pilots]
        full = plan.full_tokens or _tokens_in_minutes(config, results)
        fit = fit_pilots([r.observation() for r in usable_pilots(results)])
        ec = config.evaluate
        choice = choose(
            fit, config.tune.replay_ratio, config.tune.learning_rate, full, ec.max_forgetting, ec.max_drift_kl
        )
        result = _write_outputs(config, config_data, results, fit, choice, len(todo))
        _log_parent(parent, result)
    except KeyboardInterrupt:  # a kill: the next tune continues this parent run with the pilots not done
        parent.end("KILLED")
        raise
    except BaseException:
        parent.end("FAILED")
        raise
    parent.end("FINISHED")
    return result


def _finished(config: Config, pilot: Pilot) -> PilotResult | None:
    """The pilot's result where it finished with these very settings."""
    pc = pilot_config(config, pilot)
    result = PilotResult.read(pc.output_dir / PILOT_RESULT)
    return result if result is not None and result.fingerprint == _pilot_fingerprint(pc) else None


def _child_factory(factory: Callable[..., Tracker], parent_id: str | None) -> Callable[..., Tracker]:
    """Open trackers as the tune run's children (train opens the pilot's run; evaluate continues it)."""

    def open_child(tracking: Any, run_id: str | None, run_name: str) -> Tracker:
        tracker = factory(tracking, run_id, run_name)
        if parent_id is not None and tracker.run_id is not None:
            tracker.set_tags({PARENT_TAG: parent_id})
        return tracker

    return open_child


def train_pilot(pc: Config, tracker_factory: Callable[..., Tracker]) -> TrainingSummary | None:
    from cptkit.train import train

    return train(pc, tracker_factory=tracker_factory).summary


def evaluate_pilot(pc: Config, tracker_factory: Callable[..., Tracker]) -> EvaluationResults | None:
    from cptkit.evaluate import evaluate

    return evaluate(pc, tracker_factory=tracker_factory).results


def run_pilot(config: Config, pilot: Pilot, tracker_factory: Callable[..., Tracker]) -> PilotResult:
    """Train and evaluate one pilot (each skipped where already up to date), and write its result."""
    from cptkit.eval_sets import DOMAIN

    pc = pilot_config(config, pilot)
    console.print(
        f"tune {pilot.name}: replay ratio {pilot.replay_ratio:g}, learning rate {pilot.learning_rate:.3g}, "
        f"{pilot.steps} steps",
        highlight=False,
    )
    started = time.perf_counter()
    summary = train_pilot(pc, tracker_factory)
    results = evaluate_pilot(pc, tracker_factory)
    if summary is None or results is None:
        raise CptkitError(f"tune {pilot.name}: {pc.output_dir}: training or evaluation left no results")
    if results.forgetting is None or results.adaptation is None:
        raise CptkitError(
            "tune needs a held-out general set to measure forgetting: set data.replay or evaluate.general"
        )
    base, cpt = results.base[DOMAIN], results.cpt[DOMAIN]
    base_loss, loss = base.nll / base.tokens, cpt.nll / cpt.tokens
    result = PilotResult(
        name=pilot.name,
        fingerprint=_pilot_fingerprint(pc),
        replay_ratio=pilot.replay_ratio,
        learning_rate=pilot.learning_rate,
        steps=summary.steps,
        tokens=summary.tokens,
        base_domain_loss=base_loss,
        domain_loss=loss,
        domain_gain=base_loss - loss,
        adaptation=results.adaptation,
        forgetting=math.log1p(results.forgetting),
        relative_forgetting=results.forgetting,
        drift_kl=results.drift_kl,
        tokens_per_second=summary.tokens_per_second,
        seconds=round(time.perf_counter() - started, 1),
        mlflow_run_id=summary.mlflow_run_id,
    )
    write_json_atomic(pc.output_dir / PILOT_RESULT, asdict(result))
    console.print(
        f"tune {pilot.name}: domain perplexity {-results.adaptation:+.2%}, forgetting {results.forgetting:+.2%}"
        + (f", drift KL {results.drift_kl:.4f}" if results.drift_kl is not None else ""),
        highlight=False,
    )
    return result


def usable_pilots(results: list[PilotResult]) -> list[PilotResult]:
    """The pilots with finite losses (a learning rate that diverged gives NaN or inf): the others are left
    out of the fit, with a line saying so."""
    usable = [r for r in results if all(math.isfinite(v) for v in (r.domain_gain, r.forgetting))]
    left_out = [r.name for r in results if r not in usable]
    if left_out:
        console.print(
            f"tune: left out of the fit (losses not finite: training diverged): {', '.join(left_out)}",
            style="yellow",
            highlight=False,
        )
    if len(usable) < 2:
        raise CptkitError(
            f"tune: only {len(usable)} of {len(results)} pilots gave finite losses; lower the top of tune.learning_rate"
        )
    return usable


def _tokens_in_minutes(config: Config, results: list[PilotResult]) -> int:
    """training.max_minutes at the pilots' median training speed."""
    speeds = sorted(r.tokens_per_second for r in results)
    minutes = config.training.max_minutes or 0.0
    return int(speeds[len(speeds) // 2] * minutes * 60)


def _preflight_line(config: Config, plan: TunePlan, todo: list[Pilot], estimate: bool) -> None:
    tu = config.tune
    steps = plan.pilots[0].steps
    per_pilot = steps * plan.tokens_per_step
    line = (
        f"tune: {len(plan.pilots)} pilots ({tu.design}: replay ratio {tu.replay_ratio[0]:g}-{tu.replay_ratio[1]:g} x "
        f"learning rate {tu.learning_rate[0]:.2g}-{tu.learning_rate[1]:.2g}), {steps} steps x "
        f"{plan.tokens_per_step:,} = {per_pilot:,} tokens each, {per_pilot * len(plan.pilots):,} in all"
    )
    if len(todo) < len(plan.pilots):
        line += f"; {len(plan.pilots) - len(todo)} done before, {len(todo)} to run"
    if estimate and todo:
        seconds = _estimated_seconds(config, todo)
        line += f"; estimated {seconds / 60:.1f} min"
    console.print(line, highlight=False, soft_wrap=True)


def _estimated_seconds(config: Config, todo: list[Pilot]) -> float:
    """The preflight of the first pilot to run (its timed steps and model loading), times the pilots, plus
    their evaluations at a forward pass's share of a step's speed (the base scored once: then cached)."""
    from cptkit.preflight import preflight

    plan = preflight(pilot_config(config, todo[0]), measure=True)
    per_pilot = plan.estimated_seconds.get("total", 0.0)
    measured = plan.measured
    eval_tokens = (config.tune.eval_max_tokens or 0) * (2 + len(config.evaluate.sets))
    # A forward pass costs about a third of a training step (forward and backward) per token: one model's
    # scoring runs at about three times the training speed.
    scoring = eval_tokens / (3 * measured.tokens_per_second) if measured is not None and eval_tokens else 0.0
    return len(todo) * (per_pilot + scoring) + scoring


# ---------------------------------------------------------------- outputs


def _write_outputs(
    config: Config,
    config_data: dict[str, Any],
    results: list[PilotResult],
    fit: Fit,
    choice: Choice,
    ran: int,
) -> TuneResult:
    from cptkit.tune_report import write_report

    out = config.tune.output_dir
    write_json_atomic(out / FIT, {"pilots": [asdict(r) for r in results], **fit.to_json()})
    write_json_atomic(
        out / CHOICE,
        {
            "chosen": asdict(choice.chosen),
            "predicted_adaptation": choice.chosen.adaptation,
            "predicted_forgetting": choice.chosen.relative_forgetting,
            "within_budget": choice.within_budget,
            "full_tokens": choice.tokens,
            "max_forgetting": config.evaluate.max_forgetting,
            "max_drift_kl": config.evaluate.max_drift_kl,
            "front": [asdict(c) for c in choice.front],
        },
    )
    tuned = write_tuned_config(out / TUNED, config_data, choice, fit, len(results))
    report = write_report(out / REPORT, config, results, fit, choice)
    c = choice.chosen
    budget = "within the forgetting budget" if choice.within_budget else "NO point meets the budget: least forgetting"
    console.print(
        f"tune: chose replay ratio {c.replay_ratio:.3g}, learning rate {c.learning_rate:.3g} ({budget}); predicted "
        f"at {choice.tokens:,.0f} tokens: domain perplexity {-c.adaptation:+.2%}, forgetting "
        f"{c.relative_forgetting:+.2%}; leave-one-out error (nats) domain {_rmse(fit, 'domain')}, forgetting "
        f"{_rmse(fit, 'forgetting')}",
        highlight=False,
        soft_wrap=True,
    )
    console.print(f"tune: wrote {tuned} and {report}", highlight=False, soft_wrap=True)
    event(
        "tune",
        pilots=len(results),
        ran=ran,
        chosen={"replay_ratio": c.replay_ratio, "learning_rate": c.learning_rate},
        within_budget=choice.within_budget,
        predicted_adaptation=c.adaptation,
        predicted_forgetting=c.relative_forgetting,
        full_tokens=choice.tokens,
        loo_rmse=fit.loo_rmse,
        tuned_config=str(tuned),
        report=str(report),
    )
    return TuneResult(out, results, ran, fit, choice, tuned, report)


def _rmse(fit: Fit, name: str) -> str:
    value = fit.loo_rmse.get(name)
    return "n/a" if value is None else f"{value:.4f}"


def write_tuned_config(path: Path, config_data: dict[str, Any], choice: Choice, fit: Fit, pilots: int) -> Path:
    """The user's config with the chosen replay ratio and learning rate, commented with where they came
    from. Secret values are masked (a token written in the config is not copied to another file)."""
    from cptkit.secrets import mask_data

    data = mask_data(config_data)
    data.setdefault("training", {})["learning_rate"] = float(f"{choice.chosen.learning_rate:.3g}")
    data.setdefault("data", {})["replay_ratio"] = round(choice.chosen.replay_ratio, 3)
    lines = yaml.safe_dump(data, sort_keys=False).splitlines()
    where = f"cptkit tune: {pilots} pilots, fitted law (fit.json), chosen for {choice.tokens:,.0f} training tokens"
    _comment(lines, "training", "learning_rate", where)
    _comment(lines, "data", "replay_ratio", where)
    header = [
        "# Written by `cptkit tune`: your config with training.learning_rate and data.replay_ratio chosen from",
        "# pilot runs (see choice.json and tune_report.html beside this file). Relative paths are as in your",
        "# config (relative to the folder you run cptkit from). Secret values, if any were written in the",
        "# config, are masked here: set them from the environment.",
    ]
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join([*header, *lines]) + "\n", encoding="utf-8")
    return path


def _comment(lines: list[str], section: str, key: str, comment: str) -> None:
    """Append `# comment` to `key`'s line inside the top-level `section` of dumped YAML."""
    inside = False
    for i, line in enumerate(lines):
        if not line.startswith(" "):
            inside = line == f"{section}:"
        elif inside and line.startswith(f"  {key}:"):
            lines[i] = f"{line}  # {comment}"
            return


def _log_parent(parent: Tracker, result: TuneResult) -> None:
    c = result.choice.chosen
    metrics = {
        "tune/chosen_replay_ratio": c.replay_ratio,
        "tune/chosen_learning_rate": c.learning_rate,
        "tune/predicted_adaptation": c.adaptation,
        "tune/predicted_forgetting": c.relative_forgetting,
        "tune/pilots": float(len(result.pilots)),
    }
    for name, value in result.fit.loo_rmse.items():
        if value is not None:
            metrics[f"tune/loo_rmse_{name}"] = value
    parent.log_metrics(metrics, 0)
    for name in (FIT, CHOICE, TUNED, REPORT):
        parent.log_artifact(result.folder / name, "tune")


def read_config_data(path: Path | None, overrides: list[str]) -> dict[str, Any]:
    """The user's config as written, with --set applied (what tuned.yaml starts from)."""
    from cptkit.config.loading import apply_overrides, read_text

    data = yaml.safe_load(read_text(path)) if path is not None else {}
    return apply_overrides(data if isinstance(data, dict) else {}, overrides)
