"""Training end to end on a tiny random Llama: outputs, replay share, packing isolation, exact resume
after SIGKILL, the forgetting monitor, MLflow on SQLite, config errors."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import make_doc, prepared_run, write_config

CPTKIT = [sys.executable, "-m", "cptkit"]


def setup_run(
    tmp_path: Path, model_dir: Path, replay_ratio: float = 0.25, general_unlike_domain: bool = False, **training: Any
) -> Path:
    """A prepared domain + replay corpus and a config that trains the tiny model on it."""
    general = [make_doc(1000 + i) for i in range(40)]
    if general_unlike_domain:  # the same words in reverse order: what domain training makes worse
        general = [" ".join(reversed(text.split())) for text in general]
    settings = {
        "method": "lora",
        "learning_rate": 1e-3,
        "max_steps": 6,
        "max_seq_length": 64,
        "micro_batch_size": 2,
        "gradient_accumulation_steps": 2,
        "eval_steps": 3,
        "save_steps": 2,
        "warmup_steps": 1,
        "precision": "fp32",
        "eval_max_sequences": 8,
        **training,
    }
    return prepared_run(tmp_path, model_dir, settings, general_texts=general, replay_ratio=replay_ratio)


def local_store() -> str:
    # Absolute: mlflow caches stores by URI, so a relative one could reach an earlier test's database.
    return f"sqlite:///{Path('mlflow.db').resolve()}"


def summary() -> dict[str, Any]:
    return json.loads(Path("outputs/cpt_model/training_summary.json").read_text())


def test_train_writes_the_adapter_summary_and_mlflow_run(tmp_path: Path, tiny_model_dir: Path, cli) -> None:  # type: ignore[no-untyped-def]
    cfg = setup_run(tmp_path, tiny_model_dir)
    result = cli("train", "-c", str(cfg))
    assert result.exit_code == 0, result.output
    s = summary()
    assert s["steps"] == 6 and len(s["losses"]) == 6 and s["final_loss"] == s["losses"][-1]
    assert all(np.isfinite(s["losses"]))
    assert s["tokens"] > 0 and s["tokens_per_second"] > 0
    assert s["replay_share"] == pytest.approx(0.25, abs=0.1)
    assert [e["step"] for e in s["evals"]] == [0, 3, 6]
    assert {"eval/domain_loss", "eval/general_loss"} <= set(s["evals"][0])
    assert s["evals"][-1]["eval/domain_loss"] < s["evals"][0]["eval/domain_loss"]  # it learned the domain
    out = Path("outputs/cpt_model")
    assert (out / "adapter_config.json").is_file() and (out / "tokenizer.json").is_file()
    assert not (out / "checkpoints").exists()  # removed once the run is complete

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=local_store())
    run = client.get_run(s["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["training.learning_rate"] == "0.001"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1, 2, 3, 4, 5, 6]
    losses = [m.value for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert losses == pytest.approx(s["losses"])
    names = {d.dataset.name for d in run.inputs.dataset_inputs}
    assert {"domain-train", "replay-train", "domain-val", "replay-val"} <= names

    again = cli("train", "-c", str(cfg))
    assert "train: up to date, skipped" in again.output


def test_packed_documents_do_not_see_each_other(tiny_model_dir: Path) -> None:
    """The loss of each document inside a packed block equals its loss alone."""
    import torch
    from transformers import AutoModelForCausalLM

    from cptkit.packing import TokenDocs, sequence_blocks

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa").eval()
    rng = np.random.default_rng(0)
    doc_list = [rng.integers(2, 400, size=n).tolist() for n in (7, 12, 5)]
    blocks = sequence_blocks(TokenDocs.from_lists(doc_list), separator=0, seq_len=27)
    ids, pos, _ = blocks.block(0)
    with torch.no_grad():
        packed = model(input_ids=torch.tensor(ids)[None], position_ids=torch.tensor(pos)[None], use_cache=False).logits[
            0
        ]
        start = 0
        for doc in doc_list:
            alone_ids = torch.tensor([*doc, 0])[None]
            alone = model(input_ids=alone_ids, use_cache=False).logits[0]
            n = len(doc) + 1
            assert torch.allclose(packed[start : start + n], alone, atol=1e-5)
            start += n


def test_a_run_killed_with_sigkill_resumes_to_the_same_losses(tmp_path: Path, tiny_model_dir: Path) -> None:
    cfg = setup_run(tmp_path, tiny_model_dir, max_steps=8, save_steps=3, eval_steps=4)
    env = {**os.environ, "CPTKIT_CACHE": os.environ["CPTKIT_CACHE"]}
    subprocess.run(
        [*CPTKIT, "train", "-c", str(cfg), "--set", "output_dir=straight"], check=True, env=env, capture_output=True
    )
    straight = json.loads(Path("straight/training_summary.json").read_text())["losses"]

    proc = subprocess.Popen(
        [*CPTKIT, "train", "-c", str(cfg)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + 120
    while not Path("outputs/cpt_model/checkpoints/step-0000006/trainer_state.json").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "training ended before it could be killed"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not Path("outputs/cpt_model/manifest.json").exists()

    resumed = subprocess.run([*CPTKIT, "train", "-c", str(cfg)], env=env, capture_output=True, text=True, check=True)
    assert "resuming from" in resumed.stderr
    s = summary()
    assert s["steps"] == 8
    assert s["losses"] == pytest.approx(straight, abs=1e-5)
    # One MLflow run across the kill: the resumed process continued it.
    from mlflow.tracking import MlflowClient

    history = MlflowClient(tracking_uri=local_store()).get_metric_history(s["mlflow_run_id"], "train/loss")
    assert sorted({m.step for m in history}) == list(range(1, 9))


def test_forgetting_monitor_stops_and_keeps_the_best_within_budget(tmp_path: Path, tiny_model_dir: Path, cli) -> None:  # type: ignore[no-untyped-def]
    cfg = setup_run(
        tmp_path,
        tiny_model_dir,
        replay_ratio=0.0,
        general_unlike_domain=True,
        learning_rate=5e-2,
        max_steps=12,
        eval_steps=2,
        max_general_loss_increase=1e-4,
    )
    result = cli("train", "-c", str(cfg))
    assert result.exit_code == 0, result.output
    s = summary()
    assert s["stopped_reason"] is not None and "general validation loss rose" in s["stopped_reason"]
    assert s["steps"] < 12
    assert s["best"]["step"] < s["steps"]
    assert "keeping step" in result.output


def test_replay_ratio_without_replay_source_is_a_config_error(tmp_path: Path, tiny_model_dir: Path, cli) -> None:  # type: ignore[no-untyped-def]
    cfg = setup_run(tmp_path, tiny_model_dir)
    result = cli("train", "-c", str(cfg), "--set", "data.replay=null")
    assert result.exit_code == 2
    assert "config error: data.replay: required when data.replay_ratio > 0" in result.output


def test_train_before_prepare_says_what_to_do(tmp_path: Path, tiny_model_dir: Path, cli) -> None:  # type: ignore[no-untyped-def]
    write_config(
        tmp_path / "c.yaml",
        {
            "model": {"name": str(tiny_model_dir)},
            "source": {"type": "jsonl", "path": "x.jsonl"},
            "data": {"replay_ratio": 0},
        },
    )
    result = cli("train", "-c", "c.yaml")
    assert result.exit_code == 1
    assert "the domain data is not prepared; run `cptkit prepare` first" in result.output


@pytest.mark.parametrize("store", ["closed port", "read-only folder"])
def test_an_unusable_tracking_store_stops_train_quickly_in_one_line(
    tmp_path: Path, tiny_model_dir: Path, store: str
) -> None:
    """Through the real CLI with MLflow's default retries (about 2 minutes for a server, 100 s for SQLite):
    a tracking server nothing listens for, and a SQLite store in a folder nothing can be written to, each
    fail in seconds with one line naming it, before the model loads."""
    from test_tracking import closed_port, read_only_folder

    cfg = setup_run(tmp_path, tiny_model_dir)
    if store == "closed port":
        uri, shown = f"http://user:pw-9f8e7d6c@127.0.0.1:{closed_port()}", "http://***@127.0.0.1:"
    else:
        uri = shown = f"sqlite:///{read_only_folder(tmp_path) / 'mlflow.db'}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_HTTP_REQUEST_", "MLFLOW_TRACKING_URI"))}
    started = time.monotonic()
    result = subprocess.run(
        [*CPTKIT, "train", "-c", str(cfg), "--set", f"tracking.tracking_uri={uri}"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert time.monotonic() - started < 15, (time.monotonic() - started, result.stderr)
    assert result.returncode == 1
    lines = result.stderr.splitlines()  # before the model loads: nothing but the error
    assert len(lines) == 1 and lines[0].startswith(f"error: MLflow tracking at {shown}"), result.stderr
    assert "pw-9f8e7d6c" not in result.stderr + result.stdout


@pytest.mark.parametrize("method", ["qlora", "full"])
def test_other_methods_train(tmp_path: Path, tiny_model_dir: Path, cli, method: str) -> None:  # type: ignore[no-untyped-def]
    cfg = setup_run(tmp_path, tiny_model_dir, method=method, max_steps=2, eval_steps=2)
    result = cli("train", "-c", str(cfg), "--set", "tracking.enabled=false")
    assert result.exit_code == 0, result.output
    s = summary()
    assert s["method"] == method and s["steps"] == 2 and all(np.isfinite(s["losses"]))


# ---------------------------------------------------------------- a full disk


@pytest.fixture
def tmpfs() -> Iterator[Callable[[Path, str], Path]]:
    """Mount a small tmpfs (a real file system that fills up); skips where mounting needs privileges this
    process does not have (the simulated tests cover the same code)."""
    mounted: list[Path] = []

    def mount(folder: Path, size: str) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        try:
            done = subprocess.run(
                ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True, text=True
            )
        except FileNotFoundError:
            pytest.skip("no mount command here")
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in reversed(mounted):
        if subprocess.run(["umount", str(folder)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "--lazy", str(folder)], check=False)


def test_a_full_disk_while_checkpointing_keeps_the_previous_checkpoint(
    tmp_path: Path, tmpfs: Callable[[Path, str], Path]
) -> None:
    """torch.save's zip writer says only 'unexpected pos ...' when the disk fills up under it."""
    import shutil

    import torch

    from cptkit.checkpoints import TrainerState, list_checkpoints, save_checkpoint
    from cptkit.errors import StageError

    root = tmpfs(tmp_path / "checkpoints", "1m")
    first = save_checkpoint(root, TrainerState(step=1), {"w": torch.zeros(10)}, {"m": torch.zeros(10)}, keep=3)
    with pytest.raises(StageError) as info:
        # The weights fit; the optimizer state (4 MB) does not.
        save_checkpoint(root, TrainerState(step=2), {"w": torch.zeros(1000)}, {"m": torch.zeros(1_000_000)}, keep=3)
    assert str(info.value) == f"no space left on device while writing checkpoint {root / 'step-0000002'}"
    assert list_checkpoints(root) == [first]
    assert sorted(p.name for p in root.iterdir()) == ["step-0000001"]  # no partial checkpoint left
    # ... nor held open: the space is free again while the error is still referenced.
    assert shutil.disk_usage(root).free > (1 << 20) - (64 << 10)


