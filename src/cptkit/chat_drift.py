"""Chat drift: does the adapted model still answer general instructions the way its (instruct) base did?

Raw-text perplexity does not see chat skills: an instruct base's general perplexity can fall under
continual pretraining while its answers change. So the base model answers a fixed set of general
instructions shipped with cptkit (`chat_instructions.yaml`) through its tokenizer's chat template, greedy;
the answers are cached on disk by the base's identity (`base_scores.BaseIdentity`), the instruction set
and the generation settings.
The adapted model is then scored on exactly those answers, conditioned on the same chat prompt: its
log-likelihood per answer token against the base's (the difference is the *chat drift*), the mean
KL(base || adapted) of the next-token distributions on the answer tokens, and top-1 agreement. A few
instructions are also answered by the adapted model, for the report's side-by-side view.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from cptkit.artifacts import read_json, write_json_atomic
from cptkit.base_scores import BaseOutputs, base_outputs_for
from cptkit.config import ChatDriftConfig
from cptkit.model_pair import ModelPair
from cptkit.progress import console
from cptkit.results import ChatAnswer, ChatDrift
from cptkit.scoring import ModelRunner, head_of, run_scored_outputs
from cptkit.tokenization import cache_dir

INSTRUCTIONS_FILE = "chat_instructions.yaml"
CACHE_FOLDER = "chat_answers"
# Bump when what is cached changes meaning (the prompt's construction, the answer's end, batching).
_CACHE_VERSION = 2
# Prompts answered together (left-padded). Greedy decoding is bound by the per-token pass, not by the batch,
# so a batch of 8 answers takes little more than one; 8 x (prompt + max_new_tokens) tokens of KV cache is
# small next to any model's weights.
GENERATION_BATCH = 8


def instructions(limit: int | None = None) -> list[str]:
    """The shipped general instructions (the first `limit` of them)."""
    import yaml

    text = resources.files("cptkit").joinpath(INSTRUCTIONS_FILE).read_text(encoding="utf-8")
    items = [str(item) for item in yaml.safe_load(text)["instructions"]]
    return items[:limit] if limit is not None else items


def instructions_hash(items: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps(list(items)).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class _BaseAnswer:
    """A base answer as cached: the chat prompt's tokens, the answer's tokens (with the end-of-turn token
    when the model stopped), and its text."""

    instruction: str
    prompt_ids: list[int]
    answer_ids: list[int]
    text: str


def measure(
    pair: ModelPair, cc: ChatDriftConfig, precision: str, device: Any, batch_size: int, base_cache: bool = False
) -> ChatDrift:
    """Chat drift of the pair, or a result that says why it was not measured. With `base_cache`
    (evaluate.base_score_cache), the base's side of the scoring is cached like an evaluation set's."""
    result = _measure(pair, cc, precision, device, batch_size, base_cache)
    if result.status == "skipped":
        console.print(f"evaluate chat: not measured: {result.reason}", highlight=False)
    return result


def _measure(
    pair: ModelPair, cc: ChatDriftConfig, precision: str, device: Any, batch_size: int, base_cache: bool
) -> ChatDrift:
    if not cc.enabled:
        return ChatDrift(status="off", reason="evaluate.chat.enabled is false")
    base_tok, cpt_tok = pair.base_tokenizer.tokenizer, pair.cpt_tokenizer.tokenizer
    if not getattr(base_tok, "chat_template", None):
        return ChatDrift(
            status="skipped",
            reason="the base model's tokenizer has no chat template (a raw base model): there is no chat "
            "behaviour to keep",
        )
    if base_tok.get_vocab() != cpt_tok.get_vocab():
        return ChatDrift(
            status="skipped",
            reason="the adapted model's tokenizer differs from the base's: the two cannot be compared token by token",
        )
    items = instructions(cc.max_instructions)
    identity = pair.base_identity(precision, device)
    generation = {"version": _CACHE_VERSION, "max_new_tokens": cc.max_new_tokens}
    key = identity.key("answers", generation, [instructions_hash(items).encode()])
    answers = _read_cache(key, items)
    cached = answers is not None
    if answers is None:
        answers = _base_answers(pair, items, cc.max_new_tokens, device)
        _write_cache(key, answers)
    if not cached:
        console.print(f"evaluate chat: the base model answers {len(items)} instructions (cached for next time)")
    cached_base = base_outputs_for(
        identity if base_cache else None,
        [np.asarray(a.prompt_ids + a.answer_ids) for a in answers],
        0,
        0,
        batch_size,
        kind="chat",
    )
    sums = _score(pair, answers, device, precision == "bf16", batch_size, cached_base)
    # The adapted model's own answers, for the report only: the drift is measured on the base's answers.
    shown = answers[: cc.side_by_side]
    # side_by_side 0 (tune's pilots): the adapted model generates nothing at all.
    side = _answers(pair.cpt_runner, cpt_tok, [a.prompt_ids for a in shown], cc.max_new_tokens, device) if shown else []
    tokens = sum(s.tokens for s in sums)
    base_nll, cpt_nll = sum(s.base_nll for s in sums), sum(s.cpt_nll for s in sums)
    result = ChatDrift(
        status="ok",
        instructions=len(answers),
        answer_tokens=tokens,
        base_log_likelihood=-base_nll / tokens,
        cpt_log_likelihood=-cpt_nll / tokens,
        drift=(cpt_nll - base_nll) / tokens,
        kl=sum(s.kl for s in sums) / tokens,
        top1_agreement=sum(s.agree for s in sums) / tokens,
        max_new_tokens=cc.max_new_tokens,
        cached=cached,
        answers=[
            ChatAnswer(
                instruction=a.instruction,
                base=a.text,
                tokens=s.tokens,
                drift=(s.cpt_nll - s.base_nll) / s.tokens,
                kl=s.kl / s.tokens,
                cpt=side[i][1] if i < len(side) else None,
            )
            for i, (a, s) in enumerate(zip(answers, sums, strict=True))
        ],
    )
    console.print(
        f"evaluate chat: drift {result.drift:+.4f} nats per answer token, KL {result.kl:.4f}, top-1 agreement "
        f"{result.top1_agreement:.1%} ({tokens:,} tokens of {len(answers)} base answers"
        f"{', from the cache' if cached else ''})",
        highlight=False,
    )
    return result


def metrics(chat: ChatDrift) -> dict[str, float]:
    """The MLflow metrics of a measured chat drift (none when it was not measured)."""
    if chat.status != "ok":
        return {}
    values = {
        "drift": chat.drift,
        "kl": chat.kl,
        "top1_agreement": chat.top1_agreement,
        "base_log_likelihood": chat.base_log_likelihood,
        "cpt_log_likelihood": chat.cpt_log_likelihood,
    }
    return {f"eval/chat/{name}": float(value) for name, value in values.items() if value is not None}


# ---------------------------------------------------------------- the base's answers and their cache


def _cache_path(key: str) -> Path:
    return cache_dir() / CACHE_FOLDER / f"{key}.json"


def _read_cache(key: str, items: Sequence[str]) -> list[_BaseAnswer] | None:
    """The cached answers, or None when there are none (or the file is not what this version writes)."""
    try:
        data = read_json(_cache_path(key))
    except Exception:  # an unreadable cache file is a miss: the answers are generated again
        return None
    if data is None or [a.get("instruction") for a in data.get("answers") or []] != list(items):
        return None
    try:
        return [_BaseAnswer(a["instruction"], a["prompt_ids"], a["answer_ids"], a["text"]) for a in data["answers"]]
    except (KeyError, TypeError):
        return None


def _write_cache(key: str, answers: Sequence[_BaseAnswer]) -> None:
    data = {
        "answers": [
            {"instruction": a.instruction, "prompt_ids": a.prompt_ids, "answer_ids": a.answer_ids, "text": a.text}
            for a in answers
        ],
    }
    with contextlib.suppress(OSError):  # a read-only cache costs a regeneration next time, nothing else
        write_json_atomic(_cache_path(key), data)


def _base_answers(pair: ModelPair, instructions: Sequence[str], max_new_tokens: int, device: Any) -> list[_BaseAnswer]:
    tokenizer = pair.base_tokenizer.tokenizer
    prompts = []
    for instruction in instructions:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": instruction}], add_generation_prompt=True, tokenize=False
        )
        # The template writes any special tokens (BOS, turn markers) itself.
        prompts.append(list(tokenizer(prompt, add_special_tokens=False)["input_ids"]))
    answers = _answers(pair.base_runner, tokenizer, prompts, max_new_tokens, device)
    return [
        _BaseAnswer(instruction, prompt_ids, answer_ids, text)
        for instruction, prompt_ids, (answer_ids, text) in zip(instructions, prompts, answers, strict=True)
    ]


def _answers(
    runner: ModelRunner, tokenizer: Any, prompts: Sequence[list[int]], max_new_tokens: int, device: Any
) -> list[tuple[list[int], str]]:
    """Greedy answers to chat prompts, GENERATION_BATCH at a time: each answer's tokens (ending with the
    end-of-turn token when the model stopped by itself) and its text."""
    import torch
    from transformers import GenerationConfig as HfGenerationConfig

    out: list[tuple[list[int], str]] = []
    with torch.inference_mode(), runner() as model:
        stops = _stop_ids(tokenizer, model)
        pad = stops[0] if stops else 0  # after an answer's end: cut off below
        settings = HfGenerationConfig(  # type: ignore[no-untyped-call]
            max_new_tokens=max_new_tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            eos_token_id=stops,
            pad_token_id=pad,
            use_cache=True,  # loading turned the model's cache off (packed training needs that)
        )
        for start in range(0, len(prompts), GENERATION_BATCH):
            batch = prompts[start : start + GENERATION_BATCH]
            width = max(len(p) for p in batch)
            # Left padding, masked: every prompt ends where generation starts (positions follow the mask).
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch], device=device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
            generated = model.generate(input_ids=ids, attention_mask=mask, generation_config=settings)
            for row in generated[:, width:].tolist():
                answer = [int(t) for t in row]
                for i, token in enumerate(answer):
                    if token in stops:
                        answer = answer[: i + 1]
                        break
                out.append((answer, str(tokenizer.decode(answer, skip_special_tokens=True)).strip()))
    return out


def _stop_ids(tokenizer: Any, model: Any) -> list[int]:
    """The tokens that end an answer: the tokenizer's EOS (a chat model's end of turn) and those of the
    model's generation config."""
    stops = [tokenizer.eos_token_id]
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    stops += configured if isinstance(configured, list) else [configured]
    return list(dict.fromkeys(int(t) for t in stops if t is not None))


