"""A/B candidate speed-ups inside the whole training step, on the GPU, one process per variant:

    python3 scripts/bench_variants.py VARIANT[,VARIANT...] [pgolf bench arguments]

Each variant swaps one function of the kit for a version that computes the same thing with other kernels (the CPU
tests in tests/test_bench.py check that it does); nothing changes in the kit until a variant has been measured
faster. Run every variant on one lease: timings from different machines are not comparable.

  repeat      the kit as it is (K/V repeated to the query heads, then SDPA)
  gqa         SDPA with enable_gqa=True on the 4 KV heads (measured slower: 90.58 vs 86.29 ms/step, H100)
  xsa_rsqrt   XSA's value normalization as v * rsqrt(sum v^2 + eps): no norm/clamp/masked_fill in its backward
  ns_baddbmm  Muon's Newton-Schulz with the scaled adds fused into the batched matmuls (baddbmm)
  ema_lists   the EMA update on cached tensor lists instead of a state_dict() per step
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

import submission.model
import submission.optim
import submission.train
from tools.cli import main


def gqa_attention(q, k, v):
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                       enable_gqa=True)
    return y.transpose(1, 2)


def xsa_rsqrt(y, v):
    B, T, H, D = y.shape
    hkv = v.size(2)
    yg = y.reshape(B, T, hkv, H // hkv, D)
    vf = v.float()
    vn = (vf * torch.rsqrt(vf.square().sum(-1, keepdim=True) + 1e-24)).to(y.dtype).unsqueeze(3)
    yg = yg - (yg * vn).sum(-1, keepdim=True) * vn
    return yg.reshape(B, T, H, D)


def newton_schulz_baddbmm(G, steps):
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.to(torch.bfloat16 if G.is_cuda else torch.float32)
    transposed = X.size(-2) > X.size(-1)
    if transposed:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        A = X @ X.mT
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)
        X = torch.baddbmm(X, B, X, beta=a)
    return X.mT if transposed else X


class ListEMA(submission.train.EMA):
    """The kit's EMA, its live tensors collected once (parameters and buffers keep their identity in training)."""

    @torch.no_grad()
    def update(self, model):
        if not hasattr(self, "_live"):
            state = model.state_dict()
            self._live = [state[k] for k in self.shadow]
            self._shadow = list(self.shadow.values())
            self._cast = any(t.dtype != torch.float32 for t in self._live)
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        live = [t.float() for t in self._live] if self._cast else self._live
        torch._foreach_lerp_(self._shadow, live, 1 - decay)


VARIANTS = {
    "repeat": lambda: None,
    "gqa": lambda: setattr(submission.model, "causal_attention", gqa_attention),
    "xsa_rsqrt": lambda: setattr(submission.model, "remove_self_value", xsa_rsqrt),
    "ns_baddbmm": lambda: setattr(submission.optim, "newton_schulz", newton_schulz_baddbmm),
    "ema_lists": lambda: setattr(submission.train, "EMA", ListEMA),
}


def apply(names: str) -> None:
    for name in names.split(","):
        if name not in VARIANTS:
            raise SystemExit(f"unknown variant {name!r}: expected one or more of {', '.join(VARIANTS)}")
        VARIANTS[name]()


if __name__ == "__main__":
    apply(sys.argv[1])
    import tools.bench  # noqa: F401  (after the patches: it binds EMA by name at import)
    print(f"variant:{sys.argv[1]}", flush=True)
    sys.exit(main(["bench", *sys.argv[2:]]))
