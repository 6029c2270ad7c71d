"""The `cptkit` command. Each subcommand loads the config once, runs one stage, and turns the project's
errors into one clear line and a non-zero exit (tracebacks only with --debug)."""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
import yaml

from cptkit import __version__
from cptkit.config import Config, load_config, masked_dict
from cptkit.distributed import (
    group_size,
    launch_local,
    launched_as_group,
    lost_the_main_process,
    process_rank,
    threads_per_process,
)
from cptkit.errors import ConfigError, CptkitError
from cptkit.folders import wait_for_lock
from cptkit.pipeline import Reporters, Stage
from cptkit.printers import (
    print_doctor,
    print_evaluate,
    print_export,
    print_extract,
    print_preflight,
    print_prepare,
    print_register,
    print_train,
)
from cptkit.progress import LogFormat, console, error_console, event, log_format, set_log_format
from cptkit.secrets import scrub, scrub_logs

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
ProcessesOpt = Annotated[
    int | None,
    typer.Option(
        "--processes",
        min=1,
        help="Train in this many local processes (each takes its share of every step's blocks); "
        "under torchrun or accelerate launch, the launcher decides.",
    ),
]


WaitOpt = Annotated[
    bool,
    typer.Option(
        "--wait", help="When another cptkit run is writing the same output folder, wait for it instead of failing."
    ),
]


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
    # mlflow sets its loggers' level from this variable when it is imported, after this function runs. Its
    # warnings are about its own internals (pipeline params, devices), not about anything the user can change.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "ERROR")
    # databricks.sdk warns when its host-metadata probe fails and falls back to the configuration, which
    # it does for any workspace that does not publish that metadata; a real failure is cptkit's error line.
    for name in ("mlflow", "bitsandbytes", "accelerate", "peft", "alembic", "databricks.sdk", "databricks.sql"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if not isinstance(sys.unraisablehook, _QuietVendorCleanup):
        sys.unraisablehook = _QuietVendorCleanup(sys.unraisablehook)
    # Deprecation notices libraries raise about each other (peft calling a renamed transformers method)
    # are for their developers, not for someone training a model.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


class _QuietVendorCleanup:
    """An unraisable-exception hook that drops the Databricks connectors' cleanup errors: the SQL
    connector's Connection.__del__ fails on a connection that never opened, and Python prints that as
    "Exception ignored in ..." with a traceback after cptkit's own error line. Others go to `previous`."""

    def __init__(self, previous: Any) -> None:
        self.previous = previous

    def __call__(self, info: Any) -> None:
        if not getattr(info.object, "__module__", "").startswith("databricks."):
            self.previous(info)


def _run(debug: bool, fn: Any, *args: Any, wait: bool = False) -> Any:
    """Call fn, translating errors into a message and an exit code. Every message, log record and
    warning is masked of secrets (URL userinfo, known credential values), with --debug too."""
    scrub_logs()
    if debug:
        os.environ["CPTKIT_DEBUG"] = "1"  # read where a library starts its own logging (Spark's JVM)
    else:
        os.environ.pop("CPTKIT_DEBUG", None)
        _quiet_libraries()
    wait_for_lock.set(wait)
    if process_rank() != 0:  # one process of a multi-process run: the main one prints (errors: every one)
        set_log_format(LogFormat.quiet)
        console.quiet = True
    try:
        return fn(*args)
    except (typer.Exit, typer.Abort):
        raise  # a command's own exit (typer.Exit(code)), not an error of cptkit's
    except ConfigError as exc:
        problems = [scrub(line) for line in exc.problems]
        for line in problems:
            error_console.print(line, style="red", markup=False, highlight=False, soft_wrap=True)
        event("error", kind="config", problems=problems, exit_code=exc.exit_code)
        _exit(exc.exit_code, debug)
    except CptkitError as exc:
        message = scrub(str(exc))
        error_console.print(f"error: {message}", style="red", markup=False, highlight=False, soft_wrap=True)
        event("error", kind="error", message=message, exit_code=exc.exit_code)
        _exit(exc.exit_code, debug)
    except KeyboardInterrupt:
        error_console.print("interrupted; no partial output was kept", style="yellow")
        event("error", kind="interrupted", exit_code=130)
        raise typer.Exit(130) from None
    except Exception as exc:
        if lost_the_main_process(exc) and not debug:
            _exit(1, debug)
        message = scrub(f"{type(exc).__name__}: {exc}")
        if not debug:
            error_console.print(
                f"internal error: {message} (rerun with --debug for the traceback)",
                style="red",
                markup=False,
                highlight=False,
            )
        event("error", kind="internal", message=message, exit_code=1)
        _exit(1, debug)


def _exit(code: int, debug: bool) -> NoReturn:
    """Exit with `code`; with --debug, first print the traceback of the error being handled, masked
    (Python's own printing of an uncaught error would show secrets in its messages)."""
    if debug:
        sys.stderr.write(scrub(traceback.format_exc()))
    raise typer.Exit(code) from None


@app.command()
def extract(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    force: ForceOpt = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the query, column mapping and row count; write nothing.")
    ] = False,
    wait: WaitOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Copy the configured source into a raw Parquet snapshot with a manifest (incremental sources: only
    what changed since the last run; --force rereads everything)."""
    from cptkit.extract import dry_run as plan_extract
    from cptkit.extract import extract as run_extract
    from cptkit.extract import spark_settings

    def go() -> None:
        from cptkit.datasets import datasets

        cfg = _load(config, set_)
        for dataset in datasets(cfg):
            spark = spark_settings(cfg)
            if dry_run:
                print_extract(plan_extract(dataset, spark=spark))
            else:
                print_extract(run_extract(dataset, force=force, spark=spark))

    _run(debug, go, wait=wait)


@app.command()
def prepare(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    force: ForceOpt = False,
    wait: WaitOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Normalize, filter, deduplicate, redact, split and tokenize the raw snapshot."""
    from cptkit.prepare import prepare as run_prepare

    def go() -> None:
        from cptkit.datasets import datasets

        cfg = _load(config, set_)
        for dataset in datasets(cfg):
            print_prepare(run_prepare(cfg, dataset, force=force))

    _run(debug, go, wait=wait)


@app.command()
def train(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    processes: ProcessesOpt = None,
    force: ForceOpt = False,
    wait: WaitOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Continual pretraining on the prepared data (resumes from the latest checkpoint of the same run)."""
    from cptkit.distributed import accelerate_cpu_processes
    from cptkit.tracking import check_tracking
    from cptkit.train import train as run_train

    def go() -> None:
        cfg = _load(config, set_)
        check_tracking(cfg.tracking)  # before the model loads: an unusable store fails in seconds
        _check_processes(processes)
        wanted = processes or accelerate_cpu_processes()
        if wanted is None or wanted == 1 or launched_as_group():
            print_train(run_train(cfg, force=force))
            return
        why = "" if processes else " (accelerate launch --cpu starts one process, so cptkit starts them)"
        _launch_train(wanted, config, set_, force, wait, debug, why)

    _run(debug, go, wait=wait)


def _check_processes(processes: int | None) -> None:
    if launched_as_group() and processes is not None and processes != group_size():
        raise ConfigError(
            [
                f"error: --processes {processes} under a launcher that started {group_size()}; "
                "the launcher decides: drop --processes"
            ]
        )


def _launch_train(
    processes: int, config: Path | None, set_: list[str] | None, force: bool, wait: bool, debug: bool, why: str = ""
) -> None:
    """`cptkit train` with this command's config, overrides and flags, in `processes` local processes (the
    main one prints train's result); raises typer.Exit with the failing process's code."""
    console.print(
        f"train: {processes} processes on this machine, {threads_per_process(processes)} CPU threads each{why}",
        highlight=False,
    )
    os.environ["CPTKIT_LOG_FORMAT"] = log_format()  # the processes print as this one would
    if config is None and DEFAULT_CONFIG.is_file():
        config = DEFAULT_CONFIG
    args = ["train", *(["-c", str(config.resolve())] if config is not None else [])]
    args += [a for value in set_ or [] for a in ("--set", value)]
    args += [flag for flag, on in (("--force", force), ("--wait", wait), ("--debug", debug)) if on]
    code = launch_local(processes, args, debug)
    if code != 0:
        raise typer.Exit(code)  # the failing process printed its own error


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
    wait: WaitOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Base vs adapted model: perplexity, bits per byte and drift on domain and general text, generations,
    and a report (report.md, report.html) with the verdict against the config's thresholds."""
    from cptkit.evaluate import evaluate as run_evaluate

    def go() -> None:
        from cptkit.eval_sets import source_for_path
        from cptkit.model_folder import trained_base_model

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

    _run(debug, go, wait=wait)


@app.command()
def register(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    force: Annotated[
        bool, typer.Option("--force", help="Promote to champion even when the gate fails (recorded in a tag).")
    ] = False,
    wait: WaitOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Register the evaluated model in MLflow as a new version (alias challenger), check that the registry
    copy reproduces the trained model's logits, and move alias champion to it when it passes the gate."""
    from cptkit.register import register as run_register

    def go() -> None:
        cfg = _load(config, set_)
        result = run_register(cfg, force=force)
        print_register(result)
        reason = result.not_promoted()
        if reason is not None:  # also when skipped: a refused model must not pass a CI step on a rerun
            raise CptkitError(reason)

    _run(debug, go, wait=wait)


@app.command()
def history(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    version: Annotated[
        str | None, typer.Option("--version", help="Start the chain at this version (default: the latest).")
    ] = None,
    debug: DebugOpt = False,
) -> None:
    """The registered model's lineage: each version back to the first, with its parent, data versions,
    tokens and evaluation numbers (the MLflow tags register wrote)."""
    from cptkit.lineage import history_lines
    from cptkit.registry import Registry

    def go() -> None:
        cfg = _load(config, set_)
        registry = Registry.open(cfg.tracking, cfg.register_)
        for line in history_lines(registry, cfg.tracking.registered_model_name, version):
            console.print(line, highlight=False, markup=False, soft_wrap=True)

    _run(debug, go)


@app.command()
def export(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    format_: Annotated[str, typer.Option("--format", help="hf (safetensors folder) or gguf (llama.cpp).")] = "hf",
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Where to write (default: <output_dir>/export/<format>).")
    ] = None,
    debug: DebugOpt = False,
) -> None:
    """Write the trained model as a standalone model: the adapter merged into its base in 16/32-bit."""
    from cptkit.export import export as run_export

    def go() -> None:
        cfg = _load(config, set_)
        print_export(run_export(cfg, format_, output))

    _run(debug, go)


@app.command()
def serve(
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            "-m",
            help="models:/name@alias, models:/name/version, an MLflow model folder or a cptkit export folder "
            "(default: models:/<tracking.registered_model_name>@champion).",
        ),
    ] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    port: Annotated[int, typer.Option("--port", "-p", help="Port on 127.0.0.1.")] = 5000,
    host: Annotated[str, typer.Option("--host", help="Interface; loopback unless you mean otherwise.")] = "127.0.0.1",
    debug: DebugOpt = False,
) -> None:
    """Serve the model over HTTP with MLflow's scoring server (POST /invocations), until interrupted."""
    from cptkit.serve import serve as run_serve

    def go() -> None:
        cfg = _load(config, set_)
        code = run_serve(cfg, model, host, port, announce=lambda line: console.print(line, highlight=False))
        if code:
            raise typer.Exit(code)

    _run(debug, go)


