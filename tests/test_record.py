"""`pgolf record` (tools/records/record.py) and its plots (tools/records/plots.py) on synthetic run directories of
the contract."""
import argparse
import ast
import importlib.metadata
import json
import math
import os
import signal
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as scipy_stats

from tools.commands.record import add_commands
from tools.pack.bundle import pack
from tools.records import record
from tools.records.check import check_record
from tools.records.results import load_record, train_loss_curve

TOKENS, BYTES = 30_000, 72_000          # scored tokens and bytes of the synthetic eval
STEPS = 60
PROGRAM = """import numpy as np
import torch
from sentencepiece import SentencePieceProcessor
import json, os
try:
    from flash_attn_interface import flash_attn_func
except ImportError:
    flash_attn_func = None
print(np.zeros(3), torch.__version__, SentencePieceProcessor, json, os, flash_attn_func)
"""


def packed_code(tmp_path: Path) -> tuple[Path, bytes]:
    """A `pgolf pack` output folder: a real self-extracting train_gpt.py and its sha256 listing."""
    pack_dir = tmp_path / "pack"
    pack_dir.mkdir(exist_ok=True)
    text, _ = pack(PROGRAM)
    (pack_dir / "train_gpt.py").write_bytes(text)
    (pack_dir / "train_gpt.py.sha256").write_text("source_sha256:" + "ab" * 32 + "\nmodule:submission/train_gpt.py\n")
    return pack_dir, text


def make_run(root: Path, seed: int, val_loss: float, code_bytes: int, model_bytes: int = 40_000,
             compliance_ok: bool = True) -> Path:
    """A run directory as the pipeline writes it: train.log (kit Logger lines), eval.json, model.pgz."""
    run_dir = root / f"seed{seed}"
    run_dir.mkdir(parents=True)
    val_bpb = val_loss / math.log(2) * TOKENS / BYTES
    total = code_bytes + model_bytes
    rng = np.random.default_rng(seed)
    losses = 6.9 * np.exp(-np.arange(1, STEPS + 1) / 20) + 3.0 + 0.05 * rng.standard_normal(STEPS)
    lines = [f"seed:{seed}",
             f"run run_dir:{run_dir} world_size:1 device:cpu grad_accum:1 python:3.11.9 torch:2.13.0+cpu "
             "numpy:2.1.0 code_hash:0123456789abcdef",
             "override setting:num_layers:11->4(cli)", "override setting:model_dim:512->128(cli)",
             f"override setting:seed:1337->{seed}(cli)", f"override setting:run_dir:->{run_dir}(cli)",
             "override setting:adam_betas:(0.9,0.95)->(0.8,0.9)(cli)", "override setting:max_steps:20000->60(env)",
             "model params:1221011 flops_per_token:7311360"]
    for step, loss in enumerate(losses, start=1):
        lines.append(f"step:{step} train_loss:{loss:.5f}")
        if step % 20 == 0:
            lines.append(f"step:{step} train_time_s:{step * 0.5:.2f} step_avg_ms:500.0 tokens_per_s:8192 mfu:0")
    lines += [f"training_done steps:{STEPS} train_time_s:30.0 step_avg_ms:500.0 data_reads_after_cap:0",
              f"final_prequant val_loss:{val_loss - 0.01:.6f} val_bpb:{val_bpb - 0.006:.6f} steps:{STEPS}",
              f"quantized_roundtrip_exact val_loss:{val_loss + 0.02:.8f} val_bpb:{val_bpb + 0.01:.8f}",
              f"Code size: {code_bytes} bytes", f"Total submission size: {total} bytes",
              f"eval_sliding_exact val_loss:{val_loss + 0.01:.8f} val_bpb:{val_bpb + 0.005:.8f}",
              f"final_eval_exact val_loss:{val_loss:.8f} val_bpb:{val_bpb:.8f}"]
    (run_dir / "train.log").write_text("\n".join(lines) + "\n")
    compliance = {c: {"passed": True, "detail": f"{c} ok on 2 chunks"} for c in ("C1", "C2", "C3", "C4")}
    if not compliance_ok:
        compliance["C3"] = {"passed": False, "detail": "update at chunk 1 read tokens 64..127 before their scores"}
    (run_dir / "eval.json").write_text(json.dumps({
        "seed": seed, "val_loss": val_loss, "val_bpb": val_bpb, "tokens": TOKENS, "bytes": BYTES, "steps": STEPS,
        "step_avg_ms": 500.0, "bytes_total": total, "bytes_code": code_bytes, "bytes_model": model_bytes,
        "stages": {"sliding": 12.5, "ttt": 30.25}, "compliance": compliance,
        "ablation": [{"name": "flat", "val_loss": val_loss + 0.03, "val_bpb": val_bpb + 0.02, "seconds": 3.0}],
        "projection": {"full_val_tokens": 62021632, "gpus": 8, "seconds": 321.0, "over_limit": False},
        "config": {"stride": 64}}))
    (run_dir / "model.pgz").write_bytes(rng.bytes(model_bytes))
    return run_dir


