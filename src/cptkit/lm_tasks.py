"""lm-evaluation-harness tasks, run for both models when lm-eval is installed."""

from __future__ import annotations

import contextlib
import importlib.util
from pathlib import Path

from cptkit.model_pair import ModelPair
from cptkit.results import TaskMetrics, TaskResults


def run_tasks(
    pair: ModelPair,
    tasks: list[str],
    max_length: int,
    batch_size: int,
    limit: int | None,
    include_path: Path | None = None,
    bf16: bool = False,
) -> TaskResults:
    """Run lm-evaluation-harness tasks on both models, the harness's own and those in `include_path`.
    Never fails the evaluation: a task whose data cannot be loaded (offline hub, unknown name) is
    reported as not run, with the reason, and the other tasks still run."""
    if not tasks:
        return TaskResults(status="not_requested", tasks=[])
    if importlib.util.find_spec("lm_eval") is None:
        return TaskResults(
            status="not_run", tasks=tasks, reason="lm-evaluation-harness is not installed (pip install lm-eval)"
        )
    import torch

    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager, get_task_dict

        manager = TaskManager(include_path=str(include_path) if include_path is not None else None)
        # Each task loaded alone first: the data of one that cannot be had must not stop the others.
        missing: dict[str, str] = {}
        for task in tasks:
            try:
                get_task_dict([task], manager)
            except Exception as exc:
                missing[task] = _exception_line(exc)
        available = [t for t in tasks if t not in missing]
        results: TaskMetrics = {}
        for name, runner, tok in (
            ("cpt", pair.cpt_runner, pair.cpt_tokenizer),
            ("base", pair.base_runner, pair.base_tokenizer),
        ):
            if not available:
                break
            device_type = pair.cpt_model.device.type
            autocast = torch.autocast(device_type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
            with runner() as model, autocast:
                lm = HFLM(
                    pretrained=model,
                    tokenizer=tok.tokenizer,
                    max_length=max_length,
                    batch_size=batch_size,
                    prefix_token_id=tok.prefix_id,  # what precedes a document in perplexity scoring too
                )
                # No standard errors: the report shows none, and bootstrapping some metrics' takes minutes.
                out = simple_evaluate(
                    model=lm, tasks=available, task_manager=manager, limit=limit, log_samples=False, bootstrap_iters=0
                )
            for task, metrics in (out or {}).get("results", {}).items():
                for key, value in metrics.items():
                    metric = key.split(",")[0]  # "acc,none": the metric and its filter
                    if isinstance(value, int | float) and "stderr" not in metric and metric not in _NOT_METRICS:
                        results.setdefault(task, {}).setdefault(metric, {})[name] = float(value)
    except Exception as exc:  # the harness failed in a way a task's check above did not catch
        return TaskResults(status="not_run", tasks=tasks, reason=_exception_line(exc))
    reason = "; ".join(f"{task}: {why}" for task, why in missing.items())
    if not available:
        return TaskResults(status="not_run", tasks=tasks, reason=reason, not_run=missing)
    if missing:
        return TaskResults(status="partial", tasks=tasks, reason=reason, not_run=missing, results=results)
    return TaskResults(status="ok", tasks=tasks, results=results)


# What the harness puts next to a task's metrics in its results.
_NOT_METRICS = {"alias", "sample_len", "samples"}


def _exception_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())[:300]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
