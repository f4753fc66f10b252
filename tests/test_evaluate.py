"""tools.commands.eval (`pgolf eval`): the tokenizer check, one-off passes written beside the run's score, output paths
checked before the evaluation, and the artifact's config against the run's."""
from __future__ import annotations

import json
import re
import shutil
from dataclasses import asdict
from pathlib import Path

import pytest

import tools.commands.eval
from eval.run import EvalConfig
from submission.config import to_dict
from submission.runtime import tokenizer_identity
from tests.test_quantize import MODEL, QUANT, TINY_CALIB, TOKENIZER, Lines, make_run, other_tokenizer
from tools.commands import cli
from tools.pack.artifact import MODEL_FILENAME
from tools.quant.quantize import quantize_run

# The run's recorded eval settings: the recipe's passes at a size that scores 2,944 tokens in seconds on a CPU.
CHEAP = EvalConfig(context_len=128, stride=64, batch_windows=8, chunk_tokens=1024, ttt_epochs=1, ttt_batch_seqs=8,
                   hash_buckets=64, compliance_chunks=1, compliance_chunk_tokens=512)
RUN_SCORE = {"seed": 1337, "val_loss": 6.5, "val_bpb": 3.25, "config": asdict(CHEAP)}


@pytest.fixture(scope="module")
def scored_run(tmp_path_factory) -> Path:
    """A run directory as the pipeline leaves it: checkpoint, train.log, config.json, model.pgz and eval.json."""
    run, train_cfg = make_run(tmp_path_factory.mktemp("scored"))
    quantize_run(run, 0, QUANT, TINY_CALIB, Lines(), train_cfg, progress=False)
    (run / "config.json").write_text(json.dumps({"model": to_dict(MODEL), "train": to_dict(train_cfg)}))
    (run / "eval.json").write_text(json.dumps(RUN_SCORE))
    return run


@pytest.fixture
def run(scored_run, tmp_path, monkeypatch) -> Path:
    monkeypatch.setattr(cli, "COMMAND_MODULES", ["tools.commands.eval"])
    copy = tmp_path / "run"
    shutil.copytree(scored_run, copy)
    return copy


@pytest.fixture
def fake_eval(monkeypatch) -> list[EvalConfig]:
    """evaluate_verified replaced by a stub that records its config: for what happens around the evaluation."""
    seen = []

    def evaluate_verified(model, val_tokens, luts, cfg, rank, world_size, progress=True, log=None):
        seen.append(cfg)
        return {"val_loss": 7.0, "val_bpb": 3.5, "stages": {}, "config": asdict(cfg)}
    monkeypatch.setattr(tools.commands.eval, "evaluate_verified", evaluate_verified)
    return seen


def test_a_one_off_pass_is_written_beside_the_run_and_changes_neither_its_score_nor_its_settings(run, capsys):
    before = (run / "eval.json").read_bytes()
    assert cli.main(["eval", str(run), "--no-ttt"]) == 0
    out = capsys.readouterr().out
    one_off = run / "eval_ttt-0_hash_embed-0.json"
    assert f"eval_one_off differs:ttt-0,hash_embed-0 path:{one_off}" in out
    assert (run / "eval.json").read_bytes() == before
    result = json.loads(one_off.read_text())
    assert result["config"] == {**asdict(CHEAP), "ttt": False, "hash_embed": False}
    assert all(check["passed"] for check in result["compliance"].values())
    assert result["tokenizer"] == tokenizer_identity(str(TOKENIZER))  # eval.json names the tokenizer used
    # the next plain pass starts from the run's settings again (TTT on) and is the run's score
    assert cli.main(["eval", str(run)]) == 0
    rescored = json.loads((run / "eval.json").read_text())
    assert rescored["config"] == asdict(CHEAP) and rescored["val_bpb"] != RUN_SCORE["val_bpb"]


@pytest.mark.parametrize("argv, name", [(["STRIDE=32"], "eval_stride-32.json"),
                                        (["--ablation"], "eval_ablation-1.json"),
                                        (["NGRAM_ORDER=3", "TTT_LR=0.01"], "eval_ngram_order-3_ttt_lr-0.01.json")])
def test_every_setting_that_differs_from_the_runs_is_a_one_off(run, fake_eval, argv, name):
    before = (run / "eval.json").read_bytes()
    assert cli.main(["eval", str(run), *argv]) == 0
    assert (run / "eval.json").read_bytes() == before and (run / name).is_file()
    # a setting equal to the run's is no one-off: the pass is the run's own
    assert cli.main(["eval", str(run), f"STRIDE={CHEAP.stride}"]) == 0
    assert json.loads((run / "eval.json").read_text())["val_bpb"] == 3.5


