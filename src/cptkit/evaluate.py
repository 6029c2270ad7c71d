"""The evaluate stage: the base and the adapted model side by side, on the domain and on held-out general
text, with a verdict against the config's thresholds and a report people read. The sets are in
eval_sets, the scoring in scoring, the models in model_pair, lm-eval tasks in lm_tasks, the verdict in
verdict; this module runs them and writes, logs and reports the results."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from cptkit import chat_drift, domain_tasks
from cptkit.artifacts import (
    MANIFEST,
    invalidate,
    new_manifest,
    output_bytes,
    read_json,
    up_to_date,
    write_json_atomic,
)
from cptkit.base_scores import base_outputs_for
from cptkit.choices import Choice
from cptkit.config import (
    Config,
    SourceConfig,
    section_fingerprint,
)
from cptkit.datasets import TRAIN, TRAIN_TEXT, domain_dir, replay_dir
from cptkit.decontamination import contaminated, overlap_shares, training_texts
from cptkit.errors import CptkitError, StageError
from cptkit.eval_sets import DOMAIN, GENERAL, EvalSet, cap_tokens, eval_sources, read_set, set_fingerprint
from cptkit.folders import claim
from cptkit.lm_tasks import run_tasks
from cptkit.model_folder import EVALUATION_DIR, RESULTS, SUMMARY, evaluation_dir, trained_training_config
from cptkit.model_pair import generate, load_pair
from cptkit.progress import console
from cptkit.results import (
    DataAccounting,
    Drift,
    EvaluationResults,
    EvaluationSettings,
    ModelScore,
    SetFacts,
    TrainingFacts,
    TrainingSummary,
)
from cptkit.scoring import score
from cptkit.stage import StageResult
from cptkit.tracking import Tracker, open_tracker
from cptkit.verdict import relative_change, verdict

# ---------------------------------------------------------------- the stage


@dataclass(frozen=True)
class EvaluateResult(StageResult):
    results: EvaluationResults | None = None


def evaluate(
    config: Config,
    force: bool = False,
    output: Path | None = None,
    tracker_factory: Callable[..., Tracker] = open_tracker,
) -> EvaluateResult:
    """Evaluate the model in `config.output_dir` against its base `config.model.name`; write results.json,
    report.md and report.html to `<output_dir>/evaluation` (and the JSON to `output` too), log them to the
    training's MLflow run, and skip all of it when the model, sets and settings are unchanged."""
    if not config.output_dir.is_dir():
        raise CptkitError(f"{config.output_dir}: no such folder; train first (cptkit train) or pass --cpt-model")
    with claim(evaluation_dir(config), "evaluate"):
        return _evaluate(config, force, output, tracker_factory)


def _evaluate(
    config: Config, force: bool, output: Path | None, tracker_factory: Callable[..., Tracker]
) -> EvaluateResult:
    ec = config.evaluate
    cpt_dir = config.output_dir
    sources = eval_sources(config)
    if ec.task_include_path is not None and not ec.task_include_path.is_dir():
        raise CptkitError(f"evaluate.task_include_path: {ec.task_include_path}: no such folder")
    out = evaluation_dir(config)
    device, precision = choose_for_evaluation(config, cpt_dir)
    # The precision auto chose is part of the settings: results in bf16 are not those in fp32.
    chat_set = chat_drift.instructions_hash(chat_drift.instructions())
    config_fp = section_fingerprint(ec, config.model.name, config.model.tokenizer, precision.value, chat_set)
    task_dir = ec.task_include_path if ec.tasks else None
    input_fp = _input_fingerprint(cpt_dir, sources, task_dir)
    existing = up_to_date(out, config_fp, input_fp)
    if existing is not None and not force:
        results = EvaluationResults.read(out / RESULTS)
        if output is not None and results is not None:
            write_json_atomic(output, results.to_json())
        return EvaluateResult(existing, out, skipped=True, results=results)

    invalidate(out)
    started = time.perf_counter()
    sets = _decontaminate(config, {name: read_set(name, source, ec.max_documents) for name, source in sources.items()})
    summary = TrainingSummary.read(cpt_dir / SUMMARY)
    built = domain_tasks.build(config, sets[DOMAIN].texts, out) if ec.domain_tasks.enabled else None
    results = _evaluate_sets(config, cpt_dir, sets, summary, device, precision, built)
    results = replace(results, seconds=round(time.perf_counter() - started, 2))
    from cptkit.report import write_report

    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / RESULTS, results.to_json())
    report_files = write_report(results, summary, out)
    if isinstance(built, domain_tasks.DomainTaskSet):
        report_files.append(domain_tasks.TASKS_DIR)  # the generated task files, logged as a folder
    from cptkit.update_gate import evaluate_update

    report_files = [*report_files, *evaluate_update(config, out)]  # an update: base, champion, candidate
    # Opened only now: a failed evaluation leaves the training's run as it was, and creates no run.
    tracker = _open_tracker(config, summary, tracker_factory)
    try:
        _log(tracker, results, out, [RESULTS, *report_files], step=summary.steps if summary else 0)
    finally:
        tracker.end("FINISHED")  # the training run finished; a logging error must not mark it failed
    if output is not None:
        write_json_atomic(output, results.to_json())
    manifest = new_manifest("evaluate", config_fp, input_fp)
    manifest.update(
        outputs={n: {"bytes": output_bytes(out / n)} for n in [RESULTS, *report_files]},
        base_model=config.model.name,
        cpt_model=str(cpt_dir),
        verdict=results.passed,
        seconds=results.seconds,
    )
    write_json_atomic(out / MANIFEST, manifest)
    return EvaluateResult(manifest, out, skipped=False, results=results)


