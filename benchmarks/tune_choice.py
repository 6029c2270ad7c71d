"""The demo trained with `cptkit tune`'s choice against the demo's hand-set config, side by side in one run:
the same prepared data, the same time budget and evaluation, only training.learning_rate and
data.replay_ratio differ (what tuned.yaml changes). Each is trained and evaluated into a folder of its own
under benchmarks/out/tune_choice/ (tracking off), one after the other, so both see the same machine.

Needs the demo's prepared data (`cptkit demo`) and the tune (`cptkit tune --config configs/demo.yaml`,
which writes demo/tune/tuned.yaml). Then:

    PYTHONPATH=src .venv/bin/python benchmarks/tune_choice.py [--tuned demo/tune/tuned.yaml [other/tuned.yaml ...]]

Several tuned configs (e.g. tune's choice under two `tune.equal_gain` values, each tuned.yaml with its
choice.json copied to a folder of its own) are each an arm, labelled by their folder's name.

result.json also holds what tune predicted for its choice at the full run's tokens (choice.json beside
tuned.yaml, with the rule that chose it), to set against what the tuned run measured.

Goal (issue 19): a larger domain gain at equal or lower drift, or equal gain at clearly lower drift.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

from cptkit.capability import cpu_model

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "benchmarks" / "out" / "tune_choice"


def run(config: Any) -> dict[str, Any]:
    """Train and evaluate `config` (forced); the numbers the comparison needs."""
    from cptkit.evaluate import evaluate
    from cptkit.train import train

    started = time.perf_counter()
    train(config, force=True)
    trained = time.perf_counter()
    evaluate(config, force=True)
    done = time.perf_counter()
    r = json.loads((config.output_dir / "evaluation" / "results.json").read_text())
    tasks = r.get("domain_tasks") or {}
    chat = r.get("chat") or {}
    return {
        "learning_rate": config.training.learning_rate,
        "replay_ratio": config.data.replay_ratio,
        "steps": r["training"]["steps"],
        "tokens": r["training"]["tokens"],
        "domain_perplexity": {m: round(r[m]["domain"]["perplexity"], 3) for m in ("base", "cpt")},
        "adaptation": round(r["adaptation"], 4),  # relative fall of the domain perplexity
        "forgetting": round(r["forgetting"], 4),  # worst relative rise of a general set's perplexity
        "forgetting_by_set": {k: round(v, 4) for k, v in r["forgetting_by_set"].items()},
        "drift_kl": round(r["drift_kl"], 5),
        "chat_drift": None if chat.get("status") != "ok" else round(chat["drift"], 5),
        "chat_kl": None if chat.get("status") != "ok" else round(chat["kl"], 5),
        "mc_accuracy": (tasks.get("cpt") or {}).get("mc_accuracy"),
        "mc_accuracy_base": (tasks.get("base") or {}).get("mc_accuracy"),
        "mc_change": tasks.get("accuracy_change"),
        "mc_items": tasks.get("items"),
        "mc_gained_lost": [tasks.get("items_gained"), tasks.get("items_lost")],
        "cloze_loglikelihood_change": tasks.get("loglikelihood_change"),
        "term_perplexity": {m: (tasks.get(m) or {}).get("term_perplexity") for m in ("base", "cpt")},
        "verdict_passed": r["verdict"]["passed"],
        "train_seconds": round(trained - started, 1),
        "evaluate_seconds": round(done - trained, 1),
    }


def predicted(choice_path: Path) -> dict[str, Any] | None:
    """What tune predicted for its choice at the full run's tokens (choice.json beside tuned.yaml), to set
    against what the tuned run measured."""
    if not choice_path.is_file():
        return None
    choice = json.loads(choice_path.read_text())
    chosen = choice["chosen"]
    return {
        "rule": choice.get("rule"),
        "equal_gain": choice.get("equal_gain"),
        "tolerance": choice.get("tolerance"),
        "full_tokens": choice["full_tokens"],
        "adaptation": round(choice["predicted_adaptation"], 4),
        "forgetting": round(choice["predicted_forgetting"], 4),
        "drift_kl": chosen.get("drift_kl"),
        "chat_drift": chosen.get("chat_drift"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "demo.yaml")
    parser.add_argument("--tuned", type=Path, nargs="+", default=[Path("demo/tune/tuned.yaml")])
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    for path in args.tuned:
        if not path.is_file():
            raise SystemExit(f"{path}: not found; run `cptkit tune --config {args.config}` first")
    arms = {"tuned": args.tuned[0]} if len(args.tuned) == 1 else {f"tuned:{p.parent.name}": p for p in args.tuned}
    if len(arms) < len(args.tuned):
        raise SystemExit("--tuned: give each tuned.yaml a folder of its own (arms are named by their folder)")

    from cptkit.config import load_config

    load_start = os.getloadavg()
    results = {}
    for label, path in {"hand_set": args.config, **arms}.items():
        folder = label.replace(":", "-")
        config = load_config(path, ["tracking.enabled=false", f"output_dir={args.out.resolve() / folder}"])
        results[label] = run(config)
    hand = results["hand_set"]
    report: dict[str, Any] = {
        "machine": f"{cpu_model()}, {os.cpu_count()} CPUs",
        "load_average": {"start": load_start, "end": os.getloadavg()},
        **results,
    }
    for label, path in arms.items():
        tuned = results[label]
        report[f"{label}_minus_hand_set"] = {
            "adaptation": round(tuned["adaptation"] - hand["adaptation"], 4),
            "forgetting": round(tuned["forgetting"] - hand["forgetting"], 4),
            "drift_kl": round(tuned["drift_kl"] - hand["drift_kl"], 5),
            "chat_drift": None
            if tuned["chat_drift"] is None or hand["chat_drift"] is None
            else round(tuned["chat_drift"] - hand["chat_drift"], 5),
        }
        report[f"{label}_predicted"] = predicted(path.with_name("choice.json"))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "result.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
