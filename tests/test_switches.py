"""The speedrun techniques: the switches in submission/switches.py (partial key offset, per-layer bigram injection)
and the second input embedding, which won its ablation and is part of the sp1024 model (ModelConfig.embed2, on in
RECIPE=sp1024; off in SMALL so that each technique is tested against the model without it)."""
from __future__ import annotations

import pytest
import torch

from submission.config import ModelConfig, TrainConfig
from submission.model import GPT, Attention, bigram_bucket, rope_tables, starts_of
from submission.optim import build_optimizers
from submission.switches import Speedrun, offset_keys
from tests.tiny import SP1024_MODEL

BOS = 1
# The switches were built and measured on the sp1024 model: its features at a small size.
SMALL = dict(SP1024_MODEL, num_layers=3, model_dim=64, num_heads=2, num_kv_heads=1, xsa_last_n=3, rope_dims=8,
             vocab_size=64, bigram_buckets=32, bigram_dim=16, value_embed_dim=16, value_embed_last_n=1, embed2=False)


def test_offset_keys_moves_only_the_unrotated_tail_and_never_at_position_0_or_a_bos():
    k = torch.randn(2, 6, 3, 8)
    idx = torch.tensor([[5, 7, BOS, 9, 9, 2], [BOS, 4, 4, BOS, 3, 8]])
    shift = idx != BOS
    shift[:, 0] = False
    out = offset_keys(k, shift, 3)
    for b in range(2):
        for t in range(6):
            moved = bool(t > 0 and idx[b, t] != BOS)
            assert torch.equal(out[b, t, :, :5], k[b, t, :, :5])  # the first 5 dims stay
            assert torch.equal(out[b, t, :, 5:], k[b, t - 1, :, 5:] if moved else k[b, t, :, 5:])


def attention_outputs(idx: torch.Tensor, perturb=None, key_offset: bool = True) -> torch.Tensor:
    """One attention layer's output; `perturb(k)` edits the keys (after norm and RoPE) before the key offset."""
    cfg = ModelConfig(**SMALL, key_offset_last_n=1 if key_offset else 0)
    torch.manual_seed(0)
    attn = Attention(cfg, xsa=True)
    x = torch.randn(1, idx.size(1), cfg.model_dim, generator=torch.Generator().manual_seed(1))
    speedrun = Speedrun(cfg)
    inputs = speedrun.inputs(lambda n: bigram_bucket(idx, n, BOS), starts_of(idx, BOS), False, x.dtype)
    _, shift = speedrun.before_block(cfg.num_layers - 1, x, inputs)
    keys = (lambda k: shift(perturb(k))) if perturb and key_offset else (perturb or shift)
    return attn(x, rope_tables(idx.size(1), cfg.rope_dims, cfg.rope_base), None, keys)


def changed_positions(a: torch.Tensor, b: torch.Tensor) -> list[int]:
    return [t for t in range(a.size(1)) if not torch.allclose(a[0, t], b[0, t], atol=1e-6)]


@pytest.mark.parametrize("dims,expected", [(slice(8, 32), [5, 6, 7]), (slice(0, 8), [4, 5, 6, 7])])
def test_with_key_offset_the_output_at_t_reads_the_previous_key_only_in_the_offset_dims(dims, expected):
    """Head dim 32, RoPE on 8: the offset dims are 8..31. Editing key t-1 (t = 5) there changes the outputs from t on
    and not at t-1: the edit is now key t's. Edited in the rotated dims it stays key t-1's: outputs from t-1 on."""
    idx = torch.tensor([[5, 7, 9, 11, 13, 15, 17, 19]])

    def edit(k):
        k = k.clone()
        k[:, 4, :, dims] += 1.0
        return k

    assert changed_positions(attention_outputs(idx), attention_outputs(idx, edit)) == expected


