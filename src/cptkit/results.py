"""What train and evaluate hand to the stages after them, as typed objects: the training summary
(`training_summary.json`) and the evaluation results (`evaluation/results.json`, with the verdict and
register's promotion gate). Each has one JSON form, `to_json`/`from_json`, which keeps the files' keys
and their order; reading tolerates files written before a key existed (it gets its default).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Self, TypeVar

from cptkit.artifacts import read_json
from cptkit.errors import StageError

JSON = dict[str, Any]
T = TypeVar("T")


def _record(obj: Any) -> JSON:
    """A flat record's JSON: its fields, in order, under their own names."""
    return {f.name: getattr(obj, f.name) for f in fields(obj)}


def _from_record(cls: Callable[..., T], data: Mapping[str, Any]) -> T:
    """A flat record from its JSON; a key the file lacks takes the field's default (older files), and
    keys this version does not know are ignored."""
    names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in data.items() if k in names})


# ---------------------------------------------------------------- the training summary


@dataclass(frozen=True, kw_only=True)
class ChoiceRecord:
    """A hardware choice of the run (device, precision, method) and why it was made."""

    value: str
    reason: str


@dataclass(frozen=True, kw_only=True)
class TrainingSummary:
    """What a training run did: steps, tokens, losses, validation losses, what it chose and why it
    stopped. Validation points (`evals`, `final_eval`, `best`) map metric names (`step`,
    `eval/domain_loss`, `eval/general_loss`) to values, as the training loop records them."""

    steps: int
    planned_steps: int | None = None
    tokens: int = 0
    replay_tokens: int = 0
    replay_share: float = 0.0
    tokens_per_second: float = 0.0
    train_seconds: float | None = None
    eval_seconds: float | None = None
    final_loss: float | None = None
    losses: list[float] = field(default_factory=list)
    learning_rates: list[float] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)
    base_general_loss: float | None = None
    final_eval: dict[str, float] = field(default_factory=dict)
    best: dict[str, Any] | None = None
    stopped_reason: str | None = None
    packing_efficiency: float | None = None
    precision: str | None = None
    method: str | None = None
    device: str | None = None
    choices: dict[str, ChoiceRecord] = field(default_factory=dict)
    max_minutes: float | None = None
    derived_steps: int | None = None  # the step count training.max_minutes gave; None: not derived
    max_planned_steps: int | None = None
    model: str | None = None  # the model's description (method, parameters, memory)
    mlflow_run_id: str | None = None
    peak_memory_bytes: int | None = None  # of the process that wrote the summary (not a resumed run's start)
    peak_memory_kind: str | None = None

    def to_json(self) -> JSON:
        data = _record(self)
        data["choices"] = {name: _record(c) for name, c in self.choices.items()}
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Self:
        choices = {name: ChoiceRecord(**c) for name, c in (data.get("choices") or {}).items()}
        return _from_record(cls, {**data, "choices": choices})

    @classmethod
    def read(cls, path: Path) -> Self | None:
        """The summary in `path`, or None when there is none."""
        return _read(cls.from_json, path, "training summary")


# ---------------------------------------------------------------- the evaluation results


@dataclass(frozen=True, kw_only=True)
class PairDescription:
    """Which two models were compared and how the base was scored."""

    base_model: str
    base_model_path: str
    cpt_model: str
    method: str
    base_scored_as: str
    quantization: str


@dataclass(frozen=True, kw_only=True)
class EvaluationSettings:
    context_length: int
    stride: int
    batch_size: int
    precision: str
    precision_reason: str | None = None
    max_documents: int | None = None
    max_tokens: int | None = None
    prefix_token_id: int | None = None
    device: str | None = None
    device_reason: str | None = None
    decontamination: str = "off"  # drop, report or off (evaluate.decontamination.mode)
    decontamination_ngram: int | None = None
    decontamination_min_share: float | None = None


@dataclass(frozen=True, kw_only=True)
class ModelScore:
    """One model on one set, summed over the set: negative log-likelihood (nats), scored tokens, UTF-8
    bytes, and what they give."""

    perplexity: float
    bits_per_byte: float
    tokens: int
    bytes: int
    documents: int
    nll: float


@dataclass(frozen=True, kw_only=True)
class Drift:
    """How far the adapted model's next-token distributions moved from the base's on one set."""

    kl: float  # mean KL(base || adapted), nats
    top1_agreement: float
    positions: int


