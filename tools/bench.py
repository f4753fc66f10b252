"""What `pgolf bench` (tools/commands/bench.py) measures: training throughput of the recipe on this GPU (tokens/s,
ms/step, MFU), the per-op top 10, and the loss curve from a fresh model, comparable across code versions
(`--curve-out`, `--against`)."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from submission.config import ModelConfig, TrainConfig
from submission.data import TokenLoader
from submission.ema import EMA
from submission.model import GPT
from submission.optim import build_optimizers
from submission.runtime import configure_cuda, setup_distributed
from submission.train import H100_BF16_PEAK_FLOPS, matmul_flops_per_token, train_step


def run_bench(model_cfg: ModelConfig, cfg: TrainConfig, steps: int, warmup: int, profile_steps: int,
              top: int = 10, trace: str | None = None) -> dict:
    rank, world_size, device = setup_distributed()
    torch.manual_seed(cfg.seed)
    if device.type == "cuda":
        configure_cuda()
    model = GPT(model_cfg, cfg.qat_bits, cfg.qat_clip_sigmas).to(device)
    step_model = torch.compile(model, dynamic=False) if device.type == "cuda" and cfg.compile else model
    optimizers = build_optimizers(model, cfg)
    grad_accum = max(1, cfg.train_batch_tokens // world_size // cfg.micro_batch_tokens)
    try:
        loader = TokenLoader(f"{cfg.data_dir}/fineweb_train_*.bin", cfg.train_batch_tokens, cfg.seq_len, rank,
                             world_size, grad_accum, model_cfg.vocab_size, cfg.shuffle_windows, cfg.seed)
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
            ema.update()
        return loss

    losses = []  # device tensors: no sync per step
    t0 = time.perf_counter()
    for step in range(warmup):
        losses.append(full_step(step))
    sync()
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for step in range(steps):
        losses.append(loss := full_step(warmup + step))
    sync()
    seconds = time.perf_counter() - t0
    tokens_per_s = steps * cfg.train_batch_tokens / seconds
    flops = matmul_flops_per_token(model, cfg.seq_len)
    result = dict(data=source, device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                  warmup_compile_s=round(compile_s, 1), steps=steps, ms_per_step=round(1000 * seconds / steps, 2),
                  tokens_per_s=round(tokens_per_s),
                  mfu=round(tokens_per_s * flops / world_size / H100_BF16_PEAK_FLOPS, 4),
                  flops_per_token=flops, loss=round(loss.item(), 4))
    result["loss_curve"] = torch.stack(losses).tolist()  # every step from the fresh model, warmup included
    result["phases_ms"] = _phases(model, step_model, optimizers, ema, batches(), cfg, device, sync,
                                  max(2, min(10, steps)))
    if profile_steps:
        activities = [torch.profiler.ProfilerActivity.CPU] + (
            [torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with torch.profiler.profile(activities=activities) as prof:
            for step in range(profile_steps):
                full_step(warmup + steps + step)
            sync()
        # self time: a compiled graph's wrapper ops would otherwise head the table with their children's time
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        averages = prof.key_averages()
        result["profile"] = averages.table(sort_by=sort, row_limit=top, max_name_column_width=70)
        kinds = gpu_ms_by_kind(((e.key, e.self_device_time_total) for e in averages
                                if e.device_type == torch.autograd.DeviceType.CUDA), profile_steps)
        if kinds:
            result["gpu_ms_by_kind"] = ",".join(f"{k}={v:.2f}" for k, v in kinds.items())
        if trace:
            prof.export_chrome_trace(trace)
    return result


# Kernel name fragments -> kind, first match wins (lower case). cuDNN's attention kernels say "sdpa"/"fmha"/"flash";
# cuBLAS's H100 GEMMs are "nvjet"/"sm90_xmma"/"cutlass"; Inductor's fused kernels are "triton_poi" (pointwise),
# "triton_red"/"triton_per" (reductions), its matrix-product templates "triton_tem".
KERNEL_KINDS = (
    ("attention", ("sdpa", "fmha", "flash", "attention")),
    ("matmul", ("gemm", "nvjet", "xmma", "cutlass", "cublas", "triton_tem", "matmul")),
    ("optimizer", ("multi_tensor_apply", "foreach", "adam", "lerp")),
    ("pointwise", ("triton_poi",)),
    ("reduction", ("triton_red", "triton_per")),
    ("copy", ("memcpy", "memset")),
    ("aten_elementwise", ("elementwise_kernel", "reduce_kernel", "fill", "copy", "cat")),
)


# GPU-side ranges of record_function labels (the optimizers' step), not kernels: they would count their kernels twice
ANNOTATIONS = ("Optimizer.", "ProfilerStep", "## ")


def kernel_kind(name: str) -> str:
    low = name.lower()
    return next((kind for kind, frags in KERNEL_KINDS if any(f in low for f in frags)), "other")


def gpu_ms_by_kind(kernels, steps: int) -> dict[str, float]:
    """GPU ms per step by kernel kind from (kernel name, self device time in us) pairs, largest first, with the
    total last. Annotation ranges are left out: they span kernels already counted."""
    totals: dict[str, float] = {}
    for name, us in kernels:
        if name.startswith(ANNOTATIONS):
            continue
        totals[kernel_kind(name)] = totals.get(kernel_kind(name), 0.0) + us / 1000 / steps
    out = dict(sorted(totals.items(), key=lambda kv: -kv[1]))
    if out:
        out["total"] = sum(totals.values())
    return out


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
        parts["ema"] = lambda: ema.update()
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


WINDOW = 50


def window_means(curve: list[float], window: int = WINDOW) -> list[tuple[int, float]]:
    """(last step, mean loss) of each full window of `window` steps, steps counted from 1."""
    return [(end, sum(curve[end - window:end]) / window) for end in range(window, len(curve) + 1, window)]


def compare_curves(a: list[float], b: list[float], window: int = WINDOW) -> list[dict]:
    """Per full window of the steps both curves have: the two mean losses, their difference, and the paired t
    statistic of the per-step differences. Both runs see the same batches, so the differences are numerical noise
    that grows as the runs drift apart; a change in what is computed shows up as a systematic shift (|t| large)."""
    n = min(len(a), len(b))
    out = []
    for end in range(window, n + 1, window):
        d = [x - y for x, y in zip(a[end - window:end], b[end - window:end])]
        mean = sum(d) / window
        sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (window - 1))
        t = 0.0 if mean == 0 else mean / (sd / math.sqrt(window)) if sd > 0 else math.inf
        out.append(dict(step=end, a=sum(a[end - window:end]) / window, b=sum(b[end - window:end]) / window,
                        diff=mean, t=t))
    return out


def read_curve(path: Path) -> list[float]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        curve = [float(x) for x in data["loss_curve"]]
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such curve file (write one with `pgolf bench --curve-out {path}`)") \
            from None
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: not a `pgolf bench --curve-out` file ({type(e).__name__}: {e}); re-run the bench "
                         "that wrote it") from None
    if len(curve) < WINDOW:
        raise ValueError(f"{path}: {len(curve)} losses, fewer than one {WINDOW}-step window (bench more steps)")
    return curve
