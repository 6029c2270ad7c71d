"""Evaluation on tiny random Llamas: sliding-window perplexity against plain reference computations, batch
invariance, bits per byte across tokenizers, the adapter-disabled base, drift, the report, MLflow, and the
CLI's errors."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import make_doc, prepared_run, write_jsonl
from cptkit.config import TrainingConfig
from cptkit.model_pair import load_pair
from cptkit.scoring import SetScore, adapter_disabled, fixed, plan_windows, score, text_tokenizer

# ---------------------------------------------------------------- helpers


def load_model(path: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").eval()


def tokenizer_of(path: Path) -> Any:
    from transformers import AutoTokenizer

    return text_tokenizer(AutoTokenizer.from_pretrained(path))


def token_logprob(model: Any, context: np.ndarray, target: int) -> float:
    """log P(target | context), from one plain forward pass over the context alone."""
    import torch

    with torch.no_grad():
        logits = model(input_ids=torch.tensor(context[None, :])).logits[0, -1].float()
    return float(torch.log_softmax(logits, -1)[target])


def reference_nll(model: Any, seq: np.ndarray, context_length: int, stride: int) -> float:
    """Token by token, one forward pass each: token p is predicted from the window that first reaches it.
    Windows end at context_length, then every `stride` tokens, and the last one at the document's end."""
    last = len(seq) - 1
    ends = [min(context_length, last)]
    while ends[-1] < last:
        ends.append(min(ends[-1] + stride, last))
    total = 0.0
    for p in range(1, last + 1):
        end = next(e for e in ends if e >= p)
        start = max(0, end - context_length)
        total -= token_logprob(model, seq[start:p], int(seq[p]))
    return total


def texts(n: int, start: int = 0) -> list[str]:
    return [make_doc(start + i) for i in range(n)]


# ---------------------------------------------------------------- windows


@pytest.mark.parametrize(("context", "stride"), [(8, 8), (8, 3), (8, 1), (5, 4), (64, 32)])
def test_windows_score_every_token_exactly_once_within_the_context(context: int, stride: int) -> None:
    lengths = [0, 1, 2, 5, 8, 9, 10, 17, 40, 64, 65]
    windows = plan_windows(lengths, context, stride)
    for doc, n in enumerate(lengths):
        scored: list[int] = []
        for w in (w for w in windows if w.doc == doc):
            assert 0 < w.length <= context and w.end <= n - 1
            scored += range(w.end - w.scored + 1, w.end + 1)
            first = w.end - w.scored + 1
            # every scored token sees at least context - stride tokens, or everything before it
            assert first - w.start >= min(first, context - stride + 1)
        assert sorted(scored) == list(range(1, n)), (doc, n)


def test_windows_reject_a_stride_longer_than_the_context() -> None:
    with pytest.raises(ValueError, match="stride"):
        plan_windows([10], 4, 5)


# ---------------------------------------------------------------- perplexity


def test_one_window_equals_a_plain_forward_pass(tiny_model_dir: Path) -> None:
    import torch

    model = load_model(tiny_model_dir)
    tok = tokenizer_of(tiny_model_dir)
    (seq,) = tok.encode([make_doc(3)[:300]])
    assert seq[0] == tok.prefix_id and len(seq) < 200
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(seq[None, :])).logits[0, :-1].float()
    expected = float(torch.nn.functional.cross_entropy(logits, torch.tensor(seq[1:]), reduction="sum"))
    (result,), _ = score([fixed(model)], [seq], context_length=256, stride=128, batch_size=4)
    assert result.tokens == len(seq) - 1
    assert result.nll == pytest.approx(expected, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(expected / (len(seq) - 1)), rel=1e-5)


@pytest.mark.parametrize(("context", "stride"), [(16, 5), (16, 1), (12, 12)])
def test_many_windows_equal_a_token_by_token_reference(tiny_model_dir: Path, context: int, stride: int) -> None:
    model = load_model(tiny_model_dir)
    (seq,) = tokenizer_of(tiny_model_dir).encode([make_doc(5)[:260]])
    assert len(seq) > 4 * context  # needs many windows
    (result,), _ = score([fixed(model)], [seq], context, stride, batch_size=3)
    assert result.tokens == len(seq) - 1
    assert result.nll == pytest.approx(reference_nll(model, seq, context, stride), rel=1e-5)


def test_result_does_not_depend_on_batch_size(tiny_model_dir: Path) -> None:
    model = load_model(tiny_model_dir)
    docs = tokenizer_of(tiny_model_dir).encode([t[: 40 + 70 * i] for i, t in enumerate(texts(6))])
    results = [score([fixed(model)], docs, 32, 12, batch_size=b)[0][0] for b in (1, 4, 64)]
    assert len({r.tokens for r in results}) == 1
    assert results[0].tokens == sum(len(d) - 1 for d in docs)
    for r in results[1:]:
        assert r.nll == pytest.approx(results[0].nll, rel=1e-6)