def test_out_names_where_a_one_off_goes(run, fake_eval, tmp_path):
    assert cli.main(["eval", str(run), "--no-ttt", "--out", str(tmp_path / "new" / "no_ttt.json")]) == 0
    assert json.loads((tmp_path / "new" / "no_ttt.json").read_text())["config"]["ttt"] is False


def test_another_tokenizer_is_refused_unless_asked_for(run, fake_eval, tmp_path, capsys):
    other = other_tokenizer(tmp_path / "other.model")
    used, recorded = tokenizer_identity(str(other)), tokenizer_identity(str(TOKENIZER))
    before = sorted(p.name for p in run.iterdir())
    assert cli.main(["eval", str(run), "--tokenizer", str(other)]) == 2
    err = capsys.readouterr().err
    assert err == (f"pgolf eval: error: tokenizer {other} (sha256 {used['sha256'][:16]}, 1024 pieces) is not the one "
                   f"{run / MODEL_FILENAME} was made with: {TOKENIZER} (sha256 {recorded['sha256'][:16]}, 1024 "
                   "pieces); pass that tokenizer (TOKENIZER_PATH, --tokenizer), or --allow-other-tokenizer to use "
                   "this one on purpose\n")
    assert sorted(p.name for p in run.iterdir()) == before and not fake_eval
    # on purpose: scored, as a one-off beside the run's score, naming the tokenizer it used
    assert cli.main(["eval", str(run), "--tokenizer", str(other), "--allow-other-tokenizer"]) == 0
    result = json.loads((run / f"eval_tokenizer-{used['sha256'][:8]}.json").read_text())
    assert result["tokenizer"] == used
    assert json.loads((run / "eval.json").read_text()) == RUN_SCORE


def test_an_artifact_without_a_tokenizer_identity_is_scored_and_said_unchecked(tmp_path, fake_eval, monkeypatch,
                                                                                capsys):
    monkeypatch.setattr(cli, "COMMAND_MODULES", ["tools.commands.eval"])
    old, train_cfg = make_run(tmp_path, tokenizer=False)
    quantize_run(old, 0, QUANT, TINY_CALIB, Lines(), train_cfg, progress=False)
    capsys.readouterr()
    assert cli.main(["eval", str(old), "--data-dir", train_cfg.data_dir, "--tokenizer", str(TOKENIZER)]) == 0
    assert f"tokenizer_unchecked source:{old / MODEL_FILENAME}\n" in capsys.readouterr().out


