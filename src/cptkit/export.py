"""cptkit export: the trained model as a standalone model that other tools load as-is.

`hf` writes a Hugging Face folder (config, safetensors weights, tokenizer) that transformers and vLLM
load directly. `gguf` writes one GGUF file for llama.cpp. Either way an adapter is merged into its base
in float32 first (a qlora base as the dequantized 4-bit values it was trained on; never into 4-bit
weights), then cast to `register.export_dtype`. The written model is loaded back and its logits compared
with the model in memory and with the trained model, so a broken export is caught here.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cptkit.artifacts import atomic_dir, write_json_atomic
from cptkit.config import Config
from cptkit.errors import CptkitError, StageError
from cptkit.model_folder import ADAPTER_CONFIG, trained_training_config
from cptkit.models import is_peft, resolve_model
from cptkit.roundtrip import (
    ROUNDTRIP_TEXTS,
    load_float_model,
    max_abs_difference,
    reference_logits,
    roundtrip_difference,
)

FORMATS = ("hf", "gguf")
EXPORT_DIR = "export"
GGUF_FILE = "model.gguf"
MARKER = "cptkit_export.json"  # in every folder export writes; only such a folder is ever replaced
# GGUF writing is done here because no maintained library converts a transformers model in memory: the
# gguf package has the writer and the tensor-name tables, and llama.cpp's convert script is not
# installable. It writes what llama.cpp's convert_hf_to_gguf.py writes for these architectures (Mistral
# is llama.cpp's llama architecture), with byte-level BPE tokenizers (Llama 3, SmolLM, Qwen) or
# SentencePiece-style BPE ones (Llama 2, Mistral, Phi-3).
_GGUF_ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Phi3ForCausalLM": "phi3"}


@dataclass(frozen=True)
class ExportResult:
    format: str
    path: Path
    dtype: str
    bytes: int
    reload_max_diff: float  # weights loaded back vs the weights written (0 when the file is right)
    trained_max_diff: float  # the written model loaded back vs the trained model, float32
    notes: list[str] = field(default_factory=list)


def export(config: Config, fmt: str, output: Path | None = None) -> ExportResult:
    if fmt not in FORMATS:
        raise CptkitError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    cpt_dir = config.output_dir
    if not (cpt_dir / ADAPTER_CONFIG).is_file() and not (cpt_dir / "config.json").is_file():
        raise StageError(f"{cpt_dir}: no trained model there; run cptkit train first")
    target = output or cpt_dir / EXPORT_DIR / fmt
    if target.exists() and not (target / MARKER).is_file():
        # Replacing is only safe for a folder an earlier export wrote: anything else may be the user's.
        raise CptkitError(f"--output {target}: exists and was not written by cptkit export; choose a new path")
    training = trained_training_config(cpt_dir, config.training)
    base_dir = resolve_model(config.model.name)
    model, tokenizer = load_float_model(base_dir, cpt_dir, training)
    texts = list(ROUNDTRIP_TEXTS)
    trained = reference_logits(model, tokenizer, texts)
    if is_peft(model):
        model = model.merge_and_unload()
    model.config.use_cache = True
    if fmt == "hf":
        return _export_hf(model, tokenizer, target, config.register_.export_dtype, texts, trained)
    return _export_gguf(model, tokenizer, base_dir, target, config.register_.export_dtype, texts, trained)


def _export_hf(
    model: Any, tokenizer: Any, target: Path, dtype_name: str, texts: list[str], trained: Any
) -> ExportResult:
    import torch
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, dtype_name)
    model.to(dtype)
    with atomic_dir(target) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        write_json_atomic(tmp / MARKER, {"format": "hf", "dtype": dtype_name})
        reloaded = AutoModelForCausalLM.from_pretrained(str(tmp), dtype=dtype)
        weight_diff = _weight_difference(reloaded, model, half=False)
        trained_diff = _logit_difference(reloaded, tokenizer, texts, trained, target)
        size = sum(p.stat().st_size for p in tmp.iterdir() if p.is_file() and p.name != MARKER)
    return ExportResult("hf", target, dtype_name, size, weight_diff, trained_diff)


def _export_gguf(
    model: Any, tokenizer: Any, base_dir: Path, target: Path, dtype_name: str, texts: list[str], trained: Any
) -> ExportResult:
    import torch
    from transformers import AutoModelForCausalLM

    arch_name = (model.config.architectures or [type(model).__name__])[0]
    arch = _GGUF_ARCHITECTURES.get(arch_name)
    if arch is None:
        raise CptkitError(
            f"export --format gguf: {arch_name} is not supported by cptkit's GGUF writer (supported: "
            f"{', '.join(_GGUF_ARCHITECTURES)}); export --format hf and convert it with llama.cpp's "
            "convert_hf_to_gguf.py"
        )
    # 16-bit GGUF weights are float16 (what llama.cpp computes with); norms stay float32.
    half = dtype_name != "float32"
    with atomic_dir(target) as tmp:
        notes = _write_gguf(model, tokenizer, base_dir, tmp / GGUF_FILE, half, arch)
        write_json_atomic(tmp / MARKER, {"format": "gguf", "dtype": "float16" if half else "float32"})
        reloaded = AutoModelForCausalLM.from_pretrained(str(tmp), gguf_file=GGUF_FILE, dtype=torch.float32)
        weight_diff = _weight_difference(reloaded, model, half=half)
        trained_diff = _logit_difference(reloaded, tokenizer, texts, trained, target)
        size = (tmp / GGUF_FILE).stat().st_size
    dtype = "float16" if half else "float32"
    return ExportResult("gguf", target / GGUF_FILE, dtype, size, weight_diff, trained_diff, notes)


def _weight_difference(reloaded: Any, written: Any, half: bool) -> float:
    """The largest difference between the weights loaded back and those written (matrices rounded to
    float16 first where the file holds them so); anything but 0 means the file is not the model."""
    expected = written.state_dict()
    loaded = reloaded.state_dict()
    if set(expected) != set(loaded):
        missing = sorted(set(expected) ^ set(loaded))[:3]
        raise CptkitError(f"export is broken: loaded back, its tensors differ from the model's ({missing} ...)")
    worst = 0.0
    for name, tensor in expected.items():
        want = tensor.detach().float()
        if half and want.ndim > 1:
            want = want.half().float()
        worst = max(worst, max_abs_difference(loaded[name], want))
    if worst != 0.0:
        raise CptkitError(f"export is broken: loaded back, its weights differ from the model's by up to {worst:.3g}")
    return worst


def _logit_difference(reloaded: Any, tokenizer: Any, texts: list[str], trained: Any, target: Path) -> float:
    """How far the exported model, computed in float32, is from the trained model (the export precision's
    rounding, and the merge)."""
    import torch

    if reloaded.dtype != torch.float32:
        reloaded = reloaded.float()
    diff = roundtrip_difference(reloaded, tokenizer, texts, trained)
    if diff is None:
        raise CptkitError(f"export to {target} is broken: its tokenizer encodes text differently")
    return diff


def _write_gguf(model: Any, tokenizer: Any, base_dir: Path, path: Path, half: bool, arch: str) -> list[str]:
    import gguf
    import numpy as np

    cfg = model.config
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    writer = gguf.GGUFWriter(str(path), arch)
    name = Path(str(cfg.name_or_path)).name or "cptkit-model"
    # transformers reads a llama-architecture file whose name is exactly "mistral" as a model type that
    # gguf-py does not have, and fails to load it.
    writer.add_name("Mistral" if name == "mistral" else name)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    if head_dim * n_head != cfg.hidden_size:  # llama.cpp assumes hidden / heads unless told
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    rope_share = float(getattr(cfg, "partial_rotary_factor", None) or 1.0)
    writer.add_rope_dimension_count(int(rope_share * head_dim))
    writer.add_rope_freq_base(float(_rope_theta(cfg)))
    writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if half else gguf.LlamaFileType.ALL_F32)
    notes = _architecture_settings(writer, cfg, arch)
    notes += _add_tokenizer(writer, tokenizer, base_dir, cfg.vocab_size, getattr(cfg, "pad_token_id", None))

    model_arch = next(key for key, name in gguf.MODEL_ARCH_NAMES.items() if name == arch)
    names = gguf.get_tensor_name_map(model_arch, cfg.num_hidden_layers)
    state = model.state_dict()
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    for name, tensor in state.items():
        if tied and name == "lm_head.weight":
            continue  # llama.cpp reads a missing output.weight as tied to token_embd
        if "rotary_emb" in name:
            continue
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise CptkitError(f"export --format gguf: no GGUF name for tensor {name}")
        data = tensor.detach().float().cpu().numpy()
        # llama.cpp's llama architecture pairs adjacent dimensions in its rotary embedding; transformers
        # pairs the two halves (as llama.cpp's phi3 does: its q, k and v are one fused matrix, as is).
        if arch == "llama" and name.endswith("q_proj.weight"):
            data = _permute_for_rope(data, n_head, n_head)
        elif arch == "llama" and name.endswith("k_proj.weight"):
            data = _permute_for_rope(data, n_head, n_kv)
        data = data.astype(np.float16 if half and data.ndim > 1 else np.float32)
        writer.add_tensor(gguf_name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return notes


def _architecture_settings(writer: Any, cfg: Any, arch: str) -> list[str]:
    """What one architecture needs beyond the shared keys, as llama.cpp's converter writes it."""
    window = getattr(cfg, "sliding_window", None)
    if arch == "phi3":
        scaling = getattr(cfg, "rope_scaling", None) or {}
        if scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
            # Phi-3's 128k models scale rotary frequencies per dimension (rope_factors tensors): not written here.
            raise CptkitError(
                f"export --format gguf: Phi-3 with rope scaling {scaling.get('rope_type', scaling.get('type'))!r} "
                "is not supported by cptkit's GGUF writer; export --format hf and convert it with llama.cpp's "
                "convert_hf_to_gguf.py"
            )
        original = getattr(cfg, "original_max_position_embeddings", None) or cfg.max_position_embeddings
        writer.add_rope_scaling_orig_ctx_len(int(original))
        writer.add_sliding_window(int(window or 0))  # llama.cpp's phi3 attends within it, as transformers does
        return []
    if window is not None and window < cfg.max_position_embeddings:
        # As llama.cpp's converter does for Mistral: its llama architecture has no sliding window.
        return [
            f"llama.cpp's llama architecture attends to the whole context: beyond the model's sliding window of "
            f"{window:,} tokens it computes differently from transformers (within it, the same)"
        ]
    return []


