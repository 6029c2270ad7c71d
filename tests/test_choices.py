"""Device, precision and method choices as pure functions of a measured-capability record and the model's
shape: tables of machines (AMX CPU, AVX512-BF16 CPU, AVX2-only CPU, small GPU, large GPU, Apple silicon)."""

from __future__ import annotations

from typing import Any

import pytest

from cptkit.capability import Capability
from cptkit.choices import (
    MEMORY_MARGIN,
    Choice,
    choose_device,
    choose_eval_precision,
    choose_method,
    choose_precision,
    decide_training,
    method_memory,
)
from cptkit.config import TrainingConfig
from cptkit.memory import ModelShape

GIB = 1 << 30


def machine(
    device: str, fp32: float, bf16: float | None, fp16: float | None, dequant: float | None, memory: int
) -> Capability:
    return Capability(
        device=device,
        device_name={"cuda": "a GPU", "mps": "Apple M2"}.get(device, "a CPU"),
        cpu_model="a CPU",
        cpu_flags=[],
        cpu_kernels="AVX2",
        threads=2,
        torch_version="2.13.0",
        isa_env={},
        memory_bytes=memory,
        memory_available_bytes=memory,
        fp32_gflops=fp32,
        bf16_gflops=bf16,
        fp16_gflops=fp16,
        dequant_4bit_gparams_per_second=dequant,
        dequant_note="bitsandbytes 4-bit runs on CUDA and CPUs, not on mps" if dequant is None else None,
    )


# One-thread CPU rates as the probe measures them; GPU rates of the whole device.
MACHINES = {
    "amx_cpu": machine("cpu", 95, 900, None, 6.0, 64 * GIB),  # Sapphire Rapids: AMX bf16
    "avx512bf16_cpu": machine("cpu", 99, 210, None, 6.0, 24 * GIB),  # AMD EPYC (Zen 4), measured here
    "avx2_cpu": machine("cpu", 97, 1.3, None, 4.7, 16 * GIB),  # the same CPU with AVX2 only (emulated bf16)
    "small_gpu": machine("cuda", 8_000, 1_200, 60_000, 300.0, 16 * GIB),  # T4: no fast bf16, fast fp16
    "gpu_24gb": machine("cuda", 80_000, 160_000, 160_000, 800.0, 24 * GIB),  # RTX 4090
    "large_gpu": machine("cuda", 60_000, 700_000, 700_000, 1_000.0, 80 * GIB),  # H100 80 GB
    "mps": machine("mps", 5_000, None, 10_000, None, 24 * GIB),  # Apple silicon, bf16 not supported
    "mps_bf16": machine("mps", 5_000, 9_000, 10_000, None, 24 * GIB),
}

SMOLLM2 = ModelShape(
    params=134_515_008,
    quantizable_params=106_168_320,
    adapter_params=4_884_480,
    embedding_params=28_311_552,
    hidden_size=576,
    layers=30,
    vocab_size=49_152,
)
# Llama-2-7B: 32 layers of 4096, 32k vocabulary; LoRA r=16 on every linear layer.
LLAMA_7B = ModelShape(
    params=6_738_415_616,
    quantizable_params=6_476_005_376,
    adapter_params=39_976_960,
    embedding_params=262_144_000,
    hidden_size=4096,
    layers=32,
    vocab_size=32_000,
)


def training(**kwargs: Any) -> TrainingConfig:
    kwargs.setdefault("method", "auto")
    return TrainingConfig(**kwargs)


# ---------------------------------------------------------------- precision


