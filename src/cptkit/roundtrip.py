"""The round-trip check that register and export share: the trained model's logits on fixed inputs are
the reference, and a copy (the registered model loaded back, an exported folder) must reproduce them."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cptkit.config import TrainingConfig
from cptkit.errors import CptkitError
from cptkit.models import is_peft, load_trained

# Fixed inputs of the round-trip check: prose, code and numbers, so that every part of the vocabulary
# the domain is likely to use is exercised. The config's domain prompts are added to them.
ROUNDTRIP_TEXTS = (
    "The committee published its annual report on the state of the nation's rivers in March.",
    "def mean(values):\n    return sum(values) / len(values)\n",
    "In 1969, 600 million people watched the first Moon landing; 53 years later, 12 people had walked there.",
)


def load_float_model(base_dir: Path, cpt_dir: Path, training: TrainingConfig) -> tuple[Any, Any]:
    """The trained model in float32 on the CPU, with the KV cache on (it is for inference now). A qlora
    base is the dequantized 4-bit weights: the function that was trained and evaluated, not the float
    base it was quantized from."""
    from transformers import AutoTokenizer

    float_training = training.model_copy(update={"precision": "fp32"})
    model = load_trained(base_dir, cpt_dir, float_training, "cpu", dequantize=True)
    inner_model(model).config.use_cache = True
    tokenizer_dir = cpt_dir if (cpt_dir / "tokenizer_config.json").is_file() else base_dir
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    except (OSError, ValueError) as exc:
        raise CptkitError(f"{tokenizer_dir}: cannot load the tokenizer: {str(exc).splitlines()[0]}") from None
    return model, tokenizer


def reference_logits(model: Any, tokenizer: Any, texts: Sequence[str]) -> list[tuple[list[int], Any]]:
    """Token ids and float32 logits of each text, scored alone (no padding to get wrong)."""
    import torch

    out = []
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, return_tensors="pt")["input_ids"]
            logits = model(input_ids=ids, use_cache=False).logits.float()
            out.append((ids[0].tolist(), logits[0]))
    return out


def roundtrip_difference(model: Any, tokenizer: Any, texts: Sequence[str], reference: Sequence[Any]) -> float | None:
    """The largest absolute logit difference between `model` and the reference over the fixed inputs;
    None when the tokenizer does not encode them to the same ids."""
    loaded = reference_logits(model.eval(), tokenizer, texts)
    worst = 0.0
    for (ids, logits), (ref_ids, ref_logits) in zip(loaded, reference, strict=True):
        if ids != ref_ids or logits.shape != ref_logits.shape:
            return None
        worst = max(worst, max_abs_difference(logits, ref_logits))
    return worst


def max_abs_difference(a: Any, b: Any) -> float:
    """The largest absolute difference of two tensors; infinite when either holds a NaN or an infinity
    (a NaN would otherwise vanish from a max and pass every check)."""
    diff = (a.float() - b.float()).abs()
    if not bool(diff.isfinite().all()):
        return float("inf")
    return float(diff.max()) if diff.numel() else 0.0


def inner_model(model: Any) -> Any:
    return model.get_base_model() if is_peft(model) else model
