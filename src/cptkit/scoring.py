"""Scoring text with a model: sliding windows over tokenized documents, summed negative log-likelihoods,
tokens and bytes per set, and the drift between two models that share a tokenizer.

Perplexity and bits per byte come from sliding windows: each document is tokenized once behind one
prefix token (the model's BOS where its tokenizer adds one, else the document separator it saw in
pretraining), windows of `context_length` tokens advance by `stride`, and every token is scored exactly
once, with as much preceding context as its window allows. Windows of all documents are batched
together; negative log-likelihoods, tokens and bytes are summed over the whole set. When both models
share a tokenizer they score the same batches, which also gives the drift: mean KL(base || adapted) of
the next-token distributions and the share of positions whose top-1 tokens agree.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from cptkit.packing import SEPARATOR_TOKEN
from cptkit.progress import progress_bar
from cptkit.results import Drift, ModelScore

if TYPE_CHECKING:
    from cptkit.base_scores import BaseOutputs

# A model to score with: entering the context yields the module (e.g. the adapted model with its adapter
# disabled), so the same weights can serve as two models.
ModelRunner = Callable[[], contextlib.AbstractContextManager[Any]]


@dataclass(frozen=True)
class TextTokenizer:
    """A Hugging Face tokenizer and the one token put before every document."""

    tokenizer: Any
    prefix_id: int | None

    def encode(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Each text as one token sequence (prefix first), tokenized in one batch call."""
        encoded = self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        prefix = [] if self.prefix_id is None else [self.prefix_id]
        return [np.asarray(prefix + ids, dtype=np.int64) for ids in encoded]


