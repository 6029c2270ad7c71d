"""The preflight of `cptkit run`: what training will do and cost, worked out before it starts.

Data counts come from the prepare manifests when they are current, else from the source itself (rows and
text bytes counted, tokens estimated from a tokenized sample). Steps use train's own computation on the
same packed stream, so they are exact once the data is prepared. Speed and peak memory come from a few
real optimizer steps on the model loaded as train loads it. Problems that would fail later (a sequence
length above the model's, a tokenizer the model's embedding cannot hold, a model that does not fit,
replay without a replay source) are raised here as one-line errors.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cptkit.artifacts import MANIFEST, read_json, up_to_date
from cptkit.budget import budget_steps
from cptkit.choices import Choice, TrainingChoices
from cptkit.config import Config, TrainingConfig
from cptkit.datasets import Dataset, datasets
from cptkit.distributed import group_size, threads_per_process
from cptkit.errors import CptkitError
from cptkit.models import ModelDescription, resolve_model
from cptkit.packing import BlockStream, TokenDocs
from cptkit.schedule import lr_factor, warmup_steps, wsd_decay_start
from cptkit.tokenization import TokenizerInfo, resolve_tokenizer
from cptkit.train_data import (
    TrainData,
    load_train_data,
    planned_steps,
    require_replay_source,
    separator_id,
    train_fingerprint,
)

WARMUP_STEPS, TIMED_STEPS = 1, 2
SAMPLE_DOCUMENTS = 256  # documents tokenized to estimate tokens per byte of a source not prepared yet
# A forward pass without the backward costs about a third of a training step (per token).
_FORWARD_SHARE = 1 / 3


@dataclass(frozen=True)
class DatasetFacts:
    name: str
    estimated: bool  # True: counted in the source before prepare; tokens from a tokenized sample
    documents: int  # kept documents (prepared), or source rows (estimated)
    train_documents: int
    val_documents: int
    train_tokens: int
    val_tokens: int
    text_bytes: int | None = None  # estimated only
    sampled_documents: int | None = None  # estimated only
    note: str | None = None


@dataclass(frozen=True)
class Measured:
    device: str
    precision: str
    warmup_steps: int
    timed_steps: int
    seconds_per_step: float
    tokens_per_second: float  # real (non-padding) tokens of every process, as training_summary.json counts them
    load_seconds: float
    peak_memory_bytes: int  # of one process
    memory_kind: str
    processes: int = 1
    tokens_per_second_per_process: float = 0.0
    # How the tokens/s of several processes was obtained: None for one process, else the method in words.
    throughput_basis: str | None = None


@dataclass(frozen=True)
class Plan:
    datasets: list[DatasetFacts]
    estimated: bool  # the step plan rests on estimated token counts
    seq_len: int
    blocks_per_step: int  # of every process together
    blocks_per_epoch: int
    steps: int
    epochs: float
    domain_tokens_per_epoch: int
    replay_tokens_per_epoch: int
    replay_share: float
    learning_rates: list[tuple[str, int, float]]  # (what, step (1-based), rate)
    train_up_to_date: bool = False
    description: ModelDescription | None = None
    measured: Measured | None = None
    estimated_seconds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    choices: TrainingChoices | None = None  # device, precision and method, with why
    evaluate_precision: Choice | None = None
    max_steps: int | None = None  # with training.max_minutes: the most steps (steps is what fits the budget)
    processes: int = 1  # training processes (each takes blocks_per_step / processes of every step)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["description"] = self.description.as_dict() if self.description else None
        data["choices"] = self.choices.as_dict() if self.choices else None
        return data

    @property
    def warnings(self) -> list[str]:
        found = list(self.choices.warnings) if self.choices else []
        if self.evaluate_precision is not None and self.evaluate_precision.warning:
            found.append(self.evaluate_precision.warning)
        return found


def preflight(config: Config, measure: bool = True, dry_run: bool = False, processes: int | None = None) -> Plan:
    """Check the configuration against the model and the data, and plan the run; with `measure`, time a
    few optimizer steps and measure their peak memory. In a dry run, data that is not prepared (or not
    current) is counted in its source and its tokens estimated; otherwise it must be prepared. Writes no
    stage output. `processes`: the training processes planned for (default: the launcher's group, or 1)."""
    processes = processes or group_size()
    require_replay_source(config)
    if not config.prepare.tokenize:
        raise CptkitError("prepare.tokenize is false, but training needs the tokens; set prepare.tokenize: true")
    model_dir = resolve_model(config.model.name)
    model_vocab = _check_model(config, model_dir)
    from cptkit.choices import choose_eval_precision, resolve_training

    choices = resolve_training(config.training, model_dir)
    tc = choices.apply(config.training)
    eval_precision = choose_eval_precision(choices.capability, config.evaluate.precision)
    tokenizer = resolve_tokenizer(config.model.tokenizer_name)
    if tokenizer.vocab_size > model_vocab:
        raise CptkitError(
            f"the tokenizer of {tokenizer.name} has {tokenizer.vocab_size:,} tokens but the model's embedding has "
            f"{model_vocab:,} rows: ids from {model_vocab:,} up would fail in training; use the model's own "
            "tokenizer (model.tokenizer)"
        )
    sets = datasets(config)
    facts = {d.name: _prepared_facts(config, d, tokenizer, check_current=dry_run) for d in sets}
    prepared = all(f is not None for f in facts.values())
    if not prepared and not dry_run:
        load_train_data(config)  # says which data is not prepared
    samples: dict[str, TokenDocs] = {}
    for d in sets:
        if facts[d.name] is None:
            facts[d.name], samples[d.name] = _source_facts(config, d, tokenizer)
    found = [f for f in facts.values() if f is not None]

    blocks_per_step = tc.micro_batch_size * tc.gradient_accumulation_steps * processes
    notes: list[str] = []
    train_up_to_date = False
    if prepared:
        data = load_train_data(config)
        _check_token_ids(data, model_vocab)
        fingerprint = train_fingerprint(config, data)
        train_up_to_date = up_to_date(config.output_dir, fingerprint, fingerprint) is not None
        stream = BlockStream(
            data.domain_train, data.replay_train, config.data.replay_ratio, tc.seed, data.separator, tc.max_seq_length
        )
        epoch0 = stream.epoch_blocks(0)
        per_epoch = len(epoch0)
        replay_share = epoch0.replay_share
        replay_tokens = round(epoch0.real_tokens * replay_share)
        domain_tokens = epoch0.real_tokens - replay_tokens
    else:
        domain, replay = facts["domain"], facts.get("replay")
        assert domain is not None
        domain_blocks = math.ceil((domain.train_tokens + domain.train_documents) / tc.max_seq_length)
        replay_blocks = 0
        if replay is not None and config.data.replay_ratio > 0:
            replay_blocks = round(domain_blocks * config.data.replay_ratio / (1 - config.data.replay_ratio))
        per_epoch = domain_blocks + replay_blocks
        domain_tokens, replay_tokens = domain.train_tokens, replay_blocks * tc.max_seq_length
        replay_share = replay_tokens / max(domain_tokens + replay_tokens, 1)
        sample = samples.get("domain") or TokenDocs.from_lists([])
        separator = separator_id(asdict(tokenizer))
        if len(sample) == 0:
            raise CptkitError("the domain source holds no text to train on")
        stream = BlockStream(sample, None, 0.0, tc.seed, separator, tc.max_seq_length)
    replay_facts = facts.get("replay")
    if replay_facts is not None and replay_tokens > replay_facts.train_tokens:
        notes.append(
            f"replay text repeats: an epoch uses {replay_tokens:,} replay tokens, the replay data has "
            f"{replay_facts.train_tokens:,}"
        )

    steps = planned_steps(tc, per_epoch, processes)
    plan = Plan(
        datasets=found,
        estimated=not prepared,
        seq_len=tc.max_seq_length,
        blocks_per_step=blocks_per_step,
        blocks_per_epoch=per_epoch,
        steps=steps,
        epochs=steps * blocks_per_step / max(per_epoch, 1),
        domain_tokens_per_epoch=domain_tokens,
        replay_tokens_per_epoch=replay_tokens,
        replay_share=replay_share,
        learning_rates=learning_rate_points(tc, steps),
        train_up_to_date=train_up_to_date,
        notes=notes,
        choices=choices,
        evaluate_precision=eval_precision,
        processes=processes,
    )
    if not measure or (train_up_to_date and not dry_run):
        return plan  # timing steps of a training that will be skipped would only cost time
    description, measured = measure_steps(config, model_dir, stream, choices, processes)
    return _with_estimates(plan, description, measured, tc, facts)


def learning_rate_points(tc: TrainingConfig, steps: int) -> list[tuple[str, int, float]]:
    """The schedule's key points: first update, end of warmup (the peak), start of the wsd decay, last update."""
    warm = warmup_steps(tc, steps)

    def rate(step: int) -> float:  # step is 1-based, as train prints it
        return tc.learning_rate * lr_factor(step - 1, steps, tc)

    points = [("first step", 1, rate(1))]
    if warm > 1:
        points.append(("end of warmup", warm, rate(warm)))
    if tc.lr_scheduler == "wsd":
        decay_start = wsd_decay_start(tc, steps)
        if warm < decay_start < steps:
            points.append(("decay starts", decay_start + 1, rate(decay_start + 1)))
    if steps > max(warm, 1):
        points.append(("last step", steps, rate(steps)))
    return points


def _check_model(config: Config, model_dir: Path) -> int:
    """Check the sequence length against the model's; return the model's vocabulary (embedding rows)."""
    from transformers import AutoConfig

    try:
        text = AutoConfig.from_pretrained(str(model_dir)).get_text_config()
    except (OSError, ValueError, KeyError) as exc:
        raise CptkitError(f"cannot read the model config in {model_dir}: {exc}") from None
    limit = getattr(text, "max_position_embeddings", None)
    if limit is not None and config.training.max_seq_length > limit:
        raise CptkitError(
            f"training.max_seq_length {config.training.max_seq_length} is above the {limit} positions "
            f"{config.model.name} was trained for (max_position_embeddings); set training.max_seq_length <= {limit}"
        )
    return int(text.vocab_size)


def _check_token_ids(data: TrainData, model_vocab: int) -> None:
    # From the manifests' shard lists: the tokens themselves may be larger than memory.
    for name, manifest in data.manifests.items():
        for folder, shards in (manifest.get("shards") or {}).items():
            largest = max((int(s.get("max_token_id", -1)) for s in shards), default=-1)
            if largest >= model_vocab:
                raise CptkitError(
                    f"the prepared {name} data ({folder}) holds token id {largest:,} but the model's embedding has "
                    f"{model_vocab:,} rows: it was tokenized with another tokenizer; rerun prepare with the model's "
                    "tokenizer"
                )


# ---------------------------------------------------------------- data counts


def _prepared_facts(
    config: Config, dataset: Dataset, tokenizer: TokenizerInfo, check_current: bool
) -> DatasetFacts | None:
    """The prepare manifest's counts. With `check_current`, only when it matches the config, the tokenizer
    and the raw snapshot, and the snapshot matches the source (where the source can tell without being read)."""
    from cptkit.extract import extract_fingerprint
    from cptkit.prepare import prepare_fingerprint
    from cptkit.sources import open_source

    extracted = read_json(dataset.raw_dir / MANIFEST)
    manifest = read_json(dataset.directory / MANIFEST)
    if extracted is None or manifest is None or manifest.get("stage") != "prepare":
        return None
    if not check_current:
        return _facts_from(dataset.name, manifest, None)
    content = str(extracted.get("content_fingerprint"))
    if up_to_date(dataset.directory, prepare_fingerprint(config, tokenizer), content) is None:
        return None
    source = open_source(dataset.source)
    try:
        source_fp = source.input_fingerprint()
    finally:
        if hasattr(source, "close"):
            source.close()
    note = None
    if source_fp is None:
        note = f"as of the last extract ({extracted.get('created_at')}); the source cannot say whether it changed"
    elif up_to_date(dataset.raw_dir, extract_fingerprint(dataset), source_fp) is None:
        return None
    return _facts_from(dataset.name, manifest, note)


def _facts_from(name: str, manifest: dict[str, Any], note: str | None) -> DatasetFacts:
    return DatasetFacts(
        name=name,
        estimated=False,
        documents=int(manifest["documents_kept"]),
        train_documents=int(manifest["train_documents"]),
        val_documents=int(manifest["val_documents"]),
        train_tokens=int(manifest["train_tokens"]),
        val_tokens=int(manifest["val_tokens"]),
        note=note,
    )


def _source_facts(config: Config, dataset: Dataset, tokenizer: TokenizerInfo) -> tuple[DatasetFacts, TokenDocs]:
    """Rows and text bytes counted in the source, tokens estimated from the first documents tokenized
    (before quality filters and dedup, which only remove). Also returns the sample's tokens."""
    from tokenizers import Tokenizer

    from cptkit.sources import TEXT, open_source

    rows = text_bytes = 0
    sample: list[str] = []
    source = open_source(dataset.source)
    try:
        for batch in source.batches():
            rows += batch.num_rows
            for text in batch.column(TEXT).to_pylist():
                if text is None:
                    continue
                text_bytes += len(text.encode("utf-8", "surrogatepass"))
                if len(sample) < SAMPLE_DOCUMENTS:
                    sample.append(text)
    finally:
        if hasattr(source, "close"):
            source.close()
    encoded = [e.ids for e in Tokenizer.from_file(tokenizer.path).encode_batch(sample, add_special_tokens=False)]
    sample_bytes = sum(len(t.encode("utf-8", "surrogatepass")) for t in sample)
    tokens = round(text_bytes * sum(map(len, encoded)) / sample_bytes) if sample_bytes else 0
    val = config.prepare.split.val_ratio
    facts = DatasetFacts(
        name=dataset.name,
        estimated=True,
        documents=rows,
        train_documents=round(rows * (1 - val)),
        val_documents=round(rows * val),
        train_tokens=round(tokens * (1 - val)),
        val_tokens=round(tokens * val),
        text_bytes=text_bytes,
        sampled_documents=len(sample),
    )
    return facts, TokenDocs.from_lists(encoded)


# ---------------------------------------------------------------- timed steps


def measure_steps(
    config: Config, model_dir: Path, stream: BlockStream, choices: TrainingChoices, processes: int = 1
) -> tuple[ModelDescription, Measured]:
    """Load the model as train does (with the same choices), run WARMUP_STEPS + TIMED_STEPS optimizer
    steps on the stream's first blocks, and measure their time and the peak memory (the same measure train
    records); then free it all.

    For a run of several `processes`: in a launched group of that size every process runs the steps, as
    training does (the tokens/s is measured); otherwise this one process runs one process's share of a
    step, on a CPU with the threads each of them will have, and the tokens/s of all is this one's times
    `processes` (an estimate: the gradients' all-reduce and the processes' contention are not in it)."""
    import torch

    tc = choices.apply(config.training)
    device = torch.device(choices.device.value)
    in_group = group_size() == processes > 1
    threads = torch.get_num_threads()
    if processes > 1 and not in_group and device.type == "cpu":
        torch.set_num_threads(threads_per_process(processes))
    try:
        description, measured = _timed_steps(config, model_dir, stream, choices, tc, device)
    finally:
        torch.set_num_threads(threads)
    if processes == 1:
        return description, measured
    if in_group:  # the steps' token counts are every process's already
        per_process = measured.tokens_per_second / processes
        basis = f"measured: {processes} processes ran the timed steps together"
        total = measured.tokens_per_second
    else:
        per_process = measured.tokens_per_second
        total = per_process * processes
        where = (
            f"on {threads_per_process(processes)} CPU threads, its share of this machine's, "
            if device.type == "cpu"
            else ""
        )
        basis = (
            f"estimated: one process's timed steps {where}x {processes} processes; the gradients' all-reduce "
            "is not included"
        )
    return description, dataclasses.replace(
        measured,
        processes=processes,
        tokens_per_second=total,
        tokens_per_second_per_process=per_process,
        throughput_basis=basis,
    )


def _timed_steps(
    config: Config, model_dir: Path, stream: BlockStream, choices: TrainingChoices, tc: TrainingConfig, device: Any
) -> tuple[ModelDescription, Measured]:
    import torch

    from cptkit.training_step import optimizer_step, set_up

    started = time.perf_counter()
    setup, _ = set_up(model_dir, tc, choices)
    load_seconds = time.perf_counter() - started
    setup.model.train()
    per_step = tc.micro_batch_size * tc.gradient_accumulation_steps
    seconds, tokens = 0.0, 0
    try:
        for step in range(WARMUP_STEPS + TIMED_STEPS):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            result = optimizer_step(setup, list(stream.batch(step * per_step, per_step)), tc)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if step >= WARMUP_STEPS:
                seconds += time.perf_counter() - t
                tokens += result.real_tokens
    except torch.OutOfMemoryError:
        raise CptkitError(
            f"training does not fit in {device} memory ({setup.loaded.description}); lower training.micro_batch_size "
            "or training.max_seq_length, set training.gradient_checkpointing=true, or use training.method qlora"
        ) from None
    peak = setup.memory.peak_bytes()
    description = setup.loaded.description
    accelerator, memory_kind = setup.accelerator, setup.memory.kind
    del setup
    accelerator.free_memory()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    measured = Measured(
        device=str(device),
        precision={"no": "fp32"}.get(str(accelerator.mixed_precision), str(accelerator.mixed_precision)),
        warmup_steps=WARMUP_STEPS,
        timed_steps=TIMED_STEPS,
        seconds_per_step=seconds / TIMED_STEPS,
        tokens_per_second=tokens / max(seconds, 1e-9),
        load_seconds=load_seconds,
        peak_memory_bytes=peak,
        memory_kind=memory_kind,
        tokens_per_second_per_process=tokens / max(seconds, 1e-9),
    )
    return description, measured


def _with_estimates(
    plan: Plan,
    description: ModelDescription,
    measured: Measured,
    tc: TrainingConfig,
    facts: dict[str, DatasetFacts | None],
) -> Plan:
    """The plan with the measured model and an estimated duration: the steps at the measured speed, plus
    the validation passes (forward only) and loading the model. With training.max_minutes, the steps are
    those that fit the budget at the measured speed (train derives them again from its own first steps)."""
    blocks = 0
    for name in ("domain", "replay"):
        f = facts.get(name)
        if f is not None:
            n = math.ceil((f.val_tokens + f.val_documents) / tc.max_seq_length)
            blocks += n if tc.eval_max_sequences is None else min(n, tc.eval_max_sequences)
    # The processes share the validation passes' batches, each at one process's speed per block.
    per_block = measured.seconds_per_step * plan.processes / plan.blocks_per_step
    per_eval = math.ceil(blocks / plan.processes) * per_block * _FORWARD_SHARE
    if tc.max_minutes is not None:
        budget = tc.max_minutes * 60 - per_eval  # the base model's validation pass comes first
        per_step, trainable = measured.seconds_per_step, description.trainable_params
        steps = budget_steps(tc, budget, 0, plan.steps, per_step, per_eval, trainable)
        plan = dataclasses.replace(
            plan,
            steps=steps,
            max_steps=plan.steps,
            epochs=steps * plan.blocks_per_step / max(plan.blocks_per_epoch, 1),
            learning_rates=learning_rate_points(tc, steps),
        )
    evals = 1 + sum(1 for s in range(1, plan.steps + 1) if s % tc.eval_steps == 0 or s == plan.steps)
    estimate = {
        "load": measured.load_seconds,
        "steps": plan.steps * measured.seconds_per_step,
        "validation": evals * per_eval,
    }
    estimate["total"] = sum(estimate.values())
    return dataclasses.replace(plan, description=description, measured=measured, estimated_seconds=estimate)
