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
from submission.train import (H100_BF16_PEAK_FLOPS, configure_cuda, matmul_flops_per_token, setup_distributed,
                              train_step)


def run_bench(model_cfg: ModelConfig, cfg: TrainConfig, steps: int, warmup: int, profile_steps: int) -> dict:
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
    t0 = time.perf_counter()
    for step in range(warmup):
        train_step(model, step_model, optimizers, batches(), cfg, 1.0, step, world_size)
    sync()
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for step in range(steps):
        loss = train_step(model, step_model, optimizers, batches(), cfg, 1.0, warmup + step, world_size)
    sync()
    seconds = time.perf_counter() - t0
    tokens_per_s = steps * cfg.train_batch_tokens / seconds
    flops = matmul_flops_per_token(model, cfg.seq_len)
    result = dict(data=source, device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                  warmup_compile_s=round(compile_s, 1), steps=steps, ms_per_step=round(1000 * seconds / steps, 2),
                  tokens_per_s=round(tokens_per_s), mfu=round(tokens_per_s * flops / world_size / H100_BF16_PEAK_FLOPS, 4),
                  flops_per_token=flops, loss=round(loss.item(), 4))
    if profile_steps:
        activities = [torch.profiler.ProfilerActivity.CPU] + (
            [torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with torch.profiler.profile(activities=activities) as prof:
            for step in range(profile_steps):
                train_step(model, step_model, optimizers, batches(), cfg, 1.0, step, world_size)
            sync()
        sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
        result["profile"] = prof.key_averages().table(sort_by=sort, row_limit=10, max_name_column_width=60)
    return result


def _cmd(args: argparse.Namespace) -> int:
    model_cfg, cfg = ModelConfig(), TrainConfig()
    for line in resolve(model_cfg, cfg, cli=dict(a.split("=", 1) for a in args.overrides)):
        print(f"override {line}")
    result = run_bench(model_cfg, cfg, args.steps, args.warmup, args.profile_steps)
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
    p.add_argument("--profile-steps", type=int, default=3, help="steps under torch.profiler for the top-10 table")
    p.set_defaults(func=_cmd)
