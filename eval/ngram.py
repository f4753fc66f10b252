"""Legal n-gram blending: a full-vocabulary backoff distribution built from scored tokens, mixed into p."""
from __future__ import annotations

# What makes it legal (conditions C1-C4 of the challenge's issue #1017; the README's Legality section):
# - C1 causal: q_t is built from the counts and the K-1 tokens before t; `context_windows` is the only place that
#   reads the token stream for a prediction and it gathers positions t-1 .. t-K+1, never t.
# - C2 normalized: q_t is a distribution over the whole vocabulary. Contexts may be merged by hashing, but each
#   context keeps exact counts per next token (keys are (context id, next token) pairs, never hashed together),
#   so every interpolation step is a convex combination of distributions; a uniform floor keeps q_t > 0.
# - C3 score-before-update: `NgramModel.update` is given tokens the caller has already scored; `NgramBlender`
#   refuses to update positions it did not predict, and the mixing weights are fitted only on scored tokens.
# - C4 single pass: nothing here rescores; each position is predicted once per call the stream makes.
#
# Storage: per order n >= 2, a sorted int64 array of keys context_id * V + next_token with int64 counts and their
# prefix sums: 24 bytes per distinct (context, next) pair seen, plus V counts for the unigram. A stream of T
# scored tokens adds at most T pairs per order; measured at K=12 on sp1024 text: 335 MB per 1.57M tokens, so every
# rank, which counts the whole val (40.5M sp8192 or 62M sp1024 tokens), ends at ~9-13 GB. This replaces a dense
# [buckets, V] table per order: at V=1024 a dense table of 2^16 buckets is already 256 MiB per order yet would
# merge ~100 distinct 5-token contexts per bucket. Context ids are exact while V^(n-1) < 2^47 (orders <= 5 at
# sp1024, <= 4 at sp8192), hashed modulo a 47-bit prime beyond (expected collisions, 8M contexts of one order: 0.2).
#
# Cost per predicted token, per order: two binary searches over the pairs held (~25 steps), a gather of the
# T(c) counts its context has seen, one scale of its V-float row of q and a scatter of T(c) values. The dense
# [N, V] float32 passes dominate the memory traffic: ~(K + 6) * 4V bytes per token (one per order, plus floor,
# renormalization, log and blend), 72 KiB at K=12, V=1024, i.e. ~0.3 s of HBM time for a rank's 1/8 of 62M.
# In practice the blender is launch- and sync-bound (one host sync per order per call, one table re-sort per
# order per update, one mixer refit per update), so its time scales with the number of chunks. Measured with the
# defaults on one H100 over the dev val (1.57M tokens; blending into the static 4-gram described at
# NgramConfig.order, a weaker stand-in than a trained transformer, which already captures in-document repeats,
# so expect smaller gains there):
#     chunk 32,768: gain 0.062 bits/token, 2.2 s (predict 0.7, count 0.7, mixer refit 0.6)
#     chunk  8,192: gain 0.084 bits/token, 5.5 s (predict 1.9, count 2.5, mixer refit 1.0)
#     chunk  2,048: gain 0.105 bits/token, 17 s  (predict 6.3, count 7.4, mixer refit 2.8)
# Smaller chunks gain more because the counts are fresher, so the chunk size is the real trade-off; every rank
# counts and refits on the whole val, ~25-40x these times for its counts and refits (predicting is split over the
# ranks). To keep the n-gram from dominating eval time: predict each scored position
# once (never per sliding window), keep the token stream on the device so context windows are gathered, not
# copied, and choose the chunk size from the table above against the time left in the 600 s budget.
#
# Ranks: the stream's ranks each predict a share of every chunk, and once the whole chunk is scored all of them
# count all of it and refit on the gathered predictions (NgramBlender.update): every token counted is scored and
# lies before every position still to be predicted (C1, C3), and each rank holds the table one process would.

import math
import typing
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from eval.stream import gather_rows
from submission.config import check_ranges

SMOOTHINGS = ("witten_bell", "kneser_ney")
# Largest prime below 2^47: context ids stay < 2^47, so id * V + next < 2^63 for any V <= 2^16 (uint16 tokens).
HASH_MODULUS = 140_737_488_355_213
MAX_VOCAB = 1 << 16
NUM_MIX_FEATURES = 4
# Largest change of any token's mixing logit in one fit iteration: a_t moves by at most a factor e^2 per step.
MAX_LOGIT_STEP = 2.0
# A refit stops once an iteration lowers the mean blended NLL by less than this many nats/token (unmeasurable).
FIT_TOLERANCE = 1e-10


