"""The generated multiple choice on the demo's trained adapter under several item settings, side by side in
one run: distractors chosen by context or by frequency, and how many items. For each: base and adapted
accuracy, the paired change with its 95% bootstrap interval, items gained and lost, and the cloze term's
log-likelihood change with its interval.

Needs the demo run once (`cptkit demo`: its prepared data and trained adapter). Settings are
`<distractors_by>:<items>:<per_document>`:

    PYTHONPATH=src .venv/bin/python benchmarks/domain_mc.py [context:64:8 frequency:64:8 context:128:8 ...]

Issue 18's goal: the adapted model's multiple-choice gain is statistically clear (interval excludes 0).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "benchmarks" / "out" / "domain_mc.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("settings", nargs="*", default=["frequency:64:8", "context:64:8", "context:128:8"])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "demo.yaml")
    args = parser.parse_args()

    from cptkit import domain_tasks
    from cptkit.capability import cpu_model, probe
    from cptkit.choices import choose_eval_precision
    from cptkit.config import load_config
    from cptkit.eval_sets import DOMAIN, eval_sources, read_set
    from cptkit.model_pair import load_pair

    config = load_config(args.config)
    precision = choose_eval_precision(probe("cpu")).value
    # The held-out domain documents (evaluate also leaves out whole documents that overlap the training
    # text: none on the demo; the items' own decontamination runs in build either way).
    texts = read_set(DOMAIN, eval_sources(config)[DOMAIN], config.evaluate.max_documents).texts
    pair = load_pair(config.model.name, config.output_dir, config.training, precision, "cpu")
    models = [("base", pair.base_runner, pair.base_tokenizer), ("cpt", pair.cpt_runner, pair.cpt_tokenizer)]
    rows = []
    for setting in args.settings:
        by, items, per_document = setting.split(":")
        c = config.model_copy(deep=True)
        s = c.evaluate.domain_tasks
        s.distractors_by, s.items, s.per_document = by, int(items), int(per_document)  # type: ignore[assignment]
        with tempfile.TemporaryDirectory() as folder:
            built = domain_tasks.build(c, texts, Path(folder))
            started = time.perf_counter()
            r = domain_tasks.run(built, models, {}, s, 512, 1024, "cpu", precision == "bf16")
        assert r.status == "ok" and r.base and r.cpt and r.accuracy_change and r.loglikelihood_change, r.reason
        a, ll = r.accuracy_change, r.loglikelihood_change
        row = {
            "setting": setting,
            "items": r.items,
            "base_accuracy": r.base.mc_accuracy.value,
            "cpt_accuracy": r.cpt.mc_accuracy.value,
            "accuracy_change": [a.value, a.low, a.high],
            "items_gained": r.items_gained,
            "items_lost": r.items_lost,
            "loglikelihood_change": [ll.value, ll.low, ll.high],
            "score_seconds": round(time.perf_counter() - started, 1),
        }
        rows.append(row)
        print(
            f"{setting:16s} {r.items:4d} items: base {a_pct(r.base.mc_accuracy.value)} -> adapted "
            f"{a_pct(r.cpt.mc_accuracy.value)}, change {a.value * 100:+.1f} pp "
            f"[{a.low * 100:+.1f}, {a.high * 100:+.1f}] "
            f"({r.items_gained} gained, {r.items_lost} lost); term log-likelihood {ll.value:+.3f} nats "
            f"[{ll.low:+.3f}, {ll.high:+.3f}]",
            flush=True,
        )
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"cpu": cpu_model(), "precision": precision, "rows": rows}, indent=2) + "\n")
    print(f"written {OUT}")


def a_pct(value: float) -> str:
    return f"{value:.1%}"


if __name__ == "__main__":
    main()
