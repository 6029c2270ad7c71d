"""`cptkit tune` on a tiny model: three pilots of one and two steps (two token levels), killed after the
first and resumed without redoing it; the fit, the choice, tuned.yaml, the report, and the pilots as MLflow
child runs. A pilot's chat drift without the adapted model's answers; the outputs from synthetic pilots at
two token levels, and the resume after a level changes."""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import prepared_run
from test_chat_drift import chat_model_dir  # noqa: F401 (a fixture)


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
            "tokens_per_pilot": 256,  # two steps of 2 x 64 tokens; one at the default token level 0.5
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
    from cptkit.config import load_config

    cfg = tune_config(tmp_path, tiny_model_dir)
    plan = tune_module.plan_tune(load_config(cfg))
    names = [p.name for p in plan.pilots]
    # Two token levels: each pilot's name holds its budget.
    assert {(p.steps, p.tokens) for p in plan.pilots} == {(1, 128), (2, 256)}
    assert all(p.name.endswith(f"-{p.tokens}tok") for p in plan.pilots)
    # A real `cptkit tune`, SIGKILLed once the first pilot's result is written.
    env = {**os.environ, "PYTHONPATH": str(Path(cptkit.__file__).parents[1])}
    log = (tmp_path / "killed.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "cptkit", "tune", "-c", str(cfg)], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    done = Path(f"tune/pilots/{names[0]}/pilot.json")
    deadline = time.monotonic() + 600
    while not done.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    log.close()
    output = (tmp_path / "killed.log").read_text()
    assert done.is_file(), output
    assert "tune: 3 pilots (space-filling" in output and "estimated" in output
    by_steps = {steps: sum(1 for p in plan.pilots if p.steps == steps) for steps in (1, 2)}
    assert f"{by_steps[1]} x 1 step (128 tokens) and {by_steps[2]} x 2 steps (256 tokens)" in output
    assert not Path(f"tune/pilots/{names[2]}/pilot.json").exists()
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
    assert names[0] not in trained and trained[-1] == names[2]  # the first pilot was not redone
    # The base's scores of the two sets were computed by the first pilot and read by the others.
    assert len(list(Path(".cache/base_scores").iterdir())) == 2
    assert done.stat().st_mtime_ns == stamp

    fit = json.loads(Path("tune/fit.json").read_text())
    assert len(fit["pilots"]) == 3 and fit["terms"] == ["const", "domain_tokens", "log_lr"]
    assert sorted(p["tokens"] for p in fit["pilots"]) == sorted(p.tokens for p in plan.pilots)
    assert all(p["tokens"] == 128 * p["steps"] == 256 * p["token_level"] for p in fit["pilots"])
    assert fit["chat_drift"] is None  # the tiny model has no chat template: not measured
    assert len({(p["replay_ratio"], p["learning_rate"]) for p in fit["pilots"]}) == 3
    choice = json.loads(Path("tune/choice.json").read_text())
    chosen = choice["chosen"]
    assert 0.0 <= chosen["replay_ratio"] <= 0.5 and 1e-3 <= chosen["learning_rate"] <= 3e-2 * 1.001
    assert choice["full_tokens"] == 2048 and choice["max_forgetting"] == 0.5
    assert choice["tie_break"] == "drift_kl" and "leave-one-out" in choice["rule"]
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
    assert "<svg" in report and names[2] in report and "<script" not in report and "src=" not in report

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
    assert sorted(r.info.run_name for r in finished) == [f"tune-{name}" for name in names]
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


def test_a_pilot_evaluates_loss_drift_and_chat_drift_only(tmp_path: Path, tiny_model_dir: Path) -> None:
    from cptkit.config import load_config
    from cptkit.tune import pilot_config, plan_tune

    config = load_config(tune_config(tmp_path, tiny_model_dir))
    assert config.evaluate.domain_tasks.enabled and config.evaluate.chat.enabled
    assert config.evaluate.chat.side_by_side > 0
    for pilot in plan_tune(config).pilots:
        pc = pilot_config(config, pilot)
        assert not pc.evaluate.domain_tasks.enabled
        assert pc.evaluate.generation.max_new_tokens == 0 and pc.evaluate.tasks == []
        # Chat drift on the base's answers, without the adapted model's own answers.
        assert pc.evaluate.chat.enabled and pc.evaluate.chat.side_by_side == 0
        assert pc.training.max_steps == pilot.steps == round(pilot.level * 2)
        assert pc.output_dir.name == pilot.name
    chat_off = config.evaluate.chat.model_copy(update={"enabled": False})
    off = config.model_copy(update={"evaluate": config.evaluate.model_copy(update={"chat": chat_off})})
    assert not pilot_config(off, plan_tune(off).pilots[0]).evaluate.chat.enabled


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
        return PilotResult(name, "f", 0.1, 1e-3, 1.0, 2, 256, *losses, None, None, 100.0, 1.0, None)

    good = [pilot("a", 0.1), pilot("b", 0.2)]
    assert usable_pilots([*good, pilot("c", math.nan)]) == good
    with pytest.raises(CptkitError, match="only 1 of 2 pilots gave finite losses"):
        usable_pilots([good[0], pilot("d", -math.inf)])


def test_a_pilot_measures_chat_drift_without_generating_its_own_answers(
    tmp_path: Path,
    chat_model_dir: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On a base with a chat template, a pilot's result holds the chat drift of its adapter on the base's
    answers; the only answers generated are the base's (once, then cached), none by the adapted model."""
    import cptkit.tune as tune_module
    from cptkit import chat_drift
    from cptkit.config import load_config
    from cptkit.tracking import NullTracker

    cfg = tune_config(tmp_path, chat_model_dir)
    data = yaml.safe_load(cfg.read_text())
    data["evaluate"]["chat"] = {"max_instructions": 3, "max_new_tokens": 8}
    cfg.write_text(yaml.safe_dump(data))
    config = load_config(cfg)
    real_answers, real_evaluate = chat_drift._answers, tune_module.evaluate_pilot
    generated: list[int] = []
    evaluated: list[Any] = []

    def counted_answers(runner: Any, tokenizer: Any, prompts: Any, *args: Any) -> Any:
        generated.append(len(prompts))
        return real_answers(runner, tokenizer, prompts, *args)

    def kept_evaluate(pc: Any, factory: Any) -> Any:
        evaluated.append(real_evaluate(pc, factory))
        return evaluated[-1]

    monkeypatch.setattr(chat_drift, "_answers", counted_answers)
    monkeypatch.setattr(tune_module, "evaluate_pilot", kept_evaluate)
    pilot = max(tune_module.plan_tune(config).pilots, key=lambda p: p.learning_rate)
    result = tune_module.run_pilot(config, pilot, lambda *args: NullTracker())
    assert generated == [3]  # the base's three answers; the adapted model answered nothing
    chat = evaluated[0].chat
    assert chat.status == "ok" and all(a.cpt is None for a in chat.answers)
    assert result.chat_drift == chat.drift and result.chat_kl == chat.kl and result.chat_kl > 0
    assert result.observation().chat_drift == result.chat_drift


def synthetic_pilot(config: Any, pilot: Any, factory: Any) -> Any:
    """A pilot's result from known laws (no training): the gain nearly flat in the learning rate (and
    noisy), the chat drift steep in it, both growing with the tokens; written where run_pilot writes it."""
    from dataclasses import asdict

    from cptkit.artifacts import write_json_atomic
    from cptkit.tune import PILOT_RESULT, PilotResult, _pilot_fingerprint, pilot_config

    pc = pilot_config(config, pilot)
    u = math.log(pilot.learning_rate / 1e-3)
    kept = (1 - pilot.replay_ratio) * pilot.tokens / 1000
    # With 2% of (deterministic) noise: the domain law's leave-one-out error is the choice's tolerance.
    gain = 0.2 * kept**0.3 * math.exp(0.02 * u) * (1 + 0.02 * math.sin(7 * pilot.index))
    chat = 0.05 * kept**0.5 * math.exp(0.8 * u) * (1 - pilot.replay_ratio) ** 0.5
    forgetting = 0.01 * kept**0.4 * math.exp(0.3 * u)
    result = PilotResult(
        pilot.name, _pilot_fingerprint(pc), pilot.replay_ratio, pilot.learning_rate, pilot.level, pilot.steps,
        pilot.tokens, 3.0, 3.0 - gain, gain, 1 - math.exp(-gain), forgetting, math.expm1(forgetting),
        0.5 * chat, chat, 0.8 * chat, 1000.0, 1.0, None,
    )  # fmt: skip
    write_json_atomic(pc.output_dir / PILOT_RESULT, asdict(result))
    return result


def test_tune_of_pilots_at_two_token_levels_fits_chat_drift_and_says_its_rule(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """tune() end to end on pilots whose results follow known laws: 8 pilots at two token counts, the chat
    drift law and its bound, the rule and its numbers in choice.json and the report; a rerun runs nothing,
    and a changed token level reruns only the pilots of that level."""
    import cptkit.tune as tune_module
    from cptkit.config import Config
    from cptkit.tracking import NullTracker

    data: dict[str, Any] = {
        "model": {"name": "tiny"},
        "training": {"max_seq_length": 64, "micro_batch_size": 2, "gradient_accumulation_steps": 4},
        "data": {"replay": {"type": "jsonl", "path": "general.jsonl"}},
        "evaluate": {"max_forgetting": None, "max_chat_drift": 0.2},
        "tune": {
            "points": 8,
            "replay_ratio": [0.0, 0.5],
            "learning_rate": [1e-4, 1e-2],
            "tokens_per_pilot": 4096,
            "full_tokens": 16384,
            "output_dir": "tune",
        },
    }
    ran: list[str] = []

    def run(config: Any, pilot: Any, factory: Any) -> Any:
        ran.append(pilot.name)
        return synthetic_pilot(config, pilot, factory)

    monkeypatch.setattr(tune_module, "run_pilot", run)
    result = tune_module.tune(Config.model_validate(data), data, lambda *args: NullTracker(), estimate=False)
    assert len(ran) == 8 and result.ran == 8
    assert sorted(p.tokens for p in result.pilots) == [2048] * 4 + [4096] * 4
    assert result.fit.terms == ("const", "domain_tokens", "log_lr", "replay", "log_lr_squared")
    assert result.fit.chat_drift is not None and result.fit.loo_rmse["chat_drift"] is not None

    choice = json.loads(Path("tune/choice.json").read_text())
    chosen = choice["chosen"]
    assert choice["max_chat_drift"] == 0.2 and choice["within_budget"] and chosen["chat_drift"] <= 0.2
    assert choice["tie_break"] == "chat_drift" and choice["tolerance"] == result.fit.loo_rmse["domain"]
    assert (
        choice["predicted_domain_gain"]
        == chosen["domain_gain"]
        >= choice["max_predicted_domain_gain"] - choice["tolerance"]
    )
    # The noise makes gains within the tolerance ties: the least chat drift among them, below the best's.
    assert choice["tolerance"] > 0 and choice["predicted_drift"] == chosen["chat_drift"]
    assert chosen["chat_drift"] < choice["best_gain_point"]["chat_drift"]
    assert "the lowest predicted chat drift" in choice["rule"] and choice["not_applied"] == []
    report = Path("tune/tune_report.html").read_text()
    assert html.escape(choice["rule"]) in report and "chat drift at most 0.2" in report
    assert f"{choice['max_predicted_domain_gain']:.4f}" in report and f"{choice['tolerance']:.4f}" in report

    # Everything done: nothing runs again.
    ran.clear()
    again = tune_module.tune(Config.model_validate(data), data, lambda *args: NullTracker(), estimate=False)
    assert ran == [] and again.ran == 0

    # A wider equal gain and another chat drift limit rechoose from the same pilots: nothing reruns, the
    # ties widen to that share of the largest gain, and the least chat drift among them is lower still.
    wider = data | {
        "evaluate": {"max_forgetting": None, "max_chat_drift": 0.3},
        "tune": data["tune"] | {"equal_gain": 0.2},
    }
    ran.clear()
    rechosen = tune_module.tune(Config.model_validate(wider), wider, lambda *args: NullTracker(), estimate=False)
    assert ran == [] and rechosen.ran == 0
    assert rechosen.choice.tolerance == pytest.approx(0.2 * rechosen.choice.best.domain_gain)
    assert rechosen.choice.tolerance > choice["tolerance"] and "tune.equal_gain: 20%" in rechosen.choice.rule
    assert rechosen.choice.chosen.chat_drift is not None and rechosen.choice.chosen.chat_drift < chosen["chat_drift"]
    assert rechosen.choice.chosen.domain_gain >= 0.8 * rechosen.choice.best.domain_gain - 1e-12

    # The shorter level changed: its pilots are new ones (their names hold the budget); the others stay.
    data["tune"]["token_levels"] = [0.25, 1.0]
    ran.clear()
    changed = tune_module.tune(Config.model_validate(data), data, lambda *args: NullTracker(), estimate=False)
    assert sorted(p.tokens for p in changed.pilots) == [1024] * 4 + [4096] * 4
    assert len(ran) == 4 and all(name.endswith("-1024tok") for name in ran)
    # tuned.yaml reads back as the config it was written from (a `token_...` key is no secret to mask).
    from cptkit.config import load_config

    assert load_config(Path("tune/tuned.yaml")).tune.token_levels == [0.25, 1.0]


def test_token_levels_are_validated() -> None:
    from pydantic import ValidationError

    from cptkit.config import TuneConfig

    assert TuneConfig().token_levels == [0.5, 1.0]
    assert TuneConfig(token_levels=[1.0]).token_levels == [1.0]
    for bad in ([0.0, 1.0], [0.5, 1.5], [1.0, 0.5], [0.5, 0.5], []):
        with pytest.raises(ValidationError, match="token_levels"):
            TuneConfig(token_levels=bad)
    with pytest.raises(ValidationError, match="at least as many points"):
        TuneConfig(points=2, token_levels=[0.25, 0.5, 1.0])
