"""register, export and serve on a tiny trained model, with a real MLflow store on SQLite."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from conftest import SMALL_EVALUATION, make_doc, prepared_run, write_jsonl

NAME = "tiny-cpt"


def evaluated_run(tmp_path: Path, model_dir: Path, training: dict[str, Any] | None = None, **register: Any) -> Path:
    """A tiny corpus, a LoRA run trained on it and evaluated, and a config that registers it as NAME.
    The gate's thresholds are loose (the tiny run's numbers are not what these tests are about);
    tests tighten them with --set."""
    from cptkit.config import load_config
    from cptkit.evaluate import evaluate
    from cptkit.train import train

    write_jsonl(tmp_path / "news.jsonl", [{"text": make_doc(2000 + i)} for i in range(3)])
    cfg_path = prepared_run(
        tmp_path,
        model_dir,
        {
            "method": "lora",
            "learning_rate": 2e-3,
            "max_steps": 4,
            "max_seq_length": 64,
            "micro_batch_size": 4,
            "eval_steps": 4,
            "warmup_steps": 1,
            "precision": "fp32",
            "eval_max_sequences": 2,
            **(training or {}),
        },
        domain_docs=40,
        general_texts=[make_doc(1000 + i) for i in range(20)],
        evaluate=SMALL_EVALUATION,
        register={"max_new_tokens": 4, **register},
        # Absolute: MLflow caches stores by URI, and a relative one would reach another test's database.
        tracking={"tracking_uri": store_uri(tmp_path), "log_system_metrics": False, "registered_model_name": NAME},
    )
    config = load_config(cfg_path)
    train(config)
    evaluate(config)
    return cfg_path


def store_uri(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def client() -> Any:
    from mlflow import MlflowClient

    uri = store_uri(Path.cwd())
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def logits(model: Any, ids: list[int]) -> Any:
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float()


def test_register_logs_registers_and_round_trips_an_adapter(tmp_path: Path, tiny_model_dir: Path, cli: Any) -> None:
    import mlflow
    import torch

    from cptkit.config import load_config
    from cptkit.models import load_trained

    cfg = evaluated_run(tmp_path, tiny_model_dir)
    result = cli("register", "--config", str(cfg))
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert f"models:/{NAME}/1 (adapter + base reference)" in text and "alias champion -> version 1" in text

    c = client()
    assert c.get_model_version_by_alias(NAME, "challenger").version == 1
    assert c.get_model_version_by_alias(NAME, "champion").version == 1
    version = c.get_model_version(NAME, "1")
    assert version.tags["cptkit.status"] == "ok"
    assert float(version.tags["cptkit.roundtrip_max_abs_logit_diff"]) <= 1e-4
    assert version.tags["cptkit.gate"] == "passed"
    # Again, unchanged: nothing is registered twice.
    again = cli("register", "--config", str(cfg))
    assert again.exit_code == 0 and "up to date, skipped" in again.output
    assert len(c.search_model_versions(f"name='{NAME}'")) == 1
    summary = json.loads((tmp_path / "outputs/cpt_model/training_summary.json").read_text())
    assert version.run_id == summary["mlflow_run_id"]  # logged to the training's own run

    # What anyone gets from the registry is the trained model: same logits as cptkit's own loader.
    mlflow.set_tracking_uri(store_uri(tmp_path))
    try:
        loaded = mlflow.transformers.load_model(f"models:/{NAME}@champion", return_type="components")
        local = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}/1"))
    finally:
        mlflow.set_tracking_uri(None)  # type: ignore[arg-type]
    config = load_config(cfg)
    trained = load_trained(tiny_model_dir, config.output_dir, config.training, "cpu")
    ids = loaded["tokenizer"](make_doc(7))["input_ids"][:40]
    assert torch.equal(logits(loaded["model"], ids), logits(trained, ids))

    # The artifact: the adapter only, requirements pinned to what trained it, metadata about the run.
    assert (local / "peft" / "adapter_model.safetensors").is_file() and not (local / "model").exists()
    requirements = (local / "requirements.txt").read_text()
    assert "peft==" in requirements and "transformers==" in requirements and "torchvision" not in requirements
    mlmodel = (local / "MLmodel").read_text()
    assert "base_model:" in mlmodel and "adaptation" in mlmodel and "mlflow_run_id" in mlmodel


def test_a_corrupted_artifact_fails_the_round_trip_and_is_marked_broken(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.entities import LoggedModelStatus
    from safetensors.torch import load_file, save_file

    from cptkit.config import load_config
    from cptkit.errors import CptkitError
    from cptkit.register import register
    from cptkit.registry import Registry

    cfg = evaluated_run(tmp_path, tiny_model_dir)
    original = Registry.log_transformers_model

    def log_then_corrupt(self: Registry, *args: Any, **kwargs: Any) -> Any:
        logged = original(self, *args, **kwargs)
        location = self.client.get_logged_model(logged.model_id).artifact_location
        weights = Path(location.removeprefix("file://")) / "peft" / "adapter_model.safetensors"
        tensors = load_file(str(weights))
        key = next(k for k in tensors if "lora_B" in k)
        tensors[key] = tensors[key] + 0.01  # a small change, as a bad copy or a wrong file would make
        save_file(tensors, str(weights))
        return logged

    monkeypatch.setattr(Registry, "log_transformers_model", log_then_corrupt)
    with pytest.raises(CptkitError, match=rf"{NAME} version 1 is broken: loaded back from the registry, max"):
        register(load_config(cfg))
    c = client()
    version = c.get_model_version(NAME, "1")
    assert version.tags["cptkit.status"] == "broken"
    assert c.get_registered_model(NAME).aliases == {}  # neither challenger nor champion
    # The model the failed attempt logged to the training run is marked FAILED, not left READY.
    run = c.get_run(version.run_id)
    logged = c.search_logged_models([run.info.experiment_id], filter_string=f"source_run_id = '{version.run_id}'")
    assert [m.status for m in logged] == [LoggedModelStatus.FAILED]
    assert logged[0].model_id in version.source  # the broken version points to it


def test_the_gate_refuses_a_model_over_the_forgetting_budget_and_accepts_one_within(
    tmp_path: Path, tiny_model_dir: Path, cli: Any
) -> None:
    cfg = evaluated_run(tmp_path, tiny_model_dir)
    results = json.loads((tmp_path / "outputs/cpt_model/evaluation/results.json").read_text())
    forgetting = results["forgetting_by_set"]["general"]

    over = cli("register", "--config", str(cfg), "--set", f"evaluate.max_forgetting={forgetting - 0.01}")
    assert over.exit_code == 1, over.output
    text = " ".join(over.output.split())
    assert "not promoted: forgetting (general)" in text and "version 1 stays challenger" in text
    assert "Traceback" not in over.output
    c = client()
    assert c.get_model_version_by_alias(NAME, "challenger").version == 1
    assert "champion" not in c.get_registered_model(NAME).aliases
    assert c.get_model_version(NAME, "1").tags["cptkit.gate"].startswith("failed: forgetting (general)")

    within = cli("register", "--config", str(cfg), "--set", f"evaluate.max_forgetting={forgetting + 0.01}")
    assert within.exit_code == 0, within.output
    assert c.get_model_version_by_alias(NAME, "champion").version == 2

    # --force promotes a failing version, and says so on the version.
    forced = cli("register", "--config", str(cfg), "--force", "--set", f"evaluate.max_forgetting={forgetting - 0.01}")
    assert forced.exit_code == 0, forced.output
    assert c.get_model_version_by_alias(NAME, "champion").version == 3
    assert c.get_model_version(NAME, "3").tags["cptkit.forced"].startswith("true")


def test_force_promotes_the_refused_version_instead_of_registering_it_again(
    tmp_path: Path, tiny_model_dir: Path, cli: Any
) -> None:
    cfg = evaluated_run(tmp_path, tiny_model_dir)
    results = json.loads((tmp_path / "outputs/cpt_model/evaluation/results.json").read_text())
    strict = f"evaluate.max_forgetting={results['forgetting_by_set']['general'] - 0.01}"
    assert cli("register", "--config", str(cfg), "--set", strict).exit_code == 1
    # Unchanged and still refused: a rerun says so and fails again (a CI step must not turn green).
    again = cli("register", "--config", str(cfg), "--set", strict)
    assert again.exit_code == 1 and "up to date, skipped" in again.output
    forced = cli("register", "--config", str(cfg), "--set", strict, "--force")
    assert forced.exit_code == 0, forced.output
    c = client()
    assert len(c.search_model_versions(f"name='{NAME}'")) == 1
    assert c.get_model_version_by_alias(NAME, "champion").version == 1
    assert c.get_model_version(NAME, "1").tags["cptkit.forced"].startswith("true")


def test_differences_with_nan_or_infinity_never_pass() -> None:
    import torch

    from cptkit.roundtrip import max_abs_difference

    a = torch.zeros(3)
    assert max_abs_difference(a, torch.tensor([0.0, 1e-6, 0.0])) == pytest.approx(1e-6)
    assert max_abs_difference(a, torch.tensor([0.0, float("nan"), 0.0])) == float("inf")
    assert max_abs_difference(torch.tensor([float("inf")]), torch.tensor([float("inf")])) == float("inf")


def test_export_never_replaces_a_folder_it_did_not_write(tmp_path: Path, tiny_model_dir: Path, cli: Any) -> None:
    cfg = evaluated_run(tmp_path, tiny_model_dir)
    mine = tmp_path / "my_models"
    mine.mkdir()
    (mine / "keep.txt").write_text("precious")
    result = cli("export", "--config", str(cfg), "--output", str(mine))
    assert result.exit_code == 1 and "was not written by cptkit export" in " ".join(result.output.split())
    assert (mine / "keep.txt").read_text() == "precious"
    # Its own earlier export is replaced.
    assert cli("export", "--config", str(cfg), "--output", str(tmp_path / "out")).exit_code == 0
    assert cli("export", "--config", str(cfg), "--output", str(tmp_path / "out")).exit_code == 0


def test_a_new_version_must_not_be_worse_than_the_champion_on_the_domain(
    tmp_path: Path, tiny_model_dir: Path, cli: Any
) -> None:
    cfg = evaluated_run(tmp_path, tiny_model_dir)
    assert cli("register", "--config", str(cfg)).exit_code == 0
    c = client()
    # The same model again (registered anew: another register setting) is no worse than itself: promoted.
    assert cli("register", "--config", str(cfg), "--set", "register.max_new_tokens=5").exit_code == 0
    assert c.get_model_version_by_alias(NAME, "champion").version == 2
    # A champion that scored better on the same domain text keeps its place.
    better = float(c.get_model_version(NAME, "2").tags["cptkit.eval.domain_bits_per_byte"]) - 0.01
    c.set_model_version_tag(NAME, "2", "cptkit.eval.domain_bits_per_byte", repr(better))
    worse = cli("register", "--config", str(cfg), "--set", "register.max_new_tokens=6")
    assert worse.exit_code == 1
    assert "domain bits/byte vs champion (version 2)" in " ".join(worse.output.split())
    assert c.get_model_version_by_alias(NAME, "champion").version == 2
    assert c.get_model_version_by_alias(NAME, "challenger").version == 3


def test_register_needs_an_evaluation_of_the_trained_model(tmp_path: Path, tiny_model_dir: Path, cli: Any) -> None:
    cfg = evaluated_run(tmp_path, tiny_model_dir)
    evaluation = tmp_path / "outputs/cpt_model/evaluation/manifest.json"
    evaluation.unlink()
    result = cli("register", "--config", str(cfg))
    assert result.exit_code == 1 and "run cptkit evaluate first" in " ".join(result.output.split())


def one_line(result: Any) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and "internal error" not in result.output, result.output
    assert result.output.count("error:") == 1, result.output
    return " ".join(result.output.split())


def test_missing_or_damaged_adapter_files_are_named(tmp_path: Path, tiny_model_dir: Path, cli: Any) -> None:
    """evaluate, register and export say which file of the trained adapter is missing or damaged."""
    import shutil

    cfg = evaluated_run(tmp_path, tiny_model_dir)
    out = Path("outputs/cpt_model")
    weights, adapter_config = out / "adapter_model.safetensors", out / "adapter_config.json"
    good_weights, good_config = weights.read_bytes(), adapter_config.read_bytes()
    shutil.copytree(out / "evaluation", "evaluation-backup")
    # evaluate last: a rerun starts by removing the evaluation that register needs (restored after it).
    commands = [["register"], ["export", "--format", "hf"], ["evaluate", "--force"]]

    def each_command(expected: str) -> None:
        for command in commands:
            line = one_line(cli(*command, "--config", str(cfg)))
            assert line.startswith(f"error: {expected}"), (command, line)
        shutil.rmtree(out / "evaluation")
        shutil.copytree("evaluation-backup", out / "evaluation")

    weights.unlink()
    each_command(f"{weights}: adapter weights missing")
    weights.write_bytes(good_weights[: len(good_weights) // 2])  # a copy cut short
    each_command(f"{weights}: not a valid safetensors file (")
    weights.write_bytes(os.urandom(4096))
    each_command(f"{weights}: not a valid safetensors file (")
    weights.write_bytes(good_weights)
    adapter_config.write_text('{"peft_type": "LORA", ', encoding="utf-8")
    each_command(f"{adapter_config}: not valid JSON (")
    adapter_config.write_bytes(good_config)
    assert cli("export", "--config", str(cfg), "--format", "hf").exit_code == 0


def test_missing_or_damaged_full_model_weights_are_named(tmp_path: Path, tiny_model_dir: Path, cli: Any) -> None:
    import shutil

    write_jsonl(tmp_path / "d.jsonl", [{"text": make_doc(1)}])
    full = tmp_path / "full"
    shutil.copytree(tiny_model_dir, full)
    weights = full / "model.safetensors"
    good = weights.read_bytes()
    command = ["evaluate", "--base-model", str(tiny_model_dir), "--cpt-model", str(full), "--domain-data", "d.jsonl"]

    weights.unlink()
    assert one_line(cli(*command)).startswith(f"error: {full}: model weights missing (no *.safetensors file")
    weights.write_bytes(good[:1000])
    assert one_line(cli(*command)).startswith(f"error: {weights}: not a valid safetensors file (")
    weights.write_bytes(good)
    (full / "config.json").write_text("{", encoding="utf-8")
    assert one_line(cli(*command)).startswith(f"error: {full / 'config.json'}: not valid JSON (")


def test_merged_registration_holds_full_weights_and_trained_embeddings(tmp_path: Path, tiny_model_dir: Path) -> None:
    from cptkit.config import load_config
    from cptkit.register import register

    cfg = evaluated_run(tmp_path, tiny_model_dir, training={"embeddings": "train"})
    result = register(load_config(cfg))
    assert result.merged  # trained embeddings are not in a peft adapter: merged automatically
    assert result.roundtrip_max_diff <= 1e-4
    import mlflow

    mlflow.set_tracking_uri(store_uri(tmp_path))
    try:
        local = Path(mlflow.artifacts.download_artifacts(result.model_uri))
    finally:
        mlflow.set_tracking_uri(None)  # type: ignore[arg-type]
    assert (local / "model").is_dir() and not (local / "peft").exists()
    assert "peft" not in (local / "requirements.txt").read_text()


def test_qlora_registers_the_dequantized_base_it_was_trained_on(tmp_path: Path, tiny_model_dir: Path) -> None:
    from cptkit.config import load_config
    from cptkit.register import register

    cfg = evaluated_run(tmp_path, tiny_model_dir, training={"method": "qlora"})
    result = register(load_config(cfg))
    # The registry copy reproduces the 4-bit model that was trained and evaluated, without bitsandbytes.
    assert not result.merged and result.roundtrip_max_diff <= 1e-4
    assert result.float_base_gap is not None and result.float_base_gap["max_abs_logit_diff"] > 0
    tags = client().get_model_version(NAME, result.version).tags
    assert "cptkit.qlora.on_float_base.top1_agreement" in tags


def test_unity_catalog_needs_a_three_part_name(tmp_path: Path, tiny_model_dir: Path, cli: Any) -> None:
    cfg = evaluated_run(tmp_path, tiny_model_dir, registry_uri="databricks-uc")
    result = cli("register", "--config", str(cfg))
    assert result.exit_code == 1
    assert "must be catalog.schema.model for Unity Catalog" in " ".join(result.output.split())


def test_unity_catalog_registration_reaches_the_client_with_merged_weights(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    """Unity Catalog is not reachable here: check everything up to the registry client's call."""
    from cptkit.config import load_config
    from cptkit.register import register
    from cptkit.registry import Registry

    cfg = evaluated_run(tmp_path, tiny_model_dir, registry_uri="databricks-uc")
    calls: list[tuple[str, dict[str, Any]]] = []

    class Stop(Exception):
        pass

    def factory(tracking: Any, rc: Any) -> Registry:
        registry = Registry.open(tracking, rc, env={})
        assert registry.registry_uri == "databricks-uc"
        real = registry.client

        class Recorder:
            def __getattr__(self, name: str) -> Any:
                if name in (
                    "get_model_version_by_alias",
                    "get_registered_model",
                    "create_registered_model",
                    "create_model_version",
                ):

                    def record(*args: Any, **kwargs: Any) -> Any:
                        from mlflow.exceptions import MlflowException
                        from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST

                        calls.append((name, kwargs or {"args": args}))
                        if name == "get_model_version_by_alias":  # no champion yet
                            raise MlflowException("no such alias", error_code=RESOURCE_DOES_NOT_EXIST)
                        if name == "create_model_version":
                            raise Stop
                        return None

                    return record
                return getattr(real, name)

        registry.client = Recorder()  # type: ignore[assignment]
        return registry

    config = load_config(cfg, ["tracking.registered_model_name=main.ml.tiny_cpt"])
    with pytest.raises(Stop):
        register(config, registry_factory=factory)
    name, kwargs = calls[-1]
    assert name == "create_model_version" and kwargs["name"] == "main.ml.tiny_cpt"
    assert kwargs["source"].startswith("models:/m-")