def test_train_on_a_full_disk_says_so_in_one_line(
    tmp_path: Path, tiny_model_dir: Path, cli: Any, tmpfs: Callable[[Path, str], Path]
) -> None:
    cfg = setup_run(tmp_path, tiny_model_dir, max_steps=4)
    checkpoints = tmpfs(tmp_path / "outputs" / "cpt_model" / "checkpoints", "64k")
    result = cli("train", "-c", str(cfg))
    assert result.exit_code == 1, result.output
    line = " ".join(result.output.split())
    assert "error: no space left on device while writing checkpoint outputs/cpt_model/checkpoints/step-0000002" in line
    assert "internal error" not in line and "Traceback" not in result.output
    assert list(checkpoints.iterdir()) == []


def test_a_simulated_full_disk_in_checkpoints_and_outputs_is_one_line(
    tmp_path: Path, tiny_model_dir: Path, cli: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    import torch
    from transformers import PreTrainedTokenizerBase

    def no_space(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    cfg = setup_run(tmp_path, tiny_model_dir, max_steps=4)
    out = Path("outputs/cpt_model")
    with monkeypatch.context() as patch:
        patch.setattr(torch, "save", no_space)
        result = cli("train", "-c", str(cfg))
    assert result.exit_code == 1, result.output
    assert " ".join(result.output.split()).endswith(
        f"error: no space left on device while writing checkpoint {out / 'checkpoints' / 'step-0000002'}"
    )
    assert not list((out / "checkpoints").iterdir())

    with monkeypatch.context() as patch:
        patch.setattr(PreTrainedTokenizerBase, "save_pretrained", no_space)
        result = cli("train", "-c", str(cfg))
    assert result.exit_code == 1, result.output
    line = " ".join(result.output.split())
    assert line.endswith(f"error: no space left on device while writing the trained model {out}")
    assert not (out / "manifest.json").exists()  # nothing there looks complete: a rerun trains again
    from mlflow import MlflowClient

    run_id = json.loads(next(out.glob("checkpoints/step-*/trainer_state.json")).read_text())["run_id"]
    assert MlflowClient(local_store()).get_run(run_id).info.status == "FAILED"


def test_auto_method_and_precision_are_chosen_printed_logged_and_saved(  # type: ignore[no-untyped-def]
    tmp_path: Path, tiny_model_dir: Path, cli
) -> None:
    import yaml

    from cptkit.capability import probe
    from cptkit.choices import choose_precision

    cfg = setup_run(tmp_path, tiny_model_dir, method="auto", precision="auto", max_steps=2, eval_steps=2)
    result = cli("train", "-c", str(cfg))
    assert result.exit_code == 0, result.output
    expected_precision = choose_precision(probe("cpu")).value  # bf16 only where this CPU runs it fast
    out = " ".join(result.output.split())
    assert "train: device cpu: no CUDA or mps device is present" in out
    assert f"train: precision {expected_precision}: bf16 is" in out
    assert "train: method lora: LoRA on a" in out and "no slower than QLoRA" in out
    s = summary()
    assert (s["method"], s["precision"], s["device"]) == ("lora", expected_precision, "cpu")
    assert "no slower than QLoRA" in s["choices"]["method"]["reason"]
    saved = yaml.safe_load(Path("outputs/cpt_model/cptkit_config.yaml").read_text())
    assert (saved["training"]["method"], saved["training"]["precision"]) == ("lora", expected_precision)

    from mlflow.tracking import MlflowClient

    run = MlflowClient(tracking_uri=local_store()).get_run(s["mlflow_run_id"])
    assert run.data.params["training.method"] == "auto" and run.data.params["chosen.method"] == "lora"
    assert run.data.params["chosen.precision"] == expected_precision
    assert "no slower than QLoRA" in run.data.params["chosen.method_reason"]
    assert run.data.tags["cptkit.method"] == "lora"


def test_a_time_budget_fixes_the_steps_and_completes_the_schedule(tmp_path: Path, tiny_model_dir: Path, cli) -> None:  # type: ignore[no-untyped-def]
    budget_minutes = 0.25  # 15 s: enough steps to fit a schedule to on a loaded machine too
    cfg = setup_run(
        tmp_path,
        tiny_model_dir,
        max_steps=100_000,  # the most the budget may give; it gives far fewer
        max_minutes=budget_minutes,
        eval_steps=25,
        save_steps=40,
        eval_max_sequences=2,
        gradient_accumulation_steps=1,
    )
    result = cli("train", "-c", str(cfg), "--set", "tracking.enabled=false")
    assert result.exit_code == 0, result.output
    assert "steps fit the time budget" in result.output
    s = summary()
    assert 4 < s["steps"] == s["derived_steps"] < 100_000 and s["max_planned_steps"] == 100_000
    assert s["max_minutes"] == budget_minutes
    assert len(s["step_seconds"]) == s["steps"]
    assert s["train_seconds"] <= budget_minutes * 60 + max(s["step_seconds"])  # within the budget, + one step
    assert s["train_seconds"] > 0.5 * budget_minutes * 60  # and it used the budget
    # The schedule was fitted to the derived steps: the last update is made at the final rate.
    assert s["learning_rates"][-1] == pytest.approx(1e-3 * 0.1)
    assert min(s["learning_rates"]) == pytest.approx(1e-3 * 0.1)
    assert [e["step"] for e in s["evals"]][-1] == s["steps"]


def test_a_budgeted_run_resumes_with_its_derived_step_count(tmp_path: Path, tiny_model_dir: Path) -> None:
    # The budget fixes the count after five timed steps, or fewer on a loaded machine (a quarter of the
    # budget); the first checkpoint after that holds it. Kill the run there.
    cfg = setup_run(tmp_path, tiny_model_dir, max_steps=100_000, max_minutes=0.5, eval_steps=1000, save_steps=2)
    env = {**os.environ, "CPTKIT_CACHE": os.environ["CPTKIT_CACHE"]}
    proc = subprocess.Popen(
        [*CPTKIT, "train", "-c", str(cfg), "--set", "tracking.enabled=false"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    checkpoints = Path("outputs/cpt_model/checkpoints")

    def fixed() -> bool:
        for state_file in checkpoints.glob("step-*/trainer_state.json"):
            with contextlib.suppress(OSError, ValueError):  # removed or replaced meanwhile
                if json.loads(state_file.read_text())["planned_steps"] is not None:
                    return True
        return False

    deadline = time.monotonic() + 120
    while not fixed():
        assert proc.poll() is None and time.monotonic() < deadline, "training ended before it could be killed"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    latest = sorted(checkpoints.glob("step-*"))[-1]  # the kill may come a checkpoint later
    derived = json.loads((latest / "trainer_state.json").read_text())["planned_steps"]
    assert derived is not None and derived > int(latest.name.split("-")[1])

    resumed = subprocess.run(
        [*CPTKIT, "train", "-c", str(cfg), "--set", "tracking.enabled=false"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    # Resumed on the checkpoint's count, not a new one (a busier machine may only lower it).
    said = " ".join(resumed.stderr.split())  # rich wraps long lines
    assert f"(step {int(latest.name.split('-')[1])} of {derived})" in said and "steps fit the time budget" not in said
    s = summary()
    assert s["steps"] == s["derived_steps"] <= derived
    assert s["learning_rates"][-1] == pytest.approx(1e-3 * 0.1)


def test_checkpoints_of_another_chosen_method_precision_or_process_count_are_not_resumed(tmp_path: Path) -> None:
    from cptkit.checkpoints import STATE
    from cptkit.config import TrainingConfig
    from cptkit.train import _resume_state

    root = tmp_path / "checkpoints"
    (root / "step-0000002").mkdir(parents=True)
    state = {"fingerprint": "abc", "method": "qlora", "precision": "fp32", "processes": 2}
    (root / "step-0000002" / STATE).write_text(json.dumps(state))
    same = TrainingConfig(method="qlora", precision="fp32")
    assert _resume_state(root, "abc", False, same, 2) == root / "step-0000002"
    assert _resume_state(root, "abc", False, same, 1) is None  # another global batch and share per process
    for other in (TrainingConfig(method="lora", precision="fp32"), TrainingConfig(method="qlora", precision="bf16")):
        assert _resume_state(root, "abc", False, other, 2) is None


def test_steps_within_a_budget_count_steps_validation_and_checkpoints() -> None:
    from cptkit.schedule import steps_within

    # 1 s steps, a 5 s validation every 10 steps and at the last, a 2 s checkpoint every 10 before the last:
    # the largest count whose time fits 100 s (60: 60 + 6 x 5 + 5 x 2).
    for total in range(1, 200):
        evals = total // 10 + (total % 10 != 0)
        saves = (total - 1) // 10
        if total + 5 * evals + 2 * saves > 100:
            break
        fits = total
    assert steps_within(100, 0, 1000, 1.0, 5.0, 2.0, 10, 10) == fits == 60
    assert steps_within(100, 0, 20, 1.0, 5.0, 2.0, 10, 10) == 20  # the cap comes first
    assert steps_within(0.0, 7, 1000, 1.0, 5.0, 2.0, 10, 10) == 8  # out of time: one more step, at the final rate


def test_one_slow_step_does_not_cut_a_budgeted_run_but_a_slower_machine_does() -> None:
    from cptkit.budget import fit_budget as _fit_budget
    from cptkit.checkpoints import TrainerState
    from cptkit.config import TrainingConfig

    tc = TrainingConfig(max_minutes=1, eval_steps=1000, save_steps=1000)
    state = TrainerState(step=4, evals=[{"step": 0}], eval_seconds=1.0)
    assert _fit_budget(tc, 59.0, state, [3.0, 1.0, 1.0, 1.1], 1000, 100) is None  # not enough steps timed yet
    state.step = 6
    fixed = _fit_budget(tc, 55.0, state, [3.0, 1.0, 4.0, 1.0, 1.1, 1.0], 1000, 100)  # one step slowed: median
    assert fixed == 6 + 54  # 54 more 1-second steps and the final 1-second validation fit 55 s
    state.planned_steps = fixed
    state.step = 10
    on_pace = [3.0] + [1.0] * 9
    assert _fit_budget(tc, 51.0, state, on_pace, fixed, 100) is None
    # One step of 9 s: its lost time is in the remaining seconds; the pace is still 1 s a step.
    assert _fit_budget(tc, 43.0, state, [*on_pace, 9.0], fixed, 100) == 10 + 42
    # The machine got busier: 2 s a step from now on lowers the count to what fits.
    busy = _fit_budget(tc, 44.0, state, [*on_pace[:-3], 2.0, 2.0, 2.0], fixed, 100)
    assert busy == 10 + 21
