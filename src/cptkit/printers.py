"""What the CLI prints for each stage's result, in the rich and quiet formats, and the one JSON event per
result in the json format (`cptkit --log-format`). The commands are in cli; the text is here."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from rich.table import Table

from cptkit.extract import DryRunResult
from cptkit.progress import console, duration, event
from cptkit.stage import StageResult

if TYPE_CHECKING:
    from cptkit.doctor import Diagnosis
    from cptkit.evaluate import EvaluateResult
    from cptkit.export import ExportResult
    from cptkit.preflight import Plan
    from cptkit.preflight_shape import ShapePlan
    from cptkit.register import RegisterResult
    from cptkit.train import TrainResult


def _stage_event(stage: str, result: StageResult, **fields: Any) -> None:
    name = (result.manifest or {}).get("dataset")
    event("stage", stage=stage, **({"dataset": name} if name else {}), skipped=result.skipped, **fields)


def print_extract(result: StageResult | DryRunResult) -> None:
    if isinstance(result, DryRunResult):
        event("extract_dry_run", **result.plan)
        plan = result.plan
        out = console.print
        head = f"extract {plan['dataset']} (dry run, nothing written): {plan.get('source')}"
        out(head, markup=False, highlight=False)
        for key in ("method", "mode", "version", "increment", "files"):
            if plan.get(key) is not None:
                out(f"  {key}: {plan[key]}", markup=False, highlight=False)
        if plan.get("query"):
            out("  query:", markup=False)
            for line in str(plan["query"]).splitlines():
                out(f"    {line}", markup=False, highlight=False, soft_wrap=True)
        out("  columns: " + ", ".join(f"{k} <- {v}" for k, v in plan["columns"].items()), markup=False, highlight=False)
        out(f"  rows: {plan['rows']:,}" + (f" ({plan['rows_note']})" if plan.get("rows_note") else ""), highlight=False)
        return
    m = result.manifest
    name = m.get("dataset", "domain")
    keys = ("rows", "bytes", "delta_version", "malformed_rows", "incremental", "seconds")
    _stage_event("extract", result, directory=result.directory, **{k: m.get(k) for k in keys})
    if result.skipped:
        console.print(f"extract {name}: up to date, skipped ({result.directory}/manifest.json matches)")
        return
    malformed = sum(m.get("malformed_rows", {}).values())
    version = f", Delta version {m['delta_version']}" if m.get("delta_version") is not None else ""
    inc = m.get("incremental") or {}
    changes = f", +{inc['upserted']:,} upserted -{inc['deleted']:,} deleted" if inc.get("applied_changes") else ""
    console.print(
        f"extract {name}: {m['rows']:,} rows{changes}, {m['bytes'] / 1e6:.1f} MB of text{version}, {malformed:,} "
        f"malformed -> {result.directory} ({m['seconds']:.1f}s)"
    )
    if inc.get("retries"):
        console.print(
            f"extract {name}: {inc['retries']} retried call(s), {inc['waited_seconds']:.1f}s waiting between them",
            style="yellow",
            highlight=False,
        )


def print_prepare(result: StageResult) -> None:
    m = result.manifest
    name = m.get("dataset", "domain")
    keys: tuple[str, ...] = ("documents_in", "documents_kept", "dropped", "quarantined_by_reason", "train_documents")
    keys += ("val_documents", "train_tokens", "val_tokens", "redactions", "seconds")
    _stage_event("prepare", result, directory=result.directory, **{k: m.get(k) for k in keys})
    if result.skipped:
        console.print(f"prepare {name}: up to date, skipped ({result.directory}/manifest.json matches)")
        return
    table = Table(title=f"prepare {name} -> {result.directory}", show_header=True)
    table.add_column("documents")
    table.add_column("count", justify="right")
    table.add_row("in", f"{m['documents_in']:,}")
    table.add_row("kept", f"{m['documents_kept']:,}")
    for reason, n in m["dropped"].items():
        table.add_row(f"  dropped: {reason}", f"{n:,}")
    for reason, n in m["quarantined_by_reason"].items():
        table.add_row(f"  quarantined: {reason}", f"{n:,}")
    table.add_row("train / val", f"{m['train_documents']:,} / {m['val_documents']:,}")
    if m.get("train_tokens") is not None:
        table.add_row("train / val tokens", f"{m['train_tokens']:,} / {m['val_tokens']:,}")
    for kind, n in m.get("redactions", {}).items():
        table.add_row(f"redacted {kind}", f"{n:,}")
    table.add_row("time", f"{m['seconds']:.1f}s ({m['input_megabytes_per_second']:.2f} MB/s)")
    console.print(table)


def print_train(result: TrainResult) -> None:
    s = result.summary
    _stage_event(
        "train",
        result,
        directory=result.directory,
        **_attributes(
            s, "steps", "tokens", "replay_share", "tokens_per_second", "final_loss", "final_eval", "peak_memory_bytes"
        ),
    )
    if result.skipped:
        console.print(f"train: up to date, skipped ({result.directory}/manifest.json matches)")
        return
    assert s is not None  # a run that trained has its summary
    evals = ", ".join(f"{k.split('/')[-1]} {v:.4f}" for k, v in s.final_eval.items() if k != "step")
    console.print(
        f"train: {s.steps} steps, {s.tokens:,} tokens ({s.replay_share:.1%} replay) at "
        f"{s.tokens_per_second:,.0f} tokens/s; final loss {s.final_loss:.4f}; {evals} -> {result.directory}",
        highlight=False,
    )
    if s.stopped_reason:
        console.print(f"train: {s.stopped_reason}", style="yellow", highlight=False)


def _attributes(obj: object | None, *names: str) -> dict[str, Any]:
    """The named attributes of a stage's result for its JSON event; None each when it has none."""
    return {name: getattr(obj, name) if obj is not None else None for name in names}


