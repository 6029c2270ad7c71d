"""Training on several processes (gloo on loopback, the tiny model, fp32): N processes with micro batch m
give the losses and adapter of one process with gradient accumulation N, under each launcher (cptkit's
--processes, accelerate launch, torchrun), write one set of outputs and one MLflow run, and resume exactly
after a SIGKILL of the whole group."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_train import setup_run, summary

CPTKIT = [sys.executable, "-m", "cptkit"]
MODULE = ["-m", "cptkit", "train"]
LAUNCHERS = {
    "cptkit": [*CPTKIT, "train", "--processes", "2"],
    "accelerate": [str(Path(sys.executable).parent / "accelerate"), "launch", "--cpu", "--num_processes", "2", *MODULE],
    "torchrun": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *MODULE],
}
# Two processes with micro batch 2 and no accumulation: the global batch of one process's 2 x 2.
TWO_PROCESSES = ["--set", "training.gradient_accumulation_steps=1", "--set", "output_dir=two"]


def adapter(folder: str) -> dict[str, object]:
    from safetensors.torch import load_file

    return load_file(f"{folder}/adapter_model.safetensors")


def mlflow_runs(uri: str) -> list[object]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    return [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]


@pytest.mark.parametrize(("method", "launcher"), [("lora", "cptkit"), ("qlora", "accelerate")])
def test_two_processes_train_as_one_with_gradient_accumulation(
    tmp_path: Path,
    tiny_model_dir: Path,
    cli,  # type: ignore[no-untyped-def]
    method: str,
    launcher: str,
) -> None:
    cfg = setup_run(tmp_path, tiny_model_dir, method=method, eval_steps=6, save_steps=4)
    assert cli("train", "-c", str(cfg)).exit_code == 0  # one process, 2 x 2 blocks a step
    one = summary()

    store = f"sqlite:///{tmp_path / 'two.db'}"  # the two-process run's own store
    two_run = subprocess.run(
        [*LAUNCHERS[launcher], "-c", str(cfg), *TWO_PROCESSES, "--set", f"tracking.tracking_uri={store}"],
        capture_output=True,
        text=True,
    )
    assert two_run.returncode == 0, two_run.stderr[-3000:]
    two = json.loads(Path("two/training_summary.json").read_text())
    assert two["losses"] == pytest.approx(one["losses"], abs=1e-5)
    assert (two["tokens"], two["replay_tokens"]) == (one["tokens"], one["replay_tokens"])  # global counts
    # The validation passes, shared by the processes, give one process's numbers.
    assert [e["step"] for e in two["evals"]] == [e["step"] for e in one["evals"]]
    for mine, theirs in zip(two["evals"], one["evals"], strict=True):
        assert mine == pytest.approx(theirs, abs=1e-5)
    for name, weight in adapter("outputs/cpt_model").items():
        assert adapter("two")[name] == pytest.approx(weight, abs=1e-5), name  # type: ignore[comparison-overlap]
    # One process prints, one writes: one set of outputs, one MLflow run with every step.
    assert two_run.stderr.count("train: step 1/6") == 1, two_run.stderr
    assert "6 steps of 2x1x2 processes = 4 blocks" in two_run.stderr
    assert Path("two/manifest.json").is_file() and not Path("two/checkpoints").exists()
    (run,) = mlflow_runs(store)
    assert run.info.status == "FINISHED"  # type: ignore[attr-defined]
    from mlflow.tracking import MlflowClient

    history = MlflowClient(tracking_uri=store).get_metric_history(run.info.run_id, "train/loss")  # type: ignore[attr-defined]
    assert [m.value for m in history] == pytest.approx(one["losses"], abs=1e-5)


def test_a_process_group_killed_with_sigkill_resumes_to_the_same_losses(
    tmp_path: Path,
    tiny_model_dir: Path,
    cli,  # type: ignore[no-untyped-def]
) -> None:
    cfg = setup_run(tmp_path, tiny_model_dir, max_steps=8, save_steps=3, eval_steps=4)
    assert cli("train", "-c", str(cfg)).exit_code == 0
    one = summary()["losses"]

    command = [*LAUNCHERS["torchrun"], "-c", str(cfg), *TWO_PROCESSES]
    group = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 180
    while not Path("two/checkpoints/step-0000006/trainer_state.json").exists():
        assert group.poll() is None and time.monotonic() < deadline, "training ended before it could be killed"
        time.sleep(0.02)
    os.killpg(group.pid, signal.SIGKILL)  # the launcher and both processes at once
    group.wait()
    assert not Path("two/manifest.json").exists()

    resumed = subprocess.run([*LAUNCHERS["cptkit"], "-c", str(cfg), *TWO_PROCESSES], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr and "(step 6 of 8)" in resumed.stderr
    two = json.loads(Path("two/training_summary.json").read_text())
    assert two["steps"] == 8
    assert two["losses"] == pytest.approx(one, abs=1e-5)
    runs = mlflow_runs(f"sqlite:///{Path('mlflow.db').resolve()}")
    assert len(runs) == 2  # the one-process run, and the two-process run continued across the kill


@pytest.mark.parametrize("decision", ["time budget", "forgetting stop"])
def test_the_main_process_decides_for_every_process(tmp_path: Path, tiny_model_dir: Path, decision: str) -> None:
    """Each process times its own steps and could judge its own validation: they follow the main one's
    step count and stop (processes that disagreed would hang in, or fail at, their next collective)."""
    if decision == "time budget":
        settings = {"max_steps": 100_000, "max_minutes": 0.1, "eval_steps": 1000, "save_steps": 1000}
    else:
        settings = {"max_steps": 12, "eval_steps": 2, "learning_rate": 5e-2, "max_general_loss_increase": 1e-4}
    cfg = setup_run(
        tmp_path,
        tiny_model_dir,
        replay_ratio=0.0,
        general_unlike_domain=True,
        gradient_accumulation_steps=1,
        **settings,
    )
    done = subprocess.run(
        [*LAUNCHERS["cptkit"], "-c", str(cfg), "--set", "tracking.enabled=false"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    s = summary()
    if decision == "time budget":
        assert s["steps"] == s["derived_steps"] < 100_000
        assert done.stderr.count("steps fit the time budget") == 1
    else:
        assert "general validation loss rose" in s["stopped_reason"] and s["steps"] < 12
        assert done.stderr.count("train: stopping") == 1


def test_the_process_count_of_an_accelerate_cpu_launch_is_read_from_its_command_line() -> None:
    from cptkit.distributed import requested_processes

    accelerate = [sys.executable, "/venv/bin/accelerate", "launch"]
    assert requested_processes([*accelerate, "--cpu", "--num_processes", "2", "-m", "cptkit", "train"]) == 2
    assert requested_processes([*accelerate, "--mixed_precision", "no", "--num-processes=4", "train.py"]) == 4
    assert requested_processes([*accelerate, "--cpu", "-m", "cptkit", "train", "--num_processes", "3"]) is None
    assert requested_processes([*accelerate, "--num_processes", "1", "-m", "cptkit"]) is None
    assert requested_processes([sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2"]) == 2
    assert requested_processes(["/venv/bin/accelerate-launch", "--num_processes", "2", "train.py"]) == 2
    assert requested_processes(["bash", "-c", "cptkit train"]) is None


def test_processes_under_a_launcher_of_another_size_is_one_line(
    tmp_path: Path, tiny_model_dir: Path, cli, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    cfg = setup_run(tmp_path, tiny_model_dir)
    monkeypatch.setenv("WORLD_SIZE", "4")
    result = cli("train", "-c", str(cfg), "--processes", "2")
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1].startswith("error: --processes 2 under a launcher that started 4")


def test_torch_distributor_runs_the_entry_point_as_two_processes(
    tmp_path: Path,
    tiny_model_dir: Path,
    cli,  # type: ignore[no-untyped-def]
    spark,  # type: ignore[no-untyped-def]
    capfd: pytest.CaptureFixture[str],
) -> None:
    """pyspark's TorchDistributor in local mode (what a Databricks notebook calls on a GPU cluster, here on
    CPU): its 2 processes train as one process with gradient accumulation 2, and it returns the summary."""
    from pyspark.ml.torch.distributor import TorchDistributor

    from cptkit.results import TrainingSummary
    from cptkit.train_entry import run_train

    cfg = setup_run(tmp_path, tiny_model_dir, eval_steps=6, save_steps=4)
    assert cli("train", "-c", str(cfg)).exit_code == 0
    one = summary()

    store = f"sqlite:///{tmp_path / 'two.db'}"
    overrides = [v for v in TWO_PROCESSES if v != "--set"] + [f"tracking.tracking_uri={store}"]
    distributor = TorchDistributor(num_processes=2, local_mode=True, use_gpu=False)
    returned = distributor.run(run_train, str(cfg), overrides)
    two = json.loads(Path("two/training_summary.json").read_text())
    assert returned == two  # the main process's summary, whichever process the distributor kept
    assert TrainingSummary.from_json(returned).losses == pytest.approx(one["losses"], abs=1e-5)
    assert (two["tokens"], two["replay_tokens"]) == (one["tokens"], one["replay_tokens"])
    for name, weight in adapter("outputs/cpt_model").items():
        assert adapter("two")[name] == pytest.approx(weight, abs=1e-5), name  # type: ignore[comparison-overlap]
    (run,) = mlflow_runs(store)
    assert run.info.status == "FINISHED"  # type: ignore[attr-defined]

    # A user mistake is cptkit's one line in the processes' log (which the distributor copies to stdout), not
    # a traceback per process; the distributor raises its own error.
    capfd.readouterr()
    with pytest.raises(RuntimeError, match="TorchDistributor"):
        distributor.run(run_train, str(cfg), [*overrides, "training.max_seq_length=0"])
    log = "".join(capfd.readouterr())
    assert "config error: training.max_seq_length: Input should be greater than 0" in log
    assert "cptkit/config/loading.py" not in log  # no Python traceback of cptkit's


def test_the_preflight_of_two_processes_estimates_from_one_and_plans_their_steps(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    import torch

    from cptkit.config import load_config
    from cptkit.preflight import preflight
    from cptkit.printers import print_preflight
    from cptkit.progress import console

    cfg = setup_run(tmp_path, tiny_model_dir, max_steps=None, num_epochs=1, gradient_accumulation_steps=1)
    threads = torch.get_num_threads()
    one = preflight(load_config(cfg), measure=False)
    two = preflight(load_config(cfg), processes=2)
    assert torch.get_num_threads() == threads  # the per-process share of the threads was only for the timing
    assert (one.blocks_per_step, two.blocks_per_step) == (2, 4)
    assert two.steps == -(-two.blocks_per_epoch // 4) < one.steps  # each step takes both processes' blocks
    m = two.measured
    assert m is not None and m.processes == 2
    assert m.tokens_per_second == pytest.approx(2 * m.tokens_per_second_per_process)
    assert m.throughput_basis is not None and m.throughput_basis.startswith("estimated: one process's timed steps on")
    with console.capture() as captured:
        print_preflight(two)
    text = " ".join(captured.get().split())
    assert f"plan: {two.steps} steps of 4 x 64 tokens (2 processes, 2 each)" in text
    assert "tokens/s on 2 processes (estimated: one process's timed steps on" in text
    assert "per process" in text and "peak memory per process" in text


def test_a_dry_run_under_torchrun_measures_the_processes_together(tmp_path: Path, tiny_model_dir: Path) -> None:
    cfg = setup_run(tmp_path, tiny_model_dir, gradient_accumulation_steps=1)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "cptkit"]
    done = subprocess.run([*torchrun, "run", "--dry-run", "-c", str(cfg)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    text = " ".join(done.stderr.split())
    assert text.count("preflight: plan: 6 steps of 4 x 64 tokens (2 processes, 2 each)") == 1  # the main one prints
    assert "tokens/s on 2 processes (measured: 2 processes ran the timed steps together)" in text


def test_run_under_a_launcher_is_refused_but_for_the_dry_run(
    tmp_path: Path, tiny_model_dir: Path, cli, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    cfg = setup_run(tmp_path, tiny_model_dir)
    monkeypatch.setenv("WORLD_SIZE", "2")  # every stage would run in each process
    result = cli("run", "-c", str(cfg))
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1].startswith("error: cptkit run under a launcher would run every")
    assert cli("run", "-c", str(cfg), "--processes", "3").exit_code == 2


def test_run_with_processes_trains_in_that_many(tmp_path: Path, tiny_model_dir: Path, cli) -> None:  # type: ignore[no-untyped-def]
    cfg = setup_run(tmp_path, tiny_model_dir)
    assert cli("train", "-c", str(cfg)).exit_code == 0  # one process, 2 x 2 blocks a step
    one = summary()

    done = subprocess.run(
        [*CPTKIT, "run", "-c", str(cfg), "--until", "train", "--processes", "2", *TWO_PROCESSES],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    text = " ".join(done.stderr.split())
    assert f"preflight: plan: {one['steps']} steps of 4 x 64 tokens (2 processes, 2 each)" in text
    assert "train: 2 processes on this machine" in text
    assert "run: ran train; skipped (up to date) extract, prepare" in text
    two = json.loads(Path("two/training_summary.json").read_text())
    assert two["losses"] == pytest.approx(one["losses"], abs=1e-5)
    # Up to date: skipped in this process, no processes started.
    again = subprocess.run(
        [*CPTKIT, "run", "-c", str(cfg), "--until", "train", "--processes", "2", *TWO_PROCESSES],
        capture_output=True,
        text=True,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert "train: 2 processes" not in again.stderr and "skipped (up to date) extract, prepare, train" in again.stderr


SHARED_VALIDATION = """
import json, sys
import numpy as np, torch
from accelerate import Accelerator
from transformers import AutoModelForCausalLM
from cptkit.loss import CausalLMLoss
from cptkit.packing import TokenDocs, sequence_blocks
from cptkit.training_step import eval_loss

