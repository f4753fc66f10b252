"""The training loop: time-capped schedule, Muon + AdamW, EMA, late QAT, multi-GPU, run directory and train.log."""
from __future__ import annotations

import copy
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from eval.bpb import byte_luts
from eval.flat import evaluate_flat
from submission.config import ModelConfig, TrainConfig, parse_overrides, resolve, to_dict
from submission.data import TokenLoader, load_tokens
from submission.ema import EMA
from submission.model import GPT, layer_schedule
from submission.optim import build_optimizers
from submission.runtime import Logger, code_hash, configure_cuda, read_tokenizer, setup_distributed, writable_check

H100_BF16_PEAK_FLOPS = 989e12  # dense bf16, SXM; MFU is quoted against it
# What a run directory holds once a stage wrote to it (eval_*.json: one-off `pgolf eval` passes). Training into a
# directory holding any of them would mix two runs (a new checkpoint beside the old artifact and score), so it is
# refused unless OVERWRITE=1, which removes them first. console.log is `pgolf seeds`' (written before the child).
RUN_FILES = ("train.log", "config.json", "checkpoint.pt", "model.pgz", "eval.json", "quantize.log")


def claim_run_dir(run_dir: Path, overwrite: bool = False) -> None:
    """Make RUN_DIR ready for a new run before any work: refuse one holding another run's files (RUN_FILES, eval_*)
    unless `overwrite`, which removes them; create it and check it is writable. Errors are one line with the fix."""
    old = [p for p in run_dir.glob("*") if p.name in RUN_FILES or p.name[:5] == "eval_"]
    if old and not overwrite:
        raise ValueError(f"RUN_DIR={run_dir} holds a run ({', '.join(sorted(p.name for p in old))}): pass a new "
                         "RUN_DIR, or OVERWRITE=1 (`pgolf train --overwrite`) to delete that run and train in its "
                         "place")
    writable_check(run_dir / "train.log", "RUN_DIR")
    for path in old:
        path.unlink()


def overwrite_asked(cli: dict[str, str]) -> bool:
    """OVERWRITE=1 among the KEY=VALUE settings (popped: no config field, so it is not stored with the run), else in
    the environment: train in a RUN_DIR that holds a run, deleting that run's files first (claim_run_dir)."""
    return cli.pop("OVERWRITE", cli.pop("overwrite", os.environ.get("OVERWRITE", "0"))) == "1"


def matmul_flops_per_token(model: GPT, seq_len: int) -> float:
    """Forward + backward FLOPs per token: 6 x matrix parameters (+ tied head) + causal attention, counting each
    block as often as the layer schedule runs it (depth recurrence, as at the end of training)."""
    cfg = model.cfg
    schedule = layer_schedule(cfg, True)

    def runs(name: str) -> int:
        return schedule.count(int(name.split(".")[1])) if name.startswith("blocks.") else 1
    matrix_params = sum(p.numel() * runs(n) for n, p in model.named_parameters() if p.ndim == 2 and "emb" not in n
                        and "skip" not in n and "resid_mix" not in n)
    head = cfg.vocab_size * cfg.model_dim
    attention = 6 * len(schedule) * seq_len * cfg.num_heads * cfg.head_dim  # QK^T and AV, causal half, fwd+bwd
    return 6 * (matrix_params + head) + attention


def lr_scale(progress: float, warmdown_frac: float) -> float:
    """1 until the warmdown starts, then linear to 0 at the end of training (progress 0..1)."""
    return 1.0 if progress < 1 - warmdown_frac else max(0.0, (1 - progress) / warmdown_frac)


def train_step(model: GPT, step_model, optimizers, batches, cfg: TrainConfig, scale: float, step: int,
               world_size: int = 1) -> torch.Tensor:
    """One optimizer step over this rank's micro-batches; returns the mean loss (a device tensor, no sync)."""
    device = next(model.parameters()).device
    momentum = cfg.muon_momentum_start + (cfg.muon_momentum - cfg.muon_momentum_start) * min(
        1.0, step / max(1, cfg.muon_momentum_warmup_steps))
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * scale
            if "momentum" in group:
                group["momentum"] = momentum
    total = torch.zeros((), device=device)
    for x, y in batches:
        if device.type == "cuda":  # pinned host memory lets the copy overlap the previous step's kernels
            x, y = torch.from_numpy(x).pin_memory(), torch.from_numpy(y).pin_memory()
        x = torch.as_tensor(x).to(device, non_blocking=True)
        y = torch.as_tensor(y).to(device, non_blocking=True)
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            loss = step_model(x, y)
        (loss / len(batches)).backward()
        total += loss.detach() / len(batches)
    if world_size > 1:
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.AVG)
        for g, f in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
            g.copy_(f)
        dist.all_reduce(total, op=dist.ReduceOp.AVG)
    if cfg.grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    for opt in optimizers:
        opt.step()
    model.zero_grad(set_to_none=True)
    return total


