"""The register stage: put the adapted model in MLflow's model registry, prove that the registered copy is
the model that was trained, and promote it only when its evaluation passes the gate.

Order of work: the trained model is loaded in float32 (a QLoRA adapter on its base's dequantized 4-bit
values: the function that was trained and evaluated, which loads without bitsandbytes; adapters are never
merged into 4-bit weights); its logits on fixed inputs are the reference. It is logged to the training's
MLflow run with the transformers flavor and registered as a new version. The version is then loaded
back through MLflow (`models:/name/version`) and its logits compared with the reference: beyond
`register.roundtrip_tolerance` the version is tagged broken and the command fails. Only a version that
round-trips gets the alias `challenger`, and only one that passes the gate gets `champion`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Self

from cptkit import __version__
from cptkit.artifacts import MANIFEST, new_manifest, read_json, up_to_date, write_json_atomic
from cptkit.config import Config, RegisterConfig, TrainingConfig, section_fingerprint
from cptkit.errors import CptkitError, StageError
from cptkit.eval_sets import DOMAIN, eval_sources, read_set
from cptkit.folders import claim
from cptkit.model_folder import REGISTRATION_DIR, RESULTS, SUMMARY, evaluation_dir, trained_training_config
from cptkit.models import EMBEDDINGS_FILE, dequantized_base_dir, is_peft, load_trained, resolve_model
from cptkit.registry import CHALLENGER, CHAMPION, UNITY_CATALOG, Registry, pinned_requirements, resolve_registry_uri
from cptkit.results import Champion, Check, EvaluationResults, GateResult, TrainingSummary
from cptkit.roundtrip import (
    ROUNDTRIP_TEXTS,
    load_float_model,
    max_abs_difference,
    reference_logits,
    roundtrip_difference,
)
from cptkit.tracking import resolve_tracking_uri
from cptkit.verdict import verdict

log = logging.getLogger(__name__)

TAG_PREFIX = "cptkit."
FORCED_TAG = "true: promoted with --force despite the failed gate"


@dataclass(frozen=True)
class RegisterResult:
    name: str
    version: str
    model_uri: str
    registry: str
    merged: bool
    roundtrip_max_diff: float
    gate: GateResult
    promoted: bool
    forced: bool
    run_id: str
    float_base_gap: dict[str, float] | None = None
    notes: list[str] = field(default_factory=list)
    skipped: bool = False

    @property
    def champion_uri(self) -> str:
        return f"models:/{self.name}@{CHAMPION}"

    def not_promoted(self) -> str | None:
        """Why this version is not the champion, or None when it is."""
        if self.promoted:
            return None
        failures = "; ".join(self.gate.failures()) or "the gate failed"
        return (
            f"register: not promoted: {failures} (version {self.version} stays challenger; "
            "cptkit register --force promotes it anyway)"
        )

    def to_json(self) -> dict[str, Any]:
        """As the registration manifest's `result` holds it."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data.update(gate=self.gate.to_json(), notes=list(self.notes))
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any], skipped: bool) -> Self:
        known = {f.name for f in fields(cls)} - {"gate", "skipped"}
        return cls(
            gate=GateResult.from_json(data["gate"]), skipped=skipped, **{k: v for k, v in data.items() if k in known}
        )


RegistryFactory = Callable[..., Registry]


def register(config: Config, force: bool = False, registry_factory: RegistryFactory = Registry.open) -> RegisterResult:
    """Register the model in `config.output_dir` under `tracking.registered_model_name`. Raises
    CptkitError when the round-trip check fails; a version that fails the gate is registered as
    challenger and returned with `promoted=False` (unless `force`)."""
    if not (config.output_dir / MANIFEST).is_file():
        raise StageError(
            f"{config.output_dir}: no finished training there (no train manifest.json); run cptkit train first"
        )
    with claim(config.output_dir / REGISTRATION_DIR, "register"):
        return _register(config, force, registry_factory)


