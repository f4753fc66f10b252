"""submission/kernels.py against the reference functions in model.py: on the CPU through Triton's interpreter (the
kernels' own code, run by numpy), on a GPU compiled, in bf16 as training runs them."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from submission import kernels
from submission.model import remove_self_value, xsa_reference

ROOT = Path(__file__).resolve().parents[1]
needs_triton = pytest.mark.skipif(kernels.triton is None, reason="triton is not installed (pip install -e '.[dev]')")

# Runs in a child process: TRITON_INTERPRET must be set before triton is imported.
INTERPRETED = r"""
import json, sys, torch
from submission.model import xsa_reference
torch.manual_seed(0)
out = {}
for B, T, H, Hkv, D in ((2, 70, 4, 2, 64), (1, 9, 8, 4, 16), (1, 5, 3, 3, 32)):
    y = torch.randn(B, H, T, D).transpose(1, 2)  # SDPA's output layout: [B, T, H, D] view of [B, H, T, D]
    v = torch.randn(B, T, Hkv, D)
    v[0, 0, 0] = 0  # a zero value vector: the reference's 1e-24 guard, not a NaN
    g = torch.randn(B, T, H, D)
    got = [t.requires_grad_() for t in (y.clone(), v.clone())]
    ref = [t.requires_grad_() for t in (y.clone(), v.clone())]
    o = torch.ops.pgolf.xsa(*got)  # the custom op and its registered backward, as the compiled model calls them
    o.backward(g)
    r = xsa_reference(*ref)
    r.backward(g)
    out[f"{B}x{T}x{H}x{Hkv}x{D}"] = [float((o - r).abs().max()), float((got[0].grad - ref[0].grad).abs().max()),
                                      float((got[1].grad - ref[1].grad).abs().max()), bool(o.is_contiguous())]
print(json.dumps(out))
"""


@needs_triton
def test_xsa_kernels_compute_the_reference_in_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-c", INTERPRETED], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(results) == 3
    for shape, (fwd, grad_y, grad_v, contiguous) in results.items():
        assert fwd < 1e-5 and grad_y < 1e-5 and grad_v < 1e-4 and contiguous, (shape, fwd, grad_y, grad_v)


def test_the_cpu_runs_the_reference():
    torch.manual_seed(0)
    y, v = torch.randn(2, 6, 4, 8), torch.randn(2, 6, 2, 8)
    assert not kernels.available(y)
    if kernels.triton is not None:  # on a GPU: only for power-of-two heads of 16 or more (tl.arange)
        gpu = types.SimpleNamespace(is_cuda=True)
        assert kernels.available(gpu, 64) and kernels.available(gpu, 16)
        assert not kernels.available(gpu, 48) and not kernels.available(gpu, 8)
    assert torch.equal(remove_self_value(y, v), xsa_reference(y, v))


def test_the_ops_are_registered_once_per_process():
    """A packed program run in a process that imported the kit finds pgolf::xsa defined and must not redefine it."""
    import importlib
    op = torch.ops.pgolf.xsa
    importlib.reload(kernels)
    assert torch.ops.pgolf.xsa is op


@pytest.mark.skipif(not torch.cuda.is_available() or kernels.triton is None, reason="needs a CUDA GPU and triton")
def test_xsa_kernels_on_the_gpu_in_bf16_and_compiled():
    torch.manual_seed(0)
    B, T, H, Hkv, D = 4, 512, 8, 4, 64
    y = torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    v = torch.randn(B, T, Hkv, D, device="cuda", dtype=torch.bfloat16)
    g = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16)
    ref = [t.float().requires_grad_() for t in (y, v)]  # reference in fp32: the kernel computes in fp32
    xsa_reference(*ref).backward(g.float())
    for fn in (kernels.xsa, torch.compile(kernels.xsa, fullgraph=True)):
        got = [t.clone().requires_grad_() for t in (y, v)]
        out = fn(*got)
        out.backward(g)
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), xsa_reference(y.float(), v.float()), atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(got[0].grad.float(), ref[0].grad, atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(got[1].grad.float(), ref[1].grad, atol=5e-2, rtol=5e-2)


QKV_INTERPRETED = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[1])
from tests.test_kernels import qkv_reference
from submission.model import rope_tables
torch.manual_seed(0)
out = {}
for B, T, H, Hkv, D, R, ve in ((2, 40, 4, 2, 64, 16, True), (1, 9, 8, 4, 32, 32, False), (1, 5, 3, 3, 16, 8, True)):
    cos, sin = (t[0, :, 0] for t in rope_tables(T, R, 10000.0))
    inputs = [torch.randn(B, T, (H + 2 * Hkv) * D), torch.randn(B, T, Hkv * D) if ve else None, torch.rand(H) + 0.5]
    inputs[0][0, 0, :D] = 0  # a zero q row: the eps guard
    grads = [torch.randn(B, T, H, D) for _ in range(3)] + [torch.randn(B, T, Hkv, D)]
    got = [t if t is None else t.clone().requires_grad_() for t in inputs]
    ref = [t if t is None else t.clone().requires_grad_() for t in inputs]
    o = torch.ops.pgolf.qkv_prep(*got, cos, sin, H, Hkv)
    r = qkv_reference(*ref, cos, sin, H, Hkv)
    sum((a * g).sum() for a, g in zip(o, grads)).backward()
    sum((a * g).sum() for a, g in zip(r, grads)).backward()
    out[f"{B}x{T}x{H}x{Hkv}x{D}r{R}ve{int(ve)}"] = [max(float((a - b).abs().max()) for a, b in zip(o, r))] + [
        float((a.grad - b.grad).abs().max() / b.grad.abs().max()) for a, b in zip(got, ref) if a is not None]
print(json.dumps(out))
"""


