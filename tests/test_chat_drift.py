"""Chat drift on tiny random Llamas given a chat template: the base's answers are cached, an unchanged
model has no drift, a trained adapter has some, the verdict bounds it, and a raw base model is skipped
with its reason."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from conftest import count_calls
from cptkit import chat_drift
from cptkit.config import ChatDriftConfig, EvaluateConfig, TrainingConfig
from cptkit.model_pair import load_pair
from cptkit.results import ChatDrift, EvaluationResults
from cptkit.verdict import verdict
from test_evaluate import load_model, make_adapter, trained_run

# A ChatML-like template over the tiny tokenizer's one special token.
TEMPLATE = (
    "{% for message in messages %}<|endoftext|>{{ message['role'] }}\n{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|endoftext|>assistant\n{% endif %}"
)
SMALL = ChatDriftConfig(max_instructions=5, max_new_tokens=10, side_by_side=2)


@pytest.fixture(scope="session")
def chat_model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """The tiny model with a chat template in its tokenizer (the tiny tokenizer has none)."""
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("tiny_chat_llama")
    for item in tiny_model_dir.iterdir():
        shutil.copy(item, out / item.name)
    tokenizer = AutoTokenizer.from_pretrained(out)
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(out)
    return out


def unchanged_adapter(model_dir: Path, out: Path) -> Path:
    """A freshly initialized LoRA adapter (B = 0): the adapted model is the base."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(load_model(model_dir), LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    model.save_pretrained(str(out))
    return out


def measure(model_dir: Path, adapter: Path, cc: ChatDriftConfig = SMALL) -> ChatDrift:
    pair = load_pair(str(model_dir), adapter, TrainingConfig(method="lora"), "fp32", "cpu")
    return chat_drift.measure(pair, cc, "fp32", "cpu", batch_size=3)


def test_the_shipped_instructions_are_varied_and_licensed() -> None:
    items = chat_drift.instructions()
    assert 30 <= len(items) <= 40 and len(set(items)) == len(items)
    header = Path(chat_drift.__file__).with_name(chat_drift.INSTRUCTIONS_FILE).read_text().split("instructions:")[0]
    assert "License: CC0" in header
    assert chat_drift.instructions(3) == items[:3]


