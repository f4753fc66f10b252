"""Score-first test-time training on chunks the stream has scored, and the eval-time hash embedding it trains."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from eval.stream import process_group
from submission.model import bigram_bucket


class HashEmbedding(nn.Module):
    """An embedding of the (previous, current) token pair, added to the model's input embedding (extra_embed).

    Created at eval start, zero-initialized (until its first update the model scores exactly as without it) and
    trained only by ScoreFirstTTT. Buckets as the model's BigramHash: position 0 and BOS tokens share bucket 0, so
    no pair reaches across a document boundary."""

    def __init__(self, buckets: int, dim: int, bos_id: int):
        super().__init__()
        self.buckets, self.bos_id = buckets, bos_id
        self.table = nn.Embedding(buckets, dim)
        nn.init.zeros_(self.table.weight)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.table(bigram_bucket(idx, self.buckets, self.bos_id))


def select_parameters(model: nn.Module, spec: str) -> list[nn.Parameter]:
    """The model parameters TTT trains: "all", or comma-separated name prefixes (e.g. "blocks.9,blocks.10")."""
    named = list(model.named_parameters())
    if spec == "all":
        return [p for _, p in named]
    prefixes = [s.strip() for s in spec.split(",") if s.strip()]
    chosen = [p for n, p in named if any(n == s or n.startswith(s + ".") for s in prefixes)]
    if not chosen:
        raise ValueError(f"ttt_params={spec!r} matches no parameter (names start with e.g. "
                         f"{sorted({n.split('.')[0] for n, _ in named})}); use 'all' or name prefixes")
    return chosen


def training_windows(known: torch.Tensor, lo: int, hi: int, seq_len: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(inputs [n, L], targets [n, L]) batches that train on exactly the targets [lo, hi) of `known`.

    Windows end at hi, hi - L, ... and reach back a full L tokens (into earlier, already scored tokens, whose
    targets are masked with -100), so all but a window near the stream start share one shape."""
    windows = []
    for e in range(hi, lo, -seq_len):
        s = max(e - 1 - seq_len, 0)
        targets = known[s + 1:e].clone()
        targets[:max(lo - s - 1, 0)] = -100
        windows.insert(0, (known[s:e - 1], targets))
    # Only the earliest window can be short (it would start before token 0); it forms its own batch.
    groups = [windows[1:], windows[:1]] if windows[0][0].numel() < seq_len else [windows]
    return [(torch.stack([x for x, _ in g]), torch.stack([y for _, y in g])) for g in groups if g]


def all_reduce_grads(params: list[nn.Parameter]) -> None:
    """Sum the gradients of `params` over the ranks in one flat all-reduce (a missing gradient counts as zeros)."""
    grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
    flat = torch.cat([g.flatten() for g in grads])
    torch.distributed.all_reduce(flat)
    for p, g in zip(params, flat.split([p.numel() for p in params])):
        p.grad = g.view_as(p).to(p.dtype)


class ScoreFirstTTT:
    """SGD with momentum on each scored chunk (after its scores are recorded), for `epochs` passes over it.
    Under torch.distributed the ranks split each batch's sequences and sum their gradients (each rank's loss is
    its share of the batch's summed NLL over the batch's target count), so every rank takes the step one process
    would take on the whole batch and the weights stay the same on all of them.

    One optimizer for the whole stream (momentum carries across chunks); the LR of every group follows a cosine
    from its base LR at the first chunk toward 0 at the last (never trained) chunk. Groups: the chosen model
    parameters at `lr`, the hash embedding at `lr * hash_lr_mult`. The schedule scales each group's own base_lr:
    a real submission that wrote one LR into every group silently lost its hash table's 10x."""

    def __init__(self, model: nn.Module, *, lr: float, momentum: float, epochs: int, grad_clip: float,
                 batch_seqs: int, seq_len: int, params: str = "all", hash_embed: HashEmbedding | None = None,
                 hash_lr_mult: float = 10.0):
        self.model, self.extra_embed = model, hash_embed
        self.epochs, self.grad_clip, self.batch_seqs, self.seq_len = epochs, grad_clip, batch_seqs, seq_len
        chosen = {id(p) for p in select_parameters(model, params)}
        self._requires_grad = [(p, p.requires_grad) for p in model.parameters()]
        for p in model.parameters():
            p.requires_grad_(id(p) in chosen)
        groups = [{"params": [p for p in model.parameters() if p.requires_grad], "base_lr": lr}]
        if hash_embed is not None:
            groups.append({"params": list(hash_embed.parameters()), "base_lr": lr * hash_lr_mult})
        self.trained = [p for g in groups for p in g["params"]]
        self.optimizer = torch.optim.SGD(groups, lr=lr, momentum=momentum)

    def set_lr(self, progress: float) -> None:
        """Cosine schedule over the stream: progress 0 at the first chunk, approaching 1 at the last."""
        scale = 0.5 * (1 + math.cos(math.pi * progress))
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * scale

    def update(self, known: torch.Tensor, lo: int, hi: int, progress: float) -> None:
        """Train on the scored targets [lo, hi); `known` holds the stream up to hi (nothing later exists here)."""
        self.set_lr(progress)
        batches = [(x[i:i + self.batch_seqs], y[i:i + self.batch_seqs])
                   for x, y in training_windows(known, lo, hi, self.seq_len)
                   for i in range(0, x.size(0), self.batch_seqs)]
        rank, world = process_group()
        for _ in range(self.epochs):
            for x, y in batches:
                count = (y != -100).sum()
                x, y = (t[t.size(0) * rank // world:t.size(0) * (rank + 1) // world] for t in (x, y))
                if len(x):
                    with torch.autocast(x.device.type, torch.bfloat16, enabled=x.is_cuda):
                        extra = None if self.extra_embed is None else self.extra_embed(x)
                        z = self.model.logits(x, extra)
                    loss = F.cross_entropy(z.reshape(-1, z.size(-1)), y.reshape(-1), ignore_index=-100,
                                           reduction="sum") / count
                    loss.backward()
                if world > 1:
                    all_reduce_grads(self.trained)
                if self.grad_clip:
                    torch.nn.utils.clip_grad_norm_(self.trained, self.grad_clip)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)

    def close(self) -> None:
        """Give the model back its own requires_grad flags."""
        for p, flag in self._requires_grad:
            p.requires_grad_(flag)
