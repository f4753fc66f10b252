"""Weight quantization: Hessian collection, full-Hessian GPTQ with adaptive damping, round-to-nearest, clip search."""
from __future__ import annotations

import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, nn

from eval.progress import packable_progress_bar
from submission.config import check_ranges, within

# Smallest positive float16 (a subnormal): the floor for a stored row scale, so an all-zero or tiny row never gets a
# scale that rounds to 0 in float16 and divides by zero when quantized.
MIN_FP16_SCALE = 2.0 ** -24


@dataclass
class QuantConfig:
    """How a trained model becomes integer codes. Defaults follow the SP8192 recipe (PR #1460's SD clipping and GPTQ'd
    tied embedding); RECIPE=sp1024 searches the clip per row (PR #1019)."""
    matrix_bits: int = 6
    """Attention/MLP matrices: symmetric int6 codes in [-31, 31], one float16 scale per output row."""
    embed_bits: int = 8
    """Embedding tables: int8 per row; round-to-nearest unless a Hessian is given (e.g. for a tied output head)."""
    passthrough_max_numel: int = 65_536
    """Tensors with fewer elements (gains, gates, mixes, skip weights) stay float16: quantizing them saves little."""
    act_order: bool = True
    """GPTQ quantizes columns in order of decreasing H diagonal, so the most-used inputs are fixed first and the
    remaining columns absorb their error (the GPTQ paper's "act-order"; it helps most on outlier features)."""
    block_size: int = 128
    """GPTQ lazy batch: errors inside a block are propagated column by column, to later blocks in one matmul."""
    damp: float = 0.01
    """Damping added to H's diagonal as a fraction of its mean diagonal (the GPTQ paper's lambda)."""
    damp_growth: float = 10.0
    """When Cholesky fails, damping is multiplied by this and the factorization retried."""
    max_damp_retries: int = 6
    """Retries before giving up: 0.01 -> 1e4 x mean diag. A Gram matrix X^T X, even rank-deficient and rounded to
    bfloat16, has no eigenvalue below -2^-9 * n * mean diag (-3 x mean diag for n = 1536), so running out means H
    is not a Gram matrix (a bug upstream)."""
    clip_sigmas: tuple[float, ...] = (3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 12.85)
    """Per-row clip candidates k * std(row); absmax (no clip) is always a candidate too. Each row keeps the candidate
    with the lowest H-weighted error (GPTQ) or squared error (RTN). 12.85 is the SD-clip record's single choice;
    rows of trained matrices are heavy-tailed, so the best clip spreads from ~3 sigma to absmax."""
    min_clip_sigma: float = 0.0
    """Floor on every row's clip in stds (0: none): each candidate becomes max(clip, min_clip_sigma * std), so rows
    whose absmax is below it get coarser steps than their range needs: fewer bits per code for more error. Rows of a
    Muon-trained P1 model are close to Gaussian (absmax ~3-4 sigma): every candidate ended at absmax and the int6
    codes took ~5.3 bits each (18.0 MB). The quantize stage raises the floor until the model fits the cap."""
    clip_policy: str = "sdclip"
    """"search": each row keeps the best of clip_sigmas (capped at its absmax) and absmax; "sdclip": one clip per
    row, k x std(row), not capped (PR #1460's SD clipping): k = sdclip_sigmas for matrices, sdclip_embed_sigmas for
    embedding tables. A clip beyond the absmax means coarser steps than the range needs: fewer bits per code."""
    sdclip_sigmas: float = 12.85
    """SD clipping's k for int6 matrices: step = 12.85 std / 31, ~0.41 std."""
    sdclip_embed_sigmas: float = 20.0
    """SD clipping's k for int8 embedding tables: step = 20 std / 127."""
    lqer_rank: int = 0
    """LQER: each GPTQ'd matrix also stores a rank-r correction A @ B of its quantization error (float16 factors,
    r x (rows + cols) x 2 bytes), the best of its rank in the calibration inputs' norm; 0 off. The records claim
    ~0.009 BPB of the int6 cost back at rank 4; its bytes come out of the budget the codes would have had."""
    bit_allocation: bool = True
    """Spend the byte budget where the loss per byte is lowest (tools/quant/allocate.py): each quantized matrix gets its
    own SD-clip k, a multiplier from allocation_grid times the recipe's, chosen from its measured loss sensitivity and
    its codes' entropy, so the model fills the cap with finer steps where they matter. Needs clip_policy "sdclip".
    On P1 at 8192 (three checkpoints, H100) the roundtrip gap was 0.0068-0.0072 with it, 0.0091-0.0095 with one clip
    (docs/MEASUREMENTS.md); the sp1024 recipe keeps one clip (its clip_policy is "search")."""
    allocation_probes: tuple[float, ...] = (1.0, 1.5, 2.0)
    """Multipliers of the recipe's clip at which each matrix is rounded alone to measure its loss sensitivity."""
    allocation_grid: tuple[float, ...] = (0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.25, 1.4, 1.6, 1.8, 2.0)
    """The multipliers of the recipe's clip a matrix may get (finer steps below 1, coarser above)."""
    allocation_seqs: int = 16
    """Calibration sequences (the first ones) the sensitivity probes score on; at most calib_seqs."""
    gptq_tied_embedding: bool = True
    """GPTQ the tied embedding as the output head (the Hessian of the final hidden states) instead of rounding it to
    nearest: the head's logits are what the bytes are scored on, the input lookup tolerates the error better."""

    # Each number's allowed values (submission.config.check_ranges); the others are checked in __post_init__.
    RANGES: typing.ClassVar[dict] = {
        "matrix_bits": ("[2, 8]", " (codes are stored as int8)"),
        "embed_bits": ("[2, 8]", " (codes are stored as int8)"),
        "passthrough_max_numel": ">= 0", "block_size": ">= 1", "damp": "> 0",
        "damp_growth": ("> 1", " (each retry must damp more)"), "max_damp_retries": ">= 0",
        "min_clip_sigma": (">= 0", " (0 = no floor)"), "sdclip_sigmas": "> 0", "sdclip_embed_sigmas": "> 0",
        "lqer_rank": ("[0, 256]", " (0 = off; the records used 4)"), "allocation_seqs": ">= 1"}

    def __post_init__(self):
        check_ranges(self)
        if not all(within(k, "> 0") for k in self.clip_sigmas):
            raise ValueError(f"CLIP_SIGMAS={','.join(map(str, self.clip_sigmas))}: clips must be positive multiples of "
                             f"std (QuantConfig.clip_sigmas={self.clip_sigmas}; e.g. CLIP_SIGMAS=3,6,12.85)")
        self.clip_sigmas = tuple(float(k) for k in self.clip_sigmas)
        if self.clip_policy not in CLIP_POLICIES:
            raise ValueError(f"CLIP_POLICY={self.clip_policy!r}: choose one of {', '.join(CLIP_POLICIES)}")
        for key in ("allocation_probes", "allocation_grid"):
            values = tuple(float(m) for m in getattr(self, key))
            if not values or not all(within(m, "> 0") for m in values):
                raise ValueError(f"{key.upper()}={','.join(map(str, getattr(self, key)))}: need positive multipliers "
                                 f"of the recipe's clip (e.g. {key.upper()}=0.8,1,1.25)")
            setattr(self, key, values)
        if self.bit_allocation and self.clip_policy != "sdclip":
            raise ValueError(f"BIT_ALLOCATION=1 with CLIP_POLICY={self.clip_policy!r}: the allocation scales SD "
                             "clipping's k per matrix; set CLIP_POLICY=sdclip (the default), or BIT_ALLOCATION=0 for "
                             "one clip")

    def row_clips(self, embedding: bool = False) -> tuple[tuple[float, ...], bool]:
        """(clip candidates in row stds, whether they are searched: capped at absmax, absmax a candidate too)."""
        if self.clip_policy == "sdclip":
            return (self.sdclip_embed_sigmas if embedding else self.sdclip_sigmas,), False
        return self.clip_sigmas, True