@dataclass(frozen=True, kw_only=True)
class SetFacts:
    """An evaluation set: documents scored, rows without text, the token cap when it cut the set, the
    documents found contaminated by the training text and those sharing any n-gram with it (None: not
    checked; contaminated ones are left out of `documents` when decontamination drops them), and its
    source's description (in the JSON, beside the other keys)."""

    documents: int
    skipped: int = 0
    capped_at_tokens: int | None = None
    contaminated: int | None = None
    any_overlap: int | None = None
    source: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> JSON:
        return {
            "documents": self.documents,
            "skipped": self.skipped,
            "capped_at_tokens": self.capped_at_tokens,
            "contaminated": self.contaminated,
            "any_overlap": self.any_overlap,
            **self.source,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Self:
        own = ("documents", "skipped", "capped_at_tokens", "contaminated", "any_overlap")
        source = {k: v for k, v in data.items() if k not in own}
        return cls(**{k: data[k] for k in own if k in data}, source=source)


# An lm-evaluation-harness metric of each model: task -> metric -> {"base": value, "cpt": value}.
TaskMetrics = dict[str, dict[str, dict[str, float]]]


@dataclass(frozen=True, kw_only=True)
class TaskResults:
    """lm-evaluation-harness tasks: `status` is not_requested, not_run (`reason`), partial (`reason`,
    `not_run`: task -> why, and `results`) or ok (`results`)."""

    status: str
    tasks: list[str] = field(default_factory=list)
    reason: str | None = None
    not_run: dict[str, str] | None = None
    results: TaskMetrics | None = None

    def to_json(self) -> JSON:
        return {k: v for k, v in _record(self).items() if k in ("status", "tasks") or v is not None}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Self:
        return _from_record(cls, data)


# ---------------------------------------------------------------- the generated domain tasks


@dataclass(frozen=True, kw_only=True)
class Interval:
    """A value and its bootstrap confidence interval (95%, percentiles of item resamples)."""

    value: float
    low: float
    high: float


@dataclass(frozen=True, kw_only=True)
class DomainTaskScore:
    """One model on the generated domain tasks: multiple-choice accuracy, the cloze (mean log-likelihood
    of the term, share of terms that are the greedy continuation), and perplexity on the domain terms'
    tokens beside perplexity on all tokens of the same documents."""

    mc_accuracy: Interval
    cloze_loglikelihood: float
    cloze_exact_match: Interval
    term_perplexity: float | None = None
    all_perplexity: float | None = None
    term_tokens: int = 0
    all_tokens: int = 0


@dataclass(frozen=True, kw_only=True)
class ItemExample:
    """An item the two models answer differently: the passage, the right term, each model's choice."""

    context: str
    answer: str
    base: str
    cpt: str


@dataclass(frozen=True, kw_only=True)
class DomainTaskResults:
    """The generated domain tasks (cptkit.domain_tasks): `status` ok, or not_run with the `reason`."""

    status: str
    reason: str | None = None
    terms: int = 0
    items: int = 0
    documents: int = 0  # the held-out documents the items come from (what the intervals resample)
    contaminated_items: int = 0
    distractors: int = 0
    random_baseline: float | None = None
    folder: str | None = None  # the task files, relative to the evaluation folder
    base: DomainTaskScore | None = None
    cpt: DomainTaskScore | None = None
    accuracy_change: Interval | None = None  # adapted - base, paired, resampling documents
    exact_match_change: Interval | None = None
    loglikelihood_change: Interval | None = None  # of the cloze term, nats, paired
    items_gained: int = 0  # multiple-choice items right now and wrong before
    items_lost: int = 0
    gained: list[ItemExample] = field(default_factory=list)  # examples: right now, wrong before
    lost: list[ItemExample] = field(default_factory=list)
    seconds: float | None = None

    def metrics(self) -> dict[str, float]:
        """MLflow metrics, `<task>/<metric>`."""
        out: dict[str, float] = {}
        for name, s in (("base", self.base), ("cpt", self.cpt)):
            if s is None:
                continue
            out[f"domain_mc/{name}_acc"] = s.mc_accuracy.value
            out[f"domain_cloze/{name}_loglikelihood"] = s.cloze_loglikelihood
            out[f"domain_cloze/{name}_exact_match"] = s.cloze_exact_match.value
            if s.term_perplexity is not None:
                out[f"domain_term_span/{name}_perplexity"] = s.term_perplexity
            if s.all_perplexity is not None:
                out[f"domain_term_span/{name}_all_token_perplexity"] = s.all_perplexity
        if self.accuracy_change is not None:
            out["domain_mc/acc_change"] = self.accuracy_change.value
            out["domain_mc/acc_change_low"] = self.accuracy_change.low
            out["domain_mc/acc_change_high"] = self.accuracy_change.high
        if self.exact_match_change is not None:
            out["domain_cloze/exact_match_change"] = self.exact_match_change.value
        if self.loglikelihood_change is not None:
            out["domain_cloze/loglikelihood_change"] = self.loglikelihood_change.value
            out["domain_cloze/loglikelihood_change_low"] = self.loglikelihood_change.low
            out["domain_cloze/loglikelihood_change_high"] = self.loglikelihood_change.high
        return out

    def to_json(self) -> JSON:
        data = _record(self)
        for name in ("base", "cpt"):
            score = getattr(self, name)
            if score is not None:
                data[name] = {
                    **_record(score),
                    "mc_accuracy": _record(score.mc_accuracy),
                    "cloze_exact_match": _record(score.cloze_exact_match),
                }
        for name in ("accuracy_change", "exact_match_change", "loglikelihood_change"):
            value = getattr(self, name)
            data[name] = _record(value) if value is not None else None
        data["gained"] = [_record(e) for e in self.gained]
        data["lost"] = [_record(e) for e in self.lost]
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Self:
        def score(value: Mapping[str, Any] | None) -> DomainTaskScore | None:
            if value is None:
                return None
            return _from_record(
                DomainTaskScore,
                {
                    **value,
                    "mc_accuracy": Interval(**value["mc_accuracy"]),
                    "cloze_exact_match": Interval(**value["cloze_exact_match"]),
                },
            )

        def interval(value: Mapping[str, Any] | None) -> Interval | None:
            return Interval(**value) if value is not None else None

        return _from_record(
            cls,
            {
                **data,
                "base": score(data.get("base")),
                "cpt": score(data.get("cpt")),
                "accuracy_change": interval(data.get("accuracy_change")),
                "exact_match_change": interval(data.get("exact_match_change")),
                "loglikelihood_change": interval(data.get("loglikelihood_change")),
                "gained": [_from_record(ItemExample, e) for e in data.get("gained") or []],
                "lost": [_from_record(ItemExample, e) for e in data.get("lost") or []],
            },
        )


@dataclass(frozen=True, kw_only=True)
class Generation:
    """A fixed prompt's greedy completion by both models."""

    kind: str  # domain or general
    prompt: str
    base: str
    cpt: str


@dataclass(frozen=True, kw_only=True)
class ChatAnswer:
    """One of the shipped general instructions: the base model's greedy answer through its chat template,
    the adapted model's own greedy answer where it was asked for one (else None), and the drift on the
    base answer's tokens (per token, nats)."""

    instruction: str
    base: str
    tokens: int
    drift: float  # adapted minus base negative log-likelihood of the base's answer, per token
    kl: float  # mean KL(base || adapted) over the answer's tokens
    cpt: str | None = None


@dataclass(frozen=True, kw_only=True)
class ChatDrift:
    """Chat drift (see chat_drift.py): `status` ok, skipped (`reason`: e.g. no chat template) or off.
    Per answer token, over all base answers: each model's log-likelihood of the base's answers, their
    difference (`drift`, what the verdict bounds), KL(base || adapted) and top-1 agreement."""

    status: str
    reason: str | None = None
    instructions: int = 0
    answer_tokens: int = 0
    base_log_likelihood: float | None = None
    cpt_log_likelihood: float | None = None
    drift: float | None = None
    kl: float | None = None
    top1_agreement: float | None = None
    max_new_tokens: int | None = None
    cached: bool = False  # the base's answers came from the cache, not generated in this evaluation
    answers: list[ChatAnswer] = field(default_factory=list)

    def to_json(self) -> JSON:
        return {**_record(self), "answers": [_record(a) for a in self.answers]}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Self:
        answers = [_from_record(ChatAnswer, a) for a in data.get("answers") or []]
        return _from_record(cls, {**data, "answers": answers})


_NOT_MEASURED = ChatDrift(status="off", reason="not measured")


@dataclass(frozen=True, kw_only=True)
class TrainingFacts:
    """The facts of the training summary the report shows."""

    steps: int | None = None
    tokens: int | None = None
    replay_share: float | None = None
    packing_efficiency: float | None = None
    tokens_per_second: float | None = None
    final_loss: float | None = None
    method: str | None = None
    stopped_reason: str | None = None

    @classmethod
    def of(cls, summary: TrainingSummary) -> Self:
        return cls(**{f.name: getattr(summary, f.name) for f in fields(cls)})


@dataclass(frozen=True, kw_only=True)
class DataAccounting:
    """A prepared dataset's document counts, from its prepare manifest."""

    documents_in: int | None = None
    documents_kept: int | None = None
    dropped: dict[str, int] | None = None
    quarantined: int | None = None
    quarantined_by_reason: dict[str, int] | None = None
    train_documents: int | None = None
    val_documents: int | None = None
    train_tokens: int | None = None
    val_tokens: int | None = None
    redactions: dict[str, int] | None = None

    @classmethod
    def of(cls, manifest: Mapping[str, Any]) -> Self:
        return cls(**{f.name: manifest.get(f.name) for f in fields(cls)})


@dataclass(frozen=True, kw_only=True)
class Check:
    """One check of the verdict or the gate; `passed` None: not checked (no threshold or measurement)."""

    name: str
    value: float | None
    threshold: float | None
    passed: bool | None
    note: str | None = None

    def to_json(self) -> JSON:
        data = _record(self)
        if self.note is None:
            del data["note"]
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Self:
        return _from_record(cls, data)

    def failure(self) -> str:
        """The check as a line saying how it failed."""
        name, value, threshold = self.name, self.value, self.threshold
        if name == "adaptation":
            return f"adaptation {value:.1%} < minimum {threshold:.1%}"
        if name.startswith("forgetting"):
            return f"{name} {value:+.1%} > maximum {threshold:.1%}"
        if name == "drift_kl":
            return f"drift KL {value:.4f} > maximum {threshold:.4f}"
        if name == "chat_drift":
            return f"chat drift {value:.4f} > maximum {threshold:.4f} nats per token"
        return f"{name}: {value:.4f} worse than {threshold:.4f}"


@dataclass(frozen=True, kw_only=True)
class Verdict:
    """The checks against the config's thresholds; passed when no decided check failed."""

    passed: bool
    checks: list[Check]

    def to_json(self) -> JSON:
        return {"passed": self.passed, "checks": [c.to_json() for c in self.checks]}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Self:
        return cls(passed=data["passed"], checks=[Check.from_json(c) for c in data.get("checks") or []])


@dataclass(frozen=True, kw_only=True)
class Champion:
    """The registered champion a new version was compared with."""

    version: str
    domain_bits_per_byte: str | None  # as its version tag holds it
    same_domain_set: bool


@dataclass(frozen=True, kw_only=True)
class GateResult:
    """register's promotion gate: the verdict's checks, and the comparison with the champion."""

    passed: bool
    checks: list[Check]
    champion: Champion | None = None

    def failures(self) -> list[str]:
        return [c.failure() for c in self.checks if c.passed is False]

    def to_json(self) -> JSON:
        return {
            "passed": self.passed,
            "checks": [c.to_json() for c in self.checks],
            "champion": _record(self.champion) if self.champion is not None else None,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Self:
        champion = data.get("champion")
        return cls(
            passed=data["passed"],
            checks=[Check.from_json(c) for c in data.get("checks") or []],
            champion=Champion(**champion) if champion is not None else None,
        )


@dataclass(frozen=True, kw_only=True)
class EvaluationResults:
    """The base and the adapted model side by side: per model and set the scores (`base`, `cpt`), per
    set the drift and the set's facts, the changes the verdict judges, tasks, generations, the training
    and data facts, and the verdict. In the JSON the pair's description comes first, at the top level."""

    pair: PairDescription
    settings: EvaluationSettings
    base: dict[str, ModelScore]
    cpt: dict[str, ModelScore]
    drift: dict[str, Drift] = field(default_factory=dict)
    sets: dict[str, SetFacts] = field(default_factory=dict)
    adaptation: float | None = None  # the relative fall of the domain perplexity
    forgetting_by_set: dict[str, float] = field(default_factory=dict)  # relative rise, per held-out set
    forgetting: float | None = None  # the worst held-out set
    drift_kl: float | None = None  # on the general set
    top1_agreement: float | None = None
    tokens_per_second: float | None = None
    tasks: TaskResults = field(default_factory=lambda: TaskResults(status="not_requested"))
    domain_tasks: DomainTaskResults = field(default_factory=lambda: DomainTaskResults(status="not_run"))
    generations: list[Generation] = field(default_factory=list)
    chat: ChatDrift = field(default_factory=lambda: _NOT_MEASURED)
    training: TrainingFacts | None = None
    data: dict[str, DataAccounting] = field(default_factory=dict)
    verdict: Verdict
    seconds: float | None = None

    def headline(self) -> dict[str, float]:
        """The changes the verdict judges (domain adaptation, worst forgetting, drift), those measured."""
        changes = {
            "adaptation": self.adaptation,
            "forgetting": self.forgetting,
            "drift_kl": self.drift_kl,
            "top1_agreement": self.top1_agreement,
        }
        return {key: value for key, value in changes.items() if value is not None}

    @property
    def passed(self) -> bool:
        return self.verdict.passed

    def to_json(self) -> JSON:
        return {
            **_record(self.pair),
            "settings": _record(self.settings),
            "base": {name: _record(s) for name, s in self.base.items()},
            "cpt": {name: _record(s) for name, s in self.cpt.items()},
            "drift": {name: _record(d) for name, d in self.drift.items()},
            "sets": {name: s.to_json() for name, s in self.sets.items()},
            "adaptation": self.adaptation,
            "forgetting_by_set": dict(self.forgetting_by_set),
            "forgetting": self.forgetting,
            "drift_kl": self.drift_kl,
            "top1_agreement": self.top1_agreement,
            "tokens_per_second": self.tokens_per_second,
            "tasks": self.tasks.to_json(),
            "domain_tasks": self.domain_tasks.to_json(),
            "generations": [_record(g) for g in self.generations],
            "chat": self.chat.to_json(),
            "training": _record(self.training) if self.training is not None else None,
            "data": {name: _record(d) for name, d in self.data.items()},
            "verdict": self.verdict.to_json(),
            "seconds": self.seconds,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Self:
        tasks = data.get("tasks")
        training = data.get("training")
        return cls(
            pair=_from_record(PairDescription, data),
            settings=_from_record(EvaluationSettings, data["settings"]),
            base={name: _from_record(ModelScore, s) for name, s in data["base"].items()},
            cpt={name: _from_record(ModelScore, s) for name, s in data["cpt"].items()},
            drift={name: _from_record(Drift, d) for name, d in (data.get("drift") or {}).items()},
            sets={name: SetFacts.from_json(s) for name, s in (data.get("sets") or {}).items()},
            adaptation=data.get("adaptation"),
            forgetting_by_set=dict(data.get("forgetting_by_set") or {}),
            forgetting=data.get("forgetting"),
            drift_kl=data.get("drift_kl"),
            top1_agreement=data.get("top1_agreement"),
            tokens_per_second=data.get("tokens_per_second"),
            tasks=TaskResults.from_json(tasks) if tasks else TaskResults(status="not_requested"),
            domain_tasks=DomainTaskResults.from_json(data["domain_tasks"])
            if data.get("domain_tasks")
            else DomainTaskResults(status="not_run", reason="evaluated before the domain tasks existed"),
            generations=[_from_record(Generation, g) for g in data.get("generations") or []],
            chat=ChatDrift.from_json(data["chat"]) if data.get("chat") else _NOT_MEASURED,
            training=_from_record(TrainingFacts, training) if training else None,
            data={name: _from_record(DataAccounting, d) for name, d in (data.get("data") or {}).items()},
            verdict=Verdict.from_json(data["verdict"]),
            seconds=data.get("seconds"),
        )

    @classmethod
    def read(cls, path: Path) -> Self | None:
        """The results in `path`, or None when there are none."""
        return _read(cls.from_json, path, "evaluation results")


def _read(parse: Callable[[JSON], T], path: Path, what: str) -> T | None:
    data = read_json(path)
    if data is None:
        return None
    try:
        return parse(data)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise StageError(f"{path}: not a cptkit {what} file ({type(exc).__name__}: {exc})") from None
