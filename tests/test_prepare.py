"""extract + prepare end to end through the CLI: accounting, split, outputs, skip/rerun, interruption."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from tokenizers import Tokenizer

from conftest import make_doc, shard_rows, write_config, write_jsonl
from cptkit.config import load_config
from cptkit.corpus import split_of


def manifest(path: Path) -> dict[str, Any]:
    return json.loads((path / "manifest.json").read_text(encoding="utf-8"))


def jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_extract_then_prepare_writes_the_seed_files_and_tokens(
    corpus_config: Path, cli, tiny_tokenizer_dir: Path
) -> None:  # type: ignore[no-untyped-def]
    assert cli("extract", "-c", str(corpus_config)).exit_code == 0
    raw = manifest(Path("out/raw"))
    assert raw["rows"] == 40
    assert raw["source"]["type"] == "jsonl"
    assert raw["delta_version"] is None
    assert len(raw["content_fingerprint"]) == 32

    result = cli("prepare", "-c", str(corpus_config))
    assert result.exit_code == 0, result.output
    m = manifest(Path("out"))
    assert m["documents_in"] == 40
    assert m["documents_kept"] == 40 and m["dropped"] == {} and m["quarantined"] == 0
    assert m["train_documents"] + m["val_documents"] == 40

    train, val = jsonl(Path("out/train.jsonl")), jsonl(Path("out/val.jsonl"))
    assert len(train) == m["train_documents"] and len(val) == m["val_documents"]
    assert {r["id"] for r in train} | {r["id"] for r in val} == {f"d{i}" for i in range(40)}
    first = next(r for r in train if r["id"] == "d0")
    assert first == {"id": "d0", "text": make_doc(0), "team": "t0"}

    tokenizer = Tokenizer.from_file(str(tiny_tokenizer_dir / "tokenizer.json"))
    tokens = shard_rows(Path("out/train_tokens"))
    assert [t["id"] for t in tokens] == [r["id"] for r in train]
    for row, tok in zip(train, tokens, strict=True):
        assert tok["input_ids"] == tokenizer.encode(row["text"], add_special_tokens=False).ids
    assert m["train_tokens"] == sum(len(t["input_ids"]) for t in tokens)
    assert m["tokenizer"]["eos_token"] == "<|endoftext|>"


def test_every_document_is_accounted_for(tmp_path: Path, cli) -> None:  # type: ignore[no-untyped-def]
    good = [{"id": f"g{i}", "text": make_doc(i)} for i in range(12)]
    rows: list[Any] = [
        *good,
        {"id": "dup-exact", "text": make_doc(3)},
        {"id": "dup-near", "text": make_doc(5).replace("component", "module", 1)},
        {"id": "short", "text": "Too short."},
        {
            "id": "german",
            "text": "Die Bibliothek bietet eine einheitliche Schnittstelle zum Lesen und Schreiben von Dateien. "
            "Jeder Leser nimmt einen Pfad und liefert die Datensätze, und der Schreiber folgt demselben Entwurf. "
            "Die Konfiguration wird aus einer einzigen Datei gelesen, die vor jeder Arbeit geprüft wird.",
        },
        {"id": "empty", "text": "   \n\t  "},
        {"id": "null", "text": None},
        {"id": "number", "text": 42},
        {"id": "huge", "text": make_doc(1) * 40},
        '{"id": "broken", "text": ',
        "[1, 2, 3]",
    ]
    write_jsonl(tmp_path / "docs.jsonl", rows)
    with (tmp_path / "docs.jsonl").open("ab") as fh:
        fh.write(b'{"id": "latin1", "text": "caf\xe9"}\n')
    cfg = write_config(
        tmp_path / "cfg.yaml",
        {
            "source": {"type": "jsonl", "path": "docs.jsonl", "id_column": "id"},
            "data": {"output_dir": "out"},
            "prepare": {"tokenize": False, "max_document_bytes": 20_000, "quality": {"min_stop_words": 0}},
        },
    )
    assert cli("extract", "-c", str(cfg)).exit_code == 0
    assert cli("prepare", "-c", str(cfg)).exit_code == 0
    m = manifest(Path("out"))
    assert m["documents_in"] == 23
    assert m["documents_in"] == m["documents_kept"] + sum(m["dropped"].values()) + m["quarantined"]
    assert m["documents_kept"] == 12
    assert m["dropped"] == {
        "empty": 1,
        "exact_duplicate": 1,
        "language": 1,
        "near_duplicate": 1,
        "too_short": 1,
    }
    assert m["quarantined_by_reason"] == {
        "invalid_json": 1,
        "non_string_text (int)": 1,
        "not_a_json_object": 1,
        "null_text": 1,
        "oversize": 1,
        "undecodable_bytes": 1,
    }
    quarantine = {r["id"]: r["reason"] for r in jsonl(Path("out/quarantine.jsonl"))}
    assert quarantine["null"] == "null_text" and quarantine["huge"] == "oversize"
    assert quarantine["docs.jsonl:21"] == "invalid_json"
    dropped = {r["id"]: r["reason"] for r in jsonl(Path("out/dropped.jsonl"))}
    # Of each duplicate group the smallest id stays, wherever it is in the source: "dup-..." < "g...".
    assert m["dedup_semantics"] == "smallest-key-per-component-v1"
    assert dropped == {
        "g3": "exact_duplicate",
        "g5": "near_duplicate",
        "short": "too_short",
        "german": "language",
        "empty": "empty",
    }
    assert not Path("out/train_tokens").exists()
    assert m["train_tokens"] is None


def test_split_is_a_deterministic_function_of_the_id() -> None:
    ids = [f"doc-{i}" for i in range(2000)]
    splits = [split_of(i, 0.1, seed=0) for i in ids]
    assert splits == [split_of(i, 0.1, seed=0) for i in ids]
    assert 150 < splits.count("val") < 250
    # Fixed values: the same on every machine and every Python (xxh64 of the id, not hash()).
    assert [split_of(f"doc-{i}", 0.5, seed=0) for i in range(8)] == [
        split_of(f"doc-{i}", 0.5, seed=0) for i in range(8)
    ]
    assert splits != [split_of(i, 0.1, seed=1) for i in ids]
    assert all(split_of(i, 0.0, seed=0) == "train" for i in ids)


def test_split_does_not_depend_on_input_order_or_workers(tmp_path: Path, cli, tiny_tokenizer_dir: Path) -> None:  # type: ignore[no-untyped-def]
    rows = [{"id": f"d{i}", "text": make_doc(i)} for i in range(60)]
    write_jsonl(tmp_path / "a.jsonl", rows)
    write_jsonl(tmp_path / "b.jsonl", list(reversed(rows)))
    results = []
    for name, workers in (("a", 1), ("b", 2)):
        cfg = write_config(
            tmp_path / f"{name}.yaml",
            {
                "model": {"name": str(tiny_tokenizer_dir)},
                "source": {"type": "jsonl", "path": f"{name}.jsonl", "id_column": "id"},
                "data": {"output_dir": f"out_{name}"},
                "prepare": {"workers": workers, "chunk_size": 4, "split": {"val_ratio": 0.25}},
            },
        )
        assert cli("extract", "-c", str(cfg)).exit_code == 0
        assert cli("prepare", "-c", str(cfg)).exit_code == 0
        results.append({r["id"] for r in jsonl(Path(f"out_{name}/val.jsonl"))})
    assert results[0] == results[1] and 5 < len(results[0]) < 25


def test_two_workers_give_the_same_output_as_one(tmp_path: Path, cli, tiny_tokenizer_dir: Path) -> None:  # type: ignore[no-untyped-def]
    rows = [{"id": f"d{i}", "text": make_doc(i % 45)} for i in range(60)]  # 15 exact duplicates
    write_jsonl(tmp_path / "docs.jsonl", rows)
    outs = []
    for workers in (1, 2):
        cfg = write_config(
            tmp_path / f"w{workers}.yaml",
            {
                "model": {"name": str(tiny_tokenizer_dir)},
                "source": {"type": "jsonl", "path": "docs.jsonl", "id_column": "id"},
                "data": {"output_dir": f"out{workers}"},
                "prepare": {"workers": workers, "chunk_size": 4},
            },
        )
        cli("extract", "-c", str(cfg))
        assert cli("prepare", "-c", str(cfg)).exit_code == 0
        outs.append(
            [
                Path(f"out{workers}/{n}").read_bytes()
                for n in ("train.jsonl", "val.jsonl", "dropped.jsonl", "train_tokens/part-00000.parquet")
            ]
        )
        assert manifest(Path(f"out{workers}"))["dropped"] == {"exact_duplicate": 15}
    assert outs[0] == outs[1]


def test_rerun_skips_and_a_changed_key_reruns_only_what_it_affects(corpus_config: Path, cli) -> None:  # type: ignore[no-untyped-def]
    cli("extract", "-c", str(corpus_config))
    cli("prepare", "-c", str(corpus_config))
    first = manifest(Path("out"))

    again = cli("extract", "-c", str(corpus_config))
    assert "extract domain: up to date, skipped" in again.output
    again = cli("prepare", "-c", str(corpus_config))
    assert "prepare domain: up to date, skipped" in again.output
    assert manifest(Path("out"))["created_at"] == first["created_at"]

    # Training keys and worker counts do not affect prepare.
    result = cli(
        "prepare",
        "-c",
        str(corpus_config),
        "--set",
        "training.learning_rate=1e-3",
        "--set",
        "prepare.workers=2",
    )
    assert "skipped" in result.output

    # A rule change does.
    result = cli("prepare", "-c", str(corpus_config), "--set", "prepare.split.val_ratio=0.5")
    assert "skipped" not in result.output
    assert manifest(Path("out"))["config_fingerprint"] != first["config_fingerprint"]

    # New input reruns extract, and then prepare.
    with Path("docs.jsonl").open("a", encoding="utf-8") as fh:
        fh.write(json.dumps({"doc_id": "new", "body": make_doc(99), "team": "t9"}) + "\n")
    assert "skipped" not in cli("extract", "-c", str(corpus_config)).output
    assert "skipped" not in cli("prepare", "-c", str(corpus_config)).output
    assert manifest(Path("out"))["documents_in"] == 41


def test_force_reruns(corpus_config: Path, cli) -> None:  # type: ignore[no-untyped-def]
    cli("extract", "-c", str(corpus_config))
    cli("prepare", "-c", str(corpus_config))
    assert "skipped" not in cli("prepare", "-c", str(corpus_config), "--force").output


def test_an_interrupted_prepare_leaves_nothing_that_looks_complete(
    corpus_config: Path, cli, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    cli("extract", "-c", str(corpus_config))
    cli("prepare", "-c", str(corpus_config))
    before = Path("out/train.jsonl").read_bytes()

    import cptkit.corpus as prep

    calls = {"n": 0}
    real = prep.split_of

    def dies_midway(*args: Any, **kwargs: Any) -> str:
        calls["n"] += 1
        if calls["n"] == 20:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(prep, "split_of", dies_midway)
    result = cli("prepare", "-c", str(corpus_config), "--set", "prepare.split.val_ratio=0.5")
    assert result.exit_code == 130
    assert not Path("out/manifest.json").exists()  # so the next run cannot skip
    assert Path("out/train.jsonl").read_bytes() == before  # the old output was not half-overwritten
    assert not list(Path("out").glob(".*.tmp"))

    monkeypatch.setattr(prep, "split_of", real)
    result = cli("prepare", "-c", str(corpus_config), "--set", "prepare.split.val_ratio=0.5")
    assert result.exit_code == 0 and "skipped" not in result.output
    m = manifest(Path("out"))
    assert m["documents_in"] == m["documents_kept"] == 40


def test_prepare_without_extract_says_what_to_do(corpus_config: Path, cli) -> None:  # type: ignore[no-untyped-def]
    result = cli("prepare", "-c", str(corpus_config))
    assert result.exit_code == 1
    assert "no raw snapshot of the domain data; run `cptkit extract` first" in result.output


def test_unreachable_tokenizer_is_one_clear_line(corpus_config: Path, cli) -> None:  # type: ignore[no-untyped-def]
    cli("extract", "-c", str(corpus_config))
    result = cli("prepare", "-c", str(corpus_config), "--set", "model.name=./no/such/model")
    assert result.exit_code == 1
    assert "no such file or directory" in result.output
    assert "Traceback" not in result.output


def test_redaction_counts_are_recorded(tmp_path: Path, cli) -> None:  # type: ignore[no-untyped-def]
    text = make_doc(1) + "\n\nContact ops@example.com or the host 10.1.2.3 with token dapi" + "0" * 32 + "."
    write_jsonl(tmp_path / "docs.jsonl", [{"id": "a", "text": text}])
    cfg = write_config(
        tmp_path / "cfg.yaml",
        {
            "source": {"type": "jsonl", "path": "docs.jsonl", "id_column": "id"},
            "data": {"output_dir": "out"},
            "prepare": {"tokenize": False, "redact": {"enabled": True}, "split": {"val_ratio": 0}},
        },
    )
    cli("extract", "-c", str(cfg))
    assert cli("prepare", "-c", str(cfg)).exit_code == 0
    assert manifest(Path("out"))["redactions"] == {"email": 1, "ip_address": 1, "secret": 1}
    kept = jsonl(Path("out/train.jsonl"))[0]["text"]
    assert "ops@example.com" not in kept and "<EMAIL>" in kept and "dapi0000" not in kept


def test_config_fingerprint_ignores_secrets_text() -> None:
    cfg = load_config(
        None,
        ["source.type=delta", "source.path=/t", "source.storage_options={AWS_SECRET_ACCESS_KEY: s3cr3t}"],
    )
    from cptkit.config import section_fingerprint

    assert "s3cr3t" not in json.dumps(cfg.model_dump(mode="json"))
    assert section_fingerprint(cfg.source) != section_fingerprint(
        load_config(
            None,
            ["source.type=delta", "source.path=/t", "source.storage_options={AWS_SECRET_ACCESS_KEY: other}"],
        ).source
    )


def test_a_prepare_killed_with_sigkill_is_redone_by_the_next_run(tmp_path: Path, tiny_tokenizer_dir: Path) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    rows = [{"id": f"d{i}", "text": make_doc(i)} for i in range(2500)]
    write_jsonl(tmp_path / "docs.jsonl", rows)
    cfg = write_config(
        tmp_path / "cfg.yaml",
        {
            "model": {"name": str(tiny_tokenizer_dir)},
            "source": {"type": "jsonl", "path": "docs.jsonl", "id_column": "id"},
            "data": {"output_dir": "out"},
            "prepare": {"workers": 1, "chunk_size": 64},
        },
    )
    cptkit = [sys.executable, "-m", "cptkit"]
    subprocess.run([*cptkit, "extract", "-c", str(cfg)], check=True, capture_output=True)
    proc = subprocess.Popen([*cptkit, "prepare", "-c", str(cfg)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not list(Path("out").glob(".train.jsonl.*.tmp")):  # killed while writing its outputs
        assert proc.poll() is None and time.monotonic() < deadline, "prepare ended before it could be killed"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not Path("out/manifest.json").exists()
    assert not Path("out/train.jsonl").exists()

    done = subprocess.run([*cptkit, "prepare", "-c", str(cfg)], capture_output=True, text=True, check=True)
    assert "skipped" not in done.stderr
    m = manifest(Path("out"))
    assert m["documents_in"] == m["documents_kept"] == 2500
    assert not list(Path("out").glob(".*.tmp"))


def test_replay_data_is_extracted_and_prepared_the_same_way_in_its_own_folder(
    tmp_path: Path,
    cli,  # type: ignore[no-untyped-def]
) -> None:
    write_jsonl(tmp_path / "docs.jsonl", [{"id": f"d{i}", "text": make_doc(i)} for i in range(10)])
    write_jsonl(tmp_path / "general.jsonl", [{"id": f"g{i}", "text": make_doc(100 + i)} for i in range(8)] + ["{bad"])
    cfg = write_config(
        tmp_path / "cfg.yaml",
        {
            "source": {"type": "jsonl", "path": "docs.jsonl", "id_column": "id"},
            "data": {"output_dir": "out", "replay": {"type": "jsonl", "path": "general.jsonl", "id_column": "id"}},
            "prepare": {"tokenize": False},
        },
    )
    result = cli("extract", "-c", str(cfg))
    assert "extract domain: 10 rows" in result.output and "extract replay: 9 rows" in result.output
    assert cli("prepare", "-c", str(cfg)).exit_code == 0
    domain, replay = manifest(Path("out")), manifest(Path("out/replay"))
    assert (domain["dataset"], domain["documents_in"]) == ("domain", 10)
    assert (replay["dataset"], replay["documents_in"], replay["quarantined"]) == ("replay", 9, 1)
    assert Path("out/replay/train.jsonl").is_file()
    # The domain stage's rerun check is not confused by the replay folder inside it.
    assert "prepare domain: up to date, skipped" in cli("prepare", "-c", str(cfg)).output