def _decontaminate(config: Config, sets: dict[str, EvalSet]) -> dict[str, EvalSet]:
    """The sets with their documents that share an n-gram with the training text counted and, with
    evaluate.decontamination.mode drop, left out."""
    dc = config.evaluate.decontamination
    if dc.mode == "off":
        return sets
    prepared = (domain_dir(config), replay_dir(config))
    folders = [d for d in prepared if (d / TRAIN).is_file() or (d / TRAIN_TEXT).is_dir()]
    if not folders:  # a model trained elsewhere: the report says the sets were not checked
        return sets
    shares = overlap_shares({name: s.texts for name, s in sets.items()}, training_texts(folders), dc.ngram)
    checked: dict[str, EvalSet] = {}
    for name, eval_set in sets.items():
        hits = contaminated(shares[name], dc.min_share)
        texts = [t for t, hit in zip(eval_set.texts, hits, strict=True) if not hit or dc.mode == "report"]
        if not texts:
            raise StageError(
                f"evaluation set {name}: all {len(hits)} documents are contaminated (at least {dc.min_share:.0%} of "
                f"their {dc.ngram}-word sequences occur in the training text); set evaluate.decontamination.mode: "
                "report to score them anyway"
            )
        if hits.any():
            action = "left out" if dc.mode == "drop" else "kept (decontamination.mode: report)"
            console.print(
                f"evaluate {name}: {int(hits.sum())} of {len(hits)} documents are contaminated (at least "
                f"{dc.min_share:.0%} of their {dc.ngram}-word sequences occur in the training text): {action}",
                highlight=False,
            )
        n_bytes = sum(len(t.encode("utf-8")) for t in texts)
        checked[name] = replace(
            eval_set,
            texts=texts,
            bytes=n_bytes,
            contaminated=int(hits.sum()),
            any_overlap=int((shares[name] > 0).sum()),
        )
    return checked


