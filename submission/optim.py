"""Muon (Newton-Schulz orthogonalized momentum, batched over same-shape matrices) and the optimizer split."""
from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor, nn

from submission.config import TrainConfig
from submission.model import CastedLinear


def newton_schulz(G: Tensor, steps: int) -> Tensor:
    """Approximate the orthogonal factor of each matrix in a [N, rows, cols] stack (quintic iteration, bf16)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.to(torch.bfloat16 if G.is_cuda else torch.float32)
    transposed = X.size(-2) > X.size(-1)
    if transposed:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * A @ A
        X = a * X + B @ X
    return X.mT if transposed else X


class Muon(torch.optim.Optimizer):
    """Nesterov momentum, then Newton-Schulz orthogonalization, decoupled weight decay.

    Matrices of the same shape are orthogonalized as one batched stack (11 layers share each shape), which turns
    66 small launches per iteration into 5. With several ranks, gradients arrive all-reduced; every rank then
    computes the same update.
    """

    def __init__(self, params, lr: float, momentum: float, weight_decay: float, ns_steps: int,
                 row_normalize: bool = False):
        super().__init__(list(params), dict(lr=lr, momentum=momentum, weight_decay=weight_decay, ns_steps=ns_steps,
                                            row_normalize=row_normalize))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            by_shape: dict[tuple, list[Tensor]] = defaultdict(list)
            for p in group["params"]:
                if p.grad is not None:
                    by_shape[tuple(p.shape)].append(p)
            lr, mom, wd = group["lr"], group["momentum"], group["weight_decay"]
            for shape, params in by_shape.items():
                bufs = []
                for p in params:
                    if "momentum_buffer" not in self.state[p]:
                        self.state[p]["momentum_buffer"] = torch.zeros_like(p.grad)
                    bufs.append(self.state[p]["momentum_buffer"])
                grads = [p.grad for p in params]
                torch._foreach_mul_(bufs, mom)
                torch._foreach_add_(bufs, grads)
                grads = torch.stack(torch._foreach_add(grads, bufs, alpha=mom))  # Nesterov
                if group["row_normalize"]:  # MuonEq-R: every row of the update at unit norm before orthogonalizing
                    grads = grads / grads.float().norm(dim=-1, keepdim=True).clamp_min(1e-7).to(grads.dtype)
                update = newton_schulz(grads, group["ns_steps"]).to(params[0].dtype)
                torch._foreach_mul_(params, 1 - lr * wd)
                torch._foreach_add_(params, list(update.unbind(0)),
                                    alpha=-lr * max(1.0, shape[0] / shape[1]) ** 0.5)


def build_optimizers(model: torch.nn.Module, cfg: TrainConfig) -> list[torch.optim.Optimizer]:
    """Muon for the Linear matrices; AdamW for embedding tables and for every gain, gate, mix and skip weight."""
    matrices, tables, scalars = [], [], []
    for module in model.modules():
        kind = matrices if isinstance(module, CastedLinear) else tables if isinstance(module, nn.Embedding) \
            else scalars
        kind.extend(module.parameters(recurse=False))
    adam = torch.optim.AdamW(
        [dict(params=tables, lr=cfg.embed_lr, weight_decay=cfg.weight_decay),
         dict(params=scalars, lr=cfg.scalar_lr, weight_decay=0.0)],
        betas=cfg.adam_betas, eps=1e-8, fused=next(model.parameters()).is_cuda)
    muon = Muon(matrices, lr=cfg.matrix_lr, momentum=cfg.muon_momentum, weight_decay=cfg.weight_decay,
                ns_steps=cfg.muon_ns_steps, row_normalize=cfg.muon_row_normalize)
    for opt in (adam, muon):
        for group in opt.param_groups:
            group["base_lr"] = group["lr"]
    return [adam, muon]
