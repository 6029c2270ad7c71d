"""cptkit run: the whole pipeline in one command on a tiny model, with its preflight."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from conftest import SMALL_EVALUATION, make_doc, write_config, write_jsonl

NAME = "tiny-run"
STAGE_LINE = re.compile(r"^run: .*$", re.MULTILINE)


def run_config(tmp_path: Path, model_dir: Path, training: dict[str, Any] | None = None, **sections: Any) -> Path:
    """A domain + replay corpus of generated documents (nothing extracted yet) and a config that takes it
    through every stage: LoRA on `model_dir` for one epoch, a small evaluation, loose gate thresholds."""
    write_jsonl(tmp_path / "docs.jsonl", [{"id": f"d{i}", "text": make_doc(i)} for i in range(24)])
    write_jsonl(tmp_path / "general.jsonl", [{"id": f"g{i}", "text": make_doc(1000 + i)} for i in range(16)])
    write_jsonl(tmp_path / "news.jsonl", [{"text": make_doc(2000 + i)} for i in range(3)])
    data: dict[str, Any] = {
        "model": {"name": str(model_dir)},
        "source": {"type": "jsonl", "path": "docs.jsonl", "id_column": "id"},
        "data": {
            "output_dir": "data",
            "replay_ratio": 0.25,
            "replay": {"type": "jsonl", "path": "general.jsonl", "id_column": "id"},
        },
        "prepare": {"split": {"val_ratio": 0.2}, "workers": 1},
        "output_dir": "outputs/cpt_model",
        "training": {
            "method": "lora",
            "learning_rate": 2e-3,
            "num_epochs": 1,
            "max_seq_length": 64,
            "micro_batch_size": 4,
            "eval_steps": 8,
            "warmup_steps": 2,
            "precision": "fp32",
            "eval_max_sequences": 2,
            **(training or {}),
        },
        "evaluate": SMALL_EVALUATION,
        "register": {"max_new_tokens": 4},
        # Absolute: MLflow caches stores by URI, and a relative one would reach another test's database.
        "tracking": {
            "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
            "log_system_metrics": False,
            "registered_model_name": NAME,
        },
    }
    data.update(sections)
    return write_config(tmp_path / "cfg.yaml", data)


def summary_of(output: str) -> list[str]:
    """The run's closing lines (`run: ran ...; skipped ...`, `run: stage times ...`), whitespace-normalized."""
    return [" ".join(m.split()) for m in STAGE_LINE.findall(output)]


def test_run_goes_through_every_stage_then_skips_then_reruns_only_what_a_change_touches(
    tmp_path: Path, tiny_model_dir: Path, cli: Any
) -> None:
    cfg = str(run_config(tmp_path, tiny_model_dir))
    first = cli("run", "--config", cfg)
    assert first.exit_code == 0, first.output
    lines = summary_of(first.output)
    assert lines[0] == "run: ran extract, prepare, train, evaluate, register"
    assert lines[1].startswith("run: stage times extract domain ") and "preflight" in lines[1]
    assert "total" in lines[1]
    out = " ".join(first.output.split())
    assert "preflight: plan:" in out and "preflight: measured on cpu" in out
    assert "alias champion -> version 1" in out
    summary = json.loads((tmp_path / "outputs/cpt_model/training_summary.json").read_text())
    assert summary["peak_memory_bytes"] > 0 and summary["peak_memory_kind"] == "process RSS"

    again = cli("run", "--config", cfg)
    assert again.exit_code == 0, again.output
    assert summary_of(again.output)[0] == "run: skipped (up to date) extract, prepare, train, evaluate, register"
    assert "train is up to date; speed and memory not measured" in " ".join(again.output.split())

    changed = cli("run", "--config", cfg, "--set", "training.learning_rate=4e-3")
    text = " ".join(changed.output.split())
    assert summary_of(changed.output)[0] == "run: ran train, evaluate, register; skipped (up to date) extract, prepare"
    for name in ("extract domain", "extract replay", "prepare domain", "prepare replay"):
        assert f"{name}: up to date, skipped" in text
    assert "models:/tiny-run/2" in text
    # Version 2 is promoted only if it is no worse than version 1 on the domain; either way run says so.
    if changed.exit_code != 0:
        assert "error: register: not promoted:" in text, changed.output
    else:
        assert "alias champion -> version 2" in text


