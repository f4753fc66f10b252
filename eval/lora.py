"""Per-document LoRA adapters for test-time training (issue 21): one low-rank adapter per sequence of a batch.

Each row of a batch is one document with its own adapter on every chosen linear layer: the layer's output gains
(x @ A_b^T) @ B_b^T for row b. B starts at zero, so until an adapter's first step the model scores exactly as
without it; A starts random (std 1/sqrt(in)), so B's first gradient is not zero. The adapters ride on forward hooks:
the model's code is unchanged, and a hooked layer inside the one q/k/v product is called on its own
(submission/model.py's grouped_linear). Rows never mix: each row's output reads only its own A_b, B_b, and its loss
reaches only them. reset() starts every row afresh, which the scorer does at each new batch of documents, so nothing
learned on one document reaches another.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import Tensor, nn

from submission.model import CastedLinear

# The layers the records adapted (PRs #1530, #1610): attention's q, k, v and output projections and the MLP's two.
DEFAULT_TARGETS = ("attn.c_q", "attn.c_k", "attn.c_v", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def adapted_layers(model: nn.Module, targets: tuple[str, ...] = DEFAULT_TARGETS) -> dict[str, CastedLinear]:
    """The model's linear layers whose names end with one of `targets` (e.g. "blocks.3.attn.c_q"), by name."""
    layers = {name: m for name, m in model.named_modules()
              if isinstance(m, CastedLinear) and any(name == t or name.endswith("." + t) for t in targets)}
    if not layers:
        raise ValueError(f"LoRA targets {targets} match no linear layer of the model (names like "
                         f"{[n for n, m in model.named_modules() if isinstance(m, CastedLinear)][:3]})")
    return layers


class BatchedLoRA(nn.Module):
    """Rank-`rank` adapters for `batch` documents on each adapted layer: A [batch, rank, in], B [batch, out, rank].

    `rows` (a LongTensor, default all) says which adapters the current forward's batch rows use, in order: when
    some documents of a batch have ended, the scorer runs only the others and their adapters stay in place."""

    def __init__(self, model: nn.Module, rank: int, batch: int, targets: tuple[str, ...] = DEFAULT_TARGETS,
                 seed: int = 0):
        super().__init__()
        if rank < 1 or batch < 1:
            raise ValueError(f"LoRA rank {rank} and batch {batch}: both must be >= 1")
        self.rank, self.batch, self.seed = rank, batch, seed
        self.layers = adapted_layers(model, targets)
        device = next(model.parameters()).device
        self.keys = [name.replace(".", "_") for name in self.layers]
        self.A = nn.ParameterDict({k: nn.Parameter(torch.empty(batch, rank, m.in_features, device=device))
                                   for k, m in zip(self.keys, self.layers.values())})
        self.B = nn.ParameterDict({k: nn.Parameter(torch.empty(batch, m.out_features, rank, device=device))
                                   for k, m in zip(self.keys, self.layers.values())})
        self.rows: Tensor | None = None
        self.reset()

    @torch.no_grad()
    def reset(self) -> None:
        """Fresh adapters for every row: A random (seeded, the same every time), B zero (the model as it is)."""
        generator = torch.Generator().manual_seed(self.seed)
        for key in self.keys:
            a = self.A[key]
            a.copy_(torch.randn(a.shape, generator=generator) / a.size(-1) ** 0.5)
            self.B[key].zero_()

    def delta(self, key: str, x: Tensor) -> Tensor:
        """The adapters' addition to a layer's output for input x [rows, T, in]."""
        A, B = self.A[key], self.B[key]
        if self.rows is not None:
            A, B = A[self.rows], B[self.rows]
        if x.size(0) != A.size(0):
            raise ValueError(f"LoRA: a batch of {x.size(0)} rows for {A.size(0)} adapters (set .rows to the "
                             "documents in the batch)")
        return torch.bmm(torch.bmm(x, A.transpose(1, 2).to(x.dtype)), B.transpose(1, 2).to(x.dtype))

    @contextmanager
    def attached(self):
        """Inside, every adapted layer's output includes its rows' adapters (forward hooks, removed on exit)."""
        def hook(key):
            return lambda module, inputs, output: output + self.delta(key, inputs[0])
        handles = [m.register_forward_hook(hook(k)) for k, m in zip(self.keys, self.layers.values())]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()
