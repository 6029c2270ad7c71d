"""The training loss: summed next-token cross-entropy over packed blocks, without materializing the logits.

A causal LM's usual loss computes logits for every position (tokens x vocabulary, 100M values for
4x512 tokens and SmolLM2's 49k vocabulary), upcasts them to float32, and keeps them and their gradient
for the backward pass: on a CPU that is a quarter of the step time and gigabytes of memory. Here the
LM head and the cross-entropy run together, a chunk of positions at a time, and the gradients with
respect to the hidden states (and the head, when it is trained) are computed in the same pass, so
only one chunk of logits ever exists. Liger-Kernel and Apple's cut-cross-entropy do this on GPUs
with Triton kernels; neither runs on a CPU, so the few lines below do it with plain matmuls.
"""

from __future__ import annotations

from typing import Any

import torch

from cptkit.packing import IGNORE  # the label of positions that are not trained on

# Logits per chunk: chunk rows x vocabulary values (64 MiB of float32) bound the loss's memory. The two
# chunk buffers are allocated once per call and reused by every chunk, so no chunk faults in fresh pages.
# Fewer rows make the logits matmul slower (its inner dimension is only the hidden size): on one AVX2
# core, 85 rows per chunk ran at 57 GFLOP/s, 256 at 73, and the whole loss took 1.88 s against 1.50 s
# for SmolLM2's 49k vocabulary and 1022 rows.
_CHUNK_VALUES = 1 << 24


def loss_memory_bytes(rows: int, vocabulary: int) -> int:
    """Memory the fused loss needs beyond the activations: one chunk of logits in the compute dtype (at
    most float32; the same buffer then holds the 16-bit gradient) and one of float32 log-probabilities."""
    chunk_rows = min(rows, max(1, _CHUNK_VALUES // vocabulary))
    return chunk_rows * vocabulary * (4 + 4)


class _LinearCrossEntropy(torch.autograd.Function):
    """sum over labelled rows of cross_entropy(hidden @ weight.T, target), with the backward pass
    precomputed chunk by chunk in the forward (the loss is a scalar, so the backward only scales)."""

    @staticmethod
    def forward(
        ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, compute_dtype: torch.dtype
    ) -> torch.Tensor:
        h = hidden.to(compute_dtype)
        w = weight.to(compute_dtype)
        need_w = weight.requires_grad
        grad_h = torch.zeros_like(h)
        acc = torch.float64 if compute_dtype == torch.float64 else torch.float32  # the softmax's dtype
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        total = torch.zeros((), dtype=acc, device=hidden.device)
        chunk = max(1, _CHUNK_VALUES // weight.shape[0])
        size = (min(chunk, h.shape[0]), weight.shape[0])
        logits_buffer = torch.empty(size, dtype=compute_dtype, device=h.device)
        logp_buffer = torch.empty(size, dtype=acc, device=h.device)
        for start in range(0, h.shape[0], chunk):
            t = targets[start : start + chunk]
            keep = t != IGNORE
            kept = int(keep.sum())
            if kept == 0:
                continue
            whole = kept == len(t)  # no row to drop: slices instead of copies
            hc = h[start : start + chunk] if whole else h[start : start + chunk][keep]
            tc = t if whole else t[keep]
            # One fused pass from the logits to float32 log-probabilities, then the gradient
            # d(loss)/d(logits) = softmax - one_hot(target) in place over them.
            logits = torch.mm(hc, w.T, out=logits_buffer[:kept])
            logp = torch.log_softmax(logits, dim=-1, dtype=acc, out=logp_buffer[:kept])
            total -= logp.gather(1, tc[:, None]).sum()
            probs = logp.exp_()
            probs[torch.arange(kept, device=probs.device), tc] -= 1
            g = probs if compute_dtype == acc else logits.copy_(probs)  # the logits are spent: their buffer
            if whole:
                torch.mm(g, w, out=grad_h[start : start + kept])
            else:
                grad_h[start : start + len(t)][keep] = g @ w
            if grad_w is not None:
                grad_w += (g.T @ hc).to(acc)
        ctx.save_for_backward(grad_h, grad_w if grad_w is not None else torch.empty(0))
        ctx.hidden_dtype, ctx.weight_dtype, ctx.need_w = hidden.dtype, weight.dtype, need_w
        return total

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> Any:
        grad_h, grad_w = ctx.saved_tensors
        dh = (grad_h * grad_out).to(ctx.hidden_dtype)
        dw = (grad_w * grad_out).to(ctx.weight_dtype) if ctx.need_w else None
        return dh, dw, None, None


def linear_cross_entropy_sum(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, compute_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Summed cross-entropy of `hidden @ weight.T` against `targets` (IGNORE rows skipped).

    hidden: (rows, hidden_size); weight: (vocabulary, hidden_size); targets: (rows,). The matmuls run in
    `compute_dtype` (default: the autocast dtype when autocast is on, else hidden's dtype); the
    log-sum-exp is always float32."""
    if compute_dtype is None:
        device = hidden.device.type
        compute_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    with torch.autocast(hidden.device.type, enabled=False):
        out: torch.Tensor = _LinearCrossEntropy.apply(  # type: ignore[no-untyped-call]
            hidden, weight, targets, compute_dtype
        )
    return out


def decoder_and_head(model: Any) -> tuple[Any, Any] | None:
    """The decoder (hidden states) and the LM head of a causal LM or a peft model around one, when the
    logits are just `head(hidden)`: a plain linear head without bias, softcapping or scaling. None for
    other models, whose logits only their own forward computes."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = lm.get_output_embeddings()
    config = lm.config.get_text_config()
    scaled = any(
        getattr(config, key, None) not in (None, 1, 1.0)
        for key in ("final_logit_softcapping", "logit_scale", "logits_scaling")
    )
    if type(head) is not torch.nn.Linear or head.bias is not None or scaled:
        return None
    return lm.get_decoder(), head


class CausalLMLoss(torch.nn.Module):
    """A causal LM (a transformers model, or a peft model around one) whose forward returns the summed
    next-token loss of packed blocks and the number of labelled tokens.

    It is a module so that `accelerator.prepare` wraps it (DDP must see the forward that runs the
    model). Position ids restart per document and no attention mask is passed: transformers then keeps
    attention inside each document under SDPA and flash-attention."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        # The fused loss applies the head itself. A tuple, not attributes: modules assigned to a Module
        # would be registered a second time.
        self._fused: tuple[Any, Any] | None = decoder_and_head(model)
        # peft casts each adapter's input to the adapter's float32 and autocast casts it straight back
        # to bfloat16: two copies of every adapted layer's input, forward and backward, that change no
        # value. Under autocast the casts are switched off (see forward).
        self._lora_layers: list[Any] = [m for m in model.modules() if hasattr(m, "cast_input_dtype_enabled")]

    def forward(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        autocast = torch.is_autocast_enabled(input_ids.device.type)
        for layer in self._lora_layers:
            layer.cast_input_dtype_enabled = not autocast
        targets = labels[:, 1:].reshape(-1)
        count = (targets != IGNORE).sum()
        if self._fused is not None:
            decoder, head = self._fused
            hidden = decoder(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
            hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])
            return linear_cross_entropy_sum(hidden, head.weight, targets), count
        logits = self.model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits
        total = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets, ignore_index=IGNORE, reduction="sum"
        )
        return total, count
