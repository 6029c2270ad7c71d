"""Training sharded with FSDP (training.distributed: fsdp) on two processes (gloo on loopback, the tiny model,
fp32): the losses and trained weights of one process with gradient accumulation 2, full and adapters; sharded
checkpoints that resume exactly after a SIGKILL of the group; the trained model gathered into the files
an unsharded run writes, which load as they do."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from test_train import setup_run, summary
from test_train_processes import LAUNCHERS, TWO_PROCESSES

FSDP = ["--set", "training.distributed=fsdp"]


def weights(folder: str) -> dict[str, object]:
    from safetensors.torch import load_file

    name = "model.safetensors" if Path(folder, "model.safetensors").is_file() else "adapter_model.safetensors"
    return load_file(f"{folder}/{name}")


def saved_files(folder: str) -> set[str]:
    return {p.name for p in Path(folder).iterdir()}


@pytest.mark.parametrize(
    ("method", "launcher", "precision"),
    [("full", "cptkit", "fp32"), ("lora", "torchrun", "fp32"), ("qlora", "cptkit", "fp32"), ("full", "cptkit", "bf16")],
)
def test_two_sharded_processes_train_as_one_with_gradient_accumulation(
    tmp_path: Path,
    tiny_model_dir: Path,
    cli,  # type: ignore[no-untyped-def]
    method: str,
    launcher: str,
    precision: str,
) -> None:
    """bf16: the sharded model's forward runs under the autocast accelerate gives an unsharded one. qlora with
    gradient checkpointing, as configs/mistral-7b.yaml trains; lora with trained embeddings (saved next to the
    adapter)."""
    cfg = setup_run(
        tmp_path,
        tiny_model_dir,
        method=method,
        max_steps=4,
        eval_steps=4,
        save_steps=2,
        precision=precision,
        gradient_checkpointing=method == "qlora",
        embeddings="train" if method == "lora" else "frozen",
    )
    tolerance = 1e-5  # bf16 too: only the gradients' fp32 averaging differs (without the autocast: 1.4e-4)
    assert cli("train", "-c", str(cfg), "--set", "tracking.enabled=false").exit_code == 0  # 1 process, 2 x 2 blocks
    one = summary()

    two_run = subprocess.run(
        [*LAUNCHERS[launcher], "-c", str(cfg), *TWO_PROCESSES, *FSDP, "--set", "tracking.enabled=false"],
        capture_output=True,
        text=True,
    )
    assert two_run.returncode == 0, two_run.stderr[-3000:]
    assert "the model is sharded over 2 processes (FSDP2)" in two_run.stderr
    two = json.loads(Path("two/training_summary.json").read_text())
    assert two["losses"] == pytest.approx(one["losses"], abs=tolerance)
    assert [e["eval/domain_loss"] for e in two["evals"]] == pytest.approx(
        [e["eval/domain_loss"] for e in one["evals"]], abs=tolerance
    )
    # Gathered on the main process into the files one process writes, with the same weights.
    assert saved_files("two") == saved_files("outputs/cpt_model")
    assert ("embeddings.safetensors" in saved_files("two")) == (method == "lora")
    for file in ("model.safetensors", "adapter_model.safetensors", "embeddings.safetensors"):
        if Path("two", file).is_file():
            trained, expected = load_file(f"two/{file}"), load_file(f"outputs/cpt_model/{file}")
            assert set(trained) == set(expected)
            for name, weight in expected.items():
                assert trained[name] == pytest.approx(weight, abs=tolerance), name
    assert not Path("two/checkpoints").exists()
    # evaluate, export and register load it with load_trained, as they load the one-process model.
    import torch

    from cptkit.config import load_config
    from cptkit.models import load_trained

    training = load_config(cfg).training
    ids = torch.arange(2, 34)[None]
    with torch.no_grad():
        expected_logits = load_trained(tiny_model_dir, Path("outputs/cpt_model"), training)(input_ids=ids).logits
        logits = load_trained(tiny_model_dir, Path("two"), training)(input_ids=ids).logits
    assert torch.allclose(logits, expected_logits, atol=1e-5)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_a_sharded_group_killed_with_sigkill_resumes_to_the_same_losses(
    tmp_path: Path,
    tiny_model_dir: Path,
    cli,  # type: ignore[no-untyped-def]
    method: str,
) -> None:
    cfg = setup_run(tmp_path, tiny_model_dir, method=method, max_steps=8, save_steps=3, eval_steps=4)
    assert cli("train", "-c", str(cfg), "--set", "tracking.enabled=false").exit_code == 0
    one = summary()["losses"]

    command = [*LAUNCHERS["torchrun"], "-c", str(cfg), *TWO_PROCESSES, *FSDP, "--set", "tracking.enabled=false"]
    group = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 180
    while not Path("two/checkpoints/step-0000006/trainer_state.json").exists():
        assert group.poll() is None and time.monotonic() < deadline, "training ended before it could be killed"
        time.sleep(0.02)
    os.killpg(group.pid, signal.SIGKILL)  # the launcher and both processes at once
    group.wait()
    assert not Path("two/manifest.json").exists()
    # Each process wrote its own shard.
    shards = sorted(p.name for p in Path("two/checkpoints/step-0000006/sharded").glob("*.distcp"))
    assert len(shards) == 2, shards

    resumed = subprocess.run(
        [*LAUNCHERS["cptkit"], "-c", str(cfg), *TWO_PROCESSES, *FSDP, "--set", "tracking.enabled=false"],
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr and "(step 6 of 8)" in resumed.stderr
    two = json.loads(Path("two/training_summary.json").read_text())
    assert two["steps"] == 8
    assert two["losses"] == pytest.approx(one, abs=1e-5)


def test_the_forgetting_stop_keeps_the_best_weights_of_a_sharded_run(tmp_path: Path, tiny_model_dir: Path, cli) -> None:  # type: ignore[no-untyped-def]
    """The best weights are gathered when they are kept and sent back to the shards when the run stops: the
    sharded run saves the step one process keeps. One process with distributed fsdp trains whole (a note)."""
    settings = {"max_steps": 12, "eval_steps": 2, "learning_rate": 5e-2, "max_general_loss_increase": 1e-4}
    cfg = setup_run(tmp_path, tiny_model_dir, replay_ratio=0.0, general_unlike_domain=True, **settings)
    one_run = cli("train", "-c", str(cfg), *FSDP, "--set", "tracking.enabled=false")
    assert one_run.exit_code == 0, one_run.output
    assert "note: training.distributed fsdp shards the model over processes; with one process it is" in " ".join(
        one_run.output.split()
    )
    one = summary()
    # It stops at step 2 and keeps step 0: the sharded run must put the base's weights back, not keep step 2's.
    assert one["stopped_reason"] is not None and one["best"]["step"] < one["steps"] < 12

    two_run = subprocess.run(
        [*LAUNCHERS["cptkit"], "-c", str(cfg), *TWO_PROCESSES, *FSDP, "--set", "tracking.enabled=false"],
        capture_output=True,
        text=True,
    )
    assert two_run.returncode == 0, two_run.stderr[-3000:]
    two = json.loads(Path("two/training_summary.json").read_text())
    assert (two["steps"], two["best"]["step"]) == (one["steps"], one["best"]["step"])
    trained, expected = weights("two"), weights("outputs/cpt_model")
    for name, weight in expected.items():
        assert trained[name] == pytest.approx(weight, abs=1e-5), name  # type: ignore[comparison-overlap]


def test_fsdp_with_fp16_is_one_line(tmp_path: Path, tiny_model_dir: Path, cli) -> None:  # type: ignore[no-untyped-def]
    cfg = setup_run(tmp_path, tiny_model_dir)
    result = cli("train", "-c", str(cfg), *FSDP, "--set", "training.precision=fp16")
    assert result.exit_code == 2
    assert " ".join(result.output.split()) == (
        "config error: training: Value error, distributed fsdp trains in bf16 or fp32, not fp16: set precision "
        "bf16, fp32 or auto"
    )


def test_checkpoints_of_a_ddp_run_do_not_resume_a_sharded_one(tmp_path: Path) -> None:
    from cptkit.checkpoints import TrainerState, save_checkpoint
    from cptkit.config import TrainingConfig
    from cptkit.train import _resume_state

    tc = TrainingConfig(method="lora", precision="fp32")
    state = TrainerState(step=2, fingerprint="f", method="lora", precision="fp32", processes=2)
    save_checkpoint(tmp_path, state, {}, {}, keep=2)
    assert _resume_state(tmp_path, "f", False, tc, 2, "ddp") == tmp_path / "step-0000002"
    assert _resume_state(tmp_path, "f", False, tc, 2, "fsdp") is None