CLIP_POLICIES = ("search", "sdclip")


@dataclass
class QuantTensor:
    """A matrix stored as symmetric integer codes with one scale per row: W ~= codes * scales[:, None] (+ A @ B, a
    low-rank correction of the error, when LQER made one)."""
    codes: Tensor   # int8 [rows, cols], within [-(2^(bits-1) - 1), 2^(bits-1) - 1]
    scales: Tensor  # float16 [rows]
    bits: int
    lowrank: tuple[Tensor, Tensor] | None = None  # float16 A [rows, r], B [r, cols]

    def dequantize(self) -> Tensor:
        W = dequantize(self.codes, self.scales)
        return W if self.lowrank is None else W + self.lowrank[0].float() @ self.lowrank[1].float()


def lqer_factors(error: Tensor, H: Tensor, rank: int, damp: float = 0.01) -> tuple[Tensor, Tensor]:
    """float16 A [rows, r], B [r, cols] minimizing tr((E - A B) H (E - A B)^T), the output error over the calibration
    inputs (H = X^T X, damped like GPTQ's): with H = L L^T, the truncated SVD U S V^T of E L gives A = U_r S_r and
    B = V_r^T L^-1."""
    H = H.detach().double().to(error.device)
    H = H + damp * H.diagonal().mean().clamp_min(1e-12) * torch.eye(H.size(0), dtype=H.dtype, device=H.device)
    L = torch.linalg.cholesky(H)
    U, S, Vh = torch.linalg.svd(error.double() @ L, full_matrices=False)
    r = min(rank, S.numel())
    B = torch.linalg.solve_triangular(L.T, Vh[:r].T, upper=True).T
    return (U[:, :r] * S[:r]).half(), B.half()


