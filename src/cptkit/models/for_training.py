"""Load a base model for training (QLoRA, LoRA or full), with its trainable parameter groups, and describe
what will be trained and roughly what memory it takes."""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from cptkit.config import TrainingConfig
from cptkit.errors import CptkitError
from cptkit.memory import OPTIMIZER_BYTES, ModelShape, activation_bytes
from cptkit.models.files import check_model_files
from cptkit.models.text import first_line, human_size, short_count

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class ModelDescription:
    """What will be trained and a rough estimate of the memory it takes."""

    method: str
    trainable_params: int
    total_params: int
    saved_bytes: int  # what save_trained writes: trainable params times their element size
    weights_bytes: int  # frozen parameters and buffers as loaded (4-bit ones packed)
    optimizer_bytes: int  # trainable params x (weight + gradient + two AdamW moments), fp32
    activation_bytes: int
    logits_bytes: int

    @property
    def estimated_memory_bytes(self) -> int:
        return self.weights_bytes + self.optimizer_bytes + self.activation_bytes + self.logits_bytes

    def as_dict(self) -> dict[str, int | str]:
        return {
            "method": self.method,
            "trainable_params": self.trainable_params,
            "total_params": self.total_params,
            "saved_bytes": self.saved_bytes,
            "weights_bytes": self.weights_bytes,
            "optimizer_bytes": self.optimizer_bytes,
            "activation_bytes": self.activation_bytes,
            "logits_bytes": self.logits_bytes,
            "estimated_memory_bytes": self.estimated_memory_bytes,
        }

    def __str__(self) -> str:
        share = self.trainable_params / max(self.total_params, 1)
        return (
            f"{self.method}: {short_count(self.trainable_params)} trainable of "
            f"{short_count(self.total_params)} parameters "
            f"({share:.2%}), {human_size(self.saved_bytes)} saved; training memory about "
            f"{human_size(self.estimated_memory_bytes)} (weights {human_size(self.weights_bytes)}, optimizer "
            f"{human_size(self.optimizer_bytes)}, activations {human_size(self.activation_bytes)}, logits "
            f"{human_size(self.logits_bytes)})"
        )


@dataclass
class TrainableModel:
    model: torch.nn.Module  # a peft PeftModel for lora and qlora, the transformers model for full
    param_groups: list[dict[str, Any]]  # for torch.optim.AdamW: "main", then "embeddings" when trained
    description: ModelDescription


def load_for_training(
    model_dir: Path, training: TrainingConfig, device: torch.device | str, for_fsdp: bool = False
) -> TrainableModel:
    """Load a resolved model folder ready for `training.method`, with optimizer parameter groups;
    `for_fsdp`: to be sharded with FSDP (qlora's 4-bit weights are then stored in the compute dtype)."""
    import torch

    device = torch.device(device)
    if training.method != "full" and importlib.util.find_spec("peft") is None:
        raise CptkitError(f"training.method {training.method} needs peft: pip install peft (or use full)")
    bf16 = uses_bf16(training, device)
    model = load_base(model_dir, training, device, bf16, for_fsdp)
    # Not peft's prepare_model_for_kbit_training: it upcasts every 16-bit weight to float32, which makes
    # the residual stream float32 and costs a cast on both sides of every 4-bit layer (a tenth of a CPU
    # step) and twice the activation memory, for stability that bf16 autocast does not need.
    for param in model.parameters():
        param.requires_grad_(False)
    if training.gradient_checkpointing:
        # Non-reentrant checkpointing needs no input-gradient hook, even with a frozen embedding.
        if hasattr(model, "activation_checkpointing_enable"):  # transformers 5 name
            model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    if training.method == "full":
        for param in model.parameters():
            param.requires_grad_(True)
    else:
        model = _add_adapters(model, training)
    embeddings = embedding_params(model)
    for param in embeddings:
        # Tied input and output embeddings are one Parameter: training it keeps them tied. Trained
        # weights are kept in float32 so that small AdamW updates are not rounded away.
        if training.embeddings == "train":
            param.data = param.data.float()
        param.requires_grad_(training.embeddings == "train")

    description = describe(model, training, device)
    _check_fits(description, device)
    model.train()
    return TrainableModel(model, _param_groups(model, embeddings, training), description)


