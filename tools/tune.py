"""`pgolf eval RUN_DIR --tune`: choose evaluation settings on the tuning split, never on val.

The tuning split (fineweb_tune_*.bin: held-out training documents, `pgolf data split` / `pgolf data build
--tune-docs`) is scored once per trial by the same evaluation as val, without its compliance checks (they verify a
score, and no score here is reported). A coordinate search walks the grid: each setting in turn takes each of its
values with the others at the best found so far, and keeps the value with the lowest tune val_bpb (a tie keeps the
value it had). The result names the split by its fingerprint, so a setting can always be traced to the documents it
was chosen on; `pgolf eval RUN_DIR --settings tune.json` applies it. It is written after every trial, marked
incomplete until the grid is done, and --tune-seconds bounds the search: a search cut short keeps its choice.
--resume takes the trials (and LoRA's reference scores) of an earlier search of the same artifact, split and base
settings, so a search cut short goes on where it stopped instead of scoring its start again.
"""
from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch

from eval.lora import LoraConfig, evaluate_lora
from eval.run import EvalConfig, evaluate
from submission.config import resolve
from tools.data import fingerprint

# The searched settings and their values, for the sliding stream (score-first TTT, n-gram) and for per-document
# LoRA TTT. The n-gram's mixing weight and its tilt strength are fitted online on scored tokens; what is chosen
# here is whether the score is the blend or the tilt, and the counts' smoothing.
STREAM_GRID = {
    "TTT_LR": ["0.001", "0.002", "0.004"],
    "TTT_EPOCHS": ["1", "2", "3", "4"],
    "NGRAM_ORDER": ["6", "8", "12", "16"],
    "NGRAM_DISCOUNT": ["0.6", "0.75", "0.9"],
    "NGRAM_FLOOR": ["1e-07", "1e-06", "1e-05"],
    "NGRAM_SCORE": ["blend", "tilt"],
}
LORA_GRID = {
    "LORA_LR": ["5e-05", "0.0001", "0.0002", "0.0004"],
    "LORA_RANK": ["32", "64", "96"],
    "LORA_PHASES": ["0", "1", "2", "3"],
    "NGRAM_ORDER": ["6", "8", "12", "16"],
    "NGRAM_DISCOUNT": ["0.6", "0.75", "0.9"],
}


@dataclass
class Trial:
    """One evaluation of the tuning split: the setting varied (None for the starting point), its value, the
    settings as a whole, the split's val_bpb, and (per-document LoRA) each view's: the adapted model's and the
    n-gram blend's. cold: the first trial its process scored, whose seconds include the compiles and warm-up that
    later trials skip (on the GPU, 95 s against 41-44 s for the LoRA pass on P1's tuning split)."""
    setting: str | None
    value: str | None
    settings: dict[str, str]
    val_bpb: float
    seconds: float
    views: dict[str, float] | None = None
    resumed: bool = False
    cold: bool = False


def coordinate_search(score: Callable[[dict[str, str]], float], start: dict[str, str],
                      grid: dict[str, list[str]], on_trial: Callable[[Trial], None] | None = None,
                      fits: Callable[[float], bool] | None = None,
                      known: Callable[[dict[str, str]], Trial | None] | None = None):
    """One sweep over `grid` from `start` (a value for every grid key): returns (best settings, best score, trials,
    complete). Settings already scored are not scored again. The best so far is always the first trial with the lowest
    score (each trial is set against the best before it). With fits, a trial starts only while fits(the slowest warm
    trial's seconds so far, or the cold one's while no other has run) says it does: cut short, the search keeps the
    best of the trials it ran, and complete is False.
    known(settings) may give an earlier search's trial of the same settings: it is taken as it was, not scored."""
    seen: dict[tuple, float] = {}
    trials: list[Trial] = []

    def run(settings: dict[str, str], setting: str | None, value: str | None) -> float:
        key = tuple(sorted(settings.items()))
        if key not in seen:
            earlier = known(settings) if known else None
            if earlier is not None:
                trials.append(Trial(setting, value, dict(settings), earlier.val_bpb, earlier.seconds, earlier.views,
                                    resumed=True, cold=earlier.cold))
            else:
                began, cold = time.perf_counter(), all(t.resumed for t in trials)
                trials.append(Trial(setting, value, dict(settings), score(settings),
                                    round(time.perf_counter() - began, 3), cold=cold))
            seen[key] = trials[-1].val_bpb
            if on_trial:
                on_trial(trials[-1])
        return seen[key]

    best = dict(start)
    best_score = run(best, None, None)
    for setting, values in grid.items():
        for value in values:
            candidate = {**best, setting: value}
            fresh = tuple(sorted(candidate.items())) not in seen
            warm = [t.seconds for t in trials if not t.cold] or [t.seconds for t in trials]
            if fresh and fits is not None and not fits(max(warm)):
                return best, best_score, trials, False
            result = run(candidate, setting, value)
            if result < best_score:
                best, best_score = candidate, result
    return best, best_score, trials, True


