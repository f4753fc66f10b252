"""tools/cli.py: the `pgolf` command's argument handling shared by every subcommand."""
from __future__ import annotations

import pytest

from tools.cli import build_parser, main, parse_args, settings_dest


def test_settings_may_follow_the_flags():
    args = parse_args(["eval", "runs/x", "--ablation", "STRIDE=128", "--seed", "3", "NGRAM_ORDER=8"])
    assert args.run_dir == "runs/x" and args.ablation and args.seed == 3
    assert args.overrides == ["STRIDE=128", "NGRAM_ORDER=8"]
    args = parse_args(["bench", "SEED=2", "--steps", "500", "TRAIN_BATCH_TOKENS=98304"])
    assert args.steps == 500 and args.overrides == ["SEED=2", "TRAIN_BATCH_TOKENS=98304"]


def test_anything_else_unrecognized_is_still_an_error(capsys):
    with pytest.raises(SystemExit):
        parse_args(["bench", "--steps", "5", "--bogus"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a command without settings takes no KEY=VALUE
        parse_args(["check", "records/x", "SEED=1"])
    assert "unrecognized arguments: SEED=1" in capsys.readouterr().err


# One command line per command that takes KEY=VALUE settings, with settings before and after its flags.
SETTINGS_AFTER_FLAGS = {
    "bench": (["bench", "SEED=2", "--steps", "5", "MAX_STEPS=9", "--top", "3", "LOG_EVERY=1"], "overrides"),
    "eval": (["eval", "runs/x", "STRIDE=128", "--no-ttt", "NGRAM_ORDER=8", "--seed", "3", "CONTEXT_LEN=512"],
             "overrides"),
    "quantize": (["quantize", "runs/x", "CALIB_SEQS=8", "--device", "cpu", "MATRIX_BITS=6", "--quiet",
                  "CALIB_SEQ_LEN=64"], "settings"),
    "seeds": (["seeds", "MAX_STEPS=5", "--seeds", "1,2", "NUM_LAYERS=2", "--out", "runs/e", "SEQ_LEN=64"],
              "overrides"),
    "train": (["train", "MAX_STEPS=5", "NUM_LAYERS=2", "SEQ_LEN=64"], "overrides"),
}


def test_every_command_with_settings_is_covered():
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "subcommand").choices
    assert {name for name in commands if settings_dest(parser, name)} == set(SETTINGS_AFTER_FLAGS)


@pytest.mark.parametrize("command", sorted(SETTINGS_AFTER_FLAGS))
def test_every_command_takes_settings_before_and_after_its_flags(command):
    argv, dest = SETTINGS_AFTER_FLAGS[command]
    args = parse_args(argv)
    assert getattr(args, dest) == [a for a in argv[1:] if "=" in a and not a.startswith("-")]


def test_quantize_takes_a_setting_after_a_flag():
    # the case the issue found: the settings' positional is called `settings` there, not `overrides`
    args = parse_args(["quantize", "runs/x", "--device", "cpu", "CALIB_SEQS=8"])
    assert args.run_dir == "runs/x" and args.device == "cpu" and args.settings == ["CALIB_SEQS=8"]


def test_a_flag_like_or_bare_extra_is_not_taken_as_a_setting(capsys):
    for argv in (["quantize", "runs/x", "--device", "cpu", "=8"], ["seeds", "--seeds", "1", "--out", "o", "-X=1"],
                 ["quantize", "runs/x", "--quiet", "runs/y"]):
        with pytest.raises(SystemExit):
            parse_args(argv)
        assert "unrecognized arguments" in capsys.readouterr().err


def test_errors_name_the_command_even_when_it_has_a_command_option(tmp_path, capsys):
    # `pgolf seeds --command` once overwrote the subcommand's name: "pgolf None: error: ..."
    code = main(["seeds", "--seeds", "1", "--out", str(tmp_path / "e"), "--command", "{python} {sed}"])
    assert code == 2 and capsys.readouterr().err.startswith("pgolf seeds: error: --command")