@dataclass
class NgramConfig:
    """The n-gram predictor and its mixing rule; defaults are the recipe."""
    order: int = 12
    """Max order K: contexts of up to K-1 previous tokens (order 1 = unigram, order 0 = the uniform base). Measured on
    the benchmark dev val (sp1024, 1.57M tokens, H100), blending into a static Kneser-Ney 4-gram trained on the
    61.7M train tokens (4.726 bits/token), score-first chunks of 32,768: gain in bits/token K=2 0.022, 3 0.042, 4
    0.048, 6 0.056, 8 0.058, 12 0.061, 16 0.063; memory per 1.57M tokens 47 MB (K=4), 188 MB (8), 335 MB (12), 483
    MB (16). 12 is where the gain per doubling of K halves; 11 tokens of context (~28 bytes) lock onto verbatim
    repeats, the part a 2048-token transformer cannot see across documents."""
    smoothing: str = "kneser_ney"
    """"witten_bell": P(w|c) = (c(c,w) + T(c) P_lower(w)) / (N(c) + T(c)), T = distinct next tokens, N = count.
    "kneser_ney": interpolated absolute discounting with Kneser-Ney continuation counts for the lower orders.
    Kneser-Ney won at every K in the measurement above (K=12: 0.061 vs 0.049 bits/token; alone, K=4 on 400K tokens:
    6.46 vs 6.88 bits/token)."""
    discount: float = 0.75
    """Absolute discount D for "kneser_ney", in (0, 1]; 0.75 is the discount Church & Gale (1991) measured between
    training and held-out counts (the value Jurafsky & Martin use for interpolated Kneser-Ney)."""
    floor: float = 1e-6
    """Uniform mass mixed in last: q >= floor / V for every token whatever the counts, so log q stays finite in float32
    even after K products of backoff weights; costs at most -log(1 - floor) ~ 1e-6 nats where q is right."""
    hash_modulus: int = HASH_MODULUS
    """Contexts of order n are keyed by their base-V value modulo this prime: exact while V^(n-1) < hash_modulus,
    hashed beyond. Lower it only to test collisions; it must satisfy hash_modulus * V < 2^63."""
    bos_id: int = 1
    """Document boundary: a context never reaches back past the most recent BOS (the BOS itself is context)."""
    mix_weights: tuple[float, float, float, float] | None = None
    """Mixing a_t = sigmoid(w . f_t), f_t = (1, model entropy in nats, log1p(context count), matched order / K). None:
    w is the maximum-likelihood fit of the blended score on the last mix_fit_window scored tokens, refitted after
    every update, and a_t = 0 before the first scored chunk (no evidence yet). Measured fits (dev val, K=12): w ~
    (-4.7, 0.22, 0.28, 4.3): more n-gram weight where the model is unsure and where a long, often-seen context
    matched. A 4-tuple fixes w instead (no refits)."""
    mix_fit_iters: int = 10
    """Gauss-Newton (BHHH) iterations per refit; each refit starts from the previous weights, so a few suffice."""
    mix_fit_window: int = 1 << 20
    """The refit uses the most recent scored tokens only: bounds its cost per chunk (4 weights need far fewer) and
    follows the n-gram as its counts grow, which shifts how much q deserves."""

    PREFIX: typing.ClassVar[str] = "ngram_"  # settings are NGRAM_<FIELD> (submission.config.settings_index)
    # Each number's allowed values (submission.config.check_ranges); the others are checked in __post_init__.
    RANGES: typing.ClassVar[dict] = {
        "order": (">= 1", " (1 = unigram; the recipe uses 12)"),
        "discount": ("(0, 1]", " so every seen count stays >= 0 after discounting (the recipe uses 0.75)"),
        "floor": ("(0, 1)", " so every token keeps mass (the recipe uses 1e-6)"),
        "hash_modulus": (f"[1, {(1 << 63) // MAX_VOCAB})", f" so that id * V fits int64 (the recipe uses the prime "
                         f"{HASH_MODULUS})"),
        "bos_id": ">= 0", "mix_fit_iters": ">= 1", "mix_fit_window": (">= 1", " tokens")}

    def __post_init__(self):
        check_ranges(self, "ngram_")
        if self.smoothing not in SMOOTHINGS:
            raise ValueError(f"NGRAM_SMOOTHING={self.smoothing!r}: choose one of {', '.join(SMOOTHINGS)} "
                             f"(NgramConfig.smoothing={self.smoothing!r})")
        weights = self.mix_weights
        if weights is not None and (len(weights) != NUM_MIX_FEATURES or not all(math.isfinite(w) for w in weights)):
            raise ValueError(f"NGRAM_MIX_WEIGHTS={weights}: need {NUM_MIX_FEATURES} finite weights (bias, entropy, "
                             f"log1p count, order / K) or None to fit them online (NgramConfig.mix_weights={weights})")


