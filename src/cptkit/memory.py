"""Training memory, estimated and measured. The estimate comes from a model's shape alone (no weights
loaded), so that `training.method: auto` can compare methods before loading anything. The peak of a
stretch of work is measured the same way by training and by the preflight of `cptkit run`, so that the
estimate and the real run can be compared: the process's resident memory on a CPU, the memory torch
allocated on a GPU."""

from __future__ import annotations

import resource
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# Activation memory per token, hidden unit and layer, in values. Korthikanti et al. (2022) count 34
# bytes of 16-bit activations (17 values) for a plain transformer layer; LoRA keeps its inputs and the
# 4-bit layers their dequantization buffers besides, and QLoRA of a Phi-3-mini-sized model at 1x2048
# tokens measured about 25 on a GPU (docs/benchmarks.md).
ACTIVATION_VALUES = 25
OPTIMIZER_BYTES = 16  # per trainable parameter: fp32 weight, gradient and two AdamW moments
# NF4 with double quantization: half a byte per weight, one 8-bit scale per 64 weights, and one fp32
# scale per 256 of those.
_NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)


def activation_bytes(tokens: int, hidden: int, layers: int, checkpointing: bool, value_bytes: int) -> int:
    """Activations kept for the backward pass of one micro batch."""
    if checkpointing:  # each layer's input is kept; one layer's activations are recomputed at a time
        return tokens * hidden * (layers + ACTIVATION_VALUES) * value_bytes
    return tokens * hidden * layers * ACTIVATION_VALUES * value_bytes


@dataclass(frozen=True)
class ModelShape:
    """What the memory of training a model depends on, read from its config without its weights."""

    params: int  # all parameters, tied ones once
    quantizable_params: int  # in the linear layers that QLoRA stores in 4 bits (all but the LM head)
    adapter_params: int  # the LoRA parameters training.lora adds
    embedding_params: int  # input embedding and LM head, once when tied
    hidden_size: int
    layers: int
    vocab_size: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def estimated_memory(
    shape: ModelShape,
    method: str,
    precision: str,
    tokens: int,
    checkpointing: bool = False,
    train_embeddings: bool = False,
) -> int:
    """Bytes that training takes: the sum of `memory_parts`."""
    return sum(memory_parts(shape, method, precision, tokens, checkpointing, train_embeddings).values())


def memory_parts(
    shape: ModelShape,
    method: str,
    precision: str,
    tokens: int,
    checkpointing: bool = False,
    train_embeddings: bool = False,
) -> dict[str, int]:
    """Bytes of each part of training memory: frozen weights (4-bit for qlora; bf16 for adapter methods
    computing in bf16, as models.load_base loads them; else fp32), the optimizer's fp32 state of what is
    trained, activations and the loss. The same parts as models.describe, from the shape alone."""
    from cptkit.loss import loss_memory_bytes

    frozen_bytes = 2 if precision == "bf16" and method != "full" else 4
    if method == "full":  # every weight but the embeddings, unless they are trained too
        embeddings = 0 if train_embeddings else shape.embedding_params
        trainable, frozen = shape.params - embeddings, float(embeddings * frozen_bytes)
    else:
        embeddings = shape.embedding_params if train_embeddings else 0
        trainable = shape.adapter_params + embeddings
        rest = shape.params - embeddings
        if method == "qlora":
            quantized = min(shape.quantizable_params, rest)
            frozen = quantized * _NF4_BYTES_PER_PARAM + (rest - quantized) * frozen_bytes
        else:
            frozen = rest * frozen_bytes
    value_bytes = 2 if precision in ("bf16", "fp16") else 4
    return {
        "weights": round(frozen),
        "optimizer": trainable * OPTIMIZER_BYTES,
        "activations": activation_bytes(tokens, shape.hidden_size, shape.layers, checkpointing, value_bytes),
        "loss": loss_memory_bytes(tokens, shape.vocab_size),
    }


_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


class PeakMemory:
    """`reset()` starts a measurement; `peak_bytes()` is the highest usage since then."""

    def __init__(self, device: Any) -> None:
        self.cuda = getattr(device, "type", str(device)) == "cuda"
        self.kind = "GPU memory allocated" if self.cuda else "process RSS"
        self._resettable = True

    def reset(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return
        # Linux keeps the RSS high-water mark (VmHWM) per process; writing 5 to clear_refs resets it to the
        # current RSS (so an outer `/usr/bin/time -v` then also reports the peak from here on, which for a
        # process that trains is the training's). Elsewhere the peak can only be read since the process started.
        try:
            _CLEAR_REFS.write_text("5")
        except OSError:
            self._resettable = False
            self.kind = "process RSS since start"

    def peak_bytes(self) -> int:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            return int(torch.cuda.max_memory_allocated())
        if self._resettable:
            for line in _STATUS.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB on Linux
