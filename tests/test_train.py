"""The trainer against a golden tiny-config loss curve on the shipped sample, and the `pgolf train` command.

The golden curve (tests/golden/tiny_train_loss.json) holds the per-step train loss, the final validation losses and
the QAT start step of a 60-step CPU run of the config below on shards built from data/sample/ (fixed seed). After a
deliberate change to the model, optimizer, schedule or data loader, regenerate it and say in the commit why the
curve moved:

    PGOLF_REGEN_GOLDEN=1 .venv/bin/python -m pytest tests/test_train.py -k golden

Tolerances: the same test on torch 2.11 (CUDA build, MKL, AVX-512 CPU) against a golden from torch 2.13 (CPU build)
differed by 3.5e-6 nats per step on average (0.00011 at most) with identical final val losses; perturbing every
initial weight by 1e-6 of its mean magnitude moved the curve by 0.0003 per step on average and the val losses by
< 0.0001 (both measured with the sp1024 config this golden replaced). Regressions move (curve, final EMA val) by far
more, measured on this config: Muon at lr 0 (0.62, 0.67), shuffled windows off (0.37, 0.27), gated skips off
(0.075, 0.078), U-Net skips off (0.058, 0.0063), MuonEq-R off (0.017, 0.016), SmearGate off (0.014, 0.0096), RoPE
off (0.012, 0.0018), weight decay off (0.011, 0.015), q gain 1.5 instead of 4 (0.0078, 0.0071), no logit soft-cap
(0.0036, 0.0022), depth recurrence off (0.0025, 0.0021; looping starts after step 30), EMA off (0, 0.024). Not
caught: parallel residuals off (0.0007, 0.0004; test_model.py checks the parallel block against its formula) and
QAT off (it starts at step 54 of 60; test_model.py checks QAT itself).
"""
import argparse
import dataclasses
import json
import os
import re
import typing
from pathlib import Path

import numpy as np
import pytest
import torch

from submission.config import ModelConfig, TrainConfig
from submission.train import train
from tools.commands import cli
from tools.commands import train as train_command
from tools.data import build_shards

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests/golden/tiny_train_loss.json"
REGEN_COMMAND = "PGOLF_REGEN_GOLDEN=1 .venv/bin/python -m pytest tests/test_train.py -k golden"
DOCS = "data/sample/sample_wiki.jsonl.xz"
TOKENIZER = "data/sample/fineweb_8192_bpe.model"
VAL_DOCS = 5
# The default recipe (sp8192) at a size that trains 60 steps in seconds: every feature stays on, the loop span and
# the parallel layers scaled to 4 layers (layers 1-2 run three times once looping starts, after step 30).
MODEL = dict(num_layers=4, model_dim=64, num_heads=4, num_kv_heads=2, xsa_last_n=4, rope_dims=8, loop_layers=(1, 2),
             parallel_last_n=2)
TRAIN = dict(seed=1337, seq_len=64, train_batch_tokens=1024, micro_batch_tokens=1024, max_steps=60, warmup_steps=2,
             log_every=10)
CURVE_TOL = 0.001     # mean |train loss - golden| over all steps, nats
VAL_TOL = 0.001       # |final val loss - golden|, nats, raw and EMA weights


# ---------------------------------------------------------------------------------------------- golden loss curve

@pytest.fixture(scope="module")
def sample_shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sample_shards")
    build_shards([ROOT / DOCS], ROOT / TOKENIZER, out, val_docs=VAL_DOCS, workers=1, progress=False)
    return out


def _train_tiny(data_dir: Path, run_dir: Path) -> dict:
    """Train the golden config; return what the golden file compares, read back from train.log."""
    threads = torch.get_num_threads()
    # One thread: on the 2-core dev machine it gave bitwise the same losses as two and stayed fast while other
    # processes shared the cores (a 60-step run took 32 s with one thread, 80-150 s with two, under the same load).
    torch.set_num_threads(1)
    try:
        train(ModelConfig(**MODEL), TrainConfig(**TRAIN, data_dir=str(data_dir), tokenizer_path=str(ROOT / TOKENIZER),
                                                run_dir=str(run_dir)))
    finally:
        torch.set_num_threads(threads)
    log = (run_dir / "train.log").read_text()
    return {
        "train_loss": {m[1]: float(m[2]) for m in re.finditer(r"^step:(\d+) train_loss:(\S+)$", log, re.M)},
        "qat_step": int(re.search(r"^qat step:(\d+)", log, re.M)[1]),
        "final_raw_val_loss": float(re.search(r"^final_raw val_loss:(\S+)", log, re.M)[1]),
        "final_prequant_val_loss": float(re.search(r"^final_prequant val_loss:(\S+)", log, re.M)[1]),
    }


