"""Updates: what a training run that starts from an earlier model (`training.init_from`) learns.

With an incremental domain source (`mode: watermark | cdf`), extract keeps the whole current corpus (the
changes applied by id) and prepare splits it as always. The update then compares the prepared documents
with the record of the documents its start model learned (`learned_documents.parquet` in every
trained-model folder of an incremental source: id, exact key, MinHash signature, split):

- **new**: an id the start never learned, or a known id whose text changed; these are trained on;
- **learned**: the same id and text as a learned document; the train split's are the domain replay,
  drawn at `data.domain_replay_ratio` of the training tokens beside the general replay;
- **duplicate_of_trained**: a new id whose text is an exact duplicate of a learned document, or a near
  duplicate (prepare's MinHash settings and threshold); never trained on again;
- **deleted**: learned ids no longer in the corpus (a change feed's deletes): gone from the domain data,
  the replay and the record.

Nothing new to learn: the update trains nothing (`NothingNew`). The held-out documents are split the
same way into the new and the earlier validation sets (`update/new_val.jsonl`, `update/earlier_val.jsonl`
in the output folder), which the update gate scores.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cptkit.artifacts import MANIFEST, atomic_path, read_json, write_json_atomic
from cptkit.config import Config, PrepareConfig
from cptkit.datasets import TRAIN, TRAIN_TEXT, VAL, Dataset, datasets
from cptkit.dedup import MinHasher, band_hashes, estimated_jaccard, exact_key, lsh_bands
from cptkit.errors import ConfigError, StageError
from cptkit.model_folder import REGISTRATION_DIR
from cptkit.packing import TokenDocs
from cptkit.parquet_files import open_parquet
from cptkit.start_model import StartModel, check_start, resolve_start
from cptkit.train_data import TrainData

LEARNED = "learned_documents.parquet"  # in a trained-model folder: the documents that model has learned
LINEAGE = "lineage.json"  # in a trained-model folder: its parent, data versions, documents, cumulative tokens
UPDATE_DIR = "update"  # in the output folder: the new and earlier held-out sets
NEW_VAL, EARLIER_VAL = "new_val.jsonl", "earlier_val.jsonl"
DUPLICATE_OF_TRAINED = "duplicate_of_trained"
_LISTED = 1000  # ids listed per category in lineage.json

_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("key", pa.binary(16)),
        ("signature", pa.list_(pa.uint32())),
        ("split", pa.string()),
    ]
)


@dataclass
class DocumentKeys:
    """The prepared domain documents' identities, in a split's file order."""

    ids: list[str] = field(default_factory=list)
    keys: list[bytes] = field(default_factory=list)
    signatures: list[np.ndarray | None] = field(default_factory=list)
    splits: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)  # kept only for the validation split (written out)

    def table(self, rows: list[int]) -> pa.Table:
        return pa.table(
            {
                "id": [self.ids[i] for i in rows],
                "key": [self.keys[i] for i in rows],
                "signature": [_as_list(self.signatures[i]) for i in rows],
                "split": [self.splits[i] for i in rows],
            },
            schema=_SCHEMA,
        )


def _as_list(signature: np.ndarray | None) -> list[int] | None:
    return None if signature is None else [int(v) for v in signature]


def is_incremental(config: Config) -> bool:
    """Whether the domain source reads changes (watermark or change data feed): then training records the
    documents it learned, and a run with `training.init_from` trains on what changed."""
    return getattr(config.source, "mode", "full") != "full"


def _texts(dataset: Dataset) -> Iterator[tuple[str, str, str]]:
    """(id, text, split) of every prepared document: the train split (train.jsonl, or its text shards),
    then the validation split."""
    train_jsonl = dataset.directory / TRAIN
    if train_jsonl.is_file():
        yield from _jsonl(train_jsonl, "train")
    else:
        for part in sorted((dataset.directory / TRAIN_TEXT).glob("part-*.parquet")):
            for batch in open_parquet(part).iter_batches(columns=["id", "text"]):
                for doc_id, text in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist(), strict=True):
                    yield str(doc_id), str(text), "train"
    yield from _jsonl(dataset.directory / VAL, "val")


def _jsonl(path: Path, split: str) -> Iterator[tuple[str, str, str]]:
    if not path.is_file():
        return
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                row = json.loads(line)
                yield str(row["id"]), str(row["text"]), split


def document_keys(dataset: Dataset, prepare: PrepareConfig) -> DocumentKeys:
    """Exact keys (and MinHash signatures, where prepare's near dedup is on) of the prepared documents,
    computed as prepare computes them, over the texts prepare kept."""
    dedup = prepare.dedup
    hasher = MinHasher(dedup.num_perm, dedup.shingle_words) if dedup.near else None
    out = DocumentKeys()
    for doc_id, text, split in _texts(dataset):
        out.ids.append(doc_id)
        out.keys.append(exact_key(text))
        out.signatures.append(hasher.signature(text) if hasher is not None else None)
        out.splits.append(split)
        out.texts.append(text if split == "val" else "")
    return out


def read_learned(folder: Path) -> DocumentKeys | None:
    path = folder / LEARNED
    if not path.is_file():
        return None
    table = pq.read_table(path)
    sigs = table.column("signature").to_pylist()
    return DocumentKeys(
        ids=[str(x) for x in table.column("id").to_pylist()],
        keys=[bytes(x) for x in table.column("key").to_pylist()],
        signatures=[None if s is None else np.asarray(s, dtype=np.uint32) for s in sigs],
        splits=[str(x) for x in table.column("split").to_pylist()],
    )


# ---------------------------------------------------------------- the selection


@dataclass
class Selection:
    """Indexes into the current DocumentKeys, by fate."""

    new: list[int] = field(default_factory=list)
    changed: list[int] = field(default_factory=list)  # among `new`: a learned id whose text changed
    learned: list[int] = field(default_factory=list)
    duplicate_of_trained: list[int] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)  # learned ids no longer in the corpus

    def in_split(self, rows: list[int], docs: DocumentKeys, split: str) -> list[int]:
        return [i for i in rows if docs.splits[i] == split]


def select(current: DocumentKeys, learned: DocumentKeys, prepare: PrepareConfig) -> Selection:
    """Each current document's fate against what the start model learned (see the module's doc)."""
    pairs = set(zip(learned.ids, learned.keys, strict=True))
    learned_ids = set(learned.ids)
    learned_keys = set(learned.keys)
    near = _NearIndex(learned, prepare) if prepare.dedup.near else None
    out = Selection()
    for i, (doc_id, key) in enumerate(zip(current.ids, current.keys, strict=True)):
        if (doc_id, key) in pairs:
            out.learned.append(i)
        elif doc_id in learned_ids:  # a changed document: its new text is learned, whatever it resembles
            out.new.append(i)
            out.changed.append(i)
        elif key in learned_keys or (near is not None and near.matches(current.signatures[i], doc_id)):
            out.duplicate_of_trained.append(i)
        else:
            out.new.append(i)
    # Gone: neither the id nor its text is in the corpus (a learned text kept under another id, where
    # prepare's dedup kept the copy, is not gone).
    present, present_keys = set(current.ids), set(current.keys)
    out.deleted = sorted(
        {i for i, k in zip(learned.ids, learned.keys, strict=True) if i not in present and k not in present_keys}
    )
    return out


class _NearIndex:
    """The learned documents' LSH band hashes, for near-duplicate look-ups of new ones."""

    def __init__(self, learned: DocumentKeys, prepare: PrepareConfig) -> None:
        self.threshold = prepare.dedup.threshold
        self.bands = lsh_bands(prepare.dedup.threshold, prepare.dedup.num_perm)
        self.signatures = learned.signatures
        self.ids = learned.ids
        self.buckets: dict[tuple[int, int], list[int]] = {}
        for i, sig in enumerate(learned.signatures):
            if sig is None or len(sig) != prepare.dedup.num_perm:
                continue  # recorded under other MinHash settings: exact keys still apply
            for band, value in enumerate(band_hashes(sig, self.bands).tolist()):
                self.buckets.setdefault((band, value), []).append(i)

    def matches(self, signature: np.ndarray | None, doc_id: str) -> bool:
        if signature is None:
            return False
        seen: set[int] = set()
        for band, value in enumerate(band_hashes(signature, self.bands).tolist()):
            for j in self.buckets.get((band, value), []):
                if j in seen or self.ids[j] == doc_id:
                    continue
                seen.add(j)
                other = self.signatures[j]
                if other is not None and estimated_jaccard(signature, other) >= self.threshold:
                    return True
        return False


