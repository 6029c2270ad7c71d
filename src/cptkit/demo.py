"""The demo: real documentation text that ships with every Python, as a local Delta table laid out like
a Unity Catalog table (`<root>/<catalog>/<schema>/<table>` with `id`, `title`, `text`, `updated_at`).

Docstrings are read with `ast` from the standard library's source files rather than by importing the
modules: importing some of them opens windows or browsers, and parsing is deterministic.
"""

from __future__ import annotations

import ast
import datetime as dt
import hashlib
import sys
import sysconfig
import time
from pathlib import Path

import pyarrow as pa

from cptkit.config import Config, DeltaSourceConfig, JsonlSourceConfig
from cptkit.demo_general import write_general_corpora
from cptkit.errors import CptkitError
from cptkit.pipeline import STAGES, Options, Reporters, run_pipeline
from cptkit.progress import console

# Packages that are tests, GUI demos or vendored tooling rather than library documentation.
_SKIP = {
    "test",
    "tests",
    "idlelib",
    "turtledemo",
    "lib2to3",
    "ensurepip",
    "site-packages",
    "__pycache__",
    "__phello__",
}


def stdlib_documents(stdlib: Path | None = None) -> pa.Table:
    """One document per standard-library module: its docstring, then each public class, function and
    method with its signature and docstring, in source order."""
    root = stdlib or Path(sysconfig.get_paths()["stdlib"])
    rows: list[dict[str, object]] = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(part in _SKIP or part.startswith("test") for part in rel.parts):
            continue
        module = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
        if any(part.startswith("_") for part in module.split(".")):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        text = _module_text(module, tree)
        if text is None:
            continue
        mtime = dt.datetime.fromtimestamp(path.stat().st_mtime, dt.UTC).replace(microsecond=0)
        rows.append({"id": module, "title": module, "text": text, "updated_at": mtime})
    schema = pa.schema(
        [
            ("id", pa.string()),
            ("title", pa.string()),
            ("text", pa.string()),
            ("updated_at", pa.timestamp("us", "UTC")),
        ]
    )
    return pa.Table.from_pylist(rows, schema=schema)


def _module_text(module: str, tree: ast.Module) -> str | None:
    parts: list[str] = []
    doc = ast.get_docstring(tree)
    if doc:
        parts.append(f"Module {module}\n\n{doc}")
    for node in tree.body:
        parts.extend(_definition_texts(node, prefix=""))
    if not doc and not parts:
        return None
    if not doc:
        parts.insert(0, f"Module {module}")
    return "\n\n".join(parts)


def _definition_texts(node: ast.stmt, prefix: str) -> list[str]:
    if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
        return []
    if node.name.startswith("_"):
        return []
    doc = ast.get_docstring(node)
    out: list[str] = []
    name = f"{prefix}{node.name}"
    if isinstance(node, ast.ClassDef):
        if doc:
            out.append(f"class {name}\n\n{doc}")
        for child in node.body:
            out.extend(_definition_texts(child, prefix=f"{name}."))
    elif doc:
        out.append(f"{name}({ast.unparse(node.args)})\n\n{doc}")
    return out


def build_demo_table(path: str) -> tuple[int, bool]:
    """Write the stdlib documents to a Delta table at `path` unless it already holds them.
    Returns (rows, written)."""
    from deltalake import DeltaTable, write_deltalake

    table = stdlib_documents()
    fingerprint = _table_fingerprint(table)
    if DeltaTable.is_deltatable(path):
        current = DeltaTable(path).to_pyarrow_table()
        if _table_fingerprint(current) == fingerprint:
            return table.num_rows, False
    Path(path).mkdir(parents=True, exist_ok=True)
    write_deltalake(path, table, mode="overwrite", schema_mode="overwrite")
    return table.num_rows, True


def _table_fingerprint(table: pa.Table) -> str:
    h = hashlib.sha256()
    ids = table.column("id").to_pylist()
    texts = table.column("text").to_pylist()
    for doc_id, text in sorted(zip(ids, texts, strict=True)):
        h.update(f"{doc_id}\0{text}\n".encode("utf-8", "surrogatepass"))
    return h.hexdigest()


def run_demo(config: Config, force: bool, report: Reporters) -> None:
    """Build the demo inputs, then run the pipeline on them (extract, prepare, train, evaluate, register;
    no preflight: the demo's time budget is for training)."""
    if not isinstance(config.source, DeltaSourceConfig):
        raise CptkitError("the demo config's source must be the demo Delta table (source.type: delta)")
    started = time.perf_counter()
    rows, written = build_demo_table(config.source.path)
    state = "written" if written else "unchanged"
    console.print(
        f"demo: {rows:,} documents from Python {sys.version.split()[0]}'s standard library "
        f"-> Delta table {config.source.path} ({state})"
    )
    if isinstance(config.data.replay, JsonlSourceConfig):
        corpora = write_general_corpora(config.data.replay.path.parent)
        console.print(
            f"demo: general text (Wikipedia, Lee news) from the gensim wheel -> {corpora['wikipedia'].parent}"
        )
    inputs = {"inputs": time.perf_counter() - started}
    options = Options(force=force, preflight=False, label="demo")
    result = run_pipeline(config, STAGES, report, options, timings=inputs)
    registered = result.registered
    if registered is None:  # tracking disabled: the pipeline said register was not run
        console.print(f"demo: adapted model in {config.output_dir}", highlight=False, soft_wrap=True)
        return
    uri = registered.champion_uri if registered.promoted else registered.model_uri
    console.print(
        f"demo: adapted model in {config.output_dir}, registered as {uri}; MLflow UI: mlflow ui --backend-store-uri "
        f"{config.tracking.tracking_uri}",
        highlight=False,
        soft_wrap=True,
    )