def _input_fingerprint(cpt_dir: Path, sources: dict[str, SourceConfig], task_dir: Path | None = None) -> str:
    """The trained model (its train manifest, else its files' sizes and times), every set's input, and
    the files of the custom task folder (a changed task YAML or JSONL there means a rerun)."""
    train_manifest = read_json(cpt_dir / MANIFEST)
    if train_manifest is not None:
        model_id = f"{train_manifest.get('config_fingerprint')}:{train_manifest.get('created_at')}"
    else:
        model_id = _files_fingerprint(cpt_dir, recursive=False)
    parts = [model_id, *(f"{name}={set_fingerprint(s)}" for name, s in sources.items())]
    if task_dir is not None:
        parts.append(f"tasks={_files_fingerprint(task_dir, recursive=True)}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _files_fingerprint(folder: Path, recursive: bool) -> str:
    files = folder.rglob("*") if recursive else folder.iterdir()
    stats = sorted((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in files if p.is_file())
    return json.dumps(stats)


def _open_tracker(config: Config, summary: TrainingSummary | None, factory: Callable[..., Tracker]) -> Tracker:
    """The training's MLflow run continued, or a new run when training was not tracked."""
    run_id = summary.mlflow_run_id if summary else None
    run_name = config.run_name("eval")
    return factory(config.tracking, run_id, run_name)


def choose_for_evaluation(config: Config, cpt_dir: Path) -> tuple[Choice, Choice]:
    """The device (cuda > mps > cpu; a 4-bit model not on mps) and evaluate.precision for this machine."""
    from cptkit.capability import available_devices, probe
    from cptkit.choices import choose_device, choose_eval_precision

    method = trained_training_config(cpt_dir, config.training).method
    device = choose_device(available_devices(), method)
    return device, choose_eval_precision(probe(device.value), config.evaluate.precision)


def _evaluate_sets(
    config: Config,
    cpt_dir: Path,
    sets: dict[str, EvalSet],
    summary: TrainingSummary | None,
    device_choice: Choice,
    precision: Choice,
    built: domain_tasks.DomainTaskSet | str | None = None,
) -> EvaluationResults:
    import torch

    ec = config.evaluate
    context, stride = config.evaluation_window()
    device = torch.device(device_choice.value)
    pair = load_pair(config.model.name, cpt_dir, config.training, precision.value, device)
    for line in (device_choice.line("device"), precision.line("precision")):
        console.print(f"evaluate: {line}", highlight=False, markup=False, soft_wrap=True)
    if precision.warning:
        console.print(f"evaluate: warning: {precision.warning}", style="yellow", highlight=False, markup=False)
    bf16 = precision.value == "bf16"
    cached_base = pair.base_identity(precision.value, device) if ec.base_score_cache else None
    settings = EvaluationSettings(
        context_length=context,
        stride=stride,
        batch_size=ec.batch_size,
        precision=precision.value,
        precision_reason=precision.reason,
        max_documents=ec.max_documents,
        max_tokens=ec.max_tokens,
        prefix_token_id=pair.cpt_tokenizer.prefix_id,
        device=str(device),
        device_reason=device_choice.reason,
        decontamination=ec.decontamination.mode,
        decontamination_ngram=ec.decontamination.ngram if ec.decontamination.mode != "off" else None,
        decontamination_min_share=ec.decontamination.min_share if ec.decontamination.mode != "off" else None,
    )
    base: dict[str, ModelScore] = {}
    cpt: dict[str, ModelScore] = {}
    drifts: dict[str, Drift] = {}
    facts: dict[str, SetFacts] = {}
    scored_tokens = 0
    score_seconds = 0.0
    term_spans: dict[str, domain_tasks.TermSpan] = {}
    for name, eval_set in sets.items():
        t0 = time.perf_counter()
        cut = False
        if ec.max_tokens is not None:
            eval_set, cut = cap_tokens(eval_set, pair.cpt_tokenizer.tokenizer, ec.max_tokens, min_share=context)
        base_docs = pair.base_tokenizer.encode(eval_set.texts)
        cpt_docs = pair.cpt_tokenizer.encode(eval_set.texts)
        same_tokens = len(base_docs) == len(cpt_docs) and all(
            np.array_equal(a, b) for a, b in zip(base_docs, cpt_docs, strict=True)
        )
        per_token = name == DOMAIN and isinstance(built, domain_tasks.DomainTaskSet)  # for term-span perplexity
        cached = base_outputs_for(cached_base, base_docs, context, stride, ec.batch_size)
        if same_tokens:
            (base_score, cpt_score), drift = score(
                [pair.base_runner, pair.cpt_runner],
                cpt_docs,
                context,
                stride,
                ec.batch_size,
                device,
                bf16,
                True,
                name,
                per_token=per_token,
                base_outputs=cached,
            )
            assert drift is not None
            drifts[name] = drift.result()
        else:  # different tokenizers: scored separately; bits per byte still compares them
            (base_score,), _ = score(
                [pair.base_runner],
                base_docs,
                context,
                stride,
                ec.batch_size,
                device,
                bf16,
                per_token=per_token,
                base_outputs=cached,
            )
            (cpt_score,), _ = score(
                [pair.cpt_runner], cpt_docs, context, stride, ec.batch_size, device, bf16, per_token=per_token
            )
        if per_token and isinstance(built, domain_tasks.DomainTaskSet):
            for model, tok, s in (("base", pair.base_tokenizer, base_score), ("cpt", pair.cpt_tokenizer, cpt_score)):
                term_spans[model] = domain_tasks.term_span(eval_set.texts, tok, s, built.pattern)
        score_seconds += time.perf_counter() - t0
        scored_tokens += base_score.tokens + cpt_score.tokens
        for score_ in (base_score, cpt_score):
            score_.bytes = eval_set.bytes
        base[name] = base_score.result()
        cpt[name] = cpt_score.result()
        facts[name] = SetFacts(
            documents=len(eval_set.texts),
            skipped=eval_set.skipped,
            capped_at_tokens=ec.max_tokens if cut else None,  # the last document cut, later ones left out
            contaminated=eval_set.contaminated,
            any_overlap=eval_set.any_overlap,
            source=eval_set.source,
        )
        console.print(
            f"evaluate {name}: perplexity {base_score.perplexity:.3f} -> {cpt_score.perplexity:.3f}, bits per byte "
            f"{base_score.bits_per_byte:.4f} -> {cpt_score.bits_per_byte:.4f} ({cpt_score.tokens:,} tokens)",
            highlight=False,
        )

    adaptation = -relative_change(base[DOMAIN].perplexity, cpt[DOMAIN].perplexity)
    held_out = [n for n in sets if n != DOMAIN]
    forgetting_by_set = {n: relative_change(base[n].perplexity, cpt[n].perplexity) for n in held_out}
    general_drift = drifts.get(GENERAL)
    drift_kl = general_drift.kl if general_drift else None
    chat = chat_drift.measure(pair, ec.chat, precision.value, device, ec.batch_size, ec.base_score_cache)
    return EvaluationResults(
        pair=pair.description,
        settings=settings,
        base=base,
        cpt=cpt,
        drift=drifts,
        sets=facts,
        adaptation=adaptation,
        forgetting_by_set=forgetting_by_set,
        # The worst held-out set: a gain on one general set must not hide a loss on another.
        forgetting=max(forgetting_by_set.values()) if held_out else None,
        drift_kl=drift_kl,
        top1_agreement=general_drift.top1_agreement if general_drift else None,
        tokens_per_second=scored_tokens / max(score_seconds, 1e-9),
        tasks=run_tasks(pair, ec.tasks, context, ec.batch_size, ec.task_limit, ec.task_include_path, bf16),
        domain_tasks=domain_tasks.run(
            built,
            [("base", pair.base_runner, pair.base_tokenizer), ("cpt", pair.cpt_runner, pair.cpt_tokenizer)],
            term_spans,
            ec.domain_tasks,
            context,
            ec.batch_size * context,  # the tokens of a scoring batch
            device,
            bf16,
            cached_base,
        ),
        generations=generate(pair, ec.generation, device, cached_base),
        chat=chat,
        training=TrainingFacts.of(summary) if summary is not None else None,
        data=_data_accounting(config),
        verdict=verdict(adaptation, forgetting_by_set, drift_kl, ec, chat.drift),
    )


def _data_accounting(config: Config) -> dict[str, DataAccounting]:
    """Document counts from the prepare manifests of the domain and replay data, where they exist."""
    out = {}
    for name, directory in (("domain", domain_dir(config)), ("replay", replay_dir(config))):
        m = read_json(directory / MANIFEST)
        if m is None or m.get("stage") != "prepare":
            continue
        out[name] = DataAccounting.of(m)
    return out


def _log(tracker: Tracker, results: EvaluationResults, out: Path, files: list[str], step: int) -> None:
    metrics: dict[str, float] = {}
    for model, scores in (("base", results.base), ("cpt", results.cpt)):
        for set_name, s in scores.items():
            metrics[f"eval/{set_name}/{model}_perplexity"] = s.perplexity
            metrics[f"eval/{set_name}/{model}_bits_per_byte"] = s.bits_per_byte
    for set_name, d in results.drift.items():
        metrics[f"eval/{set_name}/drift_kl"] = d.kl
        metrics[f"eval/{set_name}/top1_agreement"] = d.top1_agreement
    for key, value in results.headline().items():
        metrics[f"eval/{key}"] = value
    for key, value in results.domain_tasks.metrics().items():
        metrics[f"eval/{key}"] = value
    metrics.update(chat_drift.metrics(results.chat))
    metrics["eval/passed"] = float(results.passed)
    tracker.log_metrics(metrics, step)
    for name in files:  # a folder (the generated tasks) keeps its name under evaluation/
        tracker.log_artifact(out / name, f"{EVALUATION_DIR}/{name}" if (out / name).is_dir() else EVALUATION_DIR)
    tracker.set_tags({"cptkit.evaluation": "passed" if results.passed else "failed"})
