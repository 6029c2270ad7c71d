"""Shared fixtures: a tiny tokenizer trained here, a small corpus, an isolated working directory."""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from cptkit.cli import app

PROSE = [
    "The library provides a consistent interface for reading and writing structured data files. "
    "Each reader accepts a path and returns an iterator of records, and the writer mirrors that design "
    "so that a program can move data between formats with very little code of its own.",
    "Configuration is read from a single file that is validated before any work starts. When a value "
    "is missing the default from the schema is used, and when a value is wrong the program reports the "
    "key and the reason in one line, so that the user can fix it without reading a traceback.",
    "A cache keeps the results of expensive calls so that the second request for the same item is fast. "
    "The cache has a fixed size and evicts the least recently used entry when it is full, which keeps "
    "the memory use of a long running service predictable over days of traffic.",
    "Logging records what the program did and why. Messages carry a level, a time and the name of the "
    "component that wrote them, and handlers decide where each message goes: a file, the console, or a "
    "remote collector that the operations team watches during an incident.",
    "The scheduler runs jobs at fixed times or intervals. It stores the next run time of each job and "
    "sleeps until the earliest one is due, then starts the job in a worker thread and computes when it "
    "should run again, taking daylight saving changes and missed runs into account.",
    "Network clients retry failed requests with an exponential backoff and a limit on the total time "
    "spent. Each retry waits longer than the one before it, with some random jitter so that many "
    "clients recovering from the same outage do not all hit the server at the same moment.",
]


_SUBJECTS = [
    "the scheduler",
    "a worker thread",
    "the cache",
    "each reader",
    "the parser",
    "the client",
    "a background job",
    "the logging handler",
    "the config loader",
    "the storage layer",
    "an operator",
    "the test suite",
    "the build system",
    "a request handler",
    "the index",
]
_VERBS = [
    "reads",
    "validates",
    "writes",
    "retries",
    "compresses",
    "records",
    "schedules",
    "evicts",
    "parses",
    "measures",
    "rejects",
    "forwards",
    "caches",
    "merges",
    "sorts",
]
_OBJECTS = [
    "the next batch of records",
    "every incoming message",
    "the largest file in the folder",
    "a list of pending tasks",
    "the checksum of each block",
    "the oldest entry of the table",
    "a summary of the results",
    "the settings of the service",
    "the remaining items in the queue",
    "the tokens of a document",
    "the metrics of the last hour",
    "a copy of the current state",
]
_TAILS = [
    "before the deadline passes",
    "when the disk is almost full",
    "with a short delay between tries",
    "so that the operator can see what happened",
    "and then reports the outcome to the caller",
    "while the other threads keep working",
    "unless the user has turned that feature off",
    "in the order in which they arrived",
    "at the end of every working day",
    "for as long as it is needed",
]


def make_doc(i: int) -> str:
    """A distinct English document of 10 generated sentences in two paragraphs. Two such documents
    share few word 5-grams, so they are neither exact nor near duplicates of each other."""
    rng = random.Random(i)
    # Sampling without replacement keeps a document free of repeated phrases (the repetition filters).
    parts = zip(
        rng.sample(_SUBJECTS, 10), rng.sample(_VERBS, 10), rng.sample(_OBJECTS, 10), rng.sample(_TAILS, 10), strict=True
    )
    sentences = [f"{s.capitalize()} {v} {o} {t}." for s, v, o, t in parts]
    lead = f"Document number {i} describes component {i * 7 % 97} and its role in the system."
    return lead + "\n\n" + "\n\n".join(" ".join(sentences[k : k + 5]) for k in (0, 5))


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test runs in its own folder with its own cache and no Databricks variables."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CPTKIT_CACHE", str(tmp_path / ".cache"))
    for var in list(os.environ):
        if var.startswith("DATABRICKS_"):
            monkeypatch.delenv(var)


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A byte-level BPE tokenizer trained on the test prose, saved as a model folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([make_doc(i) for i in range(50)], trainer)
    out = tmp_path_factory.mktemp("tiny_tokenizer")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    fast.save_pretrained(out)
    return out


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


def shard_rows(folder: Path) -> list[dict[str, Any]]:
    """The rows of a prepared shard folder (`train_tokens/part-*.parquet`), in shard order."""
    import pyarrow.parquet as pq

    return [row for part in sorted(folder.glob("part-*.parquet")) for row in pq.read_table(part).to_pylist()]