def test_stride_equal_to_context_is_non_overlapping_windows(tiny_model_dir: Path) -> None:
    """With stride == context length, windows are disjoint chunks of the document, each scored alone."""
    import torch

    model = load_model(tiny_model_dir)
    (seq,) = tokenizer_of(tiny_model_dir).encode([make_doc(7)])
    context = 20
    seq = seq[: 1 + 6 * context]  # six whole windows of targets
    expected = 0.0
    for k in range(6):
        chunk = torch.tensor(seq[k * context : (k + 1) * context + 1])
        with torch.no_grad():
            logits = model(input_ids=chunk[None, :-1]).logits[0].float()
        expected += float(torch.nn.functional.cross_entropy(logits, chunk[1:], reduction="sum"))
    (result,), _ = score([fixed(model)], [seq], context, context, batch_size=4)
    assert result.tokens == 6 * context
    assert result.nll == pytest.approx(expected, rel=1e-5)


def _uniform_model(vocab_size: int) -> Any:
    """A Llama whose LM head is zero: every next-token distribution is uniform, so a document's NLL is
    exactly tokens x ln(vocabulary)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.zero_()
    return model


def test_bits_per_byte_counts_bytes_not_tokens(tiny_tokenizer_dir: Path) -> None:
    """The same text under a 400-token BPE and a byte-level tokenizer: per-token perplexities are not
    comparable, bits per byte are (both are log2(vocabulary) x tokens per byte for a uniform model)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=257, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    raw.train_from_iterator(["x"], trainer)
    byte_tok = text_tokenizer(PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|endoftext|>"))
    bpe_tok = tokenizer_of(tiny_tokenizer_dir)
    docs = [make_doc(1), "Café crème, naïve résumé: ünïcödé costs more bytes than characters."]
    n_bytes = sum(len(t.encode("utf-8")) for t in docs)
    assert n_bytes > sum(len(t) for t in docs)

    results = {}
    for name, tok, vocab in (("bpe", bpe_tok, 400), ("bytes", byte_tok, 257)):
        seqs = tok.encode(docs)
        (s,), _ = score([fixed(_uniform_model(vocab))], seqs, 64, 32, batch_size=8)
        s.bytes = n_bytes
        assert s.tokens == sum(len(q) - 1 for q in seqs)
        assert s.nll == pytest.approx(s.tokens * math.log(vocab), rel=1e-5)
        assert math.isfinite(s.bits_per_byte)
        assert s.bits_per_byte == pytest.approx(s.tokens / n_bytes * math.log2(vocab), rel=1e-5)
        results[name] = s
    assert results["bytes"].tokens == n_bytes  # one token per byte
    assert results["bpe"].tokens < results["bytes"].tokens / 2
    assert results["bytes"].bits_per_byte == pytest.approx(math.log2(257), rel=1e-5)


def test_set_score_definitions() -> None:
    s = SetScore(nll=100.0, tokens=50, bytes=200)
    assert s.perplexity == pytest.approx(math.exp(2.0))
    assert s.bits_per_byte == pytest.approx(100 / (200 * math.log(2)))


# ---------------------------------------------------------------- adapters and drift


def make_adapter(model_dir: Path, out: Path, seed: int = 1) -> Path:
    """A LoRA adapter with random (non-zero) weights, saved the way training saves one."""
    import shutil

    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    peft_model = get_peft_model(
        load_model(model_dir),
        LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM"),
    )
    peft_model.save_pretrained(str(out))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(model_dir / name, out / name)
    return out


def test_adapter_disabled_base_equals_the_separately_loaded_base(tiny_model_dir: Path, tmp_path: Path) -> None:
    adapter = make_adapter(tiny_model_dir, tmp_path / "adapter")
    pair = load_pair(str(tiny_model_dir), adapter, TrainingConfig(method="lora"), "fp32", "cpu")
    assert pair.description.base_scored_as.startswith("the adapted model with its adapter disabled")
    docs = pair.cpt_tokenizer.encode(texts(3))
    (disabled, adapted), drift = score([pair.base_runner, pair.cpt_runner], docs, 48, 16, 4, drift=True)
    (separate,), _ = score([fixed(load_model(tiny_model_dir))], docs, 48, 16, 4)
    assert disabled.tokens == separate.tokens
    assert disabled.nll == pytest.approx(separate.nll, rel=1e-6)
    assert adapted.nll != pytest.approx(separate.nll, rel=1e-3)  # the adapter does change the model
    assert drift is not None and drift.kl > 0 and drift.agree < drift.positions


def test_the_lm_head_runs_outside_the_adapter_switch_only_where_it_has_no_adapter(tiny_model_dir: Path) -> None:
    """Scoring looks a plain LM head up once and calls it without entering the adapter-disabled runner
    again (each entry costs peft a walk over every layer); a head with an adapter of its own runs inside
    the switch, so the base's scores are still the base's."""
    import torch
    from peft import LoraConfig, get_peft_model

    from cptkit.scoring import head_of, run_scored_outputs

    def counted(runner: Any, entries: list[int]) -> Any:
        def run() -> Any:
            entries.append(1)
            return runner()

        return run

    docs = tokenizer_of(tiny_model_dir).encode(texts(3))
    (separate,), _ = score([fixed(load_model(tiny_model_dir))], docs, 32, 16, 4)
    for targets, plain in (("all-linear", True), (["q_proj", "lm_head"], False)):
        torch.manual_seed(0)
        config = LoraConfig(r=4, target_modules=targets, init_lora_weights=False)
        model = get_peft_model(load_model(tiny_model_dir), config).eval()
        entries: list[int] = []
        head = head_of(counted(adapter_disabled(model), entries))
        ids = torch.from_numpy(docs[0][None, :10])
        out = run_scored_outputs(adapter_disabled(model), ids, torch.ones_like(ids, dtype=torch.bool))
        assert out[0] == ("hidden" if plain else "logits")
        before = len(entries)
        for _ in range(3):
            head(out, slice(None))
        assert (len(entries) == before) is plain, targets
        (disabled,), _ = score([adapter_disabled(model)], docs, 32, 16, 4)
        assert disabled.nll == pytest.approx(separate.nll, rel=1e-6), targets


def test_drift_is_zero_for_identical_models(tiny_model_dir: Path, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    model = load_model(tiny_model_dir)
    docs = tokenizer_of(tiny_model_dir).encode(texts(3))
    _, drift = score([fixed(model), fixed(model)], docs, 32, 16, 4, drift=True)
    assert drift is not None and drift.positions == sum(len(d) - 1 for d in docs)
    assert drift.result().kl == pytest.approx(0.0, abs=1e-9)
    assert drift.result().top1_agreement == 1.0
    # A freshly initialized adapter (B = 0) changes nothing either.
    fresh = get_peft_model(load_model(tiny_model_dir), LoraConfig(r=4, target_modules="all-linear")).eval()
    _, drift = score([adapter_disabled(fresh), fixed(fresh)], docs, 32, 16, 4, drift=True)
    assert drift is not None
    assert drift.result().kl == pytest.approx(0.0, abs=1e-9) and drift.result().top1_agreement == 1.0


def test_bf16_scores_the_same_without_the_adapters_input_casts(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under autocast, peft's casts of a LoRA layer's input to float32 are undone by autocast at once;
    scoring turns them off for speed, which changes no value, and turns them back on after."""
    import contextlib

    import cptkit.scoring as scoring_module

    pair = load_pair(
        str(tiny_model_dir), make_adapter(tiny_model_dir, tmp_path / "adapter"), TrainingConfig(), "bf16", "cpu"
    )
    docs = pair.cpt_tokenizer.encode(texts(3))
    runners = [pair.base_runner, pair.cpt_runner]
    casts_off, drift_off = score(runners, docs, 48, 16, 4, bf16=True, drift=True)
    flags = [m.cast_input_dtype_enabled for m in pair.cpt_model.modules() if hasattr(m, "cast_input_dtype_enabled")]
    assert flags and all(flags)  # restored
    monkeypatch.setattr(scoring_module, "_adapter_input_casts_off", lambda *a: contextlib.nullcontext())
    casts_on, drift_on = score(runners, docs, 48, 16, 4, bf16=True, drift=True)
    assert [s.nll for s in casts_off] == [s.nll for s in casts_on]
    assert drift_off is not None and drift_on is not None and drift_off.kl == drift_on.kl


# ---------------------------------------------------------------- the stage and the CLI


def trained_run(tmp_path: Path, model_dir: Path, training: dict[str, Any] | None = None, **evaluate: Any) -> Path:
    """A tiny prepared domain + replay corpus, a run trained on it (LoRA unless `training` says otherwise),
    and a config that evaluates it (with the news set as a further held-out set)."""
    from cptkit.config import load_config
    from cptkit.train import train

    write_jsonl(tmp_path / "news.jsonl", [{"text": make_doc(2000 + i)} for i in range(4)])
    training = {
        "method": "lora",
        "learning_rate": 2e-3,
        "max_steps": 6,
        "max_seq_length": 64,
        "micro_batch_size": 4,
        "eval_steps": 3,
        "warmup_steps": 1,
        "precision": "fp32",
        "eval_max_sequences": 4,
        **(training or {}),
    }
    cfg_path = prepared_run(
        tmp_path,
        model_dir,
        training,
        domain_docs=50,
        general_texts=[make_doc(1000 + i) for i in range(30)],
        evaluate={
            "context_length": 48,
            "stride": 16,
            "sets": {"news": {"type": "jsonl", "path": "news.jsonl"}},
            "generation": {"max_new_tokens": 6, "domain_prompts": ["Document number 3 describes"]},
            "precision": "fp32",  # the exact comparisons below are in fp32 (auto is bf16 where it is fast)
            **evaluate,
        },
    )
    train(load_config(cfg_path))
    return cfg_path


def one_line_error(result: Any, exit_code: int = 1) -> str:
    """The one error message (rich wraps long lines at 80 columns when the output is not a terminal)."""
    assert result.exit_code == exit_code, result.output
    assert "Traceback" not in result.output, result.output
    assert result.output.count("error:") == 1, result.output
    return " ".join(result.output.split())


def test_evaluate_writes_results_report_and_logs_to_the_training_run(
    tmp_path: Path, tiny_model_dir: Path, cli: Any
) -> None:
    cfg = trained_run(tmp_path, tiny_model_dir, min_adaptation=0.0, max_forgetting=10.0, max_drift_kl=100.0)
    result = cli("evaluate", "-c", str(cfg), "--output", "eval.json")
    assert result.exit_code == 0, result.output
    out = Path("outputs/cpt_model/evaluation")
    results = json.loads((out / "results.json").read_text())
    assert json.loads(Path("eval.json").read_text()) == results
    assert set(results["base"]) == set(results["cpt"]) == {"domain", "general", "news"}
    for model in ("base", "cpt"):
        for s in results[model].values():
            assert {"perplexity", "bits_per_byte", "tokens", "bytes"} <= set(s)
            assert s["perplexity"] == pytest.approx(math.exp(s["nll"] / s["tokens"]))
    domain_val = [json.loads(line)["text"] for line in Path("data/val.jsonl").read_text().splitlines()]
    assert results["cpt"]["domain"]["bytes"] == sum(len(t.encode()) for t in domain_val)
    base_ppl, cpt_ppl = results["base"]["domain"]["perplexity"], results["cpt"]["domain"]["perplexity"]
    assert results["adaptation"] == pytest.approx((base_ppl - cpt_ppl) / base_ppl)
    assert results["adaptation"] > 0  # six steps at a high learning rate do learn the domain
    news = results["forgetting_by_set"]["news"]
    assert news == pytest.approx(results["cpt"]["news"]["perplexity"] / results["base"]["news"]["perplexity"] - 1)
    assert results["forgetting"] == max(results["forgetting_by_set"].values())
    assert results["drift_kl"] == results["drift"]["general"]["kl"] > 0
    assert 0 <= results["top1_agreement"] <= 1
    assert results["verdict"]["passed"] is True
    assert [g["kind"] for g in results["generations"]] == ["domain", "general", "general", "general"]
    assert results["tasks"]["status"] == "not_requested"
    assert results["training"]["steps"] == 6 and results["data"]["domain"]["documents_in"] == 50

    md = (out / "report.md").read_text()
    assert md.splitlines()[2].startswith("**PASSED: domain perplexity -")
    html = (out / "report.html").read_text()
    assert "PASSED" in html and html.count("data:image/png;base64,") == 2
    assert "Document number 3 describes" in html
    assert "evaluate: PASSED" in result.output and "report.html" in result.output

    from mlflow.tracking import MlflowClient

    summary = json.loads(Path("outputs/cpt_model/training_summary.json").read_text())
    client = MlflowClient(tracking_uri=f"sqlite:///{Path('mlflow.db').resolve()}")
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.metrics["eval/adaptation"] == pytest.approx(results["adaptation"])
    assert run.data.metrics["eval/news/cpt_perplexity"] == pytest.approx(results["cpt"]["news"]["perplexity"])
    assert "train/loss" in run.data.metrics  # the same run as training
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
    assert {"evaluation/results.json", "evaluation/report.html", "evaluation/report.md"} <= logged

    again = cli("evaluate", "-c", str(cfg))
    assert "evaluate: up to date, skipped" in again.output
    stricter = cli("evaluate", "-c", str(cfg), "--set", "evaluate.min_adaptation=0.99")
    assert stricter.exit_code == 0  # a failed verdict is a result, not an error; register enforces it
    assert "evaluate: FAILED" in stricter.output
    failed = json.loads((out / "results.json").read_text())["verdict"]
    assert failed["passed"] is False
    assert [c["passed"] for c in failed["checks"] if c["name"] == "adaptation"] == [False]


def test_evaluate_with_the_seed_flags_and_no_config(tmp_path: Path, tiny_model_dir: Path, cli: Any) -> None:
    trained_run(tmp_path, tiny_model_dir)
    write_jsonl(tmp_path / "mine.jsonl", [{"text": make_doc(3000 + i)} for i in range(3)])
    result = cli(
        "evaluate",
        "--cpt-model",
        "outputs/cpt_model",
        "--domain-data",
        "mine.jsonl",
        "--general-data",
        "news.jsonl",
        "--context-length",
        "32",
        "--stride",
        "32",
        "-o",
        "seed.json",
    )
    assert result.exit_code == 0, result.output
    results = json.loads(Path("seed.json").read_text())
    assert results["base_model"] == str(tiny_model_dir)  # read from the trained folder
    assert results["settings"]["context_length"] == 32 and results["settings"]["stride"] == 32
    assert results["sets"]["domain"]["documents"] == 3
    assert set(results["cpt"]) == {"domain", "general"}


def test_evaluate_reports_missing_benchmarks_plainly(
    tmp_path: Path, tiny_model_dir: Path, cli: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.util

    cfg = trained_run(tmp_path, tiny_model_dir)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    result = cli("evaluate", "-c", str(cfg), "--tasks", "arc_easy,hellaswag")
    assert result.exit_code == 0, result.output
    tasks = json.loads(Path("outputs/cpt_model/evaluation/results.json").read_text())["tasks"]
    assert tasks == {
        "status": "not_run",
        "tasks": ["arc_easy", "hellaswag"],
        "reason": "lm-evaluation-harness is not installed (pip install lm-eval)",
    }
    assert (
        "were NOT run: lm-evaluation-harness is not installed"
        in Path("outputs/cpt_model/evaluation/report.md").read_text()
    )
    assert "benchmarks not run" in result.output


def test_cli_errors_are_one_line(tmp_path: Path, tiny_model_dir: Path, cli: Any) -> None:
    write_jsonl(tmp_path / "d.jsonl", [{"text": make_doc(1)}])
    line = one_line_error(
        cli("evaluate", "--base-model", str(tiny_model_dir), "--cpt-model", "nowhere", "--domain-data", "d.jsonl")
    )
    assert line.startswith("error: nowhere: no such folder")
    line = one_line_error(cli("evaluate", "--base-model", str(tiny_model_dir), "--domain-data", "missing.jsonl"))
    assert line == "error: missing.jsonl: no such file or folder"
    line = one_line_error(cli("evaluate", "--domain-data", "d.jsonl", "--context-length", "8", "--stride", "9"), 2)
    assert line == "config error: evaluate: Value error, stride 9 exceeds context_length 8"
    Path("outputs/cpt_model").mkdir(parents=True)
    line = one_line_error(cli("evaluate", "--base-model", str(tiny_model_dir)))
    assert line.startswith("error: no domain evaluation set")
    line = one_line_error(cli("evaluate", "--base-model", str(tiny_model_dir), "--domain-data", "d.jsonl"))
    assert line.startswith("error: outputs/cpt_model: no trained model there")
    line = one_line_error(cli("evaluate", "--domain-data", "d.jsonl", "--set", "evaluate.task_include_path=my_tasks"))
    assert line == "error: evaluate.task_include_path: my_tasks: no such folder"
    assert not Path("mlflow.db").exists()  # a failed evaluation creates no MLflow run


def test_precision_auto_follows_the_measured_cpu_and_a_token_cap_limits_each_set(
    tmp_path: Path, tiny_model_dir: Path, cli: Any
) -> None:
    from cptkit.capability import probe
    from cptkit.choices import choose_eval_precision

    cfg = trained_run(tmp_path, tiny_model_dir, precision="auto", max_tokens=150, generation={"max_new_tokens": 0})
    result = cli("evaluate", "-c", str(cfg))
    assert result.exit_code == 0, result.output
    results = json.loads(Path("outputs/cpt_model/evaluation/results.json").read_text())
    expected = choose_eval_precision(probe("cpu"), "auto")
    assert results["settings"]["precision"] == expected.value
    assert results["settings"]["precision_reason"] == expected.reason
    assert f"evaluate: precision {expected.value}: " in " ".join(result.output.split())
    assert results["settings"]["max_tokens"] == 150
    for name in ("domain", "general", "news"):  # each set holds far more than 150 tokens
        assert results["sets"][name]["capped_at_tokens"] == 150
        assert results["cpt"][name]["tokens"] == results["base"][name]["tokens"] == 150
    assert (
        "Sets capped at 150 tokens: domain, general, news."
        in Path("outputs/cpt_model/evaluation/report.md").read_text()
    )


def test_a_token_cap_is_shared_evenly_among_the_documents(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    from cptkit.eval_sets import EvalSet, cap_tokens

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    long = " ".join(make_doc(i) for i in range(6))  # one long document, then three short ones
    texts = [long, make_doc(10), make_doc(11)[:100], make_doc(12)]
    # Decontamination's counts (made before the cut) stay with the set: the report and results.json give them.
    whole = EvalSet("s", texts, sum(len(t.encode()) for t in texts), 0, {}, contaminated=1, any_overlap=2)
    assert cap_tokens(whole, tokenizer, sum(map(count, texts))) == (whole, False)  # fits: unchanged
    short = count(texts[2])
    cap = short + 3 * 40 + 1  # the short one whole, 40 or 41 tokens of each other one
    cut, was_cut = cap_tokens(whole, tokenizer, cap)
    assert was_cut and len(cut.texts) == 4 and cut.texts[2] == texts[2]
    assert [count(t) for t in cut.texts] == [41, 40, short, 40]
    assert all(original.startswith(kept) for original, kept in zip(texts, cut.texts, strict=True))
    assert cut.bytes == sum(len(t.encode()) for t in cut.texts)
    assert (cut.contaminated, cut.any_overlap) == (1, 2)
    one, _ = cap_tokens(whole, tokenizer, 2)  # fewer tokens than documents: the first ones get one each
    assert [count(t) for t in one.texts] == [1, 1]
    # With a floor (the scoring window), many short shares become fewer documents of that many tokens.
    floored, _ = cap_tokens(whole, tokenizer, 100, min_share=60)
    assert [count(t) for t in floored.texts] == [60, 40]


def test_completion_keeps_the_space_a_sentencepiece_decoder_drops() -> None:
    from cptkit.model_pair import _completion

    pieces = {1: "▁The", 2: "▁capital", 3: "▁is", 4: "▁Paris", 5: "."}

    class Metaspace:  # decodes like Llama's tokenizer: "▁" is a space, a sequence's leading space is dropped
        def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
            return "".join(pieces[int(i)] for i in ids).replace("▁", " ").lstrip(" ")

    tok = Metaspace()
    assert tok.decode([4, 5]) == "Paris."  # what decoding the new tokens alone gives
    assert _completion(tok, [1, 2, 3], [1, 2, 3, 4, 5]) == " Paris."


# ---------------------------------------------------------------- the base, for every way of training


def val_texts(path: str = "data/val.jsonl") -> list[str]:
    return [json.loads(line)["text"] for line in Path(path).read_text().splitlines()]


def separate_base_score(model: Any, model_dir: Path, results: dict[str, Any], bf16: bool = False) -> SetScore:
    """The domain set scored by `model` alone, with the evaluation's windows and batches."""
    s = results["settings"]
    docs = tokenizer_of(model_dir).encode(val_texts())
    (result,), _ = score([fixed(model)], docs, s["context_length"], s["stride"], s["batch_size"], bf16=bf16)
    return result


@pytest.mark.parametrize(
    ("training", "scored_as"),
    [
        ({"method": "qlora"}, "the adapted model with its adapter disabled"),
        ({"method": "full", "learning_rate": 5e-4}, "a separately loaded copy"),
        ({"method": "lora", "embeddings": "train", "embedding_learning_rate": 2e-2}, "a separately loaded copy"),
    ],
    ids=["qlora", "full", "lora-trained-embeddings"],
)
def test_the_base_scores_like_the_base_loaded_on_its_own(
    tmp_path: Path, tiny_model_dir: Path, cli: Any, training: dict[str, Any], scored_as: str
) -> None:
    """Whatever training changed, the base side of the evaluation is the untouched base: the adapter
    switched off (QLoRA, on the same 4-bit weights), or the base loaded again (a full fine-tune; an
    adapter with trained embeddings, which switching the adapter off does not undo)."""
    import torch

    from cptkit.models import load_base

    cfg = trained_run(
        tmp_path, tiny_model_dir, training | {"max_steps": 4}, generation={"max_new_tokens": 0}, min_adaptation=None
    )
    result = cli("evaluate", "-c", str(cfg))
    assert result.exit_code == 0, result.output
    results = json.loads(Path("outputs/cpt_model/evaluation/results.json").read_text())
    assert results["method"] == training["method"] and results["base_scored_as"] == scored_as
    evaluated_base, adapted = results["base"]["domain"], results["cpt"]["domain"]
    plain_base = separate_base_score(load_model(tiny_model_dir), tiny_model_dir, results)  # float32, as saved
    assert evaluated_base["tokens"] == adapted["tokens"] == plain_base.tokens
    assert adapted["nll"] != pytest.approx(evaluated_base["nll"], rel=1e-4)  # training changed the model

    if training["method"] == "qlora":
        assert results["quantization"] == "4-bit NF4 base, as trained"
        # The same 4-bit NF4 weights (quantizing the same checkpoint is deterministic) through the same
        # kernels on the same batches: peft's disabled LoRA layer calls only its base layer. The sums were
        # equal to the bit here; 1e-6 relative only allows for threaded kernels that reduce in another
        # order, and is 100x below what 4-bit quantization changes (1.0e-4 relative on this tiny model,
        # whose small weights quantize well), so the check does tell a 4-bit base from a float32 one.
        four_bit = load_base(
            tiny_model_dir, TrainingConfig(method="qlora", precision="fp32"), torch.device("cpu"), False
        )
        separate = separate_base_score(four_bit.eval(), tiny_model_dir, results)
        assert evaluated_base["nll"] == pytest.approx(separate.nll, rel=1e-6)
        assert plain_base.nll != pytest.approx(separate.nll, rel=2e-5)
        return

    # float32 weights, loaded the same way, the same batches: equal to the bit here (1e-6: see above).
    assert evaluated_base["nll"] == pytest.approx(plain_base.nll, rel=1e-6)
    assert results["base"]["general"]["tokens"] == results["cpt"]["general"]["tokens"]

    if training.get("embeddings") == "train":
        pair = load_pair(str(tiny_model_dir), Path("outputs/cpt_model"), TrainingConfig(), "fp32", "cpu")
        # Why the base is loaded again: with the adapter off, the trained embeddings are still in place.
        with pair.cpt_model.disable_adapter():
            disabled = separate_base_score(pair.cpt_model, tiny_model_dir, results)
        assert disabled.nll != pytest.approx(plain_base.nll, rel=1e-4)
        # In bf16 the base is held like the adapted model's base (16-bit frozen weights), so that the two
        # differ by what training changed and not by precision.
        pair = load_pair(str(tiny_model_dir), Path("outputs/cpt_model"), TrainingConfig(), "bf16", "cpu")
        with pair.base_runner() as base:
            assert base.get_input_embeddings().weight.dtype == torch.bfloat16
            evaluated = separate_base_score(base, tiny_model_dir, results, bf16=True)
        from transformers import AutoModelForCausalLM

        bf16_base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).eval()
        expected = separate_base_score(bf16_base, tiny_model_dir, results, bf16=True)
        assert evaluated.nll == pytest.approx(expected.nll, rel=1e-6)


# ---------------------------------------------------------------- lm-evaluation-harness tasks

QA_TASK = "cptkit_domain_qa"


def domain_qa(folder: Path, n: int = 40) -> list[dict[str, Any]]:
    """A user's domain multiple-choice task, as lm-evaluation-harness reads one: a JSONL file and a task
    YAML in a folder. Each question is a sentence of a domain document without its last word; the choices
    are the last words of four of the sentence endings the documents use, one of them the right one."""
    from conftest import _TAILS

    endings = sorted({t.split()[-1] for t in _TAILS})
    rows = []
    for i in range(n):
        sentences = " ".join(make_doc(i).split("\n\n")[1:]).split(". ")  # the ten generated sentences
        sentence = sentences[i % 10].rstrip(".")
        question, answer = sentence.rsplit(" ", 1)
        others = [e for e in endings if e != answer]
        choices = sorted([answer, *others[i % 7 : i % 7 + 3]])
        rows.append({"question": question, "choices": choices, "answer": choices.index(answer)})
    data = write_jsonl(folder / "qa.jsonl", rows)
    (folder / f"{QA_TASK}.yaml").write_text(
        f"task: {QA_TASK}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data.resolve()))}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "metadata:\n  version: 1.0\n",
        encoding="utf-8",
    )
    return rows


def reference_accuracy(model: Any, tokenizer: Any, rows: list[dict[str, Any]]) -> tuple[float, list[int]]:
    """Multiple choice scored by hand: the choice (after a space) with the highest summed log-probability
    given the question, the question and choice tokenized together and split where the question ends."""
    predictions = []
    for row in rows:
        context = tokenizer.encode(row["question"])
        scores = []
        for choice in row["choices"]:
            whole = tokenizer.encode(row["question"] + " " + choice)
            assert whole[: len(context)] == context
            scores.append(-reference_nll_of(model, whole, len(context)))
        predictions.append(int(np.argmax(scores)))
    correct = [p == row["answer"] for p, row in zip(predictions, rows, strict=True)]
    return sum(correct) / len(rows), predictions


def reference_nll_of(model: Any, ids: list[int], start: int) -> float:
    """-log P(ids[start:] | ids[:start]) in one plain forward pass."""
    import torch

    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids[:-1]])).logits[0].float()
    logprobs = torch.log_softmax(logits, -1)[start - 1 :]
    return -float(logprobs.gather(-1, torch.tensor(ids[start:])[:, None]).sum())