def uses_bf16(training: TrainingConfig, device: torch.device) -> bool:
    """Whether `training.precision` resolves to bf16 on this device (auto: where bf16 is measured fast;
    train and evaluate resolve auto before loading, this covers direct callers)."""
    if training.precision != "auto":
        return training.precision == "bf16"
    from cptkit.capability import probe
    from cptkit.choices import choose_precision

    return choose_precision(probe(device.type), "auto").value == "bf16"


# The frozen bases loaded inside `weights_held()`, by folder, dtype, device and attention: None outside.
_held: dict[tuple[str, ...], Any] | None = None


@contextlib.contextmanager
def weights_held() -> Iterator[None]:
    """Inside, LoRA loads of one base (with frozen embeddings) read it from disk once (cptkit tune's pilots
    each train and evaluate an adapter of it). Each later load is a fresh model of its own modules,
    buffers and config, so its own adapters and flags, whose weight tensors are the first load's: no copy
    of the weights either. Safe because they are frozen and nothing in training or evaluation writes
    into them in place: peft wraps the layers, and what replaces weights (trained embeddings) is left out,
    as are QLoRA's 4-bit layers (their quantization state is not plain tensors) and full training."""
    global _held
    outer, _held = _held, {}
    try:
        yield
    finally:
        _held = outer


def _sharing_weights(model: Any) -> Any:
    """A deep copy of `model` whose parameters hold the same tensors: new Parameter objects (so one
    model's `requires_grad_` or `.data =` stays its own), a tied pair still one Parameter."""
    import copy

    import torch

    memo: dict[int, Any] = {
        id(p): torch.nn.Parameter(p.data, requires_grad=p.requires_grad) for p in model.parameters()
    }
    return copy.deepcopy(model, memo)


def load_base(
    model_dir: Path, training: TrainingConfig, device: torch.device, bf16: bool, for_fsdp: bool = False
) -> Any:
    """The base model as `training.method` trains it: 4-bit NF4 for qlora, bf16 frozen weights for
    adapters when bf16 computes, float32 otherwise; KV cache off (packed blocks need that). `for_fsdp`:
    qlora's packed 4-bit values are stored as tensors of the compute dtype, as FSDP needs to shard them
    with the layer's other weights (the same bits: the values computed are unchanged)."""
    import torch
    from transformers import AutoModelForCausalLM

    if not (model_dir / "config.json").is_file():
        raise CptkitError(f"{model_dir}: not a model folder (no config.json)")
    check_model_files(model_dir)
    # Adapter methods keep the frozen base in bfloat16 where bf16 is the compute precision (the adapters
    # themselves are float32: peft upcasts them); full training keeps float32 master weights.
    dtype = torch.bfloat16 if bf16 and training.method != "full" else torch.float32
    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": attention_implementation(device, dtype)}
    if training.method == "qlora":
        if importlib.util.find_spec("bitsandbytes") is None:
            raise CptkitError("training.method qlora needs bitsandbytes: pip install bitsandbytes (or use lora)")
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(  # type: ignore[no-untyped-call]
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if bf16 else torch.float32,
            **({"bnb_4bit_quant_storage": torch.bfloat16 if bf16 else torch.float32} if for_fsdp else {}),
        )
        kwargs["device_map"] = {"": device}
    held = _held if training.method == "lora" and training.embeddings != "train" else None
    key = (str(model_dir.resolve()), str(dtype), str(device), kwargs["attn_implementation"])
    if held is not None and key in held:
        return _sharing_weights(held[key])
    with load_errors(model_dir):
        model: Any = AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs)
        if training.method != "qlora":
            model.to(device)
    if training.method == "qlora":
        _no_cpu_inference_packing(model)
    # Packed blocks come with position ids that restart per document and no attention mask; transformers
    # keeps attention inside each document under SDPA only then, and with no KV cache.
    model.config.use_cache = False
    if held is not None:
        held[key] = _sharing_weights(model)  # as loaded: `model` itself gets adapters and flags
    return model


