"""Tests for eval/compliance.py: the real pipeline passes C1-C4, and deliberately illegal adapters are caught
(one reads its target, one learns from a chunk before scoring it, one is the ruled-illegal hashed gold-token cache)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from eval.bpb import build_byte_luts
from eval.compliance import (check_causality, check_coverage, check_events, check_normalization,
                             coverage_summary)
from eval.ngram import NgramBlender, NgramConfig, blend
from eval.run import EvalConfig
from eval.stream import score_stream
from eval.ttt import HashEmbedding, ScoreFirstTTT
from eval.verify import evaluate_verified
from submission.config import ModelConfig
from submission.model import GPT
from tests.tiny import EVERY_FEATURE_2_LAYERS

REPO = Path(__file__).resolve().parents[1]
# Every feature of both recipes on, at a size that scores in seconds on a CPU.
TINY = dict(EVERY_FEATURE_2_LAYERS, num_layers=2, model_dim=64, num_heads=4, num_kv_heads=2, xsa_last_n=2,
            vocab_size=1024, bigram_buckets=64, bigram_dim=16, value_embed_dim=16)
VOCAB = 1024
CHUNK = 96


@pytest.fixture(scope="module")
def real_tokens(sample_ids):
    return torch.tensor(sample_ids(1000))


def tiny_model() -> GPT:
    torch.manual_seed(0)
    model = GPT(ModelConfig(**TINY))
    for p in model.parameters():
        p.data += 0.05 * torch.randn_like(p)
    return model


# ---------------------------------------------------------------- deliberately illegal adapters

class ReadsTheTarget:
    """Raises the probability of the token at the predicted position itself (its target, which views() is handed
    only to keep what update() needs), then renormalizes: every row is a proper distribution, but p_t depends on
    x_t."""

    def views(self, model_logprobs, tokens, positions, targets):
        boost = torch.zeros_like(model_logprobs).scatter_(1, targets[:, None], 3.0)
        return {"cheat": torch.log_softmax(model_logprobs + boost, -1)}

    def update(self, tokens, positions):
        pass


class UpdatesBeforeScoring:
    """A unigram cache that counts the chunk's tokens before predicting them (and blends properly)."""

    def __init__(self):
        self.counts = torch.ones(VOCAB)

    def views(self, model_logprobs, tokens, positions, targets):
        self.counts += torch.bincount(tokens[int(positions[0]):], minlength=VOCAB)
        q = (self.counts / self.counts.sum()).expand(positions.numel(), VOCAB)
        return {"cheat": blend(model_logprobs, q, torch.full((positions.numel(),), 0.5))}

    def update(self, tokens, positions):
        pass


class HashedGoldCache:
    """The ruled-illegal cache: counts of hashed (previous, next) pairs, q(v) = c[hash(prev, v)] / c(prev), mixed
    as if it were a distribution. Materialized over the vocabulary, colliding pairs make rows sum far above 1."""

    def __init__(self, buckets: int = 64):
        self.buckets = buckets
        self.pairs = torch.zeros(buckets)
        self.prev = torch.zeros(VOCAB)

    def views(self, model_logprobs, tokens, positions, targets):
        prev = tokens[positions - 1]
        keys = (prev[:, None] * 2039 + torch.arange(VOCAB)[None, :]) % self.buckets
        q = self.pairs[keys] / self.prev[prev].clamp_min(1)[:, None]
        return {"cheat": torch.log(0.5 * model_logprobs.exp() + 0.5 * q)}

    def update(self, tokens, positions):
        prev, nxt = tokens[positions - 1], tokens[positions]
        self.pairs.index_add_(0, (prev * 2039 + nxt) % self.buckets, torch.ones(positions.numel()))
        self.prev.index_add_(0, prev, torch.ones(positions.numel()))