def test_custom_and_unavailable_benchmarks_offline(tmp_path: Path, tiny_model_dir: Path) -> None:
    """The real harness, through the real CLI, offline: a user's multiple-choice task from a local folder
    runs on both models with the accuracies a hand computation gives, and a hub task that cannot be had
    offline is reported as not run without stopping it."""
    import os
    import subprocess
    import sys

    from peft import PeftModel
    from transformers import AutoTokenizer

    rows = domain_qa(tmp_path / "my_tasks")
    cfg = trained_run(
        tmp_path,
        tiny_model_dir,
        generation={"max_new_tokens": 0},
        task_include_path="my_tasks",
        min_adaptation=None,
    )
    env = os.environ | {
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf"),  # an empty hub cache: nothing downloaded before can help
    }
    result = subprocess.run(
        [sys.executable, "-m", "cptkit", "evaluate", "-c", str(cfg), "--tasks", f"{QA_TASK},arc_easy"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    tasks = json.loads(Path("outputs/cpt_model/evaluation/results.json").read_text())["tasks"]
    assert tasks["status"] == "partial" and tasks["tasks"] == [QA_TASK, "arc_easy"]
    assert set(tasks["not_run"]) == {"arc_easy"}
    assert "offline" in tasks["not_run"]["arc_easy"].lower() or "reach" in tasks["not_run"]["arc_easy"]

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    base = load_model(tiny_model_dir)
    base_acc, base_pred = reference_accuracy(base, tokenizer, rows)
    adapted = PeftModel.from_pretrained(load_model(tiny_model_dir), "outputs/cpt_model").eval()
    cpt_acc, cpt_pred = reference_accuracy(adapted, tokenizer, rows)
    assert base_pred != cpt_pred  # the task tells the two models apart (here: 0.25 vs 0.275)
    assert tasks["results"] == {QA_TASK: {"acc": {"base": base_acc, "cpt": cpt_acc}}}

    md = Path("outputs/cpt_model/evaluation/report.md").read_text()
    assert f"| {QA_TASK} | acc | {base_acc:.4f} | {cpt_acc:.4f} | {cpt_acc - base_acc:+.4f} |" in md
    assert "lm-evaluation-harness tasks arc_easy were NOT run: arc_easy: " in md
    assert "arc_easy were NOT run" in Path("outputs/cpt_model/evaluation/report.html").read_text()


def test_a_changed_custom_task_means_a_rerun(tmp_path: Path) -> None:
    from cptkit.config import JsonlSourceConfig
    from cptkit.evaluate import _input_fingerprint

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "adapter_config.json").write_text("{}")
    sources = {"domain": JsonlSourceConfig(type="jsonl", path=write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}]))}
    rows = domain_qa(tmp_path / "my_tasks", n=3)
    before = _input_fingerprint(tmp_path / "model", sources, tmp_path / "my_tasks")
    assert _input_fingerprint(tmp_path / "model", sources, tmp_path / "my_tasks") == before
    write_jsonl(tmp_path / "my_tasks" / "qa.jsonl", rows[:2])
    assert _input_fingerprint(tmp_path / "model", sources, tmp_path / "my_tasks") != before
    assert _input_fingerprint(tmp_path / "model", sources) == _input_fingerprint(tmp_path / "model", sources, None)