def attention_implementation(device: torch.device, dtype: torch.dtype) -> str:
    """flash-attention on a GPU where the flash-attn package is installed and weights are 16-bit: transformers
    derives each packed document's boundaries from the restarting position ids and runs its varlen kernel,
    so no attention is computed across documents at all. Elsewhere SDPA, with a block-diagonal mask built
    from the same position ids; on a CPU in query chunks that skip most of the masked triangle
    (cptkit.attention)."""
    import torch

    if (
        device.type == "cuda"
        and dtype in (torch.bfloat16, torch.float16)
        and importlib.util.find_spec("flash_attn") is not None
    ):
        return "flash_attention_2"
    if device.type == "cpu":
        from cptkit.attention import register

        return register()
    return "sdpa"


def _no_cpu_inference_packing(model: Any) -> None:
    """Keep bitsandbytes 4-bit layers on their differentiable path. On a CPU with AVX512-BF16, the first
    eval-mode forward repacks a layer's weights for an inference kernel that has no autograd, and the
    layer stays packed: training after an evaluation would get wrong gradients, and evaluation would
    compute differently from training."""
    from bitsandbytes.nn.modules import Linear4bit

    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.support_avx512bf16_for_cpu = False


@contextlib.contextmanager
def load_errors(model_dir: Path) -> Iterator[None]:
    import torch

    try:
        yield
    except torch.OutOfMemoryError:
        raise CptkitError(f"out of memory loading {model_dir}; use training.method qlora or a smaller model") from None
    except RuntimeError as exc:
        if "can't allocate memory" in str(exc) or "out of memory" in str(exc):
            raise CptkitError(
                f"out of memory loading {model_dir}; use training.method qlora or a smaller model"
            ) from None
        raise
    except (OSError, ValueError, KeyError, ImportError) as exc:
        raise CptkitError(f"cannot load the model in {model_dir}: {first_line(exc)}") from None


def _add_adapters(model: Any, training: TrainingConfig) -> Any:
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    lora = training.lora
    target = lora.target_modules if isinstance(lora.target_modules, str) else list(lora.target_modules)
    config = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,  # type: ignore[arg-type]  # annotated int, used as a number
        lora_dropout=lora.dropout,
        target_modules=target,
        use_rslora=lora.use_rslora,
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, config)
    except ValueError as exc:
        raise CptkitError(f"training.lora.target_modules: {first_line(exc)}") from None


def embedding_params(model: Any) -> list[Any]:
    """The input embedding and LM head weights, once each (tied ones are one Parameter)."""
    params = [model.get_input_embeddings().weight]
    output = model.get_output_embeddings()
    if output is not None and output.weight is not params[0]:
        params.append(output.weight)
    return params


def _param_groups(model: Any, embeddings: list[Any], training: TrainingConfig) -> list[dict[str, Any]]:
    embedding_ids = {id(p) for p in embeddings}
    main = [p for p in model.parameters() if p.requires_grad and id(p) not in embedding_ids]
    groups: list[dict[str, Any]] = [
        {"name": "main", "params": main, "lr": training.learning_rate, "weight_decay": training.weight_decay}
    ]
    if training.embeddings == "train":
        lr = training.embedding_rate
        groups.append({"name": "embeddings", "params": embeddings, "lr": lr, "weight_decay": training.weight_decay})
    return groups


