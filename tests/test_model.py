"""Behaviour of the model's features on a tiny config."""
import torch

from submission.config import ModelConfig
from submission.model import GPT, bigram_bucket, remove_self_value

TINY = dict(vocab_size=64, num_layers=4, model_dim=32, num_heads=4, num_kv_heads=2, xsa_last_n=4, rope_dims=4,
            bigram_buckets=32, bigram_dim=8, value_embed_last_n=1, value_embed_dim=8)


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


def test_causality_of_logits():
    model = _model()
    x = torch.randint(0, 64, (1, 12))
    y = x.clone()
    y[0, 8:] = (y[0, 8:] + 1) % 64
    with torch.no_grad():
        assert torch.allclose(model.logits(x)[0, :8], model.logits(y)[0, :8], atol=1e-6)


def test_qat_changes_compiled_forward():
    model = _model()
    compiled = torch.compile(model, backend="aot_eager")
    x = torch.randint(0, 64, (1, 12))
    with torch.no_grad():
        base = compiled(x, x)
        model.set_qat(True)
        on = compiled(x, x)
        model.set_qat(False)
        back = compiled(x, x)
    assert not torch.equal(base, on) and torch.equal(base, back)
