"""Record plots as PNG (matplotlib Agg): training loss curves of the seeds, per-seed val_bpb against a reference, and
an ablation's val_bpb differences."""
from __future__ import annotations

import os
import textwrap
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from tools.records.results import SeedResult

DPI = 120
# Per-step training loss jumps by ~0.1 nats between batches; a window of ~2% of the run shows the trend. The window
# is centered and grows from the first step (half-width SMOOTH_GROWTH x the step, up to 1% of the run), so on the
# log-step axis the early steps, where the loss falls fastest, are not averaged with steps far before them.
SMOOTH_FRACTION = 0.02
SMOOTH_GROWTH = 0.1
# one color and line style per seed in the seed-difference panel (10 colors x 4 styles before a repeat)
LINE_STYLES = ("-", "--", "-.", ":")
LABEL_BOX = {"boxstyle": "round,pad=0.15", "facecolor": "white", "edgecolor": "none", "alpha": 0.8}


def _wrap(text: str, width: int) -> str:
    """Lines of at most `width` characters, broken at spaces (not inside a date such as 2026-11-23)."""
    return textwrap.fill(text, width, break_on_hyphens=False)


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


def smooth_loss(steps, values, max_half_width: float, growth: float = SMOOTH_GROWTH) -> np.ndarray:
    """Mean of the values whose step is within h of each step, h = min(max_half_width, growth * step): a centered
    window that grows from the first step (one value alone up to step 1/growth), so the curve follows the loss where
    it falls fastest instead of lagging behind it. As many values are taken on each side (a log that skips steps
    leaves a side short), except near the last step, where only the window's left part exists. `steps` ascending."""
    steps = np.asarray(steps, dtype=np.float64)
    values = np.asarray(values, dtype=np.float64)
    half = np.minimum(max_half_width, growth * steps)
    index = np.arange(len(steps))
    lo = np.searchsorted(steps, steps - half, side="left")
    hi = np.searchsorted(steps, steps + half, side="right")
    side = np.minimum(index - lo, hi - 1 - index)
    at_end = steps + half > steps[-1]
    lo, hi = np.where(at_end, lo, index - side), np.where(at_end, hi, index + side + 1)
    sums = np.concatenate([[0.0], np.cumsum(values)])
    return (sums[hi] - sums[lo]) / (hi - lo)


def _loss_table(curves: dict[int, list[tuple[int, float]]]) -> tuple[list[int], np.ndarray, np.ndarray]:
    """Seeds with points, the union of their logged steps, and [seed, step] losses (NaN where a seed has none). A
    step logged twice (a resumed run) keeps its last value; a nan or inf loss (a diverged run) is left out."""
    per_seed = {seed: {step: loss for step, loss in points if np.isfinite(loss)} for seed, points in curves.items()}
    seeds = [seed for seed in sorted(per_seed) if per_seed[seed]]
    per_seed = [per_seed[seed] for seed in seeds]
    steps = np.array(sorted(set().union(*per_seed)), dtype=np.int64)
    table = np.full((len(seeds), len(steps)), np.nan)
    for row, points in zip(table, per_seed):
        row[np.searchsorted(steps, list(points))] = list(points.values())
    return seeds, steps, table


def _smooth_rows(steps: np.ndarray, table: np.ndarray, half: float) -> np.ndarray:
    out = np.full_like(table, np.nan)
    for row, smooth in zip(table, out):
        have = ~np.isnan(row)
        smooth[have] = smooth_loss(steps[have], row[have], half)
    return out


