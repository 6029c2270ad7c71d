"""Training throughput of `cptkit train` against the seed's approach, side by side in one run.

All train SmolLM2-135M (the `smollm2-135m` GGUF, dequantized once) with LoRA r=16 alpha=32 on every
linear layer on the demo corpus (Python standard-library docstrings, 20% Wikipedia replay), micro batch
4 x 512 tokens, one micro batch per optimizer step, the same number of steps, learning rate 2e-4, 3
warmup steps then cosine decay. Compute precision follows the measured capability of this machine
(cptkit.capability): bf16 where its matmuls are fast, else fp32, for every variant (the seed's bf16 on a
CPU that only emulates it had not finished its first step after 4 minutes).

  seed          what the seed proof-of-concept does, written the usual way: QLoRA (4-bit NF4, double
                quantization), one document per row, truncated and padded to 512 tokens
                (`tokenizer(..., truncation=True, padding="max_length")`),
                DataCollatorForLanguageModeling, transformers `Trainer` (use_cpu),
                `prepare_model_for_kbit_training` (without gradient checkpointing, which would only
                slow it down), peft's default LoRA dropout 0.05 as the seed used it; replay as whole
                general documents, a fifth of the rows.
  cptkit-qlora  `cptkit train` on the demo config with training.method: qlora: packed,
                document-isolated blocks, no padding, replay at 20% of tokens, cptkit's defaults (no
                adapter dropout, 16-bit frozen base where bf16 computes, fused chunked LM-head loss).
  cptkit-auto   the same with training.method: auto (what cptkit chooses here, and why, is in the
                report).
  cptkit-gc     cptkit-qlora with training.gradient_checkpointing: true (the low-memory setting).

The report starts with the machine's capability record (CPU model and flags, the ISA variables set,
measured fp32 and bf16 matmul rates, the chosen precision and method).

Useful tokens are non-padding tokens processed (the seed's attention-mask sum; cptkit's real tokens).
Tokens/s is useful tokens over the wall time of the training steps (model loading and validation passes
excluded, the first step included). Peak RSS is each run's own process (`os.wait4`), loading included.
The final domain validation loss is the mean next-token loss over the first 32 blocks (16k tokens) of
the demo's domain validation split, computed by the same function (cptkit.training_step.eval_loss) for each
trained model.

Run from the repository root, on a quiet machine (every variant is a fresh subprocess, run one after
another):

    .venv/bin/python benchmarks/train_throughput.py                 # 20 steps per variant
    .venv/bin/python benchmarks/train_throughput.py --steps 5 --variants seed,cptkit-auto   # a quick look
    # what an AVX2-only CPU does, on any x86 CPU:
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 .venv/bin/python benchmarks/train_throughput.py --steps 6

Writes --out/results.json and report.md (default benchmarks/out/train_throughput, git-ignored); the demo
inputs are built there on first use.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "configs" / "demo.yaml"
SEQ, BATCH, LR, WARMUP = 512, 4, 2e-4, 3
EVAL_BLOCKS = 32  # validation blocks of 512 tokens scored for the final loss (the same ones for every variant)


def demo_config(steps: int, extra: list[str]) -> Any:
    from cptkit.config import load_config

    overrides = [
        f"training.max_steps={steps}",
        f"training.max_seq_length={SEQ}",
        f"training.micro_batch_size={BATCH}",
        "training.gradient_accumulation_steps=1",
        f"training.learning_rate={LR}",
        f"training.warmup_steps={WARMUP}",
        f"training.eval_steps={steps}",
        f"training.eval_max_sequences={EVAL_BLOCKS}",
        f"training.save_steps={steps + 1}",
        "training.max_minutes=null",
        "training.precision=auto",
        "tracking.enabled=false",
        *extra,
    ]
    return load_config(DEMO_CONFIG, overrides)


def build_inputs() -> None:
    """The demo's Delta table and general corpora, extracted and prepared (skipped when up to date)."""
    from cptkit.config import JsonlSourceConfig
    from cptkit.datasets import datasets
    from cptkit.demo import build_demo_table
    from cptkit.demo_general import write_general_corpora
    from cptkit.extract import extract
    from cptkit.prepare import prepare

    config = demo_config(1, [])
    build_demo_table(str(config.source.path))
    assert isinstance(config.data.replay, JsonlSourceConfig)
    write_general_corpora(config.data.replay.path.parent)
    for dataset in datasets(config):
        extract(dataset)
        prepare(config, dataset)


