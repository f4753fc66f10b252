"""`pgolf eval RUN_DIR --tune`: the coordinate search, its grid, and the command on a tiny run's tuning split."""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import types
from pathlib import Path

import numpy as np
import pytest

import tools.commands.eval
import tools.tune
from eval.lora import LoraConfig
from eval.run import EvalConfig
from submission.data import write_shard
from tests.test_evaluate import scored_run  # noqa: F401 (the fixture)
from tools.commands import cli
from tools.data import record_tune_split, tune_split_fingerprint
from tools.tune import Trial, canonical, coordinate_search, fingerprint, parse_grid


def test_coordinate_search_takes_each_settings_best_value_in_turn_and_scores_nothing_twice():
    calls = []

    def score(s):  # separable with one interaction: b's best depends on a
        calls.append(dict(s))
        return (float(s["a"]) - 2) ** 2 + (float(s["b"]) - float(s["a"])) ** 2

    best, value, trials, complete = coordinate_search(score, {"a": "0", "b": "0"}, {"a": ["0", "1", "2", "3"],
                                                                                   "b": ["0", "1", "2"]})
    # a first, with b at 0: a=1 (1 + 1 = 2) beats a=2 (0 + 4); then b with a=1: b=1
    assert best == {"a": "1", "b": "1"} and value == 1.0
    assert len(calls) == len({tuple(sorted(c.items())) for c in calls}) == 1 + 3 + 2  # start, a=1..3, b=1..2
    assert [t.setting for t in trials] == [None, "a", "a", "a", "b", "b"] and complete


def test_a_search_out_of_time_starts_no_further_trial_and_keeps_the_best_it_ran():
    calls = []
    score = {"0": 3.0, "1": 1.0, "2": 2.0, "3": 0.0}  # "3" would win, but there is no time left for it
    best, value, trials, complete = coordinate_search(lambda s: calls.append(s) or score[s["a"]], {"a": "0"},
                                                      {"a": ["1", "2", "3"]},
                                                      fits=lambda need: 10 - 4 * len(calls) >= need)
    assert not complete and len(calls) == len(trials) == 3  # 10 - 12 < 0: the fourth never started
    assert best == {"a": "1"} and value == 1.0


def test_a_known_trial_is_taken_as_it_was_and_not_scored_again():
    scored = []
    earlier = Trial(None, None, {"a": "0"}, 2.0, 90.0, {"ngram": 2.0})
    best, value, trials, complete = coordinate_search(lambda s: scored.append(s) or 1.0, {"a": "0"},
                                                      {"a": ["1"]},
                                                      known=lambda s: earlier if s == {"a": "0"} else None,
                                                      fits=lambda need: need <= 90)
    assert scored == [{"a": "1"}] and complete and best == {"a": "1"} and value == 1.0
    assert trials[0].resumed and (trials[0].val_bpb, trials[0].seconds, trials[0].views) == (2.0, 90.0, {"ngram": 2.0})
    assert not trials[1].resumed


def test_the_time_a_trial_needs_is_judged_by_warm_trials_once_there_are_any(monkeypatch):
    """The first trial a process scores pays its compiles and warm-up (95 s against ~42 s on the GPU): once a warm
    trial has run, the cold one no longer stops a search that has time for one more warm trial."""
    clock, needs = [0.0], []
    monkeypatch.setattr(tools.tune, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))

    def score(settings):
        clock[0] += 95.0 if clock[0] == 0 else 40.0
        return float(settings["a"])

    _, _, trials, complete = coordinate_search(score, {"a": "3"}, {"a": ["2", "1"]},
                                               fits=lambda need: needs.append(need) or True)
    assert needs == [95.0, 40.0] and [t.cold for t in trials] == [True, False, False] and complete
    # a resumed search: its first scored trial is cold again (a new process), the earlier one keeps its mark
    clock[0], needs[:] = 0.0, []
    earlier = Trial(None, None, {"a": "3"}, 3.0, 95.0, cold=True)
    _, _, trials, _ = coordinate_search(score, {"a": "3"}, {"a": ["2", "1", "0"]},
                                        fits=lambda need: needs.append(need) or True,
                                        known=lambda s: earlier if s == {"a": "3"} else None)
    assert needs == [95.0, 95.0, 40.0]
    assert [(t.resumed, t.cold) for t in trials] == [(True, True), (False, True), (False, False), (False, False)]


