"""`pgolf bench`: training throughput of the recipe on this GPU (tokens/s, ms/step, MFU) and the per-op top 10."""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from submission.config import ModelConfig, TrainConfig, resolve
from submission.data import TokenLoader
from submission.model import GPT
from submission.optim import build_optimizers
from submission.train import (EMA, H100_BF16_PEAK_FLOPS, configure_cuda, matmul_flops_per_token,
                              setup_distributed, train_step)


def run_bench(model_cfg: ModelConfig, cfg: TrainConfig, steps: int, warmup: int, profile_steps: int,
              top: int = 10) -> dict:
    rank, world_size, device = setup_distributed()
    torch.manual_seed(cfg.seed)
    if device.type == "cuda":
        configure_cuda()
    model = GPT(model_cfg, cfg.qat_bits).to(device)
    step_model = torch.compile(model, dynamic=False) if device.type == "cuda" and cfg.compile else model
    optimizers = build_optimizers(model, cfg)
    grad_accum = max(1, cfg.train_batch_tokens // world_size // cfg.micro_batch_tokens)
    try:
        loader = TokenLoader(f"{cfg.data_dir}/fineweb_train_*.bin", cfg.train_batch_tokens, cfg.seq_len, rank,
                             world_size, grad_accum)
        batches = loader.next_batch
        source = cfg.data_dir
    except FileNotFoundError:
        rng = np.random.default_rng(cfg.seed)
        shape = (cfg.micro_batch_tokens // cfg.seq_len, cfg.seq_len)
        fixed = [(rng.integers(0, model_cfg.vocab_size, shape), rng.integers(0, model_cfg.vocab_size, shape))
                 for _ in range(grad_accum)]
        batches, source = (lambda: fixed), "random tokens"
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    ema = EMA(model, cfg.ema_decay) if cfg.ema_decay else None

    def full_step(step: int) -> torch.Tensor:  # what the training loop does per step
        loss = train_step(model, step_model, optimizers, batches(), cfg, 1.0, step, world_size)
        if ema is not None:
            ema.update(model)
        return loss

    t0 = time.perf_counter()
    for step in range(warmup):
        full_step(step)
    sync()
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for step in range(steps):
        loss = full_step(warmup + step)
    sync()
    seconds = time.perf_counter() - t0
    tokens_per_s = steps * cfg.train_batch_tokens / seconds
    flops = matmul_flops_per_token(model, cfg.seq_len)
    result = dict(data=source, device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                  warmup_compile_s=round(compile_s, 1), steps=steps, ms_per_step=round(1000 * seconds / steps, 2),
                  tokens_per_s=round(tokens_per_s), mfu=round(tokens_per_s * flops / world_size / H100_BF16_PEAK_FLOPS, 4),
                  flops_per_token=flops, loss=round(loss.item(), 4))
    result["phases_ms"] = _phases(model, step_model, optimizers, ema, batches(), cfg, device, sync,
                                  max(2, min(10, steps)))
    if profile_steps:
        activities = [torch.profiler.ProfilerActivity.CPU] + (
            [torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with torch.profiler.profile(activities=activities) as prof:
            for step in range(profile_steps):
                train_step(model, step_model, optimizers, batches(), cfg, 1.0, step, world_size)
            sync()
        # self time: a compiled graph's wrapper ops would otherwise head the table with their children's time
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        result["profile"] = prof.key_averages().table(sort_by=sort, row_limit=top, max_name_column_width=70)
    return result


def _phases(model, step_model, optimizers, ema, batch, cfg: TrainConfig, device, sync, n: int) -> str:
    """ms per step of each part of a step, timed alone: forward+backward of all micro-batches, the gradient clip
    and optimizer steps, the EMA update. Their sum minus the measured step is what overlap saves (or costs)."""
    batch = [(torch.as_tensor(x).to(device), torch.as_tensor(y).to(device)) for x, y in batch]

    def fwd_bwd():
        for x, y in batch:
            with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
                loss = step_model(x, y)
            (loss / len(batch)).backward()

    def opt():
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
        for o in optimizers:
            o.step()

    parts = {"fwd_bwd": fwd_bwd, "optim": opt}
    if ema is not None:
        parts["ema"] = lambda: ema.update(model)
    out = []
    for name, fn in parts.items():
        fn()
        sync()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        sync()
        out.append(f"{name}={1000 * (time.perf_counter() - t0) / n:.2f}")  # optim reuses fwd_bwd's gradients
    model.zero_grad(set_to_none=True)
    return ",".join(out)


def _cmd(args: argparse.Namespace) -> int:
    model_cfg, cfg = ModelConfig(), TrainConfig()
    for line in resolve(model_cfg, cfg, cli=dict(a.split("=", 1) for a in args.overrides)):
        print(f"override {line}")
    result = run_bench(model_cfg, cfg, args.steps, args.warmup, args.profile_steps, args.top)
    profile = result.pop("profile", None)
    print(" ".join(f"{k}:{v}" for k, v in result.items()))
    if profile:
        print(profile)
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("bench", help="measure training throughput (tokens/s, ms/step, MFU) and profile one step",
                       description="Times the default recipe's training step (plus KEY=VALUE overrides) on real "
                                   "shards from DATA_DIR when present, random tokens otherwise.")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. TRAIN_BATCH_TOKENS=98304")
    p.add_argument("--steps", type=int, default=30, help="timed steps (default 30)")
    p.add_argument("--warmup", type=int, default=10, help="untimed compile/warmup steps (default 10)")
    p.add_argument("--profile-steps", type=int, default=3, help="steps under torch.profiler for the op table "
                                                                 "(0: no profile)")
    p.add_argument("--top", type=int, default=10, help="rows of the op table, by self GPU time (default 10)")
    p.set_defaults(func=_cmd)