# ---------------------------------------------------------------- workers (run in subprocesses)


def run_cptkit(steps: int, method: str, checkpointing: bool) -> dict[str, Any]:
    from cptkit.train import train

    config = demo_config(
        steps,
        [
            f"training.method={method}",
            f"training.gradient_checkpointing={str(checkpointing).lower()}",
            "output_dir=out/cptkit_model",
        ],
    )
    trained = train(config, force=True).summary
    assert trained is not None
    summary = trained.to_json()  # training_summary.json's form
    return {
        "method": summary["method"],
        "precision": summary["precision"],
        "method_reason": summary["choices"]["method"]["reason"],
        "steps": summary["steps"],
        "useful_tokens": summary["tokens"],
        "train_seconds": summary["train_seconds"] - summary["eval_seconds"],
        "domain_val_loss": summary["final_eval"]["eval/domain_loss"],
        "replay_share": summary["replay_share"],
        "losses": summary["losses"],
    }


def run_seed(steps: int) -> dict[str, Any]:
    import numpy as np
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        BitsAndBytesConfig,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from cptkit.loss import CausalLMLoss
    from cptkit.models import resolve_model
    from cptkit.packing import sequence_blocks
    from cptkit.train_data import load_train_data
    from cptkit.training_step import eval_loss

    config = demo_config(steps, [])
    model_dir = resolve_model(config.model.name)
    bf16 = measured_precision() == "bf16"
    compute = torch.bfloat16 if bf16 else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    def texts(path: Path) -> list[str]:
        return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()]

    domain = texts(config.data.output_dir / "train.jsonl")
    general = texts(config.data.output_dir / "replay" / "train.jsonl")
    rng = np.random.default_rng(42)
    n_general = round(len(domain) * config.data.replay_ratio / (1 - config.data.replay_ratio))
    rows = domain + [general[i] for i in rng.choice(len(general), size=n_general, replace=n_general > len(general))]
    rows = [rows[i] for i in rng.permutation(len(rows))]
    encoded = tokenizer(rows, truncation=True, max_length=SEQ, padding="max_length")
    dataset = [{"input_ids": ids, "attention_mask": mask} for ids, mask in zip(*encoded.values(), strict=True)]

    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute,
    )
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, quantization_config=quant, device_map={"": "cpu"}, dtype=compute
    )
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(
        model,
        LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM"),
    )

    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    useful = [0]

    def count_tokens(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        # Counted where the model sees the batch: the Trainer's data loader may fetch ahead.
        if module.training:
            useful[0] += int(kwargs["attention_mask"].sum())

    model.register_forward_pre_hook(count_tokens, with_kwargs=True)

    times: dict[str, float] = {}

    class StepTimes(TrainerCallback):  # type: ignore[misc]
        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            times.setdefault("first", time.perf_counter())

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            times["last"] = time.perf_counter()

    args = TrainingArguments(
        output_dir="out/seed_trainer",
        per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=1,
        max_steps=steps,
        learning_rate=LR,
        warmup_steps=WARMUP,
        lr_scheduler_type="cosine",
        bf16=bf16,
        use_cpu=True,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        dataloader_num_workers=0,
        seed=42,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator, callbacks=[StepTimes()])
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]

    data = load_train_data(config)
    blocks = sequence_blocks(data.domain_val, data.separator, SEQ)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        val = eval_loss(CausalLMLoss(model), blocks, EVAL_BLOCKS, BATCH, torch.device("cpu"))
    return {
        "method": "qlora",
        "precision": "bf16" if bf16 else "fp32",
        "steps": trainer.state.global_step,
        "useful_tokens": useful[0],
        "train_seconds": times["last"] - times["first"],
        "domain_val_loss": val,
        "padding_share": 1 - useful[0] / (trainer.state.global_step * BATCH * SEQ),
        "losses": losses,
    }


