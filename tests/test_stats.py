"""Significance statistics and `pgolf stats` (tools/records/stats.py), checked against hand formulas and the records."""
import argparse
import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as scipy_stats

from tools.commands.stats import add_commands
from tools.records import stats
from tools.records.results import SeedResult, load_record

RECORDS = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "records"
REC_0323 = RECORDS / "2026-03-23_LeakyReLU_LegalTTT_ParallelMuon"
REC_0325 = RECORDS / "2026-03-25_ValCalib_GPTQ_XSA_BigramHash3072"
REC_0405 = RECORDS / "2026-04-05_SP8192_GPTQ-Embeddings_SDClip_Loop45x2"
needs_records = pytest.mark.skipif(not RECORDS.is_dir(), reason=f"fixture records not found at {RECORDS}")


def run_cli(argv: list[str], capsys) -> str:
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers())
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    return capsys.readouterr().out


def seed_result(seed: int, val_loss: float, val_bpb: float) -> SeedResult:
    return SeedResult(seed, val_loss, val_bpb, "eval.json", Path(f"runs/s{seed}/eval.json"))


@needs_records
def test_welch_reproduces_the_2026_03_25_readme():
    new, old = load_record(REC_0325), load_record(REC_0323)
    welch = stats.welch_test([r.val_bpb for r in new.results], [r.val_bpb for r in old.results], "val_bpb")
    assert round(welch.t, 2) == -11.83 and round(welch.df, 2) == 3.31
    # the record's submission.json states t_statistic -11.8339, welch_df 3.3063
    assert welch.t == pytest.approx(-11.8339, abs=1e-4) and welch.df == pytest.approx(3.3063, abs=1e-4)
    assert welch.p_one_sided == pytest.approx(welch.p_two_sided / 2)
    assert welch.p_two_sided == pytest.approx(2 * scipy_stats.t.cdf(welch.t, welch.df))


def test_welch_df_against_the_textbook_formula():
    a, b = [1.0, 1.2, 0.9, 1.1], [2.0, 2.5, 1.5]
    va, vb = np.var(a, ddof=1) / 4, np.var(b, ddof=1) / 3
    expected = (va + vb) ** 2 / (va ** 2 / 3 + vb ** 2 / 2)
    assert stats.welch_df(a, b) == pytest.approx(expected, rel=1e-12)
    assert stats.welch_test(a, b, "val_bpb").df == pytest.approx(expected, rel=1e-12)


def test_rule_test_against_hand_computation():
    values = [1.8820, 1.8830, 1.8810, 1.8825]
    reference = 1.8900
    mean, sd, n = float(np.mean(values)), float(np.std(values, ddof=1)), len(values)
    threshold = reference - 0.005
    t = (mean - threshold) / (sd / math.sqrt(n))
    test = stats.rule_test(values, reference)
    assert test.threshold == pytest.approx(threshold) and test.t == pytest.approx(t) and test.df == n - 1
    assert test.p == pytest.approx(scipy_stats.t.cdf(t, n - 1))
    assert test.significant == (test.p < 0.01)
    # mean not below record - 0.005: never significant, no number of seeds helps
    worse = stats.rule_test([1.887, 1.888, 1.886], reference)
    assert worse.t > 0 and worse.p > 0.5 and not worse.significant and worse.seeds_needed is None


def test_seeds_needed_is_the_smallest_n():
    # 3 seeds (df=2) need t > 6.96: an effect of 7 standard errors at n=3 is enough, n=2 (t_crit 31.8) is not
    std = 1e-3
    effect = 7 * std / math.sqrt(3)
    assert stats.seeds_needed(effect, std) == 3
    for effect, std in [(4e-4, 6e-4), (1e-4, 6e-4), (3e-3, 4e-4)]:
        n = stats.seeds_needed(effect, std)
        assert scipy_stats.t.ppf(0.99, n - 1) < effect * math.sqrt(n) / std
        assert n == 2 or scipy_stats.t.ppf(0.99, n - 2) >= effect * math.sqrt(n - 1) / std
    assert stats.seeds_needed(0.0, 1e-3) is None and stats.seeds_needed(-1e-3, 1e-3) is None


