"""Output folders: a stage never writes into a folder of the user's, one run at a time per folder (a real
second process, a real SIGKILL), and prepare's workers die with it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from conftest import make_doc, prepared_run, write_config, write_jsonl

CPTKIT = [sys.executable, "-m", "cptkit"]
TRAINING = {
    "method": "lora",
    "max_steps": 2,
    "max_seq_length": 64,
    "micro_batch_size": 2,
    "eval_steps": 2,
    "save_steps": 2,
    "warmup_steps": 1,
    "precision": "fp32",
    "eval_max_sequences": 2,
}


def _env() -> dict[str, str]:
    return {**os.environ, "CPTKIT_LOG_FORMAT": "quiet"}


def _user_folder(path: Path) -> dict[str, bytes]:
    """A folder of the user's, as in the report: a checkpoints folder, a README and a manifest.json."""
    (path / "checkpoints").mkdir(parents=True)
    (path / "checkpoints" / "keep.txt").write_text("precious\n")
    (path / "README.md").write_text("# My readme\n")
    (path / "manifest.json").write_text('{"name":"app"}\n')
    return _snapshot(path)


def _snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: "), stderr
    return lines[0]


def test_train_leaves_a_users_folder_untouched(tmp_path: Path, tiny_model_dir: Path) -> None:
    cfg = prepared_run(tmp_path, tiny_model_dir, TRAINING)
    before = _user_folder(tmp_path / "proj")
    run = subprocess.run(
        [*CPTKIT, "train", "-c", str(cfg), "--set", f"output_dir={tmp_path / 'proj'}"],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
    )
    assert run.returncode == 1
    line = _one_error_line(run.stderr)
    assert "proj" in line and "did not write" in line and "README.md" in line
    assert _snapshot(tmp_path / "proj") == before  # nothing replaced, deleted or added (no lock, no marker)


def test_prepare_refuses_the_seeds_data_folder_and_extract_writes_nothing(
    tmp_path: Path, corpus_config: Path, cli
) -> None:  # type: ignore[no-untyped-def]
    os.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "train.jsonl").write_text('{"text": "my own training data"}\n')
    before = _snapshot(tmp_path / "out")
    for command in ("extract", "prepare"):
        result = cli(command, "-c", str(corpus_config))
        assert result.exit_code == 1, result.output
        assert "did not write (train.jsonl)" in result.output
    assert _snapshot(tmp_path / "out") == before
    assert not (tmp_path / "out" / "raw").exists()


def test_a_stage_refuses_another_stages_folder(tmp_path: Path, tiny_model_dir: Path, cli) -> None:  # type: ignore[no-untyped-def]
    cfg = prepared_run(tmp_path, tiny_model_dir, TRAINING)
    prepared = _snapshot(tmp_path / "data")
    result = cli("train", "-c", str(cfg), "--set", "output_dir=data")
    assert result.exit_code == 1
    assert "holds the outputs of cptkit prepare; train needs a folder of its own" in result.output
    assert _snapshot(tmp_path / "data") == prepared


def test_folders_written_by_cptkit_are_reused_and_marked(tmp_path: Path, corpus_config: Path, cli) -> None:  # type: ignore[no-untyped-def]
    from cptkit.folders import MARKER

    os.chdir(tmp_path)
    assert cli("extract", "-c", str(corpus_config)).exit_code == 0
    assert cli("prepare", "-c", str(corpus_config)).exit_code == 0
    marker = json.loads((tmp_path / "out" / MARKER).read_text())
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert marker["stage"] == "prepare" and marker["config_fingerprint"] == manifest["config_fingerprint"]
    assert json.loads((tmp_path / "out" / "raw" / MARKER).read_text())["stage"] == "extract"
    # A folder from a cptkit without markers is recognised by its manifest and adopted.
    (tmp_path / "out" / MARKER).unlink()
    result = cli("prepare", "-c", str(corpus_config), "--force")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / MARKER).is_file()


HOLDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from cptkit.folders import claim
    with claim(Path(sys.argv[1]), sys.argv[2]):
        print("held", flush=True)
        time.sleep(float(sys.argv[3]))
    """
)


def _hold(folder: Path, stage: str, seconds: float) -> subprocess.Popen[str]:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(folder), stage, str(seconds)], stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_run_on_a_locked_folder_fails_at_once_or_waits(tmp_path: Path, corpus_config: Path) -> None:
    os.chdir(tmp_path)
    command = [*CPTKIT, "prepare", "-c", str(corpus_config)]
    subprocess.run([*CPTKIT, "extract", "-c", str(corpus_config)], env=_env(), check=True, capture_output=True)
    holder = _hold(tmp_path / "out", "prepare", 60)
    try:
        run = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=60)
        assert run.returncode == 1
        line = _one_error_line(run.stderr)
        assert f"pid {holder.pid}" in line and str(tmp_path / "out") in line and "--wait" in line
        assert not (tmp_path / "out" / "manifest.json").exists()
        # The kernel releases the lock of a killed holder: no stale lock to clean up by hand.
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        run = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
    finally:
        holder.kill()
    holder = _hold(tmp_path / "out", "prepare", 3)
    started = time.monotonic()
    run = subprocess.run([*command, "--force", "--wait"], env=_env(), capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert holder.wait() == 0
    assert time.monotonic() - started >= 2.5  # it waited for the holder
    assert f"waiting for {tmp_path / 'out'}: another cptkit run (pid {holder.pid})" in run.stderr


def test_two_trainings_on_one_folder(tmp_path: Path, tiny_model_dir: Path) -> None:
    """The report's case: a second `cptkit train` (another learning rate) on a folder a first one is
    writing. The first is stopped (SIGSTOP) while it holds the folder, so the race is certain."""
    cfg = prepared_run(tmp_path, tiny_model_dir, {**TRAINING, "max_steps": 40})
    out = tmp_path / "outputs" / "cpt_model"
    first = subprocess.Popen([*CPTKIT, "train", "-c", str(cfg)], cwd=tmp_path, env=_env(), stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not ((out / ".cptkit.lock").is_file() and (out / ".cptkit.lock").read_text().strip()):
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        first.send_signal(signal.SIGSTOP)
        second = subprocess.run(
            [*CPTKIT, "train", "-c", str(cfg), "--set", "training.learning_rate=0.01"],
            cwd=tmp_path,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert second.returncode == 1
        assert f"another cptkit run (pid {first.pid})" in _one_error_line(second.stderr)
        first.send_signal(signal.SIGCONT)
        assert first.wait(timeout=300) == 0
    finally:
        first.kill()
    from mlflow import MlflowClient

    runs = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").search_runs(experiment_ids=["0", "1"])
    assert len(runs) == 1


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_prepare_workers_die_with_a_killed_prepare(tmp_path: Path, tiny_tokenizer_dir: Path) -> None:
    os.chdir(tmp_path)
    write_jsonl(tmp_path / "docs.jsonl", [{"id": f"d{i}", "text": make_doc(i) * 20} for i in range(3000)])
    cfg = write_config(
        tmp_path / "cfg.yaml",
        {
            "model": {"name": str(tiny_tokenizer_dir)},
            "data": {"output_dir": "out"},
            "source": {"type": "jsonl", "path": "docs.jsonl", "id_column": "id"},
            "prepare": {"workers": 2, "chunk_size": 16},
        },
    )
    subprocess.run([*CPTKIT, "extract", "-c", str(cfg)], env=_env(), check=True, capture_output=True)
    main = subprocess.Popen([*CPTKIT, "prepare", "-c", str(cfg)], env=_env(), stderr=subprocess.DEVNULL)
    try:
        process = psutil.Process(main.pid)
        deadline = time.monotonic() + 120
        workers: list[psutil.Process] = []
        # Two workers and the resource tracker: the pool is at work.
        while len(workers) < 3:
            assert main.poll() is None and time.monotonic() < deadline, "prepare ended before its workers started"
            workers = process.children(recursive=True)
            time.sleep(0.05)
        main.send_signal(signal.SIGKILL)
        main.wait()
        _gone, alive = psutil.wait_procs(workers, timeout=15)
        assert not alive, [p.cmdline() for p in alive]
    finally:
        main.kill()
    assert not (tmp_path / "out" / "manifest.json").exists()
