"""The causal scoring stream: sliding windows over score-first chunks; adapters learn only from scored tokens."""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from eval.progress import packable_progress_bar

# Rows per chunk and view whose full distribution is materialized and checked for normalization (C2).
NORM_ROWS = 8
# Positions per n-gram/view call: bounds the [rows, V] temporaries (a chunk of 32,768 at V=8192 would need ~1 GB
# per temporary) while keeping the n-gram's host syncs per chunk few.
VIEW_ROWS = 8192


class StageTimer:
    """Wall seconds per named stage; on CUDA each stage ends with a device sync so its kernels count in it."""

    def __init__(self, device: torch.device):
        self.seconds: dict[str, float] = {}
        self.sync = device.type == "cuda"

    @contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.sync:
                torch.cuda.synchronize()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


@contextmanager
def rope_scaled(model, scale: float):
    """NTK-aware RoPE for a context `scale` x the training length: base * scale^(d/(d-2)) keeps the highest
    frequency and divides the lowest by `scale`, so far positions land on angles the model saw in training. The
    model builds its rope tables from cfg.rope_base on every forward, so patching the config is the whole hook."""
    cfg = model.cfg
    base = cfg.rope_base
    if scale != 1 and cfg.rope_dims > 2:  # two rotated dims have the single frequency 1, which no base changes
        cfg.rope_base = base * scale ** (cfg.rope_dims / (cfg.rope_dims - 2))
    try:
        yield
    finally:
        cfg.rope_base = base


def window_scores(model, extra, x: torch.Tensor, last: int, targets: torch.Tensor | None = None):
    """Log-probabilities [B, last, V] at the last `last` positions of windows x [B, W]; the head and softmax run
    only there. With targets [B, last]: their NLL [B, last] and one full row (window 0, last position) instead."""
    with torch.autocast(x.device.type, torch.bfloat16, enabled=x.is_cuda):
        h = model.hidden(x, None if extra is None else extra(x))[:, -last:]
        logp = F.log_softmax(model.head(h), -1)
    if targets is None:
        return logp
    return -logp.gather(-1, targets[..., None]).squeeze(-1), logp[0, -1]


def process_group() -> tuple[int, int]:
    """(rank, world size) of the torch.distributed group; (0, 1) without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """Every rank's rows [n_r, ...] (n_r may differ), concatenated in rank order, on every rank."""
    world = process_group()[1]
    if world == 1:
        return rows
    counts = [torch.tensor([rows.size(0)], device=rows.device) for _ in range(world)]
    torch.distributed.all_gather(counts, counts[0].clone())
    counts = [int(n) for n in counts]
    padded = F.pad(rows, (0, 0) * (rows.dim() - 1) + (0, max(counts) - rows.size(0)))
    out = [torch.empty_like(padded) for _ in range(world)]
    torch.distributed.all_gather(out, padded)
    return torch.cat([o[:n] for o, n in zip(out, counts)])


def plan_windows(first: int, end: int, context: int, stride: int, chunk: int):
    """Windows scoring the targets [first, end) once each, left to right, grouped in chunks of `chunk` targets.

    Targets are cut on one global grid (the first `context` targets, then `stride` at a time) and at chunk starts.
    A segment [lo, hi) is scored by the window tokens[s : s + context] that ends at its last target,
    s = hi - 1 - context, i.e. each target sees at least context - stride tokens before it; near the stream start
    s = 0 (a head window: the model is causal, so later tokens in it cannot reach an earlier position).
    Returns (starts, lo, hi) int64 arrays per window and per chunk (lo, hi, first window, end window)."""
    grid = np.arange(context + 1, end, stride)
    cuts = np.union1d(np.union1d(grid[grid > first], np.arange(first, end, chunk)), [end])
    lo, hi = cuts[:-1], cuts[1:]
    starts = np.maximum(hi - 1 - context, 0)
    chunk_of = (lo - first) // chunk
    bounds = np.searchsorted(chunk_of, np.arange(chunk_of[-1] + 2)) if lo.size else np.zeros(1, np.int64)
    chunks = [(first + c * chunk, min(first + (c + 1) * chunk, end), int(bounds[c]), int(bounds[c + 1]))
              for c in range(len(bounds) - 1)]
    return starts.astype(np.int64), lo.astype(np.int64), hi.astype(np.int64), chunks