def qmax_for(bits: int) -> int:
    """Largest code magnitude of symmetric `bits`-bit quantization (31 for int6): -qmax..qmax, zero exact."""
    return 2 ** (bits - 1) - 1


def dequantize(codes: Tensor, scales: Tensor) -> Tensor:
    """float32 weights from int codes [rows, cols] and per-row scales [rows]."""
    return codes.float() * scales.float()[:, None]


def h_weighted_error(W: Tensor, Wq: Tensor, H: Tensor) -> float:
    """trace((W - Wq) H (W - Wq)^T): the summed squared output error over the calibration inputs (H = X^T X)."""
    D = (W.double() - Wq.double()).to(H.device)
    return float(((D @ H.double()) * D).sum())


# ---------------------------------------------------------------------------------------------------------------
# Hessians


@dataclass
class HessianStats:
    """H = X^T X of each module's inputs, summed over calibration positions (float32, on the module's device)."""
    hessians: dict[str, Tensor]
    tokens: dict[str, int]  # input positions accumulated into each H (a module called twice per step counts twice)
    batches: int = 0


def collect_hessians(model: nn.Module, batches: Iterable, modules: Mapping[str, nn.Module],
                     forward: Callable[[object], object] | None = None, progress: bool = True,
                     outputs: Mapping[str, nn.Module] | None = None) -> HessianStats:
    """Run calibration batches through `forward` (default: model(batch)) and accumulate each module's input Gram;
    for `outputs` (name -> module), the Gram of the module's output (e.g. the final norm's, which a tied output head
    reads: the embedding's Hessian as a head).

    Accumulation is float64 with autocast off. Trainers enable TF32/bfloat16, and a Gram matrix rounded that way is
    not positive semi-definite: measured, bf16-rounded X^T X of 64 to 4096 tokens failed Cholesky at damping 0.01
    where the exact one did not (the record stack's GPTQ died with 'not positive-definite' on 2 x 2048 tokens).
    Hook the plain modules, not a torch.compile'd wrapper, whose graph may skip module hooks.
    """
    forward = forward or model
    sums: dict[str, Tensor] = {}
    tokens: dict[str, int] = {name: 0 for name in modules}

    outputs = dict(outputs or {})
    tokens.update({name: 0 for name in outputs})

    def make_hook(name: str, read_output: bool = False):
        def hook(module, args, output):
            x = (output if read_output else args[0]).detach()
            with torch.autocast(device_type=x.device.type, enabled=False):
                x = x.reshape(-1, x.size(-1)).double()
                if name not in sums:
                    sums[name] = torch.zeros(x.size(1), x.size(1), dtype=torch.float64, device=x.device)
                sums[name].addmm_(x.T, x)
            tokens[name] += x.size(0)
        return hook

    handles = [module.register_forward_hook(make_hook(name)) for name, module in modules.items()]
    handles += [module.register_forward_hook(make_hook(name, True)) for name, module in outputs.items()]
    was_training = model.training
    model.eval()
    count = 0
    try:
        with torch.no_grad():
            for batch in packable_progress_bar(batches, desc="gptq hessians", unit="batch", disable=not progress):
                forward(batch)
                count += 1
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    missing = [name for name in [*modules, *outputs] if name not in sums]
    if missing:
        raise RuntimeError(f"collect_hessians: modules {missing} saw no input in {count} batches (not on the "
                           "forward path, or no batches given)")
    return HessianStats({name: h.float() for name, h in sums.items()}, tokens, count)