def print_evaluate(result: EvaluateResult) -> None:
    from cptkit.report import REPORT_HTML, headline

    r = result.results
    _stage_event(
        "evaluate",
        result,
        report=result.directory / REPORT_HTML,
        **_attributes(r, "passed", "adaptation", "forgetting", "forgetting_by_set", "drift_kl", "top1_agreement"),
    )
    if result.skipped:
        console.print(f"evaluate: up to date, skipped ({result.directory}/manifest.json matches)")
    if r is None:
        return
    style = "green" if r.passed else "yellow"
    console.print(f"evaluate: {headline(r)}", style=style, highlight=False, markup=False)
    tasks = r.tasks
    if tasks.status == "not_run":
        console.print(f"evaluate: benchmarks not run: {tasks.reason}", style="yellow", markup=False)
    elif tasks.status == "partial":
        for task, reason in (tasks.not_run or {}).items():
            console.print(f"evaluate: benchmark {task} not run: {reason}", style="yellow", markup=False)
    console.print(f"evaluate: report {result.directory / REPORT_HTML}", highlight=False, markup=False)


def print_register(result: RegisterResult) -> None:
    event("stage", stage="register", **result.to_json())

    def out(line: str, style: str | None = None) -> None:
        console.print(line, style=style, highlight=False, markup=False, soft_wrap=True)

    if result.skipped:
        state = "champion" if result.promoted else "challenger, not promoted"
        out(f"register: up to date, skipped: this model and evaluation are {result.model_uri} ({state})")
        return
    kind = "merged weights" if result.merged else "adapter + base reference"
    out(
        f"register: {result.model_uri} ({kind}) in {result.registry}; loaded back from the registry, max |Δlogit| "
        f"{result.roundtrip_max_diff:.2g} vs the trained model: ok; alias challenger"
    )
    gap = result.float_base_gap
    if gap is not None:
        out(
            f"register: note: this adapter was trained on the 4-bit base; on the original float base its top-1 "
            f"predictions agree {gap['top1_agreement']:.0%} (registered: the dequantized 4-bit base, as trained)",
            "yellow",
        )
    for check in result.gate.checks:
        if check.passed is None and check.note:
            out(f"register: {check.name}: {check.note}", "yellow")
    if result.promoted:
        if result.forced:
            failures = "; ".join(result.gate.failures())
            out(f"register: gate FAILED ({failures}); --force: alias champion -> version {result.version}", "yellow")
        else:
            out(f"register: gate passed, alias champion -> version {result.version}", "green")
    uri = result.champion_uri if result.promoted else result.model_uri
    out(f"register: load it with mlflow.transformers.load_model('{uri}') or serve it: cptkit serve -m '{uri}'")