@dataclass
class StreamResult:
    """What one pass of the stream recorded for its targets [first, end)."""
    first: int
    end: int
    nll: dict[str, torch.Tensor]    # view -> NLL (nats) per target, float32 [end - first]; 0 if another rank's
    coverage: torch.Tensor          # int32 [end - first]: times this rank scored each target (C4)
    norm: dict[str, torch.Tensor]   # view -> [max |sum p - 1|, min p, non-finite count] over checked rows (C2)
    events: list[tuple[str, str, int, int]]  # ("score", "", lo, hi) / ("update", adapter, 0, hi) in order (C3)


def _check_rows(norm: dict, view: str, logp: torch.Tensor) -> None:
    """Fold rows of a view's log-probabilities into its normalization stats, on the device (no host sync)."""
    p = logp.double().exp()
    stats = torch.stack([(p.sum(-1) - 1).abs().max(), p.min(), (~torch.isfinite(p)).sum().double()])
    old = norm.get(view)
    norm[view] = stats if old is None else torch.stack([torch.maximum(old[0], stats[0]),
                                                        torch.minimum(old[1], stats[1]), old[2] + stats[2]])


def _score_views(rows, adapters: dict, tokens, score_tokens, c_lo: int, c_hi: int, first: int, nll: dict,
                 norm: dict) -> None:
    """A chunk's views (the model's rows, then each adapter's, e.g. the n-gram blend), VIEW_ROWS targets at a time:
    each view's NLL recorded and a sample of its rows folded into the normalization stats."""
    n, size = c_hi - c_lo, len(nll["model"])
    for a in range(0, n, VIEW_ROWS):
        b = min(a + VIEW_ROWS, n)
        positions = torch.arange(c_lo + a, c_lo + b, device=rows.device)
        views = {"model": rows[a:b]}
        for adapter in adapters.values():
            views.update(adapter.views(rows[a:b], tokens[:c_hi - 1], positions, tokens[c_lo + a:c_lo + b]))
        targets = score_tokens[c_lo + a:c_lo + b, None]
        checked = torch.linspace(0, b - a - 1, min(NORM_ROWS, b - a), device=rows.device).long()
        for view, logp in views.items():
            if view not in nll:
                nll[view] = torch.zeros(size, device=rows.device)
            nll[view][c_lo - first + a:c_lo - first + b] = -logp.gather(1, targets).squeeze(1)
            _check_rows(norm, view, logp[checked])