def qkv_reference(qkv, ve, gain, cos, sin, heads, kv_heads):
    """What Attention computes without the kernel (model.py's functions): q, k and v repeated for SDPA, v for XSA."""
    from submission.model import apply_partial_rope, rms_norm
    B, T, C = qkv.shape
    D = C // (heads + 2 * kv_heads)
    q, k, v = qkv.split((heads * D, kv_heads * D, kv_heads * D), -1)
    v = (v if ve is None else v + ve).reshape(B, T, kv_heads, D)
    q, k = rms_norm(q.reshape(B, T, heads, D)), rms_norm(k.reshape(B, T, kv_heads, D))
    cos, sin, R = cos[None, :, None], sin[None, :, None], 2 * cos.size(-1)
    q = apply_partial_rope(q, cos, sin, R) * gain.to(q.dtype)[None, None, :, None]
    k = apply_partial_rope(k, cos, sin, R)
    group = heads // kv_heads
    return q, k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2), v


@needs_triton
def test_qkv_prep_kernels_compute_the_reference_in_the_interpreter():
    """rms_norm + partial RoPE + q gain + the K/V repeat (+ the value embedding), forward and every gradient (qkv,
    ve and the gain), with gradients arriving on all four outputs (XSA's on v too)."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-c", QKV_INTERPRETED, str(ROOT)], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(results) == 3
    for shape, (fwd, *grads) in results.items():
        assert len(grads) == (3 if shape.endswith("ve1") else 2), shape
        assert fwd < 1e-5 and max(grads) < 1e-5, (shape, fwd, grads)


@pytest.mark.skipif(not torch.cuda.is_available() or kernels.triton is None, reason="needs a CUDA GPU and triton")
def test_the_model_with_kernels_matches_the_reference_path_on_the_gpu(monkeypatch):
    """The default model's loss and gradients, compiled, with the kernels and with the reference path (bf16)."""
    from submission.config import ModelConfig
    from submission.model import GPT
    torch.manual_seed(0)
    model = GPT(ModelConfig(num_layers=3)).cuda()
    for block in model.blocks:  # nonzero output projections, so every block's attention reaches the loss
        torch.nn.init.normal_(block.attn.c_proj.weight, std=0.02)
        torch.nn.init.normal_(block.mlp.c_proj.weight, std=0.02)
    idx = torch.randint(0, 1024, (4, 256), device="cuda")
    results = []
    for on in (True, False):
        monkeypatch.setattr(kernels, "available", lambda x, *args, on=on: on and x.is_cuda)
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", torch.bfloat16):
            loss = torch.compile(model, dynamic=False)(idx, idx.roll(-1, 1))
        loss.backward()
        results.append((loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()
                                        if p.grad is not None}))
        torch._dynamo.reset()
    (loss_k, grads_k), (loss_r, grads_r) = results
    torch.testing.assert_close(loss_k, loss_r, atol=2e-3, rtol=0)
    assert grads_k.keys() == grads_r.keys()
    for name in grads_r:
        a, b = grads_k[name].flatten().float(), grads_r[name].flatten().float()
        if b.norm() == 0:  # e.g. BigramHash's scale while its table is still zero: zero on both paths
            assert a.norm() == 0, name
            continue
        cos = torch.nn.functional.cosine_similarity(a, b, dim=0)
        assert cos > 0.99, (name, float(cos))


