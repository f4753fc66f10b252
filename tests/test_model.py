"""Behaviour of the model's features on a tiny config."""
import math

import pytest
import torch
import torch.nn.functional as F

from submission.config import ModelConfig
from submission.model import GPT, apply_partial_rope, bigram_bucket, causal_attention, remove_self_value, rope_tables
from tests.tiny import SP1024_MODEL

# The sp1024 model at a tiny size: most tests here check one of its mechanisms; the SP8192 structure's tests (depth
# recurrence, parallel residuals, gated skips) switch theirs on.
TINY = dict(SP1024_MODEL, vocab_size=64, num_layers=4, model_dim=32, num_heads=4, num_kv_heads=2, xsa_last_n=4,
            rope_dims=4, bigram_buckets=32, bigram_dim=8, value_embed_last_n=1, value_embed_dim=8)
# The SP8192 structure scaled to TINY's 4 layers: layers 1-2 looped once, parallel residuals on the last 2, gated
# skips. Added to TINY, every feature of both recipes is on.
SP8192_STRUCTURE = dict(num_loops=1, loop_layers=(1, 2), parallel_last_n=2, skip_gates=True)
EVERY_FEATURE = pytest.mark.parametrize("structure", [{}, SP8192_STRUCTURE], ids=["sp1024", "every_feature"])


def _model(**kw):
    torch.manual_seed(0)
    model = GPT(ModelConfig(**{**TINY, **kw}))
    for p in model.parameters():  # leave the zero init so every path matters
        p.data += 0.05 * torch.randn_like(p)
    return model


def test_smear_gate_does_not_read_across_bos():
    model = _model()
    a = torch.tensor([[5, 6, 7, 1, 9, 10, 11]])
    b = a.clone()
    b[0, :3] = torch.tensor([20, 21, 22])  # a different previous document
    with torch.no_grad():
        ea, eb = model.embed(a), model.embed(b)
    assert torch.equal(ea[0, 3:], eb[0, 3:])
    assert not torch.equal(ea[0, :3], eb[0, :3])


def test_bigram_bucket_reserves_zero_for_start_and_bos():
    idx = torch.tensor([[4, 5, 1, 6]])
    h = bigram_bucket(idx, 32, bos_id=1)
    assert h[0, 0] == 0 and h[0, 2] == 0 and (h[0, [1, 3]] > 0).all()


def test_bigram_hash_gets_gradient():
    model = _model()
    model.bigram.table.weight.data.zero_()
    model(torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))).backward()
    assert model.bigram.table.weight.grad.abs().sum() > 0


def test_xsa_removes_self_value_component():
    y, v = torch.randn(2, 5, 4, 8), torch.randn(2, 5, 2, 8)
    out = remove_self_value(y, v)
    vn = torch.nn.functional.normalize(v, dim=-1).repeat_interleave(2, dim=2)
    assert torch.allclose((out * vn).sum(-1), torch.zeros(2, 5, 4), atol=1e-5)


@EVERY_FEATURE
def test_causality_of_logits(structure):
    model = _model(**structure)
    x = torch.randint(0, 64, (1, 12))
    y = x.clone()
    y[0, 8:] = (y[0, 8:] + 1) % 64
    with torch.no_grad():
        assert torch.allclose(model.logits(x)[0, :8], model.logits(y)[0, :8], atol=1e-6)


@EVERY_FEATURE
def test_qat_changes_compiled_forward(structure):
    model = _model(**structure)
    compiled = torch.compile(model, backend="aot_eager")
    x = torch.randint(0, 64, (1, 12))
    with torch.no_grad():
        base = compiled(x, x)
        model.set_qat(True)
        on = compiled(x, x)
        model.set_qat(False)
        back = compiled(x, x)
    assert not torch.equal(base, on) and torch.equal(base, back)


# ------------------------------------------------------------------------------------------------ GQA attention

def _attention_reference(q, k, v):
    """Causal softmax attention written out, query head h reading KV head h // (H / Hkv)."""
    group = q.size(2) // k.size(2)
    k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q, k) / q.size(-1) ** 0.5
    T = q.size(1)
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    return torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v)