def score_stream(model, tokens: torch.Tensor, first: int, end: int, *, context: int, stride: int, chunk: int,
                 batch_windows: int, ttt=None, adapters: dict | None = None, score_tokens: torch.Tensor | None = None,
                 compiled=None, timer: StageTimer | None = None, progress: bool = False,
                 desc: str = "eval") -> StreamResult:
    """Score the targets [first, end) of `tokens` (1-D, on the model's device) chunk by chunk, left to right.

    For each chunk: every target's full distribution is computed from its prefix (sliding windows, no grad), the
    views of it are formed (the model's, then each adapter's, e.g. the n-gram blend), the targets are scored and
    recorded, and only then adapters learn: each `adapters[name].update(tokens[:hi], positions)` and, except
    after the last chunk, `ttt.update(tokens[:hi], lo, hi, progress)`; they are handed only tokens already scored
    (or before `first`). `ttt.extra_embed` (a module or None) feeds the model's extra_embed.
    Under torch.distributed every rank runs this with the same arguments: the ranks split each chunk's windows (a
    rank records NLL and coverage for its share only), meet once all have scored the chunk, and then all learn from
    the whole chunk (the adapters and TTT share what they learn), so the scores do not depend on the world size.
    score_tokens: the tokens the targets are read from (default `tokens`); the causality check scores original
    targets after perturbing the context stream. compiled: torch.compile(window_scores) for full batches (static
    shapes: the last batch of a chunk is padded)."""
    device = tokens.device
    adapters = adapters or {}
    score_tokens = tokens if score_tokens is None else score_tokens
    timer = timer or StageTimer(device)
    extra = None if ttt is None else ttt.extra_embed
    context = min(context, tokens.numel() - 1)
    stride = min(stride, context)
    if not adapters and ttt is None:
        chunk = max(end - first, 1)  # nothing learns between chunks: one chunk avoids extra windows at chunk cuts
    starts_np, lo_np, hi_np, chunks = plan_windows(first, end, context, stride, chunk)
    starts, lows, highs = (torch.as_tensor(a, device=device) for a in (starts_np, lo_np, hi_np))
    sizes = hi_np - lo_np
    n_shard = end - first
    rank, world = process_group()
    # Each chunk's share of windows [a, b) and of targets [s_lo, s_hi) on this rank; every rank needs one somewhere.
    if max(w1 - w0 for *_, w0, w1 in chunks) < world:  # then a rank would score nothing and make no views
        raise ValueError(f"{world} ranks: every chunk has fewer windows than ranks (use fewer processes, or a "
                         "smaller STRIDE or a larger CHUNK_TOKENS)")
    shares = []
    for c_lo, _, w0, w1 in chunks:
        a, b = w0 + (w1 - w0) * rank // world, w0 + (w1 - w0) * (rank + 1) // world
        shares.append((a, b, *((int(lo_np[a]), int(hi_np[b - 1])) if b > a else (c_lo, c_lo))))
    rows_mode = bool(adapters)  # adapters need the model's full distribution of every target in the chunk
    nll = {"model": torch.zeros(n_shard + 1, device=device)}  # the last slot absorbs masked-out writes
    coverage = torch.zeros(n_shard + 1, dtype=torch.int32, device=device)
    norm: dict[str, torch.Tensor] = {}
    events: list[tuple[str, str, int, int]] = []
    ctx_offsets = torch.arange(context, device=device)
    if compiled is not None and (starts_np > 0).any():
        # The first call of a variant compiles: a dummy batch keeps that out of "score". Its tensors must be laid
        # out as real batches are (contiguous): on an H100 an expanded `targets` failed a stride guard and the
        # first real batch compiled again, inside "score".
        with timer("compile"), torch.no_grad():
            x = tokens[:context].expand(batch_windows, -1).contiguous()
            compiled(model, extra, x, stride, None if rows_mode else x[:, -stride:].contiguous())
    bar = packable_progress_bar(total=sum(s[3] - s[2] for s in shares), desc=desc, unit="tok", unit_scale=True,
                                disable=not progress, leave=False)

    def run_batch(i: int, j: int, last: int, fn, s_lo: int, rows):
        st, lo, hi = starts[i:j], lows[i:j], highs[i:j]
        if fn is compiled and j - i < batch_windows:  # pad to the compiled batch; padding scores nothing
            pad = batch_windows - (j - i)
            st = torch.cat([st, st[-1:].expand(pad)])
            lo, hi = F.pad(lo, (0, pad)), F.pad(hi, (0, pad))
        pos = st[:, None] + (context - last + 1) + ctx_offsets[:last]
        scored = (pos >= lo[:, None]) & (pos < hi[:, None])
        x = tokens[st[:, None] + ctx_offsets]
        slot = torch.where(scored, pos - first, n_shard).flatten()
        coverage.index_put_((slot,), torch.ones_like(slot, dtype=torch.int32), accumulate=True)
        if rows_mode:
            logp = fn(model, extra, x, last, None)
            rows.index_copy_(0, torch.where(scored, pos - s_lo, rows.size(0) - 1).flatten(), logp.flatten(0, 1))
        else:
            batch_nll, sample = fn(model, extra, x, last, score_tokens[pos])
            nll["model"].index_put_((slot,), batch_nll.flatten())
            _check_rows(norm, "model", sample[None])
        bar.update(int(sizes[i:j].sum()))

    for index, ((c_lo, c_hi, _, _), (a, b, s_lo, s_hi)) in enumerate(zip(chunks, shares)):
        rows = torch.empty(s_hi - s_lo + 1, model.cfg.vocab_size, device=device) if rows_mode else None
        with timer("score"), torch.no_grad():
            i = a
            while i < b:
                if starts_np[i] == 0:  # head window: all its positions, eager (one or two per stream)
                    run_batch(i, i + 1, context, window_scores, s_lo, rows)
                    i += 1
                else:
                    j = min(i + batch_windows, b)
                    run_batch(i, j, stride, window_scores if compiled is None else compiled, s_lo, rows)
                    i = j
        if rows_mode:
            with timer("views"), torch.no_grad():
                _score_views(rows, adapters, tokens, score_tokens, s_lo, s_hi, first, nll, norm)
        if world > 1 and (adapters or ttt is not None):
            with timer("score"):  # every rank has scored its share: the chunk is scored, and may be learned from
                torch.distributed.all_reduce(torch.zeros(1, device=device))
        events.append(("score", "", c_lo, c_hi))
        known = tokens[:c_hi]
        for name, adapter in adapters.items():
            with timer(name):
                adapter.update(known, torch.arange(c_lo, c_hi, device=device))
            events.append(("update", name, 0, c_hi))
        if ttt is not None and index < len(chunks) - 1:  # the last chunk's tokens would help nothing after it
            with timer("ttt"):
                ttt.update(known, c_lo, c_hi, index / (len(chunks) - 1))
            events.append(("update", "ttt", 0, c_hi))
    bar.close()
    return StreamResult(first, end, {k: v[:n_shard] for k, v in nll.items()}, coverage[:n_shard], norm, events)
