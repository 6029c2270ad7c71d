"""What this machine computes fast, measured: a short probe of the device cptkit would train on (matmul
rates in fp32, bf16 and, on GPUs, fp16; the cost of bitsandbytes' 4-bit dequantization; memory), cached
per machine, torch version, device and CPU-ISA environment, so that `auto` settings choose from numbers
rather than from CPU flags. The choices themselves are pure functions in `cptkit.choices`.

A CPU may advertise bf16 and still compute it slowly (torch emulates bf16 matmuls where the CPU lacks
AVX512-BF16 or AMX, about 30-40x slower than fp32), so only the measured rates decide.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import platform
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from cptkit.artifacts import write_json_atomic
from cptkit.tokenization import cache_dir

# Bump when what the probe measures changes, so that older cached records are not reused.
PROBE_VERSION = 1
DEVICES = ("cuda", "mps", "cpu")
# Environment variables that change which kernels torch uses on a CPU: the cached record is per value.
ISA_ENV = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")
# CPU features that matter for training speed (x86 /proc/cpuinfo flags, Arm "Features").
_X86_FLAGS = "avx avx2 fma f16c avx512f avx512bw avx512_vnni avx512_bf16 avx512_fp16"
_AMX_FLAGS = "amx_tile amx_bf16 amx_int8 amx_fp16"
_ARM_FLAGS = "asimd asimdhp fphp bf16 i8mm sve sve2 sme"
RELEVANT_FLAGS = frozenset(f"{_X86_FLAGS} {_AMX_FLAGS} {_ARM_FLAGS}".split())
# Matmul shapes: on a CPU small enough that an emulated bf16 product takes ~70 ms (the whole probe stays
# within a few hundred ms), on a GPU large enough to keep it busy for a fraction of a millisecond.
_CPU_MATMUL = (128, 512, 512)
_GPU_MATMUL = (2048, 2048, 2048)
_DEQUANT_SHAPE = (1024, 1024)
# Timed calls per measurement: at least _MIN_CALLS (a shared machine's other work makes single calls up to
# 20x slower; the fastest of several is the undisturbed rate), more while within _BUDGET_SECONDS; one call
# slower than _SLOW_CALL_SECONDS (emulated bf16) ends it: that rate is clear from one call.
_MIN_CALLS, _MAX_CALLS, _BUDGET_SECONDS, _SLOW_CALL_SECONDS = 5, 50, 0.08, 0.05


@dataclass(frozen=True)
class Capability:
    """One device as measured. Rates are the best of several timed calls (the machine may be shared: the
    fastest call is the one least disturbed), on one thread on a CPU (a second thread's share of a shared
    CPU is what other work leaves it; one thread's rate is steady, and the ratios between precisions are
    what the choices use); None where that computation does not run on the device."""

    device: str  # cuda | mps | cpu
    device_name: str  # the GPU's name, or the CPU model
    cpu_model: str
    cpu_flags: list[str]  # the relevant ones the CPU reports (RELEVANT_FLAGS)
    cpu_kernels: str  # torch's CPU kernel level (AVX512, AVX2, DEFAULT, ...): ATEN_CPU_CAPABILITY lowers it
    threads: int  # torch's CPU threads
    torch_version: str
    isa_env: dict[str, str]  # the ISA_ENV variables that were set
    memory_bytes: int  # the device's memory: GPU memory, or RAM for the CPU (and unified memory on mps)
    memory_available_bytes: int  # free when the record was read
    fp32_gflops: float
    bf16_gflops: float | None
    fp16_gflops: float | None  # GPUs only: CPUs train in bf16 or fp32
    dequant_4bit_gparams_per_second: float | None  # NF4 dequantization; None where bitsandbytes 4-bit does not run
    dequant_note: str | None = None  # why it was not measured
    probe_seconds: float = 0.0  # the measurements' time (importing bitsandbytes the first time not counted)
    measured_at: str = ""
    probe_version: int = PROBE_VERSION
    cached: bool = field(default=False, compare=False)  # this record was read from the cache

    @property
    def bf16_speedup(self) -> float | None:
        """bf16 matmul rate over fp32's; below 1 means bf16 is slower (emulated, or no fast units)."""
        return None if self.bf16_gflops is None else self.bf16_gflops / self.fp32_gflops

    @property
    def fp16_speedup(self) -> float | None:
        return None if self.fp16_gflops is None else self.fp16_gflops / self.fp32_gflops

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Capability:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def available_devices() -> list[str]:
    """The devices torch can use here, best first (cuda, mps, cpu)."""
    import torch

    found = []
    if torch.cuda.is_available():
        found.append("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        found.append("mps")
    found.append("cpu")
    return found


# One probe per device and process: the environment that decides the result cannot change under a
# running torch (the ISA variables are read when the first kernel runs).
_MEMO: dict[str, Capability] = {}


def probe(device: str = "cpu", refresh: bool = False) -> Capability:
    """The measured capability of `device`, from the cache when this machine, torch version, device and
    ISA environment were measured before (memory is read afresh either way)."""
    key = cache_key(device)
    found = None if refresh else _MEMO.get(key)
    if found is not None:
        found = replace(found, cached=True)  # not measured by this call
    elif not refresh:
        found = _read_cached(cache_path(device, key))
    if found is None:
        found = measure(device)
        write_json_atomic(cache_path(device, key), found.as_dict())
    _MEMO[key] = found
    total, available = device_memory(device)
    return replace(found, memory_bytes=total, memory_available_bytes=available)


def cache_key(device: str) -> str:
    import torch

    parts = {
        "probe": PROBE_VERSION,
        "machine": platform.node(),
        "cpu": cpu_model(),
        "torch": torch.__version__,
        "device": device,
        "device_name": _device_name(device),
        "isa_env": {k: os.environ[k] for k in ISA_ENV if k in os.environ},
        "threads": torch.get_num_threads(),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def cache_path(device: str, key: str | None = None) -> Path:
    return cache_dir() / "capability" / f"{device}-{key or cache_key(device)}.json"


def _read_cached(path: Path) -> Capability | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        record = Capability.from_dict(data)
    except (OSError, ValueError, TypeError):
        return None  # missing, or written by another version: measure again
    if record.probe_version != PROBE_VERSION:
        return None
    return replace(record, cached=True)


# ---------------------------------------------------------------- measuring


def measure(device: str = "cpu") -> Capability:
    """Measure `device` now (a few hundred milliseconds; importing bitsandbytes the first time aside)."""
    import torch

    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r}; expected one of {DEVICES}")
    bnb = _import_bitsandbytes(device)  # before the clock starts: importing it takes seconds, once
    started = time.perf_counter()
    gpu = device != "cpu"
    m, k, n = _GPU_MATMUL if gpu else _CPU_MATMUL
    threads = torch.get_num_threads()
    if not gpu:
        torch.set_num_threads(1)
    try:
        fp32 = _matmul_gflops(device, torch.float32, m, k, n)
        assert fp32 is not None  # fp32 computes everywhere
        bf16 = _matmul_gflops(device, torch.bfloat16, m, k, n)
        fp16 = _matmul_gflops(device, torch.float16, m, k, n) if gpu else None
        dequant, note = _dequant_rate(device, bnb)
    finally:
        torch.set_num_threads(threads)
    total, available = device_memory(device)
    return Capability(
        device=device,
        device_name=_device_name(device),
        cpu_model=cpu_model(),
        cpu_flags=sorted(cpu_flags() & RELEVANT_FLAGS),
        cpu_kernels=_cpu_kernels(),
        threads=threads,
        torch_version=torch.__version__,
        isa_env={k: os.environ[k] for k in ISA_ENV if k in os.environ},
        memory_bytes=total,
        memory_available_bytes=available,
        fp32_gflops=round(fp32, 2),
        bf16_gflops=None if bf16 is None else round(bf16, 2),
        fp16_gflops=None if fp16 is None else round(fp16, 2),
        dequant_4bit_gparams_per_second=None if dequant is None else round(dequant, 3),
        dequant_note=note,
        probe_seconds=round(time.perf_counter() - started, 3),
        measured_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    )


def _synchronizer(device: str) -> Callable[[], None]:
    import torch

    if device == "cuda":
        return torch.cuda.synchronize
    if device == "mps":
        return torch.mps.synchronize
    return lambda: None


def best_seconds(fn: Callable[[], Any], sync: Callable[[], None]) -> float:
    """The fastest of several timed calls after one warm-up call (which pays for kernel selection and JIT)."""
    fn()
    sync()
    times: list[float] = []
    spent = 0.0
    while True:
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
        spent += times[-1]
        if times[-1] > _SLOW_CALL_SECONDS or len(times) >= _MAX_CALLS:
            break
        if len(times) >= _MIN_CALLS and spent >= _BUDGET_SECONDS:
            break
    return max(min(times), 1e-9)


def _matmul_gflops(device: str, dtype: Any, m: int, k: int, n: int) -> float | None:
    import torch

    try:
        a = torch.randn(m, k, device=device).to(dtype)
        b = torch.randn(k, n, device=device).to(dtype)
        seconds = best_seconds(lambda: a @ b, _synchronizer(device))
    except (RuntimeError, TypeError, NotImplementedError):
        return None  # this dtype does not compute on this device
    return 2 * m * k * n / seconds / 1e9


def _import_bitsandbytes(device: str) -> tuple[Any, str | None]:
    """(bitsandbytes.functional, None), or (None, why it cannot be used on this device)."""
    if device == "mps":
        return None, "bitsandbytes 4-bit runs on CUDA and CPUs, not on mps"
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        return None, "bitsandbytes is not installed"
    try:
        import bitsandbytes.functional as bnb
    except Exception as exc:  # a broken native library raises anything
        return None, f"bitsandbytes does not load: {type(exc).__name__}: {_first_line(exc)}"
    return bnb, None


def _dequant_rate(device: str, imported: tuple[Any, str | None]) -> tuple[float | None, str | None]:
    """Billions of parameters per second that bitsandbytes dequantizes from NF4 (double quantization, as
    QLoRA stores them), or None and why where its 4-bit code does not run on this device."""
    bnb, why = imported
    if bnb is None:
        return None, why
    import torch

    try:
        weight = torch.randn(*_DEQUANT_SHAPE, device=device)
        packed, state = bnb.quantize_4bit(weight, quant_type="nf4", compress_statistics=True)
        seconds = best_seconds(lambda: bnb.dequantize_4bit(packed, state), _synchronizer(device))
    except Exception as exc:  # any failure of the library here means: no 4-bit on this device
        return None, f"bitsandbytes 4-bit does not run here: {type(exc).__name__}: {_first_line(exc)}"
    return weight.numel() / seconds / 1e9, None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


# ---------------------------------------------------------------- machine facts


def device_memory(device: str) -> tuple[int, int]:
    """(total, available) bytes: GPU memory on cuda; on mps the share of unified memory Metal allows;
    RAM for the CPU."""
    import psutil
    import torch

    if device == "cuda":
        free, total = torch.cuda.mem_get_info()
        return int(total), int(free)
    ram = psutil.virtual_memory()
    if device == "mps":
        recommended = getattr(torch.mps, "recommended_max_memory", None)
        total = int(recommended()) if recommended is not None else int(ram.total)
        return total, min(total, int(ram.available))
    return int(ram.total), int(ram.available)


def _device_name(device: str) -> str:
    import torch

    if device == "cuda":
        return str(torch.cuda.get_device_name(0))
    if device == "mps":
        return f"Apple GPU (mps), {cpu_model()}"
    return cpu_model()


def _cpu_kernels() -> str:
    import torch

    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except (AttributeError, RuntimeError):
        return "unknown"


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (Linux), else empty."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return {}
    info: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if info:
                break
            continue
        key, _, value = line.partition(":")
        info.setdefault(key.strip(), value.strip())
    return info


def cpu_model() -> str:
    info = _cpuinfo()
    for key in ("model name", "Model", "Hardware", "cpu model"):
        if info.get(key):
            return info[key]
    if platform.system() == "Darwin":
        try:
            out = subprocess.run(
                ["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True, timeout=5, check=False
            )
            if out.stdout.strip():
                return out.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine() or "unknown CPU"


def cpu_flags() -> set[str]:
    info = _cpuinfo()
    return set((info.get("flags") or info.get("Features") or "").split())