def config(tmp_path: Path, runs, **kwargs) -> record.RecordConfig:
    return record.RecordConfig(**{"run_dirs": runs, "name": "Tiny Demo + TTT", "track": "non_record_16mb",
                                  "author": "Ada Lovelace", "github_id": "ada", "out": tmp_path / "records",
                                  "date": "2026-05-01", **kwargs})


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


SEEDS = {1337: 3.50, 42: 3.51, 2025: 3.49}


@pytest.fixture
def three_seeds(tmp_path):
    pack_dir, code = packed_code(tmp_path)
    runs = [make_run(tmp_path / "runs", seed, loss, len(code)) for seed, loss in SEEDS.items()]
    return pack_dir, code, runs


def test_record_folder_has_every_file_and_passes_the_check(tmp_path, three_seeds):
    pack_dir, code, runs = three_seeds
    folder, report = record.write_record(config(tmp_path, [tmp_path / "runs"], pack_dir=pack_dir))
    assert folder == tmp_path / "records" / "track_non_record_16mb" / "2026-05-01_Tiny_Demo_TTT"
    assert sorted(p.name for p in folder.iterdir()) == sorted([
        "README.md", "submission.json", "requirements.txt", "train_gpt.py", "train_gpt.py.sha256",
        "train_seed42.log", "train_seed1337.log", "train_seed2025.log", "loss_curves.png", "val_bpb_by_seed.png"])
    assert report.problems == [] and check_record(folder).problems == []
    assert not list(folder.parent.glob(".record-*"))  # the staging folder is gone
    assert (folder / "train_gpt.py").read_bytes() == code
    assert (folder / "train_seed42.log").read_bytes() == (runs[1] / "train.log").read_bytes()

    data = json.loads((folder / "submission.json").read_text())
    losses = np.array([SEEDS[s] for s in sorted(SEEDS)])
    bpbs = losses / math.log(2) * TOKENS / BYTES
    assert data["seeds"] == [42, 1337, 2025] and data["track"] == "non_record_16mb"
    assert data["val_loss"] == pytest.approx(losses.mean(), abs=1e-8)
    assert data["val_bpb"] == pytest.approx(bpbs.mean(), abs=1e-8)
    assert data["val_bpb_std"] == pytest.approx(bpbs.std(ddof=1), abs=1e-8)
    assert data["bytes_code"] == len(code) and data["bytes_total"] == len(code) + 40_000
    assert data["seed_results"]["2025"] == {"val_loss": 3.49, "val_bpb": pytest.approx(bpbs[2], abs=1e-8),
                                            "artifact_bytes": len(code) + 40_000, "steps": 60, "step_avg_ms": 500.0}
    assert data["compliance"] == {"C1": True, "C2": True, "C3": True, "C4": True}
    assert data["pytorch_version"] == "2.13.0+cpu" and data["hardware"] == "1x cpu"
    assert data["code_source_sha256"] == "ab" * 32
    assert "3-seed mean val_bpb" in data["blurb"] and "significance" not in data

    requirements = (folder / "requirements.txt").read_text().splitlines()
    assert [r.split("==")[0] for r in requirements if not r.startswith("#")] == ["numpy", "sentencepiece", "torch"]
    # versions the runs logged (numpy 2.1.0, torch 2.13.0+cpu), else the installed ones
    assert "numpy==2.1.0" in requirements and "torch==2.13.0" in requirements
    assert f"sentencepiece=={importlib.metadata.version('sentencepiece')}" in requirements
    assert requirements[-1] == "# optional, used when installed: flash_attn_interface"

    text = (folder / "README.md").read_text()
    assert f"| 2025 | 3.49000000 | {bpbs[2]:.8f} | 60 | 500.00 | {len(code) + 40_000:,} |" in text
    assert "| 42 | passed | passed | passed | passed |" in text
    assert "for seed in 42 1337 2025; do" in text
    assert "python train_gpt.py SEED=$seed RUN_DIR=runs/seed$seed NUM_LAYERS=4 MODEL_DIM=128 ADAM_BETAS=0.8,0.9 " \
           "MAX_STEPS=60" in text
    assert "pgolf seeds --seeds 42,1337,2025 --out runs/Tiny_Demo_TTT NUM_LAYERS=4" in text
    assert "No reference record was given" in text and "| 42 | flat |" in text

    # readable plots: the loss curves hold every step of every seed, in a figure of the size set in plots.py
    assert png_size(folder / "loss_curves.png") == (1320, 912)  # 3 seeds: a third panel, each seed against the rest
    assert png_size(folder / "val_bpb_by_seed.png") == (840, 504)
    assert [s for s, _ in train_loss_curve((folder / "train_seed42.log").read_text().splitlines())] == \
        list(range(1, STEPS + 1))


