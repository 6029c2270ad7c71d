"""Chat drift's greedy answers: generated one prompt at a time against GENERATION_BATCH prompts at a time
(left-padded), side by side in one run, on the demo's base model (SmolLM2-135M-Instruct) and cptkit's
shipped instructions; also whether the two give the same answers.

Needs the demo's trained adapter (`cptkit demo`; the base's answers are generated with it switched off):

    PYTHONPATH=src .venv/bin/python benchmarks/chat_generation.py [--instructions 16] [--max-new-tokens 64]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--adapter", type=Path, default=Path("demo/outputs/cpt_model"))
    parser.add_argument("--instructions", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--precision", default=None, help="bf16 or fp32 (default: what evaluate chooses here)")
    args = parser.parse_args()

    from cptkit import chat_drift
    from cptkit.capability import cpu_model, probe
    from cptkit.choices import choose_eval_precision
    from cptkit.config import TrainingConfig
    from cptkit.model_pair import load_pair
    from cptkit.models import resolve_model

    precision = args.precision or choose_eval_precision(probe("cpu")).value
    pair = load_pair(str(resolve_model(args.model)), args.adapter, TrainingConfig(method="lora"), precision, "cpu")
    items = chat_drift.instructions(args.instructions)
    timings, answers = {}, {}
    for batch in (1, chat_drift.GENERATION_BATCH):
        chat_drift.GENERATION_BATCH = batch
        started = time.perf_counter()
        answers[batch] = chat_drift._base_answers(pair, items, args.max_new_tokens, "cpu")
        timings[batch] = time.perf_counter() - started
    one, many = sorted(timings)
    tokens = sum(len(a.answer_ids) for a in answers[one])
    same = sum(a.answer_ids == b.answer_ids for a, b in zip(answers[one], answers[many], strict=True))
    print(
        json.dumps(
            {
                "machine": f"{cpu_model()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}",
                "load_average": os.getloadavg(),
                "model": args.model,
                "precision": precision,
                "instructions": len(items),
                "answer_tokens": tokens,
                "seconds": {f"batch {b}": round(t, 1) for b, t in timings.items()},
                "speedup": round(timings[one] / timings[many], 2),
                "identical_answers": f"{same} of {len(items)}",
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