def audit(model, tokens, make_adapter, ttt: bool = False) -> dict:
    """C1-C4 of a stream with the given adapter (and optionally real TTT + hash embedding) over `tokens`."""
    end = tokens.numel()
    initial = {k: v.clone() for k, v in model.state_dict().items()}

    def run(context_tokens, score_tokens=None):
        model.load_state_dict(initial)
        tuner = ScoreFirstTTT(model, lr=0.01, momentum=0.9, epochs=2, grad_clip=1.0, batch_seqs=8, seq_len=32,
                              hash_embed=HashEmbedding(128, 64, 1)) if ttt else None
        try:
            return score_stream(model, context_tokens, 1, end, context=32, stride=8, chunk=CHUNK, batch_windows=8,
                                ttt=tuner, adapters={"adapter": make_adapter()}, score_tokens=score_tokens)
        finally:
            if tuner is not None:
                tuner.close()

    result = run(tokens)
    cuts = [CHUNK // 2, CHUNK + 17]  # inside the first and the second chunk
    return {"C1": check_causality(lambda c, s: run(c, s).nll, tokens, 1, end, cuts, VOCAB),
            "C2": check_normalization(result.norm), "C3": check_events(result.events, 1),
            "C4": check_coverage([coverage_summary(1, end, result.coverage)], end - 1)}


# ---------------------------------------------------------------- the legal pipeline passes

def test_the_real_pipeline_passes_every_check(real_tokens, sp):
    cfg = EvalConfig(context_len=32, stride=8, batch_windows=8, chunk_tokens=128, ttt_batch_seqs=8,
                     hash_buckets=128, compliance_chunk_tokens=64, compliance_chunks=2, ngram_score="tilt")
    body = evaluate_verified(tiny_model(), real_tokens[:400].numpy().astype(np.uint16), build_byte_luts(sp, VOCAB),
                             cfg, progress=False)
    assert all(check["passed"] for check in body["compliance"].values()), body["compliance"]
    assert "views model, blend, tilt" in body["compliance"]["C1"]["detail"]
    assert "each of the 399 targets scored exactly once" in body["compliance"]["C4"]["detail"]


def test_ngram_with_ttt_passes_the_audit(real_tokens):
    checks = audit(tiny_model(), real_tokens[:300], lambda: NgramBlender(VOCAB, NgramConfig(order=4)), ttt=True)
    assert all(c["passed"] for c in checks.values()), checks


# ---------------------------------------------------------------- illegal adapters are caught

def test_an_adapter_that_reads_its_target_fails_c1(real_tokens):
    checks = audit(tiny_model(), real_tokens[:300], ReadsTheTarget)
    assert not checks["C1"]["passed"] and "depends on x_" in checks["C1"]["detail"]
    assert checks["C2"]["passed"]  # its rows are proper distributions: only the causality check sees it


def test_an_adapter_that_learns_before_scoring_fails_c1(real_tokens):
    checks = audit(tiny_model(), real_tokens[:300], UpdatesBeforeScoring)
    assert not checks["C1"]["passed"] and "changed when the tokens" in checks["C1"]["detail"]
    assert checks["C2"]["passed"] and checks["C4"]["passed"]


def test_the_hashed_gold_token_cache_fails_c2(real_tokens):
    checks = audit(tiny_model(), real_tokens[:300], HashedGoldCache)
    assert not checks["C2"]["passed"] and "FAILS" in checks["C2"]["detail"]
    assert checks["C1"]["passed"]  # it is causal; what is wrong is that it is no distribution


# ---------------------------------------------------------------- the checks on their own

def test_c3_flags_updates_before_scores_and_scores_out_of_order():
    legal = [("score", "", 1, 50), ("update", "ttt", 0, 50), ("score", "", 50, 99), ("update", "ngram", 0, 99)]
    assert check_events(legal, 1)["passed"]
    early = [("update", "ttt", 0, 50), ("score", "", 1, 50)]
    assert "update before score" in check_events(early, 1)["detail"]
    ahead = [("score", "", 1, 50), ("update", "ngram", 0, 60)]
    assert not check_events(ahead, 1)["passed"]
    skipped = [("score", "", 1, 50), ("score", "", 60, 99)]
    assert "not left to right" in check_events(skipped, 1)["detail"]
    assert check_events([("update", "ttt", 0, 100), ("score", "", 100, 150)], 100)["passed"]  # before `first`


def test_c4_counts_each_target_once_across_shards():
    once = torch.ones(10, dtype=torch.int32)
    assert check_coverage([coverage_summary(11, 21, once), coverage_summary(1, 11, once)], 20)["passed"]
    twice = once.clone()
    twice[3], twice[4] = 2, 0
    assert coverage_summary(1, 11, twice)[2:] == [2, 0, 2]
    assert "not scored exactly once" in check_coverage([coverage_summary(1, 11, twice)], 10)["detail"]
    assert "gap" in check_coverage([coverage_summary(1, 11, once), coverage_summary(12, 22, once)], 21)["detail"]
    assert "overlap" in check_coverage([coverage_summary(1, 11, once), coverage_summary(10, 20, once)],
                                       19)["detail"]
    assert "never scored" in check_coverage([coverage_summary(1, 11, once)], 15)["detail"]


def test_c2_rejects_rows_that_do_not_sum_to_one_or_are_not_finite():
    good = {"model": torch.tensor([3e-7, 1e-9, 0.0], dtype=torch.float64)}
    assert check_normalization(good)["passed"]
    assert not check_normalization({"x": torch.tensor([2e-5, 0.0, 0.0], dtype=torch.float64)})["passed"]
    assert not check_normalization({"x": torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)})["passed"]
    assert not check_normalization({})["passed"]