def _register(config: Config, force: bool, registry_factory: RegistryFactory) -> RegisterResult:
    cpt_dir = config.output_dir
    name = config.tracking.registered_model_name
    if not config.tracking.enabled:
        raise StageError("register needs MLflow: tracking.enabled is false")
    train_manifest = read_json(cpt_dir / MANIFEST)
    if train_manifest is None or train_manifest.get("stage") != "train":
        raise StageError(f"{cpt_dir}: no finished training there (no train manifest.json); run cptkit train first")
    results, eval_manifest = _current_evaluation(config, train_manifest)
    # Registered already: the same trained model and evaluation, under the same name, store and gate.
    out = cpt_dir / REGISTRATION_DIR
    config_fp = section_fingerprint(
        config.register_,
        name,
        config.tracking.tracking_uri,
        [config.evaluate.min_adaptation, config.evaluate.max_forgetting, config.evaluate.max_drift_kl]
        + ([config.evaluate.max_chat_drift] if config.evaluate.max_chat_drift is not None else []),
    )
    input_fp = section_fingerprint(train_manifest.get("created_at"), eval_manifest.get("created_at"))
    existing = up_to_date(out, config_fp, input_fp)
    if existing is not None:
        previous = RegisterResult.from_json(existing["result"], skipped=True)
        if not force or previous.promoted:
            return previous
        # --force on the version the gate refused: promote that version rather than register it again.
        registry = registry_factory(config.tracking, config.register_)
        registry.set_version_tags(name, previous.version, {f"{TAG_PREFIX}forced": FORCED_TAG})
        registry.set_alias(name, CHAMPION, previous.version)
        forced_now = replace(previous, promoted=True, forced=True, skipped=False)
        existing["result"] = forced_now.to_json()
        write_json_atomic(out / MANIFEST, existing)
        return forced_now
    summary = TrainingSummary.read(cpt_dir / SUMMARY)
    training = trained_training_config(cpt_dir, config.training)
    env = os.environ
    registry_uri = resolve_registry_uri(config.register_.registry_uri, env) or resolve_tracking_uri(
        config.tracking.tracking_uri, env
    )
    merged = decide_merge(config.register_, training, cpt_dir, registry_uri)

    registry = registry_factory(config.tracking, config.register_)  # opened before the slow part: fails fast
    base_dir = resolve_model(config.model.name)
    model, tokenizer = load_float_model(base_dir, cpt_dir, training)
    texts = [*ROUNDTRIP_TEXTS, *config.evaluate.generation.domain_prompts[:2]]
    reference = reference_logits(model, tokenizer, texts)
    gap = float_base_gap(base_dir, cpt_dir, training, tokenizer, texts, reference)
    if merged and is_peft(model):
        model = model.merge_and_unload()
    base_reference = None
    if is_peft(model):
        base_reference = dequantized_base_dir(base_dir, training) if training.method == "qlora" else base_dir

    gate = promotion_gate(results, config, registry, name)
    logged = registry.log_transformers_model(
        summary.mlflow_run_id if summary else None,
        config.tracking.experiment_name,
        model,
        tokenizer,
        base_model_path=str(base_reference) if base_reference is not None else None,
        pip_requirements=pinned_requirements(peft=is_peft(model)),
        metadata=model_metadata(config, training, summary, results, merged),
        input_example=([texts[0]], {"max_new_tokens": config.register_.max_new_tokens}),
    )
    del model
    try:
        version = registry.create_version(
            name,
            logged,
            tags=version_tags(config, training, results, merged, gap),
            description=f"cptkit {training.method} of {config.model.name} (run {logged.run_id})",
        )
        diff = _check_round_trip(registry, name, version, texts, reference, config.register_.roundtrip_tolerance)
    except BaseException:
        # The run keeps what this attempt logged (a broken version points to it), marked FAILED so that it
        # is not taken for a usable model beside the ones that passed.
        registry.mark_failed(logged)
        raise
    model_uri = f"models:/{name}/{version}"
    registry.set_version_tags(
        name, version, {f"{TAG_PREFIX}status": "ok", f"{TAG_PREFIX}roundtrip_max_abs_logit_diff": f"{diff:.3g}"}
    )
    registry.set_alias(name, CHALLENGER, version)

    promoted = gate.passed or force
    forced = force and not gate.passed
    gate_tags = {f"{TAG_PREFIX}gate": "passed" if gate.passed else "failed: " + "; ".join(gate.failures())}
    if forced:
        gate_tags[f"{TAG_PREFIX}forced"] = FORCED_TAG
    registry.set_version_tags(name, version, gate_tags)
    if promoted:
        registry.set_alias(name, CHAMPION, version)
    result = RegisterResult(
        name=name,
        version=version,
        model_uri=model_uri,
        registry=registry.where(),
        merged=merged,
        roundtrip_max_diff=diff,
        gate=gate,
        promoted=promoted,
        forced=forced,
        run_id=logged.run_id,
        float_base_gap=gap,
    )
    manifest = new_manifest("register", config_fp, input_fp)
    manifest["result"] = result.to_json()
    write_json_atomic(out / MANIFEST, manifest)
    return result


