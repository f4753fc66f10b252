"""Fused Triton kernels for the GPU training step, as torch.library custom ops (torch.compile keeps them whole).

Each computes what model.py computes without it (the CPU, and a machine without Triton, run that reference):
xsa = model.xsa_reference, qkv_prep = Attention's q/k RMSNorm + partial RoPE + q gain + the K/V repeat for SDPA, and
embedding = F.embedding with ATen's sort-based backward. tests/test_kernels.py runs the Triton code through Triton's
interpreter on the CPU, and compiled in bf16 on a GPU.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None


def available(x: Tensor, head_dim: int = 64) -> bool:
    """Whether the kernels run for tensors like x: on a CUDA device with Triton, heads of a power-of-two size."""
    return triton is not None and x.is_cuda and head_dim >= 16 and head_dim & (head_dim - 1) == 0


if triton is not None:
    @triton.jit
    def _xsa_fwd(Y, V, O, T, N, syb, syt, syh, svb, svt, svh, G: tl.constexpr, D: tl.constexpr,
                 BLOCK: tl.constexpr):
        # One program: BLOCK tokens x one KV head and its G query heads. u = v/|v|; o = y - (y.u) u, in fp32.
        rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        kv = tl.program_id(1)
        mask = (rows < N)[:, None]
        b, t, d = rows // T, rows % T, tl.arange(0, D)
        v = tl.load(V + (b * svb + t * svt + kv * svh)[:, None] + d[None, :], mask=mask).to(tl.float32)
        u = v * tl.rsqrt(tl.sum(v * v, 1) + 1e-24)[:, None]
        for g in tl.static_range(G):
            h = kv * G + g
            y = tl.load(Y + (b * syb + t * syt + h * syh)[:, None] + d[None, :], mask=mask).to(tl.float32)
            o = y - tl.sum(y * u, 1)[:, None] * u
            tl.store(O + (rows * (tl.num_programs(1) * G) + h)[:, None] * D + d[None, :], o.to(O.dtype.element_ty),
                     mask=mask)

    @triton.jit
    def _xsa_bwd(Y, V, GO, GY, GV, T, N, syb, syt, syh, svb, svt, svh, G: tl.constexpr, D: tl.constexpr,
                 BLOCK: tl.constexpr):
        # dy = g - (g.u) u;  du = -sum over the G heads of ((y.u) g + (g.u) y);  dv = (du - (du.u) u) / |v|
        rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        kv, hkv = tl.program_id(1), tl.num_programs(1)
        mask = (rows < N)[:, None]
        b, t, d = rows // T, rows % T, tl.arange(0, D)
        v = tl.load(V + (b * svb + t * svt + kv * svh)[:, None] + d[None, :], mask=mask).to(tl.float32)
        inv = tl.rsqrt(tl.sum(v * v, 1) + 1e-24)[:, None]
        u = v * inv
        du = tl.zeros((BLOCK, D), tl.float32)
        for g in tl.static_range(G):
            h = kv * G + g
            y = tl.load(Y + (b * syb + t * syt + h * syh)[:, None] + d[None, :], mask=mask).to(tl.float32)
            at = (rows * (hkv * G) + h)[:, None] * D + d[None, :]
            go = tl.load(GO + at, mask=mask).to(tl.float32)
            s, r = tl.sum(y * u, 1)[:, None], tl.sum(go * u, 1)[:, None]
            tl.store(GY + at, (go - r * u).to(GY.dtype.element_ty), mask=mask)
            du -= s * go + r * y
        dv = (du - tl.sum(du * u, 1)[:, None] * u) * inv
        tl.store(GV + (rows * hkv + kv)[:, None] * D + d[None, :], dv.to(GV.dtype.element_ty), mask=mask)


    @triton.jit
    def _rope(COS, SIN, rows, T, mask, d, R: tl.constexpr):
        # z_d = n_d cos_j + sign_d n_partner(d) sin_j over the first R dims (j = d mod R/2); cos 1, sin 0 beyond R.
        # Returns partner, cos and sign * sin, each [BLOCK, D] (partner [D]).
        HALF: tl.constexpr = R // 2
        partner = tl.where(d < HALF, d + HALF, tl.where(d < R, d - HALF, d))
        sign = tl.where(d < HALF, -1.0, tl.where(d < R, 1.0, 0.0))
        at = (rows % T)[:, None] * HALF + d[None, :] % HALF
        c = tl.load(COS + at, mask=mask & (d[None, :] < R), other=1.0)
        sn = tl.load(SIN + at, mask=mask & (d[None, :] < R), other=0.0) * sign
        return partner, c, sn

    @triton.jit
    def _norm_rope(X, at, c, sn, partner, d, mask, EPS, D: tl.constexpr):
        # rope(rms_norm(x)) of the rows at X + at, in fp32
        x = tl.load(X + at + d[None, :], mask=mask).to(tl.float32)
        xp = tl.load(X + at + partner[None, :], mask=mask).to(tl.float32)
        return (x * c + xp * sn) * tl.rsqrt(tl.sum(x * x, 1) / D + EPS)[:, None]

    @triton.jit
    def _qkv_program(COS, SIN, T, N, G: tl.constexpr, D: tl.constexpr, R: tl.constexpr, BLOCK: tl.constexpr):
        # This program's BLOCK tokens and KV head: the RoPE tables for them, the offset of each token's row in the
        # q/k/v product (C = (H + 2 Hkv) D columns) and of its KV head in an [N, Hkv, D] tensor.
        rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        kv, hkv = tl.program_id(1), tl.num_programs(1)
        mask = (rows < N)[:, None]
        d = tl.arange(0, D)
        partner, c, sn = _rope(COS, SIN, rows, T, mask, d, R)
        H = hkv * G
        row = rows[:, None] * ((H + 2 * hkv) * D)
        kv_at = (rows * hkv + kv)[:, None] * D + d[None, :]
        return rows, kv, hkv, H, mask, d, partner, c, sn, row, kv_at

    @triton.jit
    def _qkv_fwd(QKV, VE, GAIN, COS, SIN, QO, KO, VO, VX, T, N, EPS, G: tl.constexpr, D: tl.constexpr,
                 R: tl.constexpr, HAS_VE: tl.constexpr, BLOCK: tl.constexpr):
        # One program: BLOCK tokens x one KV head. Input rows [q heads | k heads | v heads] of C = (H + 2 Hkv) D.
        # q: rms_norm, rope, gain; k: rms_norm, rope, written to its G query heads' slots; v (+ VE): copied to them
        # and to VX [N, Hkv, D]. Outputs QO, KO, VO [N, H, D].
        rows, kv, hkv, H, mask, d, partner, c, sn, row, kv_at = _qkv_program(COS, SIN, T, N, G, D, R, BLOCK)
        kz = _norm_rope(QKV, row + (H + kv) * D, c, sn, partner, d, mask, EPS, D)
        v = tl.load(QKV + row + (H + hkv + kv) * D + d[None, :], mask=mask)
        if HAS_VE:
            v = (v.to(tl.float32) + tl.load(VE + kv_at, mask=mask).to(tl.float32)).to(v.dtype)
        tl.store(VX + kv_at, v, mask=mask)
        for g in tl.static_range(G):
            h = kv * G + g
            qz = _norm_rope(QKV, row + h * D, c, sn, partner, d, mask, EPS, D) * tl.load(GAIN + h)
            at = (rows * H + h)[:, None] * D + d[None, :]
            tl.store(QO + at, qz.to(QO.dtype.element_ty), mask=mask)
            tl.store(KO + at, kz.to(KO.dtype.element_ty), mask=mask)
            tl.store(VO + at, v, mask=mask)

    @triton.jit
    def _norm_rope_bwd(X, at, dz, dzp, c, sn, partner, d, mask, EPS, D: tl.constexpr):
        # x -> n = x r (r = rsqrt(mean x^2 + eps)) -> z = rope(n): dn = rope^T(dz), dx = r (dn - n mean(dn n)).
        # rope^T: z_d = n_d c_d + sign_d n_p(d) s_d and sign_p(d) = -sign_d, so dn_d = dz_d c_d - sign_d s_d dz_p(d).
        x = tl.load(X + at + d[None, :], mask=mask).to(tl.float32)
        r = tl.rsqrt(tl.sum(x * x, 1) / D + EPS)[:, None]
        dn = dz * c - dzp * sn
        n = x * r
        return r * (dn - n * (tl.sum(dn * n, 1) / D)[:, None])

    @triton.jit
    def _qkv_bwd(QKV, GAIN, COS, SIN, GQO, GKO, GVO, GVX, GQKV, GVE, GGAIN, T, N, EPS, G: tl.constexpr,
                 D: tl.constexpr, R: tl.constexpr, HAS_GVX: tl.constexpr, HAS_VE: tl.constexpr,
                 BLOCK: tl.constexpr):
        # GQKV [N, C] gets dq, dk and dv (dv: the G query heads' gradients + GVX's) in QKV's layout, GVE dv again
        rows, kv, hkv, H, mask, d, partner, c, sn, row, kv_at = _qkv_program(COS, SIN, T, N, G, D, R, BLOCK)
        dk = tl.zeros((BLOCK, D), tl.float32)
        dkp = tl.zeros((BLOCK, D), tl.float32)
        dv = tl.zeros((BLOCK, D), tl.float32)
        if HAS_GVX:
            dv += tl.load(GVX + kv_at, mask=mask).to(tl.float32)
        for g in tl.static_range(G):
            h = kv * G + g
            at = (rows * H + h)[:, None] * D
            dk += tl.load(GKO + at + d[None, :], mask=mask).to(tl.float32)
            dkp += tl.load(GKO + at + partner[None, :], mask=mask).to(tl.float32)
            dv += tl.load(GVO + at + d[None, :], mask=mask).to(tl.float32)
            gain = tl.load(GAIN + h)
            do = tl.load(GQO + at + d[None, :], mask=mask).to(tl.float32)
            dop = tl.load(GQO + at + partner[None, :], mask=mask).to(tl.float32)
            dq = _norm_rope_bwd(QKV, row + h * D, do * gain, dop * gain, c, sn, partner, d, mask, EPS, D)
            tl.store(GQKV + row + h * D + d[None, :], dq.to(GQKV.dtype.element_ty), mask=mask)
            # d gain_h = sum of dout * z (z before the gain), this program's part
            z = _norm_rope(QKV, row + h * D, c, sn, partner, d, mask, EPS, D)
            tl.store(GGAIN + tl.program_id(0) * H + h, tl.sum(tl.sum(do * z, 1), 0))
        dkx = _norm_rope_bwd(QKV, row + (H + kv) * D, dk, dkp, c, sn, partner, d, mask, EPS, D)
        tl.store(GQKV + row + (H + kv) * D + d[None, :], dkx.to(GQKV.dtype.element_ty), mask=mask)
        tl.store(GQKV + row + (H + hkv + kv) * D + d[None, :], dv.to(GQKV.dtype.element_ty), mask=mask)
        if HAS_VE:
            tl.store(GVE + kv_at, dv.to(GVE.dtype.element_ty), mask=mask)


# tokens per program and warps; scripts/bench_variants.py measured the others (q/k/v: 16 tokens 0.27 ms per P1 step
# faster than 32, H100)
XSA_BLOCK, XSA_WARPS = 64, 4
QKV_BLOCK, QKV_WARPS = 16, 4


def _launch(kernel, y: Tensor, v: Tensor, *outs_and_grads: Tensor) -> None:
    B, T, H, D = y.shape
    hkv, block = v.size(2), XSA_BLOCK
    grid = (triton.cdiv(B * T, block), hkv)
    kernel[grid](y, v, *outs_and_grads, T, B * T, y.stride(0), y.stride(1), y.stride(2), v.stride(0), v.stride(1),
                 v.stride(2), G=H // hkv, D=D, BLOCK=block, num_warps=XSA_WARPS)


RMS_EPS = torch.finfo(torch.float32).eps  # F.rms_norm's default for bf16 and fp32 inputs (it normalizes in fp32)


def _launch_qkv(kernel, qkv: Tensor, heads: int, kv_heads: int, cos: Tensor, args: tuple, **flags) -> None:
    B, T, C = qkv.shape
    grid = (triton.cdiv(B * T, QKV_BLOCK), kv_heads)
    kernel[grid](qkv, *args, T, B * T, RMS_EPS, G=heads // kv_heads, D=C // (heads + 2 * kv_heads),
                 R=2 * cos.size(-1), BLOCK=QKV_BLOCK, num_warps=QKV_WARPS, **flags)


def _define_xsa() -> None:
    """pgolf::xsa and its backward op (register_autograd)."""

    @torch.library.custom_op("pgolf::xsa", mutates_args=())
    def xsa(y: Tensor, v: Tensor) -> Tensor:
        y, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (y, v))
        out = torch.empty(y.shape, dtype=y.dtype, device=y.device)
        _launch(_xsa_fwd, y, v, out)
        return out

    @xsa.register_fake
    def _(y: Tensor, v: Tensor) -> Tensor:
        return torch.empty(y.shape, dtype=y.dtype, device=y.device)

    @torch.library.custom_op("pgolf::xsa_backward", mutates_args=())
    def xsa_backward(y: Tensor, v: Tensor, grad: Tensor) -> tuple[Tensor, Tensor]:
        y, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (y, v))
        gy, gv = torch.empty(y.shape, dtype=y.dtype, device=y.device), torch.empty_like(v, memory_format=
                                                                                           torch.contiguous_format)
        _launch(_xsa_bwd, y, v, grad.contiguous(), gy, gv)
        return gy, gv

    @xsa_backward.register_fake
    def _(y: Tensor, v: Tensor, grad: Tensor) -> tuple[Tensor, Tensor]:
        return (torch.empty(y.shape, dtype=y.dtype, device=y.device),
                torch.empty_like(v, memory_format=torch.contiguous_format))

    def setup(ctx, inputs, output) -> None:
        ctx.save_for_backward(*inputs)

    xsa.register_autograd(lambda ctx, grad: torch.ops.pgolf.xsa_backward(*ctx.saved_tensors, grad),
                          setup_context=setup)


def _define_qkv() -> None:
    """pgolf::qkv_prep (q/k/v split, q/k RMSNorm, q gain, partial RoPE) and its backward op."""

    def split_shapes(qkv: Tensor, heads: int, kv_heads: int) -> tuple[tuple, tuple]:
        B, T, C = qkv.shape
        D = C // (heads + 2 * kv_heads)
        return (B, T, heads, D), (B, T, kv_heads, D)

    def new(qkv: Tensor, shape: tuple) -> Tensor:
        return torch.empty(shape, dtype=qkv.dtype, device=qkv.device)

    @torch.library.custom_op("pgolf::qkv_prep", mutates_args=())
    def qkv_prep(qkv: Tensor, ve: Tensor | None, gain: Tensor, cos: Tensor, sin: Tensor, heads: int,
                 kv_heads: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        qkv, cos, sin = (x.contiguous() for x in (qkv, cos, sin))  # the kernels index them flat
        shape, kv_shape = split_shapes(qkv, heads, kv_heads)
        out = new(qkv, shape), new(qkv, shape), new(qkv, shape), new(qkv, kv_shape)
        _launch_qkv(_qkv_fwd, qkv, heads, kv_heads, cos, (qkv if ve is None else ve.contiguous(), gain, cos, sin,
                                                          *out), HAS_VE=ve is not None)
        return out

    @qkv_prep.register_fake
    def _(qkv, ve, gain, cos, sin, heads, kv_heads):
        shape, kv_shape = split_shapes(qkv, heads, kv_heads)
        return new(qkv, shape), new(qkv, shape), new(qkv, shape), new(qkv, kv_shape)

    @torch.library.custom_op("pgolf::qkv_prep_backward", mutates_args=())
    def qkv_prep_backward(qkv: Tensor, gain: Tensor, cos: Tensor, sin: Tensor, gq: Tensor, gk: Tensor, gv: Tensor,
                          gvx: Tensor | None, heads: int, kv_heads: int, has_ve: bool) -> tuple[Tensor, Tensor,
                                                                                                 Tensor]:
        qkv, cos, sin = (x.contiguous() for x in (qkv, cos, sin))
        dqkv = torch.empty_like(qkv)
        dve = ve_grad(qkv, heads, kv_heads, has_ve)
        blocks = triton.cdiv(qkv.size(0) * qkv.size(1), QKV_BLOCK)
        dgain = torch.empty(blocks, heads, dtype=torch.float32, device=qkv.device)
        _launch_qkv(_qkv_bwd, qkv, heads, kv_heads, cos, (
            gain, cos, sin, gq.contiguous(), gk.contiguous(), gv.contiguous(), qkv if gvx is None else
            gvx.contiguous(), dqkv, dve, dgain), HAS_GVX=gvx is not None, HAS_VE=has_ve)
        return dqkv, dve, dgain.sum(0).to(gain.dtype)

    def ve_grad(qkv: Tensor, heads: int, kv_heads: int, has_ve: bool) -> Tensor:
        # a contiguous buffer of its own rather than a column slice of dqkv (first tried against a 4.5 ms fused
        # kernel whose cause was Inductor's mix-order reduction, see train.configure_cuda; measured as is since)
        B, T, C = qkv.shape
        return qkv.new_empty((B, T, C // (heads + 2 * kv_heads) * kv_heads) if has_ve else (0,))

    @qkv_prep_backward.register_fake
    def _(qkv, gain, cos, sin, gq, gk, gv, gvx, heads, kv_heads, has_ve):
        return torch.empty_like(qkv), ve_grad(qkv, heads, kv_heads, has_ve), torch.empty_like(gain)

    def setup_qkv(ctx, inputs, output) -> None:
        qkv, ve, gain, cos, sin, ctx.heads, ctx.kv_heads = inputs
        ctx.has_ve = ve is not None
        ctx.save_for_backward(qkv, gain, cos, sin)

    def backward_qkv(ctx, gq, gk, gv, gvx):
        dqkv, dve, dgain = torch.ops.pgolf.qkv_prep_backward(*ctx.saved_tensors, gq, gk, gv, gvx, ctx.heads,
                                                             ctx.kv_heads, ctx.has_ve)
        return dqkv, dve if ctx.has_ve else None, dgain, None, None, None, None

    qkv_prep.register_autograd(backward_qkv, setup_context=setup_qkv)


def _define_embedding() -> None:
    """pgolf::embedding, whose backward op is ATen's sort-based embedding_dense_backward (Inductor cannot swap it)."""

    @torch.library.custom_op("pgolf::embedding", mutates_args=())
    def embedding(weight: Tensor, idx: Tensor) -> Tensor:
        return F.embedding(idx, weight)

    @embedding.register_fake
    def _(weight, idx):
        return weight.new_empty((*idx.shape, weight.size(1)))

    @torch.library.custom_op("pgolf::embedding_backward", mutates_args=())
    def embedding_backward(grad: Tensor, idx: Tensor, rows: int) -> Tensor:
        return torch.ops.aten.embedding_dense_backward(grad, idx, rows, -1, False)

    @embedding_backward.register_fake
    def _(grad, idx, rows):
        return grad.new_empty((rows, grad.size(-1)))

    def setup_embedding(ctx, inputs, output) -> None:
        ctx.rows = inputs[0].size(0)
        ctx.save_for_backward(inputs[1])

    embedding.register_autograd(
        lambda ctx, grad: (torch.ops.pgolf.embedding_backward(grad, ctx.saved_tensors[0], ctx.rows), None),
        setup_context=setup_embedding)


