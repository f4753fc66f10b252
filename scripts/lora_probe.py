"""Per-document LoRA TTT on the GPU without a trained artifact: its speed, where the time goes, and its C1 check.

    source .bench/prep.sh && python3 scripts/lora_probe.py [--docs 256] [--profile | --ops] [SETTING=VALUE ...]

Builds the recipe's model (seeded random weights, nudged off the zero inits so every layer matters; speed and
causality do not depend on what the weights learned), scores the first --docs documents of $BENCH_DATA8's val
shard with eval/lora.py's score_documents under the LORA_ settings given, and prints tokens/s, the 8-GPU projection
of the full FineWeb val, and C1 as evaluate_lora checks it (with its detail). --profile prints the top CUDA ops.
--repeat N times the pass N times in one process (the first pays what a process pays once).
--ops prints instead the aten ops dispatched per adapter step (on the CPU too: the count does not depend on the
device, up to the casts autocast adds on a GPU), the host work that bounds an eager pass.
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from eval.lora import LoraConfig, score_documents, verify_documents
from eval.run import EVAL_GPUS, FULL_VAL_TOKENS
from submission.config import ModelConfig, parse_overrides, resolve
from submission.data import load_tokens
from submission.model import GPT
from submission.runtime import configure_cuda


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def dispatch_per_step(model, tokens: torch.Tensor, settings: dict) -> str:
    """The aten ops (nested ones included) that one pass over `tokens` dispatches, per adapter step: each costs host
    time whatever the GPU does, so this bounds how fast an eager pass can go on any host."""
    import eval.lora as lora
    from torch.profiler import ProfilerActivity, profile
    steps, step = [], lora._chunk_step
    lora._chunk_step = lambda *a, **kw: steps.append(1) or step(*a, **kw)  # score_documents looks it up by name
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            score_documents(model, tokens, 1, tokens.numel(), **settings)
    finally:
        lora._chunk_step = step
    ops = sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))
    return f"steps {len(steps)} aten_ops {ops} per_step {ops / max(len(steps), 1):.0f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("settings", nargs="*", help="LORA_<FIELD>=VALUE settings")
    p.add_argument("--docs", type=int, default=256, help="leading val documents to score")
    p.add_argument("--profile", action="store_true", help="print the top CUDA ops of a second, profiled pass")
    p.add_argument("--ops", action="store_true", help="count instead the aten ops the pass dispatches per adapter "
                                                       "step (host work: the pass runs eagerly); runs on the CPU too")
    p.add_argument("--no-verify", action="store_true", help="skip the C1-C4 check after the timed pass")
    p.add_argument("--repeat", type=int, default=1, metavar="N",
                   help="time the pass N times in this process: what the first pays once (kernel plans per new "
                        "shape, autotuning) shows as its excess over the later ones")
    p.add_argument("--data", default=os.environ.get("BENCH_DATA8", ""), help="shard folder (default $BENCH_DATA8)")
    args = p.parse_args()
    cfg = LoraConfig()
    for line in resolve(cfg, env={}, cli=parse_overrides(args.settings)):
        print("setting", line)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        configure_cuda()
    torch.manual_seed(0)
    model = GPT(ModelConfig()).to(device)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.02 * torch.randn_like(param))
    model.eval()
    tokens = torch.as_tensor(load_tokens(f"{args.data}/fineweb_val_*.bin", model.cfg.vocab_size), dtype=torch.long)
    starts = (tokens == model.cfg.bos_id).nonzero().flatten().tolist()
    end = starts[args.docs] + 1 if len(starts) > args.docs else tokens.numel()
    tokens = tokens[:end].to(device)
    settings = {**cfg.pass_settings(), "ngram": None}
    if args.ops:
        print(dispatch_per_step(model, tokens, settings))
        return
    warm = min(tokens.numel(), 1025)
    score_documents(model, tokens[:warm], 1, warm, **settings)  # warm-up: kernels, autotuning
    n = tokens.numel() - 1
    for run in range(1, max(args.repeat, 1) + 1):
        sync(device)
        start = time.perf_counter()
        result = score_documents(model, tokens, 1, tokens.numel(), **settings)
        sync(device)
        seconds = time.perf_counter() - start
        projected = seconds * FULL_VAL_TOKENS[model.cfg.vocab_size] / EVAL_GPUS / n
        nll = result.nll["model"]
        print(f"docs {args.docs} targets {n} seconds {seconds:.2f} tokens/s {n / seconds:,.0f} "
              f"projection_8gpu_s {projected:.1f} mean_nll {nll.mean().item():.4f} "
              f"peak_gib {torch.cuda.max_memory_allocated() / 2**30 if device.type == 'cuda' else 0:.1f}"
              + (f" pass {run}" if args.repeat > 1 else ""))
    if args.profile:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            score_documents(model, tokens[:min(n, 60_000) + 1], 1, min(n, 60_000) + 1, **settings)
            sync(device)
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))
    if args.no_verify:
        return
    start = time.perf_counter()
    compliance = verify_documents(model, tokens, result, settings, cfg.compliance_tokens, 1, lambda *a, **kv: None)
    print(f"compliance seconds {time.perf_counter() - start:.1f}")
    for name, verdict in compliance.items():
        print(name, "pass" if verdict["passed"] else "FAIL", "-", verdict["detail"])


if __name__ == "__main__":
    main()
