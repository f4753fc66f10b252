"""The tilt view of the n-gram, the kit's (the ablation, the tuning search, `pgolf eval ... NGRAM_SCORE=tilt`); the
packed program scores the blend and does not carry it. Measured on the P1 dev val (docs/MEASUREMENTS.md): the tilt
scored 0.0066 bpb worse than the blend."""
from __future__ import annotations

import math

import torch

from eval.ngram import FIT_TOLERANCE, MAX_LOGIT_STEP, NgramBlender, blend


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurate at both ends (Maechler 2012)."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def tilt(model_logprobs: torch.Tensor, hint_token: torch.Tensor, beta: torch.Tensor | float) -> torch.Tensor:
    """log p'(v) = log p(v) + b [v = h] - log Z, Z = 1 + p(h)(exp(b) - 1) = (1 - p(h)) + p(h) exp(b); the hint h
    must come from the prefix only (e.g. ngram_hint)."""
    hint = hint_token.long()[:, None]
    beta = torch.as_tensor(beta, dtype=model_logprobs.dtype, device=model_logprobs.device).expand(hint.shape[0])
    log_p_hint = model_logprobs.gather(1, hint).squeeze(1)
    log_z = torch.logaddexp(_log1mexp(log_p_hint), log_p_hint + beta)
    return (model_logprobs - log_z[:, None]).scatter_add(1, hint, beta[:, None])


def ngram_hint(q: torch.Tensor) -> torch.Tensor:
    """The n-gram's most likely next token per row: a prefix-only hint for tilt."""
    return q.argmax(-1)


def tilt_nll_change(log_p_hint: torch.Tensor, hit: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """Mean of -log p'(y) + log p(y) under tilt by beta: log Z - beta [y = h], Z = (1 - p(h)) + p(h) exp(beta)."""
    return (torch.logaddexp(_log1mexp(log_p_hint), log_p_hint + beta) - beta * hit).mean()


def fit_tilt_beta(log_p_hint: torch.Tensor, hit: torch.Tensor, start: torch.Tensor, iters: int) -> torch.Tensor:
    """Minimize tilt_nll_change over the scalar beta by Newton's method (convex: log Z is convex in beta; the
    gradient is p'(h) - [y = h]) with the mixer's step cap and halving line search; float64 throughout."""
    lp, hit = log_p_hint.double(), hit.double()
    beta = start.double().clone()
    loss = tilt_nll_change(lp, hit, beta)
    for _ in range(iters):
        tilted_hint = torch.exp(lp + beta - torch.logaddexp(_log1mexp(lp), lp + beta))
        curvature = (tilted_hint * (1 - tilted_hint)).mean().clamp_min(1e-12)
        step = ((tilted_hint - hit).mean() / curvature).clamp(-MAX_LOGIT_STEP, MAX_LOGIT_STEP)
        for halving in range(30):
            candidate = beta - step / 2 ** halving
            candidate_loss = tilt_nll_change(lp, hit, candidate)
            if candidate_loss < loss:
                break
        else:
            break
        converged = loss - candidate_loss < FIT_TOLERANCE
        beta, loss = candidate, candidate_loss
        if converged:
            break
    return beta


class TiltBlender(NgramBlender):
    """NgramBlender with a second view, "tilt": p tilted toward the n-gram's most likely token h_t = argmax q_t by a
    weight beta fitted, like a_t's weights, by maximum likelihood on scored tokens only (0 before the first update).
    Rows where the n-gram has counted nothing yet (q uniform, h_t an arbitrary tie) are left untilted and kept out of
    the fit. Both views come from one prediction of q."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.beta = torch.zeros((), dtype=torch.float64, device=self.model.device)
        self.tilt_history = torch.zeros(0, 2, dtype=torch.float32, device=self.model.device)
        self._tilt_pending: list[torch.Tensor] = []

    @torch.no_grad()
    def views(self, model_logprobs: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor,
              targets: torch.Tensor) -> dict:
        """The blend (NgramBlender.views) and the tilt, from one prediction."""
        logp, prediction, features, t = self.predict(model_logprobs, tokens, positions, targets)
        hint, informed = ngram_hint(prediction.q), prediction.context_order > 0
        self._tilt_pending.append(torch.cat([x.double().reshape(len(hint), -1) for x in (
            positions.to(hint.device), logp.gather(1, hint[:, None]), hint[:, None] == t, informed)], 1))
        return {"blend": blend(logp, prediction.q, self.mixer.alpha(features)),
                "tilt": tilt(logp, hint, torch.where(informed, self.beta.to(logp.dtype), 0.0))}

    @torch.no_grad()
    def update(self, tokens: torch.Tensor, positions: torch.Tensor) -> None:
        """NgramBlender.update, then a refit of beta on the scored tokens' (log p(hint), hit) of informed rows."""
        super().update(tokens, positions)
        rows = self.gathered(self._tilt_pending, 4)
        self._tilt_pending = []
        self.tilt_history = torch.cat([self.tilt_history, rows[rows[:, 3] > 0, 1:3].float()])[
            -self.cfg.mix_fit_window:]
        if self.tilt_history.numel():
            self.beta = fit_tilt_beta(self.tilt_history[:, 0], self.tilt_history[:, 1], self.beta,
                                      self.cfg.mix_fit_iters)
