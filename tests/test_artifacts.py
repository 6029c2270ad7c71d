"""A stage's outputs are up to date only while every output its manifest lists is there, unchanged in size,
files and folders alike."""

from __future__ import annotations

from pathlib import Path

from cptkit.artifacts import MANIFEST, new_manifest, output_bytes, up_to_date, write_json_atomic


def _finish(directory: Path, names: list[str]) -> None:
    manifest = new_manifest("evaluate", "cfg", "inp")
    manifest["outputs"] = {n: {"bytes": output_bytes(directory / n)} for n in names}
    write_json_atomic(directory / MANIFEST, manifest)


def test_an_output_folder_is_up_to_date_until_one_of_its_files_changes(tmp_path: Path) -> None:
    (tmp_path / "results.json").write_text("{}")
    tasks = tmp_path / "domain_tasks" / "mc"
    tasks.mkdir(parents=True)
    (tasks / "items.jsonl").write_text('{"q": 1}\n')
    _finish(tmp_path, ["results.json", "domain_tasks"])

    assert up_to_date(tmp_path, "cfg", "inp") is not None  # a folder output (the generated tasks) counts
    assert up_to_date(tmp_path, "cfg", "other") is None

    (tasks / "items.jsonl").write_text('{"q": 12}\n')
    assert up_to_date(tmp_path, "cfg", "inp") is None


def test_a_missing_output_means_not_up_to_date(tmp_path: Path) -> None:
    (tmp_path / "report.md").write_text("# report")
    _finish(tmp_path, ["report.md"])
    (tmp_path / "report.md").unlink()
    assert up_to_date(tmp_path, "cfg", "inp") is None
