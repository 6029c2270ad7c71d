"""What `auto` means on this machine: the device, the compute precision and the training method, each a
pure function of the measured capability (`cptkit.capability`) and the model's shape, returning the
choice and a one-line reason. Explicit settings are kept; one that is slow here carries a warning with
the measured cost.

- device: cuda, else mps (Apple silicon), else the CPU; 4-bit QLoRA runs on CUDA and CPUs only, so an
  explicit qlora never goes to mps.
- precision: bf16 where its measured matmul rate is at least fp32's (never emulated bf16); on a GPU
  without fast bf16, fp16 where that is fast; else fp32.
- method: LoRA on a 16/32-bit base when it fits the device's memory with a margin and is no slower
  than QLoRA here (the 4-bit layers add a dequantization per pass); QLoRA when memory requires it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cptkit.capability import Capability
from cptkit.config import TrainingConfig
from cptkit.memory import ModelShape, estimated_memory

# bf16 (or fp16) counts as fast where its matmul rate is at least fp32's: CPUs with AVX512-BF16 or AMX
# run it 2-10x faster, GPUs 2-20x; emulated bf16 is 30-100x slower, so no noise can blur the line.
FAST_RATIO = 1.0
# A method fits when its estimated training memory is at most this share of the device's memory: the
# estimate is rough, and the rest of the process (data, libraries, the OS on a CPU) needs room too.
MEMORY_MARGIN = 0.8
# accelerate's mixed_precision value for each precision.
MIXED_PRECISION = {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}
_MEMORY_KIND = {"cuda": "GPU memory", "mps": "unified memory", "cpu": "RAM"}


@dataclass(frozen=True)
class Choice:
    value: str
    reason: str
    warning: str | None = None  # an explicit setting that is slow here, with the measured cost

    def line(self, what: str) -> str:
        return f"{what} {self.value}: {self.reason}"


# ---------------------------------------------------------------- device


def choose_device(present: Sequence[str], method: str = "auto") -> Choice:
    """cuda > mps > cpu among the devices present; an explicit qlora skips mps (no 4-bit kernels there)."""
    if "cuda" in present:
        return Choice("cuda", "a CUDA GPU is present")
    if "mps" in present:
        if method == "qlora":
            return Choice(
                "cpu",
                "training.method qlora: bitsandbytes 4-bit runs on CUDA and CPUs, not on Apple's mps, so the "
                "CPU trains (method auto or lora would use mps)",
                warning="training.method qlora on a Mac trains on the CPU; set training.method auto or lora to "
                "use the Apple GPU (mps)",
            )
        return Choice("mps", "an Apple GPU (mps) is present")
    return Choice("cpu", "no CUDA or mps device is present")


# ---------------------------------------------------------------- precision


def _rate(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.1f}"


def is_fast(rate: float | None, fp32: float) -> bool:
    return rate is not None and rate >= FAST_RATIO * fp32


def choose_precision(cap: Capability, requested: str = "auto", key: str = "training.precision") -> Choice:
    """The compute precision for `requested` (auto, bf16, fp16, fp32) on the measured device; `key` names
    the setting in messages."""
    where = f"{cap.device} ({cap.device_name})"
    bf16 = f"bf16 {_rate(cap.bf16_gflops)} vs fp32 {_rate(cap.fp32_gflops)} GFLOP/s measured"
    if requested != "auto":
        warning = None
        if requested == "bf16" and not is_fast(cap.bf16_gflops, cap.fp32_gflops):
            warning = (
                f"{key} bf16 is slow on this {where}: {bf16}"
                + (f" ({cap.fp32_gflops / cap.bf16_gflops:,.0f}x slower)" if cap.bf16_gflops else "")
                + "; precision auto would use "
                + choose_precision(cap, "auto", key).value
            )
        elif requested == "fp16" and cap.device == "cpu":
            warning = f"{key} fp16 on a CPU: torch has no fast fp16 CPU training; precision auto would use " + (
                choose_precision(cap, "auto", key).value
            )
        elif requested == "fp16" and not is_fast(cap.fp16_gflops, cap.fp32_gflops):
            warning = (
                f"{key} fp16 is slow on this {where}: fp16 {_rate(cap.fp16_gflops)} vs fp32 "
                f"{_rate(cap.fp32_gflops)} GFLOP/s measured"
            )
        return Choice(requested, f"set in {key}", warning)
    if is_fast(cap.bf16_gflops, cap.fp32_gflops):
        return Choice("bf16", f"bf16 is fast here: {bf16}")
    if cap.device != "cpu" and is_fast(cap.fp16_gflops, cap.fp32_gflops):
        return Choice("fp16", f"no fast bf16 on this GPU ({bf16}); fp16 {_rate(cap.fp16_gflops)} GFLOP/s")
    slow = "slower than fp32" if cap.bf16_gflops is not None else "not supported"
    hint = " (emulated: this CPU lacks AVX512-BF16 and AMX, or torch does not use them)" if cap.device == "cpu" else ""
    return Choice("fp32", f"bf16 is {slow} here{hint}: {bf16}")


def choose_eval_precision(cap: Capability, requested: str = "auto") -> Choice:
    """Evaluation computes in bf16 or fp32: auto is bf16 where it is fast, else fp32."""
    choice = choose_precision(cap, requested, "evaluate.precision")
    if requested == "auto" and choice.value == "fp16":
        return Choice("fp32", "no fast bf16 here (evaluation scores in bf16 or fp32): " + choice.reason)
    return choice


# ---------------------------------------------------------------- method


def step_seconds(cap: Capability, shape: ModelShape, method: str, precision: str, tokens: int, passes: int) -> float:
    """A rough time of one micro batch from the measured rates: the frozen weights' matmuls (forward and
    input gradients, 4 x params x tokens FLOPs) plus, for qlora, one dequantization of the 4-bit
    weights per pass (forward, backward, and the recomputation under gradient checkpointing)."""
    rate = {"bf16": cap.bf16_gflops, "fp16": cap.fp16_gflops}.get(precision) or cap.fp32_gflops
    seconds = 4 * shape.params * tokens / (rate * 1e9)
    if method == "qlora" and cap.dequant_4bit_gparams_per_second:
        seconds += passes * shape.quantizable_params / (cap.dequant_4bit_gparams_per_second * 1e9)
    return seconds


def method_memory(shape: ModelShape, training: TrainingConfig, method: str, precision: str) -> int:
    return estimated_memory(
        shape,
        method,
        precision,
        training.micro_batch_size * training.max_seq_length,
        training.gradient_checkpointing,
        training.embeddings == "train",
    )


def choose_method(cap: Capability, shape: ModelShape | None, training: TrainingConfig, precision: str) -> Choice:
    """training.method, or for auto LoRA where it fits with a margin and is no slower than QLoRA, else QLoRA."""
    if training.method != "auto":
        return Choice(training.method, "set in training.method")
    assert shape is not None, "method auto needs the model's shape"
    from cptkit.models import human_size

    memory = cap.memory_bytes
    room = f"{human_size(memory)} of {_MEMORY_KIND.get(cap.device, 'memory')}"
    lora = method_memory(shape, training, "lora", precision)
    qlora = method_memory(shape, training, "qlora", precision)
    fits = lora <= MEMORY_MARGIN * memory
    if cap.dequant_4bit_gparams_per_second is None:
        why = cap.dequant_note or "bitsandbytes 4-bit does not run here"
        fit = "fits" if fits else "may not fit"
        return Choice("lora", f"QLoRA cannot run here ({why}); LoRA needs about {human_size(lora)}, {fit} in {room}")
    tokens = training.micro_batch_size * training.max_seq_length
    passes = 3 if training.gradient_checkpointing else 2
    lora_s = step_seconds(cap, shape, "lora", precision, tokens, passes)
    qlora_s = step_seconds(cap, shape, "qlora", precision, tokens, passes)
    if fits and lora_s <= qlora_s:
        return Choice(
            "lora",
            f"LoRA on a {precision_dtype(precision)} base needs about {human_size(lora)}, within "
            f"{MEMORY_MARGIN:.0%} of {room}, and is no slower than QLoRA here (4-bit dequantization would add "
            f"about {qlora_s / lora_s - 1:.1%} to each step; QLoRA would need about {human_size(qlora)})",
        )
    if fits:
        return Choice("qlora", f"QLoRA is faster here ({qlora_s:.3g} vs {lora_s:.3g} s per micro batch estimated)")
    fit = "fits" if qlora <= MEMORY_MARGIN * memory else "is still above that; training will check"
    return Choice(
        "qlora",
        f"LoRA on a {precision_dtype(precision)} base needs about {human_size(lora)}, more than "
        f"{MEMORY_MARGIN:.0%} of {room}; QLoRA's 4-bit base needs about {human_size(qlora)} and {fit}",
    )


def precision_dtype(precision: str) -> str:
    """The frozen base's dtype for adapter training at this precision (models.load_base)."""
    return "bf16" if precision == "bf16" else "fp32"


