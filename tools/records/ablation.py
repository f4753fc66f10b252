"""`pgolf ablation`: the table of an ablation, read from the kit's logs: what each run changed, its step time and
val_bpb before quantization (raw and EMA), and, where it was quantized, the model's size before the budget fit, the
clip floor the fit needed and val_bpb after int6, and the final legal evaluation where the run's program scored
itself (the packed train_gpt.py's `final_eval_exact`), each against the baseline run of the same seed.

A run is a run directory (train.log, plus quantize.log when `pgolf quantize` ran separately), a kit log file, or a
folder of run directories (an ablation folder); a baseline may also be a record folder (its train_seed<N>.log).
What a run changed is read from its `override setting:` lines, less the settings every compared run shares and
those named by --ignore (settings that name a place, not a variant: e.g. DATA_DIR when each seed trained on its own
copy of one corpus, as scripts/p1_seed.sh does).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from tools.records.results import KEY_VALUE, ResultFormatError

OVERRIDE_LINE = re.compile(r"^override setting:(\w+):(.*)->(.*)\((?:cli|env)\)$")
SEED_LINE = re.compile(r"^seed:(\d+)$")
NOT_A_CHANGE = {"seed", "run_dir"}   # differ between seeds of one setting; they name a run, not a variant


@dataclass
class AblationRun:
    """One run's figures from its kit log(s); None where the run did not produce them (not quantized)."""
    name: str
    source: str
    seed: int
    settings: dict[str, str]              # KEY -> value as logged, for every override
    steps: int
    step_avg_ms: float
    raw_bpb: float | None
    prequant_bpb: float                   # the weights training kept (EMA when on)
    bytes_before_fit: int | None = None   # compressed model before the budget fit (the clip floor's input)
    clip_sigma: float | None = None       # the floor the fit needed (0: none)
    int6_bpb: float | None = None         # the reloaded artifact, flat eval
    final_bpb: float | None = None        # the legal evaluation the run's program ran (the score), if it did
    change: str = ""                      # filled by compare(): the settings that set this run apart
    vs: str = ""                          # the baseline it is compared with
    delta_prequant: float | None = None
    delta_int6: float | None = None
    delta_ms: float | None = None
    delta_final: float | None = None


def _log_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    logs = [path / "train.log", path / "quantize.log"]
    return [p for p in logs if p.is_file()]


def parse_run(path: Path, name: str | None = None) -> AblationRun:
    """The figures of one run directory or kit log file."""
    files = _log_files(path)
    if not files:
        raise ResultFormatError(path, "no train.log here", "pass a run directory the kit trainer wrote, or its log")
    source = files[0]
    seed, settings, figures = None, {}, {}
    for file in files:
        for line in file.read_text(errors="replace").splitlines():
            if match := OVERRIDE_LINE.match(line):
                settings[match.group(1)] = match.group(3)
            elif match := SEED_LINE.match(line):
                seed = int(match.group(1))
            elif " " in line:
                key, rest = line.split(" ", 1)
                if key in ("training_done", "final_raw", "final_prequant", "clip_floor", "budget:",
                           "quantized_roundtrip_exact", "final_eval_exact"):
                    figures[key] = dict(KEY_VALUE.findall(rest))
    if "training_done" not in figures or "final_prequant" not in figures:
        raise ResultFormatError(source, "no `training_done` and `final_prequant` lines",
                                "the run did not finish training, or the log is not the kit trainer's; pass a "
                                "finished kit run (or re-run it)")
    if seed is None:
        seed = int(settings.get("seed", 1337))
    done, quant, final = figures["training_done"], figures.get("quantized_roundtrip_exact"), \
        figures.get("final_eval_exact")
    floor, budget = figures.get("clip_floor"), figures.get("budget:")
    try:
        run = AblationRun(
            name=name or (path.parent.name if path.is_file() and path.name == "train.log" else path.name),
            source=str(source), seed=seed, settings=settings, steps=int(done["steps"]),
            step_avg_ms=float(done["step_avg_ms"]),
            raw_bpb=float(figures["final_raw"]["val_bpb"]) if "final_raw" in figures else None,
            prequant_bpb=float(figures["final_prequant"]["val_bpb"]),
            bytes_before_fit=int(floor["model_bytes"]) if floor else int(budget["model_bytes_before"]) if budget
            else None,
            clip_sigma=float(floor["min_clip_sigma"]) if floor else 0.0 if budget else None,
            int6_bpb=float(quant["val_bpb"]) if quant else None,
            final_bpb=float(final["val_bpb"]) if final else None)
    except (KeyError, ValueError) as err:
        raise ResultFormatError(source, f"a summary line lacks or garbles {err}",
                                "use the log the run wrote, unedited") from None
    return run


def collect(path: Path) -> list[AblationRun]:
    """Runs under one path: a run dir or log file, a folder of run dirs, or a record folder's train_seed<N>.log."""
    if path.is_file() or (path / "train.log").is_file():
        return [parse_run(path)]
    if not path.is_dir():
        raise ResultFormatError(path, "not found", "pass a run directory, a kit log or a folder of run directories")
    subdirs = sorted(p for p in path.iterdir() if (p / "train.log").is_file())
    record_logs = sorted(path.glob("train_seed*.log"))
    runs = [parse_run(p) for p in subdirs] + [parse_run(p, name=f"{path.name}/{p.name}") for p in record_logs]
    if not runs:
        raise ResultFormatError(path, "no runs here (no */train.log, no train_seed*.log)",
                                "pass run directories or the folder that holds them")
    return runs


