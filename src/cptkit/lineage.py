"""A registered model's lineage: what each version carries as MLflow tags (its parent version, the data
versions and watermarks it saw, its tokens and the chain's cumulative tokens, the update gate's numbers,
where its trained-model folder is logged), and `cptkit history`, the chain of versions read back.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cptkit.artifacts import read_json
from cptkit.model_folder import EVALUATION_DIR, REGISTRATION_DIR
from cptkit.registry import CHAMPION, Registry
from cptkit.start_model import FOLDER_ARTIFACT, FOLDER_TAG
from cptkit.update_gate import summary_of
from cptkit.updates import LINEAGE

PREFIX = "cptkit."
PARENT_TAG = f"{PREFIX}parent_version"
# The trained-model folder's parts that are logged with a version (not its evaluation, registration,
# checkpoints or export folders): enough to start an update from it on another machine.
_SKIPPED_FOLDERS = {EVALUATION_DIR, REGISTRATION_DIR, "checkpoints", "export", ".staging"}


def log_trained_folder(registry: Registry, run_id: str, cpt_dir: Path) -> str:
    """Log the trained-model folder (its files and the update's held-out sets) to the version's run; the
    runs:/ URI of the copy. Files are linked into a temporary folder, not copied, where the disk allows."""
    tmp = Path(tempfile.mkdtemp(prefix=".cptkit-model.", suffix=".tmp", dir=cpt_dir.parent))
    try:
        for item in cpt_dir.iterdir():
            if item.name.startswith(".") or item.name in _SKIPPED_FOLDERS:
                continue
            if item.is_dir():
                shutil.copytree(item, tmp / item.name, copy_function=_link_or_copy)
            else:
                _link_or_copy(str(item), str(tmp / item.name))
        return registry.log_folder(run_id, tmp, FOLDER_ARTIFACT)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _link_or_copy(source: str, target: str) -> str:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)
    return target


def lineage_tags(cpt_dir: Path, folder_uri: str | None) -> dict[str, str]:
    """The version tags of the model in `cpt_dir`: parent, data versions and watermarks, tokens, documents,
    the update gate's scores."""
    tags: dict[str, str] = {}
    if folder_uri is not None:
        tags[FOLDER_TAG] = folder_uri
    record = read_json(cpt_dir / LINEAGE)
    if record is not None:
        parent = record.get("parent") or {}
        if parent.get("version") is not None:
            tags[PARENT_TAG] = str(parent["version"])
        if parent.get("init_from"):
            tags[f"{PREFIX}parent"] = str(parent["init_from"])
        tags[f"{PREFIX}tokens"] = str(record.get("tokens"))
        tags[f"{PREFIX}cumulative_tokens"] = str(record.get("cumulative_tokens"))
        for name, data in (record.get("data") or {}).items():
            for key in ("delta_version", "mode", "content"):
                if data.get(key) is not None:
                    tags[f"{PREFIX}data.{name}.{key}"] = str(data[key])
            state = data.get("state") or {}
            if state.get("watermark") is not None:
                tags[f"{PREFIX}data.{name}.watermark"] = json.dumps(state["watermark"], sort_keys=True)
            if state.get("version") is not None:
                tags[f"{PREFIX}data.{name}.state_version"] = str(state["version"])
        for key, value in (record.get("documents") or {}).items():
            if isinstance(value, int):
                tags[f"{PREFIX}documents.{key}"] = str(value)
    update = summary_of(cpt_dir / EVALUATION_DIR)
    if update is not None:
        for set_name, scores in (update.get("sets") or {}).items():
            for model, value in (scores.get("bits_per_byte") or {}).items():
                tags[f"{PREFIX}update.{set_name.replace(' ', '_')}.{model}_bits_per_byte"] = f"{value:.6g}"
        tags[f"{PREFIX}update.gate"] = "passed" if update.get("passed") else "failed"
    return tags


# ---------------------------------------------------------------- cptkit history


@dataclass(frozen=True)
class VersionLine:
    version: str
    aliases: list[str]
    tags: dict[str, str]

    @property
    def parent(self) -> str | None:
        return self.tags.get(PARENT_TAG)


def chain(registry: Registry, name: str, version: str | None = None) -> list[VersionLine]:
    """The version asked for (default the latest), its parent, its parent's parent, ... to the first."""
    found = {v: VersionLine(v, aliases, tags) for v, tags, aliases in registry.versions(name)}
    if not found:
        return []
    current: str | None = version or max(found, key=int)
    out: list[VersionLine] = []
    while current is not None and current in found and all(line.version != current for line in out):
        out.append(found[current])
        current = found[current].parent
    return out


def describe(line: VersionLine) -> list[str]:
    """A version's lines in the history: what it is, what it learned, how it scored."""
    t = line.tags
    aliases = f" [{', '.join(sorted(line.aliases))}]" if line.aliases else ""
    head = f"version {line.version}{aliases}"
    head += f" <- parent version {line.parent}" if line.parent else " (trained from the base)"
    gate = t.get(f"{PREFIX}gate")
    if gate:
        head += f"; gate {gate}"
    out = [head]
    tokens = t.get(f"{PREFIX}tokens")
    if tokens and tokens != "None":
        out.append(f"  tokens {int(tokens):,}, cumulative {int(t.get(f'{PREFIX}cumulative_tokens', tokens)):,}")
    data = [
        f"{key.split('.')[2]} {key.split('.')[3]} {value}"
        for key, value in sorted(t.items())
        if key.startswith(f"{PREFIX}data.") and key.split(".")[-1] in ("delta_version", "mode", "watermark")
    ]
    if data:
        out.append("  data: " + ", ".join(data))
    docs = {k.split(".")[-1]: v for k, v in t.items() if k.startswith(f"{PREFIX}documents.")}
    if docs:
        out.append("  documents: " + ", ".join(f"{k} {v}" for k, v in sorted(docs.items())))
    update = {
        k[len(f"{PREFIX}update.") :]: v
        for k, v in t.items()
        if k.startswith(f"{PREFIX}update.") and k != f"{PREFIX}update.gate"
    }
    if update:
        by_set: dict[str, dict[str, str]] = {}
        for key, value in update.items():
            set_name, model = key.split(".", 1)
            by_set.setdefault(set_name.replace("_", " "), {})[model.removesuffix("_bits_per_byte")] = value
        for set_name, models in by_set.items():
            trio = ", ".join(f"{m} {models[m]}" for m in ("base", "champion", "candidate") if m in models)
            out.append(f"  {set_name} bits/byte: {trio}")
    evals = {
        k.split(".", 2)[2]: v for k, v in t.items() if k.startswith(f"{PREFIX}eval.") and not k.endswith("domain_set")
    }
    if evals:
        out.append("  evaluation: " + ", ".join(f"{k} {v}" for k, v in sorted(evals.items())))
    return out


def history_lines(registry: Registry, name: str, version: str | None = None) -> list[str]:
    lines = chain(registry, name, version)
    if not lines:
        return [f"history: {name} has no registered versions in {registry.where()}"]
    champion = registry.alias_version(name, CHAMPION)
    out = [f"history: {name} in {registry.where()}, champion: version {champion or 'none'}"]
    for line in lines:
        out.extend(describe(line))
    return out