def _write_golden(run: dict) -> None:
    golden = {"made_by": REGEN_COMMAND, "torch": torch.__version__, "data": {"docs": DOCS, "tokenizer": TOKENIZER,
              "val_docs": VAL_DOCS}, "model": MODEL, "train": TRAIN, **run}
    GOLDEN.parent.mkdir(exist_ok=True)
    tmp = GOLDEN.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(golden, indent=1) + "\n")
    os.replace(tmp, GOLDEN)


def test_golden_loss_curve(sample_shards, tmp_path):
    run = _train_tiny(sample_shards, tmp_path / "run")
    if os.environ.get("PGOLF_REGEN_GOLDEN"):
        _write_golden(run)
    golden = json.loads(GOLDEN.read_text())
    made_with = json.loads(json.dumps((MODEL, TRAIN, VAL_DOCS)))  # as stored: tuples become lists
    assert [golden["model"], golden["train"], golden["data"]["val_docs"]] == made_with, \
        f"{GOLDEN} was made with another config; regenerate it: {REGEN_COMMAND}"
    steps = [str(s) for s in range(1, TRAIN["max_steps"] + 1)]
    assert sorted(run["train_loss"], key=int) == steps
    got = np.array([run["train_loss"][s] for s in steps])
    want = np.array([golden["train_loss"][s] for s in steps])

    # The loss really falls, golden file or not: from ln(8192) = 9.01 at step 1 to about 6.51 over the last 10.
    assert got[0] == pytest.approx(np.log(8192), abs=0.05)
    assert got[-10:].mean() < got[0] - 1.0

    windows = "  ".join(f"{a}-{a + 9}: {d:+.4f}" for a, d in zip(range(1, 61, 10), (got - want).reshape(6, 10).mean(1)))
    hint = f"(mean difference per 10 steps {windows}); if the change is intended: {REGEN_COMMAND}"
    drift = float(np.abs(got - want).mean())
    assert drift <= CURVE_TOL, f"train loss curve moved {drift:.4f} nats per step on average {hint}"
    for key in ("final_raw_val_loss", "final_prequant_val_loss"):
        assert run[key] == pytest.approx(golden[key], abs=VAL_TOL), f"{key} {run[key]} vs {golden[key]} {hint}"
    assert run["qat_step"] == golden["qat_step"], hint


# ------------------------------------------------------------------------------------------------- `pgolf train`

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pgolf")
    train_command.add_commands(parser.add_subparsers(dest="command"))
    return parser


def test_help_lists_every_config_field_with_type_and_default(capsys):
    with pytest.raises(SystemExit):
        _parser().parse_args(["train", "--help"])
    out = capsys.readouterr().out
    for kind in (ModelConfig(), TrainConfig()):
        hints = typing.get_type_hints(type(kind))
        for name, type_name in ((f.name, f.type) for f in dataclasses.fields(kind)):  # settings, not ClassVars
            value = getattr(kind, name)
            shown = {str: repr, tuple: lambda v: ",".join(map(str, v))}.get(type(value), str)(value)
            args = typing.get_args(hints[name])
            shown_type = ",".join(a.__name__ for a in args) if isinstance(value, tuple) else type_name
            assert re.search(rf"^  {name.upper()} +{re.escape(shown_type)} +{re.escape(shown)}( |$)", out, re.M), name
    assert "GQA: 2 query heads share each KV head" in out  # the field's docstring in config.py
    # a field documented by the string below it: its first sentence, on the field's line
    assert re.search(r"^  NUM_LOOPS +int +2 +Extra passes over loop_layers once looping is on", out, re.M)


def test_unknown_key_is_a_clear_error_before_training(monkeypatch, capsys):
    monkeypatch.setattr(train_command, "main", lambda argv: pytest.fail("trained despite a bad key"))
    monkeypatch.setattr(cli, "COMMAND_MODULES", ["tools.commands.train"])  # `pgolf`'s error path, without other modules
    assert cli.main(["train", "MAX_STEPS=3", "NUM_LAYER=4"]) == 2
    err = capsys.readouterr().err
    assert "unknown setting 'NUM_LAYER'" in err and "did you mean NUM_LAYERS" in err and "--help" in err
    assert cli.main(["train", "MAX_STEPS"]) == 2
    assert "expected KEY=VALUE settings, got ['MAX_STEPS']" in capsys.readouterr().err


def test_bad_value_is_rejected_before_the_run_directory_exists(tmp_path):
    args = _parser().parse_args(["train", f"RUN_DIR={tmp_path / 'run'}", "NUM_LAYERS=four"])
    with pytest.raises(ValueError, match="NUM_LAYERS='four': expected int"):
        args.func(args)
    assert not (tmp_path / "run").exists()


