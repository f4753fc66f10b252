"""Verification and analysis of an evaluation, run by the kit and never packed: compliance C1-C4, ablation passes."""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from eval.bpb import ByteLUTs
from eval.compliance import check_causality, check_coverage, check_events, check_normalization, coverage_summary
from eval.run import EvalConfig, distributed, evaluate, stream_pass, view_names, view_scores
from eval.stream import StageTimer
from eval.ttt import HashEmbedding


def evaluate_verified(model, val_tokens, luts: ByteLUTs, cfg: EvalConfig, rank: int = 0, world_size: int = 1,
                      progress: bool = True, log=None) -> dict:
    """eval.run.evaluate plus, after its main pass, what cfg asks for: `compliance` (C1-C4 of this run) and
    `ablation` (flat, sliding and +ttt passes, then the main pass's views), as eval.json keys of those names.
    The score, its log lines and the projection are evaluate's: this only adds to them."""
    log = log or (lambda *fields, **kv: None)

    def verify(tokens, initial, compiled, result, scores, main_seconds, timer: StageTimer) -> dict:
        out = {}
        if cfg.ablation:
            rows = _ablation_passes(model, tokens, result.first, result.end, initial, cfg, compiled,
                                    luts.to_torch(tokens.device), timer, progress and rank == 0, log)
            names = view_names(cfg)  # views of one pass share its time
            out["ablation"] = rows + [{**_row(names[view], acc), "seconds": main_seconds}
                                      for view, acc in scores.items()]
        if cfg.compliance:
            with timer("compliance"), _deterministic(tokens.device):
                c1 = _causality(model, tokens, initial, cfg, tilt="tilt" in result.nll)
            out["compliance"] = _compliance(result, c1, tokens.numel() - 1)
            log("eval_compliance", **{k: "pass" if v["passed"] else "FAIL" for k, v in out["compliance"].items()})
        return out

    return evaluate(model, val_tokens, luts, cfg, rank, world_size, progress, log, verify=verify)


def _row(name: str, acc) -> dict:
    return {"name": name, "val_loss": acc.val_loss, "val_bpb": acc.val_bpb}


@contextmanager
def _deterministic(device: torch.device):
    """Reproducible kernels on CUDA for the causality check, which compares runs bit for bit. Measured on an H100:
    two identical runs differed at 4,060 of 8,192 scores after one TTT step, because cuDNN attention's backward
    is non-deterministic (warn-only deterministic mode keeps it so). SDPA's math backend is deterministic, and
    the check's short prefix runs eager, so no compiled graph sees the changed global state."""
    if device.type != "cuda":
        yield
        return
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


def _compliance(result, c1: dict, num_targets: int) -> dict:
    """C1 from the perturbation runs (each rank checks the scores it made) and C2-C4 of the main stream, reduced
    over ranks (C4 on the coverage counts summed over them: the ranks split every chunk of one stream)."""
    norm = {view: stats.clone() for view, stats in result.norm.items()}
    c3 = check_events(result.events, result.first)
    coverage = result.coverage.clone()
    if distributed():
        for stats in norm.values():  # max error, max of -min p, max non-finite count: one MAX reduction
            stats[1].neg_()
            torch.distributed.all_reduce(stats, op=torch.distributed.ReduceOp.MAX)
            stats[1].neg_()
        torch.distributed.all_reduce(coverage)
        verdicts = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(verdicts, (c1, c3))
        failed = [[(rank, v[k]) for rank, v in enumerate(verdicts) if not v[k]["passed"]] for k in (0, 1)]
        c1, c3 = (own if not fails else {"passed": False, "detail": f"rank {fails[0][0]}: {fails[0][1]['detail']}"}
                  for own, fails in zip((c1, c3), failed))  # the first failing rank's verdict, naming the rank
    summary = coverage_summary(result.first, result.end, coverage)
    return {"C1": c1, "C2": check_normalization(norm), "C3": c3, "C4": check_coverage([summary], num_targets)}


def _causality(model, tokens, initial: dict, cfg: EvalConfig, tilt: bool) -> dict:
    """C1 on a prefix of compliance_chunks chunks of compliance_chunk_tokens, one random cut inside each chunk;
    every run is the whole configured stream (the main pass's views), eager, from the initial weights."""
    prefix_end = min(tokens.numel(), 1 + cfg.compliance_chunks * cfg.compliance_chunk_tokens)
    generator = torch.Generator().manual_seed(0)
    cuts = [lo + int(torch.randint(0, min(cfg.compliance_chunk_tokens, prefix_end - lo), (1,), generator=generator))
            for lo in range(1, prefix_end, cfg.compliance_chunk_tokens)]
    # Eager passes: a table of its own cannot make the main pass's compiled scorer recompile.
    table = HashEmbedding(cfg.hash_buckets, model.cfg.model_dim, model.cfg.bos_id).to(tokens.device) \
        if cfg.hash_embed else None

    def run_prefix(context_tokens, score_tokens):
        model.load_state_dict(initial)
        return stream_pass(model, context_tokens, 1, prefix_end, cfg, ttt=cfg.ttt, table=table, ngram=cfg.ngram,
                           tilt=tilt, stride=cfg.stride, chunk=cfg.compliance_chunk_tokens, compiled=None,
                           timer=StageTimer(tokens.device), progress=False, desc="C1",
                           score_tokens=score_tokens).nll

    return check_causality(run_prefix, tokens[:prefix_end], 1, prefix_end, cuts, model.cfg.vocab_size)


def _ablation_passes(model, tokens, first, end, initial: dict, cfg: EvalConfig, compiled, lut, timer: StageTimer,
                     progress: bool, log) -> list[dict]:
    """The passes the main one cannot provide as views: flat, sliding (when TTT is on) and +ttt (when the hash
    embedding is on), each from the initial weights, timed as stage ablation_<name> and logged as
    eval_<name>_exact."""
    passes = [("flat", False, cfg.context_len, None)]
    if cfg.ttt:
        passes.append(("sliding", False, cfg.stride, compiled))
    if cfg.ttt and cfg.hash_embed:
        passes.append(("+ttt", True, cfg.stride, compiled))
    out = []
    for name, ttt, stride, fn in passes:
        model.load_state_dict(initial)
        pass_timer = StageTimer(tokens.device)
        result = stream_pass(model, tokens, first, end, cfg, ttt=ttt, table=None, ngram=False, tilt=False,
                             stride=stride, chunk=cfg.chunk_tokens, compiled=fn, timer=pass_timer,
                             progress=progress, desc=name)
        seconds = sum(pass_timer.seconds.values())
        timer.seconds[f"ablation_{name.lstrip('+')}"] = seconds
        acc = view_scores(result, tokens, lut)["model"]
        log(f"eval_{name.lstrip('+')}_exact", val_loss=f"{acc.val_loss:.8f}", val_bpb=f"{acc.val_bpb:.8f}")
        out.append({**_row(name, acc), "seconds": seconds})
    return out