def canonical(cfg: EvalConfig, lora: LoraConfig, key: str, value: str | None = None) -> str:
    """A setting's value as the configs hold it after parsing (so "1e-4" and "0.0001" are one value); with value
    None, the value it has now."""
    cfg, lora = copy.deepcopy(cfg), copy.deepcopy(lora)
    if value is not None:
        apply_settings(cfg, lora, {key: value})
    name = key.lower()
    if name.startswith("lora_"):
        return str(getattr(lora, name[5:]))
    if name.startswith("ngram_") and not hasattr(cfg, name):
        return str(getattr(cfg.ngram_config, name[6:]))
    return str(getattr(cfg, name))


def apply_settings(cfg: EvalConfig, lora: LoraConfig, settings: dict[str, str], source: str = "tune") -> list[str]:
    """Apply KEY=VALUE settings to the eval settings (EvalConfig, NGRAM_, LORA_), through the one resolve."""
    return resolve(cfg, lora, env={}, cli=settings)


def parse_grid(items: list[str], cfg: EvalConfig, lora: LoraConfig, default: dict[str, list[str]]):
    """The grid of --grid KEY=V1,V2,... items (the default grid without any); each value is checked by parsing it
    into the configs, so a typo fails before the first trial."""
    grid = {} if items else {k: list(v) for k, v in default.items()}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not values.strip(","):
            raise ValueError(f"--grid {item!r}: expected KEY=V1,V2,... e.g. --grid TTT_LR=0.001,0.003")
        grid[key.upper()] = [v for v in values.split(",") if v]
    return {key: list(dict.fromkeys(canonical(cfg, lora, key, v) for v in values)) for key, values in grid.items()}