def test_c1_refuses_to_judge_a_run_that_is_not_reproducible():
    tokens = torch.arange(100) % 7

    def noisy(context_tokens, score_tokens):
        return {"model": torch.rand(99)}

    verdict = check_causality(noisy, tokens, 1, 100, [50], 7)
    assert not verdict["passed"] and "not reproducible" in verdict["detail"]


def test_c1_keeping_the_bos_in_place_replaces_every_other_token_and_still_catches_a_read_of_later_content():
    """keep=BOS: the documents stay where they are (so a per-document pass batches them the same way) while every
    other token from the cut on is replaced and none becomes a BOS. A score that reads a later token's content is
    still caught; one that reads only where later documents start passes this form (the plain form catches it)."""
    vocab, bos = 7, 1
    tokens = torch.tensor([bos, 3, 4, 2, 2, bos, 5, 6, 6, 3, bos, 2, 4] * 4)
    seen = []

    def record(context_tokens, score_tokens):
        seen.append(context_tokens.clone())
        return {"model": torch.zeros(tokens.numel() - 1)}

    assert check_causality(record, tokens, 1, tokens.numel(), [20], vocab, keep=bos)["passed"]
    perturbed = seen[-1]
    assert torch.equal(perturbed[:20], tokens[:20])
    assert torch.equal(perturbed[20:] == bos, tokens[20:] == bos)
    assert bool((perturbed[20:] != tokens[20:])[tokens[20:] != bos].all())

    def reads_the_next_token(context_tokens, score_tokens):  # p_t from x_t: a leak of content
        return {"model": context_tokens[1:].float()}

    def reads_where_documents_start(context_tokens, score_tokens):  # p_t from the count of BOS after it
        after = (context_tokens == bos).flip(0).cumsum(0).flip(0)[1:]
        return {"model": after.float()}

    for keep in (None, bos):
        assert not check_causality(reads_the_next_token, tokens, 1, tokens.numel(), [20], vocab, keep=keep)["passed"]
    assert not check_causality(reads_where_documents_start, tokens, 1, tokens.numel(), [20], vocab)["passed"]
    assert check_causality(reads_where_documents_start, tokens, 1, tokens.numel(), [20], vocab, keep=bos)["passed"]


def test_c3_in_any_order_lets_documents_interleave_and_catches_an_update_before_its_score():
    """Per-document TTT scores documents side by side: chunk 2 of document B may come before chunk 1 of document A,
    but an adapter step may read only tokens already scored (the deliberately illegal variant steps on a chunk,
    then scores it)."""
    from eval.compliance import check_events_any_order
    legal = [("score", "", 1, 5), ("score", "", 9, 13), ("update", "lora", 1, 5), ("update", "lora", 9, 13),
             ("score", "", 5, 9), ("score", "", 13, 17), ("update", "lora", 0, 9), ("update", "lora", 9, 17)]
    assert check_events_any_order(legal, 1, 17)["passed"]
    illegal = [("score", "", 1, 5), ("update", "lora", 5, 9), ("score", "", 5, 9)]
    verdict = check_events_any_order(illegal, 1, 9)
    assert not verdict["passed"] and "consumed tokens [5, 9) before token 5 was scored" in verdict["detail"]
    partly = [("score", "", 1, 5), ("update", "lora", 1, 7)]
    assert "before token 5 was scored" in check_events_any_order(partly, 1, 9)["detail"]
    twice = [("score", "", 1, 5), ("score", "", 3, 7)]
    assert "scored twice" in check_events_any_order(twice, 1, 9)["detail"]
    assert "outside" in check_events_any_order([("score", "", 1, 12)], 1, 9)["detail"]