def test_significance_against_a_kit_record_folder(tmp_path, three_seeds):
    pack_dir, code, _ = three_seeds
    reference_losses = {1: 3.530, 2: 3.532, 3: 3.527}
    ref_runs = [make_run(tmp_path / "ref_runs", s, v, len(code)) for s, v in reference_losses.items()]
    ref_folder, _ = record.write_record(config(tmp_path, ref_runs, pack_dir=pack_dir, name="Reference",
                                               out=tmp_path / "ref_records"))
    reference = load_record(ref_folder)  # the kit's own folders are records like any other
    assert [r.metric_key for r in reference.results] == ["final_eval_exact"] * 3

    folder, _ = record.write_record(config(tmp_path, [tmp_path / "runs"], pack_dir=pack_dir,
                                           reference=ref_folder, blurb="Smaller and better."))
    sig = json.loads((folder / "submission.json").read_text())["significance"]
    losses = [SEEDS[s] for s in sorted(SEEDS)]
    ref = list(reference_losses.values())
    expected = scipy_stats.ttest_1samp(losses, np.mean(ref) - 0.005, alternative="less")
    assert sig["rule_test_metric"] == "val_loss" and sig["rule_test_df"] == 2
    assert sig["rule_test_t"] == pytest.approx(expected.statistic, abs=1e-4)
    assert sig["rule_test_p"] == pytest.approx(expected.pvalue)
    assert sig["rule_test_significant"] == (expected.pvalue < 0.01)
    assert sig["delta_val_loss"] == pytest.approx(np.mean(losses) - np.mean(ref), abs=1e-8)
    to_bpb = TOKENS / BYTES / math.log(2)
    welch = scipy_stats.ttest_ind([v * to_bpb for v in losses], [v * to_bpb for v in ref], equal_var=False)
    assert sig["welch_bpb_t"] == pytest.approx(welch.statistic, abs=1e-4)
    text = (folder / "README.md").read_text()
    assert "Against `2026-05-01_Reference`" in text and "rule_test_t:" in text


def test_existing_folder_needs_overwrite(tmp_path, three_seeds, capsys):
    pack_dir, _, runs = three_seeds
    folder, _ = record.write_record(config(tmp_path, runs, pack_dir=pack_dir))
    (folder / "notes.txt").write_text("by hand")
    (folder / "extra").mkdir()
    (folder / "extra" / "ablation.md").write_text("by hand")
    with pytest.raises(ValueError, match="exists .*--overwrite"):
        record.write_record(config(tmp_path, runs, pack_dir=pack_dir))
    assert (folder / "notes.txt").exists()
    capsys.readouterr()
    folder, _ = record.write_record(config(tmp_path, runs, pack_dir=pack_dir, overwrite=True))
    assert not (folder / "notes.txt").exists() and (folder / "submission.json").exists()
    assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name]
    # the hand-added files are named as they go; the files the record writes again are not
    assert capsys.readouterr().out.splitlines() == [
        f"overwrite: removing {folder / 'extra' / 'ablation.md'} (not in the new record)",
        f"overwrite: removing {folder / 'notes.txt'} (not in the new record)"]


@pytest.fixture
def sigterm_recorded():
    """A SIGTERM handler that only counts (as the default action would kill pytest), restored afterwards."""
    received = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    yield received
    signal.signal(signal.SIGTERM, previous)