def test_dry_run_estimates_match_the_real_run(tmp_path: Path, tiny_model_dir: Path, cli: Any) -> None:
    from cptkit.config import load_config
    from cptkit.preflight import preflight

    cfg = run_config(tmp_path, tiny_model_dir)
    # Before anything is extracted: counted in the source, tokens estimated, nothing written.
    before = cli("run", "--config", str(cfg), "--dry-run")
    assert before.exit_code == 0, before.output
    text = " ".join(before.output.split())
    assert "preflight: domain: 24 documents in the source" in text and "about" in text and "estimated" in text
    assert "preflight: plan (estimated):" in text and "estimated duration:" in text
    assert not (tmp_path / "data").exists() and not (tmp_path / "outputs").exists()
    assert not (tmp_path / "mlflow.db").exists()
    estimated = preflight(load_config(cfg), measure=False, dry_run=True)

    assert cli("run", "--config", str(cfg), "--until", "prepare").exit_code == 0
    prepared = cli("run", "--config", str(cfg), "--dry-run")
    assert prepared.exit_code == 0, prepared.output
    assert "(prepared)" in prepared.output and "estimated)" not in prepared.output
    plan = preflight(load_config(cfg), measure=True, dry_run=True)
    assert plan.measured is not None and plan.description is not None
    manifest = json.loads((tmp_path / "data/manifest.json").read_text())
    domain = plan.datasets[0]
    assert (domain.train_tokens, domain.val_tokens) == (manifest["train_tokens"], manifest["val_tokens"])
    # The source estimate is close to what prepare counted (the generated documents all pass the filters).
    assert abs(estimated.datasets[0].train_tokens / domain.train_tokens - 1) < 0.3
    assert abs(estimated.steps / plan.steps - 1) < 0.3

    result = cli("run", "--config", str(cfg), "--until", "train")
    assert result.exit_code == 0, result.output
    assert f"preflight: plan: {plan.steps} steps" in " ".join(result.output.split())
    summary = json.loads((tmp_path / "outputs/cpt_model/training_summary.json").read_text())
    assert summary["planned_steps"] == summary["steps"] == plan.steps
    assert summary["peak_memory_kind"] == plan.measured.memory_kind
    ratio = plan.measured.peak_memory_bytes / summary["peak_memory_bytes"]
    assert 1 / 1.3 <= ratio <= 1.3, (plan.measured.peak_memory_bytes, summary["peak_memory_bytes"])
    assert summary["learning_rates"][-1] == pytest.approx(plan.learning_rates[-1][2])
    assert summary["learning_rates"][1] == pytest.approx(2e-3)  # the peak, at the end of the 2 warmup steps


def test_from_and_until_run_a_part(tmp_path: Path, tiny_model_dir: Path, cli: Any) -> None:
    cfg = str(run_config(tmp_path, tiny_model_dir))
    result = cli("run", "--config", cfg, "--until", "extract")
    assert result.exit_code == 0, result.output
    assert summary_of(result.output)[0] == "run: ran extract"
    assert (tmp_path / "data/raw/manifest.json").is_file() and (tmp_path / "data/replay/raw/manifest.json").is_file()
    assert not (tmp_path / "data/manifest.json").exists()

    result = cli("run", "--config", cfg, "--from", "prepare", "--until", "prepare")
    assert result.exit_code == 0, result.output
    assert summary_of(result.output)[0] == "run: ran prepare"
    assert (tmp_path / "data/manifest.json").is_file() and not (tmp_path / "outputs").exists()

    result = cli("run", "--config", cfg, "--from", "evaluate")
    assert result.exit_code == 1
    assert (
        result.output.strip().splitlines()[-1].startswith("error: evaluate failed: outputs/cpt_model: no such folder")
    )

    result = cli("run", "--config", cfg, "--from", "train", "--until", "prepare")
    assert result.exit_code == 1 and "error: --from train comes after --until prepare" in result.output

    result = cli("run", "--config", cfg, "--from", "deploy")
    assert result.exit_code == 2 and "deploy" in result.output


def test_a_failed_stage_stops_the_run_with_one_line_and_the_next_run_continues(
    tmp_path: Path, tiny_model_dir: Path, cli: Any
) -> None:
    cfg = str(run_config(tmp_path, tiny_model_dir, training={"num_epochs": 0.5}))
    (tmp_path / "docs.jsonl").rename(tmp_path / "docs.moved")
    result = cli("run", "--config", cfg)
    assert result.exit_code == 1
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: extract failed: ") and "docs.jsonl" in errors[0]
    assert "Traceback" not in result.output and not (tmp_path / "data/raw/manifest.json").exists()
    (tmp_path / "docs.moved").rename(tmp_path / "docs.jsonl")

    # Evaluation fails (its extra set is missing) after training finished; the next run starts there.
    (tmp_path / "news.jsonl").rename(tmp_path / "news.moved")
    result = cli("run", "--config", cfg)
    assert result.exit_code == 1
    assert summary_of(result.output)[0] == "run: ran extract, prepare, train"
    assert result.output.strip().splitlines()[-1].startswith("error: evaluate failed: ")
    (tmp_path / "news.moved").rename(tmp_path / "news.jsonl")
    result = cli("run", "--config", cfg)
    assert result.exit_code == 0, result.output
    assert summary_of(result.output)[0] == "run: ran evaluate, register; skipped (up to date) extract, prepare, train"


