"""Record plots as PNG (matplotlib Agg): per-seed training loss curves, per-seed val_bpb against a reference."""
from __future__ import annotations

import os
import textwrap
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from tools.results import SeedResult

DPI = 120
# Per-step training loss jumps by ~0.1 nats between batches; a moving average over ~2% of the run shows the trend.
SMOOTH_FRACTION = 0.02


def _save(fig: Figure, path: Path) -> Path:
    """Render with the Agg canvas (no pyplot, no display needed) into a temp file, then rename into place."""
    path = Path(path)
    FigureCanvasAgg(fig)
    # a new file that savefig creates, so it gets a normal file's mode (0o666 less the umask), not mkstemp's 0o600
    tmp = path.with_name(f".{path.stem}.{os.urandom(6).hex()}.png")
    try:
        fig.savefig(tmp, format="png", dpi=DPI)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def moving_average(values: list[float], window: int) -> np.ndarray:
    """Trailing mean over up to `window` values (shorter at the start, so the curve starts at the first step)."""
    arr = np.asarray(values, dtype=np.float64)
    sums = np.cumsum(np.concatenate([[0.0], arr]))
    ends = np.arange(1, len(arr) + 1)
    starts = np.maximum(0, ends - window)
    return (sums[ends] - sums[starts]) / (ends - starts)


def plot_loss_curves(curves: dict[int, list[tuple[int, float]]], path: Path, title: str) -> Path:
    """Training loss per step for each seed: the whole run (log-scale steps) and its second half, zoomed in."""
    if not any(curves.values()):
        raise ValueError(f"{path}: no `step:<n> train_loss:<x>` lines in the train logs to plot (was the log cut?)")
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    full, zoom = fig.subplots(1, 2)
    for seed, points in sorted(curves.items()):
        if not points:
            continue
        steps = np.array([s for s, _ in points])
        losses = [loss for _, loss in points]
        smooth = moving_average(losses, max(1, round(SMOOTH_FRACTION * len(losses))))
        line, = full.plot(steps, smooth, lw=1.4, label=f"seed {seed}")
        full.plot(steps, losses, lw=0.6, alpha=0.25, color=line.get_color())
        half = steps >= steps[-1] / 2
        zoom.plot(steps[half], smooth[half], lw=1.4, color=line.get_color(), label=f"seed {seed}")
        zoom.plot(steps[half], np.asarray(losses)[half], lw=0.6, alpha=0.25, color=line.get_color())
    full.set_xscale("log")
    full.set_title("whole run (faint: per step; bold: moving average)")
    zoom.set_title("second half")
    for ax in (full, zoom):
        ax.set_xlabel("step")
        ax.set_ylabel("train loss (nats/token)")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    return _save(fig, path)


def plot_seed_bpb(results: list[SeedResult], path: Path, title: str, reference_bpb: float | None = None,
                  reference_label: str | None = None) -> Path:
    """Each seed's final val_bpb, the mean with a +-1 std band, and the reference record's mean when given."""
    if not results:
        raise ValueError(f"{path}: no seed results to plot")
    results = sorted(results, key=lambda r: r.seed)
    values = np.array([r.val_bpb for r in results])
    xs = np.arange(len(results))
    fig = Figure(figsize=(7, 4.2), layout="constrained")
    ax = fig.subplots()
    mean = float(values.mean())
    if len(values) > 1:
        std = float(values.std(ddof=1))
        ax.axhspan(mean - std, mean + std, color="tab:blue", alpha=0.12, label=f"+-1 std ({std:.5f})")
    ax.axhline(mean, color="tab:blue", lw=1.2, label=f"mean {mean:.5f}")
    ax.scatter(xs, values, color="tab:blue", zorder=3, s=40)
    for x, value in zip(xs, values):
        ax.annotate(f"{value:.5f}", (x, value), textcoords="offset points", xytext=(0, 8), ha="center", fontsize=8)
    if reference_bpb is not None:
        ax.axhline(reference_bpb, color="tab:red", lw=1.2, ls="--",
                   label=f"{reference_label or 'reference'}: {reference_bpb:.5f}")
    ax.set_xticks(xs, [f"seed {r.seed}" for r in results])
    ax.set_xlim(-0.6, len(results) - 0.4)
    # room for the value labels above the highest point
    low = min(values.min(), reference_bpb if reference_bpb is not None else values.min())
    high = max(values.max(), reference_bpb if reference_bpb is not None else values.max())
    pad = max(high - low, 1e-4) * 0.25
    ax.set_ylim(low - pad, high + 2 * pad)
    ax.set_ylabel("val_bpb (lower is better)")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    ax.set_title(textwrap.fill(title, 64))  # record names are long: the figure is 7 inches wide
    return _save(fig, path)


def plot_ablation(runs, path: Path, title: str) -> Path:
    """Per change (rows), each seed's val_bpb difference from its baseline: before quantization (circles) and after
    int6 (squares), with the per-change mean as a bar. Left of zero is better. `runs`: tools.ablation.AblationRun."""
    changes = list(dict.fromkeys(r.change for r in runs))
    if not changes or all(r.delta_prequant is None for r in runs):
        raise ValueError(f"{path}: nothing to plot: no run has a baseline to be compared with (pass --baseline)")
    fig = Figure(figsize=(9, 1.2 + 0.55 * len(changes)), layout="constrained")
    ax = fig.subplots()
    for row, change in enumerate(changes):
        group = [r for r in runs if r.change == change]
        for attr, offset, marker, color in (("delta_prequant", -0.15, "o", "tab:blue"),
                                            ("delta_int6", 0.15, "s", "tab:orange")):
            values = [getattr(r, attr) for r in group if getattr(r, attr) is not None]
            if values:
                ax.barh(row + offset, np.mean(values), height=0.28, color=color, alpha=0.35)
                ax.plot(values, [row + offset] * len(values), marker, color=color, ms=5)
    ax.set_yticks(range(len(changes)), ["\n".join(textwrap.wrap(c, 34)) for c in changes], fontsize=8)
    ax.invert_yaxis()
    ax.axvline(0, color="black", lw=0.8)
    ax.use_sticky_edges = False  # bars stick the axis to 0; a point at 0 would be cut in half
    ax.margins(x=0.06)
    ax.set_xlabel("val_bpb minus the same seed's baseline (left is better)")
    ax.plot([], [], "o", color="tab:blue", label="before quantization (kept weights)")
    ax.plot([], [], "s", color="tab:orange", label="after int6, fitted to 16 MB")
    ax.legend(fontsize=8, loc="best")
    ax.set_title("\n".join(textwrap.wrap(title, 90)), fontsize=10)
    return _save(fig, path)
