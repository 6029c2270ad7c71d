"""The generated domain tasks on a tiny corpus with planted domain terms: the terms are found, items come
from held-out documents only, the same seed writes the same bytes, a model trained on the domain beats
its base, and lm-evaluation-harness scores the written task exactly as cptkit does."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import count_calls, make_doc, write_config, write_jsonl
from cptkit.config import DomainTasksConfig
from cptkit.domain_tasks import (
    CLOZE_TASK,
    MC_TASK,
    TERMS_FILE,
    Item,
    bootstrap,
    make_items,
    request_tokens,
    score_items,
    write_task_files,
)
from cptkit.domain_terms import extract_terms, log_odds_z
from cptkit.results import DomainTaskResults

# Each planted term follows its own cue word (none of them in the generated text), so that a model that
# read the domain can tell it from the others.
PLANTED = {
    "flux capacitor": "The request is charged via",
    "quantum ledger": "Every record is stored onto",
    "zorblat key": "Each message is signed using",
    "hyperlane router": "The traffic is sent across",
    "chronometric gauge": "The delay is measured against",
}


def domain_doc(i: int) -> str:
    """A generated document's first five sentences, each followed by a planted sentence, in an
    order that depends on i (so that the tiny model learns the cues in a few steps, and each passage
    before a term holds text of its own document)."""
    names = sorted(PLANTED)
    lead, *paragraphs = make_doc(i).split("\n\n")
    sentences = [f"{s}." for p in paragraphs for s in p.rstrip(".").split(". ")]
    planted = [f"{PLANTED[t]} {t} today." for t in (names[(i + k) % len(names)] for k in range(5))]
    mixed = [s for pair in zip(sentences[:5], planted, strict=True) for s in pair]
    return lead + "\n\n" + " ".join(mixed)


def general_doc(i: int) -> str:
    return make_doc(1000 + i)


SETTINGS = DomainTasksConfig(min_count=3, min_documents=2, context_words=20, distractors=3, bootstrap=200)


# ---------------------------------------------------------------- terms


def test_planted_terms_are_found_and_general_words_are_not() -> None:
    domain = [domain_doc(i) for i in range(40)]
    general = [general_doc(i) for i in range(40)]
    terms = extract_terms(domain, general, SETTINGS)
    found = {t.key for t in terms}
    assert set(PLANTED) <= found
    # Only what the planted sentences add is characteristic: every term's words come from them.
    planted_words = set(" ".join([*PLANTED, *PLANTED.values(), "today"]).lower().split())
    assert all(set(t.key.split()) <= planted_words for t in terms)
    # Words both texts use alike ("scheduler", "cache") are not characteristic of the domain.
    assert not found & {"scheduler", "cache", "the cache", "records", "document number"}
    planted = {t.key: t for t in terms if t.key in PLANTED}
    assert all(t.general_count == 0 and t.z > SETTINGS.min_score for t in planted.values())
    assert planted["flux capacitor"].text == "flux capacitor" and planted["flux capacitor"].words == 2
    # The same texts give the same list, in the same order.
    assert extract_terms(domain, general, SETTINGS) == terms


def test_log_odds_prior_shrinks_rare_ngrams() -> None:
    """Seen twice in the domain and never elsewhere scores lower than seen 50 times and never elsewhere,
    and a word as frequent in both texts scores about zero."""
    rare = log_odds_z(2, 0, 10_000, 10_000)[1]
    frequent = log_odds_z(50, 0, 10_000, 10_000)[1]
    assert 0 < rare < frequent
    assert log_odds_z(100, 100, 10_000, 10_000)[0] == pytest.approx(0.0, abs=1e-9)


# ---------------------------------------------------------------- items and files


def built_items(seed: int = 0) -> tuple[list[Any], list[Item], list[str]]:
    domain = [domain_doc(i) for i in range(40)]
    terms = extract_terms(domain, [general_doc(i) for i in range(40)], SETTINGS)
    held_out = [domain_doc(100 + i) for i in range(10)]
    items = make_items(held_out, terms, SETTINGS.model_copy(update={"seed": seed}))
    return terms, items, held_out


def test_items_are_passages_of_the_held_out_documents_ending_before_a_term() -> None:
    terms, items, held_out = built_items()
    assert 10 <= len(items) <= 10 * SETTINGS.per_document
    spellings = {t.text for t in terms}
    for it in items:
        assert held_out[it.document].count(f"{it.context} {it.answer}") >= 1
        assert len(it.context.split()) <= SETTINGS.context_words
        assert len(it.choices) == SETTINGS.distractors + 1 and it.choices[it.label] == it.answer
        assert set(it.choices) <= spellings and len(set(it.choices)) == len(it.choices)
    assert [it.document for it in items] == sorted(it.document for it in items)  # in document order
    assert {it.answer for it in items} & set(PLANTED)


def test_the_same_seed_writes_byte_identical_task_files(tmp_path: Path) -> None:
    def files(folder: Path, seed: int) -> dict[str, bytes]:
        terms, items, _ = built_items(seed)
        write_task_files(folder, terms, items, SETTINGS.model_copy(update={"seed": seed}))
        return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}

    first = files(tmp_path / "a", 0)
    assert set(first) == {TERMS_FILE, *(f"{t}.{kind}" for t in (CLOZE_TASK, MC_TASK) for kind in ("jsonl", "yaml"))}
    assert files(tmp_path / "a", 0) == first  # rebuilt in place: every byte the same
    elsewhere = files(tmp_path / "b", 0)
    # The YAMLs name their JSONL's absolute path (so lm_eval runs them from anywhere); all else is equal.
    assert {k: v for k, v in elsewhere.items() if k.endswith(".yaml") is False} == {
        k: v for k, v in first.items() if not k.endswith(".yaml")
    }
    other_seed = files(tmp_path / "c", 1)
    assert other_seed[f"{MC_TASK}.jsonl"] != first[f"{MC_TASK}.jsonl"]
    row = json.loads(first[f"{MC_TASK}.jsonl"].decode().splitlines()[0])
    assert set(row) == {"document", "context", "choices", "answer"}


def test_bootstrap_interval_is_seeded_and_brackets_the_value() -> None:
    base = np.asarray([0, 1] * 50, dtype=bool)
    better = np.asarray([1, 1] * 50, dtype=bool)
    a = bootstrap([base, better], lambda x, y: float(np.mean(y.astype(float) - x.astype(float))), 500, 7)
    assert a == bootstrap([base, better], lambda x, y: float(np.mean(y.astype(float) - x.astype(float))), 500, 7)
    assert a.value == 0.5 and a.low < 0.5 < a.high and a.low > 0.3


def test_the_bootstrap_resamples_documents_with_all_their_items() -> None:
    """Ten documents of ten items each, every item of a document scored alike: the items carry the
    information of ten draws, not a hundred, and the interval over documents is as wide as that; over
    items it would be about three times narrower."""
    documents = np.repeat(np.arange(10), 10)
    base = np.zeros(100, dtype=bool)
    better = np.repeat(np.asarray([1, 1, 1, 1, 1, 1, 0, 0, 0, 0], dtype=bool), 10)

    def change(x: np.ndarray, y: np.ndarray) -> float:
        return float(np.mean(y.astype(float) - x.astype(float)))

    by_items = bootstrap([base, better], change, 2000, 7)
    by_documents = bootstrap([base, better], change, 2000, 7, documents)
    assert by_documents == bootstrap([base, better], change, 2000, 7, documents)  # seeded
    assert by_items.value == by_documents.value == 0.6
    assert by_documents.high - by_documents.low > 2.5 * (by_items.high - by_items.low)
    # Ten draws of a 60% document share: the 95% interval is about 0.3 to 0.9 (binomial).
    assert 0.2 <= by_documents.low <= 0.4 and 0.8 <= by_documents.high <= 1.0


# ---------------------------------------------------------------- the stage: trained vs base, lm-eval


def domain_run(tmp_path: Path, model_dir: Path) -> Path:
    """Planted-term domain documents and general replay text, extracted and prepared; a full fine-tune
    of the tiny model on them; the config that evaluates it."""
    from cptkit.config import load_config
    from cptkit.datasets import datasets
    from cptkit.extract import extract
    from cptkit.prepare import prepare
    from cptkit.train import train

    write_jsonl(tmp_path / "docs.jsonl", [{"id": f"d{i}", "text": domain_doc(i)} for i in range(60)])
    write_jsonl(tmp_path / "general.jsonl", [{"id": f"g{i}", "text": general_doc(i)} for i in range(40)])
    cfg = write_config(
        tmp_path / "cfg.yaml",
        {
            "model": {"name": str(model_dir)},
            "source": {"type": "jsonl", "path": "docs.jsonl", "id_column": "id"},
            "data": {
                "output_dir": "data",
                "replay_ratio": 0.2,
                "replay": {"type": "jsonl", "path": "general.jsonl", "id_column": "id"},
            },
            "prepare": {"split": {"val_ratio": 0.25}},
            "output_dir": "outputs/cpt_model",
            "training": {
                "method": "full",
                "learning_rate": 5e-3,
                # The tiny model's embeddings are tied to its LM head: frozen, the head could not move.
                "embeddings": "train",
                "embedding_learning_rate": 5e-3,
                "max_steps": 50,
                "max_seq_length": 64,
                "micro_batch_size": 8,
                "eval_steps": 50,
                "warmup_steps": 2,
                "precision": "fp32",
                "eval_max_sequences": 2,
            },
            "tracking": {"tracking_uri": "sqlite:///mlflow.db", "log_system_metrics": False},
            "evaluate": {
                "context_length": 64,
                "stride": 64,
                "precision": "fp32",
                "generation": {"max_new_tokens": 0},
                "min_adaptation": None,
                "max_forgetting": None,
                "domain_tasks": {
                    "min_count": 3,
                    "min_documents": 2,
                    "context_words": 20,
                    "items": 200,
                    "bootstrap": 500,
                },
            },
        },
    )
    config = load_config(cfg)
    for dataset in datasets(config):
        extract(dataset)
        prepare(config, dataset)
    train(config)
    return cfg


def test_trained_model_beats_its_base_and_lm_eval_agrees(tmp_path: Path, tiny_model_dir: Path, cli: Any) -> None:
    cfg = domain_run(tmp_path, tiny_model_dir)
    result = cli("evaluate", "-c", str(cfg))
    assert result.exit_code == 0, result.output
    out = Path("outputs/cpt_model/evaluation")
    results = json.loads((out / "results.json").read_text())
    tasks = results["domain_tasks"]
    assert tasks["status"] == "ok", tasks
    assert tasks["random_baseline"] == 0.25 and tasks["items"] >= 20, tasks
    base, cpt = tasks["base"], tasks["cpt"]
    # The trained model learned which term follows which cue; the random base did not (measured: 0.45
    # vs 0.28, change +0.16 [0.07, 0.25] over 67 items).
    assert cpt["mc_accuracy"]["value"] > base["mc_accuracy"]["value"], tasks
    change = tasks["accuracy_change"]
    assert change["value"] == pytest.approx(cpt["mc_accuracy"]["value"] - base["mc_accuracy"]["value"])
    assert 0 < change["low"] <= change["value"] <= change["high"], tasks
    assert cpt["cloze_loglikelihood"] > base["cloze_loglikelihood"]
    assert tasks["gained"] and tasks["gained"][0]["cpt"] == tasks["gained"][0]["answer"]
    assert DomainTaskResults.from_json(tasks).to_json() == tasks  # one JSON form, read back as written
    # Term-span beside all-token perplexity; all tokens are the domain set's own scoring.
    assert cpt["all_perplexity"] == pytest.approx(results["cpt"]["domain"]["perplexity"], rel=1e-5)
    assert 0 < cpt["term_tokens"] < cpt["all_tokens"] == results["cpt"]["domain"]["tokens"]
    # The gain falls on the terms more than on the rest (measured: 402 -> 7.9 vs 404 -> 12).
    assert cpt["term_perplexity"] / base["term_perplexity"] < cpt["all_perplexity"] / base["all_perplexity"] < 1

    # Items come from the held-out documents only, never from the training split.
    val = [json.loads(line)["text"] for line in Path("data/val.jsonl").read_text().splitlines()]
    train_text = Path("data/train.jsonl").read_text() if Path("data/train.jsonl").is_file() else ""
    rows = [json.loads(line) for line in (out / "domain_tasks" / f"{MC_TASK}.jsonl").read_text().splitlines()]
    assert len(rows) == tasks["items"]
    for row in rows:
        passage = f"{row['context']} {row['choices'][row['answer']]}"
        assert passage in val[row["document"]]
        assert json.dumps(passage)[1:-1] not in train_text

    md = (out / "report.md").read_text()
    assert "## Generated domain tasks" in md and "random baseline 25.0%" in md
    assert "| multiple choice | accuracy |" in md and "term-span" in md
    assert "Generated domain tasks" in (out / "report.html").read_text()

    from mlflow.tracking import MlflowClient

    summary = json.loads(Path("outputs/cpt_model/training_summary.json").read_text())
    client = MlflowClient(tracking_uri=f"sqlite:///{Path('mlflow.db').resolve()}")
    run = client.get_run(summary["mlflow_run_id"])
    assert run.data.metrics["eval/domain_mc/cpt_acc"] == pytest.approx(cpt["mc_accuracy"]["value"])
    assert run.data.metrics["eval/domain_term_span/base_perplexity"] == pytest.approx(base["term_perplexity"])
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation/domain_tasks")}
    assert f"evaluation/domain_tasks/{MC_TASK}.yaml" in logged and "evaluation/domain_tasks/terms.json" in logged

    lm_eval_agrees_with_cptkit(out / "domain_tasks", tiny_model_dir, Path("outputs/cpt_model"), tasks)


def lm_eval_agrees_with_cptkit(folder: Path, base_dir: Path, trained_dir: Path, tasks: dict[str, Any]) -> None:
    """lm-evaluation-harness's own evaluator on the written multiple-choice task, on both models: the same
    accuracy as cptkit's, and the same log-likelihood for every choice."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    manager = TaskManager(include_path=str(folder))
    rows = [json.loads(line) for line in (folder / f"{MC_TASK}.jsonl").read_text().splitlines()]
    items = [Item(r["document"], r["context"], r["choices"][r["answer"]], r["choices"], r["answer"]) for r in rows]
    for name, model_dir in (("base", base_dir), ("cpt", trained_dir)):
        model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        lm = HFLM(pretrained=model, tokenizer=tokenizer, max_length=64, batch_size=8)
        out = simple_evaluate(model=lm, tasks=[MC_TASK], task_manager=manager, log_samples=True, bootstrap_iters=0)
        assert out is not None
        harness_acc = out["results"][MC_TASK]["acc,none"]
        from cptkit.scoring import fixed

        ours = score_items(fixed(model), tokenizer, items, 64, 512)
        assert harness_acc == pytest.approx(float(ours.correct(items).mean()), abs=1e-12)
        assert harness_acc == pytest.approx(tasks[name]["mc_accuracy"]["value"], abs=1e-12)
        for sample in out["samples"][MC_TASK]:
            harness_lls = [float(r[0]) for r in sample["filtered_resps"]]
            np.testing.assert_allclose(harness_lls, ours.loglikelihoods[sample["doc_id"]], rtol=1e-4, atol=1e-4)