@pytest.mark.parametrize("heads,kv_heads", [(8, 2), (4, 4)])
def test_causal_attention_gqa_matches_repeated_kv(heads, kv_heads):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 9, h, 16, generator=g, requires_grad=True) for h in (heads, kv_heads, kv_heads))
    dy = torch.randn(2, 9, heads, 16, generator=g)
    y = causal_attention(q, k, v)
    grads = torch.autograd.grad(y, (q, k, v), dy)
    y_ref = _attention_reference(q, k, v)
    grads_ref = torch.autograd.grad(y_ref, (q, k, v), dy)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------- partial RoPE

def _rotate_reference(x, positions, rope_dims, base):
    """Pairs (x_i, x_{i + rope_dims/2}) as complex numbers times exp(1j * pos * base^(-2i/rope_dims))."""
    half = rope_dims // 2
    freq = base ** (-torch.arange(half, dtype=torch.float64) * 2 / rope_dims)
    turn = torch.polar(torch.ones(len(positions), half, dtype=torch.float64),
                       torch.outer(positions.double(), freq))[None, :, None, :]
    z = torch.complex(x[..., :half].double(), x[..., half:rope_dims].double()) * turn
    return torch.cat((z.real, z.imag, x[..., rope_dims:].double()), dim=-1).to(x.dtype)


def test_partial_rope_matches_complex_rotation():
    x = torch.randn(2, 7, 3, 16, generator=torch.Generator().manual_seed(0))
    cos, sin = rope_tables(7, 6, 10000.0)
    torch.testing.assert_close(apply_partial_rope(x, cos, sin, 6), _rotate_reference(x, torch.arange(7), 6, 10000.0))


def test_partial_rope_is_relative_and_leaves_the_tail_alone():
    """The same q and k vector at every position: after RoPE the last head_dim - rope_dims dims are identical at
    all positions (their scores carry no position), the rotated dims keep their norm and q_m . k_n depends only
    on m - n."""
    T, D, R = 12, 16, 8
    torch.manual_seed(0)
    q, k = torch.randn(D).expand(1, T, 1, D), torch.randn(D).expand(1, T, 1, D)
    cos, sin = rope_tables(T, R, 10000.0)
    qr, kr = (apply_partial_rope(t, cos, sin, R)[0, :, 0] for t in (q, k))
    assert torch.equal(qr[:, R:], q[0, :, 0, R:]) and torch.equal(kr[:, R:], k[0, :, 0, R:])
    torch.testing.assert_close(qr[:, :R].norm(dim=-1), q[0, :, 0, :R].norm(dim=-1))
    assert not torch.allclose(qr[1, :R], qr[0, :R], atol=1e-3)  # the head really rotates with position
    scores = qr[:, :R] @ kr[:, :R].T  # [m, n]
    torch.testing.assert_close(scores[1:, 1:], scores[:-1, :-1], rtol=1e-5, atol=1e-5)
    assert (scores[0, 0] - scores[3, 0]).abs() > 1e-2  # ... and on the offset: position is really encoded


