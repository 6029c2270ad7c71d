"""The update gate: an update (a model trained from `training.init_from`) against the model it started
from (the champion) and the base, on three kinds of text:

- the **new** domain documents' held-out split (what the update was for): the candidate must be better
  than the champion (lower bits per byte);
- the **earlier** domain held-out split (forgetting within the domain): no worse than the champion by
  more than `evaluate.max_earlier_domain_regression` (a share of its bits per byte);
- the **general** held-out set: within the forgetting budget (`evaluate.max_forgetting`, the perplexity's
  rise) against the base.

Evaluate scores the three models on the same windows and writes `evaluation/update.json` and
`evaluation/update.md` (the three side by side); register adds these checks to its gate, so that a
refused update is registered as challenger only and the champion stays where it was.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cptkit.artifacts import read_json, write_json_atomic
from cptkit.config import Config
from cptkit.eval_sets import GENERAL, EvalSet, cap_tokens, eval_sources, read_set
from cptkit.progress import console
from cptkit.results import Check
from cptkit.start_model import resolve_start
from cptkit.updates import EARLIER_VAL, LINEAGE, NEW_VAL, UPDATE_DIR

UPDATE_RESULTS, UPDATE_REPORT = "update.json", "update.md"
MODELS = ("base", "champion", "candidate")
NEW, EARLIER = "new domain", "earlier domain"


@dataclass(frozen=True)
class SetScores:
    documents: int
    tokens: int  # scored tokens of each model (the same windows)
    bits_per_byte: dict[str, float]  # model -> bits per byte
    perplexity: dict[str, float]


def is_update(cpt_dir: Path) -> bool:
    lineage = read_json(cpt_dir / LINEAGE)
    return bool(lineage and lineage.get("parent"))


def evaluate_update(config: Config, out: Path) -> list[str]:
    """Score base, champion and candidate on the new, earlier and general held-out text; write
    update.json and update.md into `out` (the evaluation folder). The files written; none for a model
    that is no update."""
    cpt_dir = config.output_dir
    for name in (UPDATE_RESULTS, UPDATE_REPORT):  # an earlier evaluation's, which register must not read
        (out / name).unlink(missing_ok=True)
    if not is_update(cpt_dir):
        return []
    start = resolve_start(config)
    if start is None:  # the lineage names a parent, but the config no longer does: nothing to compare with
        return []
    texts: dict[str, list[str]] = {}
    for name, file in ((NEW, NEW_VAL), (EARLIER, EARLIER_VAL)):
        rows = jsonl_texts(cpt_dir / UPDATE_DIR / file)[: config.evaluate.max_documents]
        if rows:
            texts[name] = rows
    general = eval_sources(config).get(GENERAL)
    if general is not None:
        texts[GENERAL] = read_set(GENERAL, general, config.evaluate.max_documents).texts
    scores = score_models(config, start.folder, texts)
    checks = update_checks(scores, config, start.version)
    data = {
        "champion": {"init_from": start.spec, "version": start.version, "folder": str(start.folder)},
        "sets": {
            name: {
                "documents": s.documents,
                "tokens": s.tokens,
                "bits_per_byte": s.bits_per_byte,
                "perplexity": s.perplexity,
            }
            for name, s in scores.items()
        },
        "checks": [c.to_json() for c in checks],
        "passed": all(c.passed is not False for c in checks),
    }
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / UPDATE_RESULTS, data)
    table = side_by_side(scores, checks)
    (out / UPDATE_REPORT).write_text(table, encoding="utf-8")
    for line in table.splitlines():
        console.print(f"evaluate update: {line}", highlight=False, markup=False, soft_wrap=True)
    return [UPDATE_RESULTS, UPDATE_REPORT]


def jsonl_texts(path: Path) -> list[str]:
    if not path.is_file():
        return []
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def score_models(config: Config, champion_dir: Path, texts: dict[str, list[str]]) -> dict[str, SetScores]:
    """Bits per byte and perplexity of the three models on each set, in float32, on the same windows."""
    import torch
    from transformers import AutoTokenizer

    from cptkit.model_folder import trained_training_config
    from cptkit.models import load_base, load_trained, resolve_model
    from cptkit.scoring import fixed, score, text_tokenizer

    cpt_dir = config.output_dir
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base_dir = resolve_model(config.model.name)
    fp32 = {"precision": "fp32"}
    trained = trained_training_config(cpt_dir, config.training).model_copy(update=fp32)
    champion_training = trained_training_config(champion_dir, config.training).model_copy(update=fp32)
    base = load_base(base_dir, trained, device, bf16=False).eval()
    champion = load_trained(base_dir, champion_dir, champion_training, device)
    candidate = load_trained(base_dir, cpt_dir, trained, device)
    tokenizer = text_tokenizer(AutoTokenizer.from_pretrained(str(cpt_dir)))
    context, stride = config.evaluation_window()
    out: dict[str, SetScores] = {}
    for name, all_docs in texts.items():
        docs = all_docs
        if config.evaluate.max_tokens is not None:  # the same cut as evaluate's sets: the first tokens of each
            whole = EvalSet(name, all_docs, sum(len(t.encode("utf-8")) for t in all_docs), 0, {})
            docs = cap_tokens(whole, tokenizer.tokenizer, config.evaluate.max_tokens, min_share=context)[0].texts
        encoded = tokenizer.encode(docs)
        runners = [fixed(base), fixed(champion), fixed(candidate)]
        sums, _ = score(runners, encoded, context, stride, config.evaluate.batch_size, device, label=f"update {name}")
        n_bytes = sum(len(t.encode("utf-8")) for t in docs)
        for s in sums:
            s.bytes = n_bytes
        out[name] = SetScores(
            documents=len(docs),
            tokens=sums[0].tokens,
            bits_per_byte={m: s.bits_per_byte for m, s in zip(MODELS, sums, strict=True)},
            perplexity={m: s.perplexity for m, s in zip(MODELS, sums, strict=True)},
        )
    return out


def update_checks(scores: dict[str, SetScores], config: Config, champion_version: str | None) -> list[Check]:
    """The gate's checks of an update (see the module's doc); a set that is missing is a skipped check."""
    ec = config.evaluate
    who = f"champion (version {champion_version})" if champion_version else "champion"
    checks = []
    new = scores.get(NEW)
    checks.append(
        Check(
            name=f"new domain bits/byte vs {who}",
            value=new.bits_per_byte["candidate"] if new else None,
            threshold=new.bits_per_byte["champion"] if new else None,
            passed=(new.bits_per_byte["candidate"] < new.bits_per_byte["champion"]) if new else None,
            note=None if new else "no new held-out documents",
        )
    )
    earlier = scores.get(EARLIER)
    limit = earlier.bits_per_byte["champion"] * (1 + ec.max_earlier_domain_regression) if earlier else None
    checks.append(
        Check(
            name=f"earlier domain bits/byte vs {who} (+{ec.max_earlier_domain_regression:.0%} allowed)",
            value=earlier.bits_per_byte["candidate"] if earlier else None,
            threshold=limit,
            passed=(earlier.bits_per_byte["candidate"] <= limit) if earlier and limit is not None else None,
            note=None if earlier else "no earlier held-out documents",
        )
    )
    general = scores.get(GENERAL)
    rise = general.perplexity["candidate"] / general.perplexity["base"] - 1 if general else None
    checks.append(
        Check(
            name="forgetting (general) vs base",
            value=rise,
            threshold=ec.max_forgetting,
            passed=None if rise is None or ec.max_forgetting is None else rise <= ec.max_forgetting,
        )
    )
    return checks


def read_update_checks(evaluation: Path) -> list[Check] | None:
    """The update gate's checks evaluate wrote, or None when the model is no update."""
    data = read_json(evaluation / UPDATE_RESULTS)
    if data is None:
        return None
    return [Check.from_json(c) for c in data.get("checks") or []]


def side_by_side(scores: dict[str, SetScores], checks: list[Check]) -> str:
    """Base, champion and candidate per set (bits per byte), then the gate's checks, as Markdown."""
    lines = [
        "| set | documents | base | champion | candidate |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, s in scores.items():
        values = " | ".join(f"{s.bits_per_byte[m]:.4f}" for m in MODELS)
        lines.append(f"| {name} (bits/byte) | {s.documents} | {values} |")
    lines.append("")
    for c in checks:
        state = "skipped" if c.passed is None else ("passed" if c.passed else "FAILED")
        value = "-" if c.value is None else f"{c.value:.4f}"
        threshold = "-" if c.threshold is None else f"{c.threshold:.4f}"
        lines.append(f"- {c.name}: {value} (limit {threshold}): {state}" + (f" ({c.note})" if c.note else ""))
    return "\n".join(lines) + "\n"


def summary_of(evaluation: Path) -> dict[str, Any] | None:
    """update.json as written, for the lineage tags and `cptkit history`."""
    return read_json(evaluation / UPDATE_RESULTS)