# ---------------------------------------------------------------- the update's training data


class NothingNew(Exception):
    """The update has nothing to learn: no new or changed domain documents since its start model."""

    def __init__(self, selection: Selection, start: StartModel) -> None:
        self.selection = selection
        self.start = start
        super().__init__(describe_nothing_new(selection, start))


def describe_nothing_new(selection: Selection, start: StartModel) -> str:
    parts = [f"{len(selection.learned)} documents already learned"]
    if selection.new:
        parts.append(f"{len(selection.new)} new ones, all in the held-out split")
    if selection.duplicate_of_trained:
        parts.append(f"{len(selection.duplicate_of_trained)} new ones duplicate learned text ({DUPLICATE_OF_TRAINED})")
    if selection.deleted:
        parts.append(f"{len(selection.deleted)} deleted")
    where = f"version {start.version} of {start.name}" if start.version else start.spec
    return f"nothing new to learn since {where}: " + ", ".join(parts) + "; nothing trained"


@dataclass
class Update:
    """What a run trains on, and where it starts: `data` and `config` are what train uses."""

    config: Config
    data: TrainData
    start: StartModel | None
    current: DocumentKeys | None = None  # the prepared domain documents (incremental sources)
    selection: Selection | None = None  # against the start's record (an update of an incremental source)
    domain_replay_tokens: int = 0
    general_replay_tokens: int = 0