def test_export_hf_reloads_with_identical_logits(tmp_path: Path, tiny_model_dir: Path, cli: Any) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cptkit.config import load_config
    from cptkit.models import load_trained

    cfg = evaluated_run(tmp_path, tiny_model_dir)
    result = cli("export", "--config", str(cfg), "--format", "hf", "--set", "register.export_dtype=float32")
    assert result.exit_code == 0, result.output
    out = tmp_path / "outputs/cpt_model/export/hf"
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert not (out / "adapter_config.json").exists()  # a plain model: transformers and vLLM load it as-is
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    config = load_config(cfg)
    trained = load_trained(tiny_model_dir, config.output_dir, config.training, "cpu")
    ids = AutoTokenizer.from_pretrained(out)(make_doc(3))["input_ids"][:40]
    assert torch.allclose(logits(exported, ids), logits(trained, ids), atol=1e-5, rtol=0)


def test_export_gguf_loads_back_through_transformers(tmp_path: Path, tiny_model_dir: Path, cli: Any) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from cptkit.config import load_config
    from cptkit.models import load_trained

    cfg = evaluated_run(tmp_path, tiny_model_dir)
    result = cli("export", "--config", str(cfg), "--format", "gguf", "--set", "register.export_dtype=float32")
    assert result.exit_code == 0, result.output
    gguf_file = tmp_path / "outputs/cpt_model/export/gguf/model.gguf"
    reloaded = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    config = load_config(cfg)
    trained = load_trained(tiny_model_dir, config.output_dir, config.training, "cpu")
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(tiny_model_dir)(make_doc(5))["input_ids"][:40]
    assert torch.allclose(logits(reloaded, ids), logits(trained, ids), atol=1e-4, rtol=0)