def loss_figure(curves: dict[int, list[tuple[int, float]]], title: str) -> Figure:
    """Training loss against step: the whole run (log-scale steps) and its second half, zoomed in; with several
    seeds, their mean with the min-max band of the seeds, and below, each seed's own line as its difference from
    that mean (seeds on the same data order differ by ~0.01 nats, too little to tell apart on the loss scale)."""
    seeds, steps, table = _loss_table(curves)
    if not seeds:
        raise ValueError("no finite training loss to plot")
    several = len(seeds) > 1
    half = max(1.0, SMOOTH_FRACTION / 2 * float(steps[-1]))
    per_step = np.nanmean(table, axis=0)  # one seed: its own values
    smooth = smooth_loss(steps, per_step, half)
    fig = Figure(figsize=(11, 7.6 if several else 4.2), layout="constrained")
    if several:
        grid = fig.add_gridspec(2, 2, height_ratios=[1.2, 1])
        full, zoom, spread = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1]), fig.add_subplot(grid[1, :])
        band = _smooth_rows(steps, table, half)
        band_lo, band_hi = np.nanmin(band, axis=0), np.nanmax(band, axis=0)
    else:
        full, zoom = fig.subplots(1, 2)
    what = f"mean of {len(seeds)} seeds" if several else f"seed {seeds[0]}"
    second = steps >= steps[-1] / 2
    for ax, keep in ((full, slice(None)), (zoom, second)):
        ax.plot(steps[keep], per_step[keep], lw=0.6, alpha=0.35, color="tab:blue", label=f"per step ({what})")
        if several:
            ax.fill_between(steps[keep], band_lo[keep], band_hi[keep], color="tab:orange", alpha=0.45, lw=0,
                            label="min to max of the seeds (smoothed)")
        ax.plot(steps[keep], smooth[keep], lw=1.4, color="navy",
                label=f"smoothed (centered window of up to {2 * int(half) + 1} steps)")
        ax.set_xlabel("step")
        ax.set_ylabel("train loss (nats/token)")
        ax.grid(True, alpha=0.3)
    full.set_xscale("log")
    full.set_title("whole run (log-scale steps)")
    zoom.set_title(f"second half: steps {int(steps[second][0]):,} to {int(steps[-1]):,}")
    # the zoom is for the smoothed trend: per-step outliers may leave the frame rather than flatten the curve
    raw = per_step[second]
    low, high = min(smooth[second].min(), np.percentile(raw, 1)), max(smooth[second].max(), np.percentile(raw, 99))
    pad = 0.05 * max(high - low, 1e-3)
    zoom.set_ylim(low - pad, high + pad)
    if several:
        _seed_differences(spread, seeds, steps, table, half)
    fig.suptitle(title)
    full.legend(fontsize=8, loc="best")
    return fig


def _seed_differences(ax, seeds: list[int], steps: np.ndarray, table: np.ndarray, half: float) -> None:
    """Each seed's smoothed loss minus the seeds' mean, on the steps every seed logged."""
    common = ~np.isnan(table).any(axis=0)
    if not common.any():
        ax.text(0.5, 0.5, "no step was logged by every seed", transform=ax.transAxes, ha="center")
        return
    steps, table = steps[common], table[:, common]
    mean = table.mean(axis=0)
    late = steps >= steps[-1] / 10  # the first steps (init noise, ~1 nat apart) would hide the rest: clipped
    extent = 0.0
    for i, (seed, row) in enumerate(zip(seeds, table)):
        diff = smooth_loss(steps, row - mean, half)
        second = diff[steps >= steps[-1] / 2]
        ax.plot(steps, diff, lw=1.3, color=f"C{i % 10}", ls=LINE_STYLES[i % len(LINE_STYLES)],
                label=f"seed {seed}: {second.mean():+.4f}")
        extent = max(extent, np.abs(diff[late]).max(initial=0.0))
    ax.axhline(0, color="black", lw=0.8)
    ax.set_ylim(-1.15 * extent - 1e-4, 1.15 * extent + 1e-4)
    if len(steps) > 1:
        ax.set_xlim(steps[0], steps[-1])
    ax.set_xlabel("step")
    ax.set_ylabel("seed minus mean of seeds\n(nats/token, smoothed)")
    ax.set_title("each seed against the others: below 0 = lower loss than the seeds' mean at that step "
                 "(first 10% of steps may leave the frame)", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="mean over the\nsecond half",
              title_fontsize=8)


def plot_loss_curves(curves: dict[int, list[tuple[int, float]]], path: Path, title: str) -> Path:
    """loss_figure as a PNG."""
    if not any(np.isfinite(loss) for points in curves.values() for _, loss in points):
        raise ValueError(f"{path}: no `step:<n> train_loss:<x>` lines in the train logs to plot (was the log cut?)")
    return _save(loss_figure(curves, title), path)

# A reference farther than this many times the seeds' spread from them is written at the edge instead of drawn: on
# a scale that holds both, the seeds would sit on one line (a 2026-04 record against the 2026-11 proxy: 0.26 apart,
# seeds within 0.002).
REFERENCE_ON_SCALE = 4.0