def test_sigterm_while_writing_leaves_no_partial_folder(tmp_path, three_seeds, monkeypatch, sigterm_recorded):
    pack_dir, _, runs = three_seeds
    outer = signal.getsignal(signal.SIGTERM)
    plot = record.plot_seed_bpb

    def terminated_while_plotting(*args, **kwargs):
        plot(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)  # as `kill PID` or a scheduler's timeout would

    monkeypatch.setattr(record, "plot_seed_bpb", terminated_while_plotting)
    with pytest.raises(SystemExit) as stopped:
        record.write_record(config(tmp_path, runs, pack_dir=pack_dir))
    assert stopped.value.code == 128 + signal.SIGTERM
    assert list((tmp_path / "records" / "track_non_record_16mb").iterdir()) == []  # no .record-XXXX left
    assert signal.getsignal(signal.SIGTERM) is outer and sigterm_recorded == []  # the previous handler is back


def test_sigterm_between_the_renames_of_overwrite_keeps_the_old_folder(tmp_path, three_seeds, monkeypatch,
                                                                       sigterm_recorded):
    pack_dir, _, runs = three_seeds
    folder, _ = record.write_record(config(tmp_path, runs, pack_dir=pack_dir))
    (folder / "notes.txt").write_text("by hand")
    rename = Path.rename

    def terminated_after_moving_the_old_folder_away(self, target):
        moved = rename(self, target)
        if Path(target).name == "replaced":
            os.kill(os.getpid(), signal.SIGTERM)
        return moved

    monkeypatch.setattr(Path, "rename", terminated_after_moving_the_old_folder_away)
    with pytest.raises(SystemExit):
        record.write_record(config(tmp_path, runs, pack_dir=pack_dir, overwrite=True))
    assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name]
    assert (folder / "notes.txt").read_text() == "by hand" and (folder / "submission.json").is_file()


def test_generated_files_have_the_mode_of_normal_files(tmp_path, three_seeds):
    pack_dir, _, runs = three_seeds
    umask = os.umask(0o022)
    try:
        folder, _ = record.write_record(config(tmp_path, runs, pack_dir=pack_dir))
    finally:
        os.umask(umask)
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in folder.iterdir()}
    assert set(modes.values()) == {"0o644"}, modes  # the plots were 0o600 (mkstemp)
    assert oct(folder.stat().st_mode & 0o777) == "0o755"


def test_a_folder_that_fails_the_check_is_not_written(tmp_path):
    pack_dir, code = packed_code(tmp_path)
    # 16,000,000 model bytes + the code: over the decimal cap (a sparse file: nothing is really written)
    runs = [make_run(tmp_path / "runs", s, v, len(code)) for s, v in SEEDS.items()]
    with open(runs[0] / "model.pgz", "r+b") as f:
        f.truncate(16_000_000)
    with pytest.raises(RuntimeError, match=r"bytes_total 16,0\d\d,\d\d\d bytes is over the cap of 16,000,000"):
        record.write_record(config(tmp_path, runs, pack_dir=pack_dir))
    assert list((tmp_path / "records" / "track_non_record_16mb").iterdir()) == []


def test_a_seed_that_broke_a_compliance_condition_is_refused(tmp_path):
    pack_dir, code = packed_code(tmp_path)
    runs = [make_run(tmp_path / "runs", s, v, len(code), compliance_ok=s != 42) for s, v in SEEDS.items()]
    with pytest.raises(RuntimeError, match=r"compliance C3 is false"):
        record.write_record(config(tmp_path, runs, pack_dir=pack_dir))