def _add_tokenizer(writer: Any, tokenizer: Any, base_dir: Path, vocab_size: int, model_pad: int | None) -> list[str]:
    """The tokenizer as GGUF metadata: byte-level BPE (GPT-2 style: Llama 3, SmolLM, Qwen) as llama.cpp's
    "gpt2" model, SentencePiece-style BPE with byte fallback (Llama 2, Mistral, Phi-3) as its "llama" model."""
    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None)
    data = json.loads(backend.to_str()) if backend is not None else {}
    model_data = data.get("model") or {}
    byte_level = "ByteLevel" in json.dumps(data.get("pre_tokenizer"))
    sentencepiece = bool(model_data.get("byte_fallback")) and not byte_level
    if model_data.get("type") != "BPE" or not (byte_level or sentencepiece):
        raise CptkitError(
            "export --format gguf: only BPE tokenizers, byte-level (GPT-2 style: Llama 3, SmolLM, Qwen) or "
            "SentencePiece-style with byte fallback (Llama 2, Mistral, Phi-3), are supported; use --format hf "
            "and llama.cpp's convert_hf_to_gguf.py"
        )
    merges = [m if isinstance(m, str) else " ".join(m) for m in model_data.get("merges", [])]
    special = set(tokenizer.all_special_ids)
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for tid in range(vocab_size):
        token = tokenizer.convert_ids_to_tokens(tid) if tid < len(tokenizer) else None
        if token is None:
            tokens.append(f"[PAD{tid}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(token)
        if sentencepiece and tid == tokenizer.unk_token_id:
            types.append(gguf.TokenType.UNKNOWN)
        elif tid in special or (tid in added and added[tid].special):
            types.append(gguf.TokenType.CONTROL)
        elif tid in added:
            types.append(gguf.TokenType.USER_DEFINED)
        elif sentencepiece and _BYTE_TOKEN.fullmatch(token):
            types.append(gguf.TokenType.BYTE)
        else:
            types.append(gguf.TokenType.NORMAL)
    notes: list[str] = []
    if sentencepiece:
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_add_space_prefix(_prepends_space(data))
        writer.add_token_list(tokens)
        writer.add_token_scores(_merge_scores(tokens, merges))
    else:
        writer.add_tokenizer_model("gpt2")
        pre, notes = _pre_tokenizer(base_dir)
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    special_ids = {
        writer.add_bos_token_id: tokenizer.bos_token_id,
        writer.add_eos_token_id: tokenizer.eos_token_id,
        writer.add_unk_token_id: tokenizer.unk_token_id,
        # A model config's padding id where the tokenizer has none: readers that build the model from the
        # file (transformers' Phi-3) otherwise take a default id that may lie outside the vocabulary.
        writer.add_pad_token_id: tokenizer.pad_token_id if tokenizer.pad_token_id is not None else model_pad,
    }
    for add, tid in special_ids.items():
        if tid is not None:
            add(tid)
    writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        writer.add_chat_template(template)
    return notes


_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _merge_scores(tokens: list[str], merges: list[str]) -> list[float]:
    """SentencePiece scores for llama.cpp's "llama" tokenizer, which merges the adjacent pair whose joined
    piece scores highest: minus the rank of the first merge that makes each piece, so that it merges in
    the order of the BPE merges; 0 for pieces no merge makes (characters, bytes, special tokens)."""
    first: dict[str, int] = {}
    for rank, merge in enumerate(merges):
        left, _, right = merge.partition(" ")
        first.setdefault(left + right, rank)
    return [-float(first[t]) if t in first else 0.0 for t in tokens]


def _prepends_space(data: dict[str, Any]) -> bool:
    """Whether the tokenizer puts "▁" before the text (a Prepend normalizer, or Metaspace's prepend scheme)."""
    text = json.dumps([data.get("normalizer"), data.get("pre_tokenizer")])
    return '"Prepend"' in text or '"prepend_scheme": "first"' in text or '"prepend_scheme": "always"' in text


def _pre_tokenizer(base_dir: Path) -> tuple[str, list[str]]:
    """llama.cpp's name for the pre-tokenizer: taken from the GGUF file the base came from, when it did."""
    source = base_dir / "cptkit_source.json"
    if source.is_file():
        gguf_path = json.loads(source.read_text(encoding="utf-8")).get("gguf")
        if gguf_path and Path(gguf_path).is_file():
            import gguf

            field_ = gguf.GGUFReader(gguf_path).fields.get("tokenizer.ggml.pre")
            if field_ is not None:
                return str(field_.contents()), []
    return "default", ["tokenizer.ggml.pre is 'default': llama.cpp may split text before BPE differently"]


def _rope_theta(cfg: Any) -> float:
    params = getattr(cfg, "rope_parameters", None) or {}
    theta = params.get("rope_theta") or getattr(cfg, "rope_theta", None) or 10000.0
    return float(theta)


def _permute_for_rope(weights: Any, n_head: int, n_head_kv: int) -> Any:
    heads = n_head_kv if n_head != n_head_kv else n_head
    shape = weights.shape
    return weights.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)
