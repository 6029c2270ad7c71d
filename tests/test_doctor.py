"""`cptkit doctor`, and the choices as the stages make them on machines this one is not: an AVX2-only CPU
and Apple silicon (mps) stand in through a mocked probe and device list (mps was never run for real)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from conftest import write_config
from cptkit import capability
from cptkit.capability import Capability
from cptkit.config import TrainingConfig


def fake_probe(monkeypatch: pytest.MonkeyPatch, devices: list[str], **rates: Any) -> None:
    """Make the machine look like `devices` with these measured rates (memory of the real CPU)."""
    real = capability.measure("cpu")

    def probe(device: str = "cpu", refresh: bool = False) -> Capability:
        return replace(real, device=device, **rates)

    monkeypatch.setattr(capability, "available_devices", lambda: devices)
    monkeypatch.setattr(capability, "probe", probe)


def test_doctor_prints_the_record_and_the_choices(
    tmp_path: Path, tiny_model_dir: Path, cli: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(capability, "_MEMO", {})  # an earlier test in this process probed already
    cfg = write_config(tmp_path / "c.yaml", {"model": {"name": str(tiny_model_dir)}})
    result = cli("doctor", "-c", str(cfg))
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())
    assert "devices present: cpu; measured: cpu" in out and "matmul on one thread: fp32" in out
    assert "4-bit (NF4) dequantization:" in out and "probe: measured now" in out
    assert "train: device cpu: no CUDA or mps device is present" in out
    assert "train: precision " in out and "train: method lora: LoRA on a" in out
    assert "evaluate: precision " in out and "estimated training memory: lora" in out
    assert "probe: read from the cache" in " ".join(cli("doctor", "-c", str(cfg)).output.split())

    data = json.loads(cli("doctor", "-c", str(cfg), "--json").output)
    assert data["capability"]["device"] == "cpu" and data["capability"]["fp32_gflops"] > 0
    assert data["training"]["method"]["value"] == "lora" and data["training"]["capability"] is None
    assert data["evaluate_precision"]["value"] in ("bf16", "fp32") and data["warnings"] == []
    assert Path(data["cache_file"]).is_file()


def test_doctor_warns_about_an_explicit_bf16_where_it_is_slow(
    tmp_path: Path, tiny_model_dir: Path, cli: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_probe(monkeypatch, ["cpu"], fp32_gflops=97.0, bf16_gflops=1.3)  # an AVX2-only CPU
    cfg = write_config(
        tmp_path / "c.yaml",
        {"model": {"name": str(tiny_model_dir)}, "training": {"precision": "bf16"}, "evaluate": {"precision": "bf16"}},
    )
    result = cli("doctor", "-c", str(cfg))
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())
    assert "train: precision bf16: set in training.precision" in out
    assert "warning: training.precision bf16 is slow on this cpu" in out and "(75x slower)" in out
    assert "warning: evaluate.precision bf16 is slow" in out
    auto = cli("doctor", "-c", str(cfg), "--set", "training.precision=auto", "--set", "evaluate.precision=auto")
    assert "train: precision fp32: bf16 is slower than fp32 here (emulated" in " ".join(auto.output.split())
    assert "warning" not in auto.output


def test_a_hub_model_is_sized_from_its_config_alone(cli: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    result = cli("doctor", "--set", "model.name=cptkit-tests/no-such-model")
    assert result.exit_code == 1
    line = " ".join(result.output.split())
    assert line.startswith("error: model.name: cannot read cptkit-tests/no-such-model's config.json from the hub")
    # An explicit method needs no model shape: nothing is read from the hub.
    explicit = cli("doctor", "--set", "model.name=cptkit-tests/no-such-model", "--set", "training.method=qlora")
    assert explicit.exit_code == 0, explicit.output


def test_on_apple_silicon_training_uses_mps_with_lora(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cptkit.choices import resolve_training

    fake_probe(
        monkeypatch,
        ["mps", "cpu"],
        fp32_gflops=5_000.0,
        bf16_gflops=None,
        fp16_gflops=10_000.0,
        dequant_4bit_gparams_per_second=None,
        dequant_note="bitsandbytes 4-bit runs on CUDA and CPUs, not on mps",
    )
    choices = resolve_training(TrainingConfig(), tiny_model_dir)
    assert (choices.device.value, choices.precision.value, choices.method.value) == ("mps", "fp16", "lora")
    assert "QLoRA cannot run here (bitsandbytes 4-bit runs on CUDA and CPUs, not on mps)" in choices.method.reason
    qlora = resolve_training(TrainingConfig(method="qlora"), tiny_model_dir)
    assert qlora.device.value == "cpu" and qlora.warnings and "trains on the CPU" in qlora.warnings[0]


def test_evaluation_uses_mps_unless_the_model_is_4bit(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import yaml

    from cptkit.config import load_config
    from cptkit.evaluate import choose_for_evaluation

    fake_probe(monkeypatch, ["mps", "cpu"], fp32_gflops=5_000.0, bf16_gflops=9_000.0, fp16_gflops=10_000.0)
    config = load_config(write_config(tmp_path / "c.yaml", {"model": {"name": str(tiny_model_dir)}}))
    for method, device in (("lora", "mps"), ("qlora", "cpu")):
        trained = tmp_path / method
        trained.mkdir()
        (trained / "cptkit_config.yaml").write_text(yaml.safe_dump({"training": {"method": method}}))
        chosen, precision = choose_for_evaluation(config.model_copy(update={"output_dir": trained}), trained)
        assert chosen.value == device and precision.value == "bf16"


def test_the_preflight_prints_the_choices_and_the_warning(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from conftest import prepared_run
    from cptkit.config import load_config
    from cptkit.preflight import preflight
    from cptkit.printers import print_preflight
    from cptkit.progress import console

    fake_probe(monkeypatch, ["cpu"], fp32_gflops=97.0, bf16_gflops=1.3)
    training = {"max_steps": 4, "max_seq_length": 32, "micro_batch_size": 2, "precision": "bf16"}
    cfg = prepared_run(tmp_path, tiny_model_dir, training, domain_docs=20)
    plan = preflight(load_config(cfg), measure=False)
    assert plan.choices is not None and plan.choices.precision.value == "bf16"
    with console.capture() as captured:
        print_preflight(plan)
    text = " ".join(captured.get().split())
    assert "preflight: method lora: LoRA on a bf16 base" in text
    assert "preflight: evaluate precision fp32: bf16 is slower than fp32 here" in text
    assert "preflight: warning: training.precision bf16 is slow on this cpu" in text