@pytest.mark.skipif(not torch.cuda.is_available() or kernels.triton is None, reason="needs a CUDA GPU and triton")
def test_qkv_prep_on_the_gpu_in_bf16_and_compiled():
    from submission.model import rope_tables
    torch.manual_seed(0)
    B, T, H, Hkv, D, R = 4, 512, 8, 4, 64, 16
    cos, sin = (t[0, :, 0].cuda() for t in rope_tables(T, R, 10000.0))
    inputs = [torch.randn(B, T, (H + 2 * Hkv) * D, device="cuda", dtype=torch.bfloat16),
              torch.randn(B, T, Hkv * D, device="cuda", dtype=torch.bfloat16), torch.rand(H, device="cuda") + 0.5]
    grads = [torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3)] + [
        torch.randn(B, T, Hkv, D, device="cuda", dtype=torch.bfloat16)]
    ref = [t.detach().float().clone().requires_grad_() for t in inputs]
    expected = qkv_reference(*ref, cos, sin, H, Hkv)
    sum((a * g.float()).sum() for a, g in zip(expected, grads)).backward()
    for fn in (kernels.qkv_prep, torch.compile(kernels.qkv_prep, fullgraph=True)):
        got = [t.detach().clone().requires_grad_() for t in inputs]
        out = fn(*got, cos, sin, H, Hkv)
        sum((a * g).sum() for a, g in zip(out, grads)).backward()
        for a, b in zip(out, expected):
            assert a.dtype == torch.bfloat16
            torch.testing.assert_close(a.float(), b.detach(), atol=3e-2, rtol=2e-2)
        for a, b in zip(got, ref):
            torch.testing.assert_close(a.grad.float(), b.grad, atol=5e-2 * float(b.grad.abs().max()), rtol=2e-2)


def test_embedding_op_has_the_embedding_gradient():
    """pgolf::embedding (ATen's sort-based backward behind a custom op) on the CPU against nn.functional.embedding."""
    torch.manual_seed(0)
    weight, idx = torch.randn(10, 6), torch.randint(0, 10, (3, 40))
    a, b = weight.clone().requires_grad_(), weight.clone().requires_grad_()
    g = torch.randn(3, 40, 6)
    out = kernels.embedding(a, idx)
    (out * g).sum().backward()
    (torch.nn.functional.embedding(idx, b) * g).sum().backward()
    assert torch.equal(out, torch.nn.functional.embedding(idx, weight))
    torch.testing.assert_close(a.grad, b.grad)
    compiled = torch.compile(kernels.embedding, backend="aot_eager", fullgraph=True)
    c = weight.clone().requires_grad_()
    (compiled(c, idx) * g).sum().backward()
    torch.testing.assert_close(c.grad, b.grad)


PACKED = r"""
import json, linecache, sys, types, torch
source = open(sys.argv[1], encoding="utf-8").read()
name = "<train_gpt>"  # as the packed file's stub registers it: Triton's jit reads its kernels' source from there
linecache.cache[name] = (len(source), None, source.splitlines(True), name)
program = types.ModuleType("packed_kernels")  # not __main__: defines everything, runs nothing
program.__file__ = sys.argv[2]
sys.modules[program.__name__] = program
exec(compile(source, name, "exec"), program.__dict__)
torch.manual_seed(0)
y, v = torch.randn(1, 4, 12, 64).transpose(1, 2), torch.randn(1, 12, 2, 64)
cos, sin = (t[0, :, 0] for t in program.rope_tables(12, 16, 10000.0))
qkv, gain = torch.randn(1, 12, 8 * 64), torch.rand(4) + 0.5
got = torch.ops.pgolf.qkv_prep(qkv, None, gain, cos, sin, 4, 2)
q, k = qkv[..., :256].reshape(1, 12, 4, 64), qkv[..., 256:384].reshape(1, 12, 2, 64)
rq = program.apply_partial_rope(program.rms_norm(q), cos[None, :, None], sin[None, :, None], 16) * gain[:, None]
rk = program.apply_partial_rope(program.rms_norm(k), cos[None, :, None], sin[None, :, None], 16)
print(json.dumps([float((torch.ops.pgolf.xsa(y, v) - program.xsa_reference(y, v)).abs().max()),
                  float((got[0] - rq).abs().max()), float((got[1] - rk.repeat_interleave(2, 2)).abs().max())]))
"""


@needs_triton
def test_the_packed_program_carries_working_kernels(tmp_path):
    """The bundler strips annotations and renames names; Triton's jit needs `tl.constexpr` and the kernels' source.
    The packed program's own kernels, run by the interpreter in a process without the kit, against its references."""
    from tools.pack.ship import bundle_entry
    source = tmp_path / "readable.py"
    source.write_text(bundle_entry().readable_source, encoding="utf-8")
    # without the kit on the path (other entries stay: a machine may install packages through PYTHONPATH)
    path = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != ROOT]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(path)}
    run = subprocess.run([sys.executable, "-c", PACKED, str(source), str(tmp_path / "train_gpt.py")], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    errors = json.loads(run.stdout.strip().splitlines()[-1])
    assert max(errors) < 1e-5, errors
