"""tools/commands/cli.py: the `pgolf` command's argument handling shared by every subcommand."""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest

from tools.commands.cli import build_parser, main, parse_args, settings_dest


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


# should a check regress, the bench runs one step of a tiny model instead of the recipe's 40
TINY_BENCH = ["--steps", "1", "--warmup", "0", "--profile-steps", "0", "NUM_LAYERS=2", "MODEL_DIM=64", "NUM_HEADS=2",
              "NUM_KV_HEADS=1", "XSA_LAST_N=2", "ROPE_DIMS=8", "BIGRAM_BUCKETS=64", "BIGRAM_DIM=16",
              "VALUE_EMBED_DIM=16", "SEQ_LEN=64", "TRAIN_BATCH_TOKENS=128", "MICRO_BATCH_TOKENS=128"]


def path_cases(tmp: Path) -> list[tuple[list[str], str]]:
    """(command line, the one error line it must give) for a file where a folder is expected and the reverse, and
    an output file whose folder is missing (checked before the work)."""
    a_file, a_folder = tmp / "notes.txt", tmp / "folder"
    a_file.write_text("x")
    a_folder.mkdir()
    run = tmp / "run"  # model.pgz is a folder here; the packed program is a file
    (run / "model.pgz").mkdir(parents=True)
    (run / "train_gpt.py").write_text("x")
    packed = tmp / "packed"  # a model file, so that pack reaches its --out check
    packed.mkdir()
    (packed / "model.pgz").write_bytes(b"x")
    return [
        (["size", str(a_file)], f"pgolf size: error: artifact dir {a_file} is a file, expected a folder (expected "),
        (["size", str(run)], f"pgolf size: error: model artifact {run / 'model.pgz'} is a folder, expected a file"),
        (["pack", str(a_file), "--out", str(tmp / "o")],
         f"pgolf pack: error: run directory {a_file} is a file, expected a folder"),
        (["pack", str(run), "--out", str(tmp / "o")],
         f"pgolf pack: error: {run / 'model.pgz'} is a folder, expected a file (run `pgolf quantize {run}` first)"),
        (["pack", str(packed), "--out", str(a_file)],
         f"pgolf pack: error: --out {a_file} is a file, expected a folder"),
        (["quantize", str(a_file), "--device", "cpu"],
         f"pgolf quantize: error: run directory {a_file} is a file, expected a folder"),
        (["stats", str(a_folder), "--record", str(a_file)],
         f"pgolf stats: error: --record {a_file} is a file, expected a folder"),
        (["ablation", str(a_folder), "--plot", str(a_folder)],
         f"pgolf ablation: --plot {a_folder} is a folder, expected a file"),
        (["bench", "--against", str(a_folder), *TINY_BENCH],
         f"pgolf bench: error: argument --against: {a_folder} is a folder, expected a file"),
        (["bench", "--curve-out", str(a_folder), *TINY_BENCH],
         f"pgolf bench: error: argument --curve-out: {a_folder} is a folder, expected a file"),
        (["bench", "--trace", str(tmp / "missing" / "t.json.gz"), *TINY_BENCH],
         f"pgolf bench: error: argument --trace: {tmp / 'missing' / 't.json.gz'}: its folder {tmp / 'missing'} not "
         "found"),
        (["seeds", "--seeds", "1", "--out", str(a_file), "--command", "{python} -c pass"],
         f"pgolf seeds: error: --out {a_file} is a file, expected a folder"),
    ]


@pytest.mark.parametrize("case", range(12))
def test_a_path_of_the_wrong_kind_is_named_as_such_not_as_missing(tmp_path, capsys, case):
    argv, line = path_cases(tmp_path)[case]
    try:
        code = main(argv)
    except SystemExit as exit:  # argparse's usage errors and `pgolf ablation` end this way
        code = exit.code if isinstance(exit.code, int) else print(exit.code, file=sys.stderr) or 2
    err = capsys.readouterr().err
    assert code == 2 and line in err, (argv, err)
    assert ("not found" not in err or "its folder" in line) and "Traceback" not in err


def test_every_path_case_is_run(tmp_path):
    assert len(path_cases(tmp_path)) == 12


def test_an_os_error_is_one_line_naming_the_file(monkeypatch, capsys):
    def denied(args):
        raise PermissionError(13, "Permission denied", "runs/x/eval.json")
    monkeypatch.setattr("tools.commands.size._cmd_size", denied)
    assert main(["size", "runs/x"]) == 2
    assert capsys.readouterr().err == "pgolf size: error: [Errno 13] Permission denied: 'runs/x/eval.json'\n"


def test_every_setting_has_one_field_docstring():
    """Settings are documented one way, a docstring right below the field, which `--help` lists (issue: three
    styles had grown)."""
    import inspect
    import textwrap

    from eval.lora import LoraConfig
    from eval.ngram import NgramConfig
    from eval.run import EvalConfig
    from submission.config import ModelConfig, TrainConfig
    from tools.quant.calibrate import CalibConfig
    from tools.quant.gptq import QuantConfig
    from tools.commands.train import field_docs
    for kind in (ModelConfig, TrainConfig, QuantConfig, CalibConfig, EvalConfig, NgramConfig, LoraConfig):
        docs = field_docs(kind)
        assert [f.name for f in dataclasses.fields(kind) if not docs.get(f.name)] == [], kind.__name__
        source = textwrap.dedent(inspect.getsource(kind))
        fields = {f.name for f in dataclasses.fields(kind)}
        trailing = [line for line in source.splitlines() if ":" in line and "#" in line
                    and line.split(":")[0].strip() in fields]
        assert trailing == [], f"{kind.__name__}: a comment beside a field instead of its docstring: {trailing}"


@pytest.mark.parametrize("fails", [False, True])
def test_a_command_leaves_no_process_group_behind(monkeypatch, fails):
    """What a command's setup_distributed started is destroyed when the command ends, done or failed: a gloo rank
    left to the interpreter's shutdown aborted at exit under torchrun, failing a finished `pgolf eval`."""
    import torch.distributed as dist
    from tools.commands import cli

    def command(args):
        dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
        if fails:
            raise ValueError("a kit error")
        return 0

    args = parse_args(["check", "records/x"])
    args.func = command
    monkeypatch.setattr(cli, "parse_args", lambda argv=None: args)
    assert main([]) == (2 if fails else 0)
    assert not dist.is_initialized()


def test_a_named_command_imports_its_own_module_alone(tmp_path):
    """`pgolf ablation ...` builds the ablation command alone, so a records-only command never imports torch; no
    command, or one that is not a module's, still gets the whole parser (the usage error lists every command)."""
    import subprocess
    code = ("import sys\nfrom tools.commands import cli\ntry:\n    cli.main(sys.argv[1:])\nfinally:\n"
            "    print('torch' in sys.modules, 'tools.commands.train' in sys.modules)")
    repo = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, "-c", code, "ablation", str(tmp_path)], cwd=repo, capture_output=True,
                         text=True)
    assert run.stdout.split() == ["False", "False"] and str(tmp_path) in run.stderr  # its own error, no torch
    def commands(parser):
        return set(next(a for a in parser._actions if a.dest == "subcommand").choices)
    assert commands(build_parser("ablation")) == {"ablation"}
    assert commands(build_parser("no-such-command")) == commands(build_parser()) > {"ablation", "quantize"}
    run = subprocess.run([sys.executable, "-m", "tools.commands.cli", "no-such-command"], cwd=repo,
                         capture_output=True, text=True)
    assert run.returncode == 2 and "choose from" in run.stderr and "quantize" in run.stderr