def describe(model: torch.nn.Module, training: TrainingConfig, device: torch.device | str = "cpu") -> ModelDescription:
    """Parameter counts and an estimate of the memory that training `model` this way takes."""
    import torch

    from cptkit.loss import loss_memory_bytes

    trainable = total = saved = frozen_bytes = 0
    for param in model.parameters():
        count = _logical_numel(param)
        total += count
        if param.requires_grad:
            trainable += count
            saved += param.numel() * param.element_size()
        else:
            frozen_bytes += _stored_bytes(param)
    frozen_bytes += sum(b.numel() * b.element_size() for b in model.buffers())

    text = cast(Any, model).config.get_text_config()
    tokens = training.micro_batch_size * training.max_seq_length
    half = training.precision == "fp16" or uses_bf16(training, torch.device(device))
    activations = activation_bytes(
        tokens, text.hidden_size, text.num_hidden_layers, training.gradient_checkpointing, 2 if half else 4
    )
    return ModelDescription(
        method=training.method,
        trainable_params=trainable,
        total_params=total,
        saved_bytes=saved,
        weights_bytes=frozen_bytes,
        optimizer_bytes=trainable * OPTIMIZER_BYTES,
        activation_bytes=activations,
        logits_bytes=loss_memory_bytes(tokens, text.vocab_size),
    )


def model_shape(model_dir: Path, training: TrainingConfig) -> ModelShape:
    """The parameter counts and sizes of the model in `model_dir`, read from its config: the model is
    built on the meta device (no weights, no memory), so this takes well under a second even for 7B."""
    from transformers import AutoConfig

    with load_errors(model_dir):
        config = AutoConfig.from_pretrained(str(model_dir))
    return shape_of(config, training)


def shape_of(config: Any, training: TrainingConfig) -> ModelShape:
    """The shape of the model a transformers config describes, for `training.lora`'s adapters."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]
    except (ValueError, KeyError) as exc:
        raise CptkitError(f"cannot build the model its config describes: {first_line(exc)}") from None
    output = model.get_output_embeddings()
    head = output.weight if output is not None else None
    embeddings = {id(p): p.numel() for p in (model.get_input_embeddings().weight, head) if p is not None}
    targets = training.lora.target_modules
    quantizable = adapters = 0
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or module is output:
            continue
        quantizable += module.weight.numel()
        short = name.rsplit(".", 1)[-1]
        if targets == "all-linear" or short in targets or name in targets:
            adapters += training.lora.r * (module.in_features + module.out_features)
    text = config.get_text_config()
    return ModelShape(
        params=sum(p.numel() for p in model.parameters()),
        quantizable_params=quantizable,
        adapter_params=adapters,
        embedding_params=sum(embeddings.values()),
        hidden_size=int(text.hidden_size),
        layers=int(text.num_hidden_layers),
        vocab_size=int(text.vocab_size),
    )


def _logical_numel(param: Any) -> int:
    """Parameters a tensor stands for: a bitsandbytes 4-bit weight packs two in each byte."""
    state = getattr(param, "quant_state", None)
    if state is not None and getattr(state, "shape", None) is not None:
        count = 1
        for dim in state.shape:
            count *= int(dim)
        return count
    return int(param.numel())


def _stored_bytes(param: Any) -> int:
    size = int(param.numel() * param.element_size())
    state = getattr(param, "quant_state", None)
    while state is not None:  # block scales, themselves quantized with double quantization
        absmax = getattr(state, "absmax", None)
        if absmax is not None:
            size += int(absmax.numel() * absmax.element_size())
        state = getattr(state, "state2", None)
    return size


def _check_fits(description: ModelDescription, device: torch.device) -> None:
    available = _device_memory(device)
    need = description.estimated_memory_bytes
    if available is not None and need > available:
        raise CptkitError(
            f"training needs about {human_size(need)} ({description}) but {device} has {human_size(available)}; lower "
            "training.micro_batch_size or training.max_seq_length, set training.gradient_checkpointing=true, "
            "or use training.method qlora"
        )


def _device_memory(device: torch.device) -> int | None:
    import torch

    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    if device.type == "cpu":
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            return None
    return None