def _preflight_line(line: str, style: str | None = None) -> None:
    console.print(f"preflight: {line}", style=style, highlight=False, markup=False, soft_wrap=True)


def print_preflight(plan: Plan | ShapePlan) -> None:
    from cptkit.models import human_size
    from cptkit.preflight_shape import ShapePlan

    if isinstance(plan, ShapePlan):
        print_shape_plan(plan)
        return
    event("preflight", **plan.as_dict())
    out = _preflight_line

    for f in plan.datasets:
        if f.estimated:
            megabytes = (f.text_bytes or 0) / 1e6
            out(
                f"{f.name}: {f.documents:,} documents in the source, {megabytes:,.2f} MB of text, about "
                f"{f.train_tokens + f.val_tokens:,} tokens (estimated from {f.sampled_documents} tokenized documents; "
                "before filtering and dedup)"
            )
        else:
            out(
                f"{f.name}: {f.documents:,} documents ({f.train_documents:,} train / {f.val_documents:,} val), "
                f"{f.train_tokens:,} train / {f.val_tokens:,} val tokens (prepared)" + (f"; {f.note}" if f.note else "")
            )
    est = " (estimated)" if plan.estimated else ""
    out(
        f"mix per epoch{est}: {plan.domain_tokens_per_epoch:,} domain + {plan.replay_tokens_per_epoch:,} replay tokens "
        f"({plan.replay_share:.1%} replay)"
    )
    budget = ""
    processes = (
        f" ({plan.processes} processes, {plan.blocks_per_step // plan.processes} each)" if plan.processes > 1 else ""
    )
    if plan.max_steps:
        budget = f" (fit to training.max_minutes at the measured speed; at most {plan.max_steps:,})"
    out(
        f"plan{est}: {plan.steps:,} steps of {plan.blocks_per_step} x {plan.seq_len} tokens{processes}, "
        f"{plan.epochs:.2f} epochs of {plan.blocks_per_epoch:,} blocks{budget}"
    )
    out(
        "learning rate: " + ", ".join(f"{rate:.2e} at step {step} ({what})" for what, step, rate in plan.learning_rates)
    )
    for note in plan.notes:
        out(f"note: {note}", "yellow")
    for line in plan.choices.lines() if plan.choices else []:
        out(line)
    if plan.evaluate_precision is not None:
        out(plan.evaluate_precision.line("evaluate precision"))
    for warning in plan.warnings:
        out(f"warning: {warning}", "yellow")
    if plan.description is not None:
        d = plan.description
        out(
            f"model: {d.method}, {d.trainable_params:,} trainable of {d.total_params:,} parameters "
            f"({d.trainable_params / max(d.total_params, 1):.2%}), {human_size(d.saved_bytes)} saved; memory estimated "
            f"from the parameter counts {human_size(d.estimated_memory_bytes)}"
        )
    m = plan.measured
    if m is None:
        if plan.train_up_to_date:
            out("train is up to date; speed and memory not measured")
        return
    if m.processes == 1:
        speed, memory = f"{m.tokens_per_second:,.0f} tokens/s", "peak memory"
    else:
        speed = (
            f"{m.tokens_per_second:,.0f} tokens/s on {m.processes} processes ({m.throughput_basis}), "
            f"{m.tokens_per_second_per_process:,.0f} per process"
        )
        memory = "peak memory per process"
    out(
        f"measured on {m.device} ({m.precision}), {m.timed_steps} timed steps after {m.warmup_steps} warm-up: "
        f"{speed}, {m.seconds_per_step:.2f} s/step; {memory} {human_size(m.peak_memory_bytes)} ({m.memory_kind})"
    )
    e = plan.estimated_seconds
    out(
        f"estimated duration: {duration(e['total'])} (steps {duration(e['steps'])}, validation "
        f"{duration(e['validation'])}, loading {duration(e['load'])})"
    )