def test_a_tie_keeps_the_value_it_had():
    best, _, _, _ = coordinate_search(lambda s: 1.0, {"a": "x"}, {"a": ["y", "x", "z"]})
    assert best == {"a": "x"}


def test_the_grid_is_parsed_into_the_configs_values():
    cfg, lora = EvalConfig(), LoraConfig()
    grid = parse_grid(["LORA_LR=1e-4,0.0001,2e-4", "ngram_order=8"], cfg, lora, {"TTT_LR": ["0.001"]})
    assert grid == {"LORA_LR": ["0.0001", "0.0002"], "NGRAM_ORDER": ["8"]}  # one value per number; only these
    assert parse_grid([], cfg, lora, {"TTT_LR": ["0.001", "1e-3"]}) == {"TTT_LR": ["0.001"]}
    assert canonical(cfg, lora, "NGRAM_ORDER") == "12" and canonical(cfg, lora, "TTT_EPOCHS") == "3"
    with pytest.raises(ValueError, match="unknown setting 'TTT_LRR': did you mean TTT_LR"):
        parse_grid(["TTT_LRR=0.1"], cfg, lora, {})
    with pytest.raises(ValueError, match="expected KEY=V1,V2"):
        parse_grid(["TTT_LR"], cfg, lora, {})
    with pytest.raises(ValueError, match="NGRAM_ORDER"):
        parse_grid(["NGRAM_ORDER=0"], cfg, lora, {})


@pytest.fixture
def tune_run(scored_run, tmp_path, monkeypatch):  # noqa: F811
    """A scored run whose data holds a tuning split of short documents, and a load_tokens that refuses val."""
    monkeypatch.setattr(cli, "COMMAND_MODULES", ["tools.commands.eval"])
    run = tmp_path / "run"
    shutil.copytree(scored_run, run)
    data = Path(json.loads((run / "config.json").read_text())["train"]["data_dir"])
    rng = np.random.default_rng(3)
    docs = [np.r_[1, rng.integers(2, 64, rng.integers(20, 120))] for _ in range(30)]
    tune_path = data / "fineweb_tune_000000.bin"
    write_shard(tune_path, np.concatenate(docs).astype(np.uint16))
    record_tune_split(run, data)  # as the pipeline records it: this run trained with the split held out
    load = tools.commands.eval.load_tokens

    def no_val(pattern, vocab_size=None):
        assert "fineweb_val" not in pattern, "the tuning search read val"
        return load(pattern, vocab_size)

    monkeypatch.setattr(tools.commands.eval, "load_tokens", no_val)
    yield run
    tune_path.unlink()


def test_tune_searches_the_tuning_split_only_and_its_settings_apply(tune_run, capsys, monkeypatch):
    before = (tune_run / "eval.json").read_bytes()
    assert cli.main(["eval", str(tune_run), "--tune", "--grid", "TTT_LR=0.001,0.01", "--grid", "NGRAM_ORDER=2,3",
                     "--tune-tokens", "1500"]) == 0
    out = capsys.readouterr().out
    result = json.loads((tune_run / "tune.json").read_text())
    tokens = tools.commands.eval.load_tokens(str(next(Path(json.loads((tune_run / "config.json").read_text())["train"][
        "data_dir"]).glob("fineweb_tune_*.bin"))))[:1501]
    assert result["tune_fingerprint"] == fingerprint(tokens) and result["tune_tokens"] == 1501
    assert result["kind"] == "stream" and set(result["settings"]) == {"TTT_LR", "NGRAM_ORDER"}
    assert len(result["trials"]) == 5  # the start, then two values of each (the start's values score once)
    best = min(t["val_bpb"] for t in result["trials"])
    assert result["chosen_bpb"] == best <= result["start_bpb"]
    assert re.search(r"^\| start \| TTT_LR=0.002 NGRAM_ORDER=12 \| [\d.]+ \| \+0\.000000 \|$", out, re.M)
    assert len(re.findall(r"^tune_trial setting:\S+ value:\S+ val_bpb:[\d.]+ seconds:[\d.]+$", out, re.M)) == 5
    assert (tune_run / "eval.json").read_bytes() == before  # the run's score is untouched
    # the chosen settings apply to a later pass (a one-off beside eval.json, named by what changed)
    seen = []
    monkeypatch.setattr(tools.commands.eval, "evaluate_verified",
                        lambda model, tokens, luts, cfg, *a, **k: seen.append(cfg) or {"val_bpb": 1.0, "config": {}})
    monkeypatch.setattr(tools.commands.eval, "load_tokens", lambda pattern, vocab_size=None: np.ones(10, np.int64))
    assert cli.main(["eval", str(tune_run), "--settings", str(tune_run / "tune.json"), "TTT_LR=0.005"]) == 0
    assert seen[0].ngram_config.order == int(result["settings"]["NGRAM_ORDER"]) and seen[0].ttt_lr == 0.005