# The custom ops are defined once per process: a packed program run in a process that imported the kit finds them.
if not hasattr(torch.ops.pgolf, "xsa"):
    _define_xsa()
    _define_qkv()
    _define_embedding()


def xsa(y: Tensor, v: Tensor) -> Tensor:
    """model.remove_self_value in one pass over y and v (and one for the backward): y [B, T, H, D] with unit stride
    in D (SDPA's output as is), v [B, T, Hkv, D]; fp32 arithmetic, output in y's dtype, contiguous."""
    return torch.ops.pgolf.xsa(y, v)


def qkv_prep(qkv: Tensor, ve: Tensor | None, gain: Tensor, cos: Tensor, sin: Tensor, heads: int,
             kv_heads: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """What Attention does to its q/k/v projection before SDPA, in one pass (and one for the backward, which writes
    the projection's gradient in place of three): qkv [B, T, (heads + 2 kv_heads) D] (q | k | v columns), ve
    [B, T, kv_heads D] or None added to v; rms_norm of q and k, partial RoPE (cos/sin [T, rope_dims/2] fp32), q
    times the per-head gain, k and v repeated to the query heads. Returns q, k, v as three [B, T, heads, D] for SDPA
    and v [B, T, kv_heads, D] for XSA; fp32 arithmetic, outputs in qkv's dtype."""
    return torch.ops.pgolf.qkv_prep(qkv, ve, gain, cos, sin, heads, kv_heads)


def embedding(weight: Tensor, idx: Tensor) -> Tensor:
    """F.embedding whose backward is ATen's (sort, then sum each row's gradients) instead of Inductor's atomic
    scatter-add, which measured 0.39 to 4.65 ms per P1 step for the same table as fusions around it changed (H100)."""
    return torch.ops.pgolf.embedding(weight, idx)
