"""Where an fp32 LoRA training step of `cptkit train` spends its time, and a side-by-side comparison of
two versions of that step.

The step is cptkit's own: SmolLM2-135M (`smollm2-135m`) loaded by cptkit.models.load_for_training
(LoRA r=16 on every linear layer, fp32), packed demo blocks from cptkit.packing.BlockStream,
cptkit.loss.CausalLMLoss (the fused chunked LM-head loss), AdamW; micro batch --batch x 512 tokens, one
torch thread (the other core stays free on a 2-core machine).

    profile   torch.profiler (shapes, memory) over --steps steps after a warm-up step: time by kind
              (frozen-base matmuls, LoRA matmuls, attention, LM-head loss, optimizer, the rest), each
              op's median duration times its count (a median is not moved by the moments another
              process holds the core), and the step's model FLOPs per CPU second against the
              one-thread fp32 matmul rate `cptkit doctor` measures.
    compare   the same steps with the source tree of a git revision (--baseline, default HEAD~1) and
              with this checkout's, alternating for --rounds rounds, each in a fresh process: CPU
              seconds per step (user + system, which other processes on the machine move less than
              wall time), wall seconds, page faults, peak RSS, and the largest relative difference
              between their losses.

Run from the repository root; the demo inputs are built as benchmarks/train_throughput.py builds them:

    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 .venv/bin/python benchmarks/train_step_profile.py profile
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 .venv/bin/python benchmarks/train_step_profile.py compare \\
        --baseline fbe056c
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import resource
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
WORKDIR = REPO / "benchmarks" / "out" / "tt_avx2"  # where train_throughput.py builds the demo inputs
SEQ = 512


def _setup(batch: int) -> tuple[Any, Any, Any, Any]:
    """(loss module, optimizer, block stream, model config) as `cptkit train` builds them."""
    import torch

    sys.path.insert(0, str(REPO / "benchmarks"))
    import train_throughput
    from cptkit.loss import CausalLMLoss
    from cptkit.models import load_for_training, resolve_model
    from cptkit.packing import BlockStream
    from cptkit.train import load_train_data

    os.chdir(WORKDIR)
    train_throughput.build_inputs()
    config = train_throughput.demo_config(
        10, ["training.method=lora", "training.precision=fp32", f"training.micro_batch_size={batch}"]
    )
    tc = config.training
    data = load_train_data(config)
    torch.manual_seed(tc.seed)
    loaded = load_for_training(resolve_model(config.model.name), tc, torch.device("cpu"))
    model = CausalLMLoss(loaded.model).train()
    optimizer = torch.optim.AdamW(loaded.param_groups, lr=tc.learning_rate, weight_decay=tc.weight_decay)
    stream = BlockStream(
        data.domain_train, data.replay_train, config.data.replay_ratio, tc.seed, data.separator, tc.max_seq_length
    )
    return model, optimizer, stream, loaded.model.config


def _step(model: Any, optimizer: Any, stream: Any, index: int, batch: int) -> float:
    """One optimizer step on blocks index*batch.., as train.py takes it; the mean loss."""
    import numpy as np
    import torch

    rows = list(stream.batch(index * batch, batch))
    ids, pos, labels = (torch.from_numpy(np.stack([r[k] for r in rows])) for k in range(3))
    count = int((labels[:, 1:] != -100).sum())
    total, _ = model(ids, pos, labels)
    (total / count).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(total.detach()) / count


def step_flops(config: Any, batch: int, lora_rank: int = 16) -> dict[str, float]:
    """Model FLOPs of one step: frozen linear layers forward and input gradient (4 x params x tokens),
    LoRA forward, input and weight gradients (6 x params x tokens), the LM head forward and input
    gradient, causal attention (scores and values, forward 4 x d x keys, backward 2.5 times that)."""
    tokens = batch * SEQ
    h, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    linears = [(h, h), (h, kv), (h, kv), (h, h), (h, inter), (h, inter), (inter, h)]
    base = layers * sum(i * o for i, o in linears)
    lora = layers * sum(lora_rank * (i + o) for i, o in linears)
    mean_keys = (SEQ + 1) / 2
    attention = layers * tokens * 4 * h * mean_keys * 3.5
    return {
        "frozen base": 4 * base * tokens,
        "LoRA": 6 * lora * tokens,
        "LM head": 4 * h * config.vocab_size * (tokens - batch),
        "attention (causal)": attention,
    }


def _kind(name: str, shapes: str, vocab: int, rank: int) -> str:
    if "scaled_dot_product" in name or "flash_attention" in name:
        return "attention"
    if name in ("aten::mm", "aten::addmm", "aten::bmm"):
        if str(vocab) in shapes:
            return "LM-head loss"
        if f"{rank}]" in shapes or f"[{rank}," in shapes:
            return "LoRA matmuls"
        return "frozen-base matmuls"
    if str(vocab) in shapes:
        return "LM-head loss"
    if name.startswith("Optimizer") or name.startswith("aten::_foreach") or name in ("aten::lerp_", "aten::addcdiv_"):
        return "optimizer"
    return "elementwise, copies, rest"


def profile(batch: int, steps: int) -> None:
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from cptkit.capability import probe

    torch.set_num_threads(1)
    model, optimizer, stream, config = _setup(batch)
    rate = probe("cpu").fp32_gflops  # one thread
    _step(model, optimizer, stream, 0, batch)  # warm-up: allocation and kernel selection
    cpu_before = time.process_time()
    with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=True, profile_memory=True) as prof:
        for i in range(1, steps + 1):
            _step(model, optimizer, stream, i, batch)
    cpu = (time.process_time() - cpu_before) / steps
    durations: dict[tuple[str, str], list[float]] = collections.defaultdict(list)
    for event in prof.events():
        durations[(event.name, str(event.input_shapes))].append(event.self_cpu_time_total / 1e6)
    kinds: collections.Counter[str] = collections.Counter()
    ops: collections.Counter[tuple[str, str, str]] = collections.Counter()
    for (name, shapes), times in durations.items():
        seconds = statistics.median(times) * len(times) / steps
        kind = _kind(name, shapes, config.vocab_size, 16)
        kinds[kind] += seconds
        ops[(kind, name, shapes)] += seconds
    total = sum(kinds.values())
    flops = step_flops(config, batch)
    print(f"micro batch {batch} x {SEQ}, one thread, {steps} profiled steps after a warm-up step")
    print(f"CPU time per step {cpu:.2f} s; profiled ops (median x count) {total:.2f} s per step")
    for kind, seconds in kinds.most_common():
        print(f"  {kind:28s} {seconds:6.2f} s  {seconds / total:6.1%}")
    print("largest ops (median x count per step):")
    for (kind, name, shapes), seconds in ops.most_common(16):
        print(f"  {seconds:6.3f} s  {kind[:20]:20s} {name[:48]:48s} {shapes[:70]}")
    print(f"model FLOPs per step: {', '.join(f'{k} {v / 1e9:.1f} G' for k, v in flops.items())}")
    print(
        f"achieved {sum(flops.values()) / cpu / 1e9:.1f} GFLOP/s per CPU second against {rate:.1f} GFLOP/s "
        f"(one-thread fp32 matmul, cptkit doctor); frozen-base matmuls alone "
        f"{flops['frozen base'] / kinds['frozen-base matmuls'] / 1e9:.1f} GFLOP/s"
    )
    memory = collections.Counter()
    for event in prof.key_averages(group_by_input_shape=True):
        memory[(event.key, str(event.input_shapes)[:70])] += event.self_cpu_memory_usage
    print("largest allocations by op (bytes allocated less freed, per profiled run):")
    for (name, shapes), size in memory.most_common(8):
        print(f"  {size / 2**20:8.0f} MiB  {name[:48]:48s} {shapes}")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB (with the profiler records)")
    saved_activations(model, stream, batch)


def saved_activations(model: Any, stream: Any, batch: int) -> None:
    """What the forward pass keeps for the backward pass (the peak of a step without checkpointing),
    by shape: each tensor storage counted once."""
    import numpy as np
    import torch

    seen = {
        p.untyped_storage().data_ptr() for p in model.parameters()
    }  # weights (and views of them) are not activations
    by_shape: collections.Counter[str] = collections.Counter()

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            by_shape[f"{list(tensor.shape)} {str(tensor.dtype).removeprefix('torch.')}"] += storage.nbytes()
        return tensor

    rows = list(stream.batch(0, batch))
    ids, pos, labels = (torch.from_numpy(np.stack([r[k] for r in rows])) for k in range(3))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        total, _ = model(ids, pos, labels)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    print(
        f"saved for the backward pass: {sum(by_shape.values()) / 2**20:,.0f} MiB (weights {weights / 2**20:,.0f} MiB); "
        "largest by shape:"
    )
    for shape, size in by_shape.most_common(10):
        print(f"  {size / 2**20:8.0f} MiB  {shape}")
    total.backward()


def measure_steps(batch: int, steps: int) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    model, optimizer, stream, _ = _setup(batch)
    rows = []
    for i in range(steps + 1):
        before, started = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        loss = _step(model, optimizer, stream, i, batch)
        wall = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_SELF)
        cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
        rows.append({"loss": loss, "cpu": cpu, "wall": wall, "faults": after.ru_minflt - before.ru_minflt})
    return {"steps": rows, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _export_source(revision: str, into: Path) -> Path:
    archive = subprocess.run(
        ["git", "archive", "--format=tar", revision, "src"], cwd=REPO, capture_output=True, check=True
    ).stdout
    path = into / "archive.tar"
    path.write_bytes(archive)
    with tarfile.open(path) as tar:
        tar.extractall(into, filter="data")
    return into / "src"


def compare(baseline: str, batch: int, steps: int, rounds: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        sources = {f"baseline ({baseline})": _export_source(baseline, Path(tmp)), "this checkout": REPO / "src"}
        results: dict[str, list[dict[str, Any]]] = {name: [] for name in sources}
        for _ in range(rounds):
            for name, src in sources.items():
                env = {**os.environ, "PYTHONPATH": str(src), "HF_HUB_OFFLINE": "1"}
                command = [sys.executable, __file__, "_measure", "--batch", str(batch), "--steps", str(steps)]
                out = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
                results[name].append(json.loads(out.strip().splitlines()[-1]))
    print(f"micro batch {batch} x {SEQ}, one thread, {steps} steps after a warm-up step, {rounds} rounds")
    print(f"load average (1 min) at the end: {os.getloadavg()[0]:.2f}")
    losses = {}
    for name, runs in results.items():
        timed = [s for run in runs for s in run["steps"][1:]]
        cpu = statistics.median(s["cpu"] for s in timed)
        wall = statistics.median(s["wall"] for s in timed)
        faults = statistics.median(s["faults"] for s in timed)
        rss = max(run["peak_rss_mb"] for run in runs)
        losses[name] = [s["loss"] for s in runs[0]["steps"]]
        print(
            f"  {name:24s} CPU {cpu:6.2f} s/step ({batch * SEQ / cpu:5.1f} tokens per CPU second), wall {wall:6.2f} s, "
            f"{faults:8.0f} page faults/step, peak RSS {rss:,.0f} MB"
        )
    (a, b) = losses.values()
    worst = max(abs(x - y) / abs(x) for x, y in zip(a, b, strict=True))
    print(f"  losses {[round(x, 6) for x in b]}; largest relative difference from the baseline {worst:.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["profile", "compare", "_measure"])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--baseline", default="HEAD~1")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    WORKDIR.mkdir(parents=True, exist_ok=True)
    if args.mode == "profile":
        sys.path.insert(0, str(REPO / "src"))  # this checkout's cptkit (compare's workers get PYTHONPATH)
        profile(args.batch, args.steps)
    elif args.mode == "compare":
        compare(args.baseline, args.batch, args.steps, args.rounds)
    else:
        print(json.dumps(measure_steps(args.batch, args.steps)))


if __name__ == "__main__":
    main()