def plan(config: Config, data: TrainData) -> Update:
    """The run's start model and training data. Without `training.init_from`, the data as prepared. With it,
    the start's weights are the starting point; with an incremental source too, the data is the new text,
    the domain replay and the general replay. Raises NothingNew when there is nothing new to learn."""
    start = resolve_start(config)
    if start is not None:
        if start.folder.resolve() == config.output_dir.resolve():
            raise ConfigError(
                [
                    f"config error: training.init_from: {start.spec} is output_dir; train the update into "
                    "another folder (its start must stay as it is)"
                ]
            )
        config = check_start(start, config)
    if not is_incremental(config):
        return Update(config, data, start)
    domain = datasets(config)[0]
    current = document_keys(domain, config.prepare)
    learned = read_learned(start.folder) if start is not None else None
    if start is None or learned is None:
        return Update(config, data, start, current)
    selection = select(current, learned, config.prepare)
    if not selection.in_split(selection.new, current, "train"):
        raise NothingNew(selection, start)
    return _update_data(config, data, start, current, selection)


def fingerprint(update: Update) -> str:
    """The training run's fingerprint: its config and data, and the start model it loads."""
    from cptkit.config import section_fingerprint
    from cptkit.train_data import train_fingerprint

    plain = train_fingerprint(update.config, update.data)
    return plain if update.start is None else section_fingerprint(plain, update.start.identity)


def planned(config: Config, data: TrainData) -> Update:
    """`plan`, for the preflight: with nothing new, the data as prepared (train says it will train nothing)."""
    try:
        return plan(config, data)
    except NothingNew:
        return Update(config, data, None)


def nothing_new(config: Config) -> str | None:
    """Why this run, an update, has nothing new to learn; None when it has (or is no update)."""
    if config.training.init_from is None or not is_incremental(config):
        return None
    from cptkit.train_data import load_train_data

    try:
        plan(config, load_train_data(config))
    except NothingNew as nothing:
        return str(nothing)
    return None


