"""The dry run for a model whose weights are not here: a hub model that is not downloaded (offline, gated,
or not fetched yet) and that cptkit knows by name (known_models), or a local folder that holds its
config.json but no weights. Training memory is estimated from the model's shape alone, as `training.method:
auto` does, and what could not be checked without the weights is said plainly: the real preflight loads
the model, tokenizes the data and times steps, and none of that can happen here."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from cptkit.config import Config
from cptkit.errors import CptkitError
from cptkit.known_models import config_from, published_config
from cptkit.memory import ModelShape, memory_parts
from cptkit.models.text import first_line

# auto precision on a GPU is bf16 or fp16: both keep 16-bit activations, so the estimate is the same.
_SIXTEEN_BIT = "bf16"


@dataclass(frozen=True)
class ShapePlan:
    """The dry run's answer without the model's weights: memory from the shape, and what went unchecked."""

    model: str
    weights_absent: str  # why the weights could not be used, one line
    shape_from: str  # where the shape was read: cptkit's table of published configs, or a local config.json
    method: str
    precision: str
    tokens_per_micro_batch: int
    gradient_checkpointing: bool
    shape: ModelShape
    memory: dict[str, int]  # part -> bytes, for `method`
    other_methods: dict[str, int] = field(default_factory=dict)  # method -> total bytes, for comparison
    checked: list[str] = field(default_factory=list)
    unchecked: list[str] = field(default_factory=list)

    @property
    def memory_bytes(self) -> int:
        return sum(self.memory.values())

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["memory_bytes"] = self.memory_bytes
        return data


def shape_plan(config: Config) -> ShapePlan | None:
    """The shape-only plan when the model's weights are not here and its shape is known; None when the
    weights are here (the full preflight applies). Raises the reason the model cannot be used when its
    shape is not known either."""
    from cptkit.models import check_model_files, resolve_model

    name = config.model.name
    try:
        model_dir = resolve_model(name)
    except CptkitError as exc:
        values = published_config(name)
        if values is None:
            raise CptkitError(
                f"{exc}; the dry run can estimate memory without the weights only for a model whose shape it "
                "knows (microsoft/phi-3-mini-4k-instruct, mistralai/Mistral-7B-v0.1) or a local folder with "
                "its config.json"
            ) from None
        return _plan(config, values, f"the published config.json of {name} (cptkit.known_models)", first_line(exc))
    try:
        check_model_files(model_dir)
    except CptkitError as exc:
        if any(model_dir.glob("*.safetensors")) or (model_dir / "model.safetensors.index.json").is_file():
            raise  # weights that are there but damaged are an error, not an absence
        values = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
        return _plan(config, values, str(model_dir / "config.json"), first_line(exc))
    return None


def _plan(config: Config, values: dict[str, Any], shape_from: str, absent: str) -> ShapePlan:
    from cptkit.models import shape_of

    if "model_type" not in values:
        raise CptkitError(f"{shape_from}: no model_type; cannot tell the model's architecture")
    try:
        model_config = config_from(values)
    except (ValueError, KeyError, TypeError) as exc:
        raise CptkitError(f"{shape_from}: {first_line(exc)}") from None
    tc = config.training
    checked = []
    limit = getattr(model_config, "max_position_embeddings", None)
    if limit is not None:
        if tc.max_seq_length > limit:
            raise CptkitError(
                f"training.max_seq_length {tc.max_seq_length} is above the {limit} positions {config.model.name} "
                f"was trained for (max_position_embeddings); set training.max_seq_length <= {limit}"
            )
        checked.append(f"training.max_seq_length {tc.max_seq_length} <= the model's {limit} positions")
    shape = shape_of(model_config, tc)
    if tc.method != "full" and shape.adapter_params == 0:
        raise CptkitError(
            f"training.lora.target_modules {tc.lora.target_modules} matches no linear layer of {config.model.name}"
        )
    if tc.method != "full":
        checked.append(f"training.lora.target_modules adapt {shape.adapter_params:,} parameters")
    precision = _SIXTEEN_BIT if tc.precision == "auto" else tc.precision
    tokens = tc.micro_batch_size * tc.max_seq_length
    embeddings = tc.embeddings == "train"
    methods = ("qlora", "lora") if tc.method == "auto" else (tc.method,)
    totals = {
        m: sum(memory_parts(shape, m, precision, tokens, tc.gradient_checkpointing, embeddings).values())
        for m in ("qlora", "lora", "full")
    }
    # auto takes LoRA where it fits with a margin; without the device, the cheaper method is the estimate.
    method = min(methods, key=lambda m: totals[m])
    memory = memory_parts(shape, method, precision, tokens, tc.gradient_checkpointing, embeddings)
    unchecked = [
        f"the weights ({absent}): the model is not loaded, so no training step is timed and the peak memory "
        "is not measured; the memory is an estimate from the shape",
        "the data: without the model the dry run stops here, so the data is not counted or tokenized "
        f"({config.model.tokenizer_name}'s tokenizer), and the step plan, replay mix and duration are not worked out",
        "the device: whether the estimate fits is for the GPU the run will use (cptkit doctor there)",
    ]
    return ShapePlan(
        model=config.model.name,
        weights_absent=absent,
        shape_from=shape_from,
        method=method,
        precision=precision if tc.precision != "auto" else "auto (16-bit on a GPU)",
        tokens_per_micro_batch=tokens,
        gradient_checkpointing=tc.gradient_checkpointing,
        shape=shape,
        memory=memory,
        other_methods={m: b for m, b in totals.items() if m != method},
        checked=checked,
        unchecked=unchecked,
    )
