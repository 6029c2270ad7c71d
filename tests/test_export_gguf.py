"""export --format gguf of Mistral (llama.cpp's llama architecture) and Phi-3 (its phi3 architecture), with
SentencePiece-style tokenizers like theirs: tiny random models trained a few LoRA steps, exported, and read
back with the gguf package (tensor names and shapes) and with transformers (weights, logits, token ids)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import make_doc, prepared_run

TEXTS = [
    "The committee published its annual report on the state of the nation's rivers in March.",
    "def mean(values):\n    return sum(values) / len(values)\n",
    make_doc(7)[:200],
]


@pytest.fixture(scope="module")
def sentencepiece_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A BPE tokenizer laid out as Llama 2's, Mistral's and Phi-3's are: <unk>, <s>, </s>, the 256 byte
    pieces <0x00>..<0xFF> (byte fallback), then the pieces BPE learned, "▁" marking spaces."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    learner = Tokenizer(models.BPE())
    learner.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    learner.train_from_iterator([make_doc(i) for i in range(50)], trainers.BpeTrainer(vocab_size=350))
    learned = json.loads(learner.to_str())["model"]
    pieces = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256))]
    pieces += [p for p, _ in sorted(learned["vocab"].items(), key=lambda item: item[1]) if p not in pieces]
    tok = Tokenizer(
        models.BPE(
            vocab={p: i for i, p in enumerate(pieces)},
            merges=[tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in learned["merges"]],
            unk_token="<unk>",
            byte_fallback=True,
            fuse_unk=True,
        )
    )
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.add_special_tokens({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})
    return fast


def tiny_model(folder: Path, family: str, tokenizer: Any) -> Path:
    """A random 2-layer model of `family` with the tokenizer; Phi-3's gets Phi-3's own added tokens, which
    llama.cpp looks up by name in a file whose model name says phi3 (and its padding token)."""
    import copy

    from tokenizers import AddedToken
    from transformers import AutoModelForCausalLM, MistralConfig, Phi3Config

    if family == "phi3":
        tokenizer = copy.deepcopy(tokenizer)
        added = [AddedToken(t, special=True, normalized=False) for t in ("<|endoftext|>", "<|end|>")]
        tokenizer.add_tokens(added, special_tokens=True)
        tokenizer.pad_token = "<|endoftext|>"
    shared = {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "tie_word_embeddings": False,
        # Longer than any text here, shorter than the context: the export notes what llama.cpp does beyond it.
        "sliding_window": 256,
    }
    if family == "mistral":
        config = MistralConfig(**shared)
    else:
        config = Phi3Config(**shared, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def small_run(tmp_path: Path, model_dir: Path, training: dict[str, Any]) -> Path:
    general = [make_doc(900 + i) for i in range(8)]
    return prepared_run(tmp_path, model_dir, training, domain_docs=20, general_texts=general)


def trained_and_exported(tmp_path: Path, family: str, tokenizer: Any, cli: Any) -> tuple[Path, Path, Path]:
    """The tiny model trained 2 LoRA steps and exported as a float32 GGUF: the model folder, the file, the config."""
    from cptkit.config import load_config
    from cptkit.train import train

    model_dir = tiny_model(tmp_path / family, family, tokenizer)
    training = {"method": "lora", "learning_rate": 1e-2, "max_steps": 2, "max_seq_length": 64}
    training |= {"micro_batch_size": 2, "precision": "fp32", "warmup_steps": 0, "eval_max_sequences": 1}
    cfg = small_run(tmp_path, model_dir, training)
    config = load_config(cfg)
    train(config)
    result = cli("export", "--config", str(cfg), "--format", "gguf", "--set", "register.export_dtype=float32")
    assert result.exit_code == 0, result.output
    return model_dir, config.output_dir / "export" / "gguf" / "model.gguf", cfg


def logits(model: Any, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float()  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("family", "arch"),
    [("mistral", "llama"), ("phi3", "phi3")],
)
def test_export_gguf_writes_what_llama_cpp_reads_and_transformers_loads_back(
    family: str, arch: str, tmp_path: Path, sentencepiece_tokenizer: Any, cli: Any
) -> None:
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cptkit.config import load_config
    from cptkit.models import load_trained

    model_dir, gguf_file, cfg = trained_and_exported(tmp_path, family, sentencepiece_tokenizer, cli)
    config = load_config(cfg)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    reader = gguf.GGUFReader(str(gguf_file))
    assert reader.fields["general.architecture"].contents() == arch
    assert reader.fields["tokenizer.ggml.model"].contents() == "llama"  # llama.cpp's SentencePiece tokenizer
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    assert tokens[:3] == ["<unk>", "<s>", "</s>"] and tokens[3] == "<0x00>"
    assert types[0] == gguf.TokenType.UNKNOWN and types[1] == types[2] == gguf.TokenType.CONTROL
    assert set(types[3:259]) == {gguf.TokenType.BYTE}
    if family == "phi3":
        assert tokens[-2:] == ["<|endoftext|>", "<|end|>"] and set(types[-2:]) == {gguf.TokenType.CONTROL}
    scores = reader.fields["tokenizer.ggml.scores"].contents()
    # Minus the merge rank of the first merge making each piece: the first merge scores highest.
    assert set(scores[:259]) == {0.0} and max(scores) == 0.0 and min(scores) < -50

    # Tensor names and shapes: llama.cpp's names; phi3 keeps q, k, v and gate, up fused, as it reads them.
    shapes = {
        t.name: tuple(int(d) for d in reversed(t.shape.tolist())) for t in reader.tensors
    }  # GGUF: fastest dim first
    kv = 2 * 16
    if arch == "llama":
        assert shapes["blk.0.attn_q.weight"] == (64, 64) and shapes["blk.1.attn_k.weight"] == (kv, 64)
        assert shapes["blk.0.ffn_gate.weight"] == (128, 64) and shapes["blk.0.ffn_up.weight"] == (128, 64)
        assert reader.fields["llama.rope.dimension_count"].contents() == 16
    else:
        assert shapes["blk.0.attn_qkv.weight"] == (64 + 2 * kv, 64)
        assert shapes["blk.0.ffn_up.weight"] == (2 * 128, 64) and "blk.0.ffn_gate.weight" not in shapes
        assert reader.fields["phi3.attention.sliding_window"].contents() == 256
    assert shapes["token_embd.weight"] == shapes["output.weight"] == (len(tokenizer), 64)
    assert shapes["blk.1.ffn_down.weight"] == (64, 128) and shapes["output_norm.weight"] == (64,)
    assert len(shapes) == 3 + 2 * (9 if arch == "llama" else 6)  # embeddings, head, final norm; per layer

    # Loaded back by transformers: the trained model's logits, and the same token ids from the file's tokenizer.
    reloaded = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    trained = load_trained(model_dir, config.output_dir, config.training, "cpu")
    gguf_tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    for text in [*TEXTS, "<|end|>"] if family == "phi3" else TEXTS:
        ids = tokenizer(text)["input_ids"]
        assert gguf_tokenizer(text)["input_ids"] == ids, text
        assert torch.allclose(logits(reloaded, ids), logits(trained, ids), atol=1e-4, rtol=0)


def test_export_gguf_of_mistral_notes_that_llama_cpp_has_no_sliding_window(
    tmp_path: Path, sentencepiece_tokenizer: Any, cli: Any
) -> None:
    _, _, cfg = trained_and_exported(tmp_path, "mistral", sentencepiece_tokenizer, cli)
    result = cli("export", "--config", str(cfg), "--format", "gguf")  # the default dtype: float16
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "sliding window of 256 tokens" in text and "float16" in text


def test_export_gguf_refuses_phi3_with_scaled_rope_in_one_line(
    tmp_path: Path, sentencepiece_tokenizer: Any, cli: Any
) -> None:
    from cptkit.config import load_config
    from cptkit.train import train

    model_dir = tiny_model(tmp_path / "phi3", "phi3", sentencepiece_tokenizer)
    config = json.loads((model_dir / "config.json").read_text())
    factors = [1.0] * 8
    config["rope_scaling"] = {"type": "longrope", "long_factor": factors, "short_factor": factors}
    config["original_max_position_embeddings"] = 256
    (model_dir / "config.json").write_text(json.dumps(config))
    training = {"method": "full", "max_steps": 1, "max_seq_length": 64, "micro_batch_size": 2, "precision": "fp32"}
    cfg = small_run(tmp_path, model_dir, training)
    train(load_config(cfg))
    result = cli("export", "--config", str(cfg), "--format", "gguf")
    assert result.exit_code == 1
    text = " ".join(result.output.split())
    assert "Phi-3 with rope scaling 'longrope' is not supported" in text and "Traceback" not in result.output


# llama.cpp itself reads the files where a Python with llama-cpp-python is named (it is built from source,
# minutes of compiling, so not in the dev extra): CPTKIT_LLAMA_CPP_PYTHON=/path/to/python pytest -k llama_cpp
_LLAMA_CPP_READ = """
import json, sys
import numpy as np
from llama_cpp import Llama