def start_run(model_cfg: ModelConfig, cfg: TrainConfig, overrides: list[str] | None, overwrite: bool, rank: int,
              world_size: int, device: torch.device) -> tuple[Path, Logger, dict, int]:
    """Claim the run directory, open its train.log with the run's header lines and write config.json; returns
    (run_dir, log, the tokenizer's identity, gradient accumulation steps)."""
    run_dir = Path(cfg.run_dir or f"runs/{time.strftime('%Y%m%d_%H%M%S')}_seed{cfg.seed}")
    tokenizer = read_tokenizer(cfg.tokenizer_path)[1]
    if rank == 0:
        claim_run_dir(run_dir, overwrite)
    log = Logger(run_dir / "train.log", rank)
    per_rank = cfg.train_batch_tokens // world_size
    grad_accum = max(1, per_rank // cfg.micro_batch_tokens)
    if cfg.train_batch_tokens % (world_size * grad_accum * cfg.seq_len):
        raise ValueError(f"train_batch_tokens={cfg.train_batch_tokens} is not a multiple of world_size*grad_accum*"
                         f"seq_len = {world_size}*{grad_accum}*{cfg.seq_len}")
    log(f"seed:{cfg.seed}")  # on its own line, as the challenge's logs have it (tools/records/results.py reads it)
    cuda = device.type == "cuda"
    gpu = torch.cuda.get_device_name(device).replace(" ", "_") if cuda else platform.processor() or "cpu"
    log("run", run_dir=str(run_dir), world_size=world_size, device=str(device), gpu=gpu, grad_accum=grad_accum,
        python=platform.python_version(), torch=torch.__version__, numpy=np.__version__, code_hash=code_hash())
    for line in overrides or []:
        log("override", setting=line.replace(" ", ""))
    log("tokenizer", **tokenizer)
    if rank == 0:
        tmp = run_dir / "config.json.tmp"
        tmp.write_text(json.dumps({"model": to_dict(model_cfg), "train": to_dict(cfg), "tokenizer": tokenizer},
                                  indent=1))
        os.replace(tmp, run_dir / "config.json")
    return run_dir, log, tokenizer, grad_accum


def warmup(model: GPT, optimizers, loader: TokenLoader, step_fn, cfg: TrainConfig, log) -> None:
    """Compile and autotune on cfg.warmup_steps real steps (both QAT states, both layer schedules), then restore the
    initial weights and optimizer states, so that the warmup costs no training."""
    t0 = time.perf_counter()
    initial = copy.deepcopy(model.state_dict()), [copy.deepcopy(o.state_dict()) for o in optimizers]
    for step in range(cfg.warmup_steps):
        model.set_qat(step % 2 == 1 and cfg.qat_threshold > 0)
        model.looping = bool(model.cfg.num_loops) and step >= cfg.warmup_steps // 2
        step_fn(loader, 1.0, step)
    model.set_qat(False)
    model.load_state_dict(initial[0])
    for opt, state in zip(optimizers, initial[1]):
        opt.load_state_dict(state)
    if next(model.parameters()).is_cuda:
        torch.cuda.synchronize()
    log("warmup", steps=cfg.warmup_steps, seconds=round(time.perf_counter() - t0, 1), restored="model,optimizer")


def log_steps(log, losses: torch.Tensor, step: int, elapsed: float, scale: float, cfg: TrainConfig,
              flops_per_token: float) -> None:
    """The train loss of every step since the last log (to the file; the latest also on screen), then the speed
    line: time, ms/step, tokens/s and MFU against the H100's dense bf16 peak (flops_per_token: per GPU)."""
    first = max(0, step - cfg.log_every)
    for s, value in enumerate(losses[first:step].tolist(), start=first + 1):
        log(step=s, train_loss=round(value, 5), file_only=s != step)
    tokens_per_s = step * cfg.train_batch_tokens / elapsed
    log(step=f"{step}", train_time_s=round(elapsed, 2), step_avg_ms=round(1000 * elapsed / step, 2),
        tokens_per_s=round(tokens_per_s), mfu=round(tokens_per_s * flops_per_token / H100_BF16_PEAK_FLOPS, 4),
        lr_scale=round(scale, 4))


def train(model_cfg: ModelConfig, cfg: TrainConfig, overrides: list[str] | None = None,
          overwrite: bool = False) -> Path:
    """Train until the wallclock cap (or max_steps); write the run directory; return its path. A RUN_DIR holding
    another run is refused unless `overwrite` (claim_run_dir)."""
    rank, world_size, device = setup_distributed()
    is_cuda = device.type == "cuda"
    run_dir, log, tokenizer, grad_accum = start_run(model_cfg, cfg, overrides, overwrite, rank, world_size, device)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    if is_cuda:
        configure_cuda()
    model = GPT(model_cfg, qat_bits=cfg.qat_bits, qat_clip_sigmas=cfg.qat_clip_sigmas).to(device)
    flops_per_token = matmul_flops_per_token(model, cfg.seq_len)
    log("model", params=sum(p.numel() for p in model.parameters()), flops_per_token=flops_per_token)
    step_model = torch.compile(model, dynamic=False) if is_cuda and cfg.compile else model
    optimizers = build_optimizers(model, cfg)
    ema = EMA(model, cfg.ema_decay) if cfg.ema_decay else None
    pattern = f"{cfg.data_dir}/fineweb_train_*.bin"

    def new_loader() -> TokenLoader:
        return TokenLoader(pattern, cfg.train_batch_tokens, cfg.seq_len, rank, world_size, grad_accum,
                           model_cfg.vocab_size, cfg.shuffle_windows, cfg.seed)

    def step_fn(loader: TokenLoader, scale: float, step: int) -> torch.Tensor:
        return train_step(model, step_model, optimizers, loader.next_batch(), cfg, scale, step, world_size)

    if cfg.warmup_steps:
        warmup(model, optimizers, new_loader(), step_fn, cfg, log)

    loops = bool(model_cfg.num_loops)
    model.looping = loops and cfg.enable_looping_at <= 0
    warmdown_s = cfg.warmdown_frac * cfg.max_wallclock_seconds
    log("schedule", wallclock_cap_s=cfg.max_wallclock_seconds, warmdown_start_s=cfg.max_wallclock_seconds - warmdown_s,
        warmdown_s=warmdown_s, qat_starts_at_s=round(cfg.max_wallclock_seconds - warmdown_s * cfg.qat_threshold, 1)
        if cfg.qat_threshold else "off", tokens_per_step=cfg.train_batch_tokens,
        looping_starts_at_s=round(cfg.enable_looping_at * cfg.max_wallclock_seconds, 1) if loops else "off")
    val_tokens = load_tokens(f"{cfg.data_dir}/fineweb_val_*.bin", model_cfg.vocab_size)
    luts = byte_luts(cfg.tokenizer_path, model_cfg.vocab_size)

    loader = new_loader()
    losses = torch.zeros(cfg.max_steps, device=device)
    elapsed, step, qat_on = 0.0, 0, False
    t_start = time.perf_counter()
    if is_cuda:
        torch.cuda.synchronize()
    t_mark = time.perf_counter()
    while step < cfg.max_steps:
        # Progress is the larger of time and step fractions: the wallclock cap normally binds; with max_steps
        # binding (tiny CPU runs, tests) the schedule is deterministic.
        progress = max(elapsed / cfg.max_wallclock_seconds, step / cfg.max_steps)
        scale = lr_scale(progress, cfg.warmdown_frac)
        if loops and not model.looping and progress >= cfg.enable_looping_at:
            model.looping = True
            log("looping", step=step, schedule=",".join(map(str, model.schedule())), elapsed_s=round(elapsed, 1))
        if cfg.qat_threshold and not qat_on and scale < cfg.qat_threshold:
            model.set_qat(True)
            qat_on = True
            log("qat", step=step, lr_scale=round(scale, 4), elapsed_s=round(elapsed, 1))
        losses[step] = step_fn(loader, scale, step)
        if ema is not None:
            ema.update()
        step += 1
        # No per-step device sync: the host runs up to a couple of steps ahead of the GPU, so stop when the host
        # clock plus two average steps reaches the cap, then sync and log the true time.
        now = time.perf_counter()
        elapsed += now - t_mark
        t_mark = now
        stop = elapsed + 2 * elapsed / step >= cfg.max_wallclock_seconds
        if world_size > 1:
            flag = torch.tensor(float(stop), device=device)
            dist.broadcast(flag, 0)
            stop = bool(flag.item())
        if step % cfg.log_every == 0 or stop or step == cfg.max_steps:
            if is_cuda:
                torch.cuda.synchronize()
                now = time.perf_counter()
                elapsed += now - t_mark
                t_mark = now
            log_steps(log, losses, step, elapsed, scale, cfg, flops_per_token / world_size)
        if cfg.val_every and step % cfg.val_every == 0 and not stop:
            acc = _validate(model, val_tokens, luts, cfg, rank, world_size)
            log(step=step, val_loss=round(acc.val_loss, 5), val_bpb=round(acc.val_bpb, 5))
            if is_cuda:
                torch.cuda.synchronize()
            t_mark = time.perf_counter()  # validation pauses the training timer
        if stop:
            break
    last_read = loader.close()
    log("training_done", steps=step, train_time_s=round(elapsed, 2), step_avg_ms=round(1000 * elapsed / step, 2),
        data_last_read_s=round(last_read - t_start, 2) if last_read else 0, data_reads_after_cap=0,
        peak_mem_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if is_cuda else 0)

    model.set_qat(False)
    model.looping = loops  # the schedule the built model runs, which quantization and evaluation use
    finish(model, ema, val_tokens, luts, cfg, {"model_config": to_dict(model_cfg), "train_config": to_dict(cfg),
                                               "tokenizer": tokenizer, "steps": step}, run_dir, log, rank, world_size)
    if world_size > 1:
        dist.barrier()
    return run_dir


def finish(model, ema, val_tokens, luts, cfg: TrainConfig, checkpoint: dict, run_dir: Path, log, rank: int,
           world_size: int) -> None:
    """After the last step: the raw and (with EMA) averaged weights' val scores, and checkpoint.pt (the run's facts
    in `checkpoint`, plus both state dicts; the EMA weights are the ones quantized and scored)."""
    acc = _validate(model, val_tokens, luts, cfg, rank, world_size)
    log("final_raw", val_loss=round(acc.val_loss, 6), val_bpb=round(acc.val_bpb, 6))
    checkpoint.update(ema_state_dict=None,
                      state_dict={k: v.detach().cpu().clone() for k, v in model.state_dict().items()})
    if ema is not None:
        raw = copy.deepcopy(model.state_dict())
        model.load_state_dict(ema.state_dict_like(model))
        acc_ema = _validate(model, val_tokens, luts, cfg, rank, world_size)
        log("final_ema", val_loss=round(acc_ema.val_loss, 6), val_bpb=round(acc_ema.val_bpb, 6),
            ema_gain_bpb=round(acc.val_bpb - acc_ema.val_bpb, 6))
        checkpoint["ema_state_dict"] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        model.load_state_dict(raw)
        acc = acc_ema
    if rank == 0:
        tmp = run_dir / "checkpoint.pt.tmp"
        torch.save(checkpoint, tmp)
        os.replace(tmp, run_dir / "checkpoint.pt")
    log("final_prequant", val_loss=round(acc.val_loss, 6), val_bpb=round(acc.val_bpb, 6), steps=checkpoint["steps"],
        weights="ema" if ema is not None else "raw", checkpoint=str(run_dir / "checkpoint.pt"))


def _validate(model, val_tokens, luts, cfg: TrainConfig, rank: int, world_size: int):
    return evaluate_flat(model, val_tokens, luts, cfg.seq_len, cfg.val_batch_seqs, rank, world_size)


def main(argv: list[str] | None = None) -> Path:
    """Entry: configs from defaults, then environment variables (upper-case field names), then KEY=VALUE args."""
    argv = sys.argv[1:] if argv is None else argv
    cli = parse_overrides(argv)
    overwrite = overwrite_asked(cli)
    model_cfg, train_cfg = ModelConfig(), TrainConfig()
    changed = resolve(model_cfg, train_cfg, cli=cli)
    return train(model_cfg, train_cfg, changed, overwrite)
