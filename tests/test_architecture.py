"""The layout stays as docs/architecture.md describes it: stages are siblings that share contract modules
and never import each other."""

from __future__ import annotations

import ast
from pathlib import Path

import cptkit

STAGES = {"extract", "prepare", "train", "evaluate", "register", "export", "serve"}
PACKAGE = Path(cptkit.__file__).parent


def _imported_modules(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def stage_imports() -> dict[str, set[str]]:
    """For each stage module, the other stage modules it imports (anywhere in the file)."""
    crossing: dict[str, set[str]] = {}
    for stage in sorted(STAGES):
        modules = _imported_modules(PACKAGE / f"{stage}.py")
        others = {m.split(".")[1] for m in modules if m.startswith("cptkit.") and m.split(".")[1] in STAGES}
        crossing[stage] = others - {stage}
    return crossing


def test_no_stage_imports_another_stage() -> None:
    assert {stage: others for stage, others in stage_imports().items() if others} == {}


def test_the_rule_sees_an_import_inside_a_function(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from cptkit.train import train\n    import cptkit.evaluate\n")
    assert {"cptkit.train", "cptkit.evaluate"} <= _imported_modules(module)
