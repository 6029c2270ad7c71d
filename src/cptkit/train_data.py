"""What training reads: the prepared token files of the domain and replay datasets, the separator token
between packed documents, and the run's fingerprint and step count. Train and the preflight both use it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from cptkit.artifacts import MANIFEST, read_json
from cptkit.config import Config, TrainingConfig, section_fingerprint
from cptkit.datasets import Dataset, datasets
from cptkit.errors import ConfigError, StageError
from cptkit.packing import SEPARATOR_TOKEN, TokenDocs


@dataclass(frozen=True)
class TrainData:
    domain_train: TokenDocs
    domain_val: TokenDocs
    replay_train: TokenDocs | None
    general_val: TokenDocs | None
    separator: int
    manifests: dict[str, dict[str, Any]]  # dataset name -> prepare manifest


def read_tokens(path: Path) -> TokenDocs:
    column = pq.read_table(path, columns=["input_ids"]).column("input_ids").combine_chunks()
    values = column.values.to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
    offsets = column.offsets.to_numpy().astype(np.int64)
    return TokenDocs(values, offsets - offsets[0])


def _dataset_tokens(dataset: Dataset) -> tuple[TokenDocs, TokenDocs, dict[str, Any]]:
    manifest = read_json(dataset.directory / MANIFEST)
    if manifest is None or manifest.get("stage") != "prepare":
        raise StageError(f"{dataset.directory}: the {dataset.name} data is not prepared; run `cptkit prepare` first")
    if manifest.get("tokenizer") is None:
        raise StageError(
            f"{dataset.directory}: the {dataset.name} data was prepared without tokens; "
            "set prepare.tokenize: true and run `cptkit prepare`"
        )
    return read_tokens(dataset.tokens("train")), read_tokens(dataset.tokens("val")), manifest


def separator_id(tokenizer_info: dict[str, Any]) -> int:
    """The token between packed documents: `<|endoftext|>` where the vocabulary has it (the pretraining
    separator of most small models, also of instruct variants whose eos is a chat token), else eos."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(tokenizer_info["path"])
    found = tok.token_to_id(SEPARATOR_TOKEN)
    if found is not None:
        return int(found)
    if tokenizer_info.get("eos_token_id") is not None:
        return int(tokenizer_info["eos_token_id"])
    raise StageError(f"tokenizer {tokenizer_info['name']} has neither {SEPARATOR_TOKEN} nor an eos token")


def require_replay_source(config: Config) -> None:
    problem = config.data.replay_problem()
    if problem is not None:
        raise ConfigError([f"config error: {problem}"])


def load_train_data(config: Config) -> TrainData:
    require_replay_source(config)
    sets = {d.name: d for d in datasets(config)}
    domain_train, domain_val, domain_manifest = _dataset_tokens(sets["domain"])
    manifests = {"domain": domain_manifest}
    replay_train = general_val = None
    if "replay" in sets:
        replay_train, general_val, manifests["replay"] = _dataset_tokens(sets["replay"])
        if manifests["replay"]["tokenizer"]["fingerprint"] != domain_manifest["tokenizer"]["fingerprint"]:
            raise StageError("the domain and replay data were tokenized differently; rerun `cptkit prepare`")
    if len(domain_train) == 0:
        raise StageError(f"{sets['domain'].directory}: no domain training documents were kept by prepare")
    return TrainData(
        domain_train,
        domain_val,
        replay_train if config.data.replay_ratio > 0 else None,
        general_val,
        separator_id(domain_manifest["tokenizer"]),
        manifests,
    )


def train_fingerprint(config: Config, data: TrainData) -> str:
    inputs = {name: (m["config_fingerprint"], m["input_fingerprint"]) for name, m in data.manifests.items()}
    return section_fingerprint(config.training, config.model, config.data.replay_ratio, inputs)


def planned_steps(tc: TrainingConfig, blocks_per_epoch: int, num_processes: int = 1) -> int:
    """Optimizer steps of a run: training.max_steps, else enough for num_epochs passes over the epoch's blocks."""
    global_blocks_per_step = tc.micro_batch_size * tc.gradient_accumulation_steps * num_processes
    return tc.max_steps or max(1, math.ceil(tc.num_epochs * blocks_per_epoch / global_blocks_per_step))