def test_overrides_reach_the_trainer_unchanged(monkeypatch):
    seen = []
    monkeypatch.setattr(train_command, "main", seen.append)
    monkeypatch.setattr(train_command, "record_tune_split", lambda run_dir, **kw: None)  # no run dir: nothing trained
    args = _parser().parse_args(["train", "num_layers=6", "ADAM_BETAS=0.9,0.99"])
    assert args.func(args) == 0 and seen == [["num_layers=6", "ADAM_BETAS=0.9,0.99"]]


def test_configure_cuda_turns_inductor_mix_order_reductions_off():
    """They fused the first block's backward into one 4.5 ms kernel (P1, H100): the trainer turns them off."""
    from torch._inductor import config as inductor_config

    from submission.runtime import configure_cuda
    # configure_cuda sets process-wide flags; all are restored, or later tests run SDPA's math backend on the CPU
    # instead of its flash kernel (a fresh process's logits then differed from test_quantize's in-process ones)
    backends = torch.backends.cuda
    before = (inductor_config.triton.mix_order_reduction, backends.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
              backends.cudnn_sdp_enabled(), backends.flash_sdp_enabled(), backends.mem_efficient_sdp_enabled())
    try:
        inductor_config.triton.mix_order_reduction = True
        configure_cuda()
        assert inductor_config.triton.mix_order_reduction is False
    finally:
        inductor_config.triton.mix_order_reduction, backends.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = \
            before[:3]
        backends.enable_cudnn_sdp(before[3])
        backends.enable_flash_sdp(before[4])
        backends.enable_mem_efficient_sdp(before[5])


def test_depth_recurrence_switches_on_at_its_fraction_and_the_recipe_parts_train(sample_shards, tmp_path):
    """The SP8192 generation's structure on a tiny model: layers 1-2 looped once more from half of training (step
    10 of 20), parallel residuals, gated skips, MuonEq-R. The log says when the schedule changed; the loss falls."""
    model = ModelConfig(**{**MODEL, "num_loops": 1})
    cfg = TrainConfig(**{**TRAIN, "max_steps": 20, "muon_row_normalize": True, "enable_looping_at": 0.5},
                      data_dir=str(sample_shards), tokenizer_path=str(ROOT / TOKENIZER), run_dir=str(tmp_path))
    train(model, cfg)
    log = (tmp_path / "train.log").read_text()
    assert re.search(r"^looping step:10 schedule:0,1,2,1,2,3 ", log, re.M), log
    assert "looping_starts_at_s:300" in log
    losses = [float(m[1]) for m in re.finditer(r"^step:\d+ train_loss:(\S+)$", log, re.M)]
    assert len(losses) == 20 and np.mean(losses[-5:]) < losses[0] - 0.5
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["model_config"]["num_loops"] == 1 and "skip_gates" in ckpt["ema_state_dict"]


# ------------------------------------------------------------------------------- the run directory and tokenizer

OLD_RUN = {"train.log": "seed:1\n", "config.json": "{}", "checkpoint.pt": "old", "model.pgz": "old",
           "eval.json": '{"val_bpb": 1.2}', "eval_ttt-0_hash_embed-0.json": "{}"}


def _old_run(run_dir: Path) -> None:
    run_dir.mkdir(parents=True)
    for name, text in OLD_RUN.items():
        (run_dir / name).write_text(text)
    (run_dir / "console.log").write_text("pgolf seeds writes this before the trainer starts\n")


def _no_work(monkeypatch) -> None:
    """Building the model or reading data fails the test: the run directory is checked before both."""
    import submission.train as trainer

    def work(*args, **kwargs):
        raise RuntimeError("work started")
    monkeypatch.setattr(trainer, "GPT", work)
    monkeypatch.setattr(trainer, "load_tokens", work)


def test_a_finished_run_directory_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    from tools import pipeline

    run_dir = tmp_path / "run"
    _old_run(run_dir)
    _no_work(monkeypatch)
    monkeypatch.delenv("OVERWRITE", raising=False)
    monkeypatch.setattr(cli, "COMMAND_MODULES", ["tools.commands.train"])
    settings = [f"RUN_DIR={run_dir}", f"TOKENIZER_PATH={ROOT / TOKENIZER}", "DATA_DIR=nowhere"]
    assert cli.main(["train", *settings]) == 2
    err = capsys.readouterr().err
    assert err == (f"pgolf train: error: RUN_DIR={run_dir} holds a run (checkpoint.pt, config.json, eval.json, "
                   "eval_ttt-0_hash_embed-0.json, model.pgz, train.log): pass a new RUN_DIR, or OVERWRITE=1 (`pgolf "
                   "train --overwrite`) to delete that run and train in its place\n")
    with pytest.raises(ValueError, match=r"holds a run .*OVERWRITE=1"):  # the pipeline entry: the same refusal
        pipeline.main(settings)
    assert {p.name: p.read_text() for p in run_dir.iterdir() if p.name != "console.log"} == OLD_RUN


