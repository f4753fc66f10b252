"""`pgolf ablation` on the committed P1 ablation against the proxy record's logs (real input), and on bad input."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tools.commands.cli import main

ROOT = Path(__file__).resolve().parents[1]
ABLATION = ROOT / "ablations/2026-11-23_P1_speedrun_switches"
RECORD = ROOT / "records/track_non_record_16mb/2026-11-23_P1_proxy_11L_XSA_BigramHash_GPTQ_int6_legal_TTT_ngram"


def ablation(capsys, *args) -> str:
    assert main(["ablation", *map(str, args)]) == 0
    return capsys.readouterr().out


def test_the_committed_ablation_against_the_record_gives_the_readme_figures(capsys):
    data = json.loads(ablation(capsys, ABLATION, "--baseline", RECORD, "--json"))
    runs = {(r["change"], r["seed"]): r for r in data["runs"]}
    # what each run changed: its overrides less those every run shares (data paths, batch, cap) and seed/run_dir
    assert set(runs) == {("EMBED2=True", 1337), ("EMBED2=True", 42), ("KEY_OFFSET_LAST_N=11", 1337),
                         ("LAYER_BIGRAM_BUCKETS=5120", 1337), ("BIGRAM_BUCKETS=0 LAYER_BIGRAM_BUCKETS=5120", 1337)}
    e42 = runs["EMBED2=True", 42]
    assert e42["vs"] == "seed 42" and e42["steps"] == 2650 and e42["step_avg_ms"] == 90.54
    assert e42["delta_prequant"] == pytest.approx(1.36546 - 1.37045)        # the record's seed 42: EMA 1.37045
    assert e42["delta_int6"] == pytest.approx(1.36723333 - 1.37169047)      # quantize.log vs the record's log
    assert (e42["bytes_before_fit"], e42["clip_sigma"]) == (18_762_762, 6.365)
    key = runs["KEY_OFFSET_LAST_N=11", 1337]
    assert key["delta_prequant"] == pytest.approx(1.3704 - 1.3733) and key["int6_bpb"] is None  # not quantized
    summary = {s["change"]: s for s in data["summary"]}
    assert summary["EMBED2=True"]["seeds"] == [42, 1337] and summary["EMBED2=True"]["every_seed_better"]
    assert summary["EMBED2=True"]["delta_prequant"] == pytest.approx((-0.00447 - 0.00499) / 2, abs=1e-5)
    assert [b["seed"] for b in data["baselines"]] == [1337, 2025, 42]

    text = ablation(capsys, ABLATION, "--baseline", RECORD, "--markdown")
    assert text.startswith("| change | seed | ms/step |")
    assert "| EMBED2=True | 42 | 90.54 | 2,650 | 1.36819 / 1.36546 | seed 42 | -0.00499 | 18,762,762 | 6.37 | " \
           "1.36723 | -0.00446 |" in text
    assert "| LAYER_BIGRAM_BUCKETS=5120 | 1337 |" in text and "| +0.00000 |" in text  # not "-0.00000"
    assert "summary change:EMBED2=True seeds:42,1337 delta_prequant:-0.00473" in text


def test_plot_draws_the_deltas_or_says_why_it_cannot(capsys, tmp_path):
    png = tmp_path / "ablation.png"
    ablation(capsys, ABLATION, "--baseline", RECORD, "--plot", png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left behind
    with pytest.raises(SystemExit, match=r"nothing to plot: no run has a baseline .*\(pass --baseline\)"):
        main(["ablation", str(ABLATION), "--plot", str(tmp_path / "none.png")])
    assert not (tmp_path / "none.png").exists()


def test_without_a_baseline_of_its_seed_a_run_is_compared_with_the_baselines_mean(capsys, tmp_path):
    runs = tmp_path / "runs"
    for name, seed, bpb in (("base1", 1, 1.40), ("base2", 2, 1.42), ("new", 3, 1.39)):
        (runs / name).mkdir(parents=True)
        lines = [f"seed:{seed}", f"override setting:seed:1337->{seed}(cli)",
                 "override setting:num_layers:11->9(cli)" if name == "new" else "",
                 "training_done steps:100 train_time_s:10 step_avg_ms:100.0",
                 f"final_raw val_loss:2.5 val_bpb:{bpb + 0.01}", f"final_prequant val_loss:2.5 val_bpb:{bpb}"]
        (runs / name / "train.log").write_text("\n".join(lines) + "\n")
    data = json.loads(ablation(capsys, runs / "new", "--baseline", runs / "base1", "--baseline", runs / "base2",
                               "--json"))
    (run,) = data["runs"]
    assert run["change"] == "NUM_LAYERS=9" and run["vs"] == "mean of 2"
    assert run["delta_prequant"] == pytest.approx(1.39 - 1.41) and run["bytes_before_fit"] is None


def test_bad_input_names_the_file_and_the_fix(tmp_path):
    run = tmp_path / "cut"
    run.mkdir()
    (run / "train.log").write_text("seed:1\nstep:10 train_loss:5.0\n")  # stopped before the end of training
    with pytest.raises(SystemExit, match=r"cut/train.log: no `training_done` and `final_prequant` lines \(the run "
                                         r"did not finish training"):
        main(["ablation", str(run)])
    (run / "train.log").write_text("seed:1\ntraining_done steps:10\nfinal_prequant val_loss:2.5 val_bpb:1.4\n")
    with pytest.raises(SystemExit, match=r"cut/train.log: a summary line lacks or garbles 'step_avg_ms'"):
        main(["ablation", str(run)])
    with pytest.raises(SystemExit, match=r"empty: no runs here"):
        (tmp_path / "empty").mkdir()
        main(["ablation", str(tmp_path / "empty")])
    with pytest.raises(SystemExit, match=r"two baselines share a seed"):
        main(["ablation", str(ABLATION / "embed2"), "--baseline", str(ABLATION / "key_offset"),
              "--baseline", str(ABLATION / "layer_bigram")])


SP8192 = ROOT / "ablations"
PACKED_1337 = SP8192 / "2026-12-07_P1_sp8192_packed_seed1337/packed"
QAT_OFF_1337 = SP8192 / "2026-12-06_P1_sp8192_packed_seed1337_qat/qat_off"


def test_packed_runs_report_their_final_score_and_ignore_names_a_place_not_a_variant(capsys):
    # two packed P1 runs (real logs): each trained on its own copy of the corpus, so DATA_DIR differs
    data = json.loads(ablation(capsys, QAT_OFF_1337, "--baseline", PACKED_1337, "--json"))
    (run,) = data["runs"]
    assert run["change"] == "DATA_DIR=/tmp/p1/data8 QAT_THRESHOLD=0.0"
    data = json.loads(ablation(capsys, QAT_OFF_1337, "--baseline", PACKED_1337, "--ignore", "DATA_DIR", "--json"))
    (run,) = data["runs"]
    assert run["change"] == "QAT_THRESHOLD=0.0" and data["baselines"][0]["change"] == "(baseline settings)"
    # the packed program's own legal evaluation: final_eval_exact in each train.log
    assert (run["final_bpb"], data["baselines"][0]["final_bpb"]) == (1.31164359, 1.31100872)
    assert run["delta_final"] == pytest.approx(1.31164359 - 1.31100872)
    assert data["summary"][0]["delta_final"] == pytest.approx(1.31164359 - 1.31100872)
    text = ablation(capsys, QAT_OFF_1337, "--baseline", PACKED_1337, "--ignore", "data_dir", "--markdown")
    assert text.splitlines()[0].endswith("| after int6 | delta int6 | final | delta final |")
    assert "| QAT_THRESHOLD=0.0 | 1337 | 105.52 | 2,274 | 1.33278 / 1.32424 | seed 1337 | +0.00107 | 15,937,194 | " \
           "0.00 | 1.33148 | +0.00125 | 1.31164 | +0.00063 |" in text
    assert "summary change:QAT_THRESHOLD=0.0 seeds:1337 delta_prequant:+0.00107 delta_int6:+0.00125 " \
           "delta_ms:+0.67 delta_final:+0.00063 every_seed_better:false" in text
    with pytest.raises(SystemExit, match=r"--ignore DATA-DIR: no compared run sets it \(their settings: .*DATA_DIR"):
        main(["ablation", str(QAT_OFF_1337), "--baseline", str(PACKED_1337), "--ignore", "DATA-DIR"])
