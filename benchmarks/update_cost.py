"""An update against a retrain, side by side in one run: the corpus grew by about 10%; the update starts
from the model trained on the first 90% and learns the new documents (plus domain and general replay),
the retrain starts from the base and learns the whole corpus. Both train one epoch of their data with the
same settings (the demo's, without its time budget), and all models are scored on the same windows of the
new documents' held-out text, the earlier documents' held-out text, and the general held-out text.

The corpus is the demo's standard-library table, cut to a share of its modules (--share) so that the
retrain fits in minutes on a CPU; batch B (the growth) is the demo's own: one module in ten, by the hash of
its name. Steps: batch A as Delta version 0 (change data feed on) -> version 1 trained from the base on A;
batch B appended as version 1 -> the update (training.init_from: version 1's folder, source mode cdf)
and the retrain (source mode full, from the base). Only extract, prepare and train run (no MLflow);
scores come from the update gate's scorer (fp32, the evaluate section's window and caps).

    PYTHONPATH=src .venv/bin/python benchmarks/update_cost.py [--share 0.35] [--threads N]

Goal (issue 17): the update's training costs <= 25% of the retrain's (time and tokens), with equal or
better bits per byte on the new text, and on the earlier text no worse than the retrain's by more than
the gate's tolerance (evaluate.max_earlier_domain_regression).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from cptkit.capability import cpu_model

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "benchmarks" / "out" / "update_cost"


def corpus(share: float) -> tuple[Any, Any]:
    """Batches A and B of the demo's table cut to `share` of its modules (by a hash of the name, salted
    apart from the batch split's)."""
    import pyarrow as pa

    from cptkit.demo import stdlib_documents
    from cptkit.demo_updates import batches

    table = stdlib_documents()
    ids = table.column("id").to_pylist()
    keep = [int(hashlib.sha256(f"share:{i}".encode()).hexdigest(), 16) % 1000 < share * 1000 for i in ids]
    return batches(table.filter(pa.array(keep)))


def summary(folder: Path, timings: dict[str, float]) -> dict[str, Any]:
    s = json.loads((folder / "training_summary.json").read_text())
    return {
        "steps": s["steps"],
        "tokens": s["tokens"],
        "replay_tokens": s["replay_tokens"],
        "train_seconds": s["train_seconds"],
        "tokens_per_second": round(s["tokens_per_second"], 1),
        "stage_seconds": {k: round(v, 1) for k, v in timings.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "demo.yaml")
    parser.add_argument("--share", type=float, default=0.35, help="share of the demo table's modules used")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()

    import torch
    from deltalake import write_deltalake

    from cptkit.config import load_config
    from cptkit.demo_general import write_general_corpora
    from cptkit.pipeline import STAGES, Options, run_pipeline
    from cptkit.update_gate import jsonl_texts, score_models
    from cptkit.updates import EARLIER_VAL, NEW_VAL, UPDATE_DIR

    if args.threads:
        torch.set_num_threads(args.threads)
    root = args.out.resolve()
    shutil.rmtree(root, ignore_errors=True)
    table_path = root / "documents"
    table_path.mkdir(parents=True)
    overrides = [
        "tracking.enabled=false",
        "training.max_minutes=null",  # one epoch of each run's data, not the demo's time budget
        "training.num_epochs=1",
        "training.eval_steps=100000",
        "training.save_steps=100000",
        # A quarter of the documents held out (the demo: a tenth), so that batch B's held-out text is not
        # one or two modules.
        "prepare.split.val_ratio=0.25",
        f"data.output_dir={root / 'data'}",
        f"data.replay.path={root / 'general' / 'wikipedia.jsonl'}",
    ]
    base = load_config(args.config, overrides)
    write_general_corpora(root / "general")
    a, b = corpus(args.share)
    write_deltalake(str(table_path), a, configuration={"delta.enableChangeDataFeed": "true"})
    source = base.source.model_copy(update={"path": str(table_path), "mode": "cdf", "version": None})
    first = base.model_copy(update={"source": source, "output_dir": root / "v1"})
    from cptkit.cli import stage_reporters

    report = stage_reporters()
    stages = STAGES[:3]  # extract, prepare, train
    load_start = os.getloadavg()
    v1 = run_pipeline(first, stages, report, Options(force=True, preflight=False, label="version 1"))

    write_deltalake(str(table_path), b, mode="append")
    update = first.model_copy(
        update={
            "training": first.training.model_copy(update={"init_from": str(first.output_dir)}),
            "output_dir": root / "update",
        }
    )
    updated = run_pipeline(update, stages, report, Options(force=True, preflight=False, label="update"))
    retrain = base.model_copy(
        update={
            "source": source.model_copy(update={"mode": "full"}),
            "data": base.data.model_copy(update={"output_dir": root / "retrain_data"}),
            "output_dir": root / "retrain",
        }
    )
    retrained = run_pipeline(retrain, stages, report, Options(force=True, preflight=False, label="retrain"))

    from cptkit.eval_sets import GENERAL, eval_sources, read_set

    texts = {
        "new": jsonl_texts(update.output_dir / UPDATE_DIR / NEW_VAL),
        "earlier": jsonl_texts(update.output_dir / UPDATE_DIR / EARLIER_VAL),
        "general": read_set(GENERAL, eval_sources(update)[GENERAL], base.evaluate.max_documents).texts,
    }
    scoring_started = time.perf_counter()
    # One scorer call per pair, each on the same windows: (base, update, retrain), then (base, v1, update).
    against_retrain = score_models(retrain, update.output_dir, texts)
    against_v1 = score_models(update, first.output_dir, texts)
    scores = {
        name: {
            "documents": s.documents,
            "bits_per_byte": {
                "base": round(s.bits_per_byte["base"], 4),
                "version_1": round(against_v1[name].bits_per_byte["champion"], 4),
                "update": round(s.bits_per_byte["champion"], 4),
                "retrain": round(s.bits_per_byte["candidate"], 4),
            },
        }
        for name, s in against_retrain.items()
    }
    u, r = summary(update.output_dir, updated.timings), summary(retrain.output_dir, retrained.timings)
    tolerance = base.evaluate.max_earlier_domain_regression
    new_bpb, earlier_bpb = scores["new"]["bits_per_byte"], scores["earlier"]["bits_per_byte"]
    result = {
        "machine": f"{cpu_model()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}",
        "load_average": {"start": load_start, "end": os.getloadavg()},
        "share_of_modules": args.share,
        "documents": {"batch_a": a.num_rows, "batch_b": b.num_rows},
        "version_1": summary(first.output_dir, v1.timings),
        "update": u,
        "retrain": r,
        "cost_ratio": {
            "train_seconds": round(u["train_seconds"] / r["train_seconds"], 3),
            "tokens": round(u["tokens"] / r["tokens"], 3),
            "goal": 0.25,
        },
        "scores": scores,
        "goals_met": {
            "cost": u["train_seconds"] / r["train_seconds"] <= 0.25 and u["tokens"] / r["tokens"] <= 0.25,
            "new_text": new_bpb["update"] <= new_bpb["retrain"],
            "earlier_text": earlier_bpb["update"] <= earlier_bpb["retrain"] * (1 + tolerance),
            "earlier_tolerance": tolerance,
        },
        "scoring_seconds": round(time.perf_counter() - scoring_started, 1),
    }
    (root / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
