"""Checks of conditions C1-C4 (challenge issue #1017; the README's Legality section) on what the stream did."""
from __future__ import annotations

import torch

# C2: a materialized distribution must sum to 1 within this (float32 log-probabilities summed in float64).
NORM_TOLERANCE = 1e-5


def _verdict(passed: bool, detail: str) -> dict:
    return {"passed": bool(passed), "detail": detail}


def check_causality(run, tokens: torch.Tensor, first: int, end: int, cuts: list[int], vocab_size: int,
                    seed: int = 0, keep: int | None = None) -> dict:
    """C1: p_t depends only on x_1..x_{t-1}. run(context_tokens, score_tokens) -> {view: NLL per target of
    [first, end)} runs the whole stream (adapters included) from the same initial state. For each cut t, every
    token from t on is replaced in the context stream while the scored targets stay the original ones: the scores
    at positions <= t must be bit-identical to an unperturbed run, so an adapter that reads x_t (its own target) or
    anything later, or learns from a token before scoring it, changes them. Two unperturbed runs must agree
    first, otherwise differences would be noise (on GPU: run with deterministic algorithms).
    keep: a token id that stays where it is and appears nowhere else after the cut (the BOS: the documents, and so
    a per-document pass's batches and their shapes, stay the same; what is replaced is every other token)."""
    control = run(tokens, tokens)
    repeat = run(tokens, tokens)
    for view, nll in control.items():
        if not torch.equal(nll, repeat[view]):
            changed = int((nll != repeat[view]).sum())
            return _verdict(False, f"two unperturbed runs of targets [{first}, {end}) differ at {changed} positions "
                            f"of view {view}: the stream is not reproducible, so the perturbation test cannot "
                            "tell a leak from noise (enable torch.use_deterministic_algorithms)")
    generator = torch.Generator().manual_seed(seed)
    for cut in cuts:
        shift = torch.randint(1, vocab_size, (tokens.numel() - cut,), generator=generator).to(tokens.device)
        perturbed = tokens.clone()
        perturbed[cut:] = (tokens[cut:] + shift) % vocab_size  # every token from the cut on differs
        if keep is not None:  # (needs vocab_size >= 3 so that a replaced token can avoid both keep and itself)
            moved, original = perturbed[cut:], tokens[cut:]
            alternative = torch.where(original == (keep + 1) % vocab_size, keep + 2, keep + 1) % vocab_size
            moved[moved == keep] = alternative[moved == keep]
            moved[original == keep] = keep
        out = run(perturbed, tokens)
        upto = cut - first + 1
        for view, nll in control.items():
            same = nll[:upto] == out[view][:upto]
            if not bool(same.all()):
                position = first + int((~same).nonzero()[0])
                return _verdict(False, f"view {view}: the score at position {position} changed when the tokens from "
                                f"{cut} on were replaced{'' if keep is None else f' (token {keep} kept in place)'} "
                                f"(p_{position} depends on x_{cut} or later)")
    kept = "" if keep is None else f" but token {keep}"
    return _verdict(True, f"replacing every token{kept} from each of the cuts {cuts} on left all scores at or before "
                    f"the cut bit-identical (targets [{first}, {end}), views {', '.join(control)}; an unperturbed "
                    "repeat run is identical)")


def check_normalization(norm: dict[str, torch.Tensor], tolerance: float = NORM_TOLERANCE) -> dict:
    """C2: each checked row of each view is finite, non-negative and sums to 1 within `tolerance`.
    norm: view -> [max |sum p - 1|, min p, non-finite count] (StreamResult.norm, reduced over ranks)."""
    parts, passed = [], bool(norm)
    for view, stats in norm.items():
        error, low, bad = (float(v) for v in stats.tolist())
        ok = error <= tolerance and low >= 0 and bad == 0
        passed &= ok
        parts.append(f"{view}: max |sum p - 1| {error:.2e}, min p {low:.2e}, {int(bad)} non-finite"
                     + ("" if ok else f" (FAILS: need finite p >= 0 summing to 1 within {tolerance:g})"))
    return _verdict(passed, "; ".join(parts) if parts else "no distribution was checked (empty stream?)")


def check_events(events: list[tuple[str, str, int, int]], first: int) -> dict:
    """C3: scores are recorded left to right from `first`, and every update consumed only tokens before the
    scored frontier (tokens before `first` precede every target of the stream)."""
    frontier, updates = first, 0
    for kind, name, lo, hi in events:
        if kind == "score":
            if lo != frontier:
                return _verdict(False, f"targets [{lo}, {hi}) were scored while the next unscored target was "
                                f"{frontier} (not left to right)")
            frontier = hi
        elif hi > frontier:
            return _verdict(False, f"update '{name}' consumed tokens [{lo}, {hi}) while only targets before "
                            f"{frontier} were scored (update before score)")
        else:
            updates += 1
    return _verdict(True, f"{updates} updates, each after the scores of every token it consumed "
                    f"(scored up to {frontier})")


def coverage_summary(first: int, end: int, coverage: torch.Tensor) -> list[int]:
    """[first, end, targets not scored exactly once, min count, max count] of one stream's coverage counts."""
    if coverage.numel() == 0:
        return [first, end, 0, 1, 1]
    stats = torch.stack([(coverage != 1).sum(), coverage.min(), coverage.max()]).tolist()
    return [first, end, *stats]


def check_coverage(summaries: list[list[int]], num_targets: int) -> dict:
    """C4: the shards tile the targets 1..num_targets and each target was scored exactly once."""
    expected = 1
    for first, end, not_once, low, high in sorted(summaries):
        if first != expected:
            return _verdict(False, f"shard [{first}, {end}) starts at {first} but the targets before it end at "
                            f"{expected} ({'overlap' if first < expected else 'gap'})")
        if not_once:
            return _verdict(False, f"shard [{first}, {end}): {not_once} targets not scored exactly once "
                            f"(counts from {low} to {high})")
        expected = end
    if expected != num_targets + 1:
        return _verdict(False, f"targets {expected}..{num_targets} were never scored")
    shards = f" ({len(summaries)} shards)" if len(summaries) > 1 else ""
    return _verdict(True, f"each of the {num_targets:,} targets scored exactly once{shards}")


def check_events_any_order(events: list[tuple[str, str, int, int]], first: int, end: int) -> dict:
    """C3 for streams that score documents side by side (per-document TTT): segments may be scored in any order,
    each target once, and every update may consume only tokens already scored (or before `first`, which precede
    every target). An update's [lo, hi) are the tokens it read."""
    scored = torch.zeros(end - first, dtype=torch.bool)
    updates = 0
    for kind, name, lo, hi in events:
        a, b = max(lo, first) - first, max(hi, first) - first
        if kind == "score":
            if lo < first or hi > end or bool(scored[a:b].any()):
                return _verdict(False, f"targets [{lo}, {hi}) scored twice or outside the stream [{first}, {end})")
            scored[a:b] = True
        elif hi > end or not bool(scored[a:b].all()):
            missing = first + a + int((~scored[a:b]).nonzero()[0]) if hi <= end else end
            return _verdict(False, f"update '{name}' consumed tokens [{lo}, {hi}) before token {missing} was scored "
                            "(update before score)")
        else:
            updates += 1
    return _verdict(True, f"{updates} updates, each after the scores of every token it consumed "
                    f"({int(scored.sum())} of {end - first} targets scored)")
