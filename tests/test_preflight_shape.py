"""The dry run without a model's weights: memory from the published shape (Mistral-7B, Phi-3-mini) or a
local config.json, checked against hand-counted parameters, the seed's hardware table and a measured peak."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cptkit.config import TrainingConfig, load_config
from cptkit.errors import CptkitError
from cptkit.known_models import MISTRAL_7B_V01, PHI3_MINI_4K, config_from, published_config
from cptkit.memory import memory_parts
from cptkit.models import shape_of
from cptkit.preflight_shape import shape_plan

REPO = Path(__file__).resolve().parents[1]
GIB = 1 << 30


def qlora(**kwargs: object) -> TrainingConfig:
    settings: dict[str, object] = {
        "method": "qlora",
        "micro_batch_size": 1,
        "max_seq_length": 2048,
        "gradient_checkpointing": True,
    }
    return TrainingConfig(**{**settings, **kwargs})  # type: ignore[arg-type]


def test_mistral_7b_shape_matches_the_parameters_counted_by_hand() -> None:
    shape = shape_of(config_from(MISTRAL_7B_V01), qlora())
    hidden, kv, ff, layers, vocab = 4096, 8 * 128, 14336, 32, 32000
    attention = 2 * hidden * hidden + 2 * hidden * kv  # q, o; k, v (8 of 32 heads)
    per_layer = attention + 3 * hidden * ff + 2 * hidden  # gate, up, down; two RMS norms
    assert shape.params == layers * per_layer + hidden + 2 * vocab * hidden == 7_241_732_096
    assert shape.quantizable_params == layers * (attention + 3 * hidden * ff) == 6_979_321_856
    # LoRA r=16 on every linear layer: r x (in + out) each.
    lora = 16 * (2 * (hidden + hidden) + 2 * (hidden + kv) + 3 * (hidden + ff))
    assert shape.adapter_params == layers * lora == 41_943_040


def test_mistral_7b_qlora_fits_the_seeds_8_gb_minimum_with_checkpointing_at_micro_batch_1() -> None:
    shape = shape_of(config_from(MISTRAL_7B_V01), qlora())
    parts = memory_parts(shape, "qlora", "bf16", 2048, checkpointing=True)
    assert parts["weights"] == round(6_979_321_856 * (0.5 + 1 / 64 + 4 / (64 * 256)) + 262_410_240 * 2)
    assert parts["optimizer"] == 41_943_040 * 16
    assert parts["activations"] == 2048 * 4096 * (32 + 25) * 2
    total = sum(parts.values())
    assert total == pytest.approx(5.48 * GIB, rel=0.002)
    # The allocator's reserve over its peak allocation (3.69 / 3.22 GiB measured for Phi-3-mini on an
    # H200) still leaves room under 8 GB.
    assert total * 3.69 / 3.22 < 8e9
    # Without checkpointing every layer's activations are kept: far above the seed's minimum.
    assert sum(memory_parts(shape, "qlora", "bf16", 2048, checkpointing=False).values()) > 16 * GIB


def test_the_shape_estimate_is_within_3_percent_of_the_measured_phi3_mini_peak() -> None:
    """benchmarks/gpu_qlora_check.py measured Phi-3-mini QLoRA (random weights from its config) on an H200."""
    record = json.loads((REPO / "docs/measurements/gpu_qlora_phi3_h200_b1.json").read_text(encoding="utf-8"))
    run = next(r for r in record["runs"] if r["gradient_checkpointing"])
    shape = shape_of(config_from(PHI3_MINI_4K), qlora())
    assert shape.params == record["parameters"] and shape.adapter_params == run["trainable_parameters"]
    estimate = sum(memory_parts(shape, "qlora", "bf16", record["micro_batch"] * record["seq"], True).values())
    assert estimate == pytest.approx(run["peak_allocated_gib"] * GIB, rel=0.03)


def test_known_models_are_found_case_insensitively() -> None:
    assert published_config("microsoft/phi-3-mini-4k-instruct") == PHI3_MINI_4K
    assert published_config("mistralai/Mistral-7B-v0.1") == MISTRAL_7B_V01
    assert published_config("someone/else") is None


def offline_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO / "src")}
    return subprocess.run(
        [sys.executable, "-m", "cptkit", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_dry_run_of_the_mistral_config_without_weights_estimates_memory_and_says_what_it_could_not_check(
    tmp_path: Path,
) -> None:
    proc = offline_cli("run", "--dry-run", "-c", str(REPO / "configs" / "mistral-7b.yaml"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = " ".join((proc.stdout + proc.stderr).split())
    assert "mistralai/Mistral-7B-v0.1: weights not here; shape from the published config.json" in out
    assert "7,241,732,096 parameters" in out
    assert "checked: training.max_seq_length 2048 <= the model's 32768 positions" in out
    assert "gradient checkpointing on): 5.5 GiB (weights 3.8 GiB, optimizer 640.0 MiB" in out
    assert "not checked: the weights (cannot download model 'mistralai/Mistral-7B-v0.1'" in out
    assert "not checked: the data" in out and "Traceback" not in proc.stderr


def test_a_local_folder_with_config_json_alone_is_estimated_from_it(tmp_path: Path) -> None:
    folder = tmp_path / "phi3"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(PHI3_MINI_4K), encoding="utf-8")
    config = load_config(None, [f"model.name={folder}", "training.method=qlora", "training.micro_batch_size=1"])
    plan = shape_plan(config)
    assert plan is not None and plan.shape_from == str(folder / "config.json")
    assert "model weights missing" in plan.weights_absent
    assert plan.shape.params == 3_821_079_552 and plan.method == "qlora"


def test_without_weights_a_sequence_above_the_models_positions_is_still_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    config = load_config(REPO / "configs" / "mistral-7b.yaml", ["model.name=microsoft/Phi-3-mini-4k-instruct"])
    config.training.max_seq_length = 8192
    with pytest.raises(CptkitError, match=r"max_seq_length 8192 is above the 4096 positions"):
        shape_plan(config)


def test_an_unknown_model_without_weights_names_what_the_dry_run_can_estimate(tmp_path: Path) -> None:
    proc = offline_cli(
        "run",
        "--dry-run",
        "--set",
        "model.name=someone/unknown-7b",
        "--set",
        "source.type=jsonl",
        "--set",
        "source.path=x.jsonl",
        cwd=tmp_path,
    )
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("error: preflight failed: cannot download model 'someone/unknown-7b'")
    assert "only for a model whose shape it knows" in lines[0]


def test_a_folder_with_damaged_weights_is_an_error_not_an_absence(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(MISTRAL_7B_V01), encoding="utf-8")
    (folder / "model.safetensors").write_bytes(b"\x00\x01")
    config = load_config(None, [f"model.name={folder}"])
    with pytest.raises(CptkitError, match="not a valid safetensors file"):
        shape_plan(config)
