"""The sharded token store: prepare writes `train_tokens/part-*.parquet` (and, with train_jsonl off, the
training text as shards), the manifest lists every shard, and training reads the shards memory-mapped
with the same result as from one file."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import prepared_run, shard_rows


def manifest(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "manifest.json").read_text(encoding="utf-8"))


def jsonl_ids(path: Path) -> list[str]:
    return [json.loads(line)["id"] for line in path.read_text(encoding="utf-8").splitlines()]


TRAINING = {
    "method": "lora",
    "learning_rate": 1e-3,
    "max_steps": 4,
    "max_seq_length": 64,
    "micro_batch_size": 2,
    "gradient_accumulation_steps": 1,
    "eval_steps": 4,
    "save_steps": 100,
    "warmup_steps": 1,
    "precision": "fp32",
    "eval_max_sequences": 4,
}


def test_shards_hold_n_documents_each_and_the_manifest_lists_them(tmp_path: Path, tiny_model_dir: Path) -> None:
    prepared_run(tmp_path, tiny_model_dir, TRAINING, prepare={"shard_documents": 7, "split": {"val_ratio": 0.2}})
    m = manifest(Path("data"))
    shards = m["shards"]["train_tokens"]
    assert [s["file"] for s in shards] == [f"train_tokens/part-{i:05d}.parquet" for i in range(len(shards))]
    assert len(shards) == math.ceil(m["train_documents"] / 7) > 1
    assert [s["documents"] for s in shards[:-1]] == [7] * (len(shards) - 1)
    assert sum(s["tokens"] for s in shards) == m["train_tokens"]
    for s in shards:
        assert hashlib.sha256((Path("data") / s["file"]).read_bytes()).hexdigest() == s["sha256"]
        assert s["file"] in m["outputs"]
    # In input order, the same documents as train.jsonl.
    assert [r["id"] for r in shard_rows(Path("data/train_tokens"))] == jsonl_ids(Path("data/train.jsonl"))
    assert sum(s["documents"] for s in m["shards"]["val_tokens"]) == m["val_documents"]


def test_train_text_goes_to_shards_when_train_jsonl_is_off(tmp_path: Path, tiny_model_dir: Path, cli: Any) -> None:
    cfg = prepared_run(tmp_path, tiny_model_dir, TRAINING, prepare={"train_jsonl": False, "shard_documents": 10})
    m = manifest(Path("data"))
    assert not Path("data/train.jsonl").exists() and Path("data/val.jsonl").is_file()
    assert m["train_text"] == "train_text/"
    rows = shard_rows(Path("data/train_text"))
    assert len(rows) == m["train_documents"] and rows[0]["text"] and json.loads(rows[0]["metadata"]) == {}
    assert [r["id"] for r in rows] == [r["id"] for r in shard_rows(Path("data/train_tokens"))]

    # Back to JSON lines: the shards of text go, so nothing in the folder looks current that is not.
    again = cli("prepare", "-c", str(cfg), "--set", "prepare.train_jsonl=true", "--force")
    assert again.exit_code == 0, again.output
    assert jsonl_ids(Path("data/train.jsonl")) == [r["id"] for r in rows]
    assert not Path("data/train_text").exists()


def test_training_on_many_shards_gives_the_losses_of_one(
    tmp_path: Path, tiny_model_dir: Path, cli: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    losses = {}
    for shard_documents in (100_000, 3):
        folder = tmp_path / f"shards-{shard_documents}"
        folder.mkdir()
        monkeypatch.chdir(folder)
        cfg = prepared_run(folder, tiny_model_dir, TRAINING, prepare={"shard_documents": shard_documents})
        shards = manifest(Path("data"))["shards"]["train_tokens"]
        assert (len(shards) == 1) == (shard_documents > 100) and len(shards) >= 1
        done = cli("train", "-c", str(cfg))
        assert done.exit_code == 0, done.output
        summary = json.loads(Path("outputs/cpt_model/training_summary.json").read_text())
        losses[shard_documents] = (summary["losses"], summary["evals"])
    assert losses[3] == losses[100_000]


def test_tokens_are_memory_mapped_from_one_copy_that_later_runs_reuse(tmp_path: Path, tiny_model_dir: Path) -> None:
    from cptkit.config import load_config
    from cptkit.train_data import load_train_data

    cfg = prepared_run(tmp_path, tiny_model_dir, TRAINING, prepare={"shard_documents": 5})
    data = load_train_data(load_config(cfg))
    assert isinstance(data.domain_train.values, np.memmap)
    expected = [r["input_ids"] for r in shard_rows(Path("data/train_tokens"))]
    assert [data.domain_train.doc(i).tolist() for i in range(len(data.domain_train))] == expected
    copies = list((tmp_path / ".cache" / "tokens").iterdir())
    stamps = {p: p.stat().st_mtime_ns for c in copies for p in c.iterdir()}
    again = load_train_data(load_config(cfg))
    assert np.array_equal(again.domain_train.values, data.domain_train.values)
    assert {p: p.stat().st_mtime_ns for c in copies for p in c.iterdir()} == stamps  # not copied again


def test_a_missing_shard_is_one_line_naming_it(tmp_path: Path, tiny_model_dir: Path, cli: Any) -> None:
    cfg = prepared_run(tmp_path, tiny_model_dir, TRAINING, prepare={"shard_documents": 5})
    Path("data/train_tokens/part-00002.parquet").unlink()
    done = cli("train", "-c", str(cfg))
    assert done.exit_code != 0
    assert "part-00002.parquet" in done.output and "Traceback" not in done.output


def test_a_copy_another_process_finished_first_is_used(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every process of a multi-process run makes the flat copy at once: the one that renames first wins
    and the others use it (a rename onto it failed with 'Directory not empty' in a two-process run)."""
    import os

    import cptkit.train_data as train_data
    from cptkit.config import load_config

    cfg = prepared_run(tmp_path, tiny_model_dir, TRAINING, prepare={"shard_documents": 5})
    folder = Path("data/train_tokens").resolve()
    shards = manifest(Path("data"))["shards"]["train_tokens"]
    real_rename = os.rename

    def other_process_first(src: Any, dst: Any) -> None:
        monkeypatch.setattr(train_data.os, "rename", real_rename)
        train_data.read_tokens(folder, shards)  # the other process's copy lands just before ours
        real_rename(src, dst)  # raises: the folder is there, not empty

    monkeypatch.setattr(train_data.os, "rename", other_process_first)
    data = train_data.load_train_data(load_config(cfg))
    expected = [r["input_ids"] for r in shard_rows(Path("data/train_tokens"))]
    assert [data.domain_train.doc(i).tolist() for i in range(len(data.domain_train))] == expected
    assert not list((tmp_path / ".cache" / "tokens").glob(".*.tmp"))
