"""Bit allocation under the byte cap: each quantized matrix gets its own SD-clip step, spent where the loss per byte
is lowest, instead of one clip for every matrix (QuantConfig.bit_allocation).

The model: a matrix t rounded with step multiplier m (its clip k_t = m x the recipe's k) adds loss
D_t(m) = a_t m^2 (uniform rounding noise of variance step^2 / 12, no clipping at SD-clip's 12.85-20 sigma), and its
codes cost R_t(m) bytes (their order-0 entropy, counted on the codes themselves). a_t is measured on calibration
tokens with only t rounded, at a few multipliers, fitted through the origin. Each probe is a symmetric difference,
(L(W + d) + L(W - d)) / 2 - L(W) with d the rounding error: it cancels the first-order term g . d, which on a finite
batch is noise of either sign (measured alone, rounding a matrix of a barely trained model often lowered the loss),
and keeps the curvature term d^T H d / 2 that rounding costs on average. The allocation then picks
one multiplier per matrix on a grid to minimize sum D subject to sum R <= budget: greedy over each matrix's lower
convex hull of (R, D), steepest loss-per-byte first (the Lagrangian solution, exact at the hull's corners).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from eval.progress import packable_progress_bar
from submission.model import GPT, plain_linears
from tools.quant.gptq import QuantConfig, dequantize, rtn_quantize


@dataclass
class Probe:
    """One matrix's measured sensitivity and its code bytes on the allocation grid."""
    name: str
    numel: int
    loss_coef: float           # a_t: loss increase (nats/token) = a_t m^2
    probe_loss: list[float]    # measured loss increase (symmetric difference) at each probe multiplier
    grid_bytes: list[float]    # estimated code + scale bytes at each grid multiplier


@dataclass
class Allocation:
    """The chosen multiplier per matrix and what the model predicts for it."""
    multipliers: dict[str, float]
    predicted_bytes: float      # sum of the chosen grid_bytes
    predicted_loss: float       # sum of a_t m_t^2
    uniform_loss: float         # sum of a_t (all at 1)


def entropy_bytes(codes: Tensor) -> float:
    """Order-0 entropy of integer codes in bytes, plus 2 bytes per row for its float16 scale: what an entropy coder
    needs for them when it sees no structure beyond the codes' histogram."""
    counts = torch.bincount((codes.reshape(-1).long() + 128).cpu(), minlength=256).double()
    p = counts[counts > 0] / codes.numel()
    return float(-(p * p.log2()).sum()) * codes.numel() / 8 + 2 * codes.size(0)


def base_sigmas(cfg: QuantConfig, embedding: bool) -> float:
    """The recipe's SD-clip k for a matrix (embedding: its table k)."""
    return cfg.sdclip_embed_sigmas if embedding else cfg.sdclip_sigmas


def rounded(W: Tensor, bits: int, cfg: QuantConfig, sigmas: float, embedding: bool) -> tuple[Tensor, Tensor]:
    """W rounded to nearest with SD clip k = sigmas: (codes, scales)."""
    k = replace(cfg, sdclip_sigmas=sigmas, sdclip_embed_sigmas=sigmas)
    codes, scales, _ = rtn_quantize(W, bits, k, embedding)
    return codes, scales


@torch.no_grad()
def probe_loss(model: GPT, tokens: Tensor, batch_seqs: int) -> float:
    """Mean next-token loss (nats) of the model on tokens [N, T], in the precision the model is evaluated in."""
    device = model.tok_emb.weight.device
    total, count = 0.0, 0
    for i in range(0, tokens.size(0), batch_seqs):
        x = tokens[i:i + batch_seqs].to(device)
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(x[:, :-1], x[:, 1:])
        n = x[:, 1:].numel()
        total, count = total + float(loss) * n, count + n
    return total / count


def probe(model: GPT, names: Sequence[str], embedding_names: set[str], cfg: QuantConfig, tokens: Tensor,
          batch_seqs: int, progress: bool = True) -> list[Probe]:
    """Each matrix's a_t (rounded alone at cfg.allocation_probes multipliers, the rest of the model as trained: two
    scored passes per multiplier, the symmetric difference) and its code bytes at every cfg.allocation_grid multiplier.
    The model's weights are restored after each probe."""
    was_training = model.training
    model.eval()
    out = []
    try:
        with plain_linears(model):
            base = probe_loss(model, tokens, batch_seqs)
            for name in packable_progress_bar(names, desc="bit allocation probes", unit="matrix", disable=not progress):
                param = model.get_parameter(name)
                kept = param.detach().clone()
                embedding = name in embedding_names
                bits = cfg.embed_bits if embedding else cfg.matrix_bits
                k0 = base_sigmas(cfg, embedding)
                losses = []
                for m in cfg.allocation_probes:
                    delta = dequantize(*rounded(kept, bits, cfg, m * k0, embedding)).to(param.dtype) - kept
                    pair = []
                    for sign in (1, -1):  # W + delta is the rounded matrix; W - delta its mirror image
                        param.data.copy_(kept + sign * delta)
                        pair.append(probe_loss(model, tokens, batch_seqs))
                    losses.append(sum(pair) / 2 - base)
                param.data.copy_(kept)
                m2 = [m * m for m in cfg.allocation_probes]
                coef = sum(d * x for d, x in zip(losses, m2)) / sum(x * x for x in m2)  # least squares through 0
                grid = [entropy_bytes(rounded(kept, bits, cfg, m * k0, embedding)[0]) for m in cfg.allocation_grid]
                out.append(Probe(name, kept.numel(), max(coef, 0.0), losses, grid))
    finally:
        model.train(was_training)
    return out