# ---------------------------------------------------------------- together


@dataclass(frozen=True)
class TrainingChoices:
    """Device, precision and method for a training run, with the record they were chosen from."""

    device: Choice
    precision: Choice
    method: Choice
    capability: Capability
    shape: ModelShape | None = None
    memory_estimates: dict[str, int] = field(default_factory=dict)  # method -> bytes, when auto compared them

    @property
    def mixed_precision(self) -> str:
        return MIXED_PRECISION[self.precision.value]

    @property
    def warnings(self) -> list[str]:
        return [c.warning for c in (self.device, self.precision, self.method) if c.warning]

    def apply(self, training: TrainingConfig) -> TrainingConfig:
        """The training section with auto replaced by what was chosen."""
        return training.model_copy(update={"method": self.method.value, "precision": self.precision.value})

    def lines(self) -> list[str]:
        return [self.device.line("device"), self.precision.line("precision"), self.method.line("method")]

    def params(self) -> dict[str, str]:
        """For MLflow: the choices and their reasons."""
        out = {}
        for what in ("device", "precision", "method"):
            choice: Choice = getattr(self, what)
            out[f"chosen.{what}"] = choice.value
            out[f"chosen.{what}_reason"] = choice.reason
        return out

    def as_dict(self) -> dict[str, Any]:
        return {
            "device": asdict(self.device),
            "precision": asdict(self.precision),
            "method": asdict(self.method),
            "capability": self.capability.as_dict(),
            "shape": self.shape.as_dict() if self.shape else None,
            "memory_estimates": self.memory_estimates,
        }


def decide_training(
    training: TrainingConfig, cap: Capability, device: Choice, shape: ModelShape | None
) -> TrainingChoices:
    """The choices for `training` on the measured device (pure: everything measured is passed in)."""
    precision = choose_precision(cap, training.precision, "training.precision")
    method = choose_method(cap, shape, training, precision.value)
    estimates = {}
    if shape is not None:
        estimates = {m: method_memory(shape, training, m, precision.value) for m in ("lora", "qlora")}
    return TrainingChoices(device, precision, method, cap, shape, estimates)


def resolve_training(
    training: TrainingConfig, model_dir: Path, present: Sequence[str] | None = None
) -> TrainingChoices:
    """Probe the device training would use (cached) and decide; the model's shape is read only for
    method auto."""
    from cptkit.capability import available_devices, probe
    from cptkit.models import model_shape

    device = choose_device(available_devices() if present is None else present, training.method)
    cap = probe(device.value)
    shape = model_shape(model_dir, training) if training.method == "auto" else None
    return decide_training(training, cap, device, shape)