def print_shape_plan(plan: ShapePlan) -> None:
    """The dry run without the model's weights: its shape, the memory estimate by part, what went unchecked."""
    from cptkit.models import human_size

    event("preflight_shape", **plan.as_dict())
    out = _preflight_line
    s = plan.shape
    out(f"model: {plan.model}: weights not here; shape from {plan.shape_from}")
    out(
        f"shape: {s.params:,} parameters, {s.layers} layers of {s.hidden_size:,}, vocabulary {s.vocab_size:,}; "
        f"{s.quantizable_params:,} in linear layers, {s.embedding_params:,} in the embeddings"
    )
    for line in plan.checked:
        out(f"checked: {line}")
    parts = ", ".join(f"{name} {human_size(size)}" for name, size in plan.memory.items())
    checkpointing = "on" if plan.gradient_checkpointing else "off"
    out(
        f"memory estimated from the shape ({plan.method}, {plan.precision}, {plan.tokens_per_micro_batch:,} tokens "
        f"per micro batch, gradient checkpointing {checkpointing}): {human_size(plan.memory_bytes)} ({parts})"
    )
    others = ", ".join(f"{m} {human_size(b)}" for m, b in plan.other_methods.items())
    out(f"for comparison, the same run with method {others}")
    for line in plan.unchecked:
        out(f"not checked: {line}", "yellow")


def print_doctor(result: Diagnosis) -> None:
    from cptkit.models import human_size

    c = result.capability

    def out(line: str, style: str | None = None) -> None:
        console.print(line, style=style, highlight=False, markup=False, soft_wrap=True)

    def rate(value: float | None) -> str:
        return "does not run" if value is None else f"{value:,.1f} GFLOP/s ({value / c.fp32_gflops:.2f}x fp32)"

    env = ", ".join(f"{k}={v}" for k, v in c.isa_env.items()) or "none"
    out(f"devices present: {', '.join(result.devices)}; measured: {c.device} ({c.device_name})")
    out(
        f"cpu: {c.cpu_model}; flags: {' '.join(c.cpu_flags) or 'none of note'}; torch kernels {c.cpu_kernels}, "
        f"{c.threads} threads; torch {c.torch_version}; ISA variables: {env}"
    )
    out(f"memory: {human_size(c.memory_bytes)} ({human_size(c.memory_available_bytes)} available)")
    one = " on one thread" if c.device == "cpu" else ""
    out(
        f"matmul{one}: fp32 {c.fp32_gflops:,.1f} GFLOP/s, bf16 {rate(c.bf16_gflops)}"
        + (f", fp16 {rate(c.fp16_gflops)}" if c.device != "cpu" else "")
    )
    dequant = c.dequant_4bit_gparams_per_second
    out("4-bit (NF4) dequantization: " + (f"{dequant:,.2f} G parameters/s" if dequant else f"n/a ({c.dequant_note})"))
    state = "read from the cache" if c.cached else "measured now"
    out(f"probe: {state} ({c.measured_at}, {c.probe_seconds:.2f} s) {result.cache_file}")
    for line in result.training.lines():
        out(f"train: {line}")
    out(f"evaluate: {result.evaluate_precision.line('precision')}")
    if result.training.memory_estimates:
        sizes = ", ".join(f"{m} {human_size(b)}" for m, b in result.training.memory_estimates.items())
        out(f"estimated training memory: {sizes}")
    for warning in result.warnings:
        out(f"warning: {warning}", "yellow")


def print_export(result: ExportResult) -> None:
    event("stage", stage="export", skipped=False, **dataclasses.asdict(result))
    for note in result.notes:
        console.print(f"export: note: {note}", style="yellow", highlight=False, markup=False, soft_wrap=True)
    console.print(
        f"export: {result.format} model -> {result.path} ({result.bytes / 1e6:,.0f} MB, {result.dtype}); loaded "
        f"back: weights identical, max |Δlogit| {result.trained_max_diff:.2g} vs the trained model (float32)",
        highlight=False,
        markup=False,
        soft_wrap=True,
    )
