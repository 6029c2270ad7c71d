"""The record rules as an ordered list of steps: each takes one document's text and keeps it (possibly
changed, with counters such as redactions per kind) or drops it with a reason.

Steps are pure and picklable (frozen dataclasses over their config section), so any engine can run the
same list: the local engine in its worker processes, a cluster engine in its tasks. A new rule is a new
step class here and one line in `record_steps`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

from cptkit.config import LanguageConfig, NormalizeConfig, PrepareConfig, QualityConfig, RedactConfig
from cptkit.rules.language import detect_language
from cptkit.rules.normalize import normalize
from cptkit.rules.quality import quality_issue
from cptkit.rules.redact import redact


@dataclass(frozen=True)
class Keep:
    text: str
    counts: Mapping[str, int] = field(default_factory=dict)  # what the step counted, e.g. redactions by kind


@dataclass(frozen=True)
class Drop:
    reason: str


class RecordStep(Protocol):
    @property
    def name(self) -> str: ...

    def __call__(self, text: str) -> Keep | Drop: ...


@dataclass(frozen=True)
class Normalize:
    config: NormalizeConfig
    name: ClassVar[str] = "normalize"

    def __call__(self, text: str) -> Keep | Drop:
        return Keep(normalize(text, self.config))


@dataclass(frozen=True)
class DropEmpty:
    name: ClassVar[str] = "empty"

    def __call__(self, text: str) -> Keep | Drop:
        return Keep(text) if text.strip() else Drop("empty")


@dataclass(frozen=True)
class Redact:
    config: RedactConfig
    name: ClassVar[str] = "redact"

    def __call__(self, text: str) -> Keep | Drop:
        text, counts = redact(text, self.config)
        return Keep(text, counts)


@dataclass(frozen=True)
class Quality:
    config: QualityConfig
    name: ClassVar[str] = "quality"

    def __call__(self, text: str) -> Keep | Drop:
        issue = quality_issue(text, self.config)
        return Keep(text) if issue is None else Drop(issue)


@dataclass(frozen=True)
class Language:
    config: LanguageConfig
    name: ClassVar[str] = "language"

    def __call__(self, text: str) -> Keep | Drop:
        lang, score = detect_language(text)
        if lang not in self.config.languages or score < self.config.min_score:
            return Drop("language")
        return Keep(text)


def record_steps(config: PrepareConfig) -> list[RecordStep]:
    """The enabled rules in the order they run; the filters run after redaction, on the text that is
    written."""
    steps: list[RecordStep] = [Normalize(config.normalize), DropEmpty()]
    if config.redact.enabled:
        steps.append(Redact(config.redact))
    steps.append(Quality(config.quality))
    if config.language.enabled:
        steps.append(Language(config.language))
    return steps


@dataclass(frozen=True)
class RecordOutcome:
    text: str | None  # the transformed text when every step kept the document
    reason: str | None  # the first drop's reason
    counts: dict[str, dict[str, int]]  # step name -> what it counted, also for a document dropped later


def run_steps(steps: Sequence[RecordStep], text: str) -> RecordOutcome:
    counts: dict[str, dict[str, int]] = {}
    for step in steps:
        result = step(text)
        if isinstance(result, Drop):
            return RecordOutcome(None, result.reason, counts)
        text = result.text
        if result.counts:
            counts[step.name] = dict(result.counts)
    return RecordOutcome(text, None, counts)


def apply_rules(text: str, config: PrepareConfig) -> RecordOutcome:
    """Every enabled rule on one document (engines build the list once and call `run_steps`)."""
    return run_steps(record_steps(config), text)