# ---------------------------------------------------------------------------------------------------------------
# Quantizers


def candidate_scales(W: Tensor, bits: int, clip_sigmas: tuple[float, ...], min_clip_sigma: float = 0.0,
                     search: bool = True) -> Tensor:
    """Row scales [C, rows] for clips min(k * std(row), absmax(row)) for each k, then absmax itself (search); or
    k * std(row) for each k as is (SD clipping, search=False). Each is raised to at least min_clip_sigma * std(row).

    Scales are rounded to float16 (how they are stored) before any code is computed against them.
    """
    W = W.float()
    absmax = W.abs().amax(dim=1)
    std = W.std(dim=1) if W.size(1) > 1 else absmax
    clips = [torch.minimum(k * std, absmax) for k in clip_sigmas] + [absmax] if search else \
        [k * std for k in clip_sigmas]
    clips = [torch.maximum(clip, min_clip_sigma * std) for clip in clips]
    scales = (torch.stack(clips) / qmax_for(bits)).clamp_min(MIN_FP16_SCALE).half()
    if not torch.isfinite(scales).all():
        raise ValueError(f"weights with absmax {float(absmax.max()):.3g} overflow a float16 scale")
    return scales.float()


def _pick_rows(codes: Tensor, scales: Tensor, errors: Tensor, labels: list[str]) -> tuple[Tensor, Tensor, dict]:
    """Per row, the candidate with the lowest error. codes [C, rows, cols], scales/errors [C, rows]."""
    best = errors.argmin(dim=0)
    rows = torch.arange(codes.size(1), device=codes.device)
    counts = torch.bincount(best, minlength=len(labels)).tolist()
    return codes[best, rows], scales[best, rows].half(), {lab: n for lab, n in zip(labels, counts) if n}


def _clip_labels(clips: tuple[float, ...], search: bool) -> list[str]:
    return [f"{k:g}sd" for k in clips] + (["absmax"] if search else [])


def rtn_quantize(W: Tensor, bits: int, cfg: QuantConfig | None = None, embedding: bool = False
                 ) -> tuple[Tensor, Tensor, dict]:
    """Round-to-nearest per row with the clip chosen per row by squared error. Returns (codes, scales, info)."""
    cfg = cfg or QuantConfig()
    W = W.detach().float()
    if W.ndim != 2:
        raise ValueError(f"rtn_quantize: expected a matrix [rows, cols], got shape {list(W.shape)}")
    qmax = qmax_for(bits)
    clips, search = cfg.row_clips(embedding)
    scales = candidate_scales(W, bits, clips, cfg.min_clip_sigma, search)                      # [C, rows]
    codes = torch.clamp(torch.round(W[None] / scales[:, :, None]), -qmax, qmax)  # [C, rows, cols]
    errors = (W[None] - codes * scales[:, :, None]).square().sum(dim=2)
    codes, scales, clip_choice = _pick_rows(codes.to(torch.int8), scales, errors, _clip_labels(clips, search))
    return codes, scales, {"method": "rtn", "bits": bits, "clip_choice": clip_choice,
                           "sq_error": float(errors.min(dim=0).values.sum())}


