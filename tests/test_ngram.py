"""Tests for eval/ngram.py (and the kit's tilt view, eval/tilt.py): normalization (C2), causality (C1), exact counts
under hashing, BOS, blend/tilt, mixer."""
from __future__ import annotations

import itertools
import json
import lzma
import math
import random
from collections import Counter
from pathlib import Path

import pytest
import torch

from eval.ngram import (SMOOTHINGS, NgramBlender, NgramConfig, NgramModel, OnlineMixer, PairCounts, blend,
                        context_windows, fit_mixing_weights, mixing_features, mixture_nll, model_entropy)
from eval.tilt import TiltBlender, fit_tilt_beta, ngram_hint, tilt, tilt_nll_change

REPO = Path(__file__).resolve().parents[1]
SAMPLE_DOCS = REPO / "data" / "sample" / "sample_wiki.jsonl.xz"
TOKENIZER = REPO / "data" / "sample" / "fineweb_1024_bpe.model"
BOS = 1


# ---------------------------------------------------------------- independent reference (pure Python, no torch)

def usable_length(stream, t, width):
    """Tokens before t a context may use: stop at the stream start, keep the most recent BOS and stop there."""
    length = 0
    for j in range(1, width + 1):
        if t - j < 0:
            break
        length += 1
        if stream[t - j] == BOS:
            break
    return length


def reference_counts(stream, upto, order, smoothing, context_key=tuple):
    """counts[n][(context key, next)] over stream[:upto], processed one token at a time. Kneser-Ney: the longest
    n-gram of a token counts raw, a shorter one counts when the n-gram one longer is seen for the first time."""
    counts = [Counter() for _ in range(order + 2)]
    seen = [set() for _ in range(order + 2)]
    for t in range(upto):
        top = min(order, usable_length(stream, t, order - 1) + 1)
        grams = {n: (context_key(tuple(stream[t - n + 1:t])), stream[t]) for n in range(1, top + 1)}
        for n in range(1, top + 1):
            if smoothing == "witten_bell" or n == top or grams[n + 1] not in seen[n + 1]:
                counts[n][grams[n]] += 1
        for n in range(1, top + 1):
            seen[n].add(grams[n])
    return counts


def reference_q(counts, stream, t, order, vocab, smoothing, context_key=tuple, discount=0.75, floor=1e-6):
    """Interpolated Witten-Bell / absolute-discount backoff from the uniform distribution up to the longest context."""
    q = [1.0 / vocab] * vocab
    for n in range(1, min(order, usable_length(stream, t, order - 1) + 1) + 1):
        key = context_key(tuple(stream[t - n + 1:t]))
        c = [counts[n].get((key, w), 0) for w in range(vocab)]
        total, types = sum(c), sum(1 for x in c if x)
        if total == 0:
            continue
        if smoothing == "witten_bell":
            q = [(c[w] + types * q[w]) / (total + types) for w in range(vocab)]
        else:
            q = [max(c[w] - discount, 0) / total + discount * types / total * q[w] for w in range(vocab)]
    return [(1 - floor) * x + floor / vocab for x in q]


def skewed_stream(length, vocab, seed, bos_rate=0.05):
    """Zipf-like tokens with some BOS ids, so contexts repeat and documents start."""
    rng = random.Random(seed)
    weights = [1.0 / (i + 1) for i in range(vocab)]
    stream = rng.choices(range(vocab), weights=weights, k=length)
    return [BOS if rng.random() < bos_rate else x for x in stream]


def stream_chunks(length, sizes):
    """[start, end) chunks of the given sizes, cycling, covering [0, length)."""
    start, i = 0, 0
    while start < length:
        end = min(length, start + sizes[i % len(sizes)])
        yield start, end
        start, i = end, i + 1


# ---------------------------------------------------------------- real tokens

@pytest.fixture(scope="module")
def real_tokens():
    """About 60K sp1024 tokens of the shipped Wikipedia sample: BOS + ids per document, as in the shards."""
    spm = pytest.importorskip("sentencepiece")
    sp = spm.SentencePieceProcessor(model_file=str(TOKENIZER))
    tokens = []
    with lzma.open(SAMPLE_DOCS, "rt", encoding="utf-8") as f:
        for line in f:
            tokens.append(BOS)
            tokens.extend(sp.encode(json.loads(line)["text"]))
            if len(tokens) >= 60_000:
                break
    return torch.tensor(tokens[:60_000])


