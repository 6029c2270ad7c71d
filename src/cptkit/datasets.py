"""The document collections a config names: the domain data and, when configured, the general replay
data. Each is extracted and prepared the same way, into its own folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cptkit.config import Config, SourceConfig
from cptkit.errors import ConfigError

DOMAIN, REPLAY = "domain", "replay"
# A dataset's folder: the raw snapshot extract writes (raw/), and the splits and token files prepare writes.
RAW = "raw"
SNAPSHOT = "documents.parquet"
TRAIN, VAL = "train.jsonl", "val.jsonl"
# Folders of Parquet shards (`prepared_files`): the token ids of each split, and the training text when
# train.jsonl is not written.
TRAIN_TOKENS, VAL_TOKENS, TRAIN_TEXT = "train_tokens", "val_tokens", "train_text"
QUARANTINE, DROPPED = "quarantine.jsonl", "dropped.jsonl"


@dataclass(frozen=True)
class Dataset:
    name: str
    source: SourceConfig
    directory: Path  # prepared outputs; the raw snapshot is in directory / "raw"

    @property
    def raw_dir(self) -> Path:
        return self.directory / RAW

    @property
    def snapshot(self) -> Path:
        return self.raw_dir / SNAPSHOT

    def tokens(self, split: str) -> Path:
        """The token shards' folder of the train or val split."""
        return self.directory / (TRAIN_TOKENS if split == "train" else VAL_TOKENS)


def domain_dir(config: Config) -> Path:
    return config.data.output_dir


def replay_dir(config: Config) -> Path:
    return config.data.output_dir / REPLAY


def datasets(config: Config) -> list[Dataset]:
    """The configured datasets, domain first. The domain source is required."""
    if config.source is None:
        raise ConfigError(["config error: source: required (e.g. source: {type: jsonl, path: docs.jsonl})"])
    out = [Dataset(DOMAIN, config.source, domain_dir(config))]
    if config.data.replay is not None:
        out.append(Dataset(REPLAY, config.data.replay, replay_dir(config)))
    return out
