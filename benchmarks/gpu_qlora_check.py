"""GPU check of the train stage: QLoRA of a Phi-3-mini-sized model (3.8B parameters, random weights
from Phi-3-mini-4k's config) at sequence length 2048. Reports peak GPU memory (the seed README claims
about 8 GB), tokens/s and MFU, and checks on the GPU that packed documents stay isolated (a packed
block gives each document the loss it gets alone), under whichever attention cptkit picks there
(flash-attention varlen where flash-attn is installed, else SDPA with a block-diagonal mask).

It runs cptkit's own code: models.load_for_training, loss.CausalLMLoss, and the same optimizer and
autocast as `cptkit train`. Data is random tokens: speed and memory do not depend on the text.

    python benchmarks/gpu_qlora_check.py --out gpu_check.json            # on a CUDA machine
    python benchmarks/gpu_qlora_check.py --tiny --device cpu --steps 2   # a smoke run of the script
"""

from __future__ import annotations

import argparse
import itertools
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from cptkit.config import TrainingConfig
from cptkit.known_models import PHI3_MINI_4K
from cptkit.loss import CausalLMLoss
from cptkit.models import load_for_training

# microsoft/Phi-3-mini-4k-instruct's config.json (the seed's base model, as cptkit knows it), built with
# transformers' own Phi3 class (no remote code). Its sliding window (2047) is left out: the check
# attends over the whole 2048-token block, as its measurements in docs/benchmarks.md did.
PHI3_MINI = {k: v for k, v in PHI3_MINI_4K.items() if k not in ("architectures", "model_type", "sliding_window")}
TINY = {**PHI3_MINI, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4}
TINY["num_key_value_heads"] = 4
# Dense bf16 tensor-core peaks (no sparsity), for MFU.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "L4": 121e12}


def build_model(folder: Path, sizes: dict[str, Any], device: torch.device) -> int:
    """Save a randomly initialized Phi-3 in bf16 to `folder`; returns its parameter count."""
    from transformers import AutoModelForCausalLM, Phi3Config

    config = Phi3Config(**sizes)
    torch.manual_seed(0)
    with device:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return n


def packed_block(seq: int, vocab: int, docs: int, generator: torch.Generator) -> tuple[Any, Any, Any, list[int]]:
    """One block of `docs` random documents, positions restarting at each, first tokens unlabelled."""
    cuts = sorted(torch.randperm(seq - 2, generator=generator)[: docs - 1].add(1).tolist())
    bounds = [0, *cuts, seq]
    ids = torch.randint(3, vocab, (1, seq), generator=generator)
    pos = torch.cat([torch.arange(b - a) for a, b in itertools.pairwise(bounds)])[None]
    labels = ids.clone()
    labels[0, bounds[:-1]] = -100
    return ids, pos, labels, bounds


def isolation_error(model: CausalLMLoss, seq: int, vocab: int, device: torch.device) -> dict[str, float]:
    """Largest relative difference between a document's loss inside a packed block and alone."""
    g = torch.Generator().manual_seed(1)
    ids, pos, labels, bounds = packed_block(seq, vocab, 4, g)
    worst = 0.0
    model.eval()
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        for a, b in itertools.pairwise(bounds):
            # Score document [a, b) inside the block (its labels only) and alone.
            only = torch.full_like(labels, -100)
            only[0, a + 1 : b] = labels[0, a + 1 : b]
            packed, n = model(ids.to(device), pos.to(device), only.to(device))
            alone, m = model(ids[:, a:b].to(device), pos[:, a:b].to(device), labels[:, a:b].to(device))
            assert int(n) == int(m)
            worst = max(worst, abs(float(packed) - float(alone)) / max(abs(float(alone)), 1e-9))
    model.train()
    return {"max_relative_difference": worst}


def train_steps(
    model: CausalLMLoss, optimizer: Any, steps: int, seq: int, batch: int, vocab: int, device: torch.device
) -> dict[str, float]:
    g = torch.Generator().manual_seed(0)
    blocks = [[packed_block(seq, vocab, 3, g)[:3] for _ in range(batch)] for _ in range(steps + 1)]
    times: list[float] = []
    for step, rows in enumerate(blocks):
        ids, pos, labels = (torch.cat(col).to(device) for col in zip(*rows, strict=True))
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            total, count = model(ids, pos, labels)
        (total / count).backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step > 0:  # the first step warms up kernels and the allocator
            times.append(time.perf_counter() - started)
    seconds = sum(times)
    return {"steps_timed": len(times), "seconds": seconds, "tokens_per_second": len(times) * batch * seq / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model of the same shape family")
    parser.add_argument("--no-checkpointing", action="store_true", help="also measure without it")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    device = torch.device(args.device)
    sizes = TINY if args.tiny else PHI3_MINI
    result: dict[str, Any] = {"torch": torch.__version__, "seq": args.seq, "micro_batch": args.batch}
    if device.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name(device)
    import transformers

    result["transformers"] = transformers.__version__
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        n_params = build_model(Path(tmp), sizes, device)
        result["parameters"] = n_params
        result["build_seconds"] = round(time.perf_counter() - started, 1)
        for checkpointing in [True] + ([False] if args.no_checkpointing else []):
            training = TrainingConfig.model_validate(
                {
                    "method": "qlora",
                    "max_seq_length": args.seq,
                    "micro_batch_size": args.batch,
                    "gradient_checkpointing": checkpointing,
                    "precision": "bf16",
                }
            )
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            started = time.perf_counter()
            loaded = load_for_training(Path(tmp), training, device)
            load_seconds = time.perf_counter() - started
            inner: Any = loaded.model
            model = CausalLMLoss(loaded.model)
            optimizer = torch.optim.AdamW(loaded.param_groups, lr=1e-4)
            run: dict[str, Any] = {
                "gradient_checkpointing": checkpointing,
                "attention": inner.get_base_model().config._attn_implementation,
                "load_seconds": round(load_seconds, 1),
                "trainable_parameters": loaded.description.trainable_params,
                "estimated_memory_bytes": loaded.description.estimated_memory_bytes,
            }
            if device.type == "cuda":
                run["weights_allocated_gib"] = torch.cuda.memory_allocated(device) / 2**30
            run["isolation"] = isolation_error(model, min(args.seq, 512), sizes["vocab_size"], device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            run.update(train_steps(model, optimizer, args.steps, args.seq, args.batch, sizes["vocab_size"], device))
            # Model FLOPs per token: 6N for the matmuls (forward, input and weight gradients, the common
            # MFU convention even though the frozen base needs no weight gradients) plus attention,
            # 6 * layers * seq * hidden (causal half of 12 L s d); recomputation is not counted.
            layers, hidden = sizes["num_hidden_layers"], sizes["hidden_size"]
            flops_per_token = 6 * n_params + 6 * layers * args.seq * hidden
            run["model_tflops_per_second"] = run["tokens_per_second"] * flops_per_token / 1e12
            if device.type == "cuda":
                run["peak_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
                run["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
                peak = next((v for k, v in PEAK_BF16.items() if k in result["gpu"]), None)
                if peak is not None:
                    run["mfu"] = run["tokens_per_second"] * flops_per_token / peak
            result.setdefault("runs", []).append(run)
            print(json.dumps(run, indent=1), flush=True)
            del model, optimizer, loaded, inner
            if device.type == "cuda":
                torch.cuda.empty_cache()
    text = json.dumps(result, indent=1)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
