"""tools/cli.py: the `pgolf` command's argument handling shared by every subcommand."""
from __future__ import annotations

import pytest

from tools.cli import parse_args


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
