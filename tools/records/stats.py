"""Per-seed summary and the challenge's significance tests of a run's seeds against a record (`pgolf stats`,
tools/commands/stats.py, prints them)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from tools.records.results import RecordResults, SeedResult, check_consistent


def _scipy_stats():
    """scipy.stats, imported when a t-test is computed: it takes ~1.3 s, and `pgolf seeds`, `record` and `--help`
    import this module without computing one."""
    from scipy import stats
    return stats


# The rules: a new record must beat the current one by at least 0.005 nats (val_loss) with p < 0.01.
NAT_MARGIN = 0.005
ALPHA = 0.01
# Tokens per byte that differ by more than this mean a different tokenizer (or validation set): nats per token
# are then not comparable, and the rule is judged in BPB. Rounded log values move the ratio by ~3e-5 at most.
SAME_TOKENIZER_RTOL = 1e-3
MAX_SEEDS_SEARCHED = 10_000


@dataclass(frozen=True)
class MetricSummary:
    """Mean and sample standard deviation (ddof=1; None below 2 seeds) of one metric over seeds."""
    n: int
    mean: float
    std: float | None


@dataclass(frozen=True)
class RuleTest:
    """One-sided one-sample t-test, H0: mean >= reference - margin; significant when p < alpha."""
    metric: str                  # "val_loss" (nats) or "val_bpb" when the tokenizers differ
    reference: float             # the record's mean
    margin: float                # 0.005 nats, or its BPB equivalent
    threshold: float             # reference - margin: the mean must be significantly below this
    mean: float
    t: float
    df: int
    p: float
    alpha: float
    significant: bool
    seeds_needed: int | None     # smallest n reaching p < alpha at this mean and std; None: unreachable


@dataclass(frozen=True)
class WelchTest:
    """Welch's unequal-variance t-test of run seeds vs record seeds; one-sided H1: the run's mean is lower."""
    metric: str
    t: float
    df: float                    # Welch-Satterthwaite
    p_two_sided: float
    p_one_sided: float


@dataclass
class StatsReport:
    """Everything `pgolf stats` prints; the record fields are None without --record/--record-loss."""
    results: list[SeedResult]
    val_loss: MetricSummary
    val_bpb: MetricSummary
    tokens_per_byte: float
    margin_bpb: float            # NAT_MARGIN expressed in BPB for this run's tokenizer
    record: str | None = None
    record_val_loss: float | None = None
    record_val_bpb: float | None = None
    same_tokenizer: bool | None = None
    rule_test: RuleTest | None = None
    welch_bpb: WelchTest | None = None
    welch_loss: WelchTest | None = None
    notes: list[str] = field(default_factory=list)


def summarize(values: list[float]) -> MetricSummary:
    arr = np.asarray(values, dtype=np.float64)
    return MetricSummary(len(arr), float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else None)


def nats_to_bpb(nats: float, tokens_per_byte: float) -> float:
    """BPB = nats / ln 2 * tokens / bytes."""
    return nats / math.log(2) * tokens_per_byte


def tokens_per_byte(results: list[SeedResult]) -> float:
    """Mean tokens/byte over seeds: counted (eval.json) or implied by val_bpb * ln2 / val_loss."""
    return float(np.mean([r.tokens_per_byte for r in results]))


def seeds_needed(effect: float, std: float, alpha: float = ALPHA, max_seeds: int = MAX_SEEDS_SEARCHED) -> int | None:
    """Smallest n >= 2 with t_crit(1 - alpha, n - 1) < effect / (std / sqrt(n)); None if effect <= 0 or beyond
    max_seeds. `effect` is how far the mean lies below the threshold, `std` the per-seed sample std."""
    if effect <= 0:
        return None
    if std == 0:
        return 2
    for n in range(2, max_seeds + 1):
        if _scipy_stats().t.ppf(1 - alpha, n - 1) < effect * math.sqrt(n) / std:
            return n
    return None


def rule_test(values: list[float], reference: float, margin: float = NAT_MARGIN, alpha: float = ALPHA,
              metric: str = "val_loss") -> RuleTest:
    """The rules' test: is the mean significantly below reference - margin (one-sided, one-sample t-test)?"""
    if len(values) < 2:
        raise ValueError(f"a t-test needs at least 2 seeds, got {len(values)} (run more seeds)")
    threshold = reference - margin
    result = _scipy_stats().ttest_1samp(values, popmean=threshold, alternative="less")
    summary = summarize(values)
    return RuleTest(metric, reference, margin, threshold, summary.mean, float(result.statistic), len(values) - 1,
                    float(result.pvalue), alpha, bool(result.pvalue < alpha),
                    seeds_needed(threshold - summary.mean, summary.std, alpha))


def welch_df(a: list[float], b: list[float]) -> float:
    """Welch-Satterthwaite degrees of freedom: (va + vb)^2 / (va^2/(na-1) + vb^2/(nb-1)), v = s^2/n."""
    va, vb = np.var(a, ddof=1) / len(a), np.var(b, ddof=1) / len(b)
    return float((va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1)))


def welch_test(values: list[float], record_values: list[float], metric: str) -> WelchTest:
    """Welch's t-test of the run's seeds against the record's (the maintainers applied it to val_bpb)."""
    if len(values) < 2 or len(record_values) < 2:
        raise ValueError(f"Welch's t-test needs at least 2 seeds on each side, got {len(values)} and "
                         f"{len(record_values)} (run more seeds)")
    stats = _scipy_stats()
    two = stats.ttest_ind(values, record_values, equal_var=False)
    one = stats.ttest_ind(values, record_values, equal_var=False, alternative="less")
    return WelchTest(metric, float(two.statistic), welch_df(values, record_values), float(two.pvalue),
                     float(one.pvalue))


