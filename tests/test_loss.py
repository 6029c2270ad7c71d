"""The fused LM-head cross-entropy: the same loss and gradients as logits + cross_entropy."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cptkit import loss as loss_module
from cptkit.loss import IGNORE, CausalLMLoss, linear_cross_entropy_sum


@pytest.mark.parametrize("train_head", [False, True])
def test_matches_logits_and_cross_entropy_across_chunks(monkeypatch: pytest.MonkeyPatch, train_head: bool) -> None:
    monkeypatch.setattr(loss_module, "_CHUNK_VALUES", 7 * 50)  # 7 rows per chunk: many chunks, a ragged end
    torch.manual_seed(0)
    hidden = torch.randn(40, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=train_head)
    targets = torch.randint(0, 50, (40,))
    targets[[0, 5, 6, 7, 8, 9, 10, 11, 39]] = IGNORE  # one chunk entirely unlabelled

    fused = linear_cross_entropy_sum(hidden, weight, targets)
    fused.backward(torch.tensor(0.5, dtype=torch.float64))
    got_h = hidden.grad.clone()
    got_w = weight.grad.clone() if train_head else None
    hidden.grad = None
    weight.grad = None

    reference = F.cross_entropy(hidden @ weight.T, targets, ignore_index=IGNORE, reduction="sum")
    (reference * 0.5).backward()
    assert fused.item() == pytest.approx(reference.item(), rel=1e-12)
    torch.testing.assert_close(got_h, hidden.grad, rtol=1e-10, atol=1e-12)
    if train_head:
        torch.testing.assert_close(got_w, weight.grad, rtol=1e-10, atol=1e-12)
    else:
        assert weight.grad is None


def test_bf16_autocast_stays_close_to_float32() -> None:
    torch.manual_seed(0)
    hidden = torch.randn(64, 32)
    weight = torch.randn(300, 32) / 4
    targets = torch.randint(0, 300, (64,))
    exact = F.cross_entropy(hidden @ weight.T, targets, reduction="sum")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = linear_cross_entropy_sum(hidden, weight, targets)
    assert fast.dtype == torch.float32
    assert fast.item() == pytest.approx(exact.item(), rel=1e-2)


def test_causal_lm_loss_equals_the_models_own_loss(tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    wrapped = CausalLMLoss(model)
    assert wrapped._fused is not None  # a plain linear head: the fused path is the one tested
    ids = torch.randint(5, 300, (2, 24))
    pos = torch.arange(24).repeat(2, 1)
    labels = ids.clone()
    labels[:, :3] = IGNORE
    total, count = wrapped(ids, pos, labels)
    # transformers' own loss is the mean over labelled positions.
    expected = model(input_ids=ids, position_ids=pos, labels=labels, use_cache=False).loss
    assert int(count) == 2 * (24 - 3)
    assert (total / count).item() == pytest.approx(expected.item(), rel=1e-5)