path, texts = sys.argv[1], json.loads(sys.argv[2])
llm = Llama(model_path=path, n_ctx=256, logits_all=True, verbose=False, n_threads=1)
out = []
for text in texts:
    ids = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)
    llm.reset()
    llm.eval(ids)
    out.append({"ids": ids, "logits": np.asarray(llm.scores[: len(ids)], dtype=np.float64).tolist()})
print(json.dumps(out))
"""


@pytest.mark.skipif(not os.environ.get("CPTKIT_LLAMA_CPP_PYTHON"), reason="CPTKIT_LLAMA_CPP_PYTHON not set")
@pytest.mark.parametrize("family", ["mistral", "phi3"])
def test_llama_cpp_reads_the_export_with_the_same_token_ids_and_logits(
    family: str, tmp_path: Path, sentencepiece_tokenizer: Any, cli: Any
) -> None:
    import subprocess

    from transformers import AutoTokenizer

    from cptkit.config import load_config
    from cptkit.models import load_trained

    model_dir, gguf_file, cfg = trained_and_exported(tmp_path, family, sentencepiece_tokenizer, cli)
    config = load_config(cfg)
    trained = load_trained(model_dir, config.output_dir, config.training, "cpu")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    python = os.environ["CPTKIT_LLAMA_CPP_PYTHON"]
    proc = subprocess.run(
        [python, "-c", _LLAMA_CPP_READ, str(gguf_file), json.dumps(TEXTS)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    worst = 0.0
    for text, read in zip(TEXTS, json.loads(proc.stdout.strip().splitlines()[-1]), strict=True):
        ids = tokenizer(text)["input_ids"]
        assert read["ids"] == ids, text  # llama.cpp's SentencePiece tokenizer, from the scores written
        difference = (torch.tensor(read["logits"]).float() - logits(trained, ids)).abs().max().item()
        worst = max(worst, difference)
    print(f"llama.cpp {family}: max |logit difference| {worst:.3g}")
    assert worst < 1e-3