def test_preflight_errors_stop_before_training(
    tmp_path: Path, tiny_model_dir: Path, cli: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = str(run_config(tmp_path, tiny_model_dir))
    # A sequence length above the model's: extract and prepare run, training does not start.
    result = cli("run", "--config", cfg, "--set", "training.max_seq_length=1024")
    assert result.exit_code == 1
    assert summary_of(result.output)[0] == "run: ran extract, prepare"
    last = " ".join(result.output.strip().splitlines()[-1].split())
    assert last.startswith("error: preflight failed: training.max_seq_length 1024 is above the 512 positions")
    assert not (tmp_path / "outputs").exists()

    # A tokenizer with more tokens than the model's embedding has rows.
    torch.manual_seed(0)
    small = tmp_path / "small_vocab_model"
    config = LlamaConfig(
        vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=512, tie_word_embeddings=True,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(small)
    for item in tiny_model_dir.iterdir():
        if item.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(item, small / item.name)
    result = cli("run", "--config", cfg, "--dry-run", "--set", f"model.name={small}")
    assert result.exit_code == 1
    assert "error: preflight failed: the tokenizer of" in result.output
    assert "has 400 tokens but the model's embedding has 256 rows" in " ".join(result.output.split())

    # Replay asked for without a replay source: a config error (exit 2), before anything is read.
    result = cli("run", "--config", cfg, "--dry-run", "--set", "data.replay=null")
    assert result.exit_code == 2 and "config error: data.replay: required when data.replay_ratio > 0" in result.output

    # A model that will not fit in this machine's memory.
    import cptkit.models

    monkeypatch.setattr(cptkit.models.for_training, "_device_memory", lambda device: 1 << 20)
    result = cli("run", "--config", cfg, "--dry-run")
    assert result.exit_code == 1
    assert "error: preflight failed: training needs about" in " ".join(result.output.split())


def test_log_formats_json_for_schedulers_and_quiet_for_ci(tmp_path: Path, tiny_model_dir: Path, cli: Any) -> None:
    cfg = str(run_config(tmp_path, tiny_model_dir))
    result = cli("--log-format", "json", "run", "--config", cfg)
    assert result.exit_code == 0, result.output
    events = [json.loads(line) for line in result.stdout.splitlines()]  # stdout holds JSON lines only
    stages = [e["stage"] for e in events if e["event"] == "stage"]
    assert sorted(set(stages)) == ["evaluate", "extract", "prepare", "register", "train"]
    assert stages.index("train") < stages.index("evaluate") < stages.index("register")
    steps = [e for e in events if e["event"] == "train_step"]
    assert steps and all({"loss", "learning_rate", "tokens_per_second", "eta_seconds"} <= set(e) for e in steps)
    assert steps[-1]["step"] == steps[-1]["total_steps"] and steps[-1]["eta_seconds"] == 0
    assert any(e["event"] == "preflight" and e["steps"] == steps[-1]["total_steps"] for e in events)
    assert events[-1]["event"] == "run" and events[-1]["ran"][-1] == "register"
    assert "train: step" not in result.stderr and "run: ran" not in result.stderr  # no human lines

    quiet = cli("--log-format", "quiet", "run", "--config", cfg, "--set", "training.learning_rate=4e-3")
    assert quiet.exit_code == 0, quiet.output
    assert "train: step" not in quiet.output  # stage results, not per-step lines
    assert "run: ran train, evaluate, register" in " ".join(quiet.output.split())

    failed = cli("--log-format", "json", "run", "--config", cfg, "--set", "source.path=missing.jsonl")
    assert failed.exit_code == 1
    last = json.loads(failed.stdout.splitlines()[-1])
    assert last["event"] == "error" and last["message"].startswith("extract failed") and last["exit_code"] == 1
    assert "error: extract failed" in " ".join(failed.stderr.split())  # the one line, on stderr too