@pytest.mark.parametrize(
    ("name", "expected", "reason"),
    [
        ("amx_cpu", "bf16", "bf16 is fast here"),
        ("avx512bf16_cpu", "bf16", "bf16 is fast here"),
        ("avx2_cpu", "fp32", "bf16 is slower than fp32 here (emulated"),
        ("small_gpu", "fp16", "no fast bf16 on this GPU"),
        ("large_gpu", "bf16", "bf16 is fast here"),
        ("mps", "fp16", "no fast bf16 on this GPU"),
        ("mps_bf16", "bf16", "bf16 is fast here"),
    ],
)
def test_precision_auto_is_bf16_only_where_it_is_measured_fast(name: str, expected: str, reason: str) -> None:
    choice = choose_precision(MACHINES[name], "auto")
    assert choice.value == expected and reason in choice.reason and choice.warning is None
    assert "GFLOP/s measured" in choice.reason


@pytest.mark.parametrize(
    ("name", "expected"),
    [("amx_cpu", "bf16"), ("avx2_cpu", "fp32"), ("small_gpu", "fp32"), ("large_gpu", "bf16"), ("mps", "fp32")],
)
def test_evaluation_precision_auto_is_bf16_or_fp32(name: str, expected: str) -> None:
    assert choose_eval_precision(MACHINES[name], "auto").value == expected


def test_an_explicit_bf16_where_it_is_slow_is_kept_with_the_measured_cost() -> None:
    choice = choose_precision(MACHINES["avx2_cpu"], "bf16")
    assert choice == Choice("bf16", "set in training.precision", choice.warning)
    assert choice.warning is not None
    assert "training.precision bf16 is slow on this cpu" in choice.warning
    assert "bf16 1.3 vs fp32 97.0 GFLOP/s measured (75x slower)" in choice.warning
    assert choice.warning.endswith("precision auto would use fp32")
    evaluation = choose_eval_precision(MACHINES["avx2_cpu"], "bf16")
    assert evaluation.value == "bf16" and evaluation.warning is not None
    assert evaluation.warning.startswith("evaluate.precision bf16 is slow")


@pytest.mark.parametrize("name", ["amx_cpu", "avx512bf16_cpu", "large_gpu"])
def test_an_explicit_bf16_where_it_is_fast_has_no_warning(name: str) -> None:
    assert choose_precision(MACHINES[name], "bf16").warning is None


def test_explicit_fp32_and_fp16_are_kept() -> None:
    assert choose_precision(MACHINES["amx_cpu"], "fp32") == Choice("fp32", "set in training.precision")
    on_cpu = choose_precision(MACHINES["amx_cpu"], "fp16")
    assert on_cpu.value == "fp16" and on_cpu.warning is not None and "would use bf16" in on_cpu.warning
    assert choose_precision(MACHINES["small_gpu"], "fp16").warning is None


# ---------------------------------------------------------------- device


@pytest.mark.parametrize(
    ("present", "method", "expected", "warned"),
    [
        (["cuda", "cpu"], "auto", "cuda", False),
        (["cuda", "mps", "cpu"], "qlora", "cuda", False),
        (["mps", "cpu"], "auto", "mps", False),
        (["mps", "cpu"], "lora", "mps", False),
        (["mps", "cpu"], "full", "mps", False),
        (["mps", "cpu"], "qlora", "cpu", True),  # bitsandbytes 4-bit has no mps kernels
        (["cpu"], "auto", "cpu", False),
    ],
)
def test_device_is_cuda_then_mps_then_cpu(present: list[str], method: str, expected: str, warned: bool) -> None:
    choice = choose_device(present, method)
    assert choice.value == expected and (choice.warning is not None) == warned


# ---------------------------------------------------------------- method


