"""The typed results keep their files' JSON as it is: a real results.json and training_summary.json read and
written back give the same text, older files without the newer keys still read, and register's manifest
keeps the form it had."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest

from cptkit.errors import StageError
from cptkit.results import Champion, Check, EvaluationResults, GateResult, TrainingSummary


def test_real_results_and_summary_round_trip(
    tmp_path: Path, tiny_model_dir: Path, cli: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from test_evaluate import trained_run

    # A token cap that cuts the sets and a task that cannot run: the optional parts of the file are present.
    cfg = trained_run(tmp_path, tiny_model_dir, max_tokens=150)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    result = cli("evaluate", "-c", str(cfg), "--tasks", "arc_easy")
    assert result.exit_code == 0, result.output

    results_file = Path("outputs/cpt_model/evaluation/results.json")
    summary_file = Path("outputs/cpt_model/training_summary.json")
    for cls, path in ((EvaluationResults, results_file), (TrainingSummary, summary_file)):
        text = path.read_text(encoding="utf-8")
        data = json.loads(text)
        again = cls.from_json(data).to_json()  # type: ignore[attr-defined]
        assert again == data
        assert json.dumps(again, indent=2) + "\n" == text  # the same keys in the same order
        assert cls.read(path) == cls.from_json(data)  # type: ignore[attr-defined]

    results = EvaluationResults.from_json(json.loads(results_file.read_text()))
    assert results.sets["domain"].capped_at_tokens == 150
    assert results.sets["domain"].source["path"] == "data/val.jsonl"
    assert results.tasks.status == "not_run" and results.tasks.reason is not None
    assert results.passed == results.verdict.passed
    summary = TrainingSummary.from_json(json.loads(summary_file.read_text()))
    assert summary.steps == 6 and summary.choices["method"].value == "lora"
    assert results.training is not None and results.training.final_loss == summary.final_loss


def test_older_files_without_the_newer_keys_still_read(tmp_path: Path) -> None:
    results = {
        "base_model": "base",
        "base_model_path": "/models/base",
        "cpt_model": "outputs/cpt_model",
        "method": "lora",
        "base_scored_as": "a separately loaded copy",
        "quantization": "none",
        "settings": {"context_length": 48, "stride": 16, "batch_size": 8, "precision": "fp32"},
        "base": {"domain": _score(400.0)},
        "cpt": {"domain": _score(380.0)},
        "sets": {"domain": {"documents": 5, "skipped": 0, "type": "jsonl", "path": "val.jsonl"}},
        "adaptation": 0.05,
        "verdict": {"passed": True, "checks": [{"name": "adaptation", "value": 0.05, "threshold": 0, "passed": True}]},
    }
    read = EvaluationResults.from_json(results)
    assert read.settings.max_tokens is None and read.settings.device is None
    assert read.sets["domain"].capped_at_tokens is None and read.sets["domain"].source == {
        "type": "jsonl",
        "path": "val.jsonl",
    }
    assert read.tasks.status == "not_requested" and read.generations == [] and read.training is None
    assert read.seconds is None and read.forgetting is None and read.drift == {}

    summary = TrainingSummary.from_json({"steps": 3, "tokens": 96, "losses": [2.0, 1.5, 1.2], "final_loss": 1.2})
    assert summary.choices == {} and summary.peak_memory_bytes is None and summary.derived_steps is None
    assert summary.final_eval == {} and summary.evals == []


def test_a_broken_results_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "results.json"
    assert EvaluationResults.read(path) is None  # none there yet
    path.write_text(json.dumps({"settings": {}}), encoding="utf-8")
    with pytest.raises(StageError, match=r"results.json: not a cptkit evaluation results file \("):
        EvaluationResults.read(path)


def test_register_manifest_keeps_its_result_form() -> None:
    from cptkit.register import RegisterResult

    gate = GateResult(
        passed=False,
        checks=[
            Check(name="adaptation", value=0.01, threshold=0.02, passed=False),
            Check(name="domain vs champion (version 1)", value=3.5, threshold=None, passed=None, note="not compared"),
        ],
        champion=Champion(version="1", domain_bits_per_byte="3.4", same_domain_set=False),
    )
    result = RegisterResult(
        name="m",
        version="2",
        model_uri="models:/m/2",
        registry="sqlite:///mlflow.db",
        merged=False,
        roundtrip_max_diff=1e-6,
        gate=gate,
        promoted=False,
        forced=False,
        run_id="abc",
    )
    # What dataclasses.asdict gave when the gate's checks were dicts: the manifests already written.
    expected = {
        "name": "m",
        "version": "2",
        "model_uri": "models:/m/2",
        "registry": "sqlite:///mlflow.db",
        "merged": False,
        "roundtrip_max_diff": 1e-6,
        "gate": {
            "passed": False,
            "checks": [
                {"name": "adaptation", "value": 0.01, "threshold": 0.02, "passed": False},
                {
                    "name": "domain vs champion (version 1)",
                    "value": 3.5,
                    "threshold": None,
                    "passed": None,
                    "note": "not compared",
                },
            ],
            "champion": {"version": "1", "domain_bits_per_byte": "3.4", "same_domain_set": False},
        },
        "promoted": False,
        "forced": False,
        "run_id": "abc",
        "float_base_gap": None,
        "notes": [],
        "skipped": False,
    }
    assert json.dumps(result.to_json()) == json.dumps(expected)
    assert RegisterResult.from_json(json.loads(json.dumps(expected)), skipped=True) == RegisterResult(
        **{**result.__dict__, "skipped": True}
    )
    assert gate.failures() == ["adaptation 1.0% < minimum 2.0%"]


def _score(perplexity: float) -> dict[str, Any]:
    return {"perplexity": perplexity, "bits_per_byte": 3.6, "tokens": 100, "bytes": 250, "documents": 2, "nll": 599.0}