def test_export_gguf_says_plainly_when_the_architecture_is_not_supported(
    tmp_path: Path, tiny_tokenizer_dir: Path, cli: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    from transformers import GPT2Config, GPT2LMHeadModel

    model_dir = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=400, n_embd=32, n_layer=1, n_head=2, n_positions=128)).save_pretrained(
        model_dir
    )
    for item in tiny_tokenizer_dir.iterdir():
        shutil.copy(item, model_dir / item.name)
    (tmp_path / "run").mkdir()
    monkeypatch.chdir(tmp_path / "run")
    cfg = evaluated_run(tmp_path / "run", model_dir)
    result = cli("export", "--config", str(cfg), "--format", "gguf")
    assert result.exit_code == 1
    text = " ".join(result.output.split())
    assert "GPT2LMHeadModel is not supported by cptkit's GGUF writer" in text and "Traceback" not in result.output


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def post(port: int, payload: dict[str, Any]) -> tuple[int, str]:
    """The status and body of one request to /invocations."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/invocations",
        data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def serve_and_ask(args: list[str], requests: list[dict[str, Any]]) -> list[tuple[int, str]]:
    """Start `cptkit serve ARGS` on a free port, send `requests` to /invocations, stop the server, check
    that nothing listens on the port afterwards, and return each request's status and body."""
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "cptkit", "serve", *args, "--port", str(port)]
    server = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, server.stdout.read().decode() if server.stdout else ""
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the server did not come up in 180 s"
            time.sleep(1)
        answers = [post(port, payload) for payload in requests]
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
    # Stopped with everything it started: nothing listens on the port any more.
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
        pass
    return answers


