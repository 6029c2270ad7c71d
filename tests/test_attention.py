"""The chunked CPU attention: the same logits and gradients as transformers' SDPA, packed documents kept apart."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cptkit import attention
from cptkit.packing import TokenDocs, sequence_blocks

_KERNEL = "aten::_scaled_dot_product_flash_attention_for_cpu"


def _model(model_dir: Path, implementation: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=torch.float32, attn_implementation=implementation
    )
    model.config.use_cache = False
    return model


def _packed_batch(lengths: list[list[int]], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(0)
    rows = []
    for row in lengths:
        docs = [rng.integers(2, 400, size=n).tolist() for n in row]
        ids, pos, _ = sequence_blocks(TokenDocs.from_lists(docs), separator=0, seq_len=seq_len).block(0)
        rows.append((ids, pos))
    return torch.tensor(np.stack([r[0] for r in rows])), torch.tensor(np.stack([r[1] for r in rows]))


def test_matches_sdpa_forward_and_backward_on_packed_blocks(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(attention, "QUERY_CHUNK", 16)  # many chunks, a ragged last one (70 = 4 x 16 + 6)
    # One row of several documents, one of a single document (the causal mask alone).
    ids, pos = _packed_batch([[20, 9, 30, 7], [75]], seq_len=70)
    grads, logits, calls = {}, {}, {}
    for implementation in ("sdpa", attention.register()):
        torch.manual_seed(0)
        model = _model(tiny_model_dir, implementation)
        with torch.profiler.profile() as prof:
            out = model(input_ids=ids, position_ids=pos).logits
        calls[implementation] = sum(e.count for e in prof.key_averages() if e.key == _KERNEL)
        out.float().pow(2).mean().backward()
        logits[implementation] = out.detach()
        grads[implementation] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    ours = attention.NAME
    layers = 2
    assert calls == {"sdpa": layers, ours: layers * 5}  # one kernel call per chunk of queries
    torch.testing.assert_close(logits[ours], logits["sdpa"], rtol=1e-5, atol=1e-5)
    assert grads[ours].keys() == grads["sdpa"].keys() and grads[ours]
    for name, grad in grads["sdpa"].items():
        torch.testing.assert_close(grads[ours][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_a_document_in_a_packed_block_scores_as_alone(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(attention, "QUERY_CHUNK", 8)
    model = _model(tiny_model_dir, attention.register()).eval()
    rng = np.random.default_rng(1)
    docs = [rng.integers(2, 400, size=n).tolist() for n in (13, 21, 9)]
    ids, pos, _ = sequence_blocks(TokenDocs.from_lists(docs), separator=0, seq_len=46).block(0)
    with torch.no_grad():
        packed = model(input_ids=torch.tensor(ids)[None], position_ids=torch.tensor(pos)[None]).logits[0]
        start = 0
        for doc in docs:
            alone = model(input_ids=torch.tensor([*doc, 0])[None]).logits[0]
            torch.testing.assert_close(packed[start : start + len(doc) + 1], alone, rtol=1e-5, atol=1e-5)
            start += len(doc) + 1


def test_generation_with_a_kv_cache_falls_back_to_sdpa(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(attention, "QUERY_CHUNK", 4)
    prompt = torch.tensor([[5, 17, 33, 2, 90, 41, 7, 8, 11]])
    outputs = {}
    for implementation in ("sdpa", attention.register()):
        model = _model(tiny_model_dir, implementation).eval()
        model.config.use_cache = True
        with torch.no_grad():
            outputs[implementation] = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(outputs[attention.NAME], outputs["sdpa"])
