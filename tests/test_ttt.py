"""Tests for eval/ttt.py: per-group LRs under the cosine schedule, the hash embedding, which tokens TTT trains on,
parameter choice, gradient clipping, and that TTT lowers the loss on what it saw."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from eval.ttt import HashEmbedding, ScoreFirstTTT, select_parameters, training_windows
from submission.config import ModelConfig
from submission.model import GPT
from tests.tiny import EVERY_FEATURE_2_LAYERS

# Every feature of both recipes on, at a size that scores in seconds on a CPU.
TINY = dict(EVERY_FEATURE_2_LAYERS, num_layers=2, model_dim=64, num_heads=4, num_kv_heads=2, xsa_last_n=2,
            vocab_size=1024, bigram_buckets=64, bigram_dim=16, value_embed_dim=16)


def tiny_model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(ModelConfig(**TINY))
    for p in model.parameters():
        p.data += 0.05 * torch.randn_like(p)
    return model


def tuner(model, **kw) -> ScoreFirstTTT:
    settings = dict(lr=0.002, momentum=0.9, epochs=1, grad_clip=1.0, batch_seqs=4, seq_len=32)
    return ScoreFirstTTT(model, **{**settings, **kw})


def test_per_group_lrs_survive_the_cosine_schedule():
    """A real submission gave its hash table a 10x LR group and then wrote one scheduled LR into every group."""
    model = tiny_model()
    table = HashEmbedding(128, 64, bos_id=1)
    ttt = tuner(model, lr=0.002, hash_embed=table, hash_lr_mult=10.0)
    model_group, hash_group = ttt.optimizer.param_groups
    assert hash_group["params"] == [table.table.weight]
    for progress in (0.0, 0.25, 0.5, 0.9):
        ttt.set_lr(progress)
        expected = 0.002 * 0.5 * (1 + math.cos(math.pi * progress))
        assert math.isclose(model_group["lr"], expected, rel_tol=1e-12)
        assert math.isclose(hash_group["lr"], 10 * expected, rel_tol=1e-12)
    tokens = torch.randint(2, 1024, (200,))
    ttt.update(tokens[:101], 1, 101, 0.5)  # the update applies the schedule itself, keeping the ratio
    assert math.isclose(hash_group["lr"] / model_group["lr"], 10.0, rel_tol=1e-12)
    ttt.close()


def test_hash_embedding_starts_as_a_no_op_and_keys_pairs_within_documents():
    model, table = tiny_model(), HashEmbedding(128, 64, bos_id=1)
    x = torch.tensor([[5, 6, 1, 7, 8, 8]])
    with torch.no_grad():
        assert torch.equal(model.logits(x, table(x)), model.logits(x))
    with torch.no_grad():
        table.table.weight.copy_(torch.arange(128.0)[:, None].expand(128, 64))
    bucket = table(x)[0, :, 0].long()
    assert bucket[0] == 0 and bucket[2] == 0  # stream start and BOS: no pair across a document boundary
    assert (bucket[[1, 3, 4, 5]] > 0).all() and bucket[4] != bucket[5]  # (7, 8) and (8, 8) are different pairs
    y = x.clone()
    y[0, :2] = torch.tensor([9, 9])  # another previous document changes nothing from the BOS on
    assert torch.equal(table(y)[0, 2:], table(x)[0, 2:])


@pytest.mark.parametrize("lo,hi,seq_len", [(1, 101, 32), (201, 501, 64), (5, 9, 16), (40, 45, 32), (1, 2, 8)])
def test_training_windows_train_exactly_the_chunk_targets_from_known_tokens(lo, hi, seq_len):
    known = torch.arange(1000, 1000 + hi)  # distinct ids: a value names its position
    trained = []
    for x, y in training_windows(known, lo, hi, seq_len):
        assert x.shape == y.shape and x.size(1) <= seq_len
        for xs, ys in zip(x, y):
            start = int(xs[0]) - 1000
            assert torch.equal(xs, known[start:start + xs.numel()])  # contiguous tokens of the stream
            kept = ys != -100
            assert torch.equal(ys[kept], (xs + 1)[kept])  # each target is the next token
            trained += (ys[kept] - 1000).tolist()
    assert sorted(trained) == list(range(lo, hi))  # every chunk target once, nothing before lo


def test_update_lowers_the_loss_on_the_chunk_it_trained_on():
    model = tiny_model()
    tokens = torch.randint(2, 200, (257,))

    def chunk_loss():
        with torch.no_grad():
            return F.cross_entropy(model.logits(tokens[None, :-1])[0], tokens[1:]).item()

    before = chunk_loss()
    ttt = tuner(model, lr=0.05, epochs=3, hash_embed=HashEmbedding(256, 64, bos_id=1))
    ttt.update(tokens, 1, 257, 0.0)
    ttt.close()
    assert chunk_loss() < before - 0.01


def test_only_chosen_parameters_change_and_requires_grad_is_restored():
    model = tiny_model()
    model.blocks[0].attn_scale.requires_grad_(False)  # a flag of the caller's that must come back as it was
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ttt = tuner(model, lr=0.05, params="blocks.1")
    ttt.update(torch.randint(2, 1024, (129,)), 1, 129, 0.0)
    ttt.close()
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) != name.startswith("blocks.1."), name
    assert not model.blocks[0].attn_scale.requires_grad and model.blocks[1].attn_scale.requires_grad
    with pytest.raises(ValueError, match="matches no parameter"):
        select_parameters(model, "block.1")


def test_grad_clip_bounds_the_first_step():
    """SGD's first step is -lr * g with momentum buffer = g; clipped, its norm is exactly lr * clip. The step is
    large enough (1e-3) that float32 rounding of p - before (~1e-9 per weight) does not blur the norm: at lr 0.01 it
    moved it by 0.09-0.11% against a 0.1% tolerance."""
    model = tiny_model()
    before = [p.detach().clone() for p in model.parameters()]
    ttt = tuner(model, lr=1.0, grad_clip=1e-3, batch_seqs=64)
    ttt.update(torch.randint(2, 1024, (65,)), 1, 65, 0.0)
    step = torch.sqrt(sum(((p - b).double() ** 2).sum() for p, b in zip(model.parameters(), before)))
    assert math.isclose(step.item(), 1.0 * 1e-3, rel_tol=1e-4)
    ttt.close()