def completion(prompt: str, max_new_tokens: Any) -> dict[str, Any]:
    return {"inputs": [prompt], "params": {"max_new_tokens": max_new_tokens}}


def test_serve_answers_a_request_on_loopback_and_stops(tmp_path: Path, tiny_model_dir: Path, cli: Any) -> None:
    from cptkit.config import load_config
    from cptkit.register import register

    cfg = evaluated_run(tmp_path, tiny_model_dir)
    register(load_config(cfg))
    prompt = "Document number 3 describes"
    # models:/NAME@champion, with a lower limit on max_new_tokens than the default.
    answers = serve_and_ask(
        ["--config", str(cfg), "--set", "serve.max_new_tokens_limit=8"],
        [
            completion(prompt, 3),
            completion(prompt, 9),
            completion(prompt, 100000000),
            completion(prompt, "many"),
            completion(prompt, -1),
            {"inputs": [prompt], "params": ["max_new_tokens", 3]},
        ],
    )
    status, body = answers[0]
    predictions = json.loads(body)["predictions"]
    assert status == 200 and len(predictions) == 1 and str(predictions[0]).startswith(prompt)
    # Parameters the model cannot use: HTTP 400 and one line naming the parameter, never a stack trace.
    messages = []
    for status, body in answers[1:]:
        assert status == 400, body
        assert "Traceback" not in body and "stack_trace" not in body, body
        message = json.loads(body)["message"]
        assert "\n" not in message
        messages.append(message)
    assert messages == [
        "params.max_new_tokens: 9 is over this server's limit of 8 (serve.max_new_tokens_limit)",
        "params.max_new_tokens: 100000000 is over this server's limit of 8 (serve.max_new_tokens_limit)",
        "params.max_new_tokens: 'many' is not a whole number",
        "params.max_new_tokens: -1 must be at least 1",
        "params must be a JSON object, got ['max_new_tokens', 3]",
    ]

    # An export folder is served too, and honours max_new_tokens (its signature declares the parameter).
    assert cli("export", "--config", str(cfg), "--format", "hf").exit_code == 0
    answers = serve_and_ask(
        ["--config", str(cfg), "--model", "outputs/cpt_model/export/hf"],
        [completion(prompt, 2), completion(prompt, 100000000)],
    )
    from transformers import AutoTokenizer

    status, body = answers[0]
    (text,) = json.loads(body)["predictions"]
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "outputs/cpt_model/export/hf"))
    # At most 2 new tokens: no more new characters than the 2 longest pieces of the vocabulary decode to
    # (re-encoding the text is no measure: a token cut inside a UTF-8 character decodes to U+FFFD).
    longest_piece = max(len(tokenizer.decode([i])) for i in range(len(tokenizer)))
    assert status == 200 and text.startswith(prompt)
    assert len(text) - len(prompt) <= 2 * longest_piece
    assert answers[1][0] == 400 and "limit of 2048" in answers[1][1]
    assert (tmp_path / "outputs/cpt_model/export/hf.mlflow/MLmodel").is_file()


