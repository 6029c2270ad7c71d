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
from cptkit.evaluate import (
    SetScore,
    adapter_disabled,
    fixed,
    load_pair,
    plan_windows,
    score,
    text_tokenizer,
)

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
    from cptkit.config import TrainingConfig

    adapter = make_adapter(tiny_model_dir, tmp_path / "adapter")
    pair = load_pair(str(tiny_model_dir), adapter, TrainingConfig(method="lora"), "fp32", "cpu")
    assert pair.description["base_scored_as"].startswith("the adapted model with its adapter disabled")
    docs = pair.cpt_tokenizer.encode(texts(3))
    (disabled, adapted), drift = score([pair.base_runner, pair.cpt_runner], docs, 48, 16, 4, drift=True)
    (separate,), _ = score([fixed(load_model(tiny_model_dir))], docs, 48, 16, 4)
    assert disabled.tokens == separate.tokens
    assert disabled.nll == pytest.approx(separate.nll, rel=1e-6)
    assert adapted.nll != pytest.approx(separate.nll, rel=1e-3)  # the adapter does change the model
    assert drift is not None and drift.kl > 0 and drift.agree < drift.positions


def test_drift_is_zero_for_identical_models(tiny_model_dir: Path, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    model = load_model(tiny_model_dir)
    docs = tokenizer_of(tiny_model_dir).encode(texts(3))
    _, drift = score([fixed(model), fixed(model)], docs, 32, 16, 4, drift=True)
    assert drift is not None and drift.positions == sum(len(d) - 1 for d in docs)
    assert drift.as_dict()["kl"] == pytest.approx(0.0, abs=1e-9)
    assert drift.as_dict()["top1_agreement"] == 1.0
    # A freshly initialized adapter (B = 0) changes nothing either.
    fresh = get_peft_model(load_model(tiny_model_dir), LoraConfig(r=4, target_modules="all-linear")).eval()
    _, drift = score([adapter_disabled(fresh), fixed(fresh)], docs, 32, 16, 4, drift=True)
    assert drift is not None
    assert drift.as_dict()["kl"] == pytest.approx(0.0, abs=1e-9) and drift.as_dict()["top1_agreement"] == 1.0


# ---------------------------------------------------------------- the stage and the CLI


def trained_run(tmp_path: Path, model_dir: Path, **evaluate: Any) -> Path:
    """A tiny prepared domain + replay corpus, a LoRA run trained on it, and a config that evaluates it
    (with the news set as a further held-out set)."""
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
    assert not Path("mlflow.db").exists()  # a failed evaluation creates no MLflow run


def test_completion_keeps_the_space_a_sentencepiece_decoder_drops() -> None:
    from cptkit.evaluate import _completion

    pieces = {1: "▁The", 2: "▁capital", 3: "▁is", 4: "▁Paris", 5: "."}

    class Metaspace:  # decodes like Llama's tokenizer: "▁" is a space, a sequence's leading space is dropped
        def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
            return "".join(pieces[int(i)] for i in ids).replace("▁", " ").lstrip(" ")

    tok = Metaspace()
    assert tok.decode([4, 5]) == "Paris."  # what decoding the new tokens alone gives
    assert _completion(tok, [1, 2, 3], [1, 2, 3, 4, 5]) == " Paris."