def test_tune_without_a_tuning_split_says_how_to_make_one(scored_run, tmp_path, monkeypatch, capsys):  # noqa: F811
    monkeypatch.setattr(cli, "COMMAND_MODULES", ["tools.commands.eval"])
    run = tmp_path / "run"
    shutil.copytree(scored_run, run)
    assert cli.main(["eval", str(run), "--tune"]) != 0
    err = capsys.readouterr().err
    assert "fineweb_tune_*.bin" in err and "pgolf data split" in err and not (run / "tune.json").exists()
    assert cli.main(["eval", str(run), "--grid", "TTT_LR=0.1"]) != 0
    assert "add --tune" in capsys.readouterr().err


def test_tune_refuses_a_run_that_trained_without_this_split_held_out(tune_run, capsys):
    record = tune_run / "tune_split.txt"
    data = json.loads((tune_run / "config.json").read_text())["train"]["data_dir"]
    split = tune_split_fingerprint(data)
    assert record.read_text() == f"tune_fingerprint:{split}\ndata_dir:{data}\n"
    for held_out in ("none", "0" * 64):  # trained before the split was made; beside another split
        record.write_text(f"tune_fingerprint:{held_out}\n")
        assert cli.main(["eval", str(tune_run), "--tune", "--grid", "TTT_LR=0.001"]) != 0
        err = capsys.readouterr().err
        assert str(record) in err and split[:16] in err and "pgolf data split" in err and "then train" in err
        assert not (tune_run / "tune.json").exists()
    record.unlink()  # a run with no record (a packed program's): tuned, with a warning that names the file
    assert cli.main(["eval", str(tune_run), "--tune", "--grid", "TTT_LR=0.001", "--tune-tokens", "500"]) == 0
    assert f"pgolf eval: warning: {record} is missing" in capsys.readouterr().err
    assert (tune_run / "tune.json").is_file()


