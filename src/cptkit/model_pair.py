"""The base and the adapted model side by side: loading them the way training did, and greedy
completions of fixed prompts by both.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cptkit.base_scores import BaseIdentity, read_arrays, token_bytes, write_arrays
from cptkit.config import (
    GenerationConfig,
    TrainingConfig,
)
from cptkit.errors import CptkitError
from cptkit.eval_sets import DOMAIN, GENERAL
from cptkit.model_folder import ADAPTER_CONFIG, trained_training_config
from cptkit.models import EMBEDDINGS_FILE
from cptkit.results import Generation, PairDescription
from cptkit.scoring import ModelRunner, TextTokenizer, adapter_disabled, fixed, text_tokenizer


@dataclass
class ModelPair:
    """The base and the adapted model, ready to score."""

    base_runner: ModelRunner
    cpt_runner: ModelRunner
    base_tokenizer: TextTokenizer
    cpt_tokenizer: TextTokenizer
    cpt_model: Any
    description: PairDescription

    def base_identity(self, precision: str, device: Any) -> BaseIdentity:
        """What the base's outputs here depend on besides their input: the key of its cached results."""
        import torch

        d = self.description
        scored_as = f"{d.base_scored_as}; {d.quantization}"
        return BaseIdentity(d.base_model_path, scored_as, precision, torch.device(device).type)


def load_pair(base_name: str, cpt_dir: Path, training: TrainingConfig, precision: str, device: Any) -> ModelPair:
    """Load the adapted model and its base. A peft adapter's base is the same weights with the adapter
    disabled (one copy in memory); a full model, or an adapter with trained embeddings (which the adapter
    switch does not undo), gets its base loaded separately, the way training loaded it."""
    import torch
    from transformers import AutoTokenizer

    from cptkit.models import load_base, load_trained, resolve_model

    if not cpt_dir.is_dir():
        raise CptkitError(f"{cpt_dir}: no such folder; train first (cptkit train) or pass --cpt-model")
    if not ((cpt_dir / ADAPTER_CONFIG).is_file() or (cpt_dir / "config.json").is_file()):
        raise CptkitError(f"{cpt_dir}: no trained model there (neither adapter_config.json nor config.json)")
    device = torch.device(device)
    trained = trained_training_config(cpt_dir, training).model_copy(update={"precision": precision})
    base_dir = resolve_model(base_name)
    cpt = load_trained(base_dir, cpt_dir, trained, device)
    is_adapter = (cpt_dir / ADAPTER_CONFIG).is_file()
    shared = is_adapter and not (cpt_dir / EMBEDDINGS_FILE).is_file()
    if shared:
        base_runner = adapter_disabled(cpt)
    else:
        # Loaded as the adapted model's base was (4-bit for qlora, 16-bit frozen weights for a bf16 lora,
        # float32 for full), so that the two differ by what training changed and not by precision.
        base = load_base(base_dir, trained, device, precision == "bf16")
        base.eval()
        base_runner = fixed(base)
    cpt_tok_dir = cpt_dir if (cpt_dir / "tokenizer_config.json").is_file() else base_dir
    try:
        base_tok = AutoTokenizer.from_pretrained(str(base_dir))
        cpt_tok = AutoTokenizer.from_pretrained(str(cpt_tok_dir))
    except (OSError, ValueError) as exc:
        raise CptkitError(f"cannot load a tokenizer for evaluation: {str(exc).splitlines()[0]}") from None
    description = PairDescription(
        base_model=base_name,
        base_model_path=str(base_dir),
        cpt_model=str(cpt_dir),
        method=trained.method,
        base_scored_as="the adapted model with its adapter disabled" if shared else "a separately loaded copy",
        quantization="4-bit NF4 base, as trained" if trained.method == "qlora" else "none",
    )
    return ModelPair(base_runner, fixed(cpt), text_tokenizer(base_tok), text_tokenizer(cpt_tok), cpt, description)


def generate(pair: ModelPair, gc: GenerationConfig, device: Any, base: BaseIdentity | None = None) -> list[Generation]:
    """Completions of the fixed prompts by both models, with the same decoding settings (seeded, so
    sampled ones repeat too). With `base` (evaluate.base_score_cache), the base's completions are read
    from the cache, or generated and cached: they are the same for every adapter of that base."""
    import torch
    from transformers import GenerationConfig as HfGenerationConfig

    if gc.max_new_tokens == 0:
        return []
    prompts = [(DOMAIN, p) for p in gc.domain_prompts] + [(GENERAL, p) for p in gc.general_prompts]
    key, cached = None, None
    if base is not None:
        decoding = gc.model_dump(mode="json", exclude={"domain_prompts", "general_prompts"})
        key = base.key("generations", decoding, token_bytes(pair.base_tokenizer.encode([p for _, p in prompts])))
        arrays = read_arrays(key)
        cached = [str(t) for t in arrays["base"]] if arrays is not None else None
    out = []
    for index, (kind, prompt) in enumerate(prompts):
        completions = {}
        for name, runner, tok in (
            ("base", pair.base_runner, pair.base_tokenizer),
            ("cpt", pair.cpt_runner, pair.cpt_tokenizer),
        ):
            if name == "base" and cached is not None:
                completions[name] = cached[index]
                continue
            ids = torch.from_numpy(tok.encode([prompt])[0][None, :]).to(device)
            settings = HfGenerationConfig(  # type: ignore[no-untyped-call]
                max_new_tokens=gc.max_new_tokens,
                do_sample=not gc.greedy,
                temperature=gc.temperature if not gc.greedy else None,
                top_p=gc.top_p if not gc.greedy else None,
                top_k=None,
                pad_token_id=tok.prefix_id if tok.prefix_id is not None else tok.tokenizer.eos_token_id,
                eos_token_id=tok.tokenizer.eos_token_id,
                use_cache=True,  # loading turned the model's cache off (packed training needs that)
            )
            torch.manual_seed(gc.seed)
            with torch.inference_mode(), runner() as model:
                generated = model.generate(
                    input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=settings
                )
            completions[name] = _completion(tok.tokenizer, ids[0], generated[0])
        out.append(Generation(kind=kind, prompt=prompt, **completions))
    if key is not None and cached is None:
        write_arrays(key, {"base": np.asarray([g.base for g in out], dtype=str)})
    return out


def _completion(tokenizer: Any, prompt_ids: Any, generated_ids: Any) -> str:
    """The generated text after the prompt. Decoding the new tokens alone can drop the space that starts
    them (SentencePiece decoders of Llama, Mistral and Phi-3 drop a sequence's leading space), so the
    whole sequence is decoded and the decoded prompt cut off."""
    whole = tokenizer.decode(generated_ids, skip_special_tokens=True)
    prompt = tokenizer.decode(prompt_ids, skip_special_tokens=True)
    if whole.startswith(prompt):
        return str(whole[len(prompt) :])
    return str(tokenizer.decode(generated_ids[len(prompt_ids) :], skip_special_tokens=True))
