"""`cptkit tune`: the replay ratio and learning rate chosen from short pilot runs.

Each pilot is a real `train` at one (replay ratio, learning rate, token level) of the design, on its
level's share of `tune.tokens_per_pilot` tokens, then `evaluate` of it (the same code as `cptkit
evaluate`: domain and held-out losses, drift, and chat drift on the base's cached chat answers; the
base's scores come from the base-score cache after the first pilot). The pilots run one after the other,
each loading the base (train and evaluate are called as they are). A pilot's result is written
atomically to `<tune.output_dir>/pilots/<name>/pilot.json` when it is complete (the name holds its token
budget), so a killed tune continues with the pilots not yet done. Then the laws of tune_fit are fitted,
the choice made, and `fit.json`, `choice.json`, `tuned.yaml` and `tune_report.html` written. All pilots
are MLflow child runs of one parent run. The design, the laws, the choice's rule and their limits:
docs/tune.md.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from cptkit.artifacts import MANIFEST, atomic_path, read_json, write_json_atomic
from cptkit.config import Config, section_fingerprint
from cptkit.datasets import domain_dir, replay_dir
from cptkit.errors import CptkitError
from cptkit.models import weights_held
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
    level: float  # the share of tune.tokens_per_pilot
    steps: int
    tokens: int  # steps x tokens per step

    @property
    def name(self) -> str:
        # The token budget is part of the name: a pilot of another budget is another pilot (its own folder,
        # checkpoints and result), not this one redone.
        return f"pilot-{self.index:02d}-{self.tokens}tok"


@dataclass(frozen=True)
class PilotResult:
    """What a finished pilot measured (losses in nats per token)."""

    name: str
    fingerprint: str
    replay_ratio: float
    learning_rate: float
    token_level: float
    steps: int
    tokens: int
    base_domain_loss: float
    domain_loss: float
    domain_gain: float
    adaptation: float
    forgetting: float  # ln(1 + relative_forgetting): the worst held-out set's loss increase
    relative_forgetting: float
    drift_kl: float | None
    chat_drift: float | None  # log-likelihood lost on the base's chat answers; None where not measured
    chat_kl: float | None
    tokens_per_second: float
    seconds: float
    mlflow_run_id: str | None

    def observation(self) -> Observation:
        return Observation(
            self.replay_ratio,
            self.learning_rate,
            self.tokens,
            self.domain_gain,
            self.forgetting,
            self.drift_kl,
            self.chat_drift,
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
    """The pilots of the design, each with the whole optimizer steps that hold its level's share of
    tune.tokens_per_pilot."""
    tu, tc = config.tune, config.training
    if tu.replay_ratio[1] > 0 and config.data.replay is None:
        raise CptkitError(
            f"tune.replay_ratio: [{tu.replay_ratio[0]}, {tu.replay_ratio[1]}] tries replay, but data.replay is not "
            "set; set a replay source or tune.replay_ratio: [0, 0]"
        )
    tokens_per_step = tc.max_seq_length * tc.micro_batch_size * tc.gradient_accumulation_steps
    steps = [max(1, math.ceil(level * tu.tokens_per_pilot / tokens_per_step)) for level in tu.token_levels]
    points = design_points(tu.design, tu.points, tu.replay_ratio, tu.learning_rate, tu.seed, len(tu.token_levels))
    pilots = [
        Pilot(i, r, lr, tu.token_levels[k], steps[k], steps[k] * tokens_per_step) for i, (r, lr, k) in enumerate(points)
    ]
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
    start and end, no forgetting stop, no checkpoints but the last; evaluation of the loss, drift and chat
    drift only (no tasks, no generations, no thresholds: the choice applies them)."""
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
            # The choice uses losses, drift and chat drift only; the generated tasks would cost each pilot about
            # as much as its loss evaluation again (measured on the demo).
            "domain_tasks": ec.domain_tasks.model_copy(update={"enabled": False}),
            # Chat drift stays (where the config has it on and the base a chat template): on an instruct base
            # it is the retention signal that moves. It scores the base's cached answers; the adapted model's
            # own answers are for the report's side-by-side only, and generating them costs time: none.
            "chat": ec.chat.model_copy(update={"side_by_side": 0}),
            "min_adaptation": None,
            "max_forgetting": None,
            "max_drift_kl": None,
            "max_chat_drift": None,  # so a changed limit rechooses without rerunning a pilot
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
                "tune.pilot_steps": sorted({p.steps for p in plan.pilots}),
                "tune.tokens_per_step": plan.tokens_per_step,
            }
        )
        with weights_held():  # adapter pilots: the base read from disk once, its weights shared by all
            for pilot in todo:
                done[pilot.name] = run_pilot(config, pilot, _child_factory(tracker_factory, parent.run_id))
        results = [done[p.name] for p in plan.pilots]
        full = plan.full_tokens or _tokens_in_minutes(config, results)
        fit = fit_pilots([r.observation() for r in usable_pilots(results)])
        ec = config.evaluate
        choice = choose(
            fit,
            config.tune.replay_ratio,
            config.tune.learning_rate,
            full,
            ec.max_forgetting,
            ec.max_drift_kl,
            ec.max_chat_drift,
            config.tune.equal_gain,
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
        f"{pilot.steps} steps ({pilot.tokens:,} tokens)",
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
    chat = results.chat if results.chat.status == "ok" else None
    result = PilotResult(
        name=pilot.name,
        fingerprint=_pilot_fingerprint(pc),
        replay_ratio=pilot.replay_ratio,
        learning_rate=pilot.learning_rate,
        token_level=pilot.level,
        steps=summary.steps,
        tokens=summary.tokens,
        base_domain_loss=base_loss,
        domain_loss=loss,
        domain_gain=base_loss - loss,
        adaptation=results.adaptation,
        forgetting=math.log1p(results.forgetting),
        relative_forgetting=results.forgetting,
        drift_kl=results.drift_kl,
        chat_drift=chat.drift if chat is not None else None,
        chat_kl=chat.kl if chat is not None else None,
        tokens_per_second=summary.tokens_per_second,
        seconds=round(time.perf_counter() - started, 1),
        mlflow_run_id=summary.mlflow_run_id,
    )
    write_json_atomic(pc.output_dir / PILOT_RESULT, asdict(result))
    console.print(
        f"tune {pilot.name}: domain perplexity {-results.adaptation:+.2%}, forgetting {results.forgetting:+.2%}"
        + (f", drift KL {results.drift_kl:.4f}" if results.drift_kl is not None else "")
        + (f", chat drift {result.chat_drift:+.4f}" if result.chat_drift is not None else ""),
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
    counts = Counter(p.steps for p in plan.pilots)
    budgets = " and ".join(
        f"{counts[steps]} x {steps} step{'s' if steps > 1 else ''} ({steps * plan.tokens_per_step:,} tokens)"
        for steps in sorted(counts)
    )
    line = (
        f"tune: {len(plan.pilots)} pilots ({tu.design}: replay ratio {tu.replay_ratio[0]:g}-{tu.replay_ratio[1]:g} x "
        f"learning rate {tu.learning_rate[0]:.2g}-{tu.learning_rate[1]:.2g}), {budgets} at {plan.tokens_per_step:,} "
        f"tokens per step, {sum(p.tokens for p in plan.pilots):,} tokens in all"
    )
    if len(counts) < len(tu.token_levels):
        line += " (token levels that round to the same steps: the token exponent is not told from replay's effect)"
    if len(todo) < len(plan.pilots):
        line += f"; {len(plan.pilots) - len(todo)} done before, {len(todo)} to run"
    if estimate and todo:
        seconds = _estimated_seconds(config, todo)
        line += f"; estimated {seconds / 60:.1f} min"
    console.print(line, highlight=False, soft_wrap=True)


def _estimated_seconds(config: Config, todo: list[Pilot]) -> float:
    """The preflight of the first pilot to run (its timed steps and model loading), with each pilot's own
    steps, plus the evaluations at a forward pass's share of a step's speed (the base scored once: then
    cached; chat drift scores both models on every pilot)."""
    from cptkit.chat_drift import instructions
    from cptkit.preflight import preflight

    plan = preflight(pilot_config(config, todo[0]), measure=True)
    estimated = plan.estimated_seconds
    measured = plan.measured
    if measured is None:
        return len(todo) * estimated.get("total", 0.0)
    outside_steps = estimated.get("total", 0.0) - estimated.get("steps", 0.0)
    training = sum(outside_steps + p.steps * measured.seconds_per_step for p in todo)
    ec = config.evaluate
    eval_tokens = (config.tune.eval_max_tokens or 0) * (2 + len(ec.sets))
    # A chat prompt is taken to be about as long as its answer: two models x prompt and answer tokens.
    chat_tokens = 4 * len(instructions(ec.chat.max_instructions)) * ec.chat.max_new_tokens if ec.chat.enabled else 0
    # A forward pass costs about a third of a training step (forward and backward) per token: one model's
    # scoring runs at about three times the training speed.
    scoring = eval_tokens / (3 * measured.tokens_per_second)
    chat = chat_tokens / (3 * measured.tokens_per_second)
    return training + len(todo) * (scoring + chat) + scoring


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
    write_json_atomic(out / CHOICE, choice_json(config, choice))
    tuned = write_tuned_config(out / TUNED, config_data, choice, fit, len(results))
    report = write_report(out / REPORT, config, results, fit, choice)
    c = choice.chosen
    budget = "within the budget" if choice.within_budget else "NO point meets the budget: the least over it"
    drifts = "".join(
        f", {label} {value:.4f}"
        for label, value in (("drift KL", c.drift_kl), ("chat drift", c.chat_drift))
        if value is not None
    )
    console.print(
        f"tune: chose replay ratio {c.replay_ratio:.3g}, learning rate {c.learning_rate:.3g} ({budget}); predicted "
        f"at {choice.tokens:,.0f} tokens: domain perplexity {-c.adaptation:+.2%}, forgetting "
        f"{c.relative_forgetting:+.2%}{drifts}; rule: {choice.rule}; leave-one-out error (nats) "
        + ", ".join(f"{name.replace('_', ' ')} {_rmse(fit, name)}" for name in fit.loo_rmse),
        highlight=False,
        soft_wrap=True,
    )
    if choice.unmeasured:
        limits = ", ".join(f"evaluate.max_{name}" for name in choice.unmeasured)
        console.print(
            f"tune: not applied (not measured by the pilots): {limits}",
            style="yellow",
            highlight=False,
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
        predicted_drift_kl=c.drift_kl,
        predicted_chat_drift=c.chat_drift,
        full_tokens=choice.tokens,
        loo_rmse=fit.loo_rmse,
        tuned_config=str(tuned),
        report=str(report),
    )
    return TuneResult(out, results, ran, fit, choice, tuned, report)


def choice_json(config: Config, choice: Choice) -> dict[str, Any]:
    """choice.json: the chosen point, its predictions, the rule that chose it and the rule's numbers."""
    ec, c = config.evaluate, choice.chosen
    return {
        "chosen": asdict(c),
        "predicted_adaptation": c.adaptation,
        "predicted_forgetting": c.relative_forgetting,
        "predicted_domain_gain": c.domain_gain,
        "predicted_drift": getattr(c, choice.tie_break),
        "within_budget": choice.within_budget,
        "rule": choice.rule,
        "max_predicted_domain_gain": choice.best.domain_gain,
        "best_gain_point": asdict(choice.best),
        "tolerance": choice.tolerance,
        "equal_gain": choice.equal_gain,
        "tie_break": choice.tie_break,
        "full_tokens": choice.tokens,
        "max_forgetting": ec.max_forgetting,
        "max_drift_kl": ec.max_drift_kl,
        "max_chat_drift": ec.max_chat_drift,
        "not_applied": [f"max_{name}" for name in choice.unmeasured],
        "front": [asdict(f) for f in choice.front],
    }


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
        "tune/max_predicted_domain_gain": result.choice.best.domain_gain,
        "tune/predicted_domain_gain": c.domain_gain,
        "tune/tolerance": result.choice.tolerance,
        "tune/pilots": float(len(result.pilots)),
    }
    for name, value in (("drift_kl", c.drift_kl), ("chat_drift", c.chat_drift)):
        if value is not None:
            metrics[f"tune/predicted_{name}"] = value
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
