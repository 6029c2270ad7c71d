"""`cptkit demo --updates`: the update loop (docs/updates.md) on the demo's data.

Under `<demo>/updates/` the demo's Delta table is written with its change data feed on, holding nine
standard-library modules in ten (batch A); version 1 is trained on it and registered. The other modules
(batch B) are then appended as a new table version, and the update run extracts only that change, starts
from version 1, replays some of A and some general text, and the update gate compares base, version 1
and the candidate on B's held-out text, A's and the general set; the registry shows the chain.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from cptkit.config import Config, DeltaSourceConfig, JsonlSourceConfig
from cptkit.demo import stdlib_documents
from cptkit.demo_general import write_general_corpora
from cptkit.errors import CptkitError
from cptkit.model_folder import EVALUATION_DIR
from cptkit.pipeline import STAGES, Options, Reporters, RunResult, run_pipeline
from cptkit.progress import console
from cptkit.update_gate import UPDATE_REPORT

UPDATES = "updates"
BATCH_B_SHARE = 10  # one module in this many arrives in the second batch


def batches(table: pa.Table) -> tuple[pa.Table, pa.Table]:
    """Batch A and batch B: a module is in B when the hash of its name says so (stable across runs)."""
    ids = table.column("id").to_pylist()
    in_b = [int(hashlib.sha256(i.encode()).hexdigest(), 16) % BATCH_B_SHARE == 0 for i in ids]
    mask = pa.array(in_b)
    return table.filter(pc.invert(mask)), table.filter(mask)


def run_demo_updates(config: Config, force: bool, report: Reporters) -> None:
    from deltalake import write_deltalake

    if not isinstance(config.source, DeltaSourceConfig):
        raise CptkitError("the demo config's source must be the demo Delta table (source.type: delta)")
    root = Path(config.data.output_dir).parent / UPDATES
    table_path = root / "python_docs" / "documents"
    started = time.perf_counter()
    a, b = batches(stdlib_documents())
    # Each demo starts the story again: batch A alone, then B; the prepared data follows the table.
    for stale in (table_path, root / "data"):
        shutil.rmtree(stale, ignore_errors=True)
    table_path.mkdir(parents=True)
    write_deltalake(str(table_path), a, configuration={"delta.enableChangeDataFeed": "true"})
    console.print(f"demo updates: batch A, {a.num_rows:,} modules -> Delta table {table_path} version 0")
    if isinstance(config.data.replay, JsonlSourceConfig):
        write_general_corpora(config.data.replay.path.parent)
    source = config.source.model_copy(update={"path": str(table_path), "mode": "cdf", "version": None})
    name = f"{config.tracking.registered_model_name}-updates"
    first = config.model_copy(
        update={
            "source": source,
            "data": config.data.model_copy(update={"output_dir": root / "data"}),
            "output_dir": root / "outputs" / "v1",
            "tracking": config.tracking.model_copy(update={"registered_model_name": name}),
        }
    )
    timings = {"inputs": time.perf_counter() - started}
    v1 = run_pipeline(first, STAGES, report, Options(force=force, preflight=False, label="demo v1"), timings)

    write_deltalake(str(table_path), b, mode="append")
    console.print(f"demo updates: batch B, {b.num_rows:,} more modules -> Delta table {table_path} version 1")
    start = _start_of(v1, first)
    update = first.model_copy(
        update={
            "training": first.training.model_copy(update={"init_from": start}),
            "output_dir": root / "outputs" / "v2",
        }
    )
    v2 = run_pipeline(update, STAGES, report, Options(force=force, preflight=False, label="demo update"))
    table = update.output_dir / EVALUATION_DIR / UPDATE_REPORT
    if table.is_file():
        console.print(f"demo updates: base, version 1 and the update side by side ({table}):", highlight=False)
        console.print(table.read_text(encoding="utf-8"), highlight=False, markup=False, soft_wrap=True)
    if v2.registered is not None:
        _print_history(update, name)
    elif v2.nothing_new is not None:
        console.print(f"demo updates: {v2.nothing_new}", highlight=False)


def _start_of(v1: RunResult, config: Config) -> str:
    """What the update starts from: version 1 in the registry, or its folder when nothing was registered."""
    if v1.registered is not None:
        return f"models:/{v1.registered.name}/{v1.registered.version}"
    return str(config.output_dir)


def _print_history(config: Config, name: str) -> None:
    from cptkit.lineage import history_lines
    from cptkit.registry import Registry

    registry = Registry.open(config.tracking, config.register_)
    for line in history_lines(registry, name):
        console.print(f"demo updates: {line}", highlight=False, markup=False, soft_wrap=True)