@app.command()
def tune(config: ConfigOpt = None, set_: SetOpt = None, wait: WaitOpt = False, debug: DebugOpt = False) -> None:
    """Pilot runs over replay ratio x learning rate at tune.token_levels of tune.tokens_per_pilot (the tune
    section), fitted laws of domain gain, forgetting, drift and chat drift, and the choice: the largest
    predicted gain within evaluate.max_forgetting / max_drift_kl / max_chat_drift, or a point within the
    fit's error of it with less drift; written as tuned.yaml beside an HTML report (docs/tune.md). A
    killed tune continues with the pilots not yet done."""

    def go() -> None:
        from cptkit.tune import read_config_data
        from cptkit.tune import tune as run_tune

        path = config if config is not None else (DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None)
        cfg = _load(config, set_)
        run_tune(cfg, read_config_data(path, list(set_ or [])))

    _run(debug, go, wait=wait)


@app.command("run")
def run_all(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    from_: Annotated[
        Stage | None, typer.Option("--from", help="First stage to run (default: extract).", case_sensitive=False)
    ] = None,
    until: Annotated[
        Stage | None, typer.Option("--until", help="Last stage to run (default: register).", case_sensitive=False)
    ] = None,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Print the preflight (data, steps, learning rate, model, measured speed and memory); run no stage.",
        ),
    ] = False,
    processes: Annotated[
        int | None,
        typer.Option(
            "--processes",
            min=1,
            help="Train in this many local processes (the other stages are unchanged); the preflight plans for them.",
        ),
    ] = None,
    wait: WaitOpt = False,
    debug: DebugOpt = False,
) -> None:
    """The whole pipeline: extract, prepare, train, evaluate, register. Stages that are up to date are
    skipped; the preflight is printed before training; a failed stage stops the run, and the next run
    continues from there (training from its last checkpoint)."""
    from cptkit import pipeline

    def go() -> None:
        cfg = _load(config, set_)
        _check_processes(processes)
        wanted = processes or group_size()
        if dry_run:
            print_preflight(pipeline.dry_run(cfg, wanted))
            return
        if launched_as_group():  # only the dry run's timed steps are worth running in every process
            raise CptkitError(
                "cptkit run under a launcher would run every stage in each of its processes: run `cptkit run "
                "--processes N` (it starts the training processes), or launch `cptkit train` or `cptkit run --dry-run`"
            )
        stages = pipeline.select(from_, until)
        options = pipeline.Options(
            processes=wanted, launch_train=lambda force: _launch_train(wanted, config, set_, force, wait, debug)
        )
        reason = pipeline.not_promoted(pipeline.run_pipeline(cfg, stages, stage_reporters(), options))
        if reason is not None:
            raise CptkitError(reason)

    _run(debug, go, wait=wait)


