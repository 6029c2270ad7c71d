"""The evaluate stage: the base and the adapted model side by side, on the domain and on held-out general
text, with a verdict against the config's thresholds and a report people read.

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
import hashlib
import importlib.util
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from cptkit.artifacts import MANIFEST, invalidate, new_manifest, read_json, up_to_date, write_json_atomic
from cptkit.choices import Choice
from cptkit.config import (
    Config,
    CsvSourceConfig,
    DeltaSourceConfig,
    EvaluateConfig,
    FilesSourceConfig,
    GenerationConfig,
    JsonlSourceConfig,
    ParquetSourceConfig,
    SourceConfig,
    TrainingConfig,
    section_fingerprint,
)
from cptkit.datasets import domain_dir, replay_dir
from cptkit.errors import ConfigError, CptkitError, StageError
from cptkit.extract import StageResult
from cptkit.models import EMBEDDINGS_FILE
from cptkit.progress import console, progress_bar
from cptkit.tracking import Tracker, open_tracker
from cptkit.train import SEPARATOR_TOKEN  # the document separator of packing, also the scoring prefix

EVALUATION_DIR = "evaluation"
RESULTS = "results.json"
DOMAIN, GENERAL = "domain", "general"
_SUMMARY = "training_summary.json"
_TRAINED_CONFIG = "cptkit_config.yaml"


# ---------------------------------------------------------------- evaluation sets


@dataclass(frozen=True)
class EvalSet:
    name: str
    texts: list[str]
    bytes: int  # UTF-8 bytes of all texts
    skipped: int  # rows without usable text (null, malformed, empty)
    source: dict[str, Any]


def source_for_path(path: str) -> SourceConfig:
    """A source for a path given on the command line: a Delta table folder (or object-store URI), a
    Parquet, JSONL or CSV file or folder of them, or a folder of text files. Text is in `text`."""
    if "://" in path:
        return DeltaSourceConfig(type="delta", path=path)
    p = Path(path).expanduser()
    if not p.exists():
        raise CptkitError(f"{path}: no such file or folder")
    if p.is_dir():
        if (p / "_delta_log").is_dir():
            return DeltaSourceConfig(type="delta", path=str(p))
        suffixes = {f.suffix.lower() for f in p.rglob("*") if f.is_file()}
        if ".parquet" in suffixes:
            return ParquetSourceConfig(type="parquet", path=p)
        if suffixes & {".jsonl", ".ndjson"}:
            return JsonlSourceConfig(type="jsonl", path=p)
        if ".csv" in suffixes:
            return CsvSourceConfig(type="csv", path=p)
        return FilesSourceConfig(type="files", path=p)
    suffix = p.suffix.lower()
    if suffix == ".parquet":
        return ParquetSourceConfig(type="parquet", path=p)
    if suffix in (".jsonl", ".json", ".ndjson"):
        return JsonlSourceConfig(type="jsonl", path=p)
    if suffix == ".csv":
        return CsvSourceConfig(type="csv", path=p)
    raise CptkitError(f"{path}: not a .jsonl, .parquet or .csv file, a Delta table or a folder of documents")


def eval_sources(config: Config) -> dict[str, SourceConfig]:
    """The evaluation sets, domain first: the configured ones, else the validation splits of prepare."""
    ec = config.evaluate
    sources: dict[str, SourceConfig] = {}
    if ec.domain is not None:
        sources[DOMAIN] = ec.domain
    else:
        val = domain_dir(config) / "val.jsonl"
        if not val.is_file():
            raise StageError(
                f"no domain evaluation set: {val} does not exist; run `cptkit prepare`, pass --domain-data, "
                "or set evaluate.domain"
            )
        sources[DOMAIN] = JsonlSourceConfig(type="jsonl", path=val)
    if ec.general is not None:
        sources[GENERAL] = ec.general
    elif config.data.replay is not None:
        val = replay_dir(config) / "val.jsonl"
        if not val.is_file():
            raise StageError(f"no general evaluation set: {val} does not exist; run `cptkit prepare` first")
        sources[GENERAL] = JsonlSourceConfig(type="jsonl", path=val)
    sources.update(ec.sets)
    return sources


def read_set(name: str, source: SourceConfig, max_documents: int | None) -> EvalSet:
    """The usable texts of a set, in source order, at most `max_documents` of them."""
    from cptkit.sources import ERROR, TEXT, open_source

    opened = open_source(source)
    texts: list[str] = []
    skipped = 0
    for batch in opened.batches():
        errors = batch.column(ERROR).to_pylist()
        for text, error in zip(batch.column(TEXT).to_pylist(), errors, strict=True):
            if error is not None or not text or not text.strip():
                skipped += 1
                continue
            texts.append(text)
            if max_documents is not None and len(texts) >= max_documents:
                break
        if max_documents is not None and len(texts) >= max_documents:
            break
    if not texts:
        raise StageError(f"evaluation set {name} ({opened.describe().get('path')}): no documents with text")
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    return EvalSet(name, texts, n_bytes, skipped, opened.describe())


def cap_tokens(eval_set: EvalSet, tokenizer: Any, max_tokens: int, min_share: int = 1) -> tuple[EvalSet, bool]:
    """The set cut to `max_tokens` tokens of `tokenizer`, shared evenly among its documents: each keeps its
    first `share` tokens, the largest share the cap allows (a shorter document keeps all of its text), so a
    set of a few long documents is not reduced to the first one. Where that share would be below
    `min_share` (a scoring window: many documents), the first documents keep up to `min_share` tokens each
    instead, until the cap. Cuts fall on token boundaries, so the bytes scored are exactly those of the
    kept text. Also: whether anything was cut."""
    encoded = tokenizer(eval_set.texts, add_special_tokens=False, return_offsets_mapping=True)
    offsets = encoded["offset_mapping"]
    lengths = [len(o) for o in offsets]
    if sum(lengths) <= max_tokens:
        return eval_set, False
    low, high = 0, max(lengths)  # the largest share whose total fits
    while low < high:
        mid = (low + high + 1) // 2
        if sum(min(n, mid) for n in lengths) <= max_tokens:
            low = mid
        else:
            high = mid - 1
    share, extra = low, max_tokens - sum(min(n, low) for n in lengths)  # extra: one more for the first ones
    if share < min_share:
        share, extra = min_share, 0
    kept, left = [], max_tokens
    for text, spans, n in zip(eval_set.texts, offsets, lengths, strict=True):
        take = min(n, share + (1 if n > share and extra > 0 else 0), left)
        extra -= take > share
        left -= take
        if take == n:
            kept.append(text)
        elif take > 0:
            kept.append(text[: spans[take - 1][1]])
        if left == 0:
            break
    n_bytes = sum(len(t.encode("utf-8")) for t in kept)
    return EvalSet(eval_set.name, kept, n_bytes, eval_set.skipped, eval_set.source), True


def set_fingerprint(source: SourceConfig) -> str:
    from cptkit.sources import open_source

    return f"{section_fingerprint(source)}:{open_source(source).input_fingerprint()}"


# ---------------------------------------------------------------- tokenization


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


# ---------------------------------------------------------------- windows


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


# ---------------------------------------------------------------- scoring


@dataclass
class SetScore:
    """Sums over a whole set: negative log-likelihood in nats, scored tokens, UTF-8 bytes."""

    nll: float = 0.0
    tokens: int = 0
    bytes: int = 0
    documents: int = 0

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.tokens) if self.tokens else float("nan")

    @property
    def bits_per_byte(self) -> float:
        return self.nll / (math.log(2) * self.bytes) if self.bytes else float("nan")

    def as_dict(self) -> dict[str, Any]:
        return {
            "perplexity": self.perplexity,
            "bits_per_byte": self.bits_per_byte,
            "tokens": self.tokens,
            "bytes": self.bytes,
            "documents": self.documents,
            "nll": self.nll,
        }


@dataclass
class DriftScore:
    """KL(base || adapted) summed over positions, and positions whose top-1 tokens agree."""

    kl: float = 0.0
    agree: int = 0
    positions: int = 0

    def as_dict(self) -> dict[str, Any]:
        n = max(self.positions, 1)
        return {"kl": self.kl / n, "top1_agreement": self.agree / n, "positions": self.positions}


# A model to score with: entering the context yields the module (e.g. the adapted model with its adapter
# disabled), so the same weights can serve as two models.
ModelRunner = Callable[[], contextlib.AbstractContextManager[Any]]


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
) -> tuple[list[SetScore], DriftScore | None]:
    """Score token sequences with each runner over the same batches of windows. With `drift`, the first
    runner is the base and the second the adapted model."""
    import torch
    import torch.nn.functional as F

    windows = plan_windows([len(d) for d in docs], context_length, stride)
    # Longest first, and equal scoring spans together, so that a batch pads little and its scored
    # positions line up.
    windows.sort(key=lambda w: (-w.length, -w.scored, w.doc, w.start))
    scores = [SetScore(documents=sum(1 for d in docs if len(d) > 1)) for _ in runners]
    result_drift = DriftScore() if drift else None
    device = torch.device(device)
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    total = sum(w.scored for w in windows)
    with (
        torch.inference_mode(),
        autocast,
        _adapter_input_casts_off(runners, bf16),
        progress_bar(f"evaluate {label}".strip(), total) as advance,
    ):
        for first in range(0, len(windows), batch_size):
            batch = windows[first : first + batch_size]
            ids, targets, mask = _batch_tensors(batch, docs, device)
            # Hidden states at the scored positions, then the LM head a chunk of positions at a time:
            # the full next-token distributions of both models (positions x vocabulary, float32) would
            # take gigabytes, and drift needs both at once.
            outputs = []
            for runner in runners:
                with runner() as model:
                    outputs.append(_scored_outputs(model, ids, mask))
            n = int(targets.numel())
            for start in range(0, n, _HEAD_CHUNK):
                rows = slice(start, start + _HEAD_CHUNK)
                t = targets[rows]
                logprobs: list[Any] = []
                for runner, sums, out in zip(runners, scores, outputs, strict=True):
                    with runner() as model:
                        logits = _chunk_logits(model, out, rows)
                    # In float32 whatever the logits' precision (casting inside the op: no float32 copy
                    # of bf16 logits), summed in float64.
                    lp = F.log_softmax(logits, dim=-1, dtype=torch.float32)
                    del logits
                    sums.nll -= float(lp.gather(-1, t[:, None]).sum(dtype=torch.float64))
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


def _scored_outputs(model: Any, ids: Any, mask: Any) -> tuple[str, Any]:
    """("hidden", hidden states at the masked positions) where the model's logits are a plain linear
    head over them (see loss.decoder_and_head), else ("logits", the logits there)."""
    from cptkit.loss import decoder_and_head

    parts = decoder_and_head(model)
    if parts is None:
        return "logits", _scored_logits(model, ids, mask)
    decoder, _ = parts
    return "hidden", decoder(input_ids=ids, use_cache=False).last_hidden_state[mask]


def _chunk_logits(model: Any, output: tuple[str, Any], rows: slice) -> Any:
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


# ---------------------------------------------------------------- models


@dataclass
class ModelPair:
    """The base and the adapted model, ready to score."""

    base_runner: ModelRunner
    cpt_runner: ModelRunner
    base_tokenizer: TextTokenizer
    cpt_tokenizer: TextTokenizer
    cpt_model: Any
    description: dict[str, Any] = field(default_factory=dict)


def trained_training_config(cpt_dir: Path, fallback: TrainingConfig) -> TrainingConfig:
    """The training section the model in `cpt_dir` was trained with (saved next to it by train), else
    inferred from what the folder holds."""
    saved = cpt_dir / _TRAINED_CONFIG
    if saved.is_file():
        data = yaml.safe_load(saved.read_text(encoding="utf-8")) or {}
        if isinstance(data.get("training"), dict):
            try:
                return TrainingConfig.model_validate(data["training"])
            except ValueError:
                pass  # written by another cptkit version; infer below
    if (cpt_dir / "adapter_config.json").is_file():
        method = "qlora" if fallback.method == "qlora" else "lora"
        return fallback.model_copy(update={"method": method})
    return fallback.model_copy(update={"method": "full"})


def trained_base_model(cpt_dir: Path) -> str | None:
    """The base model a trained folder names: the model.name it was trained from, else the base in its
    adapter config."""
    saved = cpt_dir / _TRAINED_CONFIG
    if saved.is_file():
        data = yaml.safe_load(saved.read_text(encoding="utf-8")) or {}
        name = (data.get("model") or {}).get("name") if isinstance(data, dict) else None
        if isinstance(name, str) and name:
            return name
    adapter = read_json(cpt_dir / "adapter_config.json") or {}
    base = adapter.get("base_model_name_or_path")
    return str(base) if base else None


def load_pair(base_name: str, cpt_dir: Path, training: TrainingConfig, precision: str, device: Any) -> ModelPair:
    """Load the adapted model and its base. A peft adapter's base is the same weights with the adapter
    disabled (one copy in memory); a full model, or an adapter with trained embeddings (which the adapter
    switch does not undo), gets its base loaded separately, the way training loaded it."""
    import torch
    from transformers import AutoTokenizer

    from cptkit.models import load_base, load_trained, resolve_model

    if not cpt_dir.is_dir():
        raise CptkitError(f"{cpt_dir}: no such folder; train first (cptkit train) or pass --cpt-model")
    if not ((cpt_dir / "adapter_config.json").is_file() or (cpt_dir / "config.json").is_file()):
        raise CptkitError(f"{cpt_dir}: no trained model there (neither adapter_config.json nor config.json)")
    device = torch.device(device)
    trained = trained_training_config(cpt_dir, training).model_copy(update={"precision": precision})
    base_dir = resolve_model(base_name)
    cpt = load_trained(base_dir, cpt_dir, trained, device)
    is_adapter = (cpt_dir / "adapter_config.json").is_file()
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
    description = {
        "base_model": base_name,
        "base_model_path": str(base_dir),
        "cpt_model": str(cpt_dir),
        "method": trained.method,
        "base_scored_as": "the adapted model with its adapter disabled" if shared else "a separately loaded copy",
        "quantization": "4-bit NF4 base, as trained" if trained.method == "qlora" else "none",
    }
    return ModelPair(base_runner, fixed(cpt), text_tokenizer(base_tok), text_tokenizer(cpt_tok), cpt, description)


# ---------------------------------------------------------------- lm-evaluation-harness


def run_tasks(
    pair: ModelPair,
    tasks: list[str],
    max_length: int,
    batch_size: int,
    limit: int | None,
    include_path: Path | None = None,
    bf16: bool = False,
) -> dict[str, Any]:
    """Run lm-evaluation-harness tasks on both models, the harness's own and those in `include_path`.
    Never fails the evaluation: a task whose data cannot be loaded (offline hub, unknown name) is
    reported as not run, with the reason, and the other tasks still run."""
    if not tasks:
        return {"status": "not_requested", "tasks": []}
    if importlib.util.find_spec("lm_eval") is None:
        return {
            "status": "not_run",
            "tasks": tasks,
            "reason": "lm-evaluation-harness is not installed (pip install lm-eval)",
        }
    import torch

    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager, get_task_dict

        manager = TaskManager(include_path=str(include_path) if include_path is not None else None)
        # Each task loaded alone first: the data of one that cannot be had must not stop the others.
        missing: dict[str, str] = {}
        for task in tasks:
            try:
                get_task_dict([task], manager)
            except Exception as exc:
                missing[task] = _exception_line(exc)
        available = [t for t in tasks if t not in missing]
        results: dict[str, dict[str, Any]] = {}
        for name, runner, tok in (
            ("cpt", pair.cpt_runner, pair.cpt_tokenizer),
            ("base", pair.base_runner, pair.base_tokenizer),
        ):
            if not available:
                break
            device_type = pair.cpt_model.device.type
            autocast = torch.autocast(device_type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
            with runner() as model, autocast:
                lm = HFLM(
                    pretrained=model,
                    tokenizer=tok.tokenizer,
                    max_length=max_length,
                    batch_size=batch_size,
                    prefix_token_id=tok.prefix_id,  # what precedes a document in perplexity scoring too
                )
                # No standard errors: the report shows none, and bootstrapping some metrics' takes minutes.
                out = simple_evaluate(
                    model=lm, tasks=available, task_manager=manager, limit=limit, log_samples=False, bootstrap_iters=0
                )
            for task, metrics in (out or {}).get("results", {}).items():
                for key, value in metrics.items():
                    metric = key.split(",")[0]  # "acc,none": the metric and its filter
                    if isinstance(value, int | float) and "stderr" not in metric and metric not in _NOT_METRICS:
                        results.setdefault(task, {}).setdefault(metric, {})[name] = float(value)
    except Exception as exc:  # the harness failed in a way a task's check above did not catch
        return {"status": "not_run", "tasks": tasks, "reason": _exception_line(exc)}
    reason = "; ".join(f"{task}: {why}" for task, why in missing.items())
    if not available:
        return {"status": "not_run", "tasks": tasks, "reason": reason, "not_run": missing}
    if missing:
        return {"status": "partial", "tasks": tasks, "reason": reason, "not_run": missing, "results": results}
    return {"status": "ok", "tasks": tasks, "results": results}


# What the harness puts next to a task's metrics in its results.
_NOT_METRICS = {"alias", "sample_len", "samples"}


def _exception_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())[:300]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# ---------------------------------------------------------------- generations


def generate(pair: ModelPair, gc: GenerationConfig, device: Any) -> list[dict[str, str]]:
    """Completions of the fixed prompts by both models, with the same decoding settings."""
    import torch
    from transformers import GenerationConfig as HfGenerationConfig

    if gc.max_new_tokens == 0:
        return []
    prompts = [(DOMAIN, p) for p in gc.domain_prompts] + [(GENERAL, p) for p in gc.general_prompts]
    out = []
    for kind, prompt in prompts:
        row = {"kind": kind, "prompt": prompt}
        for name, runner, tok in (
            ("base", pair.base_runner, pair.base_tokenizer),
            ("cpt", pair.cpt_runner, pair.cpt_tokenizer),
        ):
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
            row[name] = _completion(tok.tokenizer, ids[0], generated[0])
        out.append(row)
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


# ---------------------------------------------------------------- verdict


def verdict(results: dict[str, Any], ec: EvaluateConfig) -> dict[str, Any]:
    """Adaptation, forgetting and drift against the thresholds; a check whose threshold or measurement is
    missing is reported as skipped."""
    checks = []

    def check(name: str, value: float | None, threshold: float | None, ok: Callable[[float, float], bool]) -> None:
        if threshold is None or value is None:
            checks.append({"name": name, "value": value, "threshold": threshold, "passed": None})
        else:
            checks.append({"name": name, "value": value, "threshold": threshold, "passed": bool(ok(value, threshold))})

    check("adaptation", results.get("adaptation"), ec.min_adaptation, lambda v, t: v >= t)
    for set_name, value in (results.get("forgetting_by_set") or {}).items():
        check(f"forgetting ({set_name})", value, ec.max_forgetting, lambda v, t: v <= t)
    check("drift_kl", results.get("drift_kl"), ec.max_drift_kl, lambda v, t: v <= t)
    decided = [c["passed"] for c in checks if c["passed"] is not None]
    return {"passed": all(decided), "checks": checks}


def relative_change(base: float, cpt: float) -> float:
    return (cpt - base) / base


# ---------------------------------------------------------------- the stage


@dataclass(frozen=True)
class EvaluateResult(StageResult):
    results: dict[str, Any] | None = None


def evaluation_dir(config: Config) -> Path:
    return config.output_dir / EVALUATION_DIR


def evaluate(
    config: Config,
    force: bool = False,
    output: Path | None = None,
    tracker_factory: Callable[..., Tracker] = open_tracker,
) -> EvaluateResult:
    """Evaluate the model in `config.output_dir` against its base `config.model.name`; write results.json,
    report.md and report.html to `<output_dir>/evaluation` (and the JSON to `output` too), log them to the
    training's MLflow run, and skip all of it when the model, sets and settings are unchanged."""
    ec = config.evaluate
    cpt_dir = config.output_dir
    if not cpt_dir.is_dir():
        raise CptkitError(f"{cpt_dir}: no such folder; train first (cptkit train) or pass --cpt-model")
    sources = eval_sources(config)
    if ec.task_include_path is not None and not ec.task_include_path.is_dir():
        raise CptkitError(f"evaluate.task_include_path: {ec.task_include_path}: no such folder")
    out = evaluation_dir(config)
    device, precision = choose_for_evaluation(config, cpt_dir)
    # The precision auto chose is part of the settings: results in bf16 are not those in fp32.
    config_fp = section_fingerprint(ec, config.model.name, config.model.tokenizer, precision.value)
    task_dir = ec.task_include_path if ec.tasks else None
    input_fp = _input_fingerprint(cpt_dir, sources, task_dir)
    existing = up_to_date(out, config_fp, input_fp)
    if existing is not None and not force:
        results = read_json(out / RESULTS)
        if output is not None and results is not None:
            write_json_atomic(output, results)
        return EvaluateResult(existing, out, skipped=True, results=results)

    invalidate(out)
    started = time.perf_counter()
    sets = {name: read_set(name, source, ec.max_documents) for name, source in sources.items()}
    summary = read_json(cpt_dir / _SUMMARY)
    results = _evaluate_sets(config, cpt_dir, sets, summary, device, precision)
    results["seconds"] = round(time.perf_counter() - started, 2)
    from cptkit.report import write_report

    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / RESULTS, results)
    report_files = write_report(results, summary, out)
    # Opened only now: a failed evaluation leaves the training's run as it was, and creates no run.
    tracker = _open_tracker(config, summary, tracker_factory)
    try:
        _log(tracker, results, out, [RESULTS, *report_files], step=int((summary or {}).get("steps") or 0))
    finally:
        tracker.end("FINISHED")  # the training run finished; a logging error must not mark it failed
    if output is not None:
        write_json_atomic(output, results)
    manifest = new_manifest("evaluate", config_fp, input_fp)
    manifest.update(
        outputs={n: {"bytes": (out / n).stat().st_size} for n in [RESULTS, *report_files]},
        base_model=config.model.name,
        cpt_model=str(cpt_dir),
        verdict=results["verdict"]["passed"],
        seconds=results["seconds"],
    )
    write_json_atomic(out / MANIFEST, manifest)
    return EvaluateResult(manifest, out, skipped=False, results=results)