@pytest.mark.parametrize("how", ["flag", "setting", "env"])
def test_overwrite_deletes_the_old_run_before_training_in_its_place(tmp_path, monkeypatch, how):
    run_dir = tmp_path / "run"
    _old_run(run_dir)
    _no_work(monkeypatch)
    monkeypatch.delenv("OVERWRITE", raising=False)
    argv = ["train", f"RUN_DIR={run_dir}", f"TOKENIZER_PATH={ROOT / TOKENIZER}", "DATA_DIR=nowhere"]
    if how == "flag":
        argv.append("--overwrite")
    elif how == "setting":
        argv.append("OVERWRITE=1")
    else:
        monkeypatch.setenv("OVERWRITE", "1")
    monkeypatch.setattr(cli, "COMMAND_MODULES", ["tools.commands.train"])
    assert cli.main(argv) == 2  # stopped at the model build by _no_work: after the run directory was claimed
    # no stale artifact or score beside the new run's files; `pgolf seeds`' console.log is kept
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.json", "console.log", "train.log"]
    assert "seed:1\n" not in (run_dir / "train.log").read_text()
    assert "overwrite" not in json.loads((run_dir / "config.json").read_text())["train"]  # no config field


def test_an_unwritable_run_dir_is_one_line_before_any_work(tmp_path, monkeypatch, capsys):
    (tmp_path / "file").write_text("")
    _no_work(monkeypatch)
    monkeypatch.setattr(cli, "COMMAND_MODULES", ["tools.commands.train"])
    run_dir = tmp_path / "file" / "run"
    assert cli.main(["train", f"RUN_DIR={run_dir}", f"TOKENIZER_PATH={ROOT / TOKENIZER}"]) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(rf"pgolf train: error: RUN_DIR {run_dir}/train.log: cannot write it \([^)]+\); pass a "
                        r"writable RUN_DIR\n", err), err


def test_the_run_records_its_tokenizer(sample_shards, tmp_path):
    """checkpoint.pt, config.json and train.log name the tokenizer: path, sha256 of its bytes, piece count."""
    import hashlib

    run_dir = tmp_path / "run"
    train(ModelConfig(**MODEL), TrainConfig(**{**TRAIN, "max_steps": 2, "warmup_steps": 0}, data_dir=str(sample_shards),
                                            tokenizer_path=str(ROOT / TOKENIZER), run_dir=str(run_dir)))
    identity = {"path": str(ROOT / TOKENIZER), "sha256": hashlib.sha256((ROOT / TOKENIZER).read_bytes()).hexdigest(),
                "pieces": 8192}
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["tokenizer"] == identity
    assert json.loads((run_dir / "config.json").read_text())["tokenizer"] == identity
    assert f"tokenizer path:{identity['path']} sha256:{identity['sha256']} pieces:8192\n" in \
        (run_dir / "train.log").read_text()


def test_overwrite_flag_reaches_the_trainer_as_a_setting_and_the_run_records_its_tune_split(monkeypatch, tmp_path):
    seen, run = [], tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"train": {"data_dir": str(tmp_path / "data")}}))
    monkeypatch.setattr(train_command, "main", lambda argv: seen.append(argv) or run)
    args = _parser().parse_args(["train", "SEED=2", "--overwrite"])
    assert args.func(args) == 0 and seen == [["SEED=2", "OVERWRITE=1"]]
    # what `pgolf eval --tune` checks: the data held no tuning split when this run trained
    assert (run / "tune_split.txt").read_text() == f"tune_fingerprint:none\ndata_dir:{tmp_path / 'data'}\n"

    # a split made while the run trains was not held out of what it read: the record keeps the split at its start
    from submission.data import write_shard

    def trains_while_split_is_made(argv):
        write_shard(tmp_path / "data" / "fineweb_tune_000000.bin", np.r_[1, 5, 6, 7].astype(np.uint16))
        return run

    (tmp_path / "data").mkdir()
    monkeypatch.setattr(train_command, "main", trains_while_split_is_made)
    args = _parser().parse_args(["train", f"DATA_DIR={tmp_path / 'data'}", "--overwrite"])
    assert args.func(args) == 0
    assert (run / "tune_split.txt").read_text() == f"tune_fingerprint:none\ndata_dir:{tmp_path / 'data'}\n"


def test_a_folder_given_as_the_tokenizer_is_named_as_such(tmp_path):
    from submission.runtime import read_tokenizer
    with pytest.raises(FileNotFoundError, match=r": a folder, expected a SentencePiece .model file"):
        read_tokenizer(str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"missing.model: not found, expected a SentencePiece"):
        read_tokenizer(str(tmp_path / "missing.model"))