def measured_precision() -> str:
    from cptkit.capability import probe
    from cptkit.choices import choose_precision

    return choose_precision(probe("cpu")).value


def capability_record() -> dict[str, Any]:
    """This machine as cptkit measures it, with lscpu's model name."""
    import shutil

    from cptkit.capability import probe
    from cptkit.choices import choose_precision

    record = probe("cpu").as_dict()
    record["chosen_precision"] = choose_precision(probe("cpu")).value
    if shutil.which("lscpu"):
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        names = [line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")]
        record["lscpu_model_name"] = names[0] if names else None
    return record


# ---------------------------------------------------------------- driver


def measure(variant: str, steps: int, workdir: Path) -> dict[str, Any]:
    """Run one variant in a fresh process; its result, wall time and peak RSS."""
    result_file = workdir / f"{variant}.json"
    result_file.unlink(missing_ok=True)
    command = [sys.executable, __file__, "--worker", variant, "--steps", str(steps), "--out", str(workdir)]
    log = (workdir / f"{variant}.log").open("w")
    started = time.perf_counter()
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=workdir)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{variant} failed; see {workdir / (variant + '.log')}")
    result: dict[str, Any] = json.loads(result_file.read_text())
    result.update(variant=variant, wall_seconds=wall, peak_rss_mb=usage.ru_maxrss / 1024)
    result["tokens_per_second"] = result["useful_tokens"] / result["train_seconds"]
    return result


def report(results: list[dict[str, Any]], load: tuple[float, float], machine: dict[str, Any]) -> str:
    base = next((r for r in results if r["variant"] == "seed"), None)
    env = ", ".join(f"{k}={v}" for k, v in machine["isa_env"].items()) or "none"
    lines = [
        f"CPU: {machine.get('lscpu_model_name') or machine['cpu_model']} ({' '.join(machine['cpu_flags'])}); "
        f"ISA variables: {env}; torch kernels {machine['cpu_kernels']}, {machine['threads']} threads; "
        f"matmul on one thread: fp32 {machine['fp32_gflops']:.1f}, bf16 {machine['bf16_gflops']:.1f} GFLOP/s "
        f"-> precision {machine['chosen_precision']}; torch {machine['torch_version']}",
        "",
        "| variant | method | precision | steps | useful tokens | tokens/s | vs seed | peak RSS | domain val loss |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        ratio = f"{r['tokens_per_second'] / base['tokens_per_second']:.2f}x" if base else "-"
        lines.append(
            f"| {r['variant']} | {r['method']} | {r['precision']} | {r['steps']} | {r['useful_tokens']:,} "
            f"| {r['tokens_per_second']:.0f} | {ratio} | {r['peak_rss_mb']:,.0f} MB | {r['domain_val_loss']:.4f} |"
        )
    for r in results:
        if r.get("method_reason"):
            lines.append(f"\n{r['variant']}: method {r['method']}: {r['method_reason']}")
    if base:
        lines.append(f"\nseed padding share: {base['padding_share']:.1%} of positions")
    lines.append(f"load average at start {load[0]:.2f}, at end {load[1]:.2f} (1 min)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--variants", default="seed,cptkit-qlora,cptkit-auto,cptkit-gc")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "train_throughput")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    workdir = args.out.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    os.chdir(workdir)  # the demo config's relative paths (demo/...) resolve here
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    if args.worker is not None:
        if args.worker == "seed":
            result = run_seed(args.steps)
        else:
            method = "auto" if args.worker == "cptkit-auto" else "qlora"
            result = run_cptkit(args.steps, method, checkpointing=args.worker == "cptkit-gc")
        (workdir / f"{args.worker}.json").write_text(json.dumps(result), encoding="utf-8")
        return

    build_inputs()
    machine = capability_record()
    load_start = os.getloadavg()[0]
    results = [measure(v, args.steps, workdir) for v in args.variants.split(",")]
    text = report(results, (load_start, os.getloadavg()[0]), machine)
    out = {"machine": machine, "results": results}
    (workdir / "results.json").write_text(json.dumps(out, indent=1), encoding="utf-8")
    (workdir / "report.md").write_text(text + "\n", encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