def stream_model(tokens, cfg, vocab, upto, sizes=(4096,)):
    """A model fed tokens[:upto] chunk by chunk, as the scoring stream would after scoring each chunk."""
    model = NgramModel(vocab, cfg)
    for start, end in stream_chunks(upto, sizes):
        model.update(tokens[start:end], tokens[max(0, start - cfg.order + 1):start])
    return model


# ---------------------------------------------------------------- tests

@pytest.mark.parametrize("field,value", [("order", 0), ("smoothing", "good_turing"), ("discount", 1.5),
                                         ("floor", 0.0), ("hash_modulus", 1 << 50), ("mix_weights", (1.0,)),
                                         ("mix_fit_iters", 0), ("mix_fit_window", 0)])
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=f"NgramConfig.{field}="):
        NgramConfig(**{field: value})


def test_pair_counts_merge_matches_a_counter():
    """Batches of repeated and fresh keys (sizes 1 to 300) merged into the sorted table: same as counting them."""
    rng = random.Random(4)
    table, expected = PairCounts("cpu"), Counter()
    for size in (1, 300, 2, 57, 1, 120):
        batch = [rng.randrange(0, 500) * 1024 + rng.randrange(0, 4) for _ in range(size)]
        table.add(torch.tensor(batch))
        expected.update(batch)
    assert table.keys.tolist() == sorted(expected)
    assert table.counts.tolist() == [expected[k] for k in sorted(expected)]
    assert table.cumulative.tolist() == [0] + list(itertools.accumulate(expected[k] for k in sorted(expected)))
    assert table.contains(torch.tensor([table.keys[0].item(), -5, 10**9])).tolist() == [True, False, False]


@pytest.mark.parametrize("smoothing", SMOOTHINGS)
def test_distribution_is_normalized_and_positive_over_the_full_vocab(real_tokens, smoothing):
    cfg = NgramConfig(smoothing=smoothing)  # the recipe: K=12, orders 6-12 hashed at V=1024
    model = stream_model(real_tokens, cfg, 1024, 40_000)
    q = model.distribution(real_tokens, torch.arange(40_000, 44_096)).double()
    assert q.shape == (4096, 1024)
    assert (q.sum(1) - 1).abs().max() < 1e-5
    assert q.min() >= cfg.floor / 1024 * 0.99
    # Not uniform: the counts are in use (the match count says how long a context was found).
    prediction = model.predict(real_tokens, torch.arange(40_000, 44_096))
    assert (prediction.context_order >= 3).float().mean() > 0.5
    assert q.max(1).values.mean() > 0.2


@pytest.mark.parametrize("smoothing", SMOOTHINGS)
def test_prediction_ignores_the_token_at_and_after_its_position(real_tokens, smoothing):
    """C1: rerun with x_c .. x_end replaced by random tokens; q for every position <= c is bit-identical."""
    cfg = NgramConfig(order=6, smoothing=smoothing)
    model = stream_model(real_tokens, cfg, 1024, 20_000)
    positions = torch.arange(20_000, 20_600)
    q = model.distribution(real_tokens, positions)
    generator = torch.Generator().manual_seed(0)
    for cut in (20_000, 20_123, 20_599):
        perturbed = real_tokens.clone()
        perturbed[cut:] = torch.randint(0, 1024, (perturbed.numel() - cut,), generator=generator)
        q_perturbed = model.distribution(perturbed, positions)
        keep = positions <= cut
        assert torch.equal(q[keep], q_perturbed[keep])
        # The test can fail: positions after the cut see changed context and do change.
        if cut < 20_599:
            assert not torch.equal(q[~keep], q_perturbed[~keep])


