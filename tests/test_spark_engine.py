"""prepare.engine: spark gives the same outputs as the local engine (the shared local[2] SparkSession
of conftest); its errors are one line. The Spark tests skip when pyspark or Java is missing."""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from conftest import make_doc, shard_rows, write_config, write_jsonl
from cptkit.config import PrepareConfig, load_config
from cptkit.dedup import MinHasher, band_hashes, estimated_jaccard, lsh_bands
from cptkit.engines import PrepareJob
from cptkit.errors import StageError
from cptkit.records import DocResult, RecordProcessor

try:
    import pyspark  # noqa: F401

    HAVE_PYSPARK = True
except ImportError:
    HAVE_PYSPARK = False
HAVE_JAVA = shutil.which("java") is not None or Path(os.environ.get("JAVA_HOME", "/nonexistent"), "bin/java").is_file()
needs_spark = pytest.mark.skipif(not (HAVE_PYSPARK and HAVE_JAVA), reason="needs pyspark and Java")

OUTPUT_FILES = ("train.jsonl", "val.jsonl", "dropped.jsonl", "quarantine.jsonl")
MANIFEST_COUNTS = (
    "documents_in",
    "documents_kept",
    "dropped",
    "quarantined",
    "quarantined_by_reason",
    "train_documents",
    "val_documents",
    "characters_kept",
    "redactions",
    "train_tokens",
    "val_tokens",
    "dedup_semantics",
)


def _edited(text: str, positions: range) -> str:
    """`text` with the words at `positions` replaced: each replacement changes its word shingles."""
    words = text.split(" ")
    for p in positions:
        words[p] = f"changed{p}"
    return " ".join(words)


def chain() -> tuple[str, str, str]:
    """Three documents A~B~C (each pair of neighbours near duplicates) where A and C are not near."""
    # Three documents' words shuffled: long enough for a clear margin, and no repeated 5-grams.
    words = " ".join(make_doc(i) for i in (200, 201, 202)).split(" ")
    random.Random(3).shuffle(words)
    b = " ".join(words)
    # Edits placed so that A and B, and B and C, also share an LSH band (checked below).
    a, c = _edited(b, range(10, 60, 10)), _edited(b, range(340, 390, 10))
    return a, b, c


def crafted_rows() -> list[Any]:
    a, b, c = chain()
    return [
        *({"id": f"g{i:02d}", "text": make_doc(i), "team": f"t{i % 3}"} for i in range(16)),
        {"id": "a-exact", "text": make_doc(3), "team": "copy"},
        {"id": "n-near", "text": make_doc(5).replace("component", "module", 1)},
        {"id": "c3", "text": c},
        {"id": "c1", "text": a},
        {"id": "c2", "text": b},
        {"id": "mail", "text": make_doc(40) + " Write to jane.doe@example.com for access."},
        {"id": "short", "text": "Too short."},
        {
            "id": "german",
            "text": "Die Bibliothek bietet eine einheitliche Schnittstelle zum Lesen und Schreiben von Dateien. "
            "Jeder Leser nimmt einen Pfad und liefert die Datensätze, und der Schreiber folgt demselben Entwurf. "
            "Die Konfiguration wird aus einer einzigen Datei gelesen, die vor jeder Arbeit geprüft wird.",
        },
        {"id": "junk", "text": "$$$ ### @@@ %%% !!! *** ((( ))) ^^^ &&& " * 8},
        {"id": "empty", "text": "   \n\t  "},
        {"id": "null", "text": None},
        {"id": "number", "text": 42},
        {"id": "huge", "text": make_doc(1) * 40},
        '{"id": "broken", "text": ',
        "[1, 2, 3]",
    ]


def test_the_crafted_chain_is_a_chain() -> None:
    a, b, c = chain()
    minhash = MinHasher(128, 5)
    sa, sb, sc = (minhash.signature(t) for t in (a, b, c))
    assert estimated_jaccard(sa, sb) >= 0.8 and estimated_jaccard(sb, sc) >= 0.8
    assert estimated_jaccard(sa, sc) < 0.8
    bands = lsh_bands(0.8, 128)
    ba, bb, bc = (band_hashes(s, bands) for s in (sa, sb, sc))
    assert (ba == bb).any() and (bb == bc).any()


def outputs(folder: Path) -> dict[str, Any]:
    manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    return {
        **{name: (folder / name).read_text(encoding="utf-8") for name in OUTPUT_FILES},
        **{name: shard_rows(folder / name) for name in ("train_tokens", "val_tokens")},
        "manifest": {key: manifest[key] for key in MANIFEST_COUNTS},
        # File by file: the same shards, byte for byte (their sha256 is in the list).
        "shards": manifest["shards"],
    }