def count_calls(monkeypatch: pytest.MonkeyPatch, module: Any, name: str) -> list[int]:
    """Replace `module.name` with a wrapper that appends to the returned list on every call."""
    calls: list[int] = []
    real = getattr(module, name)

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, counting)
    return calls


def write_config(path: Path, data: dict[str, Any]) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


@pytest.fixture
def cli() -> Callable[..., Any]:
    runner = CliRunner()

    def invoke(*args: str) -> Any:
        return runner.invoke(app, list(args), catch_exceptions=False)

    return invoke


@pytest.fixture
def corpus_config(tmp_path: Path, tiny_tokenizer_dir: Path) -> Iterator[Path]:
    """A config over a 40-document JSONL corpus with the tiny tokenizer."""
    rows = [{"doc_id": f"d{i}", "body": make_doc(i), "team": f"t{i % 3}"} for i in range(40)]
    write_jsonl(tmp_path / "docs.jsonl", rows)
    yield write_config(
        tmp_path / "cfg.yaml",
        {
            "model": {"name": str(tiny_tokenizer_dir)},
            "data": {"output_dir": "out"},
            "source": {
                "type": "jsonl",
                "path": "docs.jsonl",
                "text_column": "body",
                "id_column": "doc_id",
                "metadata_columns": ["team"],
            },
            "prepare": {"split": {"val_ratio": 0.2}},
        },
    )


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> Path:
    """A 2-layer random Llama (the SmolLM2 architecture) with the tiny tokenizer, as a model folder."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=400,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
    )
    out = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(config).save_pretrained(out)
    for item in tiny_tokenizer_dir.iterdir():
        shutil.copy(item, out / item.name)
    return out


# A small evaluation (news.jsonl as a further set) with loose gate thresholds, for the tests of the stages
# after evaluate: they are not about the tiny run's numbers, and tighten the thresholds with --set.
SMALL_EVALUATION: dict[str, Any] = {
    "context_length": 48,
    "stride": 48,
    "max_documents": 4,
    "min_adaptation": None,
    "max_forgetting": 10.0,
    "sets": {"news": {"type": "jsonl", "path": "news.jsonl"}},
    "generation": {"max_new_tokens": 0},
}


def prepared_run(
    tmp_path: Path,
    model_dir: Path,
    training: dict[str, Any],
    domain_docs: int = 60,
    general_texts: list[str] | None = None,
    replay_ratio: float = 0.25,
    **sections: Any,
) -> Path:
    """A domain + replay corpus of generated documents, extracted and prepared, and the config that
    trains `model_dir` on it (training settings and further config sections as given)."""
    from cptkit.config import load_config
    from cptkit.datasets import datasets
    from cptkit.extract import extract
    from cptkit.prepare import prepare

    write_jsonl(tmp_path / "docs.jsonl", [{"id": f"d{i}", "text": make_doc(i)} for i in range(domain_docs)])
    general = general_texts if general_texts is not None else [make_doc(1000 + i) for i in range(40)]
    write_jsonl(tmp_path / "general.jsonl", [{"id": f"g{i}", "text": text} for i, text in enumerate(general)])
    cfg_path = write_config(
        tmp_path / "cfg.yaml",
        {
            "model": {"name": str(model_dir)},
            "source": {"type": "jsonl", "path": "docs.jsonl", "id_column": "id"},
            "data": {
                "output_dir": "data",
                "replay_ratio": replay_ratio,
                "replay": {"type": "jsonl", "path": "general.jsonl", "id_column": "id"},
            },
            "prepare": {"split": {"val_ratio": 0.2}},
            "output_dir": "outputs/cpt_model",
            "training": training,
            "tracking": {"tracking_uri": "sqlite:///mlflow.db", "log_system_metrics": False},
            **sections,
        },
    )
    config = load_config(cfg_path)
    for dataset in datasets(config):
        extract(dataset)
        prepare(config, dataset)
    return cfg_path


@pytest.fixture(scope="session")
def spark() -> Iterator[Any]:
    """One local[2] SparkSession for every Spark test (starting one takes seconds)."""
    from cptkit.config import SparkConfig
    from cptkit.engines.spark_session import session

    started = session(SparkConfig(master="local[2]"))
    started.conf.set("spark.sql.shuffle.partitions", "4")
    yield started
    started.stop()