def _change(run: AblationRun, shared: dict[str, str], ignore: set[str]) -> str:
    keys = sorted(k for k in run.settings
                  if k not in NOT_A_CHANGE and k not in ignore and shared.get(k) != run.settings[k])
    return " ".join(f"{k.upper()}={run.settings[k]}" for k in keys) or "(baseline settings)"


def compare(runs: list[AblationRun], baselines: list[AblationRun], ignore=()) -> list[AblationRun]:
    """Label each run by what it changed and set its deltas against the baseline of its seed (else their mean).
    `ignore`: settings (any case) that never count as a change."""
    ignore = {k.lower() for k in ignore}
    every = runs + baselines
    unknown = sorted(k for k in ignore if not any(k in r.settings for r in every))
    if unknown:
        raise ValueError(f"--ignore {' '.join(k.upper() for k in unknown)}: no compared run sets it (their settings: "
                         f"{', '.join(sorted({k.upper() for r in every for k in r.settings})) or 'none'}); pass a "
                         f"setting from their `override setting:` lines")
    shared = {k: v for k, v in every[0].settings.items() if all(r.settings.get(k) == v for r in every)}
    by_seed = {b.seed: b for b in baselines}
    for run in every:
        run.change = _change(run, shared, ignore)
    for run in runs:
        if not baselines:
            continue
        if run.seed in by_seed:
            base = [by_seed[run.seed]]
            run.vs = f"seed {run.seed}"
        else:
            base, run.vs = baselines, f"mean of {len(baselines)}"

        def delta(attr: str) -> float | None:
            values = [getattr(b, attr) for b in base]
            mine = getattr(run, attr)
            if mine is None or any(v is None for v in values):
                return None
            return mine - sum(values) / len(values)
        run.delta_prequant, run.delta_int6, run.delta_ms = delta("prequant_bpb"), delta("int6_bpb"), \
            delta("step_avg_ms")
        run.delta_final = delta("final_bpb")
    return runs


@dataclass
class Summary:
    """The seeds of one change: mean deltas, and whether every seed moved the same way (better)."""
    change: str
    seeds: list[int] = field(default_factory=list)
    delta_prequant: float | None = None
    delta_int6: float | None = None
    delta_ms: float | None = None
    delta_final: float | None = None
    every_seed_better: bool = False


def summarize(runs: list[AblationRun]) -> list[Summary]:
    out: dict[str, list[AblationRun]] = {}
    for run in runs:
        out.setdefault(run.change, []).append(run)

    def mean(values):
        return sum(values) / len(values) if values and all(v is not None for v in values) else None
    return [Summary(change, sorted(r.seed for r in group), mean([r.delta_prequant for r in group]),
                    mean([r.delta_int6 for r in group]), mean([r.delta_ms for r in group]),
                    mean([r.delta_final for r in group]),
                    all(r.delta_prequant is not None and r.delta_prequant < 0 for r in group))
            for change, group in out.items()]


def _cell(value, fmt: str) -> str:
    if isinstance(value, float) and fmt.endswith("5f"):
        value = round(value, 5) + 0.0  # no "-0.00000" for a difference below the printed precision
    return "" if value is None else format(value, fmt)


HEADER = ("change", "seed", "ms/step", "steps", "val_bpb raw / kept", "vs", "delta", "bytes before fit",
          "clip floor", "after int6", "delta int6", "final", "delta final")


def table_rows(runs: list[AblationRun], baselines: list[AblationRun]) -> list[tuple[str, ...]]:
    rows = []
    for run, is_base in [(b, True) for b in baselines] + [(r, False) for r in runs]:
        rows.append((("baseline: " if is_base else "") + run.change, str(run.seed), f"{run.step_avg_ms:.2f}",
                     f"{run.steps:,}", f"{_cell(run.raw_bpb, '.5f')} / {run.prequant_bpb:.5f}", run.vs,
                     _cell(run.delta_prequant, "+.5f"), _cell(run.bytes_before_fit, ","), _cell(run.clip_sigma, ".2f"),
                     _cell(run.int6_bpb, ".5f"), _cell(run.delta_int6, "+.5f"), _cell(run.final_bpb, ".5f"),
                     _cell(run.delta_final, "+.5f")))
    return rows


def format_text(rows: list[tuple[str, ...]], summaries: list[Summary]) -> str:
    table = [HEADER, *rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(HEADER))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table]
    return "\n".join(lines + [""] + summary_lines(summaries))


def format_markdown(rows: list[tuple[str, ...]], summaries: list[Summary]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines + [""] + summary_lines(summaries))


def summary_lines(summaries: list[Summary]) -> list[str]:
    """`key:value` lines per change, for people and grep."""
    return [f"summary change:{s.change.replace(' ', ',')} seeds:{','.join(map(str, s.seeds))} "
            f"delta_prequant:{_cell(s.delta_prequant, '+.5f') or '-'} delta_int6:{_cell(s.delta_int6, '+.5f') or '-'} "
            f"delta_ms:{_cell(s.delta_ms, '+.2f') or '-'} delta_final:{_cell(s.delta_final, '+.5f') or '-'} "
            f"every_seed_better:{str(s.every_seed_better).lower()}"
            for s in summaries]
