"""What training reads: the prepared token files of the domain and replay datasets, the separator token
between packed documents, and the run's fingerprint and step count. Train and the preflight both use it."""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cptkit.artifacts import MANIFEST, read_json
from cptkit.config import Config, TrainingConfig, section_fingerprint
from cptkit.datasets import Dataset, datasets
from cptkit.errors import ConfigError, StageError
from cptkit.packing import SEPARATOR_TOKEN, TokenDocs
from cptkit.parquet_files import open_parquet
from cptkit.tokenization import cache_dir


@dataclass(frozen=True)
class TrainData:
    domain_train: TokenDocs
    domain_val: TokenDocs
    replay_train: TokenDocs | None
    general_val: TokenDocs | None
    separator: int
    manifests: dict[str, dict[str, Any]]  # dataset name -> prepare manifest


def read_tokens(folder: Path, shards: list[dict[str, Any]]) -> TokenDocs:
    """A split's token shards as one TokenDocs whose tokens are memory-mapped, so that training's memory
    does not grow with the corpus (8 bytes per document stay in memory: the offsets). Parquet is compressed
    and cannot be mapped; its tokens are copied once, one row group at a time, into a flat file in the
    cptkit cache, named by the shards' fingerprints (so a new preparation gets a new copy, and a resumed or
    repeated run reuses it)."""
    if sum(int(s.get("tokens", 0)) for s in shards) == 0:
        return TokenDocs(np.zeros(0, np.int32), np.zeros(1, np.int64))
    key = hashlib.sha256("".join(s["sha256"] for s in shards).encode()).hexdigest()[:32]
    cached = cache_dir() / "tokens" / key
    if not (cached / _OFFSETS).is_file():
        _copy_once(folder, shards, cached)
    return TokenDocs(np.memmap(cached / _VALUES, dtype=np.int32, mode="r"), np.load(cached / _OFFSETS))


_VALUES, _OFFSETS = "values.int32", "offsets.npy"


def _copy_once(folder: Path, shards: list[dict[str, Any]], cached: Path) -> None:
    """Write the flat copy under a temporary name and rename it into place. Every process of a
    multi-process run (or two runs at once) may be making the same copy: whoever renames first wins, and
    the others, finding it complete, drop their own."""
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{cached.name}.", suffix=".tmp", dir=cached.parent))
    try:
        _flatten(folder, shards, tmp)
        try:
            os.rename(tmp, cached)
        except OSError:
            if not (cached / _OFFSETS).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _flatten(folder: Path, shards: list[dict[str, Any]], out: Path) -> None:
    offsets = [np.zeros(1, np.int64)]
    end = 0
    with (out / _VALUES).open("wb") as values:
        for shard in shards:
            path = folder.parent / shard["file"]
            if not path.is_file():
                raise StageError(f"{path}: a token shard the manifest lists is missing; rerun `cptkit prepare`")
            # A row group at a time (Arrow's default batch of 65,536 documents would hold most of a shard).
            for batch in open_parquet(path).iter_batches(batch_size=1024, columns=["input_ids"]):
                column = batch.column(0)
                np.asarray(column.flatten(), dtype=np.int32).tofile(values)
                ends = column.offsets.to_numpy().astype(np.int64)
                offsets.append(ends[1:] - ends[0] + end)
                end = int(offsets[-1][-1]) if len(offsets[-1]) else end
    np.save(out / _OFFSETS, np.concatenate(offsets))


def _dataset_tokens(dataset: Dataset) -> tuple[TokenDocs, TokenDocs, dict[str, Any]]:
    manifest = read_json(dataset.directory / MANIFEST)
    if manifest is None or manifest.get("stage") != "prepare":
        raise StageError(f"{dataset.directory}: the {dataset.name} data is not prepared; run `cptkit prepare` first")
    if manifest.get("tokenizer") is None:
        raise StageError(
            f"{dataset.directory}: the {dataset.name} data was prepared without tokens; "
            "set prepare.tokenize: true and run `cptkit prepare`"
        )
    shards = manifest.get("shards") or {}
    train, val = dataset.tokens("train"), dataset.tokens("val")
    return read_tokens(train, shards.get(train.name, [])), read_tokens(val, shards.get(val.name, [])), manifest


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