def _check_round_trip(
    registry: Registry, name: str, version: str, texts: list[str], reference: Any, tolerance: float
) -> float:
    """The largest logit difference between `version` loaded back from the registry and the trained model;
    a version beyond `tolerance` is tagged broken and an error raised."""
    loaded, loaded_tokenizer = registry.load_components(f"models:/{name}/{version}")
    diff = roundtrip_difference(loaded, loaded_tokenizer, texts, reference)
    del loaded
    if diff is None or diff > tolerance:
        what = "its tokenizer encodes the check inputs differently" if diff is None else f"max |Δlogit| {diff:.3g}"
        registry.set_version_tags(name, version, {f"{TAG_PREFIX}status": "broken", f"{TAG_PREFIX}roundtrip": what})
        registry.describe_version(name, version, f"BROKEN: loaded back from the registry, {what} > {tolerance:g}")
        raise CptkitError(
            f"{name} version {version} is broken: loaded back from the registry, {what} "
            f"(tolerance {tolerance:g}); it was tagged broken and not given an alias"
        )
    return diff


# ---------------------------------------------------------------- what is registered


def _current_evaluation(config: Config, train_manifest: dict[str, Any]) -> tuple[EvaluationResults, dict[str, Any]]:
    """The evaluation results of the trained model now in output_dir; an error when there are none, or
    when they were computed before this model was trained."""
    out = evaluation_dir(config)
    results = EvaluationResults.read(out / RESULTS)
    eval_manifest = read_json(out / MANIFEST)
    if results is None or eval_manifest is None:
        raise StageError(
            f"{out}: no evaluation of the trained model; run cptkit evaluate first (the promotion gate needs it)"
        )
    if str(eval_manifest.get("created_at", "")) < str(train_manifest.get("created_at", "")):
        raise StageError(f"{out}: the evaluation is older than the trained model; run cptkit evaluate again")
    return results, eval_manifest


def decide_merge(rc: RegisterConfig, training: TrainingConfig, cpt_dir: Path, registry_uri: str) -> bool:
    """Whether the registered model is the adapter merged into its base (full weights). Unset, an adapter
    is merged where a reference to a base folder on this machine would not load: a registry that is not a
    local file (a tracking server, Databricks, Unity Catalog), and trained embeddings (not in an adapter)."""
    if training.method == "full":
        return False  # already full weights
    remote = not registry_uri.startswith(("sqlite:", "file:", "/", "."))
    embeddings = (cpt_dir / EMBEDDINGS_FILE).is_file()
    if rc.merge is False:
        if embeddings:
            raise CptkitError(
                "register.merge: false cannot register this model: its embeddings were trained and a peft "
                "adapter does not hold them; set register.merge: true (or leave it unset)"
            )
        if registry_uri == UNITY_CATALOG:
            raise CptkitError(
                "register.merge: false: Unity Catalog needs the model's weights in the registry, not a "
                "reference to a local base; set register.merge: true (or leave it unset)"
            )
        return False
    return rc.merge is True or embeddings or remote


def model_metadata(
    config: Config,
    training: TrainingConfig,
    summary: TrainingSummary | None,
    results: EvaluationResults,
    merged: bool,
) -> dict[str, Any]:
    """What the registered model is, in its MLmodel file: base, method, data, training and evaluation."""
    return {
        "cptkit_version": __version__,
        "base_model": config.model.name,
        "method": training.method,
        "merged": merged,
        "data": _data_fingerprints(config),
        "training": {
            "steps": summary.steps if summary else None,
            "tokens": summary.tokens if summary else None,
            "replay_share": summary.replay_share if summary else None,
            "final_loss": summary.final_loss if summary else None,
            "mlflow_run_id": summary.mlflow_run_id if summary else None,
        },
        "evaluation": {
            "adaptation": results.adaptation,
            "forgetting": results.forgetting,
            "drift_kl": results.drift_kl,
            "top1_agreement": results.top1_agreement,
            "passed": results.passed,
            "settings": asdict(results.settings),
        },
    }


def version_tags(
    config: Config,
    training: TrainingConfig,
    results: EvaluationResults,
    merged: bool,
    gap: dict[str, float] | None,
) -> dict[str, str]:
    tags = {
        f"{TAG_PREFIX}base_model": config.model.name,
        f"{TAG_PREFIX}method": training.method,
        f"{TAG_PREFIX}merged": str(merged).lower(),
        f"{TAG_PREFIX}status": "checking",
    }
    for key, value in results.headline().items():
        tags[f"{TAG_PREFIX}eval.{key}"] = f"{value:.6g}"
    domain = results.cpt.get(DOMAIN)
    if domain is not None:
        tags[f"{TAG_PREFIX}eval.domain_bits_per_byte"] = repr(float(domain.bits_per_byte))
        tags[f"{TAG_PREFIX}eval.domain_set"] = domain_set_id(config, results)
    if gap is not None:
        tags[f"{TAG_PREFIX}qlora.on_float_base.max_abs_logit_diff"] = f"{gap['max_abs_logit_diff']:.3g}"
        tags[f"{TAG_PREFIX}qlora.on_float_base.top1_agreement"] = f"{gap['top1_agreement']:.4f}"
    return tags