@pytest.mark.parametrize("smoothing", SMOOTHINGS)
@pytest.mark.parametrize("order", [1, 2, 3])
def test_matches_pure_python_reference_without_collisions(order, smoothing):
    """Score-first stream over a 50-token vocabulary with BOS, uneven chunks: every q_t equals the reference."""
    vocab, length = 50, 360
    stream = skewed_stream(length, vocab, seed=order)
    tokens = torch.tensor(stream)
    cfg = NgramConfig(order=order, smoothing=smoothing)
    model = NgramModel(vocab, cfg)
    worst = 0.0
    for start, end in stream_chunks(length, (1, 37, 5, 90)):
        q = model.distribution(tokens, torch.arange(start, end)).double()
        counts = reference_counts(stream, start, order, smoothing)
        for t in range(start, end):
            expected = torch.tensor(reference_q(counts, stream, t, order, vocab, smoothing), dtype=torch.float64)
            worst = max(worst, (q[t - start] - expected).abs().max().item())
        model.update(tokens[start:end], tokens[max(0, start - order + 1):start])
    assert worst < 1e-6


def test_hash_collisions_merge_contexts_but_never_next_tokens():
    """hash_modulus 3 folds the 50 one-token contexts of order 2 into 3 ids: counts per next token stay exact."""
    vocab, modulus, order = 50, 3, 2
    stream = skewed_stream(400, vocab, seed=7)
    tokens = torch.tensor(stream)
    cfg = NgramConfig(order=order, smoothing="witten_bell", hash_modulus=modulus)
    model = NgramModel(vocab, cfg)
    model.update(tokens[:200])
    model.update(tokens[200:], tokens[199:200])
    table = model.tables[0]
    got = Counter({(int(k) // vocab, int(k) % vocab): int(c) for k, c in zip(table.keys, table.counts)})
    expected = Counter((stream[t - 1] % modulus, stream[t]) for t in range(1, len(stream)))
    assert got == expected
    # Contexts 4 and 7 share id 1 yet were followed by different tokens: each next token keeps its own count.
    followers = {stream[t] for t in range(1, len(stream)) if stream[t - 1] in (4, 7)}
    assert len(followers) > 1
    # The merged context's distribution is the reference over merged counts, and still sums to 1.
    context_key = (lambda ctx: sum(x * vocab ** i for i, x in enumerate(ctx)) % modulus)  # newest = top digit
    counts = reference_counts(stream, len(stream), order, "witten_bell", context_key)
    probe = torch.tensor([4, 7, 5])
    q = model.distribution(probe, torch.tensor([1, 2])).double()
    assert torch.equal(q[0], q[1])  # 4 and 7 are one context now
    assert (q.sum(1) - 1).abs().max() < 1e-6
    expected_q = reference_q(counts, [4, 7], 1, order, vocab, "witten_bell", context_key)
    assert (q[0] - torch.tensor(expected_q, dtype=torch.float64)).abs().max() < 1e-6


def test_hashed_high_orders_stay_normalized_and_exact_in_next_tokens():
    """Order 4 over V=50 with modulus 5: heavy merging of 3-token contexts; q still sums to 1 and equals the
    reference computed on merged contexts."""
    vocab, modulus, order = 50, 5, 4
    stream = skewed_stream(300, vocab, seed=11)
    tokens = torch.tensor(stream)
    context_key = (lambda ctx: sum(x * vocab ** i for i, x in enumerate(ctx)) % modulus)  # newest = top digit
    model = stream_model(tokens, NgramConfig(order=order, smoothing="witten_bell", hash_modulus=modulus), vocab, 250,
                         sizes=(64,))
    q = model.distribution(tokens, torch.arange(250, 300)).double()
    counts = reference_counts(stream, 250, order, "witten_bell", context_key)
    for t in range(250, 300):
        expected = torch.tensor(reference_q(counts, stream, t, order, vocab, "witten_bell", context_key),
                                dtype=torch.float64)
        assert (q[t - 250] - expected).abs().max() < 1e-6
    assert (q.sum(1) - 1).abs().max() < 1e-6
    # Kneser-Ney's continuation counts are approximate under merging, but q stays a distribution.
    kneser_ney = stream_model(tokens, NgramConfig(order=order, hash_modulus=modulus), vocab, 250, sizes=(64,))
    q = kneser_ney.distribution(tokens, torch.arange(250, 300)).double()
    assert (q.sum(1) - 1).abs().max() < 1e-6 and q.min() > 0


def test_context_stops_at_bos_and_stream_start():
    stream = torch.tensor([5, 6, BOS, 7, 8, 9])
    context, lengths = context_windows(stream, torch.arange(6), 3, BOS)
    assert lengths.tolist() == [0, 1, 2, 1, 2, 3]
    assert context[4].tolist() == [7, BOS, 6]  # newest first; 6 lies before the BOS and is not usable
    # A model that has seen "5 6 BOS 7 8": q right after a BOS does not depend on what precedes the BOS.
    model = NgramModel(12, NgramConfig(order=4, smoothing="witten_bell"))
    model.update(torch.tensor([5, 6, BOS, 7, 8, BOS, 7, 9]))
    q_a = model.distribution(torch.tensor([5, 6, BOS, 3]), torch.tensor([3]))
    q_b = model.distribution(torch.tensor([9, 8, BOS, 3]), torch.tensor([3]))
    assert torch.equal(q_a, q_b)
    # No table holds a context that reaches across a BOS: order 3 ctx (6, BOS) was never counted.
    order3 = {(int(k) // 12, int(k) % 12) for k in model.tables[1].keys}
    assert (BOS * 12 + 6, 7) not in order3 and (7 * 12 + BOS, 8) in order3  # ids are newest-first base-V


@pytest.mark.parametrize("smoothing", SMOOTHINGS)
def test_counts_do_not_depend_on_chunking(real_tokens, smoothing):
    """One update of 12,000 tokens vs uneven chunks: identical tables (Kneser-Ney 'new type' logic included),
    at order 6 where sp1024 contexts of 5 tokens are hashed."""
    cfg = NgramConfig(order=6, smoothing=smoothing)
    whole = stream_model(real_tokens, cfg, 1024, 12_000, sizes=(12_000,))
    chunked = stream_model(real_tokens, cfg, 1024, 12_000, sizes=(1, 777, 3, 2048))
    assert torch.equal(whole.unigram, chunked.unigram)
    for a, b in zip(whole.tables, chunked.tables):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.counts, b.counts)


def test_blend_is_normalized_and_matches_probability_space():
    generator = torch.Generator().manual_seed(1)
    logp = torch.log_softmax(3 * torch.randn(6, 50, generator=generator, dtype=torch.float64), -1)
    q = torch.softmax(torch.randn(6, 50, generator=generator, dtype=torch.float64), -1)
    alpha = torch.tensor([0.0, 1e-6, 0.1, 0.5, 0.9, 1.0], dtype=torch.float64)
    out = blend(logp, q, alpha)
    assert (torch.logsumexp(out, -1)).abs().max() < 1e-12
    expected = torch.log((1 - alpha[:, None]) * logp.exp() + alpha[:, None] * q)
    assert (out - expected).abs().max() < 1e-12
    assert torch.equal(out[0], logp[0])  # a = 0 is the model itself


def test_tilt_is_normalized_and_matches_the_formula():
    generator = torch.Generator().manual_seed(2)
    logits = 4 * torch.randn(5, 50, generator=generator, dtype=torch.float64)
    logits[4, 17] = 60.0  # p(h) ~ 1: Z = 1 + p(h)(e^b - 1) must stay accurate
    logp = torch.log_softmax(logits, -1)
    hint = torch.tensor([0, 3, 9, 49, 17])
    beta = torch.tensor([1.5, -2.0, 0.0, 4.0, -3.0], dtype=torch.float64)
    out = tilt(logp, hint, beta)
    assert (torch.logsumexp(out, -1)).abs().max() < 1e-12
    p = logp.exp()
    bonus = torch.zeros_like(p).scatter_(1, hint[:, None], 1.0) * beta[:, None]
    z = 1 + p.gather(1, hint[:, None]) * (beta[:, None].exp() - 1)
    assert (out - torch.log(p * bonus.exp() / z)).abs().max() < 1e-9
    scalar = tilt(logp, hint, 0.7)
    assert (torch.logsumexp(scalar, -1)).abs().max() < 1e-12
    assert torch.equal(ngram_hint(torch.softmax(logits, -1)), logits.argmax(-1))


def test_mixing_fit_reaches_the_scipy_optimum():
    """BHHH + line search vs scipy's BFGS on the same blended NLL: same minimum."""
    optimize = pytest.importorskip("scipy.optimize")
    generator = torch.Generator().manual_seed(3)
    n = 4000
    features = mixing_features(4 * torch.rand(n, generator=generator),
                               torch.randint(0, 200, (n,), generator=generator),
                               torch.randint(0, 7, (n,), generator=generator), 6).double()
    # q is better than p where the matched context was long, worse elsewhere: the fit must learn that.
    long_match = features[:, 3] > 0.5
    logp = -2 - torch.rand(n, generator=generator, dtype=torch.float64) * 3
    logq = torch.where(long_match, logp + 1.5, logp - 2.0) + torch.randn(n, generator=generator,
                                                                         dtype=torch.float64)
    logq = torch.clamp_max(logq, -1e-3)
    w = fit_mixing_weights(features, logp, logq, torch.zeros(4, dtype=torch.float64), iters=50)
    ours = mixture_nll(features, logp, logq, w).item()
    result = optimize.minimize(lambda v: mixture_nll(features, logp, logq, torch.tensor(v)).item(),
                               [0.0, 0.0, 0.0, 0.0], method="BFGS", options={"gtol": 1e-10})
    assert ours <= result.fun + 1e-7
    assert ours < mixture_nll(features, logp, logq, torch.zeros(4, dtype=torch.float64)).item() - 0.1
    assert w[3] > 0  # longer matches get more n-gram weight


def test_tilt_fit_reaches_the_scipy_optimum_and_matches_the_tilted_scores():
    """Newton on the scalar tilt vs scipy's bounded scalar minimizer; the objective equals the mean change of
    -log p'(y) computed from tilt() itself."""
    optimize = pytest.importorskip("scipy.optimize")
    generator = torch.Generator().manual_seed(4)
    logp = torch.log_softmax(3 * torch.randn(3000, 40, generator=generator, dtype=torch.float64), -1)
    hint = torch.randint(0, 40, (3000,), generator=generator)
    # targets equal the hint 30% of the time, more often than p(hint) predicts: the fit must learn beta > 0
    targets = torch.where(torch.rand(3000, generator=generator) < 0.3, hint,
                          torch.randint(0, 40, (3000,), generator=generator))
    log_p_hint, hit = logp.gather(1, hint[:, None]).squeeze(1), (hint == targets).double()
    beta = fit_tilt_beta(log_p_hint, hit, torch.zeros((), dtype=torch.float64), iters=50)
    result = optimize.minimize_scalar(lambda b: tilt_nll_change(log_p_hint, hit, torch.tensor(b)).item(),
                                      bounds=(-20, 20), method="bounded", options={"xatol": 1e-10})
    assert abs(beta.item() - result.x) < 1e-4 and beta.item() > 0
    tilted = tilt(logp, hint, beta)
    change = (logp - tilted).gather(1, targets[:, None]).mean()
    assert math.isclose(change.item(), tilt_nll_change(log_p_hint, hit, beta).item(), rel_tol=1e-9)
    assert change < 0  # the fitted tilt lowers the NLL of these targets


def test_blender_tilt_view_starts_untilted_and_learns_from_scored_hints(real_tokens):
    vocab = 1024
    blender = TiltBlender(vocab, NgramConfig(order=4))
    logp = torch.log_softmax(torch.zeros(2000, vocab), -1)
    first = blender.views(logp, real_tokens, torch.arange(1, 2001), real_tokens[1:2001])
    assert set(first) == {"blend", "tilt"} and torch.equal(first["tilt"], logp)  # beta = 0 before any update
    blender.update(real_tokens, torch.arange(1, 2001))
    assert blender.beta == 0  # nothing was counted while the first chunk was predicted: its hints were ties
    blender.views(logp[:1000], real_tokens, torch.arange(2001, 3001), real_tokens[2001:3001])
    blender.update(real_tokens, torch.arange(2001, 3001))
    assert blender.beta > 0  # a uniform model under-predicts the n-gram's most likely token
    later = blender.views(logp[:500], real_tokens, torch.arange(3001, 3501), real_tokens[3001:3501])
    assert (torch.logsumexp(later["tilt"].double(), -1) - 0).abs().max() < 1e-5
    assert not torch.equal(later["tilt"], logp[:500])


def test_online_mixer_starts_at_zero_and_fixed_weights_stay_fixed():
    features = mixing_features(torch.tensor([1.0, 2.0]), torch.tensor([0, 5]), torch.tensor([0, 3]), 6)
    assert torch.equal(OnlineMixer(NgramConfig()).alpha(features), torch.zeros(2))
    weights = (-1.0, 0.5, 0.25, 2.0)
    mixer = OnlineMixer(NgramConfig(mix_weights=weights))
    alpha = mixer.alpha(features)
    expected = torch.sigmoid(torch.tensor([-1 + 0.5, -1 + 1.0 + 0.25 * math.log(6) + 2 * 0.5]))
    assert torch.allclose(alpha, expected)
    mixer.update(features, torch.tensor([-1.0, -2.0]), torch.tensor([-0.1, -0.1]))
    assert torch.allclose(mixer.alpha(features), expected)


def test_blender_refuses_updates_for_positions_it_did_not_predict():
    tokens = torch.tensor(skewed_stream(64, 20, seed=5))
    blender = NgramBlender(20, NgramConfig(order=3))
    logp = torch.log_softmax(torch.zeros(8, 20), -1)
    with pytest.raises(RuntimeError, match="not the ones predicted"):
        blender.update(tokens, torch.arange(1, 9))
    blender.views(logp, tokens, torch.arange(1, 9), tokens[1:9])
    with pytest.raises(RuntimeError, match="not the ones predicted"):
        blender.update(tokens, torch.arange(1, 10))
    blender.update(tokens, torch.arange(1, 9))
    assert blender.model.tokens_counted == 8


def test_blending_lowers_nll_of_a_weak_model_on_later_text(real_tokens):
    """Behavioural check, not tuned: a unigram 'model' from the first 10K tokens, then a score-first stream over
    the next 50K tokens; on the last 25K the blend beats the model alone and each row stays normalized."""
    vocab = 1024
    counts = torch.bincount(real_tokens[:10_000], minlength=vocab).double() + 1
    unigram = torch.log(counts / counts.sum()).float()
    blender = NgramBlender(vocab, NgramConfig())
    model_nll = blended_nll = 0.0
    for start, end in stream_chunks(50_000, (4096,)):
        positions = torch.arange(10_000 + start, 10_000 + end)
        logp = unigram.expand(positions.numel(), vocab)
        out = blender.views(logp, real_tokens, positions, real_tokens[positions])["blend"]
        assert (torch.logsumexp(out.double(), -1)).abs().max() < 1e-5
        targets = real_tokens[positions][:, None]
        if start >= 25_000:
            model_nll -= logp.gather(1, targets).double().sum().item()
            blended_nll -= out.gather(1, targets).double().sum().item()
        blender.update(real_tokens, positions)
    assert blended_nll < 0.9 * model_nll


def test_model_entropy_matches_the_definition():
    p = torch.tensor([[0.5, 0.25, 0.25], [1 / 3, 1 / 3, 1 / 3]], dtype=torch.float64)
    expected = torch.tensor([1.5 * math.log(2), math.log(3)], dtype=torch.float64)
    assert torch.allclose(model_entropy(torch.log(p)), expected)


@pytest.mark.parametrize("kw, message", [
    ({"bos_id": -1}, r"^NGRAM_BOS_ID=-1: must be >= 0 \(NgramConfig.bos_id=-1\)$"),
    ({"discount": float("nan")}, r"^NGRAM_DISCOUNT=nan: must be in \(0, 1\]"),
    ({"mix_weights": (0.0, 1.0, float("inf"), 0.0)}, r"^NGRAM_MIX_WEIGHTS=\(0.0, 1.0, inf, 0.0\): need 4 finite"),
    ({"hash_modulus": 1 << 47}, r"^NGRAM_HASH_MODULUS=140737488355328: must be in \[1, 140737488355328\)"),
])
def test_config_names_the_setting_as_typed(kw, message):
    """The n-gram settings are typed NGRAM_<FIELD>; NaN and infinite values are out of every range."""
    with pytest.raises(ValueError, match=message):
        NgramConfig(**kw)
    NgramConfig(order=1, discount=1.0, hash_modulus=(1 << 47) - 1, bos_id=0, mix_weights=(0.0, 0.0, 0.0, 0.0))


def test_blender_learns_the_same_from_pieces_predicted_out_of_order(real_tokens):
    """Per-document LoRA predicts a batch's documents interleaved (a chunk of each in turn) and updates the n-gram
    once per batch: pieces arriving in any order must teach it exactly what the same pieces in stream order do."""
    vocab = 1024
    logp = torch.log_softmax(torch.randn(3000, vocab, generator=torch.Generator().manual_seed(0)), -1)
    pieces = [(1, 700), (700, 1500), (1500, 3001)]
    blenders = []
    for order in (pieces, pieces[::-1]):
        blender = TiltBlender(vocab, NgramConfig(order=4))
        blender.views(logp[:200], real_tokens, torch.arange(3001, 3201), real_tokens[3001:3201])
        with pytest.raises(RuntimeError, match="not the ones predicted"):
            blender.update(real_tokens, torch.arange(3001, 3202))
        blender = TiltBlender(vocab, NgramConfig(order=4))
        for a, b in order:
            blender.views(logp[a - 1:b - 1], real_tokens, torch.arange(a, b), real_tokens[a:b])
        blender.update(real_tokens, torch.arange(1, 3001))
        blenders.append(blender)
    first, second = blenders
    assert first.model.tokens_counted == second.model.tokens_counted == 3000
    positions = torch.arange(3001, 3101)
    views = [b.views(logp[:100], real_tokens, positions, real_tokens[3001:3101]) for b in blenders]
    assert torch.allclose(views[0]["blend"], views[1]["blend"], atol=1e-6)
    assert torch.allclose(views[0]["tilt"], views[1]["tilt"], atol=1e-6)
    assert not torch.equal(views[0]["blend"], logp[:100])  # the blend is not the model: the n-gram learned


def test_the_blend_from_targets_alone_is_the_blend_of_full_rows(real_tokens):
    """eval/lora.py's target_blend (for scorers that keep only the model's log-probability of each target and its
    entropy) gives the same scores and learns the same as views() on the full rows, chunk after chunk; with the
    context stream perturbed (as the causality check does) it scores the true targets; its checked rows are the
    full blend."""
    from eval.lora import target_blend
    vocab, n = 1024, 3000
    logp = torch.log_softmax(2 * torch.randn(n, vocab, generator=torch.Generator().manual_seed(1)), -1)
    context = real_tokens.clone()
    context[1700:] = (context[1700:] + 7) % vocab  # the causality check's perturbed stream; targets stay true
    full, alone = NgramBlender(vocab, NgramConfig(order=5)), NgramBlender(vocab, NgramConfig(order=5))
    for a, b in ((1, 1000), (1000, 2000), (2000, n + 1)):
        positions = torch.arange(a, b)
        rows = logp[a - 1:b - 1]
        learned, true = context[a:b], real_tokens[a:b]
        expected = full.views(rows, context, positions, learned)["blend"]
        check = torch.tensor([0, b - a - 1])
        score, checked = target_blend(alone, model_entropy(rows), rows.gather(1, learned[:, None])[:, 0], context,
                                      positions, learned, true, rows.gather(1, true[:, None])[:, 0], rows[check],
                                      check)
        torch.testing.assert_close(score, expected.gather(1, true[:, None])[:, 0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(checked, expected[check], rtol=1e-5, atol=1e-5)
        full.update(context, positions)
        alone.update(context, positions)
        assert torch.equal(full.mixer.weights, alone.mixer.weights)
    assert full.mixer.weights is not None and full.model.tokens_counted == alone.model.tokens_counted == n
    with pytest.raises(ValueError, match="tilt view needs"):
        target_blend(TiltBlender(vocab), *[None] * 7)
