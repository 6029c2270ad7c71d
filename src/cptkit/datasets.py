"""The document collections a config names: the domain data and, when configured, the general replay
data. Each is extracted and prepared the same way, into its own folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cptkit.config import Config, SourceConfig
from cptkit.errors import ConfigError

DOMAIN, REPLAY = "domain", "replay"


@dataclass(frozen=True)
class Dataset:
    name: str
    source: SourceConfig
    directory: Path  # prepared outputs; the raw snapshot is in directory / "raw"

    @property
    def raw_dir(self) -> Path:
        return self.directory / "raw"


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