def stage_reporters() -> Reporters:
    return Reporters(
        extract=print_extract,
        prepare=print_prepare,
        preflight=print_preflight,
        train=print_train,
        evaluate=print_evaluate,
        register=print_register,
    )


@app.command()
def demo(
    config: Annotated[Path, typer.Option("--config", "-c", help="Demo config.")] = Path("configs/demo.yaml"),
    set_: SetOpt = None,
    updates: Annotated[
        bool,
        typer.Option(
            "--updates",
            help="The update loop instead: version 1 on nine modules in ten, then the rest as a new table version "
            "learned by an update from version 1, judged by the update gate (docs/updates.md).",
        ),
    ] = False,
    force: ForceOpt = False,
    wait: WaitOpt = False,
    debug: DebugOpt = False,
) -> None:
    """The whole pipeline on real text that ships with Python and on PyPI: stdlib docs as the domain (a
    local Delta table), Wikipedia as replay; extract, prepare, train SmolLM2-135M with QLoRA, evaluate."""
    from cptkit.demo import run_demo

    def go() -> None:
        if updates:
            from cptkit.demo_updates import run_demo_updates

            run_demo_updates(_load(config, set_), force, stage_reporters())
            return
        run_demo(_load(config, set_), force, stage_reporters())

    _run(debug, go, wait=wait)


@app.command()
def doctor(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of text.")] = False,
    refresh: Annotated[bool, typer.Option("--refresh", help="Measure again instead of reading the cache.")] = False,
    debug: DebugOpt = False,
) -> None:
    """What this machine computes fast (measured, cached) and what cptkit would choose for the config:
    device, precision, training method and evaluation precision, and why."""

    def go() -> None:
        from cptkit.doctor import diagnose

        result = diagnose(_load(config, set_), refresh=refresh)
        if as_json:
            sys.stdout.write(json.dumps(result.as_dict(), indent=2) + "\n")
        else:
            print_doctor(result)

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


def _version(value: bool) -> None:
    if value:
        print(f"cptkit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
    log_format: Annotated[
        LogFormat,
        typer.Option(
            "--log-format",
            envvar="CPTKIT_LOG_FORMAT",
            case_sensitive=False,
            help="rich shows stage results, each training step with its loss, speed and ETA, and progress bars "
            "on a terminal; quiet shows stage results and errors only; json writes one JSON object per event on "
            "stdout (errors also go to stderr).",
        ),
    ] = LogFormat.rich,
) -> None:
    """Continual pretraining of small language models on your own domain documents."""
    set_log_format(log_format)


def main() -> None:
    app()