def test_lora_tune_and_a_bad_settings_file(tune_run, capsys, monkeypatch):
    import eval.lora
    warm_ups, warm_up = [], eval.lora.warm_up
    monkeypatch.setattr(eval.lora, "warm_up", lambda m, settings, docs: warm_ups.append(docs) or warm_up(m, settings,
                                                                                                        docs))
    assert cli.main(["eval", str(tune_run), "--tune", "--lora-ttt", "--grid", "LORA_LR=0.0001,0.01",
                     "LORA_RANK=2", "LORA_BATCH_DOCS=4", "LORA_CHUNK=32", "LORA_CONTEXT=64"]) != 0
    assert "LORA_LATE_CHUNK=128 must be at most LORA_CONTEXT=64" in capsys.readouterr().err  # the default's 128
    warm_ups.clear()
    assert cli.main(["eval", str(tune_run), "--tune", "--lora-ttt", "--grid", "LORA_LR=0.0001,0.01",
                     "LORA_RANK=2", "LORA_BATCH_DOCS=4", "LORA_CHUNK=32", "LORA_CONTEXT=64", "LORA_LATE_CHUNK=64"]) == 0
    result = json.loads((tune_run / "tune_lora.json").read_text())
    assert result["kind"] == "lora" and len(result["trials"]) == 3
    assert warm_ups == [0, 0, 0]  # a trial reports no projection, which is all the warm-up serves
    assert "compliance" not in json.dumps({k: v for k, v in result.items() if k != "base"})  # no checks, no report
    # the stream on the same split, to read LoRA's gains against (sliding alone; the stream's whole evaluation)
    ref = result["reference"]
    assert set(ref) == {"sliding", "stream"} and ref["stream"] != ref["sliding"]
    best = next(t for t in result["trials"] if t["settings"] == result["settings"])
    assert set(best["views"]) == {"lora_ttt", "ngram"} and best["views"]["ngram"] == result["chosen_bpb"]
    out = capsys.readouterr().out
    for name, bpb in [("sliding windows", ref["sliding"]), ("the stream's evaluation", ref["stream"]),
                      ("LoRA, chosen settings: lora_ttt", best["views"]["lora_ttt"])]:
        assert f"| {name} | {bpb:.6f} | {bpb - ref['sliding']:+.6f} | {bpb - ref['stream']:+.6f} |" in out
    # resumed, every trial and the reference are taken as they were, views included (the chosen one's table rows)
    shutil.copy(tune_run / "tune_lora.json", tune_run / "earlier.json")
    assert cli.main(["eval", str(tune_run), "--tune", "--lora-ttt", "--grid", "LORA_LR=0.0001,0.01",
                     "LORA_RANK=2", "LORA_BATCH_DOCS=4", "LORA_CHUNK=32", "LORA_CONTEXT=64", "LORA_LATE_CHUNK=64",
                     "--resume", str(tune_run / "earlier.json")]) == 0
    again = json.loads((tune_run / "tune_lora.json").read_text())
    assert all(t["resumed"] for t in again["trials"]) and again["reference"] == ref
    assert [t["views"] for t in again["trials"]] == [t["views"] for t in result["trials"]]
    assert "LoRA, chosen settings: lora_ttt" in capsys.readouterr().out
    assert cli.main(["eval", str(tune_run), "--settings", str(tune_run / "tune_lora.json")]) != 0
    assert "without --lora-ttt" in capsys.readouterr().err
    (tune_run / "bad.json").write_text("{}")
    assert cli.main(["eval", str(tune_run), "--settings", str(tune_run / "bad.json")]) != 0
    assert 'not a tune.json with a "settings" object' in capsys.readouterr().err


def test_tune_writes_after_every_trial_and_a_bounded_search_says_it_was_cut_short(tune_run, capsys, monkeypatch):
    written = []
    write = tools.commands.eval.write_json_atomic
    monkeypatch.setattr(tools.commands.eval, "write_json_atomic",
                        lambda path, body: written.append(json.loads(json.dumps(body))) or write(path, body))
    args = ["eval", str(tune_run), "--tune", "--grid", "TTT_LR=0.001,0.01", "--tune-tokens", "500"]
    assert cli.main(args) == 0
    assert [len(b["trials"]) for b in written] == [1, 2, 3, 3]  # one file per trial, then the finished search
    assert [b["complete"] for b in written] == [False, False, False, True]
    written.clear()
    assert cli.main(args + ["--tune-seconds", "1e-6"]) == 0  # the start always runs; nothing after it fits
    result = json.loads((tune_run / "tune.json").read_text())
    assert not result["complete"] and len(result["trials"]) == 1 and result["settings"] == result["start"]
    assert "Cut short by --tune-seconds after 1 trials" in capsys.readouterr().out
    monkeypatch.setattr(tools.commands.eval, "evaluate_verified", lambda *a, **k: {"val_bpb": 1.0, "config": {}})
    monkeypatch.setattr(tools.commands.eval, "load_tokens", lambda pattern, vocab_size=None: np.ones(10, np.int64))
    assert cli.main(["eval", str(tune_run), "--settings", str(tune_run / "tune.json")]) == 0
    assert f"warning: {tune_run / 'tune.json'} is an unfinished search (1 trials)" in capsys.readouterr().err
    assert cli.main(["eval", str(tune_run), "--tune-seconds", "60"]) != 0
    assert "add --tune" in capsys.readouterr().err