def test_inputs_are_checked_before_anything_is_written(tmp_path, three_seeds):
    pack_dir, _, runs = three_seeds
    (runs[0] / "train.log").unlink()
    with pytest.raises(FileNotFoundError, match=r"seed1337/train\.log: missing"):
        record.write_record(config(tmp_path, runs, pack_dir=pack_dir))
    with pytest.raises(FileNotFoundError, match=r"no eval\.json here or in its subfolders"):
        record.write_record(config(tmp_path, [tmp_path / "pack"], pack_dir=pack_dir))
    with pytest.raises(FileNotFoundError, match=r"nowhere/train_gpt\.py: missing \(run `pgolf pack"):
        record.write_record(config(tmp_path, runs[1:], pack_dir=tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="--track 'fast'"):
        record.write_record(config(tmp_path, runs[1:], pack_dir=pack_dir, track="fast"))
    assert not (tmp_path / "records").exists()


def test_without_a_pack_dir_the_kit_entry_is_bundled(tmp_path, monkeypatch):
    kit = tmp_path / "kit"
    (kit / "submission").mkdir(parents=True)
    (kit / "submission" / "__init__.py").write_text("")
    (kit / "submission" / "helper.py").write_text('"""A helper."""\nimport numpy\n\ndef f():\n    return 1\n')
    (kit / "submission" / "train_gpt.py").write_text("from submission.helper import f\nprint(f())\n")
    monkeypatch.setattr(record, "ROOT", kit)
    monkeypatch.setattr(record, "ENTRY", kit / "submission" / "train_gpt.py")
    runs = [make_run(tmp_path / "runs", s, v, 1000) for s, v in SEEDS.items()]
    folder, report = record.write_record(config(tmp_path, runs))
    code = (folder / "train_gpt.py").read_bytes()
    data = json.loads((folder / "submission.json").read_text())
    assert data["bytes_code"] == len(code) and "module:submission/helper.py" in \
        (folder / "train_gpt.py.sha256").read_text()
    # the logs say Code size: 1000 bytes, the shipped file differs: a warning per log, not an error
    assert report.errors == [] and len(report.warnings) == 3
    assert [r for r in (folder / "requirements.txt").read_text().splitlines() if not r.startswith("#")] == \
        ["numpy==2.1.0"]


def test_cli(tmp_path, three_seeds, capsys):
    pack_dir, _, _ = three_seeds
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers())
    args = parser.parse_args(["record", str(tmp_path / "runs"), "--name", "Tiny", "--track", "10min_16mb",
                              "--author", "A", "--github-id", "a", "--pack-dir", str(pack_dir), "--out",
                              str(tmp_path / "out"), "--date", "2026-05-02"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "check:ok mode:full errors:0 warnings:0" in out
    assert f"record:{tmp_path / 'out' / 'track_10min_16mb' / '2026-05-02_Tiny'}" in out


def test_import_scan_for_unparsable_programs_agrees_with_the_parser():
    """A program packed by Python 3.12 (same-quote nested f-strings) does not parse on 3.11: the line scan must give
    the same (required, optional) split as the AST walk does on programs that parse."""
    from tools.pack.ship import bundle_entry
    from tools.records.record import _scan_imports, imported_modules
    small = ("import os, sys as S\nfrom torch import nn\nimport numpy.linalg\ndef f():\n try:\n"
             "  from flash_attn_interface import flash_attn_func\n except ImportError:\n  flash_attn_func = None\n"
             " try:\n  import brotli\n except OSError:\n  pass\ntry:\n import zstd\nexcept (ImportError, OSError):\n"
             " zstd = None\nimport lzma\n")
    assert imported_modules(small) == ({"os", "sys", "torch", "numpy", "brotli", "lzma"},
                                       {"flash_attn_interface", "zstd"})
    assert _scan_imports(small) == imported_modules(small)
    program = bundle_entry().readable_source
    assert _scan_imports(program) == imported_modules(program)
    newer = small + "x = f'{', '.join(a)}' if 0 else 1\n"  # 3.12 syntax
    if sys.version_info < (3, 12):
        with pytest.raises(SyntaxError):
            ast.parse(newer)
    assert imported_modules(newer) == imported_modules(small)


def test_a_packed_run_verified_by_pgolf_eval_says_where_its_checks_ran(tmp_path, three_seeds):
    from tools.commands.eval import merge_verification
    pack_dir, _, runs = three_seeds
    for run in runs:  # as the packed program writes eval.json, then `pgolf eval RUN_DIR` merges its verification
        kit = json.loads((run / "eval.json").read_text())
        packed = {k: v for k, v in kit.items() if k != "compliance"} | {"compliance_not_run": "pgolf eval"}
        merged = merge_verification(packed, {**kit, "val_bpb": kit["val_bpb"] + 1e-5})
        (run / "eval.json").write_text(json.dumps(merged))
    folder, report = record.write_record(config(tmp_path, [tmp_path / "runs"], pack_dir=pack_dir))
    assert report.problems == []
    text = (folder / "README.md").read_text()
    assert "`pgolf eval RUN_DIR` re-evaluated each seed's model.pgz" in text
    bpb42 = json.loads((runs[1] / "eval.json").read_text())["val_bpb"]
    assert f"seed 42 {bpb42 + 1e-5:.8f} vs {bpb42:.8f}" in text
    assert json.loads((folder / "submission.json").read_text())["compliance"] == {f"C{i}": True for i in range(1, 5)}


def test_a_file_given_as_a_run_is_named_as_such(tmp_path):
    from tools.records.record import collect_runs
    file = tmp_path / "eval.json"
    file.write_text("{}")
    with pytest.raises(NotADirectoryError, match="eval.json is a file, expected a run directory"):
        collect_runs([file])