def _attention_module_reference(attn, x):
    """Attention.forward written out: RMS-normed q/k, only the first rope_dims rotated, per-head gain, GQA softmax
    attention, XSA as a projection, output projection."""
    cfg = attn.cfg
    B, T, _ = x.shape
    q = F.rms_norm((x @ attn.c_q.weight.T).view(B, T, cfg.num_heads, cfg.head_dim), (cfg.head_dim,))
    k = F.rms_norm((x @ attn.c_k.weight.T).view(B, T, cfg.num_kv_heads, cfg.head_dim), (cfg.head_dim,))
    v = (x @ attn.c_v.weight.T).view(B, T, cfg.num_kv_heads, cfg.head_dim)
    q = _rotate_reference(q, torch.arange(T), cfg.rope_dims, cfg.rope_base) * attn.q_gain[:, None]
    k = _rotate_reference(k, torch.arange(T), cfg.rope_dims, cfg.rope_base)
    y = _attention_reference(q, k, v)
    vn = F.normalize(v, dim=-1).repeat_interleave(cfg.num_heads // cfg.num_kv_heads, dim=2)
    y = y - (y * vn).sum(-1, keepdim=True) * vn
    return y.reshape(B, T, -1) @ attn.c_proj.weight.T


def test_attention_module_matches_written_out_reference():
    model = _model(rope_dims=4)
    attn = model.blocks[0].attn
    x = torch.randn(2, 10, 32, generator=torch.Generator().manual_seed(1))
    cfg = model.cfg
    rope = rope_tables(10, cfg.rope_dims, cfg.rope_base)
    with torch.no_grad():
        torch.testing.assert_close(attn(x, rope, None), _attention_module_reference(attn, x), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------- U-Net skips, LN scale, resid mix

def _same_weights(model, **kw):
    """A model of another config that takes `model`'s weights for every parameter both have."""
    other = GPT(ModelConfig(**{**TINY, **kw}))
    missing, unexpected = other.load_state_dict(model.state_dict(), strict=False)
    assert not missing, missing
    return other, unexpected


def test_unet_with_zero_skip_weights_is_the_plain_stack():
    model = _model(skip_gates=False)  # plain skips: a gated one with zero weight still scales x by sigmoid(g)
    plain, unexpected = _same_weights(model, unet_skips=False)
    assert unexpected == ["skip_weights"]
    x = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        assert not torch.allclose(model.logits(x), plain.logits(x), atol=1e-4)  # the skips do matter
        model.skip_weights.zero_()
        assert torch.equal(model.logits(x), plain.logits(x))


def test_unet_feeds_encoder_outputs_to_the_decoder_in_mirrored_order():
    """Five layers: encoder blocks 0, 1; decoder block 2 adds w[0] * out(1), block 3 adds w[1] * out(0), block 4
    (no partner) adds nothing. Distinct weight rows make any other pairing give other logits."""
    model = _model(num_layers=5, xsa_last_n=0, value_embed_last_n=0, embed2=False, skip_gates=False)  # x + w * skip
    assert model.skip_weights.shape == (2, 32)
    x = torch.randint(0, 64, (2, 12))
    cfg = model.cfg
    with torch.no_grad():
        h = h0 = F.rms_norm(model.embed(x), (32,))
        rope = rope_tables(12, cfg.rope_dims, cfg.rope_base)
        out = []
        for i in range(5):
            if i == 2:
                h = h + model.skip_weights[0] * out[1]
            if i == 3:
                h = h + model.skip_weights[1] * out[0]
            h = model.blocks[i](h, h0, rope, None)
            out.append(h)
        torch.testing.assert_close(model.hidden(x), F.rms_norm(h, (32,)), rtol=0, atol=1e-6)


def test_skip_weights_and_resid_mix_get_gradients():
    model = _model()
    x = torch.randint(0, 64, (2, 16))
    model(x, torch.randint(0, 64, (2, 16))).backward()
    assert (model.skip_weights.grad.abs().sum(-1) > 0).all()
    for block in model.blocks:
        assert (block.resid_mix.grad.abs().sum(-1) > 0).all()  # both rows: the residual and the x0 weights


def test_ln_scale_equals_input_weights_scaled_by_one_over_sqrt_layer():
    """Block i feeds rms_norm(x) / sqrt(i + 1) to attention and MLP; those start with linear maps, so the same
    model without ln_scale but with c_q, c_k, c_v and c_fc scaled by 1/sqrt(i + 1) gives the same logits."""
    model = _model(qk_norm=False)
    plain, _ = _same_weights(model, qk_norm=False, ln_scale=False)
    with torch.no_grad():
        for i, block in enumerate(plain.blocks):
            for linear in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                linear.weight.mul_(1 / math.sqrt(i + 1))
        x = torch.randint(0, 64, (2, 12))
        torch.testing.assert_close(model.logits(x), plain.logits(x), rtol=1e-5, atol=1e-5)
        assert [b.norm_scale for b in model.blocks] == [1 / math.sqrt(i + 1) for i in range(4)]


def test_resid_mix_blends_residual_and_initial_embedding():
    """A block with resid_mix (a, b) is the block without it applied to a * x + b * x0; the init (1, 0) leaves
    the model as the plain residual stack."""
    model = _model()
    plain, unexpected = _same_weights(model, resid_mix=False)
    assert sorted(unexpected) == [f"blocks.{i}.resid_mix" for i in range(4)]
    g = torch.Generator().manual_seed(2)
    x, x0 = torch.randn(2, 9, 32, generator=g), torch.randn(2, 9, 32, generator=g)
    rope = rope_tables(9, 4, 10000.0)
    with torch.no_grad():
        a, b = model.blocks[1].resid_mix
        torch.testing.assert_close(model.blocks[1](x, x0, rope, None), plain.blocks[1](a * x + b * x0, x0, rope, None))
        for block in model.blocks:
            block.resid_mix.copy_(torch.stack((torch.ones(32), torch.zeros(32))))
        idx = torch.randint(0, 64, (2, 12))
        torch.testing.assert_close(model.logits(idx), plain.logits(idx), rtol=0, atol=1e-6)


def test_grouped_linear_is_the_layers_side_by_side_and_hooks_still_see_their_inputs():
    """q, k and v come from one product of the concatenated weights (QAT included); a layer with a forward hook
    (GPTQ's calibration) is called by itself, so the hook fires with the layer's input."""
    from submission.model import CastedLinear, grouped_linear
    torch.manual_seed(0)
    layers = (CastedLinear(16, 8), CastedLinear(16, 4), CastedLinear(16, 4))
    x = torch.randn(2, 5, 16)
    separate = torch.cat([m(x) for m in layers], -1)
    torch.testing.assert_close(grouped_linear(x, layers), separate)
    for m in layers:
        m.qat_mix.fill_(1.0)
    quantized = grouped_linear(x, layers)
    assert not torch.allclose(quantized, separate)
    torch.testing.assert_close(quantized, torch.cat([m(x) for m in layers], -1))
    seen = []
    handle = layers[1].register_forward_hook(lambda module, args, out: seen.append(args[0]))
    try:
        torch.testing.assert_close(grouped_linear(x, layers), quantized)
    finally:
        handle.remove()
    assert len(seen) == 1 and torch.equal(seen[0], x)


# ------------------------------------------------------------------- the SP8192 generation: recurrence, parallel, gates

def test_layer_schedule_runs_the_span_one_plus_num_loops_times():
    from submission.model import layer_schedule
    cfg = ModelConfig(num_layers=11, num_loops=2, loop_layers=(4, 5))
    assert layer_schedule(cfg, True) == [0, 1, 2, 3, 4, 5, 4, 5, 4, 5, 6, 7, 8, 9, 10]
    assert layer_schedule(cfg, False) == list(range(11))
    three = ModelConfig(num_layers=3, num_loops=1, loop_layers=(0, 2), parallel_last_n=0)  # the default 4 > 3 layers
    assert layer_schedule(three, True) == [0, 1, 2, 0, 1, 2]
    with pytest.raises(ValueError, match="LOOP_LAYERS=4,11"):
        ModelConfig(num_loops=2, loop_layers=(4, 11))
    with pytest.raises(ValueError, match="PARALLEL_LAST_N=12"):
        ModelConfig(parallel_last_n=12)


def test_recurrence_reuses_the_blocks_and_their_gradients_add_up():
    """Layers 1-2 of 4 looped once more: the forward is the blocks applied in the order 0 1 2 1 2 3 with the same
    weights, and each looped weight's gradient is the sum of the gradients of two independent copies."""
    import copy
    kw = dict(unet_skips=False, bigram_buckets=0, value_embed_last_n=0, embed2=False, num_loops=1, loop_layers=(1, 2))
    model = _model(**kw)
    x, y = torch.randint(0, 64, (2, 12)), torch.randint(0, 64, (2, 12))
    order = [0, 1, 2, 1, 2, 3]
    copies = [copy.deepcopy(model.blocks[i]) for i in order]  # one independent copy per application
    h = h0 = F.rms_norm(model.embed(x), (32,))
    rope = rope_tables(12, 4, 10000.0)
    for block in copies:
        h = block(h, h0, rope, None)
    logits = model.head(F.rms_norm(h, (32,)))
    torch.testing.assert_close(model.logits(x), logits, rtol=0, atol=1e-6)
    F.cross_entropy(model.logits(x).flatten(0, 1), y.flatten()).backward()
    F.cross_entropy(logits.flatten(0, 1), y.flatten()).backward()
    for i in (1, 2):
        twice = [c for c, j in zip(copies, order) if j == i]
        expected = sum(c.mlp.c_fc.weight.grad for c in twice)
        torch.testing.assert_close(model.blocks[i].mlp.c_fc.weight.grad, expected, rtol=1e-4, atol=1e-6)
        assert not torch.allclose(twice[0].mlp.c_fc.weight.grad, twice[1].mlp.c_fc.weight.grad)
    model.looping = False  # before the switch every block runs once
    plain = _model(**{**kw, "num_loops": 0})
    torch.testing.assert_close(model.logits(x), plain.logits(x), rtol=0, atol=0)


def test_parallel_block_is_x_plus_attention_and_mlp_of_the_same_normed_input():
    model = _model(parallel_last_n=2, resid_mix=False)
    assert [b.parallel for b in model.blocks] == [False, False, True, True]
    block = model.blocks[3]
    g = torch.Generator().manual_seed(3)
    x, x0 = torch.randn(2, 9, 32, generator=g), torch.randn(2, 9, 32, generator=g)
    rope = rope_tables(9, 4, 10000.0)
    with torch.no_grad():
        n = F.rms_norm(x, (32,)) * block.norm_scale
        expected = x + block.attn_scale * block.attn(n, rope, None) + block.mlp_scale * block.mlp(n)
        torch.testing.assert_close(block(x, x0, rope, None), expected, rtol=1e-5, atol=1e-6)
        serial = model.blocks[1]  # the sequential form: the MLP reads the attention's output
        a = x + serial.attn_scale * serial.attn(F.rms_norm(x, (32,)) * serial.norm_scale, rope, None)
        expected = a + serial.mlp_scale * serial.mlp(F.rms_norm(a, (32,)) * serial.norm_scale)
        torch.testing.assert_close(serial(x, x0, rope, None), expected, rtol=1e-5, atol=1e-6)


def test_gated_skips_lerp_between_the_weighted_skip_and_the_residual():
    """Five layers: decoder block 2 reads lerp(w0 * out(1), x, sigmoid(g0)), block 3 lerp(w1 * out(0), ...)."""
    model = _model(num_layers=5, xsa_last_n=0, value_embed_last_n=0, embed2=False, skip_gates=True)
    assert model.skip_gates.shape == (2, 32) and model.skip_gates.requires_grad
    x = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        h = h0 = F.rms_norm(model.embed(x), (32,))
        rope = rope_tables(12, 4, 10000.0)
        out = []
        for i in range(5):
            if i in (2, 3):
                j = i - 2
                skip = model.skip_weights[j] * out[1 - j]
                g = torch.sigmoid(model.skip_gates[j])
                h = g * h + (1 - g) * skip
            h = model.blocks[i](h, h0, rope, None)
            out.append(h)
        torch.testing.assert_close(model.hidden(x), F.rms_norm(h, (32,)), rtol=0, atol=1e-5)
    model(x, torch.randint(0, 64, (2, 12))).backward()
    assert (model.skip_gates.grad.abs().sum(-1) > 0).all()


def test_muon_row_normalize_orthogonalizes_the_row_normalized_update():
    from submission.optim import Muon, newton_schulz
    torch.manual_seed(0)
    results = {}
    for row_normalize in (False, True):
        w = torch.nn.Parameter(torch.zeros(8, 16))
        w.grad = torch.randn(8, 16) * torch.logspace(-2, 1, 8)[:, None]  # rows of very different norms
        opt = Muon([w], lr=1.0, momentum=0.0, weight_decay=0.0, ns_steps=5, row_normalize=row_normalize)
        opt.step()
        g = w.grad / w.grad.norm(dim=-1, keepdim=True) if row_normalize else w.grad
        torch.testing.assert_close(w.data, -newton_schulz(g[None], 5)[0], rtol=1e-5, atol=1e-6)
        results[row_normalize] = w.data.clone()
    assert not torch.allclose(results[False], results[True], atol=1e-3)


def test_orthogonal_init_leaves_the_zero_initialized_projections_at_zero():
    torch.manual_seed(0)
    model = GPT(ModelConfig(**{**TINY, "orthogonal_init": True}))
    for block in model.blocks:
        q, fc = block.attn.c_q.weight, block.mlp.c_fc.weight  # [32, 32] and [96, 32]: rows resp. columns orthonormal
        torch.testing.assert_close(q @ q.T, torch.eye(32), rtol=0, atol=1e-5)
        torch.testing.assert_close(fc.T @ fc, torch.eye(32), rtol=0, atol=1e-5)
        assert not block.attn.c_proj.weight.any() and not block.mlp.c_proj.weight.any()
    plain = GPT(ModelConfig(**TINY)).blocks[0].attn.c_q.weight
    assert plain.abs().max() <= 1 / 32 ** 0.5 and not torch.allclose(plain @ plain.T, torch.eye(32), atol=0.1)
