"""`cptkit tune` on a tiny model: three pilots of two steps, killed after the first and resumed without
redoing it; the fit, the choice, tuned.yaml, the report, and the pilots as MLflow child runs."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import prepared_run


def tune_config(tmp_path: Path, model_dir: Path) -> Path:
    return prepared_run(
        tmp_path,
        model_dir,
        {
            "method": "lora",
            "max_seq_length": 64,
            "micro_batch_size": 2,
            "warmup_steps": 0,
            "precision": "fp32",
            "eval_max_sequences": 2,
        },
        domain_docs=30,
        general_texts=None,
        evaluate={
            "context_length": 48,
            "stride": 48,
            "max_documents": 3,
            "precision": "fp32",
            "max_forgetting": 0.5,
        },
        tune={
            "points": 3,
            "replay_ratio": [0.0, 0.5],
            "learning_rate": [1e-3, 3e-2],
            "tokens_per_pilot": 256,  # two steps of 2 x 64 tokens
            "eval_max_tokens": 200,
            "full_tokens": 2048,
            "output_dir": "tune",
        },
    )


def test_tune_runs_resumes_after_a_kill_and_writes_the_choice(
    tmp_path: Path, tiny_model_dir: Path, cli: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    import cptkit
    import cptkit.tune as tune_module

    cfg = tune_config(tmp_path, tiny_model_dir)
    # A real `cptkit tune`, SIGKILLed once the first pilot's result is written.
    env = {**os.environ, "PYTHONPATH": str(Path(cptkit.__file__).parents[1])}
    log = (tmp_path / "killed.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "cptkit", "tune", "-c", str(cfg)], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    done = Path("tune/pilots/pilot-00/pilot.json")
    deadline = time.monotonic() + 600
    while not done.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    log.close()
    output = (tmp_path / "killed.log").read_text()
    assert done.is_file(), output
    assert "tune: 3 pilots (space-filling" in output and "estimated" in output
    assert not Path("tune/pilots/pilot-02/pilot.json").exists()
    stamp = done.stat().st_mtime_ns

    real = tune_module.train_pilot
    trained: list[str] = []

    def counted(pc: Any, factory: Any) -> Any:
        trained.append(pc.output_dir.name)
        return real(pc, factory)

    trained.clear()
    monkeypatch.setattr(tune_module, "train_pilot", counted)
    second = cli("tune", "-c", str(cfg))
    assert second.exit_code == 0, second.output
    assert "1 done before, 2 to run" in second.output or "2 done before, 1 to run" in second.output
    assert "pilot-00" not in trained and trained[-1] == "pilot-02"  # pilot-00 was not redone
    # The base's scores of the two sets were computed by the first pilot and read by the others.
    assert len(list(Path(".cache/base_scores").iterdir())) == 2
    assert done.stat().st_mtime_ns == stamp

    fit = json.loads(Path("tune/fit.json").read_text())
    assert len(fit["pilots"]) == 3 and fit["terms"] == 3
    assert all(p["tokens"] == 256 and p["steps"] == 2 for p in fit["pilots"])
    assert len({(p["replay_ratio"], p["learning_rate"]) for p in fit["pilots"]}) == 3
    choice = json.loads(Path("tune/choice.json").read_text())
    chosen = choice["chosen"]
    assert 0.0 <= chosen["replay_ratio"] <= 0.5 and 1e-3 <= chosen["learning_rate"] <= 3e-2 * 1.001
    assert choice["full_tokens"] == 2048 and choice["max_forgetting"] == 0.5
    if choice["within_budget"]:
        assert choice["predicted_forgetting"] <= 0.5

    # tuned.yaml: the user's config plus the choice, with where it came from; a valid config.
    tuned_text = Path("tune/tuned.yaml").read_text()
    assert "learning_rate: " in tuned_text and "# cptkit tune: 3 pilots" in tuned_text
    tuned = yaml.safe_load(tuned_text)
    original = yaml.safe_load(cfg.read_text())
    assert tuned["training"]["learning_rate"] == pytest.approx(chosen["learning_rate"], rel=1e-2)
    assert tuned["data"]["replay_ratio"] == pytest.approx(chosen["replay_ratio"], abs=1e-3)
    assert tuned["source"] == original["source"] and tuned["tune"] == original["tune"]
    from cptkit.config import load_config

    assert load_config(Path("tune/tuned.yaml")).training.learning_rate == tuned["training"]["learning_rate"]

    report = Path("tune/tune_report.html").read_text()
    assert "<svg" in report and "pilot-02" in report and "<script" not in report and "src=" not in report

    # The pilots are child runs of one parent run (the same parent across the kill and the resume).
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{Path('mlflow.db').resolve()}")
    parent_id = json.loads(Path("tune/tune_state.json").read_text())["parent_run_id"]
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["tune/chosen_learning_rate"] == pytest.approx(chosen["learning_rate"])
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    # (The killed pilot's run may stay behind RUNNING where its training had not checkpointed yet.)
    finished = [r for r in children if r.info.status == "FINISHED"]
    assert sorted(r.info.run_name for r in finished) == [f"tune-pilot-0{i}" for i in range(3)]
    assert all("eval/domain/cpt_perplexity" in r.data.metrics for r in finished)
    assert {a.path for a in client.list_artifacts(parent_id, "tune")} >= {"tune/tuned.yaml", "tune/tune_report.html"}

    # Everything done: a third run fits again from the pilots' results, training nothing.
    trained.clear()
    third = cli("tune", "-c", str(cfg))
    assert third.exit_code == 0 and trained == [] and "3 done before, 0 to run" in third.output

    # Data prepared anew: the pilots' results no longer count (they are run again).
    from cptkit.datasets import domain_dir
    from cptkit.tune import _finished, plan_tune

    loaded = load_config(cfg)
    assert all(_finished(loaded, p) is not None for p in plan_tune(loaded).pilots)
    manifest_path = domain_dir(loaded) / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps({**manifest, "created_at": "2030-01-01T00:00:00+00:00"}))
    assert all(_finished(loaded, p) is None for p in plan_tune(loaded).pilots)


def test_a_pilot_evaluates_loss_and_drift_only(tmp_path: Path, tiny_model_dir: Path) -> None:
    from cptkit.config import load_config
    from cptkit.tune import pilot_config, plan_tune

    config = load_config(tune_config(tmp_path, tiny_model_dir))
    assert config.evaluate.domain_tasks.enabled and config.evaluate.chat.enabled
    pc = pilot_config(config, plan_tune(config).pilots[0])
    assert not pc.evaluate.domain_tasks.enabled and not pc.evaluate.chat.enabled
    assert pc.evaluate.generation.max_new_tokens == 0 and pc.evaluate.tasks == []


def test_tune_without_replay_data_says_so(tmp_path: Path, tiny_model_dir: Path, cli: Any) -> None:
    cfg = tune_config(tmp_path, tiny_model_dir)
    data = yaml.safe_load(cfg.read_text())
    data["data"].pop("replay")
    data["data"]["replay_ratio"] = 0
    cfg.write_text(yaml.safe_dump(data))
    result = cli("tune", "-c", str(cfg))
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "error: tune.replay_ratio: [0.0, 0.5] tries replay, but data.replay is not set" in " ".join(
        result.output.split()
    )


def test_diverged_pilots_are_left_out_of_the_fit() -> None:
    from cptkit.errors import CptkitError
    from cptkit.tune import PilotResult, usable_pilots

    def pilot(name: str, gain: float) -> PilotResult:
        adaptation = 1 - math.exp(-gain)
        losses = (6.0, 6.0 - gain, gain, adaptation, 0.01, 0.01, 0.001)
        return PilotResult(name, "f", 0.1, 1e-3, 2, 256, *losses, 100.0, 1.0, None)

    good = [pilot("a", 0.1), pilot("b", 0.2)]
    assert usable_pilots([*good, pilot("c", math.nan)]) == good
    with pytest.raises(CptkitError, match="only 1 of 2 pilots gave finite losses"):
        usable_pilots([good[0], pilot("d", -math.inf)])
