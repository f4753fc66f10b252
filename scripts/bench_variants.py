"""A/B candidate speed-ups inside the whole training step, on the GPU, one process per variant:

    python3 scripts/bench_variants.py VARIANT[,VARIANT...] [pgolf bench arguments]

Each variant swaps one function of the kit for a version that computes the same thing with other kernels (the CPU
tests in tests/test_bench.py check that it does); nothing changes in the kit until a variant has been measured
faster. Run every variant on one lease: timings from different machines are not comparable.

  repeat      the kit as it is (K/V repeated to the query heads, then SDPA)
  ns_baddbmm  Muon's Newton-Schulz with the scaled adds fused into the batched matmuls (baddbmm)
  no_kernels  the PyTorch reference of every kernel in submission/kernels.py, compiled by Inductor (the kit before
              them: 90.65 vs 86.07 ms/step with them, 490 steps, one H100 lease)
  cudagraphs  torch.compile(mode="reduce-overhead"): the forward and backward replayed as CUDA graphs (87.17 vs 87.59,
              then with qat_flag 86.18 vs 86.07: no gain)
  recompute   AOTAutograd's memory-budget partitioner (budget PGOLF_MEMORY_BUDGET, default 0.8): recompute ops in
              the backward instead of saving them (Inductor's default saves the block-entry sums): 118.56 vs 87.60
              ms/step, one H100 lease (it recomputes far more than the sums)
  aggressive_fusion, combo_kernels
              Inductor settings that have no environment variable: fuse kernels without common reads; fuse
              independent kernels side by side (fewer launches). One lease, 200 steps: the kit 83.72 and 83.40
              ms/step, aggressive_fusion 83.45 (noise), combo_kernels 87.87; on the same lease through the
              environment, TORCHINDUCTOR_COOPERATIVE_REDUCTIONS=1 111.14 and TORCHINDUCTOR_MULTI_KERNEL=1 did not
              finish compiling in 100 s
  qkv_block32, qkv_block64, qkv_warps8, xsa_block32, xsa_block128
              other tile sizes (tokens per program) and warp counts for the q/k/v and XSA kernels (default: q/k/v 16
              tokens, XSA 64, 4 warps each). One lease, 200 steps, ms/step and the kit's kernels + cuDNN's helpers
              in GPU ms per step: q/k/v 32 tokens (the default then) 84.47 / 11.87, 16 tokens 84.13 / 11.60 (now
              the default), 64 tokens 84.84 / 12.41, 8 warps 84.67 / 12.33; XSA 32 tokens 84.10 / 11.84, 128
              tokens 84.57 / 12.23 (XSA's kernel time did not move: 64 stays)
  qat_flag    late QAT as a Python flag the compiled graph is guarded on (one graph per state, both compiled in the
              warmup) instead of a buffer blended in every step: no fake-quant arithmetic while QAT is off (87.63 vs
              87.67: the fake-quant kernels are 0.2 ms of the step)

Compiler settings need no variant: Inductor reads them from the environment, e.g. TORCHINDUCTOR_MAX_AUTOTUNE=1
(Triton matrix-product templates with fused epilogues, autotuned: its compile did not finish in 290 s, and its
templates measured 20-25% slower than cuBLAS at the P1 shapes) or TORCHINDUCTOR_COORDINATE_DESCENT_TUNING=1.

Adopted after measuring (now the kit's code): XSA's value normalization by rsqrt and the EMA over cached tensor
lists. With ns_baddbmm, together they measured 86.98 vs 87.70 ms/step (default recipe) and 89.55 vs 90.47 (with the
second embedding), two H100 leases; the phases put the gain in EMA (0.66-0.76 -> 0.13 ms) and fwd_bwd (0.4-0.9 ms),
none measurably in the optimizer (11.27 -> 8.36, then 9.24 -> 9.51 ms: host-bound noise), so ns_baddbmm stays here.
"""
from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

import submission.kernels
import submission.model
import submission.optim
from submission.model import fake_quant
from tools.commands.cli import main


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


def casted_linear_flag(self, x):
    w = fake_quant(self.weight, self.qat_bits) if getattr(self, "qat_on", False) else self.weight
    return F.linear(x, w.to(x.dtype))


def set_qat_flag(self, on):
    for m in self.modules():
        if isinstance(m, submission.model.CastedLinear):
            m.qat_mix.fill_(1.0 if on else 0.0)
            m.qat_on = on


def qat_flag():
    submission.model.CastedLinear.forward = casted_linear_flag
    submission.model.GPT.set_qat = set_qat_flag


def recompute():
    import torch._functorch.config
    torch._functorch.config.activation_memory_budget = float(os.environ.get("PGOLF_MEMORY_BUDGET", "0.8"))


def inductor(**settings):
    def apply_settings():
        from torch._inductor import config
        for name, value in settings.items():
            setattr(config, name, value)
    return apply_settings


def cudagraphs():
    compile_ = torch.compile
    torch.compile = lambda model, **kw: compile_(model, mode="reduce-overhead", **kw)


VARIANTS = {
    "repeat": lambda: None,
    "ns_baddbmm": lambda: setattr(submission.optim, "newton_schulz", newton_schulz_baddbmm),
    "qat_flag": qat_flag,
    "no_kernels": lambda: setattr(submission.kernels, "available", lambda *args: False),
    "cudagraphs": cudagraphs,
    "recompute": recompute,
    "aggressive_fusion": inductor(aggressive_fusion=True),
    "combo_kernels": inductor(combo_kernels=True),
    "qkv_block32": lambda: setattr(submission.kernels, "QKV_BLOCK", 32),
    "qkv_block64": lambda: setattr(submission.kernels, "QKV_BLOCK", 64),
    "qkv_warps8": lambda: setattr(submission.kernels, "QKV_WARPS", 8),
    "xsa_block32": lambda: setattr(submission.kernels, "XSA_BLOCK", 32),
    "xsa_block128": lambda: setattr(submission.kernels, "XSA_BLOCK", 128),
}


def apply(names: str) -> None:
    for name in names.split(","):
        if name not in VARIANTS:
            raise SystemExit(f"unknown variant {name!r}: expected one or more of {', '.join(VARIANTS)}")
        VARIANTS[name]()


if __name__ == "__main__":
    apply(sys.argv[1])
    import tools.bench  # noqa: F401  (after the patches: a variant of a name it imports must be set first)
    print(f"variant:{sys.argv[1]}", flush=True)
    sys.exit(main(["bench", *sys.argv[2:]]))
