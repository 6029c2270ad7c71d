"""Save what training changed (adapters, trained embeddings, or full weights), reload it onto its base,
and check the saved files before loading."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cptkit.artifacts import replace_dir
from cptkit.config import TrainingConfig
from cptkit.errors import CptkitError
from cptkit.model_folder import ADAPTER_CONFIG
from cptkit.models.files import check_adapter_files
from cptkit.models.for_training import embedding_params, load_base, load_errors, uses_bf16
from cptkit.models.resolve import SOURCE_FILE, remove_stale_temp_dirs
from cptkit.tokenization import cache_dir

if TYPE_CHECKING:
    import torch


# Trained embeddings of an adapter run live next to the adapter: peft saves only its own weights.
EMBEDDINGS_FILE = "embeddings.safetensors"


def save_trained(model: torch.nn.Module, out_dir: Path, weights: dict[str, Any] | None = None) -> None:
    """Save what training changed: the adapters (plus trained embeddings) of a peft model, or every
    weight of a fully trained one. The folder appears complete or not at all. `weights`: the model's
    trained weights by name, gathered from a sharded model (whose own parameters are shards), saved in
    the same files as an unsharded model's."""
    inner = _unwrap(model)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        given = {} if weights is None else {"state_dict": weights}
        if is_peft(inner):
            inner.save_pretrained(str(tmp), save_embedding_layers=False, **given)
            _save_embeddings(inner, tmp / EMBEDDINGS_FILE, weights)
        else:
            # The saved model is for inference: let it use the KV cache that training turned off.
            use_cache = inner.config.use_cache
            inner.config.use_cache = True
            try:
                inner.save_pretrained(str(tmp), **given)
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
    if not (trained_dir / ADAPTER_CONFIG).is_file():
        raise CptkitError(f"{trained_dir}: no adapter saved there (no adapter_config.json); was it trained with full?")
    check_adapter_files(trained_dir)
    from peft import PeftModel

    base = load_base(model_dir_base, training, device, bf16)
    if dequantize and training.method == "qlora":
        base = _dequantized(base, torch.bfloat16 if bf16 else torch.float32)
    _load_embeddings(base, trained_dir / EMBEDDINGS_FILE)
    with load_errors(trained_dir):
        model = PeftModel.from_pretrained(base, str(trained_dir), is_trainable=False)
    model.eval()
    return model


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
    remove_stale_temp_dirs(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        fp32 = training.model_copy(update={"method": "qlora", "precision": "fp32"})
        model = _dequantized(load_base(model_dir, fp32, torch.device("cpu"), bf16=False), torch.float32)
        model.config.use_cache = True
        model.save_pretrained(str(tmp))
        with load_errors(model_dir):
            AutoTokenizer.from_pretrained(str(model_dir)).save_pretrained(str(tmp))
        source = {"base": str(model_dir.resolve()), "quantization": "nf4, double quantization", "dtype": "float32"}
        (tmp / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n", encoding="utf-8")
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():  # another process wrote the same folder first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _save_embeddings(model: Any, path: Path, weights: dict[str, Any] | None = None) -> None:
    from safetensors.torch import save_file

    params = embedding_params(model)
    if not params[0].requires_grad:
        return
    if weights is not None:  # gathered by name: the parameters themselves are shards
        names = {id(p): n for n, p in model.named_parameters()}
        params = [weights[names[id(p)]] for p in params]
    tensors = {"input_embeddings": params[0].detach().cpu().contiguous()}
    if len(params) > 1:
        tensors["output_embeddings"] = params[1].detach().cpu().contiguous()
    save_file(tensors, str(path), metadata={"tied": str(len(params) == 1).lower()})


def _load_embeddings(model: Any, path: Path) -> None:
    from safetensors.torch import load_file

    if not path.is_file():
        return
    tensors = load_file(str(path))
    params = embedding_params(model)
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