def _hull(points: list[tuple[float, float, int]]) -> list[tuple[float, float, int]]:
    """Lower convex hull of (bytes, loss, grid index), from fewest bytes to most, keeping only points whose loss falls
    as bytes grow: the choices a rate-distortion allocation can take."""
    pts = sorted(points)
    hull: list[tuple[float, float, int]] = []
    for p in pts:
        if hull and p[1] >= hull[-1][1]:
            continue  # more bytes for no less loss: never worth taking
        while len(hull) >= 2:
            (r1, d1, _), (r2, d2, _) = hull[-2], hull[-1]
            # drop the middle point when it lies on or above the chord from hull[-2] to p
            if (d2 - d1) * (p[0] - r1) >= (p[1] - d1) * (r2 - r1):
                hull.pop()
            else:
                break
        hull.append(p)
    return hull


def allocate(probes: Sequence[Probe], grid: Sequence[float], budget_bytes: float) -> Allocation:
    """One grid multiplier per matrix, minimizing sum a_t m^2 subject to sum bytes <= budget_bytes.

    Every matrix starts at its cheapest hull point; then the hull steps are taken in order of loss saved per byte
    added while they fit (a matrix's steps are taken in its own order: on a convex hull their slopes fall). Raises
    ValueError when even the cheapest choice of every matrix exceeds the budget."""
    hulls = [_hull([(p.grid_bytes[j], p.loss_coef * m * m, j) for j, m in enumerate(grid)]) for p in probes]
    pos = [0] * len(probes)
    used = sum(h[0][0] for h in hulls)
    if used > budget_bytes:
        raise ValueError(f"bit allocation: the coarsest grid step ({max(grid):g} x the recipe's clip) on every matrix "
                         f"still needs {used:,.0f} code bytes, over the {budget_bytes:,.0f} left for them: raise "
                         "ALLOCATION_GRID's largest multiplier, lower MATRIX_BITS, or shrink the model")
    steps = []
    for t, h in enumerate(hulls):
        for i in range(1, len(h)):
            slope = (h[i - 1][1] - h[i][1]) / max(h[i][0] - h[i - 1][0], 1e-9)
            steps.append((-slope, t, i))
    blocked = set()
    for _, t, i in sorted(steps):
        if t in blocked or pos[t] != i - 1:
            continue
        extra = hulls[t][i][0] - hulls[t][i - 1][0]
        if used + extra > budget_bytes:
            blocked.add(t)  # its later steps cost more still
            continue
        used += extra
        pos[t] = i
    chosen = {p.name: grid[hulls[t][pos[t]][2]] for t, p in enumerate(probes)}
    return Allocation(chosen, used, sum(p.loss_coef * chosen[p.name] ** 2 for p in probes),
                      sum(p.loss_coef for p in probes))


def single_clip_bytes(probes: Sequence[Probe], grid: Sequence[float]) -> float:
    """Estimated code bytes with every matrix at the grid multiplier nearest 1 (the recipe's single clip)."""
    one = min(range(len(grid)), key=lambda j: abs(grid[j] - 1.0))
    return sum(p.grid_bytes[one] for p in probes)


def tensor_sigmas(allocation: Allocation, cfg: QuantConfig, embedding_names: set[str]) -> dict[str, float]:
    """Each matrix's SD-clip k from its multiplier (quantize_state_dict's tensor_sigmas)."""
    return {n: m * base_sigmas(cfg, n in embedding_names) for n, m in allocation.multipliers.items()}


def quantized_names(state: Mapping[str, Tensor], cfg: QuantConfig) -> list[str]:
    """The tensors quantize_state_dict turns into integer codes (matrices at or above the passthrough size)."""
    return [n for n, t in state.items() if t.ndim == 2 and t.numel() >= cfg.passthrough_max_numel]