def test_no_key_information_crosses_a_bos():
    """Token 5 is a BOS: editing key 4 in the offset dims reaches no output (key 4 carries key 3's, key 5 its own)."""
    idx = torch.tensor([[5, 7, 9, 11, 13, BOS, 17, 19]])

    def edit(k):
        k = k.clone()
        k[:, 4, :, 8:] += 1.0
        return k

    assert changed_positions(attention_outputs(idx), attention_outputs(idx, edit)) == []
    # without the offset the same edit is key 4's own: outputs from 4 on change
    assert changed_positions(attention_outputs(idx, key_offset=False),
                             attention_outputs(idx, edit, key_offset=False)) == [4, 5, 6, 7]


def test_key_offset_dims_must_be_unrotated():
    with pytest.raises(ValueError, match=r"key_offset_dims=30: must be in 1\.\.24"):
        Speedrun(ModelConfig(**SMALL, key_offset_last_n=1, key_offset_dims=30))


def model(**switches) -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(**{**SMALL, **switches}))


def test_every_switch_starts_as_the_model_without_it():
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(2))
    base = model()
    for p in base.parameters():  # move off the zero init (c_proj) so attention and MLPs contribute
        p.data += 0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()))
    reference = base.logits(idx)
    for switches in (dict(layer_bigram_buckets=40), dict(embed2=True), dict(layer_bigram_buckets=40, embed2=True)):
        m = model(**switches)
        m.load_state_dict(base.state_dict(), strict=False)  # the speedrun tables keep their initial values
        assert torch.equal(m.logits(idx), reference), switches


def test_per_layer_bigram_and_second_embedding_are_added_before_every_block():
    m = model(layer_bigram_buckets=40, embed2=True)
    sr = m.speedrun
    assert sr.layer_bigram.weight.shape == (40, 64) and not sr.layer_bigram.weight.any()
    assert torch.equal(sr.layer_bigram_scales.data, torch.full((3,), 0.1))
    assert not m.embed2_weights.any() and m.embed2.weight.std() > 0
    with torch.no_grad():
        sr.layer_bigram.weight.normal_()
        m.embed2_weights.normal_()
    idx = torch.tensor([[BOS, 3, 4, 3, BOS, 4]])
    seen = []
    handles = [b.register_forward_pre_hook(lambda mod, args: seen.append(args[0].clone())) for b in m.blocks]
    m.logits(idx)
    for h in handles:
        h.remove()
    buckets = bigram_bucket(idx, 40, BOS)
    assert buckets[0, 0] == 0 and buckets[0, 4] == 0 and buckets[0, 1] != 0  # position 0 and BOS: bucket 0
    rows = sr.layer_bigram(buckets)
    e2 = torch.nn.functional.rms_norm(m.embed2(idx), (64,))
    # what entered block 0, minus what the two tables added, is the plain embedding path (x0 after the norm)
    x0 = seen[0] - sr.layer_bigram_scales[0] * rows - m.embed2_weights[0] * e2
    assert torch.allclose(x0, torch.nn.functional.rms_norm(m.embed(idx), (64,)), atol=1e-5)


def test_second_embedding_switches_itself_on_through_its_weights_gradient():
    m = model(embed2=True)
    for p in m.parameters():
        p.data += 0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()))
    with torch.no_grad():
        m.embed2_weights.zero_()
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(3))
    m(idx, idx.roll(-1, 1)).backward()
    assert m.embed2_weights.grad.abs().sum() > 0
    assert not m.embed2.weight.grad.any()  # zero weights: the table learns once they move


def test_the_switch_tables_go_to_adam_and_their_scales_to_the_scalar_group():
    m = model(layer_bigram_buckets=40, embed2=True, key_offset_last_n=2)
    adam, muon = build_optimizers(m, TrainConfig())
    tables, scalars = ({id(p) for p in g["params"]} for g in adam.param_groups)
    sr = m.speedrun
    assert {id(sr.layer_bigram.weight), id(m.embed2.weight)} <= tables
    assert {id(sr.layer_bigram_scales), id(m.embed2_weights)} <= scalars
    extra = [*sr.parameters(), m.embed2.weight, m.embed2_weights]
    assert not {id(p) for p in extra} & {id(p) for g in muon.param_groups for p in g["params"]}