def context_windows(tokens: torch.Tensor, positions: torch.Tensor, width: int,
                    bos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `width` tokens before each position, newest first ([N, width] int64), and how many of them are usable:
    a context stops at the stream start and just after (keeping) the most recent BOS. Reads only tokens[p-width:p]."""
    offsets = torch.arange(1, width + 1, device=positions.device)
    index = positions[:, None] - offsets[None, :]
    in_stream = index >= 0
    context = tokens[index.clamp_min(0)].long()
    is_bos = (context == bos_id) & in_stream
    bos_before = is_bos.long().cumsum(1) - is_bos.long()  # a BOS at column j still counts; older ones do not
    usable = in_stream & (bos_before == 0)
    return context, usable.sum(1)


def context_ids(context: torch.Tensor, vocab_size: int, modulus: int) -> torch.Tensor:
    """[N, width] ids: column j keys the context of the j+1 newest tokens (order j+2) as its base-V value mod
    `modulus`, computed newest-first so each order extends the previous one."""
    ids = torch.empty_like(context)
    value = torch.zeros(context.shape[0], dtype=torch.int64, device=context.device)
    for j in range(context.shape[1]):
        value = (value * vocab_size + context[:, j]) % modulus
        ids[:, j] = value
    return ids


class PairCounts:
    """Exact counts of (context id, next token) pairs of one order: sorted keys id * V + next, counts, prefix sums."""

    def __init__(self, device):
        self.keys = torch.zeros(0, dtype=torch.int64, device=device)
        self.counts = torch.zeros(0, dtype=torch.int64, device=device)
        self.cumulative = torch.zeros(1, dtype=torch.int64, device=device)

    def add(self, keys: torch.Tensor) -> None:
        """Count each key once per occurrence (integer adds: bit-identical on every device and run)."""
        if keys.numel() == 0:
            return
        # Re-sorting the table with the chunk's keys: 0.3 ms per add at 300K pairs, 1.6 ms at 7M (H100). A
        # linear-pass merge measured 0.6 / 0.95 ms: it only wins past ~2M pairs, so the simpler code stays.
        new_keys, new_counts = torch.unique(keys, return_counts=True)
        self.keys, inverse = torch.unique(torch.cat([self.keys, new_keys]), return_inverse=True)
        self.counts = torch.zeros_like(self.keys).index_add_(0, inverse, torch.cat([self.counts, new_counts]))
        self.cumulative = F.pad(self.counts.cumsum(0), (1, 0))

    def contains(self, keys: torch.Tensor) -> torch.Tensor:
        if self.keys.numel() == 0:
            return torch.zeros_like(keys, dtype=torch.bool)
        return self.keys[torch.searchsorted(self.keys, keys).clamp_max(self.keys.numel() - 1)] == keys

    def context_ranges(self, first_keys: torch.Tensor, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """[lo, hi) of the entries whose key lies in [first_key, first_key + V): one context's next tokens."""
        return (torch.searchsorted(self.keys, first_keys),
                torch.searchsorted(self.keys, first_keys + vocab_size))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.keys, self.counts, self.cumulative))


@dataclass
class NgramPrediction:
    """q [N, V] float32 (rows sum to 1, all > 0); context_count [N]: tokens seen after the longest matched
    context; context_order [N]: its order (1 = unigram, 0 = nothing scored yet)."""
    q: torch.Tensor
    context_count: torch.Tensor
    context_order: torch.Tensor


