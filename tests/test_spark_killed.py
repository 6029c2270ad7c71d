"""A killed Spark prepare leaves no manifest and no outputs, and the rerun completes (real processes:
`cptkit prepare` killed with its Spark JVM during the Spark job); Spark's start-up lines stay off the
console."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from conftest import make_doc, write_config, write_jsonl
from test_spark_engine import OUTPUT_FILES, needs_spark


def _cptkit(*args: str) -> list[str]:
    return [sys.executable, "-m", "cptkit", *args]


@needs_spark
def test_a_killed_spark_prepare_leaves_no_manifest_and_reruns(tmp_path: Path, cli: Any) -> None:
    write_jsonl(tmp_path / "docs.jsonl", [{"id": f"d{i:03d}", "text": make_doc(i)} for i in range(300)])
    cfg = write_config(
        tmp_path / "cfg.yaml",
        {
            "source": {"type": "jsonl", "path": "docs.jsonl", "id_column": "id"},
            "data": {"output_dir": "out"},
            "prepare": {"tokenize": False, "engine": "spark", "spark": {"master": "local[1]"}},
        },
    )
    assert cli("extract", "-c", str(cfg)).exit_code == 0
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = tmp_path / "out"
    # Its own session, so that the kill reaches the JVM and Spark's Python workers too.
    started = subprocess.Popen(
        _cptkit("prepare", "-c", str(cfg)),
        cwd=tmp_path,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        # Spark's write job has begun once its _temporary folder is in the work folder.
        while not list(out.glob(".prepare-work.*.tmp/results/_temporary")):
            assert started.poll() is None, "prepare ended before its Spark job was seen"
            assert time.monotonic() < deadline
            time.sleep(0.02)
        os.killpg(started.pid, signal.SIGKILL)
    finally:
        started.wait(timeout=60)
    assert not (out / "manifest.json").exists()
    assert not any((out / name).exists() for name in OUTPUT_FILES)

    rerun = subprocess.run(_cptkit("prepare", "-c", str(cfg)), cwd=tmp_path, env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert (out / "manifest.json").is_file()
    assert all((out / name).exists() for name in OUTPUT_FILES)
    assert not list(out.glob(".*.tmp"))
    # Spark's start-up WARN/INFO lines (e.g. "Setting default log level") are not on the console.
    assert "Setting default log level" not in rerun.stderr and " WARN " not in rerun.stderr, rerun.stderr