@needs_spark
@pytest.mark.parametrize(("partitions", "shuffled"), [(1, False), (6, False), (6, True)])
def test_spark_gives_the_same_outputs_as_local(
    spark: Any, tmp_path: Path, cli: Any, tiny_tokenizer_dir: Path, partitions: int, shuffled: bool
) -> None:
    rows = crafted_rows()
    if shuffled:
        random.Random(7).shuffle(rows)
    write_jsonl(tmp_path / "docs.jsonl", rows)
    with (tmp_path / "docs.jsonl").open("ab") as fh:
        fh.write(b'{"id": "latin1", "text": "caf\xe9"}\n')
    cfg = write_config(
        tmp_path / "cfg.yaml",
        {
            "model": {"name": str(tiny_tokenizer_dir)},
            "source": {"type": "jsonl", "path": "docs.jsonl", "id_column": "id"},
            "data": {"output_dir": "out"},
            "prepare": {
                "max_document_bytes": 20_000,
                "chunk_size": 4,
                "shard_documents": 5,
                "split": {"val_ratio": 0.3},
                "redact": {"enabled": True},
            },
        },
    )
    assert cli("extract", "-c", str(cfg)).exit_code == 0
    snapshot = next(Path("out/raw").glob("*.parquet"))
    # Row groups of 5 documents, and Spark splits of ~1 KB: several input partitions.
    pq.write_table(pq.read_table(snapshot), snapshot, row_group_size=5 if partitions > 1 else 1_000)
    spark.conf.set("spark.sql.files.maxPartitionBytes", "1k" if partitions > 1 else "128m")
    seen = spark.read.parquet(str(snapshot.resolve())).rdd.getNumPartitions()
    assert (seen > 1) == (partitions > 1), seen

    results = {}
    for engine in ("local", "spark"):
        done = cli("prepare", "-c", str(cfg), "--force", "--set", f"prepare.engine={engine}")
        assert done.exit_code == 0, done.output
        results[engine] = outputs(Path("out"))
        assert not list(Path("out").glob(".*.tmp"))
    assert results["spark"] == results["local"]

    m = results["spark"]["manifest"]
    assert m["documents_in"] == m["documents_kept"] + sum(m["dropped"].values()) + m["quarantined"] == 32
    dropped = {r["id"]: r["reason"] for r in map(json.loads, results["spark"]["dropped.jsonl"].splitlines())}
    # Smallest key per group: "a-exact" < "g03", "g05" < "n-near"; the chain keeps c1 only.
    assert {k: dropped[k] for k in ("g03", "n-near", "c2", "c3")} == {
        "g03": "exact_duplicate",
        "n-near": "near_duplicate",
        "c2": "near_duplicate",
        "c3": "near_duplicate",
    }
    assert m["quarantined"] == 6 and m["redactions"].get("email") == 1
    assert m["train_tokens"] > 0 and m["val_documents"] > 0
    shards = results["spark"]["shards"]["train_tokens"]
    assert len(shards) > 1 and sum(s["tokens"] for s in shards) == m["train_tokens"]


class _FailsOnBoom(RecordProcessor):
    def process(self, texts: Any, errors: Any) -> list[DocResult]:
        if any(t is not None and "BOOM" in t for t in texts):
            raise ValueError("cannot handle this text")
        return super().process(texts, errors)


@needs_spark
def test_a_failed_spark_task_is_one_line_naming_the_document(spark: Any, tmp_path: Path) -> None:
    import pyarrow as pa

    # The failing processor is defined in this test module, which Spark's workers cannot import.
    from pyspark import cloudpickle

    from cptkit.engines import spark as spark_engine

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    texts = [make_doc(i) for i in range(6)]
    texts[4] += " BOOM"
    snapshot = tmp_path / "snapshot.parquet"
    pq.write_table(pa.table({"id": [f"d{i}" for i in range(6)], "text": texts, "error": [None] * 6}), snapshot)
    (tmp_path / "out").mkdir()
    job = PrepareJob(snapshot, tmp_path / "out", PrepareConfig(tokenize=False), None)
    with pytest.raises(StageError) as failed:
        spark_engine.run(job, lambda n: None, make_processor=_FailsOnBoom)
    message = str(failed.value)
    assert message == "prepare on Spark: document 'd4': ValueError: cannot handle this text"
    assert not list((tmp_path / "out").iterdir())  # no work folder, no outputs


def test_missing_java_is_one_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from cptkit.engines.spark_session import require_java

    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(StageError, match="Java was not found"):
        require_java()


def test_missing_pyspark_is_one_clear_line(monkeypatch: pytest.MonkeyPatch, cli: Any, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "pyspark", None)
    monkeypatch.setitem(sys.modules, "pyspark.sql", None)
    write_jsonl(tmp_path / "docs.jsonl", [{"id": "d0", "text": make_doc(0)}])
    cfg = write_config(
        tmp_path / "cfg.yaml",
        {
            "source": {"type": "jsonl", "path": "docs.jsonl", "id_column": "id"},
            "data": {"output_dir": "out"},
            "prepare": {"tokenize": False, "engine": "spark"},
        },
    )
    assert cli("extract", "-c", str(cfg)).exit_code == 0
    done = cli("prepare", "-c", str(cfg))
    assert done.exit_code == 1
    assert "error: prepare.engine is spark, but pyspark is not installed: pip install 'cptkit[spark]'" in done.output
    assert not Path("out/manifest.json").exists()


def test_the_engine_does_not_change_the_fingerprint() -> None:
    from cptkit.prepare import prepare_fingerprint

    local = load_config(None, [])
    spark = load_config(None, ["prepare.engine=spark", "prepare.spark.master=local[4]"])
    assert prepare_fingerprint(local, None) == prepare_fingerprint(spark, None)


@needs_spark
def test_the_session_cptkit_starts_has_the_configured_driver_memory(spark: Any) -> None:
    # Spark's default 1g heap ran out at 100 MB of text (benchmarks/prepare_throughput.py); cptkit asks for
    # prepare.spark.driver_memory (4g), and the JVM really has it, not only the setting.
    assert spark.sparkContext.getConf().get("spark.driver.memory") == "4g"
    assert spark.sparkContext._jvm.java.lang.Runtime.getRuntime().maxMemory() > 3 * 2**30
