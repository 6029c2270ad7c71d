"""The measured-capability probe: real measurements (also under an AVX2-only CPU's kernels), the cache per
machine, torch version, device and ISA environment, and the model-shape memory estimate it is used with."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from cptkit import capability
from cptkit.capability import Capability, cache_key, cache_path, measure, probe

# What an AVX2-only CPU computes with, on any x86 CPU: oneDNN and ATen limited to AVX2 kernels.
AVX2_ONLY = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
x86_only = pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 ISA variables")


@pytest.fixture(autouse=True)
def _fresh_memo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(capability, "_MEMO", {})


def probe_in_subprocess(env: dict[str, str]) -> dict[str, Any]:
    code = (
        "import json; from cptkit.capability import probe; from cptkit.choices import choose_precision; "
        "c = probe('cpu'); print(json.dumps({**c.as_dict(), 'choice': choose_precision(c).value}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env={**os.environ, **env}
    )
    return json.loads(result.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_a_real_probe_measures_this_cpu_quickly() -> None:
    record = measure("cpu")
    assert record.device == "cpu" and record.cpu_model and record.torch_version
    assert record.fp32_gflops > 1 and record.bf16_gflops is not None and record.fp16_gflops is None
    assert record.memory_bytes >= record.memory_available_bytes > 0
    assert record.probe_seconds < 2  # a few hundred ms; generous for a busy shared machine
    assert set(record.cpu_flags) <= capability.RELEVANT_FLAGS
    assert Capability.from_dict(json.loads(json.dumps(record.as_dict()))) == record


@x86_only
def test_under_avx2_only_kernels_bf16_is_measured_slow_and_never_chosen() -> None:
    """On any x86 CPU, limiting torch to AVX2 kernels gives what an AVX2-only CPU does: emulated bf16,
    tens of times slower than fp32. The probe sees it whatever the CPU's flags say."""
    slow = probe_in_subprocess(AVX2_ONLY)
    assert slow["isa_env"] == AVX2_ONLY and slow["cpu_kernels"] == "AVX2"
    assert slow["bf16_gflops"] < slow["fp32_gflops"] / 5
    assert slow["choice"] == "fp32"


def test_the_probe_is_cached_per_machine_and_read_back(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = capability.measure

    def counted(device: str = "cpu") -> Capability:
        calls.append(device)
        return real(device)

    monkeypatch.setattr(capability, "measure", counted)
    first = probe("cpu")
    path = cache_path("cpu")
    assert path.parent == Path(os.environ["CPTKIT_CACHE"]) / "capability" and path.is_file()
    assert json.loads(path.read_text())["fp32_gflops"] == first.fp32_gflops
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # written atomically: no temporary left

    monkeypatch.setattr(capability, "_MEMO", {})  # a new process
    again = probe("cpu")
    assert calls == ["cpu"] and again.cached and again.fp32_gflops == first.fp32_gflops
    assert probe("cpu", refresh=True).cached is False and calls == ["cpu", "cpu"]


def test_a_damaged_or_older_cache_file_is_measured_again(monkeypatch: pytest.MonkeyPatch) -> None:
    record = probe("cpu")
    path = cache_path("cpu")
    for content in ("{not json", json.dumps({**record.as_dict(), "probe_version": 0})):
        path.write_text(content)
        monkeypatch.setattr(capability, "_MEMO", {})
        assert probe("cpu").cached is False
        assert json.loads(path.read_text())["probe_version"] == capability.PROBE_VERSION


def test_the_cache_key_follows_the_isa_environment_and_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    for name in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY"):  # the suite may run under them (AVX2 emulation)
        monkeypatch.delenv(name, raising=False)
    plain = cache_key("cpu")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    limited = cache_key("cpu")
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    both = cache_key("cpu")
    assert len({plain, limited, both}) == 3
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    monkeypatch.delenv("ATEN_CPU_CAPABILITY")
    assert cache_key("cpu") == plain
    monkeypatch.setattr(torch, "__version__", "9.9.9")
    assert cache_key("cpu") != plain


def test_the_cache_lives_under_xdg_cache_home_without_cptkit_cache(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("CPTKIT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_path("cpu").parent == tmp_path / "xdg" / "cptkit" / "capability"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_path("cpu").parent == tmp_path / "home" / ".cache" / "cptkit" / "capability"


def test_memory_is_read_afresh_from_a_cached_record(monkeypatch: pytest.MonkeyPatch) -> None:
    probe("cpu")
    monkeypatch.setattr(capability, "device_memory", lambda device: (123, 45))
    again = probe("cpu")
    assert (again.memory_bytes, again.memory_available_bytes) == (123, 45)


def test_a_device_where_4bit_does_not_run_says_why() -> None:
    rate, why = capability._dequant_rate("mps", capability._import_bitsandbytes("mps"))
    assert rate is None and why is not None and "not on mps" in why
    record = replace(measure("cpu"), dequant_4bit_gparams_per_second=None, dequant_note=why)
    assert Capability.from_dict(record.as_dict()).dequant_note == why