def _update_data(
    config: Config, data: TrainData, start: StartModel, current: DocumentKeys, selection: Selection
) -> Update:
    general_ratio = config.data.replay_ratio if data.replay_train is not None else 0.0
    domain_ratio = config.data.domain_replay_ratio
    total = general_ratio + domain_ratio
    if total >= 1:
        raise ConfigError(
            [
                f"config error: data.replay_ratio + data.domain_replay_ratio must stay below 1 for an update "
                f"(they are {config.data.replay_ratio} + {domain_ratio})"
            ]
        )
    train_index = {doc_id: i for i, doc_id in enumerate(_token_ids(config, "train"))}
    val_index = {doc_id: i for i, doc_id in enumerate(_token_ids(config, "val"))}
    new_train = [train_index[current.ids[i]] for i in selection.in_split(selection.new, current, "train")]
    new_val = [val_index[current.ids[i]] for i in selection.in_split(selection.new, current, "val")]
    old_train = [train_index[current.ids[i]] for i in selection.in_split(selection.learned, current, "train")]
    domain_train = subset(data.domain_train, new_train)
    rng = np.random.default_rng([config.training.seed, 17])
    epochs = max(1, math.ceil(config.training.num_epochs))
    needed = (domain_train.total_tokens + len(domain_train)) * epochs  # tokens of the new text, per run
    general = domain = None
    if general_ratio and data.replay_train is not None and len(data.replay_train):
        rows = list(range(len(data.replay_train)))
        general = sample(data.replay_train, rows, round(needed * general_ratio / (1 - total)), rng)
    if domain_ratio and old_train:
        domain = sample(data.domain_train, old_train, round(needed * domain_ratio / (1 - total)), rng)
    parts = [p for p in (general, domain) if p is not None and len(p)]
    replay = concat(parts) if parts else None
    updated = TrainData(
        domain_train=domain_train,
        domain_val=subset(data.domain_val, new_val) if new_val else data.domain_val,
        replay_train=replay,
        general_val=data.general_val,
        separator=data.separator,
        manifests=data.manifests,
    )
    # The replay stream carries both replays, in proportion: together they are this share of the tokens.
    ratio = total if replay is not None else 0.0
    config = config.model_copy(update={"data": config.data.model_copy(update={"replay_ratio": ratio})})
    return Update(
        config,
        updated,
        start,
        current,
        selection,
        domain_replay_tokens=domain.total_tokens if domain is not None else 0,
        general_replay_tokens=general.total_tokens if general is not None else 0,
    )


def _token_ids(config: Config, split: str) -> list[str]:
    """The document ids of a split's token shards, in the order training reads them."""
    domain = datasets(config)[0]
    manifest = read_json(domain.directory / MANIFEST) or {}
    folder = domain.tokens(split)
    shards = (manifest.get("shards") or {}).get(folder.name, [])
    ids: list[str] = []
    for shard in shards:
        path = folder.parent / shard["file"]
        if not path.is_file():
            raise StageError(f"{path}: a token shard the manifest lists is missing; rerun `cptkit prepare`")
        ids.extend(str(x) for x in pq.read_table(path, columns=["id"]).column("id").to_pylist())
    return ids


def subset(docs: TokenDocs, rows: list[int]) -> TokenDocs:
    """The documents `rows` of `docs`, copied (an update's new text is a small share of the corpus)."""
    return _from_arrays([np.asarray(docs.doc(i)) for i in rows])


def sample(docs: TokenDocs, rows: list[int], tokens: int, rng: np.random.Generator) -> TokenDocs:
    """Documents of `rows` in a random order until they hold `tokens` tokens (all of them, when fewer)."""
    order = rng.permutation(len(rows))
    picked, taken = [], 0
    for k in order:
        if taken >= tokens:
            break
        picked.append(rows[int(k)])
        taken += int(docs.lengths[rows[int(k)]]) + 1
    return subset(docs, picked)


def concat(parts: list[TokenDocs]) -> TokenDocs:
    return _from_arrays([np.asarray(p.doc(i)) for p in parts for i in range(len(p))])


def _from_arrays(arrays: list[np.ndarray]) -> TokenDocs:
    offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
    np.cumsum([len(a) for a in arrays], out=offsets[1:])
    values = np.concatenate(arrays).astype(np.int32) if arrays else np.zeros(0, np.int32)
    return TokenDocs(values, offsets)


