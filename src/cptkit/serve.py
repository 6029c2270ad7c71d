"""cptkit serve: a local HTTP endpoint for a registered or exported model.

The server is MLflow's own scoring server app (what `mlflow models serve` runs, POST /invocations), the
same one `mlflow models build-docker` and Databricks Model Serving build on, so what works here works
there; `cptkit.scoring_server` adds a check of each request's generation parameters in front of it. It
runs as a child process in its own process group, pointed at the config's tracking and registry stores,
and is stopped with everything it started when cptkit is interrupted, terminated, loses its terminal or
(on Linux) is killed.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from cptkit.artifacts import atomic_dir
from cptkit.config import Config
from cptkit.errors import CptkitError
from cptkit.processes import die_with_parent
from cptkit.registry import CHAMPION, pinned_requirements, resolve_registry_uri, save_transformers_model
from cptkit.tracking import resolve_tracking_uri

MLFLOW_WRAPPER_SUFFIX = ".mlflow"
# Part of the wrapper's stamp: a wrapper written by an earlier cptkit (without a max_new_tokens parameter
# in its signature, so MLflow ignored the one a request sent) is written again.
_WRAPPER_FORMAT = 2
_EXAMPLE_MAX_NEW_TOKENS = 32
_STOP_SECONDS = 10


def model_uri_for(config: Config, model: str | None) -> str:
    """What MLflow serves: a models:/ or runs:/ URI as given, an MLflow model folder, or a cptkit export
    folder (wrapped once into an MLflow model folder beside it)."""
    if model is None:
        return f"models:/{config.tracking.registered_model_name}@{CHAMPION}"
    if model.startswith(("models:/", "runs:/")):
        return model
    path = Path(model).expanduser().resolve()
    if (path / "MLmodel").is_file():
        return str(path.resolve())
    if (path / "config.json").is_file():
        return str(mlflow_wrapper(path))
    raise CptkitError(
        f"--model {model}: expected models:/name@alias, models:/name/version, runs:/..., an MLflow model folder "
        "(with MLmodel) or a cptkit export folder (with config.json)"
    )


def mlflow_wrapper(folder: Path) -> Path:
    """An MLflow transformers model folder holding the Hugging Face model in `folder`, written next to it
    once (and again when the folder changes)."""
    target = folder.with_name(folder.name + MLFLOW_WRAPPER_SUFFIX)
    files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir())
    stamp = json.dumps({"format": _WRAPPER_FORMAT, "files": files})
    stamp_file = target / "cptkit_source.json"
    if stamp_file.is_file() and stamp_file.read_text(encoding="utf-8") == stamp:
        return target.resolve()
    if target.exists() and not stamp_file.is_file():
        raise CptkitError(f"{target} exists and was not written by cptkit serve; move it, or serve another folder")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype="auto")
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as exc:
        raise CptkitError(
            f"--model {folder}: cannot load it as a transformers model: {str(exc).splitlines()[0]}"
        ) from None
    with atomic_dir(target) as tmp:
        # The example's params give the signature a max_new_tokens parameter, as a registered model has.
        example = (["The json module"], {"max_new_tokens": _EXAMPLE_MAX_NEW_TOKENS})
        save_transformers_model(tmp, model, tokenizer, pinned_requirements(peft=False), example)
        (tmp / "cptkit_source.json").write_text(stamp, encoding="utf-8")
    return target.resolve()


def serve_command(model_uri: str, host: str, port: int, max_new_tokens_limit: int) -> list[str]:
    # This Python, with the packages installed here (the ones that trained the model), not a new virtualenv.
    return [sys.executable, "-m", "cptkit.scoring_server", model_uri, host, str(port), str(max_new_tokens_limit)]


def check_port(host: str, port: int) -> None:
    """Fail at once, in one line, when the server could not listen on host:port; MLflow would find out
    only after loading the model, and say it with a traceback."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise CptkitError(f"serve: --host {host}: not a known address ({exc.strerror})") from None
    family, _, _, _, address = infos[0]
    try:
        # SO_REUSEADDR, as the server sets it: a port whose last connections are closing is free.
        with socket.create_server(address, family=family):
            pass
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise CptkitError(f"serve: port {port} on {host} is in use (choose another with --port)") from None
        raise CptkitError(f"serve: cannot listen on {host} port {port}: {exc.strerror or exc}") from None


def serve(config: Config, model: str | None, host: str, port: int, announce: Callable[[str], None]) -> int:
    """Run the scoring server until it exits or cptkit is interrupted; returns its exit code."""
    check_port(host, port)
    model_uri = model_uri_for(config, model)
    env = dict(os.environ)
    tracking_uri = resolve_tracking_uri(config.tracking.tracking_uri, env)
    env["MLFLOW_TRACKING_URI"] = tracking_uri
    env["MLFLOW_REGISTRY_URI"] = resolve_registry_uri(config.register_.registry_uri, env) or tracking_uri
    announce(f"serve: {model_uri} at http://{host}:{port} (Ctrl-C stops it); try:")
    example = json.dumps({"inputs": ["The json module"], "params": {"max_new_tokens": 32}})
    announce(f"  curl -s http://{host}:{port}/invocations -H 'Content-Type: application/json' -d '{example}'")
    # Installed before the server starts, so that no moment leaves it running without us: SIGTERM and a
    # closed terminal (SIGHUP) stop it like Ctrl-C; if cptkit is killed outright, Linux stops it
    # (PR_SET_PDEATHSIG), since its own process group no longer gets the terminal's signals.
    previous = {sig: signal.signal(sig, _raise_interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    process: subprocess.Popen[bytes] | None = None
    try:
        process = subprocess.Popen(
            serve_command(model_uri, host, port, config.serve.max_new_tokens_limit),
            env=env,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
        return process.wait()
    except KeyboardInterrupt:
        return 130
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if process is not None:
            _stop(process)


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Stop the server and every process it started (uvicorn workers)."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(_STOP_SECONDS)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
