"""Decontamination: evaluation documents whose word n-grams occur in the training text (domain and replay
train splits) are counted per set and, by default, left out of the scores."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from conftest import make_doc
from cptkit.decontamination import contaminated, ngram_hashes, overlap_shares
from test_evaluate import trained_run

WORDS = [f"word{i}" for i in range(400)]


def text(start: int, count: int) -> str:
    return " ".join(WORDS[start : start + count])


def test_ngram_hashes_ignore_case_and_punctuation_and_short_texts_hash_whole() -> None:
    assert np.array_equal(ngram_hashes("The cat, sat ON the mat.", 3), ngram_hashes("the cat sat on the MAT", 3))
    assert len(ngram_hashes(text(0, 20), 13)) == 8
    assert len(ngram_hashes(text(0, 5), 13)) == 1  # shorter than n: one hash of all its words
    assert not np.array_equal(ngram_hashes(text(0, 5), 13), ngram_hashes(text(1, 5), 13))


def test_shares_count_the_n_grams_found_in_training_text() -> None:
    training = [text(0, 100), text(200, 50)]
    shares = overlap_shares(
        {"set": [text(0, 100), text(300, 40), text(190, 30), text(300, 20) + " " + text(10, 13)]}, training, 13
    )["set"]
    assert shares[0] == 1.0  # a copy
    assert shares[1] == 0.0  # unrelated
    assert 0 < shares[2] < 1  # 20 of its 30 words continue a training text: some of its 13-grams
    # One 13-gram of training text inside an otherwise new document: found, but a small share.
    assert shares[3] == 1 / 21
    assert contaminated(shares, 0.5).tolist() == [True, False, False, False]
    assert contaminated(shares, 0.0).tolist() == [True, False, True, True]
    # Twelve words in common are not a 13-gram.
    assert overlap_shares({"s": [text(0, 12) + " other words here"]}, [text(0, 12) + " else"], 13)["s"][0] == 0.0


def planted_run(tmp_path: Path, tiny_model_dir: Path, **decontamination: Any) -> Path:
    cfg = trained_run(tmp_path, tiny_model_dir, decontamination=decontamination)
    train = [json.loads(line) for line in Path("data/train.jsonl").read_text().splitlines()]
    replay = [json.loads(line) for line in Path("data/replay/train.jsonl").read_text().splitlines()]
    with Path("data/val.jsonl").open("a", encoding="utf-8") as fh:
        fh.write(json.dumps({"id": "copy", "text": train[0]["text"]}) + "\n")
    sentence = " ".join(replay[0]["text"].split()[:13])
    with Path("data/replay/val.jsonl").open("a", encoding="utf-8") as fh:
        fh.write(json.dumps({"id": "quote", "text": f"{sentence} {make_doc(5000)}"}) + "\n")
    return cfg


def results() -> dict[str, Any]:
    return json.loads(Path("outputs/cpt_model/evaluation/results.json").read_text())


def test_a_copied_training_document_is_left_out_and_counted(tmp_path: Path, tiny_model_dir: Path, cli: Any) -> None:
    cfg = planted_run(tmp_path, tiny_model_dir)
    val_documents = len(Path("data/val.jsonl").read_text().splitlines())
    done = cli("evaluate", "-c", str(cfg))
    assert done.exit_code == 0, done.output
    assert "1 of" in done.output and "contaminated" in done.output
    sets = results()["sets"]
    assert sets["domain"]["contaminated"] == 1 and sets["domain"]["documents"] == val_documents - 1
    # The quoted 13 words are found (any overlap), but they are a small share of that document: it stays.
    assert sets["general"]["contaminated"] == 0 and sets["general"]["any_overlap"] >= 1
    assert results()["settings"]["decontamination"] == "drop"
    report = Path("outputs/cpt_model/evaluation/report.md").read_text()
    assert "Contaminated documents" in report and "domain 1" in report


def test_any_shared_n_gram_and_report_only(tmp_path: Path, tiny_model_dir: Path, cli: Any) -> None:
    cfg = planted_run(tmp_path, tiny_model_dir)
    val_documents = len(Path("data/val.jsonl").read_text().splitlines())
    done = cli("evaluate", "-c", str(cfg), "--set", "evaluate.decontamination.mode=report")
    assert done.exit_code == 0, done.output
    sets = results()["sets"]
    assert sets["domain"]["contaminated"] == 1 and sets["domain"]["documents"] == val_documents  # scored anyway

    done = cli("evaluate", "-c", str(cfg), "--set", "evaluate.decontamination.min_share=0", "--force")
    # make_doc's documents are built from a small set of phrases: with any shared 13-gram, all are flagged.
    assert done.exit_code == 1 and "all" in done.output and "contaminated" in done.output
    assert "Traceback" not in done.output