def text_tokenizer(tokenizer: Any) -> TextTokenizer:
    """The prefix is the BOS token where the tokenizer adds one (Llama-style models are trained with it),
    else `<|endoftext|>` (what precedes every document in GPT-style pretraining), else EOS. With it the
    first token of a document is scored too, so bits per byte covers every byte."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    special = tokenizer("a", add_special_tokens=True)["input_ids"]
    bos = tokenizer.bos_token_id
    if bos is not None and special[:1] == [bos] and special[1 : 1 + len(plain)] == plain:
        return TextTokenizer(tokenizer, int(bos))
    separator = tokenizer.get_vocab().get(SEPARATOR_TOKEN)
    if separator is not None:
        return TextTokenizer(tokenizer, int(separator))
    for candidate in (tokenizer.eos_token_id, bos):
        if candidate is not None:
            return TextTokenizer(tokenizer, int(candidate))
    return TextTokenizer(tokenizer, None)


@dataclass(frozen=True)
class Window:
    """Inputs `seq[start:end]` of document `doc` predict `seq[start + 1 : end + 1]`; the last `scored`
    of those predictions are counted (the earlier ones were counted by the previous window)."""

    doc: int
    start: int
    end: int
    scored: int

    @property
    def length(self) -> int:
        return self.end - self.start


def plan_windows(lengths: Sequence[int], context_length: int, stride: int) -> list[Window]:
    """Sliding windows over sequences of these lengths (prefix included). Targets are positions 1..n-1;
    the first window scores all of its targets, each next one advances by `stride` and scores the new
    ones, and the last is aligned to the end of the document so that it has a full context."""
    if context_length < 1 or not 1 <= stride <= context_length:
        raise ValueError(f"need 1 <= stride <= context_length, got stride {stride}, context {context_length}")
    windows = []
    for doc, n in enumerate(lengths):
        last = n - 1  # index of the last target
        if last < 1:
            continue
        done = 0
        end = min(context_length, last)
        while True:
            windows.append(Window(doc, max(0, end - context_length), end, end - done))
            if end == last:
                break
            done = end
            end = min(end + stride, last)
    return windows


@dataclass
class SetScore:
    """Sums over a whole set: negative log-likelihood in nats, scored tokens, UTF-8 bytes."""

    nll: float = 0.0
    tokens: int = 0
    bytes: int = 0
    documents: int = 0
    # With score(per_token=True): each token's NLL, the documents' sequences concatenated (NaN where not
    # scored: each document's first token); a function of the scored positions, so of no batch layout.
    token_nll: np.ndarray | None = None

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.tokens) if self.tokens else float("nan")

    @property
    def bits_per_byte(self) -> float:
        return self.nll / (math.log(2) * self.bytes) if self.bytes else float("nan")

    def result(self) -> ModelScore:
        return ModelScore(
            perplexity=self.perplexity,
            bits_per_byte=self.bits_per_byte,
            tokens=self.tokens,
            bytes=self.bytes,
            documents=self.documents,
            nll=self.nll,
        )


@dataclass
class DriftScore:
    """KL(base || adapted) summed over positions, and positions whose top-1 tokens agree."""

    kl: float = 0.0
    agree: int = 0
    positions: int = 0

    def result(self) -> Drift:
        """The means over positions."""
        n = max(self.positions, 1)
        return Drift(kl=self.kl / n, top1_agreement=self.agree / n, positions=self.positions)


def fixed(model: Any) -> ModelRunner:
    """A runner for a model used as it is."""
    return lambda: contextlib.nullcontext(model)


def adapter_disabled(model: Any) -> ModelRunner:
    """A runner for the base of a peft model: the same weights with the adapter turned off."""

    @contextlib.contextmanager
    def disabled() -> Iterator[Any]:
        with model.disable_adapter():  # peft's context yields nothing: the model itself is what runs
            yield model

    return disabled


def score(
    runners: Sequence[ModelRunner],
    docs: Sequence[np.ndarray],
    context_length: int,
    stride: int,
    batch_size: int,
    device: Any = "cpu",
    bf16: bool = False,
    drift: bool = False,
    label: str = "",
    per_token: bool = False,
    base_outputs: BaseOutputs | None = None,
) -> tuple[list[SetScore], DriftScore | None]:
    """Score token sequences with each runner over the same batches of windows. With `drift`, the first
    runner is the base and the second the adapted model; with `per_token`, each score keeps every token's
    NLL too (`SetScore.token_nll`). With `base_outputs`, the first runner's decoder outputs come from (or
    go to) the base-score cache."""
    import torch
    import torch.nn.functional as F

    windows = plan_windows([len(d) for d in docs], context_length, stride)
    # Longest first, and equal scoring spans together, so that a batch pads little and its scored
    # positions line up.
    windows.sort(key=lambda w: (-w.length, -w.scored, w.doc, w.start))
    scores = [SetScore(documents=sum(1 for d in docs if len(d) > 1)) for _ in runners]
    offsets = np.concatenate([[0], np.cumsum([len(d) for d in docs])]).astype(np.int64)
    if per_token:
        for s in scores:
            s.token_nll = np.full(int(offsets[-1]), np.nan, dtype=np.float32)
    result_drift = DriftScore() if drift else None
    device = torch.device(device)
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    total = sum(w.scored for w in windows)
    heads = [head_of(runner) for runner in runners]
    with (
        torch.inference_mode(),
        autocast,
        _adapter_input_casts_off(runners, bf16),
        progress_bar(f"evaluate {label}".strip(), total) as advance,
        base_outputs if base_outputs is not None else contextlib.nullcontext(),
    ):
        for first in range(0, len(windows), batch_size):
            batch = windows[first : first + batch_size]
            ids, targets, mask = _batch_tensors(batch, docs, device)
            # Where each scored target sits in the concatenated sequences (the order of `targets`).
            flat = np.concatenate([offsets[w.doc] + np.arange(w.end - w.scored + 1, w.end + 1) for w in batch])
            # Hidden states at the scored positions, then the LM head a chunk of positions at a time:
            # the full next-token distributions of both models (positions x vocabulary, float32) would
            # take gigabytes, and drift needs both at once.
            outputs = []
            for index, runner in enumerate(runners):
                compute = functools.partial(run_scored_outputs, runner, ids, mask)
                if index == 0 and base_outputs is not None:  # the runner is entered only where not cached
                    outputs.append(base_outputs.output(first // batch_size, int(mask.sum()), compute, device))
                else:
                    outputs.append(compute())
            n = int(targets.numel())
            for start in range(0, n, _HEAD_CHUNK):
                rows = slice(start, start + _HEAD_CHUNK)
                t = targets[rows]
                logprobs: list[Any] = []
                for head, sums, out in zip(heads, scores, outputs, strict=True):
                    logits = head(out, rows)
                    # In float32 whatever the logits' precision (casting inside the op: no float32 copy
                    # of bf16 logits), summed in float64.
                    lp = F.log_softmax(logits, dim=-1, dtype=torch.float32)
                    del logits
                    target_lp = lp.gather(-1, t[:, None])
                    sums.nll -= float(target_lp.sum(dtype=torch.float64))
                    if sums.token_nll is not None:
                        sums.token_nll[flat[rows]] = -target_lp[:, 0].float().cpu().numpy()
                    if drift and len(logprobs) < 2:  # the full distributions are needed for the KL
                        logprobs.append(lp)
                    del lp
                if result_drift is not None:
                    base, adapted = logprobs
                    kl = F.kl_div(adapted, base, log_target=True, reduction="none").sum(-1)
                    result_drift.kl += float(kl.sum(dtype=torch.float64))
                    result_drift.agree += int((base.argmax(-1) == adapted.argmax(-1)).sum())
                    result_drift.positions += int(t.numel())
            for sums in scores:
                sums.tokens += n
            advance(n)
    return scores, result_drift


@contextlib.contextmanager
def _adapter_input_casts_off(runners: Sequence[ModelRunner], autocast: bool) -> Iterator[None]:
    """Under autocast, keep peft's LoRA layers from casting their input to the adapter's float32: autocast
    casts it straight back to bfloat16, so the two copies of every adapted layer's input change no value
    (bf16 -> fp32 -> bf16 is exact; the scores stay equal to the bit). 2-8% of a bf16 LoRA pair's scoring
    time on a 2-core CPU. (peft's 4-bit layers skip the cast under autocast themselves.)"""
    layers = []
    if autocast:
        for runner in runners:
            with runner() as model:
                layers += [m for m in model.modules() if getattr(m, "cast_input_dtype_enabled", None) is True]
    for layer in layers:
        layer.cast_input_dtype_enabled = False
    try:
        yield
    finally:
        for layer in layers:
            layer.cast_input_dtype_enabled = True


def _batch_tensors(batch: Sequence[Window], docs: Sequence[np.ndarray], device: Any) -> tuple[Any, Any, Any]:
    """Right-padded inputs, the scored targets (flat, in row order) and the mask of scored positions.
    No attention mask is needed: under causal attention, padding after a row's tokens cannot change
    them."""
    import torch

    width = max(w.length for w in batch)
    ids = np.zeros((len(batch), width), dtype=np.int64)
    mask = np.zeros((len(batch), width), dtype=bool)
    targets = []
    for row, w in enumerate(batch):
        seq = docs[w.doc]
        ids[row, : w.length] = seq[w.start : w.end]
        mask[row, w.length - w.scored : w.length] = True
        targets.append(seq[w.end - w.scored + 1 : w.end + 1])
    return (
        torch.from_numpy(ids).to(device),
        torch.from_numpy(np.concatenate(targets)).to(device),
        torch.from_numpy(mask).to(device),
    )


# Positions whose logits exist at once: 1024 x a 49k vocabulary is 200 MB of float32 per model.
_HEAD_CHUNK = 1024


def scored_outputs(model: Any, ids: Any, mask: Any) -> tuple[str, Any]:
    """("hidden", hidden states at the masked positions) where the model's logits are a plain linear
    head over them (see loss.decoder_and_head), else ("logits", the logits there)."""
    from cptkit.loss import decoder_and_head

    parts = decoder_and_head(model)
    if parts is None:
        return "logits", _scored_logits(model, ids, mask)
    decoder, _ = parts
    return "hidden", decoder(input_ids=ids, use_cache=False).last_hidden_state[mask]


def run_scored_outputs(runner: ModelRunner, ids: Any, mask: Any) -> tuple[str, Any]:
    """`scored_outputs` of the runner's model, inside its context."""
    with runner() as model:
        return scored_outputs(model, ids, mask)


def head_of(runner: ModelRunner) -> Callable[[tuple[str, Any], slice], Any]:
    """From a runner's decoder outputs to its logits at `rows`. A plain LM head (peft adapts the decoder's
    layers; "all-linear" leaves the output layer out) is looked up once and called outside the runner:
    entering an adapter-disabled base costs tens of milliseconds each time (peft checks every adapted
    layer's state), hundreds of times per evaluation. A head with an adapter of its own runs inside."""
    from cptkit.loss import decoder_and_head

    with runner() as model:
        parts = decoder_and_head(model)
    head = parts[1] if parts is not None else None
    if head is not None and not _adapted(head):
        plain = head

        def outside(output: tuple[str, Any], rows: slice) -> Any:
            kind, values = output
            return values[rows] if kind == "logits" else plain(values[rows])

        return outside

    def inside(output: tuple[str, Any], rows: slice) -> Any:
        with runner() as model:
            return head_logits(model, output, rows)

    return inside


def _adapted(module: Any) -> bool:
    """Whether peft put an adapter layer in `module` (its output then depends on the adapter switch)."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return False
    return any(isinstance(m, BaseTunerLayer) for m in module.modules())


def head_logits(model: Any, output: tuple[str, Any], rows: slice) -> Any:
    from cptkit.loss import decoder_and_head

    kind, values = output
    if kind == "logits":
        return values[rows]
    parts = decoder_and_head(model)
    assert parts is not None
    return parts[1](values[rows])


def _scored_logits(model: Any, ids: Any, mask: Any) -> Any:
    """Logits at the masked positions only, as (positions, vocabulary): the LM head over every position
    of a batch would cost more memory than the model. Models whose forward cannot select positions by
    a mask compute all logits, which are then selected."""
    try:
        logits = model(input_ids=ids, use_cache=False, logits_to_keep=mask).logits
    except TypeError:
        logits = None
    if logits is not None and logits.ndim == 2 and logits.shape[0] == int(mask.sum()):
        return logits
    return model(input_ids=ids, use_cache=False).logits[mask]