def test_an_unchanged_model_has_no_drift_and_a_second_run_reads_the_cache(
    chat_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    adapter = unchanged_adapter(chat_model_dir, tmp_path / "adapter")
    first = measure(chat_model_dir, adapter)
    assert first.status == "ok" and not first.cached
    assert first.instructions == 5 and first.answer_tokens == sum(a.tokens for a in first.answers) > 5
    assert first.drift == pytest.approx(0.0, abs=1e-9) and first.kl == pytest.approx(0.0, abs=1e-9)
    assert first.top1_agreement == 1.0
    assert first.base_log_likelihood == first.cpt_log_likelihood < 0
    # The same model answers the same way; only the first side_by_side instructions are asked.
    assert [a.cpt for a in first.answers] == [a.base for a in first.answers[:2]] + [None] * 3
    (cached,) = (Path(".cache") / chat_drift.CACHE_FOLDER).iterdir()
    assert len(json.loads(cached.read_text())["answers"]) == 5

    def no_generation(*args: Any) -> Any:
        raise AssertionError("the base answers were generated again")

    monkeypatch.setattr(chat_drift, "_base_answers", no_generation)
    second = measure(chat_model_dir, adapter)
    assert second.cached and second.to_json() | {"cached": False} == first.to_json()
    # Other generation settings are another cache entry.
    with pytest.raises(AssertionError, match="generated again"):
        measure(chat_model_dir, adapter, SMALL.model_copy(update={"max_new_tokens": 11}))


def test_answers_generated_together_equal_answers_generated_one_by_one(
    chat_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pair = load_pair(
        str(chat_model_dir), make_adapter(chat_model_dir, tmp_path / "adapter"), TrainingConfig(), "fp32", "cpu"
    )
    items = chat_drift.instructions(5)
    together = chat_drift._base_answers(pair, items, 12, "cpu")
    assert len({len(a.prompt_ids) for a in together}) > 1  # prompts of several lengths: padding is exercised
    monkeypatch.setattr(chat_drift, "GENERATION_BATCH", 1)
    alone = chat_drift._base_answers(pair, items, 12, "cpu")
    assert [(a.answer_ids, a.text) for a in together] == [(a.answer_ids, a.text) for a in alone]
    assert all(len(a.answer_ids) > 0 for a in together)


def test_a_changed_model_drifts(chat_model_dir: Path, tmp_path: Path) -> None:
    result = measure(chat_model_dir, make_adapter(chat_model_dir, tmp_path / "adapter"))
    assert result.status == "ok"
    assert result.drift is not None and result.drift > 0
    assert result.kl is not None and result.kl > 0
    assert result.top1_agreement is not None and result.top1_agreement < 1
    assert result.cpt_log_likelihood is not None and result.base_log_likelihood is not None
    assert result.drift == pytest.approx(result.base_log_likelihood - result.cpt_log_likelihood)


def test_a_raw_base_model_is_skipped_with_the_reason(tiny_model_dir: Path, tmp_path: Path) -> None:
    result = measure(tiny_model_dir, unchanged_adapter(tiny_model_dir, tmp_path / "adapter"))
    assert result.status == "skipped" and result.drift is None
    assert result.reason is not None and "no chat template" in result.reason
    off = measure(tiny_model_dir, tmp_path / "adapter", ChatDriftConfig(enabled=False))
    assert off.status == "off"


def test_max_chat_drift_bounds_the_verdict() -> None:
    ec = EvaluateConfig(min_adaptation=None, max_forgetting=None, max_chat_drift=0.1)
    failed = verdict(None, {}, None, ec, chat_drift=0.25)
    assert not failed.passed
    (check,) = failed.checks[-1:]
    assert (check.name, check.passed) == ("chat_drift", False)
    assert check.failure() == "chat drift 0.2500 > maximum 0.1000 nats per token"
    assert verdict(None, {}, None, ec, chat_drift=0.05).passed
    # Off by default: no check unless chat drift was measured, and then it is not decided.
    default = EvaluateConfig()
    assert "chat_drift" not in [c.name for c in verdict(None, {}, None, default).checks]
    assert [c.passed for c in verdict(None, {}, None, default, chat_drift=9.0).checks if c.name == "chat_drift"] == [
        None
    ]


def test_evaluate_reports_chat_drift_and_the_verdict_bounds_it(tmp_path: Path, chat_model_dir: Path, cli: Any) -> None:
    chat = {"max_instructions": 4, "max_new_tokens": 8, "side_by_side": 2}
    cfg = trained_run(tmp_path, chat_model_dir, min_adaptation=None, max_forgetting=None, chat=chat)
    result = cli("evaluate", "-c", str(cfg))
    assert result.exit_code == 0, result.output
    assert "evaluate chat: drift +" in result.output
    out = Path("outputs/cpt_model/evaluation")
    results = EvaluationResults.read(out / "results.json")
    assert results is not None and results.chat.status == "ok" and not results.chat.cached
    assert results.chat.drift is not None and results.chat.drift > 0 and results.chat.kl is not None
    assert [a.cpt is not None for a in results.chat.answers] == [True, True, False, False]
    assert [c.passed for c in results.verdict.checks if c.name == "chat_drift"] == [None]  # no threshold
    md = (out / "report.md").read_text()
    assert "## Chat behaviour" in md and "chat drift, nats per token" in md
    assert f"{results.chat.drift:+.4f} nats per answer token" in md.splitlines()[2]
    html = (out / "report.html").read_text()
    assert "<h2>Chat behaviour</h2>" in html and results.chat.answers[0].instruction.split()[0] in html

    from mlflow.tracking import MlflowClient

    run_id = json.loads(Path("outputs/cpt_model/training_summary.json").read_text())["mlflow_run_id"]
    metrics = MlflowClient(tracking_uri=f"sqlite:///{Path('mlflow.db').resolve()}").get_run(run_id).data.metrics
    assert metrics["eval/chat/drift"] == pytest.approx(results.chat.drift)
    assert metrics["eval/chat/kl"] == pytest.approx(results.chat.kl)

    strict = cli("evaluate", "-c", str(cfg), "--set", "evaluate.max_chat_drift=0")
    assert strict.exit_code == 0 and "evaluate: FAILED" in strict.output
    again = EvaluationResults.read(out / "results.json")
    assert again is not None and again.chat.cached  # the base's answers were not generated again
    assert again.chat.drift == pytest.approx(results.chat.drift)
    assert [c.passed for c in again.verdict.checks if c.name == "chat_drift"] == [False]


def minimal_results() -> EvaluationResults:
    from cptkit.results import EvaluationSettings, PairDescription, Verdict

    return EvaluationResults(
        pair=PairDescription(
            base_model="b", base_model_path="b", cpt_model="c", method="lora", base_scored_as="x", quantization="none"
        ),
        settings=EvaluationSettings(context_length=8, stride=8, batch_size=1, precision="fp32"),
        base={},
        cpt={},
        verdict=Verdict(passed=True, checks=[]),
    )


def test_results_without_chat_drift_read_as_not_measured() -> None:
    data = minimal_results().to_json()
    assert data["chat"]["status"] == "off"
    del data["chat"]  # a file written before chat drift existed
    assert EvaluationResults.from_json(data).chat.reason == "not measured"


def test_the_promotion_gate_bounds_chat_drift() -> None:
    from cptkit.config import Config
    from cptkit.register import promotion_gate

    class NoChampion:
        def alias_version(self, name: str, alias: str) -> None:
            return None

    results = EvaluationResults.from_json(
        {**minimal_results().to_json(), "chat": ChatDrift(status="ok", drift=0.25, kl=0.01).to_json()}
    )
    config = Config.model_validate({"evaluate": {"min_adaptation": None, "max_chat_drift": 0.1}})
    gate = promotion_gate(results, config, NoChampion(), "m")  # type: ignore[arg-type]
    assert not gate.passed and gate.failures() == ["chat drift 0.2500 > maximum 0.1000 nats per token"]
    relaxed = config.model_copy(update={"evaluate": config.evaluate.model_copy(update={"max_chat_drift": 0.3})})
    assert promotion_gate(results, relaxed, NoChampion(), "m").passed  # type: ignore[arg-type]


def test_the_base_side_of_the_scoring_is_cached_and_equal(
    chat_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the base-score cache, a second measurement of another adapter reads the base's hidden states
    at the answers instead of running the base's decoder, and gets the numbers of a fresh measurement."""
    import cptkit.scoring as module
    from cptkit.base_scores import cache_root

    def run(adapter: Path, cache: bool) -> ChatDrift:
        pair = load_pair(str(chat_model_dir), adapter, TrainingConfig(method="lora"), "fp32", "cpu")
        return chat_drift.measure(pair, SMALL, "fp32", "cpu", batch_size=3, base_cache=cache)

    calls = count_calls(monkeypatch, module, "scored_outputs")
    first = make_adapter(chat_model_dir, tmp_path / "first")
    run(first, True)  # writes the entry
    assert [p for p in cache_root().iterdir() if not p.name.startswith(".")]
    other = make_adapter(chat_model_dir, tmp_path / "other", seed=2)
    calls.clear()
    cached = run(other, True)
    with_cache = len(calls)
    calls.clear()
    fresh = run(other, False)
    assert 0 < with_cache < len(calls) and with_cache * 2 == len(calls)  # only the adapted model's passes
    assert cached.to_json() | {"cached": None} == fresh.to_json() | {"cached": None}
    assert cached.drift is not None and cached.drift != 0
