"""Base models: resolve a model name to a local Hugging Face folder, load it for training (QLoRA, LoRA or
full), and save and reload what training changed.

Every model reaches training as a plain safetensors folder: hub ids are downloaded, and a .gguf file (or
the embedded `smollm2-135m`) is dequantized once into a cached float32 copy that bitsandbytes can
quantize like any other checkpoint. torch, transformers, peft and bitsandbytes are imported inside the
functions, so importing this package is cheap.

The package: `resolve` (names to local folders, GGUF conversion), `for_training` (loading for QLoRA, LoRA
or full, the description and memory estimate), `saved` (save and reload what training changed), `files`
(checks of a folder's files), `text` (sizes and counts as text). Everything is importable from
`cptkit.models`.
"""

from __future__ import annotations

from cptkit.models.files import check_adapter_files, check_model_files
from cptkit.models.for_training import (
    ModelDescription,
    TrainableModel,
    attention_implementation,
    describe,
    load_base,
    load_for_training,
    model_shape,
    shape_of,
    uses_bf16,
    weights_held,
)
from cptkit.models.resolve import gguf_cache_path, resolve_model
from cptkit.models.saved import EMBEDDINGS_FILE, dequantized_base_dir, is_peft, load_trained, save_trained
from cptkit.models.text import human_size

__all__ = [
    "EMBEDDINGS_FILE",
    "ModelDescription",
    "TrainableModel",
    "attention_implementation",
    "check_adapter_files",
    "check_model_files",
    "dequantized_base_dir",
    "describe",
    "gguf_cache_path",
    "human_size",
    "is_peft",
    "load_base",
    "load_for_training",
    "load_trained",
    "model_shape",
    "resolve_model",
    "save_trained",
    "shape_of",
    "uses_bf16",
    "weights_held",
]
