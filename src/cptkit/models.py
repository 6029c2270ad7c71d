"""Base models: resolve a model name to a local Hugging Face folder, load it for training (QLoRA, LoRA or
full), and save and reload what training changed.

Every model reaches training as a plain safetensors folder: hub ids are downloaded, and a .gguf file (or
the embedded `smollm2-135m`) is dequantized once into a cached float32 copy that bitsandbytes can
quantize like any other checkpoint. torch, transformers, peft and bitsandbytes are imported inside the
functions, so importing this module is cheap.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from cptkit.artifacts import replace_dir
from cptkit.config import TrainingConfig
from cptkit.errors import CptkitError
from cptkit.memory import OPTIMIZER_BYTES, ModelShape, activation_bytes
from cptkit.tokenization import SMOLLM2, cache_dir, smollm2_gguf

if TYPE_CHECKING:
    import torch

# Bump when the conversion changes, so that older cached copies are not reused.
_GGUF_CONVERTER_VERSION = 1
_SOURCE_FILE = "cptkit_source.json"
# What a training run needs from a hub repository: config, weights, tokenizer; never pickles or code.
_HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.tiktoken", "merges.txt", "vocab.txt"]
# Some repositories also carry the original (non-transformers) weights; training never reads them.
_HUB_SKIP = ["consolidated*", "original/*"]
_HUB_HINT = "set model.name to a local model folder or a .gguf file"
# Trained embeddings of an adapter run live next to the adapter: peft saves only its own weights.
EMBEDDINGS_FILE = "embeddings.safetensors"
_STALE_TEMP_SECONDS = 3600


# ---------------------------------------------------------------- resolve


def resolve_model(name: str) -> Path:
    """A local Hugging Face model folder (config.json, safetensors weights, tokenizer files) for a
    local folder, a .gguf file, `smollm2-135m`, or a hub id."""
    if name == SMOLLM2:
        return _converted_gguf(smollm2_gguf())
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CptkitError(f"model.name: {name} is a folder without config.json; is it a Hugging Face model folder?")
        return path.resolve()
    if path.is_file():
        if path.suffix != ".gguf":
            raise CptkitError(
                f"model.name: {name} is a file but not a .gguf model; give a model folder or a .gguf file"
            )
        return _converted_gguf(path)
    if name.endswith(".gguf") or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise CptkitError(f"model.name: {name}: no such file or directory")
    return _download(name)


def _download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (
            GatedRepoError,
            HfHubHTTPError,
            HFValidationError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError:
        raise CptkitError("downloading from the hub needs huggingface_hub: pip install huggingface_hub") from None
    try:
        folder = Path(str(snapshot_download(repo_id, allow_patterns=_HUB_FILES, ignore_patterns=_HUB_SKIP)))
    except HFValidationError:
        raise CptkitError(
            f"model.name: '{repo_id}' is neither an existing local path nor a hub id (owner/name)"
        ) from None
    except GatedRepoError:
        raise CptkitError(
            f"model '{repo_id}' is gated: accept its terms on huggingface.co and log in (hf auth login or "
            f"HF_TOKEN), or {_HUB_HINT}"
        ) from None
    except RepositoryNotFoundError:
        raise CptkitError(
            f"model '{repo_id}' was not found on the Hugging Face hub (or is private: log in with hf auth login "
            f"or HF_TOKEN), and there is no local folder of that name; {_HUB_HINT}"
        ) from None
    except RevisionNotFoundError:
        raise CptkitError(f"model '{repo_id}': revision not found on the hub; {_HUB_HINT}") from None
    except LocalEntryNotFoundError:
        raise CptkitError(
            f"cannot download model '{repo_id}': the hub is unreachable (offline?) and it is not in the local "
            f"hub cache; {_HUB_HINT}"
        ) from None
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        reason = "not authorized (log in with hf auth login or HF_TOKEN)" if status in (401, 403) else f"HTTP {status}"
        raise CptkitError(f"cannot download model '{repo_id}': {reason}; {_HUB_HINT}") from None
    except OSError as exc:
        raise CptkitError(f"cannot download model '{repo_id}' ({_first_line(exc)}); {_HUB_HINT}") from None
    if not (folder / "config.json").is_file():
        raise CptkitError(f"model '{repo_id}' on the hub has no config.json; is it a transformers model?")
    if not any(folder.glob("*.safetensors")):
        raise CptkitError(
            f"model '{repo_id}' on the hub has no safetensors weights (cptkit does not load pickled .bin files); "
            f"{_HUB_HINT}"
        )
    return folder


def gguf_cache_path(gguf: Path) -> Path:
    """Where the float copy of a .gguf file is cached: keyed by its path, size and modification time."""
    st = gguf.stat()
    stamp = f"gguf-v{_GGUF_CONVERTER_VERSION}:{gguf.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    key = hashlib.sha256(stamp.encode()).hexdigest()[:16]
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", gguf.stem)[:60]
    return cache_dir() / "models" / f"{stem}-{key}"


def _converted_gguf(gguf: Path) -> Path:
    target = gguf_cache_path(gguf)
    # The folder is renamed into place complete, so its presence means a finished conversion.
    if (target / "config.json").is_file():
        return target
    _convert_gguf(gguf, target)
    return target


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantize a GGUF file into a float32 safetensors folder with its tokenizer.

    float32 because dequantized values (an integer times a float16 scale plus a float16 offset) need
    more mantissa than bfloat16 has: a float32 copy is exact, and QLoRA re-quantizes from exact values.
    """
    if importlib.util.find_spec("gguf") is None:
        raise CptkitError("loading a .gguf model needs the gguf package: pip install gguf")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temp_dirs(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        with _gguf_errors(gguf):
            loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        # A model loaded from GGUF carries a gguf quantization config and refuses save_pretrained; a
        # model built from its config without that, holding the same tensors, saves as a plain checkpoint.
        # Built on the meta device and given the loaded tensors, so memory holds one copy of the weights.
        config = copy.deepcopy(loaded.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # type: ignore[no-untyped-call]
        model.load_state_dict(loaded.state_dict(), strict=True, assign=True)
        model.tie_weights()
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        st = gguf.stat()
        source = {"gguf": str(gguf.resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "dtype": "float32"}
        (tmp / _SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n", encoding="utf-8")
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():  # else another process finished the same conversion first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _gguf_errors(gguf: Path) -> Iterator[None]:
    try:
        yield
    except (ValueError, NotImplementedError, KeyError, OSError, ImportError) as exc:
        first = _first_line(exc)
        hint = ""
        if "not supported" in first or "Unknown gguf model_type" in first:
            hint = "; transformers converts GGUF files of common architectures only (llama, mistral, qwen2, phi3, ...)"
        raise CptkitError(f"cannot convert {gguf} to a trainable model: {first}{hint}") from None


def _remove_stale_temp_dirs(target: Path) -> None:
    """Remove what conversions killed long ago left behind (a live one keeps its folder recent)."""
    cutoff = time.time() - _STALE_TEMP_SECONDS
    for stale in target.parent.glob(f".{target.name}.*.tmp"):
        with contextlib.suppress(OSError):
            if stale.stat().st_mtime < cutoff:
                shutil.rmtree(stale, ignore_errors=True)


# ---------------------------------------------------------------- load for training


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
            f"{self.method}: {_count(self.trainable_params)} trainable of {_count(self.total_params)} parameters "
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


def load_for_training(model_dir: Path, training: TrainingConfig, device: torch.device | str) -> TrainableModel:
    """Load a resolved model folder ready for `training.method`, with optimizer parameter groups."""
    import torch

    device = torch.device(device)
    if training.method != "full" and importlib.util.find_spec("peft") is None:
        raise CptkitError(f"training.method {training.method} needs peft: pip install peft (or use full)")
    bf16 = uses_bf16(training, device)
    model = load_base(model_dir, training, device, bf16)
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
    embeddings = _embedding_params(model)
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


def load_base(model_dir: Path, training: TrainingConfig, device: torch.device, bf16: bool) -> Any:
    """The base model as `training.method` trains it: 4-bit NF4 for qlora, bf16 frozen weights for
    adapters when bf16 computes, float32 otherwise; KV cache off (packed blocks need that)."""
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
        )
        kwargs["device_map"] = {"": device}
    with _load_errors(model_dir):
        model: Any = AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs)
        if training.method != "qlora":
            model.to(device)
    if training.method == "qlora":
        _no_cpu_inference_packing(model)
    # Packed blocks come with position ids that restart per document and no attention mask; transformers
    # keeps attention inside each document under SDPA only then, and with no KV cache.
    model.config.use_cache = False
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
def _load_errors(model_dir: Path) -> Iterator[None]:
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
        raise CptkitError(f"cannot load the model in {model_dir}: {_first_line(exc)}") from None


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
        raise CptkitError(f"training.lora.target_modules: {_first_line(exc)}") from None


def _embedding_params(model: Any) -> list[Any]:
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
        lr = training.embedding_learning_rate or training.learning_rate / 10
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
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with _load_errors(model_dir):
        config = AutoConfig.from_pretrained(str(model_dir))
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]
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


# ---------------------------------------------------------------- save and reload


def save_trained(model: torch.nn.Module, out_dir: Path) -> None:
    """Save what training changed: the adapters (plus trained embeddings) of a peft model, or every
    weight of a fully trained one. The folder appears complete or not at all."""
    inner = _unwrap(model)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        if is_peft(inner):
            inner.save_pretrained(str(tmp), save_embedding_layers=False)
            _save_embeddings(inner, tmp / EMBEDDINGS_FILE)
        else:
            # The saved model is for inference: let it use the KV cache that training turned off.
            use_cache = inner.config.use_cache
            inner.config.use_cache = True
            try:
                inner.save_pretrained(str(tmp))
            finally:
                inner.config.use_cache = use_cache
        replace_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_trained(
    model_dir_base: Path,
    trained_dir: Path,
    training: TrainingConfig,
    device: torch.device | str = "cpu",
    dequantize: bool = False,
) -> torch.nn.Module:
    """The model `save_trained` saved, in eval mode: the base loaded as for training (4-bit for qlora)
    with the adapters and trained embeddings applied, or the fully trained weights. `dequantize` gives a
    qlora model's base as float weights holding exactly the 4-bit values the adapters were trained on."""
    import torch

    device = torch.device(device)
    bf16 = uses_bf16(training, device)
    if training.method == "full":
        if not (trained_dir / "config.json").is_file():
            raise CptkitError(f"{trained_dir}: no full model saved there (no config.json); was it trained with lora?")
        model = load_base(trained_dir, training, device, bf16)
        model.eval()
        return model  # type: ignore[no-any-return]
    if not (trained_dir / "adapter_config.json").is_file():
        raise CptkitError(f"{trained_dir}: no adapter saved there (no adapter_config.json); was it trained with full?")
    check_adapter_files(trained_dir)
    from peft import PeftModel

    base = load_base(model_dir_base, training, device, bf16)
    if dequantize and training.method == "qlora":
        base = _dequantized(base, torch.bfloat16 if bf16 else torch.float32)
    _load_embeddings(base, trained_dir / EMBEDDINGS_FILE)
    with _load_errors(trained_dir):
        model = PeftModel.from_pretrained(base, str(trained_dir), is_trainable=False)
    model.eval()
    return model


# ---------------------------------------------------------------- checking saved files
# Loaders report a missing or damaged file in their own terms: peft takes a folder without adapter weights
# for a hub id ("Repo id must be in the form..."), safetensors says "invalid header length" without naming
# the file. These checks read only the JSON files and the safetensors headers, so they cost nothing.

_WEIGHTS_INDEX = "model.safetensors.index.json"
_ADAPTER_CONFIG = "adapter_config.json"
_ADAPTER_WEIGHTS = "adapter_model.safetensors"


def check_model_files(folder: Path) -> None:
    """A model folder's config.json and every safetensors weights file it has (or its index lists) are
    present and readable; a folder of pickled weights only (pytorch_model.bin) is left to transformers."""
    _check_json(folder / "config.json")
    weights = sorted(folder.glob("*.safetensors"))
    index = folder / _WEIGHTS_INDEX
    if index.is_file():
        weight_map = _check_json(index).get("weight_map")
        listed = sorted(set(weight_map.values())) if isinstance(weight_map, dict) else []
        for name in listed:
            if not (folder / name).is_file():
                raise CptkitError(f"{folder / name}: model weights missing (listed in {index.name})")
        weights = [folder / name for name in listed] or weights
    if not weights:
        if any(folder.glob("pytorch_model*.bin")):
            return
        raise CptkitError(f"{folder}: model weights missing (no *.safetensors file next to config.json)")
    for path in weights:
        _check_safetensors(path)


def check_adapter_files(folder: Path) -> None:
    """What `save_trained` writes for an adapter run is present and readable: the adapter config, its
    weights, and the trained embeddings when there are any."""
    _check_json(folder / _ADAPTER_CONFIG)
    weights = folder / _ADAPTER_WEIGHTS
    if not weights.is_file():
        raise CptkitError(
            f"{weights}: adapter weights missing ({_ADAPTER_CONFIG} is there; train again, or restore it)"
        )
    _check_safetensors(weights)
    if (folder / EMBEDDINGS_FILE).is_file():
        _check_safetensors(folder / EMBEDDINGS_FILE)


def _check_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CptkitError(f"{path}: missing") from None
    except OSError as exc:
        raise CptkitError(f"{path}: cannot be read ({exc.strerror or type(exc).__name__})") from None
    except ValueError as exc:  # not JSON, or not UTF-8
        raise CptkitError(f"{path}: not valid JSON ({_first_line(exc)}); the file is damaged") from None
    if not isinstance(data, dict):
        raise CptkitError(f"{path}: not valid JSON (expected an object, found {type(data).__name__})")
    return data


def _check_safetensors(path: Path) -> None:
    from safetensors import SafetensorError, safe_open

    try:
        # Opening parses the header and checks that the file is as long as the header says.
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except SafetensorError as exc:
        reason = _first_line(exc).removeprefix("Error while deserializing header: ")
        raise CptkitError(
            f"{path}: not a valid safetensors file ({reason}); the file is damaged or was cut short"
        ) from None
    except OSError as exc:
        raise CptkitError(f"{path}: cannot be read ({exc.strerror or type(exc).__name__})") from None


def _dequantized(model: Any, dtype: torch.dtype) -> Any:
    """A 4-bit model turned back into float weights: each weight is its NF4 value times its scale, so the
    float model computes what the 4-bit one does, without bitsandbytes."""
    model = model.dequantize()
    model.to(dtype)
    model.config.use_cache = False
    return model


def dequantized_base_dir(model_dir: Path, training: TrainingConfig) -> Path:
    """A float32 model folder (weights and tokenizer) holding the 4-bit-quantized values of the base in
    `model_dir`, as qlora quantized it: what a qlora adapter was trained on. Written once into the cache,
    keyed by the base folder's weights, and renamed into place complete."""
    import torch

    weights = sorted(model_dir.glob("*.safetensors"))
    stamp = f"nf4-dq-v1:{model_dir.resolve()}:" + ":".join(
        f"{w.name}:{w.stat().st_size}:{w.stat().st_mtime_ns}" for w in weights
    )
    key = hashlib.sha256(stamp.encode()).hexdigest()[:16]
    target = cache_dir() / "models" / f"{model_dir.name[:60]}-nf4-dequantized-{key}"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temp_dirs(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        fp32 = training.model_copy(update={"method": "qlora", "precision": "fp32"})
        model = _dequantized(load_base(model_dir, fp32, torch.device("cpu"), bf16=False), torch.float32)
        model.config.use_cache = True
        model.save_pretrained(str(tmp))
        with _load_errors(model_dir):
            AutoTokenizer.from_pretrained(str(model_dir)).save_pretrained(str(tmp))
        source = {"base": str(model_dir.resolve()), "quantization": "nf4, double quantization", "dtype": "float32"}
        (tmp / _SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n", encoding="utf-8")
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():  # another process wrote the same folder first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _save_embeddings(model: Any, path: Path) -> None:
    from safetensors.torch import save_file

    params = _embedding_params(model)
    if not params[0].requires_grad:
        return
    tensors = {"input_embeddings": params[0].detach().cpu().contiguous()}
    if len(params) > 1:
        tensors["output_embeddings"] = params[1].detach().cpu().contiguous()
    save_file(tensors, str(path), metadata={"tied": str(len(params) == 1).lower()})


def _load_embeddings(model: Any, path: Path) -> None:
    from safetensors.torch import load_file

    if not path.is_file():
        return
    tensors = load_file(str(path))
    params = _embedding_params(model)
    if ("output_embeddings" in tensors) != (len(params) > 1):
        raise CptkitError(f"{path}: saved embeddings do not match the base model's (tied vs untied)")
    # Replace the data rather than copy into it: the trained weights are float32 and a 16-bit base
    # would round them. A tied pair is one Parameter, so it stays tied.
    params[0].data = tensors["input_embeddings"].to(params[0].device)
    if len(params) > 1:
        params[1].data = tensors["output_embeddings"].to(params[1].device)


def _unwrap(model: Any) -> Any:
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def is_peft(model: Any) -> bool:
    if importlib.util.find_spec("peft") is None:
        return False
    from peft import PeftModel

    return isinstance(model, PeftModel)


# ---------------------------------------------------------------- formatting


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


def human_size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"