# ---------------------------------------------------------------- what the trained model records


def write_records(out: Path, update: Update, config: Config, tokens: int) -> None:
    """The learned-documents record and the lineage of the model just trained into `out` (before its
    manifest, which is written last)."""
    if update.current is None:
        return
    current, selection = update.current, update.selection
    if selection is None:
        rows = list(range(len(current.ids)))  # a first model learns the whole corpus
    else:
        rows = sorted([*selection.learned, *selection.new, *selection.duplicate_of_trained])
    with atomic_path(out / LEARNED) as tmp:
        pq.write_table(current.table(rows), tmp, compression="zstd")
    _write_held_out(out, current, selection)
    write_json_atomic(out / LINEAGE, lineage(update, config, tokens))


def _write_held_out(out: Path, current: DocumentKeys, selection: Selection | None) -> None:
    """The new and the earlier domain held-out documents, for the update gate."""
    folder = out / UPDATE_DIR
    folder.mkdir(parents=True, exist_ok=True)
    val = [i for i, s in enumerate(current.splits) if s == "val"]
    new = set(selection.new) if selection is not None else set(val)
    for name, rows in ((NEW_VAL, [i for i in val if i in new]), (EARLIER_VAL, [i for i in val if i not in new])):
        with atomic_path(folder / name) as tmp, tmp.open("w", encoding="utf-8") as fh:
            for i in rows:
                fh.write(json.dumps({"id": current.ids[i], "text": current.texts[i]}, ensure_ascii=False) + "\n")


def lineage(update: Update, config: Config, tokens: int) -> dict[str, Any]:
    """Where the model comes from: its parent, the data versions and watermarks it saw, its documents and
    the tokens of its whole chain."""
    start, selection = update.start, update.selection
    parent_lineage = read_json(start.folder / LINEAGE) if start is not None else None
    cumulative = tokens + int((parent_lineage or {}).get("cumulative_tokens", 0) or 0)
    if start is not None and parent_lineage is None:
        summary = read_json(start.folder / "training_summary.json") or {}
        cumulative += int(summary.get("tokens", 0) or 0)
    data: dict[str, Any] = {}
    for dataset in datasets(config):
        raw = read_json(dataset.raw_dir / MANIFEST) or {}
        incremental = raw.get("incremental") or {}
        data[dataset.name] = {
            "delta_version": raw.get("delta_version"),
            "content": raw.get("content_fingerprint"),
            "mode": incremental.get("mode"),
            "state": incremental.get("state"),
        }
    record: dict[str, Any] = {
        "parent": None,
        "data": data,
        "tokens": tokens,
        "cumulative_tokens": cumulative,
        "documents": {"learned": len(update.current.ids) if update.current is not None else None},
    }
    if start is not None:
        record["parent"] = {
            "init_from": start.spec,
            "name": start.name,
            "version": start.version or registered_version(start.folder),
            "identity": start.identity,
            "data": (parent_lineage or {}).get("data"),
        }
    if selection is not None and update.current is not None:
        ids = update.current.ids
        record["documents"] = {
            "new": len(selection.new),
            "changed": len(selection.changed),
            "replayable": len(selection.learned),
            DUPLICATE_OF_TRAINED: len(selection.duplicate_of_trained),
            "deleted": len(selection.deleted),
            "new_ids": [ids[i] for i in selection.new[:_LISTED]],
            f"{DUPLICATE_OF_TRAINED}_ids": [ids[i] for i in selection.duplicate_of_trained[:_LISTED]],
            "deleted_ids": selection.deleted[:_LISTED],
        }
        record["replay_tokens"] = {"domain": update.domain_replay_tokens, "general": update.general_replay_tokens}
    return record


def registered_version(folder: Path) -> str | None:
    """The registry version the model in `folder` was last registered as (register's manifest), or None."""
    manifest = read_json(folder / REGISTRATION_DIR / MANIFEST) or {}
    version = (manifest.get("result") or {}).get("version")
    return str(version) if version is not None else None