def test_serve_says_at_once_when_the_port_is_in_use(corpus_config: Path, cli: Any) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        started = time.monotonic()
        result = cli("serve", "--config", str(corpus_config), "--port", str(port))
        seconds = time.monotonic() - started
    assert result.exit_code == 1
    assert " ".join(result.output.split()) == (
        f"error: serve: port {port} on 127.0.0.1 is in use (choose another with --port)"
    )
    assert seconds < 2


def test_serve_says_in_one_line_when_the_model_does_not_load(tmp_path: Path, corpus_config: Path) -> None:
    """The server process exits 1 with one line; cptkit passes that exit on, not as an internal error."""
    command = [sys.executable, "-m", "cptkit", "serve", "--config", str(corpus_config)]
    command += ["--model", "models:/nothing@champion", "--port", str(free_port())]
    env = {**os.environ, "MLFLOW_TRACKING_URI": store_uri(tmp_path)}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr and "internal error" not in done.stderr, done.stderr
    errors = [line for line in done.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("error: serve: MLflow tracking at sqlite:"), done.stderr
    assert "cannot load models:/nothing@champion" in errors[0]


def test_an_adapter_is_merged_where_a_local_base_reference_would_not_load(tmp_path: Path) -> None:
    from cptkit.config import RegisterConfig, TrainingConfig
    from cptkit.register import decide_merge

    lora, unset = TrainingConfig(method="lora"), RegisterConfig()
    assert not decide_merge(unset, lora, tmp_path, f"sqlite:///{tmp_path}/mlflow.db")
    assert decide_merge(unset, lora, tmp_path, "http://mlflow.internal:5000")
    assert decide_merge(unset, lora, tmp_path, "databricks-uc")
    assert not decide_merge(RegisterConfig(merge=False), lora, tmp_path, "http://mlflow.internal:5000")
    assert not decide_merge(unset, TrainingConfig(method="full"), tmp_path, "databricks-uc")
