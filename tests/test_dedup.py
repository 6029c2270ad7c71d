"""Dedup has one definition, independent of input order and partitioning: of each group of exact
duplicates, and of each connected component of verified near-duplicate pairs, the document with the
smallest stable key (snapshot id, then exact key) stays."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np

from conftest import make_doc, shard_rows, write_config, write_jsonl
from cptkit.config import DedupConfig, PrepareConfig
from cptkit.corpus import DUPLICATE_REASONS, drop_duplicates
from cptkit.dedup import (
    MinHasher,
    band_hashes,
    colliding_groups,
    content_keys,
    document_order,
    estimated_jaccard,
    exact_duplicates,
    lsh_bands,
    near_duplicates,
    similar_links,
)
from cptkit.engines.work_files import DedupStore
from cptkit.records import RecordProcessor
from cptkit.sources.base import content_id

CONFIG = PrepareConfig.model_validate({"quality": {"min_stop_words": 0}})
DEDUP = CONFIG.dedup


def _variant(words: list[str], positions: range, tag: str) -> list[str]:
    out = list(words)
    for p in positions:
        out[p] = f"{tag}{p}"
    return out


def chain() -> tuple[str, str, str]:
    """A~B and B~C are near duplicates whose bands collide; A and C are not similar and share no band."""
    a = make_doc(7).split(" ")
    step = len(a) // 2
    b = _variant(a, range(17, len(a), step), "beta")
    c = _variant(b, range(17 + step // 2, len(a), step), "gamma")
    return " ".join(a), " ".join(b), " ".join(c)


def _fates(ids: list[str], texts: list[str | None], config: DedupConfig = DEDUP) -> dict[str, tuple[str, Any]]:
    results = RecordProcessor(CONFIG.model_copy(update={"dedup": config}), None).process(texts, [None] * len(texts))
    drop_duplicates(ids, results, config)
    return {i: (r.status, r.reason) for i, r in zip(ids, results, strict=True)}


def test_exact_duplicates_keep_the_smallest_id_not_the_first() -> None:
    fates = _fates(["z", "b", "m", "a"], [make_doc(1), make_doc(1), make_doc(1), make_doc(2)])
    assert fates == {
        "z": ("drop", "exact_duplicate"),
        "b": ("keep", None),
        "m": ("drop", "exact_duplicate"),
        "a": ("keep", None),
    }


def test_ids_compare_as_strings_by_code_point_then_by_exact_key() -> None:
    ids = ["9", "10", "é", "e", "Z", "😀", "a", "ö", "a"]
    keys = content_keys([bytes([i]) * 16 for i in range(len(ids))])
    keys[6] = content_keys([b"\xff" * 16])[0]  # the first "a" has the larger key, so it sorts after the second
    order = document_order(ids, keys)
    by_order = [ids[i] for i in np.argsort(order)]
    assert by_order == sorted(ids)  # Python compares str by code point, as Arrow and Spark compare UTF-8
    assert by_order[:2] == ["10", "9"]  # numeric ids compare as text
    assert order[8] < order[6]
    assert sorted(order.tolist()) == list(range(len(ids)))


def test_a_chain_of_near_duplicates_collapses_to_its_smallest_id() -> None:
    a, b, c = chain()
    hasher, bands = MinHasher(DEDUP.num_perm, DEDUP.shingle_words), lsh_bands(DEDUP.threshold, DEDUP.num_perm)
    sa, sb, sc = (hasher.signature(t) for t in (a, b, c))
    ba, bb, bc = (band_hashes(s, bands) for s in (sa, sb, sc))
    # What makes it a chain: A~B and B~C collide and pass the check, A and C do neither.
    assert estimated_jaccard(sa, sb) >= 0.8 and (ba == bb).any()
    assert estimated_jaccard(sb, sc) >= 0.8 and (bb == bc).any()
    assert estimated_jaccard(sa, sc) < 0.8 and not (ba == bc).any()

    # First-in-source-order kept A and C (C is not similar to A, and B, a duplicate, was never indexed).
    fates = _fates(["doc-c", "doc-b", "doc-a"], [a, b, c])
    assert fates == {
        "doc-c": ("drop", "near_duplicate"),
        "doc-b": ("drop", "near_duplicate"),
        "doc-a": ("keep", None),
    }
    assert _fates(["doc-a", "doc-b", "doc-c"], [a, b, c])["doc-a"] == ("keep", None)


def test_a_band_collision_below_the_threshold_links_nothing() -> None:
    bands = lsh_bands(0.8, 128)
    a = np.arange(128, dtype=np.uint32)
    b = a.copy()
    b[bands.rows :] += 1000  # the same first band, nothing else in common
    c = a.copy()
    c[-5:] += 1000  # 123 of 128 equal
    signatures = np.stack([a, b, c])
    hashes = np.stack([band_hashes(s, bands) for s in signatures])
    assert (hashes[0] == hashes[1]).sum() == 1
    assert any(set(g.tolist()) >= {0, 1} for g in colliding_groups(hashes))  # a candidate pair
    order = np.array([1, 0, 2])  # b first
    assert near_duplicates(hashes[:2], signatures[:2], order[:2], 0.8).tolist() == [False, False]
    assert near_duplicates(hashes[:2], signatures[:2], order[:2], 0.05).tolist() == [True, False]
    # c is near a but not b; a comes after b but is the first of its component {a, c}.
    assert near_duplicates(hashes, signatures, order, 0.8).tolist() == [False, False, True]


def test_exact_duplicates_take_the_first_by_order_whatever_the_position() -> None:
    keys = content_keys([b"k" * 16, b"j" * 16, b"k" * 16, b"k" * 16])
    assert exact_duplicates(keys, np.array([3, 0, 1, 2])).tolist() == [True, False, False, True]


def _mixed_corpus(rng: random.Random) -> tuple[list[str], list[str | None]]:
    """Distinct documents, exact copies, near copies, a chain, junk; ids in no particular order."""
    texts: list[str | None] = [make_doc(i) for i in range(100, 130)]
    texts += [make_doc(i) for i in (103, 103, 117, 129)]
    texts += [make_doc(i).replace("component", "module", 1) for i in (105, 117, 122)]
    texts += [*chain(), "Too short.", None]
    ids = [f"{rng.randrange(10**6):06d}-{i}" for i in range(len(texts))]
    return ids, texts


def test_shuffled_input_keeps_the_same_documents() -> None:
    ids, texts = _mixed_corpus(random.Random(0))
    expected = _fates(ids, texts)
    reasons = sorted(str(r) for _, r in expected.values())
    assert reasons.count("exact_duplicate") == 4 and reasons.count("near_duplicate") == 5
    for seed in range(4):
        pairs = list(zip(ids, texts, strict=True))
        random.Random(seed).shuffle(pairs)
        assert _fates([i for i, _ in pairs], [t for _, t in pairs]) == expected


def test_the_engines_compact_store_decides_as_the_in_memory_function(tmp_path: Path) -> None:
    import pyarrow as pa

    ids, texts = _mixed_corpus(random.Random(1))
    expected = _fates(ids, texts)
    results = RecordProcessor(CONFIG, None).process(texts, [None] * len(texts))
    with DedupStore(len(ids), DEDUP, tmp_path) as store:
        for start in range(0, len(ids), 7):
            store.add(pa.array(ids[start : start + 7], pa.string()), results[start : start + 7])
        fates = iter(store.fates().tolist())
    kept_ids = [i for i, r in zip(ids, results, strict=True) if r.status == "keep"]
    decided = {i: DUPLICATE_REASONS.get(next(fates)) for i in kept_ids}
    assert decided == {i: reason for i, (status, reason) in expected.items() if i in decided}


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _prepare(cli: Any, tmp_path: Path, name: str, rows: list[Any], settings: dict[str, Any]) -> dict[str, Any]:
    write_jsonl(tmp_path / f"{name}.jsonl", rows)
    cfg = write_config(
        tmp_path / f"{name}.yaml",
        {
            "source": {"type": "jsonl", "path": f"{name}.jsonl", **settings.pop("source", {})},
            "data": {"output_dir": f"out_{name}"},
            "prepare": {"quality": {"min_stop_words": 0}, **settings.pop("prepare", {})},
            **settings,
        },
    )
    assert cli("extract", "-c", str(cfg)).exit_code == 0
    result = cli("prepare", "-c", str(cfg))
    assert result.exit_code == 0, result.output
    out = Path(f"out_{name}")
    m = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert m["documents_in"] == m["documents_kept"] + sum(m["dropped"].values()) + m["quarantined"]
    return {
        "manifest": {k: m[k] for k in ("documents_in", "documents_kept", "dropped", "quarantined_by_reason")}
        | {k: m[k] for k in ("train_documents", "val_documents", "train_tokens", "val_tokens", "dedup_semantics")},
        "train": sorted(map(json.dumps, _jsonl(out / "train.jsonl"))),
        "val": sorted(map(json.dumps, _jsonl(out / "val.jsonl"))),
        "dropped": sorted(map(json.dumps, _jsonl(out / "dropped.jsonl"))),
        "tokens": {
            split: sorted((r["id"], tuple(r["input_ids"])) for r in shard_rows(out / f"{split}_tokens"))
            for split in ("train", "val")
            if (out / f"{split}_tokens").exists()
        },
    }


def test_a_shuffled_source_gives_the_same_prepared_data_for_any_workers(
    tmp_path: Path, cli: Any, tiny_tokenizer_dir: Path
) -> None:
    ids, texts = _mixed_corpus(random.Random(2))
    rows: list[Any] = [{"id": i, "text": t} for i, t in zip(ids, texts, strict=True)] + ["{broken"]
    shuffled = list(rows)
    random.Random(5).shuffle(shuffled)
    outputs = []
    for name, data, workers in (("a", rows, 1), ("b", shuffled, 2), ("c", list(reversed(rows)), 1)):
        settings = {
            "model": {"name": str(tiny_tokenizer_dir)},
            "source": {"id_column": "id"},
            "prepare": {"workers": workers, "chunk_size": 4, "split": {"val_ratio": 0.3}},
        }
        outputs.append(_prepare(cli, tmp_path, name, data, settings))
    assert outputs[0] == outputs[1] == outputs[2]
    m = outputs[0]["manifest"]
    assert m["dropped"] == {"exact_duplicate": 4, "near_duplicate": 5, "too_short": 1}
    assert m["quarantined_by_reason"] == {"invalid_json": 1, "null_text": 1}
    assert m["dedup_semantics"] == "smallest-key-per-component-v1"
    assert outputs[0]["val"] and outputs[0]["tokens"]["val"]
    assert not list(Path("out_a").glob(".prepare-work*"))  # the work folder is gone


def test_without_an_id_column_the_content_hash_is_the_key(tmp_path: Path, cli: Any) -> None:
    a, b, c = chain()
    rows = [{"text": t} for t in (make_doc(1), make_doc(1), a, b, c, make_doc(2))]
    out = _prepare(cli, tmp_path, "noid", rows, {"prepare": {"tokenize": False, "split": {"val_ratio": 0}}})
    kept = [json.loads(line)["id"] for line in out["train"]]
    chain_ids = [content_id(t) for t in (a, b, c)]
    # Identical texts share their id; of the chain, the smallest hash of the three stays.
    assert sorted(kept) == sorted([content_id(make_doc(1)), min(chain_ids), content_id(make_doc(2))])
    assert out["manifest"]["dropped"] == {"exact_duplicate": 1, "near_duplicate": 2}


def test_a_killed_runs_work_folder_is_removed_by_the_next(tmp_path: Path, cli: Any) -> None:
    rows = [{"id": f"d{i}", "text": make_doc(i % 4)} for i in range(6)]
    settings: dict[str, Any] = {"source": {"id_column": "id"}, "prepare": {"tokenize": False}}
    _prepare(cli, tmp_path, "w", rows, json.loads(json.dumps(settings)))
    stale = Path("out_w/.prepare-work.abc123.tmp")  # what a SIGKILL during the first pass leaves
    stale.mkdir()
    (stale / "results.arrow").write_bytes(b"x" * 100)
    settings["prepare"]["split"] = {"val_ratio": 0.5}  # a change, so prepare reruns
    out = _prepare(cli, tmp_path, "w", rows, settings)
    assert not stale.exists() and not list(Path("out_w").glob(".*.tmp"))
    assert out["manifest"]["dropped"] == {"exact_duplicate": 2}


def test_similar_links_connect_what_all_similar_pairs_connect_with_fewer_links() -> None:
    """A bucket's links are a spanning forest of its similar pairs: the same components as linking every
    pair whose estimated Jaccard reaches the threshold, with at most one link per member."""
    rng = np.random.default_rng(4)
    base = rng.integers(0, 2**31, size=(6, 64))
    # Members near one of six bases (a few values changed), so similarity varies across the threshold.
    rows = np.stack([base[i % 6].copy() for i in range(120)])
    for row in rows:
        row[rng.choice(64, size=int(rng.integers(0, 24)), replace=False)] = rng.integers(0, 2**31, size=1)
    threshold = 0.75

    def components(pairs: list[tuple[int, int]]) -> list[int]:
        parent = list(range(len(rows)))

        def find(x: int) -> int:
            while parent[x] != x:
                x = parent[x]
            return x

        for a, b in pairs:
            parent[find(a)] = find(b)
        return [min(j for j in range(len(rows)) if find(j) == find(i)) for i in range(len(rows))]

    every_pair = [
        (i, j)
        for i in range(len(rows))
        for j in range(i + 1, len(rows))
        if estimated_jaccard(rows[i], rows[j]) >= threshold
    ]
    links = list(similar_links(rows, threshold))
    assert components(links) == components(every_pair)
    assert len(links) < len(rows) < len(every_pair)
    # k mutual duplicates: k - 1 links, not k * (k - 1) / 2 pairs.
    assert len(list(similar_links(np.repeat(base[:1], 50, axis=0), threshold))) == 49