def test_output_paths_are_checked_before_the_evaluation(run, fake_eval, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert cli.main(["eval", str(run), "--out", str(tmp_path / "file" / "eval.json")]) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(rf"pgolf eval: error: --out {tmp_path}/file/eval.json: cannot write it \([^)]+\); pass a "
                        r"writable --out\n", err), err
    assert cli.main(["eval", str(run), "--out", str(tmp_path)]) == 2
    assert f"--out {tmp_path} is a folder: pass a file path" in capsys.readouterr().err
    assert not fake_eval  # refused before any evaluation
    # a missing folder is made before the evaluation, not found missing after it
    assert cli.main(["eval", str(run), "--out", str(tmp_path / "a" / "b" / "eval.json")]) == 0
    assert json.loads((tmp_path / "a" / "b" / "eval.json").read_text())["val_bpb"] == 3.5


def test_an_artifact_from_another_run_is_scored_with_a_warning_naming_the_keys(run, fake_eval, capsys):
    config = json.loads((run / "config.json").read_text())
    config["model"].update(num_layers=3, model_dim=96)
    (run / "config.json").write_text(json.dumps(config))
    assert cli.main(["eval", str(run)]) == 0
    err = capsys.readouterr().err
    assert err == (f"pgolf eval: warning: {run / MODEL_FILENAME}'s model config differs from {run / 'config.json'} "
                   "in num_layers (2 vs 3), model_dim (64 vs 96): scoring the artifact's own config (is model.pgz "
                   "from another run?)\n")


def test_a_file_given_as_the_run_directory_is_named_as_such(tmp_path, capsys):
    from tools.commands.cli import main
    file = tmp_path / "model.pgz"
    file.write_bytes(b"x")
    assert main(["eval", str(file)]) != 0
    err = capsys.readouterr().err.strip()
    assert "run directory" in err and "model.pgz is a file, expected a folder" in err and "\n" not in err


def test_lora_ttt_is_a_verified_one_off_beside_the_run(run, capsys):
    """`pgolf eval RUN --lora-ttt`: the per-document LoRA pass on the real artifact, C1-C4 checked (C3 in any
    order), written beside eval.json, whose score stays; LORA_ settings name the file and need the flag."""
    before = (run / "eval.json").read_bytes()
    assert cli.main(["eval", str(run), "LORA_RANK=2", "LORA_BATCH_DOCS=4", "LORA_CHUNK=64", "LORA_CONTEXT=128",
                     "LORA_LR=0.01", "LORA_COMPLIANCE_TOKENS=256", "--lora-ttt"]) == 0
    out = capsys.readouterr().out
    assert "eval_one_off differs:lora-ttt,lora_rank-2,lora_batch_docs-4," in out  # a long list: a hashed name
    path = Path(re.search(r"^eval_written path:(\S+)$", out, re.M)[1])
    assert path.parent == run and path.name != "eval.json"
    assert (run / "eval.json").read_bytes() == before
    result = json.loads(path.read_text())
    assert {k: v["passed"] for k, v in result["compliance"].items()} == {"C1": True, "C2": True, "C3": True,
                                                                            "C4": True}
    assert result["tokens"] == 23 * 128 and result["config"]["lora"]["rank"] == 2
    assert re.search(r"^eval_lora_ttt_exact val_loss:\S+ val_bpb:\S+$", out, re.M)
    assert re.search(r"^eval_ngram_exact val_loss:\S+ val_bpb:\S+$", out, re.M)  # the n-gram on top: the score
    # the score is the blend (here one document, so the n-gram has counted nothing before scoring it)
    assert result["val_bpb"] == result["views"]["ngram"]["val_bpb"] and set(result["views"]) == {"ngram", "lora_ttt"}
    assert result["config"]["ngram"]["order"] == 12
    assert result["projection"]["gpus"] == 8
    assert cli.main(["eval", str(run), "LORA_RANK=2"]) != 0
    assert "LORA_ settings (lora_rank) without --lora-ttt" in capsys.readouterr().err
    assert cli.main(["eval", str(run), "LORA_RANKK=2", "--lora-ttt"]) != 0
    assert "unknown setting 'LORA_RANKK': did you mean LORA_RANK" in capsys.readouterr().err


def test_a_projection_over_the_limit_is_written_and_warned_about_with_the_settings_that_shorten_it(
        run, capsys, monkeypatch):
    """The score still goes to its file and the exit status stays 0 (a projection is an estimate), but stderr names
    the projected seconds, the limit and the pass's own settings that cut its time; nothing is said under it."""
    def evaluate(projection):
        return lambda *a, **kw: {"val_loss": 7.0, "val_bpb": 3.5, "stages": {}, "projection": projection}
    over = {"seconds": 682.3, "over_limit": True, "stages": {"warmup": 13.9, "adapt": 631.4}}
    monkeypatch.setattr(tools.commands.eval, "evaluate_lora", evaluate(over))
    assert cli.main(["eval", str(run), "LORA_LAST_N=6", "--lora-ttt"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(Path(re.search(r"^eval_written path:(\S+)$", out, re.M)[1]).read_text())["val_bpb"] == 3.5
    assert "projection of this pass is 682.3 s (warmup 13.9 s, adapt 631.4 s), over the evaluation's 600 s" in err
    assert "fewer adapted blocks (LORA_LAST_N, now 6)" in err and "LORA_LATE_CHUNK, now 128" in err
    assert cli.main(["eval", str(run), "LORA_LAST_N=0", "--lora-ttt"]) == 0
    assert "adapters on the last blocks only (LORA_LAST_N, now 0: every block)" in capsys.readouterr().err
    monkeypatch.setattr(tools.commands.eval, "evaluate_verified", evaluate({"seconds": 640.0, "over_limit": True}))
    assert cli.main(["eval", str(run), "TTT_EPOCHS=2"]) == 0
    err = capsys.readouterr().err
    assert "projection of this pass is 640.0 s, over" in err and "TTT_EPOCHS, now 2" in err and "STRIDE, now 64" in err
    monkeypatch.setattr(tools.commands.eval, "evaluate_verified", evaluate({"seconds": 540.0, "over_limit": False}))
    assert cli.main(["eval", str(run)]) == 0
    assert "projection" not in capsys.readouterr().err