def build_report(results: list[SeedResult], record: RecordResults | None = None,
                 record_loss: float | None = None) -> StatsReport:
    """Summary of the run's seeds and, against a record folder or a record val_loss, the significance tests."""
    if not results:
        raise ValueError("no results to summarize (pass run directories, record folders or result files)")
    if record is not None and record_loss is not None:
        raise ValueError("pass either a record folder or a record val_loss, not both")
    check_consistent(results)
    results = sorted(results, key=lambda r: r.seed)
    losses, bpbs = [r.val_loss for r in results], [r.val_bpb for r in results]
    ratio = tokens_per_byte(results)
    report = StatsReport(results, summarize(losses), summarize(bpbs), ratio, nats_to_bpb(NAT_MARGIN, ratio))
    if len(results) < 3:
        report.notes.append(f"{len(results)} seed(s): records show 3 or more (3 seeds need t < -6.96 for p < 0.01)")
    if record is None and record_loss is None:
        return report
    if record_loss is not None:
        report.record, report.record_val_loss = "--record-loss", record_loss
        if len(results) < 2:
            report.notes.append("the t-test needs at least 2 seeds")
        else:
            report.rule_test = rule_test(losses, record_loss)
        return report
    record_losses = [r.val_loss for r in record.results]
    record_bpbs = [r.val_bpb for r in record.results]
    record_ratio = tokens_per_byte(record.results)
    report.record = str(record.path)
    report.record_val_loss, report.record_val_bpb = float(np.mean(record_losses)), float(np.mean(record_bpbs))
    report.same_tokenizer = abs(ratio - record_ratio) <= SAME_TOKENIZER_RTOL * record_ratio
    if len(results) < 2 or len(record.results) < 2:
        report.notes.append("significance tests need at least 2 seeds on each side")
        return report
    report.welch_bpb = welch_test(bpbs, record_bpbs, "val_bpb")
    if report.same_tokenizer:
        report.rule_test = rule_test(losses, report.record_val_loss)
        report.welch_loss = welch_test(losses, record_losses, "val_loss")
    else:
        # nats per token of different tokenizers are not comparable: judge the 0.005-nat bar in BPB
        report.notes.append(f"tokens/byte {ratio:.5f} vs the record's {record_ratio:.5f}: different tokenizer, "
                            f"so the 0.005-nat rule is tested in BPB (margin {report.margin_bpb:.6f})")
        report.rule_test = rule_test(bpbs, report.record_val_bpb, report.margin_bpb, metric="val_bpb")
    return report


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.10g}"
    return str(value)


def summary_lines(report: StatsReport) -> list[str]:
    """`key:value` lines, one per figure, for people and grep."""
    items: list[tuple[str, object]] = [
        ("seeds", report.val_loss.n), ("val_loss_mean", report.val_loss.mean), ("val_loss_std", report.val_loss.std),
        ("val_bpb_mean", report.val_bpb.mean), ("val_bpb_std", report.val_bpb.std),
        ("tokens_per_byte", report.tokens_per_byte), ("margin_bpb", report.margin_bpb)]
    if report.record is not None:
        items += [("record", report.record), ("record_val_loss", report.record_val_loss),
                  ("record_val_bpb", report.record_val_bpb), ("same_tokenizer", report.same_tokenizer),
                  # val_loss of different tokenizers are not comparable: no delta in nats then
                  ("delta_val_loss", None if report.same_tokenizer is False
                   else report.val_loss.mean - report.record_val_loss),
                  ("delta_val_bpb", None if report.record_val_bpb is None
                   else report.val_bpb.mean - report.record_val_bpb)]
    if (rule := report.rule_test) is not None:
        items += [("rule_test_metric", rule.metric), ("rule_test_threshold", rule.threshold),
                  ("rule_test_t", round(rule.t, 4)), ("rule_test_df", rule.df), ("rule_test_p", rule.p),
                  ("rule_test_significant", rule.significant),
                  ("seeds_needed", rule.seeds_needed if rule.seeds_needed is not None else "unreachable")]
    for welch in (report.welch_bpb, report.welch_loss):
        if welch is not None:
            name = "welch_bpb" if welch.metric == "val_bpb" else "welch_loss"
            items += [(f"{name}_t", round(welch.t, 4)), (f"{name}_df", round(welch.df, 4)),
                      (f"{name}_p_two_sided", welch.p_two_sided), (f"{name}_p_one_sided", welch.p_one_sided)]
    items += [("note", note) for note in report.notes]
    return [f"{key}:{_fmt(value)}" for key, value in items]


def _source_name(path: Path) -> str:
    """A log's file name; for eval.json also its run directory's (every seed's file has that name)."""
    return f"{path.parent.name}/{path.name}" if path.name == "eval.json" else path.name


def format_report(report: StatsReport) -> str:
    """A per-seed table with mean/std rows, then the summary lines."""
    header = ("seed", "val_loss", "val_bpb", "steps", "step_avg_ms", "bytes_total", "metric", "source")
    rows = [header] + [(str(r.seed), f"{r.val_loss:.8f}", f"{r.val_bpb:.8f}", _fmt(r.steps), _fmt(r.step_avg_ms),
                        _fmt(r.bytes_total), r.metric_key, _source_name(r.source)) for r in report.results]
    rows.append(("mean", f"{report.val_loss.mean:.8f}", f"{report.val_bpb.mean:.8f}", "", "", "", "", ""))
    std_cells = [f"{m.std:.8f}" if m.std is not None else "-" for m in (report.val_loss, report.val_bpb)]
    rows.append(("std", *std_cells, "", "", "", "", ""))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    table = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(table + [""] + summary_lines(report))


def report_to_json(report: StatsReport) -> dict:
    data = asdict(report)
    for row in data["results"]:
        row["source"] = str(row["source"])
    return data