def test_a_search_cut_short_resumes_where_it_stopped_and_refuses_another_artifacts(tune_run, capsys, monkeypatch):
    base = ["eval", str(tune_run), "--tune", "--tune-tokens", "500", "NGRAM_ORDER=3"]
    assert cli.main(base + ["--grid", "TTT_LR=0.001,0.01", "--tune-seconds", "1e-6"]) == 0  # the start only
    first = json.loads((tune_run / "tune.json").read_text())
    assert len(first["trials"]) == 1 and not first["complete"]
    assert first["artifact_sha256"] == hashlib.sha256((tune_run / "model.pgz").read_bytes()).hexdigest()
    assert first["base"]["eval"]["ngram_config"]["order"] == 3
    shutil.copy(tune_run / "tune.json", tune_run / "earlier.json")
    scored = []
    evaluate = tools.tune.evaluate
    monkeypatch.setattr(tools.tune, "evaluate", lambda model, tokens, luts, cfg, *a, **k: scored.append(cfg.ttt_lr)
                        or evaluate(model, tokens, luts, cfg, *a, **k))
    capsys.readouterr()
    # a grid that names another setting too: its start is the same trial (every setting equal), taken as it was
    assert cli.main(base + ["--grid", "TTT_LR=0.001,0.01", "--grid", "TTT_EPOCHS=2",
                            "--resume", str(tune_run / "earlier.json")]) == 0
    result = json.loads((tune_run / "tune.json").read_text())
    assert scored == [0.001, 0.01, float(result["settings"]["TTT_LR"])]  # the start was not scored again
    assert result["complete"] and len(result["trials"]) == 4 and result["start_bpb"] == first["start_bpb"]
    assert [t["resumed"] for t in result["trials"]] == [True, False, False, False]
    out = capsys.readouterr().out
    assert re.search(r"^\| start \| TTT_LR=0.002 TTT_EPOCHS=1 \(resumed\) \|", out, re.M)
    assert re.search(r"^tune_trial setting:start .* resumed:1$", out, re.M)
    # what was scored with something else is never taken: other fixed settings, another artifact, an old file
    assert cli.main(base[:-1] + ["NGRAM_ORDER=2", "--resume", str(tune_run / "earlier.json")]) != 0
    err = capsys.readouterr().err
    assert "earlier.json: its fixed settings differ in eval.ngram_config.order" in err
    other = json.loads((tune_run / "earlier.json").read_text())
    other["artifact_sha256"] = "0" * 64
    (tune_run / "other.json").write_text(json.dumps(other))
    assert cli.main(base + ["--resume", str(tune_run / "other.json")]) != 0
    assert f"its artifact_sha256 is {'0' * 64}, this search's {first['artifact_sha256']}" in capsys.readouterr().err
    other["artifact_sha256"] = first["artifact_sha256"]  # written before a setting existed: it reads as its default
    added = next(k for k, v in other["base"]["eval"].items() if k != "ngram_config" and v == getattr(EvalConfig(), k))
    del other["base"]["eval"][added]
    (tune_run / "other.json").write_text(json.dumps(other))
    assert cli.main(base + ["--grid", "TTT_LR=0.001", "--resume", str(tune_run / "other.json")]) == 0
    assert json.loads((tune_run / "tune.json").read_text())["trials"][0]["resumed"]
    other["base"]["eval"]["no_such_setting"] = 1
    (tune_run / "other.json").write_text(json.dumps(other))
    assert cli.main(base + ["--resume", str(tune_run / "other.json")]) != 0
    assert "its base settings do not fit this kit's configs" in capsys.readouterr().err
    del other["base"]
    (tune_run / "other.json").write_text(json.dumps(other))
    assert cli.main(base + ["--resume", str(tune_run / "other.json")]) != 0
    assert "written before --resume existed" in capsys.readouterr().err
    (tune_run / "other.json").write_text("[1]")
    assert cli.main(base + ["--resume", str(tune_run / "other.json")]) != 0
    assert "other.json: not a tune.json" in capsys.readouterr().err
    assert cli.main(["eval", str(tune_run), "--resume", str(tune_run / "earlier.json")]) != 0
    assert "add --tune" in capsys.readouterr().err