def _expand_ranges(starts: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, entry) for every entry of every range [starts[i], starts[i] + lengths[i])."""
    total = int(lengths.sum())  # one host sync: the output size of the expansion
    rows = torch.repeat_interleave(torch.arange(lengths.numel(), device=lengths.device), lengths,
                                   output_size=total)
    range_start = lengths.cumsum(0) - lengths
    entries = starts[rows] + torch.arange(total, device=lengths.device) - range_start[rows]
    return rows, entries


def _first_occurrences(keys: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mask of the valid indices holding the first occurrence of their key among valid indices."""
    index = valid.nonzero().squeeze(1)
    first = torch.zeros_like(valid)
    if index.numel() == 0:
        return first
    _, inverse = torch.unique(keys[index], return_inverse=True)
    earliest = torch.full((int(inverse.max()) + 1,), index.numel(), dtype=torch.int64, device=keys.device)
    earliest.scatter_reduce_(0, inverse, torch.arange(index.numel(), device=keys.device), "amin")
    first[index[earliest]] = True
    return first


class NgramModel:
    """Interpolated backoff n-gram over the full vocabulary, counting only the tokens the caller has scored."""

    def __init__(self, vocab_size: int, cfg: NgramConfig | None = None, device="cpu"):
        if not 1 <= vocab_size <= MAX_VOCAB:
            raise ValueError(f"NgramModel vocab_size={vocab_size}: must be in [1, {MAX_VOCAB}] (uint16 token ids)")
        self.cfg = cfg or NgramConfig()
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        # Unigram: counts (Witten-Bell) or continuation counts (Kneser-Ney), dense over the vocabulary.
        self.unigram = torch.zeros(vocab_size, dtype=torch.int64, device=self.device)
        # tables[n - 2] holds order n (context of n-1 tokens), n = 2..K.
        self.tables = [PairCounts(self.device) for _ in range(self.cfg.order - 1)]
        self.tokens_counted = 0

    def nbytes(self) -> int:
        """Bytes held by the count tables (they grow with the distinct pairs seen)."""
        return self.unigram.numel() * 8 + sum(t.nbytes() for t in self.tables)

    @torch.no_grad()
    def distribution(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """q [N, V] for each position from the tokens before it only (see predict)."""
        return self.predict(tokens, positions).q

    @torch.no_grad()
    def predict(self, tokens: torch.Tensor, positions: torch.Tensor) -> NgramPrediction:
        """tokens: the stream (1-D integer tensor on the device, may extend past the positions); positions [N]:
        the indices to predict. Only tokens[p-K+1 .. p-1] are read for position p."""
        context, lengths = context_windows(tokens, positions.to(self.device), self.cfg.order - 1,
                                           self.cfg.bos_id)
        return self.predict_from_context(context, lengths)

    @torch.no_grad()
    def predict_from_context(self, context: torch.Tensor, lengths: torch.Tensor) -> NgramPrediction:
        """context [N, K-1] newest first and usable lengths [N] (from context_windows) -> the prediction."""
        n_rows, vocab = context.shape[0], self.vocab_size
        ids = context_ids(context, vocab, self.cfg.hash_modulus)
        base = torch.full((vocab,), 1.0 / vocab, device=self.device)
        unigram_total = int(self.unigram.sum())
        if unigram_total:
            counts = self.unigram.float()
            keep, scale = self._interpolation(unigram_total, int((self.unigram > 0).sum()))
            base = keep * base + torch.clamp_min(counts - self._discount(), 0) * scale
        q = base.expand(n_rows, vocab).clone()
        context_count = torch.full((n_rows,), float(unigram_total), device=self.device)
        context_order = torch.full((n_rows,), 1 if unigram_total else 0, dtype=torch.int64, device=self.device)
        for order, table in enumerate(self.tables, start=2):
            if table.keys.numel() == 0:
                continue
            lo, hi = table.context_ranges(ids[:, order - 2] * vocab, vocab)
            types = torch.where(lengths >= order - 1, hi - lo, 0)
            seen = types > 0
            total = (table.cumulative[hi] - table.cumulative[lo]).float()
            keep, scale = self._interpolation(total.clamp_min(1), types.float())
            keep = torch.where(seen, keep, 1.0)
            rows, entries = _expand_ranges(lo, types)
            q.mul_(keep[:, None])
            added = (table.counts[entries].float() - self._discount()) * scale[rows]
            q.index_put_((rows, table.keys[entries] % vocab), added, accumulate=True)
            context_count = torch.where(seen, total, context_count)
            context_order = torch.where(seen, order, context_order)
        q.mul_(1 - self.cfg.floor).add_(self.cfg.floor / vocab)
        q.div_(q.sum(1, keepdim=True))  # exact in real arithmetic already; removes float32 drift across K steps
        return NgramPrediction(q, context_count, context_order)

    def _discount(self) -> float:
        return self.cfg.discount if self.cfg.smoothing == "kneser_ney" else 0.0

    def _interpolation(self, total, types):
        """(weight kept by the lower-order distribution, scale of each seen count): q = keep * q_lower +
        (c - D) * scale summed over seen tokens; both sum to 1 because sum_c (c - D) = N - D T."""
        if self.cfg.smoothing == "witten_bell":
            return types / (total + types), 1.0 / (total + types)
        return self.cfg.discount * types / total, 1.0 / total

    @torch.no_grad()
    def update(self, tokens_scored: torch.Tensor, prev_context: torch.Tensor | None = None) -> None:
        """Count tokens that have already been scored. prev_context: the tokens just before them in the stream (the
        last K-1 are read; fewer, or None, means they start the stream)."""
        width = self.cfg.order - 1
        targets = tokens_scored.to(self.device).long()
        prev = torch.zeros(0, dtype=torch.int64, device=self.device)
        if prev_context is not None and width:
            prev = prev_context[-width:].to(self.device).long()
        stream = torch.cat([prev, targets])
        positions = torch.arange(prev.numel(), stream.numel(), device=self.device)
        context, lengths = context_windows(stream, positions, width, self.cfg.bos_id)
        ids = context_ids(context, self.vocab_size, self.cfg.hash_modulus)
        keys = [targets] + [ids[:, j] * self.vocab_size + targets for j in range(width)]  # keys[n-1]: order n
        if self.cfg.smoothing == "witten_bell":
            self.unigram += torch.bincount(targets, minlength=self.vocab_size)
            for order, table in enumerate(self.tables, start=2):
                table.add(keys[order - 1][lengths >= order - 1])
        else:
            self._update_kneser_ney(keys, lengths)
        self.tokens_counted += targets.numel()

    def _update_kneser_ney(self, keys: list[torch.Tensor], lengths: torch.Tensor) -> None:
        """Adjusted counts as in KenLM: the longest n-gram of each token (order K, or shorter where the context
        starts at a BOS or the stream start) counts raw; a lower order n counts once per distinct (n+1)-gram type
        that extends it, i.e. when that (n+1)-gram is new. Top-down so 'new' is judged before this batch's adds.
        Exact without hash collisions; with them, merged contexts make 'new' approximate (q stays normalized)."""
        top = (lengths + 1).clamp_max(self.cfg.order)
        new_above = torch.zeros_like(top, dtype=torch.bool)
        for order in range(self.cfg.order, 0, -1):
            increment = (top == order) | new_above
            valid = top >= order
            if order == 1:
                self.unigram += torch.bincount(keys[0][increment], minlength=self.vocab_size)
                break
            table = self.tables[order - 2]
            # A pair present before this batch was counted when it first appeared (adjusted counts are > 0 for
            # every seen n-gram), so 'new' = absent before and first in this batch.
            new_above = valid & ~table.contains(keys[order - 1]) & _first_occurrences(keys[order - 1], valid)
            table.add(keys[order - 1][increment])


def model_entropy(model_logprobs: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of each row of log-probabilities [N, V] (rows may hold -inf: 0 log 0 counts as 0)."""
    return torch.special.entr(model_logprobs.exp()).sum(-1)


def mixing_features(model_entropy_nats: torch.Tensor, context_count: torch.Tensor, context_order: torch.Tensor,
                    max_order: int) -> torch.Tensor:
    """[N, 4] features of the prefix: (1, model entropy, log1p(longest matched context's count), its order / K)."""
    return torch.stack([torch.ones_like(model_entropy_nats), model_entropy_nats.float(),
                        torch.log1p(context_count.float()), context_order.float() / max_order], 1)


def mixing_weight(features: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """a_t = sigmoid(w . f_t) in (0, 1), from prefix features only."""
    return torch.sigmoid(features @ weights.to(features))


def blend(model_logprobs: torch.Tensor, q: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """log((1 - a) p + a q) per row, computed with logaddexp; normalized whenever p and q are."""
    alpha = alpha.to(model_logprobs)[:, None]
    return torch.logaddexp(model_logprobs + torch.log1p(-alpha), torch.log(q.to(model_logprobs)) + torch.log(alpha))


class OnlineMixer:
    """Mixing weights fitted by maximum likelihood of the blended score on scored tokens only (C3)."""

    def __init__(self, cfg: NgramConfig, device="cpu"):
        self.cfg = cfg
        self.device = torch.device(device)
        self.weights = None if cfg.mix_weights is None else torch.tensor(cfg.mix_weights, dtype=torch.float64,
                                                                         device=self.device)
        self.fixed = cfg.mix_weights is not None
        self.history = torch.zeros(0, NUM_MIX_FEATURES + 2, dtype=torch.float32, device=self.device)

    def alpha(self, features: torch.Tensor) -> torch.Tensor:
        """a_t for each row of features; 0 while nothing has been scored (no evidence that q helps)."""
        if self.weights is None:
            return torch.zeros(features.shape[0], dtype=features.dtype, device=features.device)
        return mixing_weight(features, self.weights)

    def update(self, features: torch.Tensor, logp_target: torch.Tensor, logq_target: torch.Tensor) -> None:
        """Add scored tokens (their prefix features and the log-probabilities p and q gave the scored token) and
        refit the weights on the last mix_fit_window scored tokens, starting from the current weights."""
        if self.fixed:
            return
        rows = torch.cat([features.float(), logp_target.float()[:, None], logq_target.float()[:, None]], 1)
        self.history = torch.cat([self.history, rows.to(self.device)])[-self.cfg.mix_fit_window:]
        start = self.weights if self.weights is not None else torch.zeros(NUM_MIX_FEATURES, dtype=torch.float64,
                                                                           device=self.device)
        self.weights = fit_mixing_weights(self.history[:, :NUM_MIX_FEATURES], self.history[:, -2],
                                          self.history[:, -1], start, self.cfg.mix_fit_iters)


def mixture_nll(features: torch.Tensor, logp: torch.Tensor, logq: torch.Tensor, weights: torch.Tensor):
    """Mean of -log((1 - a) p + a q) with a = sigmoid(w . f): the blended score the fit minimizes."""
    z = features @ weights
    return -torch.logaddexp(F.logsigmoid(-z) + logp, F.logsigmoid(z) + logq).mean()


def fit_mixing_weights(features: torch.Tensor, logp: torch.Tensor, logq: torch.Tensor, start: torch.Tensor,
                       iters: int) -> torch.Tensor:
    """Minimize mixture_nll over w by Gauss-Newton with the outer-product (BHHH) curvature, which is positive
    semi-definite however far from the optimum, plus a halving line search; float64 throughout."""
    f, lp, lq = features.double(), logp.double(), logq.double()
    w = start.double().clone()
    loss = mixture_nll(f, lp, lq, w)
    for _ in range(iters):
        z = f @ w
        a = torch.sigmoid(z)
        log_mix = torch.logaddexp(F.logsigmoid(-z) + lp, F.logsigmoid(z) + lq)
        # d(-log mix)/dz = -a (1 - a) (q - p) / mix
        residual = -a * (1 - a) * (torch.exp(lq - log_mix) - torch.exp(lp - log_mix))
        per_token = f * residual[:, None]
        step = torch.linalg.pinv(per_token.T @ per_token) @ per_token.sum(0)
        # Trust region: where the sigmoid saturates the gradient vanishes and the Gauss-Newton step ~ 1/gradient
        # explodes; capping the change of every logit keeps a_t from jumping to 0 or 1 and getting stuck there.
        reach = (f @ step).abs().max()
        if reach > MAX_LOGIT_STEP:
            step = step * (MAX_LOGIT_STEP / reach)
        for halving in range(30):  # 2^-30 of a Gauss-Newton step: no decrease left to find
            candidate = w - step / 2 ** halving
            candidate_loss = mixture_nll(f, lp, lq, candidate)
            if candidate_loss < loss:
                break
        else:
            break
        converged = loss - candidate_loss < FIT_TOLERANCE
        w, loss = candidate, candidate_loss
        if converged:
            break
    return w


class NgramBlender:
    """The n-gram adapter of the scoring stream: views() before a chunk is scored, update() after. Its view of the
    model's distribution p is "blend" = (1 - a_t) p + a_t q_t (the kit's eval/tilt.py adds a "tilt" view).
    Under torch.distributed the ranks each predict a share of every chunk and all learn from the whole of it (the
    scoring stream): `gather` collects their rows. Per-document LoRA, whose ranks keep contiguous shares, sets it
    to the identity so that each rank's blender stays its own."""

    def __init__(self, vocab_size: int, cfg: NgramConfig | None = None, device="cpu"):
        self.cfg = cfg or NgramConfig()
        self.model = NgramModel(vocab_size, self.cfg, device)
        self.mixer = OnlineMixer(self.cfg, device)
        self._pending: list[torch.Tensor] = []
        self.gather = gather_rows

    @torch.no_grad()
    def views(self, model_logprobs: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor,
              targets: torch.Tensor) -> dict:
        """Blended log-probabilities [N, V] for positions from the model's [N, V] log-probabilities and the prefix.
        Calls for one chunk may be split; update() must then receive exactly those positions.
        targets: the tokens at `positions` that update() will learn from; the views do not read them, they only pick
        what the update needs (p and q at each target) so that no [N, V] rows are held until then."""
        logp, prediction, features, _ = self.predict(model_logprobs, tokens, positions, targets)
        return {"blend": blend(logp, prediction.q, self.mixer.alpha(features))}

    def predict(self, model_logprobs: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor,
                targets: torch.Tensor):
        """(log p in float32, the n-gram's prediction, its mixing features, targets [N, 1]) for views(), keeping
        what update() learns from."""
        prediction = self.model.predict(tokens, positions)
        logp = model_logprobs.float()
        features = mixing_features(model_entropy(logp), prediction.context_count, prediction.context_order,
                                   self.cfg.order)
        t = targets.to(logp.device).long()[:, None]
        self.keep(positions, features, logp.gather(1, t), prediction.q.gather(1, t).log())
        return logp, prediction, features, t

    def keep(self, positions, *columns) -> None:
        """What update() learns from, one float64 row per position: the position (exact below 2^53), then the
        columns (float32 values): here the mixing features and log p and log q of the target."""
        self._pending.append(torch.cat([x.double().reshape(len(positions), -1)
                                        for x in (positions.to(columns[0].device), *columns)], 1))

    def gathered(self, pending: list[torch.Tensor], width: int) -> torch.Tensor:
        """The rows kept since the last update (every rank's, via self.gather), by position; width: columns."""
        rows = self.gather(torch.cat(pending) if pending else
                           torch.zeros(0, width, dtype=torch.float64, device=self.model.device))
        return rows[rows[:, 0].argsort()]

    @torch.no_grad()
    def update(self, tokens: torch.Tensor, positions: torch.Tensor) -> None:
        """Learn from scored positions (ascending and contiguous; exactly those predicted since the last update, which
        may have come in any order): counts for the n-gram, then a refit of the mixing weights on p and q at the
        scored tokens. Shared under torch.distributed: every rank calls this with the whole chunk, each having
        predicted a share of it, and the predictions are gathered, so all ranks learn the same counts and weights."""
        f = NUM_MIX_FEATURES
        rows = self.gathered(self._pending, f + 3)
        if not torch.equal(rows[:, 0].long().to(positions.device), positions):
            raise RuntimeError(f"NgramBlender.update: positions {positions.tolist()[:4]}... are not the ones "
                               "predicted since the last update (predict a chunk, score it, then update it once)")
        start = int(positions[0])
        if not torch.equal(positions, torch.arange(start, start + positions.numel(), device=positions.device)):
            raise RuntimeError(f"NgramBlender.update: positions starting at {start} are not contiguous "
                               "(update with the chunk's positions in stream order)")
        targets = tokens[positions.to(tokens.device)].to(self.model.device).long()
        self._pending, rows = [], rows.float()
        self.model.update(targets, tokens[max(0, start - self.cfg.order + 1):start])
        self.mixer.update(rows[:, 1:f + 1], rows[:, f + 1], rows[:, f + 2])
