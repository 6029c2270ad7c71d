"""The published shapes of base models cptkit knows by name: their config.json values, as the model
authors published them on the Hugging Face hub. The dry run estimates training memory from these where
a model's weights are not downloaded (offline, or not yet fetched): a transformers config built from
them gives exact parameter counts without any weights."""

from __future__ import annotations

from typing import Any

# mistralai/Mistral-7B-v0.1, config.json.
MISTRAL_7B_V01: dict[str, Any] = {
    "architectures": ["MistralForCausalLM"],
    "model_type": "mistral",
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 32768,
    "sliding_window": 4096,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
}

# microsoft/Phi-3-mini-4k-instruct, config.json (the seed's base model).
PHI3_MINI_4K: dict[str, Any] = {
    "architectures": ["Phi3ForCausalLM"],
    "model_type": "phi3",
    "vocab_size": 32064,
    "hidden_size": 3072,
    "intermediate_size": 8192,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "max_position_embeddings": 4096,
    "original_max_position_embeddings": 4096,
    "sliding_window": 2047,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "hidden_act": "silu",
    "bos_token_id": 1,
    "eos_token_id": 32000,
    "pad_token_id": 32000,
    "tie_word_embeddings": False,
}

# Hub ids, lowercased: the hub matches ids case-insensitively (the seed writes microsoft/phi-3-mini-...).
KNOWN_MODELS: dict[str, dict[str, Any]] = {
    "mistralai/mistral-7b-v0.1": MISTRAL_7B_V01,
    "microsoft/phi-3-mini-4k-instruct": PHI3_MINI_4K,
}


def published_config(name: str) -> dict[str, Any] | None:
    """The published config.json values of the hub model `name`, when cptkit knows them."""
    known = KNOWN_MODELS.get(name.strip().lower())
    return dict(known) if known is not None else None


def config_from(values: dict[str, Any]) -> Any:
    """A transformers config of the model type these config.json values name."""
    from transformers import AutoConfig

    values = dict(values)
    return AutoConfig.for_model(values.pop("model_type"), **values)