def tune(model, tokens: np.ndarray, luts, cfg: EvalConfig, lora: LoraConfig | None, grid: dict[str, list[str]],
         rank: int = 0, world_size: int = 1, log=None, seconds: float = 0,
         on_result: Callable[[dict], None] | None = None, artifact: str | None = None,
         previous: dict | None = None) -> dict:
    """Search `grid` on the tuning tokens from the settings in cfg (and lora, for per-document LoRA TTT when not
    None); return the tune.json body. seconds > 0 bounds the search (no trial starts that the slowest warm one says
    would end past it; the clock starts here, so per-document LoRA's reference passes count). on_result(body) gets
    the body after every trial, "complete": false until the search has run its whole grid, so that a search cut
    short still leaves what it chose. artifact (model.pgz's sha256) and the base settings are recorded; previous (an
    earlier tune.json body) resumes that search: see resumable()."""
    log = log or (lambda *fields, **kv: None)
    lora_cfg = lora or LoraConfig()
    began = time.perf_counter()
    views: dict[tuple, dict[str, float]] = {}
    trials: list[Trial] = []
    start = {key: canonical(cfg, lora_cfg, key) for key in grid}
    base = {"eval": asdict(cfg), "lora": asdict(lora_cfg) if lora is not None else None}
    kind, tune_fingerprint = "lora" if lora is not None else "stream", fingerprint(tokens)
    earlier: dict[str, Trial] = {}
    if previous is not None:
        resumable(previous, kind, tune_fingerprint, len(tokens), artifact, base)
        for t in previous["trials"]:
            try:
                trial = Trial(**{k: v for k, v in t.items() if k != "resumed"})
            except TypeError as e:
                raise NotResumable(f"a trial there is malformed ({e})") from None
            earlier.setdefault(whole(cfg, lora_cfg, trial.settings), trial)
    # per-document LoRA against the stream on the same split: its gains there, to set against val's
    ref = (previous or {}).get("reference") or (
        reference(model, tokens, luts, cfg, rank, world_size, log) if lora is not None else None)

    def score(settings: dict[str, str]) -> float:
        trial_cfg, trial_lora = copy.deepcopy(cfg), copy.deepcopy(lora_cfg)
        apply_settings(trial_cfg, trial_lora, settings)
        if lora is not None:
            # no warm-up: it serves the projection, which a trial does not report (the first trial is marked cold)
            body = evaluate_lora(model, tokens, luts, replace(trial_lora, warmup_docs=0), rank, world_size,
                                 progress=False, ngram=trial_cfg.ngram_config, verify=False)
            views[tuple(sorted(settings.items()))] = {k: v["val_bpb"] for k, v in body["views"].items()}
        else:
            body = evaluate(model, tokens, luts, trial_cfg, rank, world_size, progress=False)
        return body["val_bpb"]

    def body(complete: bool) -> dict:
        best = min(trials, key=lambda t: t.val_bpb)  # the first of the lowest: the search's best (see above)
        return {"kind": kind, "tune_fingerprint": tune_fingerprint, "tune_tokens": int(len(tokens)),
                "artifact_sha256": artifact, "base": base, "grid": grid, "start": start,
                "start_bpb": trials[0].val_bpb,
                "chosen": {k: v for k, v in best.settings.items() if v != start[k]}, "chosen_bpb": best.val_bpb,
                "settings": best.settings, "complete": complete, "trials": [asdict(t) for t in trials],
                **({"reference": ref} if ref is not None else {})}

    def report(trial: Trial) -> None:  # a trial scored here gets its views; a resumed one keeps its own
        trial.views = views.get(tuple(sorted(trial.settings.items())), trial.views)
        trials.append(trial)
        log("tune_trial", setting=trial.setting or "start", value=trial.value or "-",
            val_bpb=f"{trial.val_bpb:.6f}", seconds=f"{trial.seconds:.1f}",
            **({"resumed": "1"} if trial.resumed else {}))
        if on_result:
            on_result(body(False))

    def fits(needed: float) -> bool:  # rank 0 decides (its clock, its trial times): every rank starts the same trials
        fit = torch.tensor(seconds - (time.perf_counter() - began) >= needed, dtype=torch.int32)
        if world_size > 1:
            fit = fit.to(next(model.parameters()).device)
            torch.distributed.broadcast(fit, 0)
        return bool(fit)

    _, _, _, complete = coordinate_search(score, start, grid, report, fits if seconds > 0 else None,
                                          (lambda settings: earlier.get(whole(cfg, lora_cfg, settings)))
                                          if earlier else None)
    result = body(complete)
    log("tune_done", trials=len(trials), start_bpb=f"{result['start_bpb']:.6f}",
        chosen_bpb=f"{result['chosen_bpb']:.6f}", complete=str(complete).lower(),
        chosen=",".join(f"{k}={v}" for k, v in result["chosen"].items()) or "start")
    if on_result:
        on_result(result)
    return result


def whole(cfg: EvalConfig, lora: LoraConfig, settings: dict[str, str]) -> str:
    """Every eval and LoRA setting a trial of `settings` runs with, as one string: trials of two searches are the
    same trial when these match (their grids may name different settings)."""
    cfg, lora = copy.deepcopy(cfg), copy.deepcopy(lora)
    apply_settings(cfg, lora, settings)
    return json.dumps({"eval": asdict(cfg), "lora": asdict(lora)}, sort_keys=True, default=str)


class NotResumable(ValueError):
    """An earlier search that scored something else than this one would."""