def _data_fingerprints(config: Config) -> dict[str, Any]:
    """The identity of the data the model was trained on: extract's content fingerprint (what was read)
    and prepare's config fingerprint (what was done to it) of each dataset."""
    from cptkit.datasets import datasets

    out: dict[str, Any] = {}
    if config.source is None:
        return out
    for dataset in datasets(config):
        raw = read_json(dataset.raw_dir / MANIFEST) or {}
        prepared = read_json(dataset.directory / MANIFEST) or {}
        out[dataset.name] = {
            "content": raw.get("content_fingerprint"),
            "delta_version": raw.get("delta_version"),
            "prepare_config": prepared.get("config_fingerprint"),
        }
    return out


# ---------------------------------------------------------------- the round-trip check


def float_base_gap(
    base_dir: Path, cpt_dir: Path, training: TrainingConfig, tokenizer: Any, texts: Sequence[str], reference: Any
) -> dict[str, float] | None:
    """For QLoRA: how far the adapter on the original float base (what `vllm --enable-lora` or
    PeftModel.from_pretrained on the hub base would serve) is from the model that was trained, evaluated
    and registered (the adapter on the 4-bit base's values). Reported, not gated."""
    if training.method != "qlora":
        return None
    on_float = training.model_copy(update={"method": "lora", "precision": "fp32"})
    model = load_trained(base_dir, cpt_dir, on_float, "cpu")
    other = reference_logits(model, tokenizer, texts)
    del model
    worst, agree, total = 0.0, 0, 0
    for (_, q), (_, f) in zip(other, reference, strict=True):
        worst = max(worst, max_abs_difference(q, f))
        agree += int((q.argmax(-1) == f.argmax(-1)).sum())
        total += q.shape[0]
    return {"max_abs_logit_diff": worst, "top1_agreement": agree / max(total, 1)}


# ---------------------------------------------------------------- the promotion gate


def promotion_gate(results: EvaluationResults, config: Config, registry: Registry, name: str) -> GateResult:
    """The evaluation's verdict against the config's thresholds (minimum adaptation, maximum forgetting
    and drift), and, when a champion exists and was evaluated on the same domain text, no worse than it
    on the domain (bits per byte, which does not depend on the tokenizer)."""
    checks = list(
        verdict(
            results.adaptation, results.forgetting_by_set, results.drift_kl, config.evaluate, results.chat.drift
        ).checks
    )
    champion_version = registry.alias_version(name, CHAMPION)
    champion = None
    if champion_version is not None:
        tags = registry.version_tags(name, champion_version)
        domain = results.cpt.get(DOMAIN)
        ours = domain.bits_per_byte if domain is not None else None
        theirs = tags.get(f"{TAG_PREFIX}eval.domain_bits_per_byte")
        same_set = tags.get(f"{TAG_PREFIX}eval.domain_set") == domain_set_id(config, results)
        champion = Champion(version=champion_version, domain_bits_per_byte=theirs, same_domain_set=same_set)
        if ours is None or theirs is None or not same_set:
            checks.append(
                Check(
                    name=f"domain vs champion (version {champion_version})",
                    value=ours,
                    threshold=None,
                    passed=None,
                    note="not compared: the champion was evaluated on other domain text or settings",
                )
            )
        else:
            checks.append(
                Check(
                    name=f"domain bits/byte vs champion (version {champion_version})",
                    value=float(ours),
                    threshold=float(theirs),
                    passed=float(ours) <= float(theirs),
                )
            )
    decided = [c.passed for c in checks if c.passed is not None]
    return GateResult(passed=all(decided), checks=checks, champion=champion)


def domain_set_id(config: Config, results: EvaluationResults) -> str:
    """An identity of the domain evaluation text and the scoring settings: two versions' domain scores
    are comparable only when it is equal."""
    source = eval_sources(config)[DOMAIN]
    texts = read_set(DOMAIN, source, config.evaluate.max_documents).texts
    s = results.settings
    settings = {"context_length": s.context_length, "stride": s.stride, "max_documents": s.max_documents}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for text in texts:
        digest.update(text.encode("utf-8", "surrogatepass"))
        digest.update(b"\0")
    return digest.hexdigest()[:16]