def inverse_hessian_factor(H: Tensor, cfg: QuantConfig) -> tuple[Tensor, float, int]:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1 in float64, growing damp until it factors.

    Returns (factor, damp used as a fraction of mean diag, retries).
    """
    mean_diag = H.diagonal().mean()
    damp = cfg.damp
    for retry in range(cfg.max_damp_retries + 1):
        damped = H.clone()
        damped.diagonal().add_(damp * mean_diag)
        L, info = torch.linalg.cholesky_ex(damped)
        if info.item() == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if info.item() == 0 and torch.isfinite(U).all():
                return U, damp, retry
        damp *= cfg.damp_growth
    raise RuntimeError(f"GPTQ: Cholesky failed even with damping {damp / cfg.damp_growth:g} x mean diag after "
                       f"{cfg.max_damp_retries} retries: H is not a Gram matrix X^T X (check how it was accumulated)")


def _gptq_columns(W: Tensor, U: Tensor, scales: Tensor, qmax: int, block_size: int) -> Tensor:
    """GPTQ's column loop: quantize column j, push its error onto columns > j through the inverse-Hessian factor.

    W [rows, cols] float32 (consumed), U upper factor of H^-1 [cols, cols], scales [rows]. Returns int8 codes.
    """
    rows, cols = W.shape
    codes = torch.empty(rows, cols, dtype=torch.int8, device=W.device)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        block = W[:, i1:i2].clone()
        U_block = U[i1:i2, i1:i2]
        errors = torch.empty(rows, i2 - i1, device=W.device)
        for j in range(i2 - i1):
            w = block[:, j]
            q = torch.clamp(torch.round(w / scales), -qmax, qmax)
            codes[:, i1 + j] = q.to(torch.int8)
            err = (w - q * scales) / U_block[j, j]
            block[:, j:] -= err[:, None] * U_block[j, j:][None, :]
            errors[:, j] = err
        if i2 < cols:  # lazy batch update: the whole block's error reaches later columns in one matmul
            W[:, i2:] -= errors @ U[i1:i2, i2:]
    return codes


def gptq_quantize(W: Tensor, H: Tensor, bits: int, cfg: QuantConfig | None = None, embedding: bool = False
                  ) -> tuple[Tensor, Tensor, dict]:
    """Full-Hessian GPTQ of W [rows, cols] given H = X^T X [cols, cols]. Returns (codes int8, scales fp16, info).

    Runs on H's device. Every clip candidate is quantized in one stacked pass (rows are independent in GPTQ, so each
    row may keep a different candidate); each row keeps the candidate with the lowest H-weighted error. The column
    loop is launch-bound on a GPU: the record's 66 matrices took 12.5 s on one H100 with 8 candidates and 12.4 s
    with 1, so the search is free. Dead input
    columns (H diagonal <= 0) get code 0. info: damp (fraction of mean diag), damp_retries, dead_columns,
    clip_choice (rows per candidate), h_error, h_error_rel (h_error / trace(W H W^T)).
    """
    cfg = cfg or QuantConfig()
    rows, cols = W.shape
    if H.shape != (cols, cols):
        raise ValueError(f"gptq_quantize: W is {list(W.shape)} but H is {list(H.shape)}; H must be [{cols}, {cols}]")
    device = H.device
    H = H.detach().to(torch.float64)
    if not torch.isfinite(H).all():
        raise ValueError("gptq_quantize: H has inf/NaN entries (the model produced non-finite activations during "
                         "calibration)")
    W = W.detach().to(device=device, dtype=torch.float32)
    qmax = qmax_for(bits)

    diag = H.diagonal()
    dead = diag <= 0
    H_work = H.clone()
    H_work[dead, :] = 0
    H_work[:, dead] = 0
    # A dead column's diagonal only needs to be positive; the live mean keeps the damping scale unchanged.
    H_work[dead, dead] = diag[~dead].mean() if bool((~dead).any()) else 1.0
    W_live = W.clone()
    W_live[:, dead] = 0

    perm = (torch.argsort(H_work.diagonal(), descending=True, stable=True) if cfg.act_order
            else torch.arange(cols, device=device))
    inverse_perm = torch.argsort(perm)
    U, damp, retries = inverse_hessian_factor(H_work[perm][:, perm], cfg)

    clips, search = cfg.row_clips(embedding)
    scales = candidate_scales(W, bits, clips, cfg.min_clip_sigma, search)             # [C, rows]
    n_cand = scales.size(0)
    stacked = W_live[:, perm].repeat(n_cand, 1)                       # [C * rows, cols], candidate-major
    codes = _gptq_columns(stacked, U.float(), scales.reshape(-1), qmax, cfg.block_size)
    codes = codes.view(n_cand, rows, cols)[:, :, inverse_perm]
    # The objective is the true output error: undamped H, all columns (dead ones have zero rows in H).
    diff = W[None] - codes.float() * scales[:, :, None]
    errors = ((diff @ H.float()) * diff).sum(dim=2)                  # [C, rows]
    codes, row_scales, clip_choice = _pick_rows(codes, scales, errors, _clip_labels(clips, search))
    h_error = float(errors.min(dim=0).values.double().sum())
    total = float(((W.double() @ H) * W.double()).sum())
    return codes, row_scales, {
        "method": "gptq", "bits": bits, "damp": damp, "damp_retries": retries, "dead_columns": int(dead.sum()),
        "clip_choice": clip_choice, "h_error": h_error, "h_error_rel": h_error / total if total > 0 else 0.0}


# ---------------------------------------------------------------------------------------------------------------
# Whole state dicts


@dataclass
class QuantReport:
    """What quantize_state_dict did to each tensor, for the log."""
    methods: dict[str, str] = field(default_factory=dict)   # name -> "gptq int6" / "rtn int8" / "fp16" / "keep"
    infos: dict[str, dict] = field(default_factory=dict)    # name -> gptq/rtn info

    def lines(self) -> list[str]:
        out = []
        for name, method in self.methods.items():
            info = self.infos.get(name, {})
            extra = ""
            if info.get("method") == "gptq":
                extra = (f" damp:{info['damp']:g} damp_retries:{info['damp_retries']}"
                         f" h_error_rel:{info['h_error_rel']:.3e}")
            out.append(f"quant:{name} method:{method.replace(' ', '_')}{extra}")
        return out


def quantize_state_dict(state_dict: Mapping[str, Tensor], hessians: Mapping[str, Tensor],
                        embedding_names: Iterable[str] = (), cfg: QuantConfig | None = None,
                        progress: bool = True, tensor_sigmas: Mapping[str, float] | None = None
                        ) -> tuple[dict[str, QuantTensor | Tensor], QuantReport]:
    """Quantize every tensor by the config's rules; the result goes straight to tools.pack.artifact.pack_artifact.

    - fewer than cfg.passthrough_max_numel elements, or not a matrix: float tensors kept as float16, others as is;
    - a matrix with a Hessian: GPTQ (embed_bits when named in embedding_names, e.g. a tied head; else matrix_bits);
    - an embedding table without a Hessian: round-to-nearest at embed_bits;
    - any other matrix: round-to-nearest at matrix_bits (the report says it had no Hessian).
    tensor_sigmas (name -> k) replaces SD clipping's k for those tensors (the bit allocation's choice).
    """
    cfg = cfg or QuantConfig()
    embedding_names = set(embedding_names)
    unknown = embedding_names - set(state_dict)
    if unknown:
        raise ValueError(f"quantize_state_dict: embedding names {sorted(unknown)} are not in the state dict")
    out: dict[str, QuantTensor | Tensor] = {}
    report = QuantReport()
    tensors = list(state_dict.items())
    for name, tensor in packable_progress_bar(tensors, desc="quantize", unit="tensor", disable=not progress):
        tensor = tensor.detach()
        if tensor.ndim != 2 or tensor.numel() < cfg.passthrough_max_numel:
            if tensor.is_floating_point():
                out[name], report.methods[name] = tensor.to(torch.float16).cpu(), "fp16"
            else:
                out[name], report.methods[name] = tensor.cpu(), "keep"
            continue
        embedding = name in embedding_names
        bits = cfg.embed_bits if embedding else cfg.matrix_bits
        k = (tensor_sigmas or {}).get(name)
        own = cfg if k is None else replace(cfg, sdclip_sigmas=k, sdclip_embed_sigmas=k)
        lowrank = None
        if name in hessians:
            codes, scales, info = gptq_quantize(tensor, hessians[name], bits, own, embedding)
            if cfg.lqer_rank:
                error = tensor.float().to(codes.device) - dequantize(codes, scales)
                lowrank = tuple(f.cpu() for f in lqer_factors(error, hessians[name], cfg.lqer_rank, cfg.damp))
        else:
            codes, scales, info = rtn_quantize(tensor, bits, own, embedding)
        out[name] = QuantTensor(codes.cpu(), scales.cpu(), bits, lowrank)
        report.methods[name] = f"{info['method']} int{bits}"
        report.infos[name] = info
    return out, report