def seed_bpb_figure(results: list[SeedResult], title: str, reference_bpb: float | None = None,
                    reference_label: str | None = None) -> Figure:
    """Each seed's final val_bpb, the mean with a +-1 std band, and the reference record's mean when given (a
    dashed line, or an arrow and its value at the top or bottom edge when it is far off the seeds' scale)."""
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
        ax.annotate(f"{value:.5f}", (x, value), textcoords="offset points", xytext=(0, 8), ha="center", fontsize=8,
                    bbox=LABEL_BOX)  # readable where it sits on the mean line
    low, high = float(values.min()), float(values.max())
    spread = max(high - low, 1e-4)
    reference_text = None
    if reference_bpb is not None:
        name = reference_label or "reference"
        if low - REFERENCE_ON_SCALE * spread <= reference_bpb <= high + REFERENCE_ON_SCALE * spread:
            ax.axhline(reference_bpb, color="tab:red", lw=1.2, ls="--",
                       label=_wrap(f"{name}: {reference_bpb:.5f}", 60))
            low, high = min(low, reference_bpb), max(high, reference_bpb)
            spread = max(high - low, 1e-4)
        else:
            above = reference_bpb > high
            reference_text = (f"{'▲' if above else '▼'} {_wrap(name, 70)}\n{reference_bpb:.5f}, "
                              f"{reference_bpb - mean:+.5f} from the mean (off the scale)")
    ax.set_xticks(xs, [f"seed {r.seed}" for r in results])
    ax.set_xlim(-0.6, len(results) - 0.4)
    # room for the value labels above the highest point, and for the off-scale reference's line
    pad = spread * 0.25
    ax.set_ylim(low - pad * (3 if reference_text and not above else 1),
                high + pad * (4 if reference_text and above else 2))
    if reference_text:
        ax.text(0.5, 0.97 if above else 0.03, reference_text, transform=ax.transAxes, ha="center",
                va="top" if above else "bottom", fontsize=8, color="tab:red", linespacing=1.4)
    ax.set_ylabel("val_bpb (bits per byte, lower is better)")
    ax.grid(True, axis="y", alpha=0.3)
    fig.legend(fontsize=8, loc="outside lower center", ncols=3, frameon=False)
    ax.set_title(_wrap(title, 64))  # record names are long: the figure is 7 inches wide
    return fig


def plot_seed_bpb(results: list[SeedResult], path: Path, title: str, reference_bpb: float | None = None,
                  reference_label: str | None = None) -> Path:
    """seed_bpb_figure as a PNG."""
    if not results:
        raise ValueError(f"{path}: no seed results to plot")
    return _save(seed_bpb_figure(results, title, reference_bpb, reference_label), path)


def plot_ablation(runs, path: Path, title: str) -> Path:
    """Per change (rows), each seed's val_bpb difference from its baseline: before quantization (circles) and after
    int6 (squares), with the per-change mean as a bar. Left of zero is better.
    `runs`: tools.records.ablation.AblationRun."""
    changes = list(dict.fromkeys(r.change for r in runs))
    if not changes or all(r.delta_prequant is None for r in runs):
        raise ValueError(f"{path}: nothing to plot: no run has a baseline to be compared with (pass --baseline)")
    fig = Figure(figsize=(9, 1.2 + 0.55 * len(changes)), layout="constrained")
    ax = fig.subplots()
    for row, change in enumerate(changes):
        group = [r for r in runs if r.change == change]
        for attr, offset, marker, color, what in (("delta_prequant", -0.15, "o", "tab:blue", "before quantization"),
                                                  ("delta_int6", 0.15, "s", "tab:orange", "int6")):
            values = [getattr(r, attr) for r in group if getattr(r, attr) is not None]
            if values:
                ax.barh(row + offset, np.mean(values), height=0.28, color=color, alpha=0.35)
                ax.plot(values, [row + offset] * len(values), marker, color=color, ms=5)
            else:  # an empty row reads as "no difference" without a word
                ax.annotate(f"no {what} result", (0, row + offset), textcoords="offset points", xytext=(-4, 0),
                            ha="right", va="center", fontsize=7, color="gray")
    ax.set_yticks(range(len(changes)), ["\n".join(textwrap.wrap(c, 34)) for c in changes], fontsize=8)
    ax.invert_yaxis()
    ax.axvline(0, color="black", lw=0.8)
    ax.use_sticky_edges = False  # bars stick the axis to 0; a point at 0 would be cut in half
    ax.margins(x=0.06)
    ax.set_xlabel("val_bpb minus the same seed's baseline (left is better)")
    handles = [Line2D([], [], ls="", marker="o", color="tab:blue", label="before quantization (kept weights), a seed"),
               Line2D([], [], ls="", marker="s", color="tab:orange", label="after int6, fitted to 16 MB, a seed"),
               Patch(color="gray", alpha=0.35, label="bar: mean over the seeds")]
    # below the axes: inside, it sits on some change's points
    fig.legend(handles=handles, fontsize=8, loc="outside lower center", ncols=3, frameon=False)
    ax.set_title(_wrap(title, 90), fontsize=10)
    return _save(fig, path)
