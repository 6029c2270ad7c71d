"""One base in memory for many adapters (cptkit tune's pilots): loaded from disk once, its weight tensors
shared by models that are otherwise each their own, and a pilot's numbers the same as with a fresh load."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest

from conftest import count_calls
from test_tune import tune_config


def loads(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The calls that read a model from disk."""
    import transformers

    return count_calls(monkeypatch, transformers.AutoModelForCausalLM, "from_pretrained")


def test_held_weights_are_read_once_and_shared_by_models_of_their_own(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    from cptkit.config import TrainingConfig
    from cptkit.models import load_base, load_for_training, weights_held

    lora = TrainingConfig(method="lora", precision="fp32")
    calls = loads(monkeypatch)
    cpu = torch.device("cpu")
    with weights_held():
        first = load_for_training(tiny_model_dir, lora, cpu).model  # peft wraps its layers
        second = load_base(tiny_model_dir, lora, cpu, False)
        third = load_for_training(tiny_model_dir, lora, cpu).model
    assert len(calls) == 1
    # The same tensors under other Parameter objects: no copy of the weights, no shared flags.
    name = "model.layers.0.self_attn.q_proj.weight"
    held = dict(second.named_parameters())[name]
    wrapped = dict(first.named_parameters())["base_model.model." + name.replace(".weight", ".base_layer.weight")]
    assert held.data_ptr() == wrapped.data_ptr() and held is not wrapped
    # The second model is the base as loaded: no adapters of the first or the third, its own config.
    assert not any("lora" in n for n, _ in second.named_parameters())
    assert sum("lora_A" in n for n, _ in third.named_parameters()) == sum(
        "lora_A" in n for n, _ in first.named_parameters()
    )
    second.config.use_cache = True
    assert first.base_model.model.config.use_cache is False
    # Tied embeddings stay one Parameter in the copy.
    if second.config.tie_word_embeddings:
        assert second.get_input_embeddings().weight is second.get_output_embeddings().weight
    # Outside the context, and for full training inside it, every load reads the disk.
    calls.clear()
    load_base(tiny_model_dir, lora, cpu, False)
    with weights_held():
        for _ in range(2):
            load_base(tiny_model_dir, TrainingConfig(method="full", precision="fp32"), cpu, False)
            load_base(tiny_model_dir, TrainingConfig(method="lora", precision="fp32", embeddings="train"), cpu, False)
    assert len(calls) == 5


def test_a_pilot_on_held_weights_measures_what_it_measures_on_a_fresh_load(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two pilots trained and evaluated on one held base (the second after the first's adapters were
    trained on the same tensors) give the numbers the second gives alone, and the held weights are still
    those on disk."""
    import torch

    import cptkit.tune as tune_module
    from cptkit.config import load_config
    from cptkit.models import load_base, weights_held
    from cptkit.tracking import NullTracker

    config = load_config(tune_config(tmp_path, tiny_model_dir))
    first, second = tune_module.plan_tune(config).pilots[:2]
    cpu = torch.device("cpu")
    from_disk = load_base(tiny_model_dir, config.training, cpu, False).state_dict()

    def numbers(pilot: Any, out: str) -> dict[str, Any]:
        pc = config.model_copy(update={"tune": config.tune.model_copy(update={"output_dir": Path(out)})})
        result = asdict(tune_module.run_pilot(pc, pilot, lambda *args: NullTracker()))
        return {k: v for k, v in result.items() if k not in {"seconds", "tokens_per_second", "fingerprint"}}

    calls = loads(monkeypatch)
    with weights_held():
        numbers(first, "held")
        on_held = numbers(second, "held")
        held = load_base(tiny_model_dir, config.training, cpu, False).state_dict()  # the held tensors
    assert len(calls) == 1  # two trainings and two evaluations, one read
    assert held.keys() == from_disk.keys() and all(torch.equal(held[k], from_disk[k]) for k in held)
    alone = numbers(second, "alone")
    assert on_held == alone