@pytest.mark.parametrize(
    ("name", "shape", "settings", "expected", "reason"),
    [
        # The demo's model and batch on CPUs: LoRA fits easily, and 4-bit layers only add dequantization.
        ("amx_cpu", SMOLLM2, {"micro_batch_size": 4, "max_seq_length": 512}, "lora", "no slower than QLoRA"),
        ("avx2_cpu", SMOLLM2, {"micro_batch_size": 4, "max_seq_length": 512}, "lora", "no slower than QLoRA"),
        # 7B on a 16 GB GPU: a 16/32-bit base alone is 13-27 GB; QLoRA's 4-bit base is 3.5 GB.
        ("small_gpu", LLAMA_7B, {"micro_batch_size": 1, "max_seq_length": 2048}, "qlora", "more than 80%"),
        ("gpu_24gb", LLAMA_7B, {"micro_batch_size": 1, "max_seq_length": 2048}, "qlora", "and fits"),
        # 7B on 80 GB: LoRA on the bf16 base fits at micro batch 1 ...
        ("large_gpu", LLAMA_7B, {"micro_batch_size": 1, "max_seq_length": 2048}, "lora", "within 80%"),
        # ... but not at micro batch 6, whose activations take 80 GB ...
        ("large_gpu", LLAMA_7B, {"micro_batch_size": 6, "max_seq_length": 2048}, "qlora", "more than 80%"),
        # ... unless gradient checkpointing shrinks them.
        (
            "large_gpu",
            LLAMA_7B,
            {"micro_batch_size": 6, "max_seq_length": 2048, "gradient_checkpointing": True},
            "lora",
            "within 80%",
        ),
        # Apple silicon: no 4-bit kernels, so LoRA whatever the memory says.
        ("mps", SMOLLM2, {"micro_batch_size": 4, "max_seq_length": 512}, "lora", "QLoRA cannot run here"),
        ("mps", LLAMA_7B, {"micro_batch_size": 4, "max_seq_length": 2048}, "lora", "may not fit"),
    ],
)
def test_method_auto(name: str, shape: ModelShape, settings: dict[str, Any], expected: str, reason: str) -> None:
    cap = MACHINES[name]
    config = training(**settings)
    precision = choose_precision(cap).value
    choice = choose_method(cap, shape, config, precision)
    assert choice.value == expected, choice.reason
    assert reason in choice.reason


def test_the_memory_driven_switch_to_qlora_happens_where_lora_leaves_no_margin() -> None:
    """Between the two sides of the margin the choice flips, for the same GPU and model."""
    config = training(micro_batch_size=4, max_seq_length=2048)
    lora = method_memory(LLAMA_7B, config, "lora", "bf16")
    qlora = method_memory(LLAMA_7B, config, "qlora", "bf16")
    assert qlora < lora - 8 * GIB  # 4-bit weights: about a quarter of 12.5 GiB of bf16 ones
    roomy = machine("cuda", 60_000, 700_000, 700_000, 1_000.0, int(lora / MEMORY_MARGIN) + GIB)
    tight = machine("cuda", 60_000, 700_000, 700_000, 1_000.0, int(lora / MEMORY_MARGIN) - GIB)
    assert choose_method(roomy, LLAMA_7B, config, "bf16").value == "lora"
    assert choose_method(tight, LLAMA_7B, config, "bf16").value == "qlora"


def test_an_explicit_method_is_kept_whatever_the_machine() -> None:
    for method in ("qlora", "lora", "full"):
        for cap in MACHINES.values():
            assert choose_method(cap, None, training(method=method), "fp32") == Choice(method, "set in training.method")


def test_decide_training_gives_all_three_choices_and_the_resolved_section() -> None:
    cap = MACHINES["avx2_cpu"]
    config = training(micro_batch_size=4, max_seq_length=512, precision="bf16")
    choices = decide_training(config, cap, choose_device(["cpu"]), SMOLLM2)
    assert (choices.device.value, choices.precision.value, choices.method.value) == ("cpu", "bf16", "lora")
    assert choices.mixed_precision == "bf16"
    assert len(choices.warnings) == 1 and "slow" in choices.warnings[0]
    resolved = choices.apply(config)
    assert (resolved.method, resolved.precision) == ("lora", "bf16") and config.method == "auto"
    assert set(choices.memory_estimates) == {"lora", "qlora"}
    assert choices.params()["chosen.method"] == "lora" and "chosen.precision_reason" in choices.params()
    assert choices.as_dict()["capability"]["fp32_gflops"] == 97
    assert [line.split(":")[0] for line in choices.lines()] == ["device cpu", "precision bf16", "method lora"]