def test_the_base_completions_are_cached_for_the_next_adapter(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a base identity, the base's completions of the fixed prompts are generated once: the next
    adapter's evaluation generates only its own, and both models' completions equal those without the
    cache; other decoding settings are another entry."""
    from conftest import count_calls
    from cptkit.config import GenerationConfig
    from cptkit.model_pair import generate

    gc = GenerationConfig(domain_prompts=["The model"], general_prompts=["A day"], max_new_tokens=6)

    def pair_of(adapter: Path) -> Any:
        pair = load_pair(str(tiny_model_dir), adapter, TrainingConfig(method="lora"), "fp32", "cpu")
        counted = count_calls(monkeypatch, pair.cpt_model, "generate")  # the one model behind both runners
        return pair, counted

    first, _ = pair_of(make_adapter(tiny_model_dir, tmp_path / "first"))
    identity = first.base_identity("fp32", "cpu")
    generate(first, gc, "cpu", identity)  # generated and cached
    other, counted = pair_of(make_adapter(tiny_model_dir, tmp_path / "other", seed=2))
    cached = generate(other, gc, "cpu", identity)
    assert len(counted) == 2  # the adapted model's two completions; the base's came from the cache
    counted.clear()
    fresh = generate(other, gc, "cpu")
    assert len(counted) == 4 and cached == fresh
    assert any(g.base != g.cpt for g in fresh)  # the adapter does change what is generated
    counted.clear()
    generate(other, gc.model_copy(update={"max_new_tokens": 4}), "cpu", identity)
    assert len(counted) == 4
