"""Multi-process training against one process on the same machine, the same global batch, side by side in
one run: is the work split without losing speed, and is it the same training?

Both train the same model with LoRA r=16 on every linear layer, fp32, on the demo corpus (Python
standard-library docstrings, 20% Wikipedia replay, SmolLM2's tokenizer), --seq-tokens blocks, the same
steps, learning rate and schedule, tracking off. --model tiny (the default) is a random 4-layer Llama
(hidden 256, SmolLM2's 49k vocabulary; built in --out), which a busy 2-core machine trains in seconds a
step; --model smollm2-135m is SmolLM2-135M itself.

  1 process   `cptkit train`, OMP_NUM_THREADS=2: micro batch --batch, gradient accumulation 2
  (reference) the same with OMP_NUM_THREADS=1: what one core does alone, the unit of the 2 processes
  2 processes `cptkit train --processes 2`, OMP_NUM_THREADS=1 each (gloo on loopback): micro batch
              --batch, no accumulation; each process takes its half of every step's blocks

Tokens/s is the training summary's: real tokens over the loop's time less its validation passes (model
loading excluded; the first step included). The loss difference is the largest per-step difference of the
two runs' training losses (the same blocks in every step: it should be float noise).

Run from the repository root, on a quiet machine with 2 cores for the runs:

    .venv/bin/python benchmarks/train_scaling.py               # tiny model, 8 steps of 2 x 1 x 256 tokens
    .venv/bin/python benchmarks/train_scaling.py --model smollm2-135m --batch 2 --seq-tokens 512

Writes --out/results.json and report.md (default benchmarks/out/train_scaling, git-ignored); the demo
inputs are built there on first use (as benchmarks/train_throughput.py builds them).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "configs" / "demo.yaml"


def overrides(model: str, steps: int, batch: int, accumulation: int, seq: int, output_dir: str) -> list[str]:
    settings = {
        "model.name": model,
        "model.tokenizer": "smollm2-135m",  # the demo data's tokens, whichever model trains on them
        "training.method": "lora",
        "training.precision": "fp32",  # the losses compare exactly only in fp32
        "training.max_minutes": "null",
        "training.max_steps": steps,
        "training.max_seq_length": seq,
        "training.micro_batch_size": batch,
        "training.gradient_accumulation_steps": accumulation,
        "training.eval_steps": steps,
        "training.eval_max_sequences": 2,
        "training.save_steps": steps + 1,
        "tracking.enabled": "false",
        "output_dir": output_dir,
    }
    return [a for key, value in settings.items() for a in ("--set", f"{key}={value}")]


def run(name: str, processes: int, threads: int, args: argparse.Namespace) -> dict[str, Any]:
    accumulation = 2 // processes
    command = [sys.executable, "-m", "cptkit", "train", "-c", str(DEMO_CONFIG), "--force"]
    command += overrides(args.model_path, args.steps, args.batch, accumulation, args.seq_tokens, f"out/{name}")
    if processes > 1:
        command += ["--processes", str(processes)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
    summary = json.loads(Path(f"out/{name}/training_summary.json").read_text(encoding="utf-8"))
    return {
        "name": name,
        "processes": processes,
        "threads_per_process": threads,
        "micro_batch": args.batch,
        "gradient_accumulation": accumulation,
        "steps": summary["steps"],
        "tokens": summary["tokens"],
        "tokens_per_second": summary["tokens_per_second"],
        "train_seconds": summary["train_seconds"],
        "eval_seconds": summary["eval_seconds"],
        "wall_seconds": round(time.perf_counter() - started, 1),
        "losses": summary["losses"],
    }


def tiny_model(folder: Path) -> Path:
    """A random 4-layer Llama with SmolLM2's tokenizer (built once)."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from cptkit.models import resolve_model

    if (folder / "config.json").is_file():
        return folder
    smollm2 = resolve_model("smollm2-135m")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2 / name, folder / name)
    return folder


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def report(
    one: dict[str, Any],
    two: dict[str, Any],
    single: dict[str, Any],
    load: tuple[float, float],
    args: argparse.Namespace,
) -> str:
    ratio = two["tokens_per_second"] / one["tokens_per_second"]
    per_core = two["tokens_per_second"] / (2 * single["tokens_per_second"])
    difference = max(abs(a - b) for a, b in zip(one["losses"], two["losses"], strict=True))
    lines = [
        f"CPU: {cpu_model()}, {os.cpu_count()} cores; load average {load[0]:.2f} before, {load[1]:.2f} after",
        f"{args.model} LoRA fp32, {args.steps} steps of {2 * args.batch} blocks x {args.seq_tokens} tokens",
        "",
        "| run | micro batch x accumulation | tokens | train s | tokens/s | final loss |",
        "|---|---|---|---|---|---|",
    ]
    for r in (one, two, single):
        label = f"{r['processes']} process(es) x {r['threads_per_process']} thread(s)"
        lines.append(
            f"| {label} | {r['micro_batch']} x {r['gradient_accumulation']} | {r['tokens']:,} | "
            f"{r['train_seconds'] - r['eval_seconds']:.1f} | {r['tokens_per_second']:,.0f} | {r['losses'][-1]:.5f} |"
        )
    lines += [
        "",
        f"tokens/s ratio (2 processes / 1 process x 2 threads): {ratio:.3f}; "
        f"2 processes / (2 x 1 process x 1 thread): {per_core:.3f}; largest loss difference {difference:.2e}",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["tiny", "smollm2-135m"], default="tiny")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=1, help="micro batch of each process (blocks)")
    parser.add_argument("--seq-tokens", type=int, default=256)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "train_scaling")
    args = parser.parse_args()
    workdir = args.out.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    os.chdir(workdir)  # the demo config's relative paths (demo/...) resolve here
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(REPO / "benchmarks"))
    import train_throughput

    train_throughput.build_inputs()
    args.model_path = str(tiny_model(workdir / "tiny_llama")) if args.model == "tiny" else args.model
    load_start = os.getloadavg()[0]
    one = run("one_process", 1, 2, args)
    two = run("two_processes", 2, 1, args)
    single = run("one_thread", 1, 1, args)
    text = report(one, two, single, (load_start, os.getloadavg()[0]), args)
    results = {"one": one, "two": two, "one_thread": single}
    (workdir / "results.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    (workdir / "report.md").write_text(text + "\n", encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