def resumable(previous: dict, kind: str, tune_fingerprint: str, tokens: int, artifact: str | None,
              base: dict) -> None:
    """Raise NotResumable unless an earlier search's tune.json body scored what this one would: the same kind of
    pass, split (fingerprint and --tune-tokens), artifact, and settings outside the grid (a search of other defaults
    resumes with them given as KEY=VALUE)."""
    fix = "resume only a search of this artifact and split with the same fixed settings (or drop --resume)"
    if "base" not in previous or "artifact_sha256" not in previous or not isinstance(previous.get("trials"), list):
        raise NotResumable(f"it records no artifact or base settings (written before --resume existed?): {fix}")
    for name, ours, theirs in (("kind", kind, previous.get("kind")),
                               ("tune_fingerprint", tune_fingerprint, previous.get("tune_fingerprint")),
                               ("tune_tokens", tokens, previous.get("tune_tokens")),
                               ("artifact_sha256", artifact, previous["artifact_sha256"])):
        if ours != theirs:
            raise NotResumable(f"its {name} is {theirs}, this search's {ours}: {fix}")
    try:  # through the configs: a setting the kit has added since reads as its default, as old artifacts load
        stored = previous["base"]
        theirs_cfg = EvalConfig(**stored["eval"])
        theirs_lora = LoraConfig(**stored["lora"]) if stored.get("lora") is not None else None
    except (TypeError, ValueError, KeyError) as e:
        raise NotResumable(f"its base settings do not fit this kit's configs ({e}): {fix}") from None
    theirs = {"eval": asdict(theirs_cfg), "lora": asdict(theirs_lora) if theirs_lora is not None else None}
    if json.dumps(theirs, sort_keys=True, default=str) != json.dumps(base, sort_keys=True, default=str):
        ours, theirs = _flat(base), _flat(theirs)
        differ = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
        raise NotResumable(f"its fixed settings differ in {', '.join(differ)}: {fix}")


def _flat(tree: dict, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in (tree or {}).items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = json.dumps(value, default=str)
    return out


def reference(model, tokens: np.ndarray, luts, cfg: EvalConfig, rank: int, world_size: int,
              log) -> dict[str, float]:
    """The stream's scores of the tuning split, to set per-document LoRA's against there as on val: sliding windows
    alone, and the stream's whole evaluation (score-first TTT, hash embedding, n-gram) with cfg's settings."""
    sliding = copy.deepcopy(cfg)
    sliding.ttt = sliding.hash_embed = sliding.ngram = False
    out = {name: evaluate(model, tokens, luts, c, rank, world_size, progress=False)["val_bpb"]
           for name, c in (("sliding", sliding), ("stream", cfg))}
    log("tune_reference", **{name: f"{bpb:.6f}" for name, bpb in out.items()})
    return out


def table(result: dict) -> str:
    """The trials as a Markdown table, best value of each setting marked."""
    start_bpb = result["start_bpb"]
    lines = ["| setting | value | tune val_bpb | vs start |", "|---|---|---|---|"]
    for trial in result["trials"]:
        chosen = trial["setting"] is not None and result["settings"][trial["setting"]] == trial["value"]
        value = trial["value"] if trial["setting"] else " ".join(f"{k}={v}" for k, v in result["start"].items())
        marks = " (chosen)" * chosen + " (resumed)" * bool(trial.get("resumed"))
        lines.append(f"| {trial['setting'] or 'start'} | {value}{marks} | "
                     f"{trial['val_bpb']:.6f} | {trial['val_bpb'] - start_bpb:+.6f} |")
    ref = result.get("reference")
    if ref:  # per-document LoRA against the stream on the same split: its gains there, to set against val's
        best = next(t for t in result["trials"] if t["settings"] == result["settings"])
        lines += ["", "| on the tuning split | val_bpb | vs sliding | vs the stream's evaluation |",
                  "|---|---|---|---|"]
        rows = [("sliding windows", ref["sliding"]), ("the stream's evaluation", ref["stream"])] + \
            [(f"LoRA, chosen settings: {name}", bpb) for name, bpb in (best.get("views") or {}).items()]
        lines += [f"| {name} | {bpb:.6f} | {bpb - ref['sliding']:+.6f} | {bpb - ref['stream']:+.6f} |"
                  for name, bpb in rows]
    if not result.get("complete", True):
        lines += ["", f"Cut short by --tune-seconds after {len(result['trials'])} trials: the grid's later values were "
                      "not tried, and the chosen settings are the best of those that were."]
    return "\n".join(lines)
