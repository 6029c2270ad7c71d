"""Reading a config: YAML, `--set` overrides and the seed's .env variables, validated into `Config`, with
every problem reported at once; and the config as plain data with its secrets masked."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import yaml
from dotenv import load_dotenv
from pydantic import SecretStr, ValidationError

from cptkit.config.schema import Config
from cptkit.config.sources import ENV_KEYS, SOURCE_TYPES
from cptkit.errors import ConfigError
from cptkit.secrets import is_secret_key, mask_value, remember


def masked_dict(config: Config) -> dict[str, Any]:
    """The resolved config as plain data with every secret masked (see `cptkit.secrets.mask_value`):
    typed secrets, known secret values and the user:password@ part of URLs."""
    masked: dict[str, Any] = mask_value(config.model_dump(mode="python", by_alias=True))
    return masked


def _secret_values(value: Any) -> list[str]:
    """Every SecretStr value in a config dump."""
    if isinstance(value, SecretStr):
        return [value.get_secret_value()]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _secret_values(v)]
    if isinstance(value, list | tuple):
        return [s for v in value for s in _secret_values(v)]
    return []


def parse_override(item: str) -> tuple[list[str], Any]:
    """Parse `a.b.c=value`; the value is read as YAML so numbers, booleans and lists work."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError([f"--set {item!r}: expected KEY=VALUE, e.g. training.learning_rate=1e-4"])
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[path[-1]] = value
    return data


def load_config(path: Path | None, overrides: list[str] | None = None, env_file: Path | None = None) -> Config:
    """Read, merge and validate a config. Raises ConfigError listing every problem at once."""
    data: dict[str, Any] = {}
    if path is not None:
        if not path.is_file():
            raise ConfigError([f"config error: {path}: config file not found"])
        try:
            loaded = yaml.safe_load(read_text(path))
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark is not None else ""
            problem = getattr(exc, "problem", None) or exc
            raise ConfigError([f"config error: {path}:{where}: not valid YAML ({problem})"]) from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError([f"config error: {path}: the top level must be a mapping of sections"])
        data = loaded
    data = apply_overrides(data, overrides or [])
    _fill_from_env(data, env_file if env_file is not None else Path.cwd() / ".env")
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_errors(exc)) from None
    # From here on no log line or console output of this process can print them.
    remember(*_secret_values(config.model_dump(mode="python")))
    return config


def read_text(path: Path) -> str:
    """A config or .env file's text; unreadable or non-UTF-8 bytes are a config error naming the file."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError([f"config error: {path}: cannot read ({exc.strerror or exc})"]) from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            [f"config error: {path}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start})"]
        ) from None


def _fill_from_env(data: dict[str, Any], env_file: Path) -> None:
    """The seed's .env variables fill the databricks section where the YAML leaves a key unset."""
    if env_file.is_file():
        load_dotenv(stream=io.StringIO(read_text(env_file)), override=False)
    section = data.get("databricks")
    if section is None:
        section = {}
        data["databricks"] = section
    if not isinstance(section, dict):
        return  # reported by validation
    for key, var in ENV_KEYS.items():
        if section.get(key) in (None, "") and os.environ.get(var):
            section[key] = os.environ[var]
    for source in _databricks_sources(data):
        _inherit_connection(source, section)


def _databricks_sources(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Every `type: databricks` source section in raw config data (domain, replay, evaluation sets)."""
    found: list[Any] = [data.get("source")]
    data_section, evaluate = data.get("data"), data.get("evaluate")
    if isinstance(data_section, dict):
        found.append(data_section.get("replay"))
    if isinstance(evaluate, dict):
        found += [evaluate.get("domain"), evaluate.get("general")]
        if isinstance(evaluate.get("sets"), dict):
            found += list(evaluate["sets"].values())
    return [s for s in found if isinstance(s, dict) and s.get("type") == "databricks"]


def _inherit_connection(source: dict[str, Any], defaults: dict[str, Any]) -> None:
    """A databricks source takes each connection key it leaves unset from the `databricks` section, and
    catalog/schema/table too unless its table is a three-part name. So a source section is complete on
    its own (evaluate and extract open sources without the rest of the config)."""
    three_part = isinstance(source.get("table"), str) and "." in source["table"]
    for key in ENV_KEYS:
        if key in ("catalog", "schema", "table") and three_part:
            continue
        if source.get(key) in (None, "") and defaults.get(key) not in (None, ""):
            source[key] = defaults[key]


def format_validation_errors(exc: ValidationError) -> list[str]:
    problems = []
    for err in exc.errors(include_url=False):
        loc = [str(p) for p in err["loc"]]
        # A discriminated union puts the chosen tag in the path (source.jsonl.path); drop it.
        loc = [p for i, p in enumerate(loc) if not (p in SOURCE_TYPES and _source_field(loc[:i]))]
        key = ".".join(loc) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "missing":
            msg = "required key is missing"
        elif "input" in err and not isinstance(err["input"], dict | list) and not is_secret_key(key):
            msg = f"{msg} (got {err['input']!r})"
        problems.append(f"config error: {key}: {msg}")
    return problems


def _source_field(path: list[str]) -> bool:
    """Whether `path` names a field that holds a source (source, data.replay, evaluate.domain/general,
    evaluate.sets.<name>)."""
    if not path:
        return False
    if path[-1] in ("source", "replay") or path[-2:] in (["evaluate", "domain"], ["evaluate", "general"]):
        return True
    return len(path) >= 3 and path[-3:-1] == ["evaluate", "sets"]
