"""tools/records/plots.py: the loss smoothing follows the early fall of the loss, each seed can be told apart, a far
reference does not flatten the seeds, and every plot writes a PNG."""
import numpy as np
import pytest
from matplotlib.collections import PolyCollection

from tools.records import plots
from tools.records.results import SeedResult

STEPS = np.arange(1, 3001)


def falling_loss(steps: np.ndarray) -> np.ndarray:
    """The shape of a real run: ~10 nats at step 1, ~4 at step 60, ~2.5 at the end."""
    return 2.5 + 7.5 * np.exp(-steps / 25) + 1.5 * np.exp(-steps / 600)


def trailing_mean(values: np.ndarray, window: int) -> np.ndarray:
    """The smoothing the plot used before: a trailing mean of `window` values (shorter over the first ones)."""
    sums = np.concatenate([[0.0], np.cumsum(values)])
    ends = np.arange(1, len(values) + 1)
    starts = np.maximum(0, ends - window)
    return (sums[ends] - sums[starts]) / (ends - starts)


def test_the_smoothed_loss_is_true_at_early_steps_and_smooth_later():
    truth = falling_loss(STEPS)
    half = plots.SMOOTH_FRACTION / 2 * STEPS[-1]
    window = round(plots.SMOOTH_FRACTION * len(STEPS))
    early = STEPS <= 300
    # no lag: on the loss without noise, the smoothed curve is the curve, from step 1 on (within 0.02 nats) ...
    assert np.abs(plots.smooth_loss(STEPS, truth, half) - truth).max() < 0.02
    # ... where the trailing mean over the same 2% of the run (60 steps) sits ~2 nats above it at step 60
    lagging = trailing_mean(truth, window)
    assert np.abs(lagging - truth)[early].max() > 0.5 and lagging[59] - truth[59] > 0.5

    raw = truth + 0.1 * np.random.default_rng(0).standard_normal(len(STEPS))  # per-batch noise of a real run
    smooth = plots.smooth_loss(STEPS, raw, half)
    # the local mean of the loss, not the noise: once the window holds 11+ values, within 0.1 nats ...
    assert np.abs(smooth - truth)[STEPS >= 50].max() < 0.1
    assert np.abs(trailing_mean(raw, window) - truth)[(STEPS >= 50) & early].max() > 0.4
    # ... and smooth once it is full: the noise is averaged out
    assert np.abs(smooth - truth)[STEPS > 1000].std() < 0.02


def test_a_log_that_skips_steps_is_not_averaged_across_its_gaps():
    steps = np.array([*range(1, 11), 500, 1000, 1500, 2000])
    values = np.array([6.9, 8.6, 7.7, 7.3, 7.2, 7.1, 7.1, 7.0, 6.6, 6.3, 2.4, 2.3, 2.2, 2.1])
    # no value on both sides within the window (10% of the step, at most 20): each point as logged
    assert plots.smooth_loss(steps, values, 20.0) == pytest.approx(values)


def seed_curves(offsets: dict[int, float]) -> dict[int, list[tuple[int, float]]]:
    """Seeds on the same data order: the same batch noise, each a small constant apart."""
    noise = 0.1 * np.random.default_rng(1).standard_normal(len(STEPS))
    return {seed: list(zip(STEPS.tolist(), (falling_loss(STEPS) + noise + offset).tolist()))
            for seed, offset in offsets.items()}


def test_each_seed_has_its_own_line_and_legend_entry_and_the_spread_is_a_band():
    offsets = {1337: 0.006, 42: -0.004, 2025: -0.002}
    fig = plots.loss_figure(seed_curves(offsets), "three seeds")
    full, zoom, spread = fig.axes
    for ax in (full, zoom):  # the mean of the seeds, with the min-max band of the seeds around it
        assert any(isinstance(c, PolyCollection) for c in ax.collections)
        assert ax.get_xlabel() == "step" and "nats/token" in ax.get_ylabel()
    labels = [t.get_text() for t in spread.get_legend().get_texts()]
    assert [label.split(":")[0] for label in labels] == ["seed 42", "seed 1337", "seed 2025"]
    lines = [line for line in spread.get_lines() if line.get_label().startswith("seed ")]
    assert len({(line.get_color(), line.get_linestyle()) for line in lines}) == 3  # distinct color and style
    # each line is the seed's difference from the mean of the seeds: its offset less their mean offset
    mean = np.mean(list(offsets.values()))
    for line in lines:
        seed = int(line.get_label().split()[1].rstrip(":"))
        assert np.asarray(line.get_ydata())[-500:] == pytest.approx(offsets[seed] - mean, abs=1e-9)
        assert f"{offsets[seed] - mean:+.4f}" in line.get_label()
    assert spread.get_ylim()[1] < 0.05  # zoomed to the seeds' differences, not the loss scale


def test_one_seed_has_no_band_and_no_seed_panel(tmp_path):
    fig = plots.loss_figure(seed_curves({7: 0.0}), "one seed")
    assert len(fig.axes) == 2 and not any(isinstance(c, PolyCollection) for c in fig.axes[0].collections)
    assert "seed 7" in fig.axes[0].get_legend().get_texts()[0].get_text()
    # a step logged twice (a resumed run) counts once, with its last value; a nan loss (diverged) is left out
    curves = {7: [(1, 9.0), (2, 8.0), (2, 7.5), (3, 7.0), (4, float("nan"))]}
    (line,) = [l for l in plots.loss_figure(curves, "t").axes[0].get_lines() if l.get_label().startswith("per step")]
    assert list(line.get_xdata()) == [1, 2, 3] and list(line.get_ydata()) == [9.0, 7.5, 7.0]
    path = plots.plot_loss_curves(curves, tmp_path / "loss.png", "t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no `step:<n> train_loss:<x>` lines"):
        plots.plot_loss_curves({7: [], 8: [(1, float("nan"))]}, tmp_path / "none.png", "t")


def results(values: list[float]) -> list[SeedResult]:
    return [SeedResult(seed, value / 0.3, value, "final_eval_exact", "x.log") for seed, value in enumerate(values)]


def test_a_reference_far_off_the_seeds_is_written_at_the_edge_not_drawn():
    seeds = results([1.0855, 1.0866, 1.0846])
    fig = plots.seed_bpb_figure(seeds, "far", 1.3496, "2026-11-23_P1_proxy")
    ax = fig.axes[0]
    low, high = ax.get_ylim()
    assert high - low < 0.01  # the seeds' 0.002 spread fills the frame
    (text,) = [t.get_text() for t in ax.texts if "off the scale" in t.get_text()]
    assert text.startswith("▲ 2026-11-23_P1_proxy") and "1.34960, +0.26403 from the mean" in text

    fig = plots.seed_bpb_figure(seeds, "near", 1.0890, "ref")
    ax = fig.axes[0]
    assert ax.get_ylim()[0] < 1.0846 and ax.get_ylim()[1] > 1.0890
    assert not [t for t in ax.texts if "off the scale" in t.get_text()]
    assert any(line.get_linestyle() == "--" for line in ax.get_lines())