accelerator = Accelerator(cpu=True)
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
forwards = []
model.model.register_forward_hook(lambda *_: forwards.append(1))  # the decoder: the loss applies the head itself
rng = np.random.default_rng(0)
docs = TokenDocs.from_lists([rng.integers(1, 400, int(rng.integers(20, 90))).tolist() for _ in range(40)])
blocks = sequence_blocks(docs, 0, 32)
alone = eval_loss(CausalLMLoss(model), blocks, 11, 2, accelerator.device)  # one process's passes: 6 batches
forwards.clear()
shared = eval_loss(accelerator.prepare(CausalLMLoss(model)), blocks, 11, 2, accelerator.device, accelerator)
print(json.dumps({"alone": alone, "shared": shared, "forwards": len(forwards)}))
"""


def test_validation_passes_are_shared_by_the_processes_with_one_process_numbers(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    script = tmp_path / "shared_validation.py"
    script.write_text(SHARED_VALIDATION)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    done = subprocess.run([*torchrun, str(script), str(tiny_model_dir)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    # Both processes print to one pipe: a line of one may run into the other's, so take each object.
    decoder, results, start = json.JSONDecoder(), [], done.stdout.find('{"alone"')
    while start >= 0:
        result, end = decoder.raw_decode(done.stdout, start)
        results.append(result)
        start = done.stdout.find('{"alone"', end)
    assert len(results) == 2, done.stdout
    for result in results:
        assert result["shared"] == result["alone"]  # bit for bit: the per-batch sums added in batch order
        assert result["forwards"] == 3  # 6 batches of 2 blocks (the first 11 blocks) over 2 processes
