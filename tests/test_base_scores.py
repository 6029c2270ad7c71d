"""The base-score cache: an evaluation with cached base scores writes the same results.json numbers as one
without, and a second evaluation (of the same or another adapter of the same base) runs the base's decoder
on no batch."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cptkit.base_scores import BaseOutputs, cache_root
from test_evaluate import trained_run

# What differs between two runs of the same evaluation: how long it took.
TIMINGS = {"seconds", "tokens_per_second"}


def numbers(results_path: Path) -> dict[str, Any]:
    data = json.loads(results_path.read_text())
    return {k: v for k, v in data.items() if k not in TIMINGS}


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the decoder passes of scoring (one per model and batch, unless the base's come from the cache)."""
    import cptkit.scoring as scoring

    calls = [0]
    real = scoring.scored_outputs

    def counting(*args: Any) -> Any:
        calls[0] += 1
        return real(*args)

    monkeypatch.setattr(scoring, "scored_outputs", counting)
    return calls


def test_cached_base_scores_equal_fresh_ones_and_are_not_recomputed(
    tmp_path: Path, tiny_model_dir: Path, counted: list[int]
) -> None:
    from cptkit.config import load_config
    from cptkit.evaluate import evaluate
    from cptkit.train import train

    cfg = trained_run(tmp_path, tiny_model_dir)
    results = Path("outputs/cpt_model/evaluation/results.json")

    evaluate(load_config(cfg, ["evaluate.base_score_cache=false"]))
    fresh, fresh_calls = numbers(results), counted[0]
    assert not cache_root().exists()

    counted[0] = 0
    evaluate(load_config(cfg), force=True)  # computes and caches the base's outputs
    assert numbers(results) == fresh and counted[0] == fresh_calls
    entries = sorted(p.name.split("-")[0] for p in cache_root().iterdir() if not p.name.startswith("."))
    assert entries == ["generations", "windows", "windows", "windows"]  # the sample completions; domain, general, news

    counted[0] = 0
    evaluate(load_config(cfg), force=True)  # reads them
    assert numbers(results) == fresh
    assert 2 * counted[0] == fresh_calls  # only the adapted model's decoder ran

    # Another adapter of the same base, trained otherwise: its evaluation reads the base's outputs too.
    other = ["output_dir=outputs/other", "training.learning_rate=0.01", "training.seed=7"]
    train(load_config(cfg, other))
    counted[0] = 0
    evaluate(load_config(cfg, other))
    cached_other, cached_calls = numbers(Path("outputs/other/evaluation/results.json")), counted[0]
    assert 2 * cached_calls == fresh_calls
    evaluate(load_config(cfg, [*other, "evaluate.base_score_cache=false"]), force=True)
    assert numbers(Path("outputs/other/evaluation/results.json")) == cached_other
    assert cached_other["cpt"] != fresh["cpt"] and cached_other["base"] == fresh["base"]


def test_a_changed_window_is_another_entry(tmp_path: Path, tiny_model_dir: Path, counted: list[int]) -> None:
    from cptkit.config import load_config
    from cptkit.evaluate import evaluate

    cfg = trained_run(tmp_path, tiny_model_dir, sets={})
    evaluate(load_config(cfg))
    first = counted[0]
    counted[0] = 0
    evaluate(load_config(cfg, ["evaluate.stride=24"]))
    assert counted[0] > first / 2  # nothing was read: the base ran again
    entries = sorted(p.name.split("-")[0] for p in cache_root().iterdir())
    assert entries == ["generations"] + ["windows"] * 4  # the completions do not depend on the windows


def test_a_failed_scoring_leaves_no_entry_and_two_writers_leave_one(tmp_path: Path) -> None:
    import torch

    def compute(n: int) -> Any:
        return lambda: ("hidden", torch.full((n, 3), float(n)))

    with pytest.raises(RuntimeError), BaseOutputs("k", tmp_path) as failing:
        failing.output(0, 2, compute(2), "cpu")
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []

    # Two writers of the same entry at once: both complete, one entry stays, no temporary folder.
    barrier = threading.Barrier(2)

    def write() -> None:
        with BaseOutputs("k", tmp_path) as writer:
            assert not writer.cached
            writer.output(0, 2, compute(2), "cpu")
            writer.output(1, 5, compute(5), "cpu")
            barrier.wait()

    threads = [threading.Thread(target=write) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [p.name for p in tmp_path.iterdir()] == ["k"]
    with BaseOutputs("k", tmp_path) as reader:
        assert reader.cached
        kind, values = reader.output(1, 5, compute(99), "cpu")
        assert kind == "hidden" and np.array_equal(values.numpy(), np.full((5, 3), 5.0, dtype=np.float32))


def test_a_key_changes_with_everything_the_base_results_depend_on(tmp_path: Path) -> None:
    """One identity keys every cached base result: equal inputs give the same key; the kind, the settings,
    the content, how the base is scored, the precision, and a changed tokenizer file each give another."""
    from cptkit.base_scores import BaseIdentity, token_bytes

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "tokenizer.json").write_text('{"v": 1}')
    base = BaseIdentity(str(model), "adapter disabled; none", "fp32", "cpu")
    docs = [np.arange(5), np.arange(3)]

    def key(identity: BaseIdentity = base, kind: str = "windows", batch: int = 2, content: Any = docs) -> str:
        return identity.key(kind, {"batch_size": batch}, token_bytes(content))

    first = key()
    assert key(BaseIdentity(str(model), "adapter disabled; none", "fp32", "cpu")) == first
    others = [
        key(kind="chat"),
        key(batch=3),
        key(content=[np.arange(4), np.arange(4)]),  # same tokens, cut elsewhere
        key(BaseIdentity(str(model), "a separately loaded copy; none", "fp32", "cpu")),
        key(BaseIdentity(str(model), "adapter disabled; none", "bf16", "cpu")),
    ]
    (model / "tokenizer.json").write_text('{"v": 2}')  # same size: the content is what tells
    others.append(key(BaseIdentity(str(model), "adapter disabled; none", "fp32", "cpu")))
    assert len({first, *others}) == len(others) + 1