@needs_records
def test_report_against_the_previous_record():
    new, old = load_record(REC_0325), load_record(REC_0323)
    report = stats.build_report(new.results, record=old)
    stated = new.submission
    # sample std (ddof=1), as the record states it
    assert report.val_loss.std == pytest.approx(stated["val_loss_std"], abs=1e-8)
    assert report.val_bpb.std == pytest.approx(stated["val_bpb_std"], abs=1e-8)
    assert report.val_loss.mean - report.record_val_loss == pytest.approx(stated["delta_vs_pr549_nats"], abs=1e-8)
    assert report.same_tokenizer and report.rule_test.metric == "val_loss"
    assert report.rule_test.significant and report.rule_test.seeds_needed == 3
    # 0.005 nats in BPB = 0.005 * bpb/nats of this tokenizer (ratio from the record's stated means)
    assert report.margin_bpb == pytest.approx(0.005 * stated["val_bpb"] / stated["val_loss"], rel=1e-6)


@needs_records
def test_different_tokenizer_is_judged_in_bpb():
    report = stats.build_report(load_record(REC_0405).results, record=load_record(REC_0325))
    assert report.same_tokenizer is False and report.welch_loss is None
    assert report.rule_test.metric == "val_bpb"
    # sp8192: 2.80428 nats/token at 1.08562 BPB
    assert report.rule_test.margin == pytest.approx(0.005 * 1.0856248 / 2.8042816, rel=1e-5)


def test_ratio_from_eval_json_counts():
    results = [SeedResult(s, 1.9 + d, (1.9 + d) / math.log(2) * 0.41, "eval.json", Path("e.json"),
                          val_tokens=41_000, val_bytes=100_000) for s, d in [(1, 0.0), (2, 1e-3), (3, -1e-3)]]
    report = stats.build_report(results, record_loss=1.9)
    assert report.tokens_per_byte == pytest.approx(0.41)
    assert report.margin_bpb == pytest.approx(0.005 / math.log(2) * 0.41)
    assert not report.rule_test.significant  # mean equals the record: not 0.005 below it


def test_duplicate_seeds_are_refused():
    with pytest.raises(ValueError, match="seed 1 again"):
        stats.build_report([seed_result(1, 1.9, 1.1), seed_result(1, 1.8, 1.0)])


@needs_records
def test_cli_table_summary_and_json(capsys):
    out = run_cli(["stats", str(REC_0325), "--record", str(REC_0323)], capsys)
    assert "train_seed314.log" in out and "final_int6_sliding_window_exact" in out
    lines = dict(line.split(":", 1) for line in out.splitlines() if ":" in line and " " not in line.split(":")[0])
    assert lines["seeds"] == "3" and lines["welch_bpb_t"] == "-11.8339" and lines["welch_bpb_df"] == "3.3063"
    assert lines["rule_test_significant"] == "true"
    data = json.loads(run_cli(["stats", str(REC_0325), "--record-loss", "1.89002068", "--json"], capsys))
    assert data["rule_test"]["df"] == 2 and data["rule_test"]["significant"] is True
    assert [r["seed"] for r in data["results"]] == [42, 314, 999]
    assert data["results"][0]["source"].endswith("train_seed42.log")


def test_cli_reads_a_folder_of_kit_run_directories_and_kit_logs(tmp_path, capsys):
    """`pgolf seeds --out` folders (seed<N>/eval.json + train.log) and kit train logs as a reference."""
    ratio = 0.41
    record_dir = tmp_path / "record"
    record_dir.mkdir()
    for seed, loss in {1: 2.50, 2: 2.51, 3: 2.49}.items():
        run = tmp_path / "runs" / f"seed{seed}"
        run.mkdir(parents=True)
        (run / "eval.json").write_text(json.dumps(dict(seed=seed, val_loss=loss - 0.03, tokens=41_000,
                                                       bytes=100_000, val_bpb=(loss - 0.03) / math.log(2) * ratio)))
        (run / "train.log").write_text("seed:%d\ntraining_done steps:120 step_avg_ms:87.5\n" % seed)
        (record_dir / f"train_seed{seed}.log").write_text(
            f"seed:{seed}\nfinal_eval_exact val_loss:{loss:.8f} val_bpb:{loss / math.log(2) * ratio:.8f}\n")
    out = run_cli(["stats", str(tmp_path / "runs"), "--record", str(record_dir)], capsys)
    assert "seed2/eval.json" in out and "120    87.5" in out
    lines = dict(line.split(":", 1) for line in out.splitlines() if ":" in line and " " not in line.split(":")[0])
    assert lines["seeds"] == "3" and lines["same_tokenizer"] == "true"
    assert float(lines["delta_val_loss"]) == pytest.approx(-0.03)
    expected = scipy_stats.ttest_1samp([2.47, 2.48, 2.46], 2.50 - 0.005, alternative="less")
    assert float(lines["rule_test_t"]) == pytest.approx(expected.statistic, abs=1e-4)