# ---------------------------------------------------------------- scoring the answers


@dataclass
class _AnswerScore:
    """One answer's sums over its tokens: both models' negative log-likelihoods, KL(base || adapted),
    positions whose top-1 tokens agree."""

    tokens: int = 0
    base_nll: float = 0.0
    cpt_nll: float = 0.0
    kl: float = 0.0
    agree: int = 0


def _score(
    pair: ModelPair,
    answers: Sequence[_BaseAnswer],
    device: Any,
    bf16: bool,
    batch_size: int,
    base_outputs: BaseOutputs | None = None,
) -> list[_AnswerScore]:
    """Both models on each chat prompt + base answer, right-padded in batches (under causal attention the
    padding after a sequence cannot change it); only the answer's tokens are scored. With `base_outputs`,
    the base's hidden states at the answers' positions come from (or go to) the base-score cache."""
    import torch
    import torch.nn.functional as F

    device = torch.device(device)
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    scores = [_AnswerScore() for _ in answers]
    heads = [head_of(pair.base_runner), head_of(pair.cpt_runner)]
    with torch.inference_mode(), autocast, base_outputs if base_outputs is not None else contextlib.nullcontext():
        for first in range(0, len(answers), batch_size):
            batch = answers[first : first + batch_size]
            seqs = [a.prompt_ids + a.answer_ids for a in batch]
            width = max(len(s) for s in seqs) - 1
            ids = torch.zeros((len(batch), width), dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.bool)
            for row, (a, seq) in enumerate(zip(batch, seqs, strict=True)):
                ids[row, : len(seq) - 1] = torch.tensor(seq[:-1])
                # position p predicts token p + 1: the answer's tokens are predicted from len(prompt) - 1 on
                mask[row, len(a.prompt_ids) - 1 : len(seq) - 1] = True
            ids, mask = ids.to(device), mask.to(device)
            targets = torch.tensor([t for a in batch for t in a.answer_ids], device=device)
            base = F.log_softmax(
                _logits_at(pair.base_runner, heads[0], ids, mask, base_outputs, first // batch_size, device),
                dim=-1,
                dtype=torch.float32,
            )
            cpt = F.log_softmax(_logits_at(pair.cpt_runner, heads[1], ids, mask), dim=-1, dtype=torch.float32)
            base_nll = -base.gather(-1, targets[:, None])[:, 0].double()
            cpt_nll = -cpt.gather(-1, targets[:, None])[:, 0].double()
            kl = F.kl_div(cpt, base, log_target=True, reduction="none").sum(-1).double()
            agree = base.argmax(-1) == cpt.argmax(-1)
            start = 0
            for offset, a in enumerate(batch):
                rows = slice(start, start + len(a.answer_ids))
                start = rows.stop
                s = scores[first + offset]
                s.tokens = len(a.answer_ids)
                s.base_nll = float(base_nll[rows].sum())
                s.cpt_nll = float(cpt_nll[rows].sum())
                s.kl = float(kl[rows].sum())
                s.agree = int(agree[rows].sum())
    return scores


def _logits_at(
    runner: ModelRunner,
    head: Callable[[tuple[str, Any], slice], Any],
    ids: Any,
    mask: Any,
    cache: BaseOutputs | None = None,
    batch: int = 0,
    device: Any = None,
) -> Any:
    """Logits at the masked positions, (positions, vocabulary), in row order. The LM head runs there only
    where the logits are a plain head over the hidden states (see loss.decoder_and_head); those hidden
    states are what `cache` keeps, as batch number `batch`."""
    compute = functools.partial(run_scored_outputs, runner, ids, mask)  # the runner entered only where needed
    out = cache.output(batch, int(mask.sum()), compute, device) if cache is not None else compute()
    return head(out, slice(None))