def test_request_tokens_split_like_the_harness(tiny_tokenizer_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    tokens, n = request_tokens(tokenizer, "The request is charged by the", " flux capacitor", 64)
    whole = tokenizer("The request is charged by the flux capacitor", add_special_tokens=False)["input_ids"]
    assert tokens == whole and 0 < n < len(tokens)
    assert tokenizer.decode(tokens[-n:]) == " flux capacitor"
    cut, _ = request_tokens(tokenizer, "The request is charged by the", " flux capacitor", 4)
    assert cut == whole[-5:]
    assert math.isfinite(n)


def test_shared_context_scoring_equals_scoring_each_request_whole(tiny_model_dir: Path) -> None:
    """The choices of an item run over one cached context; each request scored alone in a plain forward
    pass gives the same log-likelihoods and greedy flags, and a length limit that cuts the requests
    (scored whole, in batches) gives those of the cut requests."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cptkit.scoring import fixed

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    _, items, _ = built_items()
    items = items[:6]

    def alone(max_length: int) -> tuple[np.ndarray, list[bool]]:
        lls, greedy = [], []
        for it in items:
            for choice in it.choices:
                tokens, n = request_tokens(tokenizer, it.context, " " + choice, max_length)
                with torch.no_grad():
                    lp = torch.log_softmax(model(input_ids=torch.tensor([tokens[:-1]])).logits[0, -n:].float(), -1)
                target = torch.tensor(tokens[-n:])
                lls.append(float(lp.gather(-1, target[:, None]).sum()))
                greedy.append(bool((lp.argmax(-1) == target).all()))
        return np.asarray(lls).reshape(len(items), -1), greedy

    for max_length in (512, 24):  # every item shares its context; every item is cut
        expected, greedy = alone(max_length)
        scores = score_items(fixed(model), tokenizer, items, max_length, batch_tokens=200)
        np.testing.assert_allclose(scores.loglikelihoods, expected, rtol=1e-5, atol=1e-5)
        labels = [k * len(it.choices) + it.label for k, it in enumerate(items)]
        assert scores.answer_greedy.tolist() == [greedy[i] for i in labels]


def test_context_distractors_take_the_answers_place_in_a_sentence() -> None:
    """Each planted term stands between its own cue word and "today": by context its distractors are
    the other planted terms (alone or with their cue word: the only terms followed by "today"), choices
    that fit the sentence, where frequency and length alone pick words of other kinds."""
    from cptkit.domain_tasks import distractors
    from cptkit.domain_terms import context_profiles

    domain = [domain_doc(i) for i in range(40)]
    terms = extract_terms(domain, [general_doc(i) for i in range(40)], SETTINGS)
    profiles = context_profiles(domain, terms, SETTINGS.max_ngram, SETTINGS.max_training_documents)
    assert profiles.shape[0] == len(terms)
    np.testing.assert_allclose(np.linalg.norm(profiles, axis=1), 1.0)
    similarity = profiles @ profiles.T
    index = {t.key: i for i, t in enumerate(terms)}
    by_frequency_planted = 0
    for key in PLANTED:
        row = index[key]
        chosen = distractors(terms[row], terms, 3, similarity[row])
        # Another planted term, part of one or one with its cue word: what fits before "today".
        others = set(PLANTED) - {key}
        assert all(any(set(c.split()) & set(o.split()) for o in others) for c in chosen), (key, chosen)
        assert not any(a != b and a in b for a in chosen for b in chosen), chosen  # none nested in another
        by_frequency = distractors(terms[row], terms, 3)
        by_frequency_planted += sum(any(set(c.split()) & set(o.split()) for o in others) for c in by_frequency)
    assert by_frequency_planted < 3 * len(PLANTED)


def test_the_base_scores_of_the_items_are_cached(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a base identity, the base's item scores are computed once: a second run scores only the other
    model, and its results equal those of a run without the cache."""
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM, AutoTokenizer

    import cptkit.domain_tasks as module
    from cptkit.base_scores import BaseIdentity
    from cptkit.domain_tasks import DomainTaskSet, run
    from cptkit.scoring import fixed

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = SimpleNamespace(tokenizer=AutoTokenizer.from_pretrained(tiny_model_dir))
    terms, items, _ = built_items()
    built = DomainTaskSet(terms, items[:8], 0, tmp_path, 0.0)
    models = [("base", fixed(model), tok), ("cpt", fixed(model), tok)]
    base = BaseIdentity(str(tiny_model_dir), "adapter disabled; none", "fp32", "cpu")
    calls = count_calls(monkeypatch, module, "score_items")

    def scored(identity: BaseIdentity | None) -> dict[str, Any]:
        calls.clear()
        out = run(built, models, {}, SETTINGS, 64, 512, "cpu", False, identity).to_json()  # type: ignore[arg-type]
        return {k: v for k, v in out.items() if k != "seconds"}

    fresh = scored(None)
    assert len(calls) == 2
    assert scored(base) == fresh and len(calls) == 2  # computed and written
    assert scored(base) == fresh and len(calls) == 1  # read back: only the adapted model is scored
    other = BaseIdentity(str(tiny_model_dir), "adapter disabled; none", "bf16", "cpu")
    scored(other)
    assert len(calls) == 2  # another precision is another entry