def _input_fingerprint(cpt_dir: Path, sources: dict[str, SourceConfig], task_dir: Path | None = None) -> str:
    """The trained model (its train manifest, else its files' sizes and times), every set's input, and
    the files of the custom task folder (a changed task YAML or JSONL there means a rerun)."""
    train_manifest = read_json(cpt_dir / MANIFEST)
    if train_manifest is not None:
        model_id = f"{train_manifest.get('config_fingerprint')}:{train_manifest.get('created_at')}"
    else:
        model_id = _files_fingerprint(cpt_dir, recursive=False)
    parts = [model_id, *(f"{name}={set_fingerprint(s)}" for name, s in sources.items())]
    if task_dir is not None:
        parts.append(f"tasks={_files_fingerprint(task_dir, recursive=True)}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _files_fingerprint(folder: Path, recursive: bool) -> str:
    files = folder.rglob("*") if recursive else folder.iterdir()
    stats = sorted((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in files if p.is_file())
    return json.dumps(stats)


def _open_tracker(config: Config, summary: dict[str, Any] | None, factory: Callable[..., Tracker]) -> Tracker:
    """The training's MLflow run continued, or a new run when training was not tracked."""
    run_id = (summary or {}).get("mlflow_run_id")
    run_name = config.tracking.run_name or f"eval-{Path(config.model.name).name}"
    return factory(config.tracking, run_id, run_name)


def choose_for_evaluation(config: Config, cpt_dir: Path) -> tuple[Choice, Choice]:
    """The device (cuda > mps > cpu; a 4-bit model not on mps) and evaluate.precision for this machine."""
    from cptkit.capability import available_devices, probe
    from cptkit.choices import choose_device, choose_eval_precision

    method = trained_training_config(cpt_dir, config.training).method
    device = choose_device(available_devices(), method)
    return device, choose_eval_precision(probe(device.value), config.evaluate.precision)


def _evaluate_sets(
    config: Config,
    cpt_dir: Path,
    sets: dict[str, EvalSet],
    summary: dict[str, Any] | None,
    device_choice: Choice,
    precision: Choice,
) -> dict[str, Any]:
    import torch

    ec = config.evaluate
    context = ec.context_length or config.training.max_seq_length
    stride = ec.stride or max(1, context // 2)
    if stride > context:
        raise ConfigError([f"config error: evaluate.stride: {stride} exceeds the context length {context}"])
    device = torch.device(device_choice.value)
    pair = load_pair(config.model.name, cpt_dir, config.training, precision.value, device)
    for line in (device_choice.line("device"), precision.line("precision")):
        console.print(f"evaluate: {line}", highlight=False, markup=False, soft_wrap=True)
    if precision.warning:
        console.print(f"evaluate: warning: {precision.warning}", style="yellow", highlight=False, markup=False)
    bf16 = precision.value == "bf16"
    results: dict[str, Any] = {
        **pair.description,
        "settings": {
            "context_length": context,
            "stride": stride,
            "batch_size": ec.batch_size,
            "precision": precision.value,
            "precision_reason": precision.reason,
            "max_documents": ec.max_documents,
            "max_tokens": ec.max_tokens,
            "prefix_token_id": pair.cpt_tokenizer.prefix_id,
            "device": str(device),
            "device_reason": device_choice.reason,
        },
        "base": {},
        "cpt": {},
        "drift": {},
        "sets": {},
    }
    scored_tokens = 0
    score_seconds = 0.0
    for name, eval_set in sets.items():
        t0 = time.perf_counter()
        cut = False
        if ec.max_tokens is not None:
            eval_set, cut = cap_tokens(eval_set, pair.cpt_tokenizer.tokenizer, ec.max_tokens, min_share=context)
        base_docs = pair.base_tokenizer.encode(eval_set.texts)
        cpt_docs = pair.cpt_tokenizer.encode(eval_set.texts)
        same_tokens = len(base_docs) == len(cpt_docs) and all(
            np.array_equal(a, b) for a, b in zip(base_docs, cpt_docs, strict=True)
        )
        if same_tokens:
            (base_score, cpt_score), drift = score(
                [pair.base_runner, pair.cpt_runner], cpt_docs, context, stride, ec.batch_size, device, bf16, True, name
            )
            assert drift is not None
            results["drift"][name] = drift.as_dict()
        else:  # different tokenizers: scored separately; bits per byte still compares them
            (base_score,), _ = score([pair.base_runner], base_docs, context, stride, ec.batch_size, device, bf16)
            (cpt_score,), _ = score([pair.cpt_runner], cpt_docs, context, stride, ec.batch_size, device, bf16)
        score_seconds += time.perf_counter() - t0
        scored_tokens += base_score.tokens + cpt_score.tokens
        for score_ in (base_score, cpt_score):
            score_.bytes = eval_set.bytes
        results["base"][name] = base_score.as_dict()
        results["cpt"][name] = cpt_score.as_dict()
        results["sets"][name] = {
            "documents": len(eval_set.texts),
            "skipped": eval_set.skipped,
            "capped_at_tokens": ec.max_tokens if cut else None,  # the last document cut, later ones left out
            **eval_set.source,
        }
        console.print(
            f"evaluate {name}: perplexity {base_score.perplexity:.3f} -> {cpt_score.perplexity:.3f}, bits per byte "
            f"{base_score.bits_per_byte:.4f} -> {cpt_score.bits_per_byte:.4f} ({cpt_score.tokens:,} tokens)",
            highlight=False,
        )

    base_domain, cpt_domain = results["base"][DOMAIN]["perplexity"], results["cpt"][DOMAIN]["perplexity"]
    results["adaptation"] = -relative_change(base_domain, cpt_domain)
    held_out = [n for n in sets if n != DOMAIN]
    results["forgetting_by_set"] = {
        n: relative_change(results["base"][n]["perplexity"], results["cpt"][n]["perplexity"]) for n in held_out
    }
    # The worst held-out set: a gain on one general set must not hide a loss on another.
    results["forgetting"] = max(results["forgetting_by_set"].values()) if held_out else None
    general_drift = results["drift"].get(GENERAL)
    results["drift_kl"] = general_drift["kl"] if general_drift else None
    results["top1_agreement"] = general_drift["top1_agreement"] if general_drift else None
    results["tokens_per_second"] = scored_tokens / max(score_seconds, 1e-9)
    results["tasks"] = run_tasks(pair, ec.tasks, context, ec.batch_size, ec.task_limit, ec.task_include_path, bf16)
    results["generations"] = generate(pair, ec.generation, device)
    results["training"] = _training_facts(summary)
    results["data"] = _data_accounting(config)
    results["verdict"] = verdict(results, ec)
    return results


def _training_facts(summary: dict[str, Any] | None) -> dict[str, Any] | None:
    if summary is None:
        return None
    keys = ("steps", "tokens", "replay_share", "packing_efficiency", "tokens_per_second", "final_loss", "method")
    return {k: summary.get(k) for k in keys} | {"stopped_reason": summary.get("stopped_reason")}


def _data_accounting(config: Config) -> dict[str, Any]:
    """Document counts from the prepare manifests of the domain and replay data, where they exist."""
    out = {}
    for name, directory in (("domain", domain_dir(config)), ("replay", replay_dir(config))):
        m = read_json(directory / MANIFEST)
        if m is None or m.get("stage") != "prepare":
            continue
        keys = (
            "documents_in",
            "documents_kept",
            "dropped",
            "quarantined",
            "quarantined_by_reason",
            "train_documents",
            "val_documents",
            "train_tokens",
            "val_tokens",
            "redactions",
        )
        out[name] = {k: m.get(k) for k in keys}
    return out


def _log(tracker: Tracker, results: dict[str, Any], out: Path, files: list[str], step: int) -> None:
    metrics: dict[str, float] = {}
    for model in ("base", "cpt"):
        for set_name, s in results[model].items():
            metrics[f"eval/{set_name}/{model}_perplexity"] = s["perplexity"]
            metrics[f"eval/{set_name}/{model}_bits_per_byte"] = s["bits_per_byte"]
    for set_name, d in results["drift"].items():
        metrics[f"eval/{set_name}/drift_kl"] = d["kl"]
        metrics[f"eval/{set_name}/top1_agreement"] = d["top1_agreement"]
    for key in ("adaptation", "forgetting", "drift_kl", "top1_agreement"):
        if results.get(key) is not None:
            metrics[f"eval/{key}"] = results[key]
    metrics["eval/passed"] = float(results["verdict"]["passed"])
    tracker.log_metrics(metrics, step)
    for name in files:
        tracker.log_artifact(out / name, EVALUATION_DIR)
    tracker.set_tags({"cptkit.evaluation": "passed" if results["verdict"]["passed"] else "failed"})
