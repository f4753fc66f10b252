"""Flat validation scoring: non-overlapping seq_len windows, every target scored once (the trainer's quick val)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from eval.bpb import BPBAccumulator, ByteLUTs, token_bytes_torch


@torch.no_grad()
def evaluate_flat(model, tokens, luts: ByteLUTs, seq_len: int, batch_seqs: int = 32, rank: int = 0,
                  world_size: int = 1) -> BPBAccumulator:
    """Score tokens[1:] in windows of seq_len; ranks split the windows. When seq_len does not divide the targets,
    the last window ends at the last target and reaches back a full seq_len, scoring only the targets not yet
    scored: every window has one shape and the tail keeps full context (sliding scoring with stride = seq_len)."""
    device = next(model.parameters()).device
    tokens = torch.as_tensor(tokens.astype("int64") if hasattr(tokens, "astype") else tokens)
    lut = luts.to_torch(device)
    acc = BPBAccumulator(device)
    n_targets = len(tokens) - 1
    length = min(seq_len, n_targets)
    windows = [(s, 0) for s in range(0, n_targets - length + 1, length)]  # (start, targets already scored)
    if n_targets % length:
        windows.append((n_targets - length, length - n_targets % length))
    windows = windows[rank::world_size]
    full = [s for s, skip in windows if not skip]
    batches = [(full[i:i + batch_seqs], 0) for i in range(0, len(full), batch_seqs)]
    batches += [([s], skip) for s, skip in windows if skip]
    was_training = model.training
    model.eval()
    for starts, skip in batches:
        x = torch.stack([tokens[s:s + length] for s in starts]).to(device)
        y = torch.stack([tokens[s + 1:s + 1 + length] for s in starts]).to(device)
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            z = model.logits(x)[:, skip:]
        x, y = x[:, skip:], y[:, skip:]
        nll = F.cross_entropy(z.float().reshape(-1, z.size(-1)), y.reshape(-1), reduction="none")
        acc.add(nll, token_bytes_torch(lut, x.reshape(-1), y.reshape(-1)))
    model.train(was_training)
    acc.all_reduce()
    return acc
