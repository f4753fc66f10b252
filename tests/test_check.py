"""Record-folder validation and `pgolf check` (tools/check.py) on the real records and broken copies of them."""
import argparse
import json
from pathlib import Path

import pytest

from tools import check

RECORDS = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "records"
REC_0323 = RECORDS / "2026-03-23_LeakyReLU_LegalTTT_ParallelMuon"
REC_0325 = RECORDS / "2026-03-25_ValCalib_GPTQ_XSA_BigramHash3072"
REC_0405 = RECORDS / "2026-04-05_SP8192_GPTQ-Embeddings_SDClip_Loop45x2"
ALL_RECORDS = [REC_0323, REC_0325, REC_0405]
needs_records = pytest.mark.skipif(not RECORDS.is_dir(), reason=f"fixture records not found at {RECORDS}")


def copy_record(src: Path, tmp_path: Path) -> Path:
    """A writable copy (the fixtures are read-only, and copytree would keep that)."""
    folder = tmp_path / src.name
    folder.mkdir(parents=True)
    for path in src.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    return folder


def edit_submission(folder: Path, **changes) -> None:
    data = json.loads((folder / "submission.json").read_text())
    data.update(changes)
    (folder / "submission.json").write_text(json.dumps(data, indent=2))


def errors(report) -> list[tuple[str, str]]:
    return [(p.file, p.message) for p in report.errors]


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    parser = argparse.ArgumentParser()
    check.add_commands(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.func(args), capsys.readouterr().out


@needs_records
@pytest.mark.parametrize("folder", ALL_RECORDS, ids=lambda p: p.name[:10])
def test_fixtures_pass_results_only_and_miss_only_readme_and_script(folder):
    report = check.check_record(folder, results_only=True)
    assert report.errors == [], [str(p) for p in report.errors]
    assert len(report.results) in (3, 5)
    full = check.check_record(folder)
    assert errors(full) == [("README.md", "missing"), ("train_gpt.py", "missing")]


@needs_records
def test_cli_exit_codes_and_output(capsys):
    code, out = run_cli(["check", str(REC_0323)], capsys)
    assert code == 1 and "error: README.md: missing" in out and "check:failed mode:full errors:2" in out
    # 2026-03-23 states no val_loss: a warning that gives the value to add, not a failure
    code, out = run_cli(["check", str(REC_0323), "--results-only"], capsys)
    assert code == 0 and "add val_loss: 1.89002068" in out and "check:ok mode:results-only errors:0" in out


@needs_records
def test_removed_log_fails(tmp_path):
    folder = copy_record(REC_0325, tmp_path)
    (folder / "train_seed42.log").unlink()
    found = errors(check.check_record(folder, results_only=True))
    assert ("submission.json", "seed 42 is listed in seeds but has no train log") in found
    assert ("submission.json", "seed_results['42'] has no train log") in found
    # without a seeds list (2026-03-23), the stated mean no longer matches the remaining logs
    folder = copy_record(REC_0323, tmp_path / "b")
    (folder / "train_seed2025.log").unlink()
    found = errors(check.check_record(folder, results_only=True))
    assert found == [("submission.json", "val_bpb is 1.1194 but the mean of the 2 logs' legal_ttt_exact gives "
                                         f"{(1.12002032 + 1.11922988) / 2:.8f}")]


@needs_records
@pytest.mark.parametrize("total, mib_hint", [(16_000_001, True), (16_777_216, True), (16_777_217, False)])
def test_bytes_total_over_the_decimal_cap(tmp_path, total, mib_hint):
    folder = copy_record(REC_0325, tmp_path)
    edit_submission(folder, bytes_total=total)
    report = check.check_record(folder, results_only=True)
    (problem,) = report.errors
    assert problem.file == "submission.json"
    assert problem.message.startswith(f"bytes_total {total:,} bytes is over the cap of 16,000,000 decimal bytes")
    assert ("16 MiB = 16,777,216" in problem.message) == mib_hint
    assert f"by at least {total - 16_000_000:,} bytes" in problem.fix


@needs_records
def test_bytes_total_at_the_cap_passes(tmp_path):
    folder = copy_record(REC_0325, tmp_path)
    edit_submission(folder, bytes_total=16_000_000)
    assert check.check_record(folder, results_only=True).errors == []


@needs_records
def test_malformed_log_fails(tmp_path):
    folder = copy_record(REC_0325, tmp_path)
    log = folder / "train_seed999.log"
    log.write_text(log.read_text().replace("val_bpb:1.11475014", "val_bpb:1.1147S014"))
    found = errors(check.check_record(folder, results_only=True))
    assert ("train_seed999.log", "line 84: final_int6_sliding_window_exact val_bpb '1.1147S014' is not a positive "
                                 "number") in found
    # a log cut off before its final evaluation
    log.write_text("".join(log.read_text().splitlines(keepends=True)[:70]))
    found = errors(check.check_record(folder, results_only=True))
    assert ("train_seed999.log", "no final metric line") in found


@needs_records
def test_seed_results_must_match_the_logs(tmp_path):
    folder = copy_record(REC_0325, tmp_path)
    seed_results = json.loads((folder / "submission.json").read_text())["seed_results"]
    seed_results["314"]["val_bpb"] = 1.1130
    seed_results["999"]["artifact_bytes"] = 15_876_000
    edit_submission(folder, seed_results=seed_results)
    assert errors(check.check_record(folder, results_only=True)) == [
        ("submission.json", "seed_results['314'].val_bpb is 1.113 but train_seed314.log gives 1.11508120"),
        ("submission.json", "seed_results['999'].artifact_bytes is 15876000 but train_seed999.log says 15876310")]


@needs_records
def test_field_types(tmp_path):
    folder = copy_record(REC_0405, tmp_path)
    data = json.loads((folder / "submission.json").read_text())
    del data["author"]
    data.update(val_bpb="1.08563", bytes_total=15985678.0, date="05/04/2026")
    (folder / "submission.json").write_text(json.dumps(data))
    assert sorted(errors(check.check_record(folder, results_only=True))) == [
        ("submission.json", "bytes_total is 15985678.0"),
        ("submission.json", "date '05/04/2026' is not YYYY-MM-DD"),
        ("submission.json", "required field author is missing"),
        ("submission.json", "val_bpb is '1.08563'")]


@needs_records
def test_full_check_with_readme_and_script(tmp_path):
    folder = copy_record(REC_0405, tmp_path)  # states bytes_code 15516, and its logs say Code size: 15516 bytes
    (folder / "README.md").write_text("# SP8192 record\n")
    (folder / "train_gpt.py").write_bytes(b"#" * 15516)
    report = check.check_record(folder)
    assert report.problems == []
    (folder / "train_gpt.py").write_bytes(b"#" * 15600)
    report = check.check_record(folder)
    assert errors(report) == [("submission.json", "bytes_code is 15516 but train_gpt.py is 15600 bytes")]
    assert len(report.warnings) == 5  # one per log: the shipped script is not the one that produced it
    folder = copy_record(REC_0325, tmp_path / "b")  # states no bytes_code
    (folder / "README.md").write_text("# record\n")
    (folder / "train_gpt.py").write_bytes(b"#" * 100)
    (problem,) = check.check_record(folder).errors
    assert problem.message == "bytes_code is missing" and "bytes_code: 100" in problem.fix


def kit_folder(tmp_path: Path, model_bytes: int = 50_000) -> Path:
    """A record folder in the layout `pgolf record` writes, from kit train logs (key:value lines, final_eval_exact
    last), written by hand so the check is tested independently of the writer."""
    folder = tmp_path / "2026-05-01_Kit"
    folder.mkdir()
    code = "print('the packed pipeline')\n"
    (folder / "train_gpt.py").write_text(code)
    (folder / "README.md").write_text("# Kit\n")
    seeds = {1337: (2.40112233, 1.38912345), 42: (2.40223344, 1.38977777), 2025: (2.40001122, 1.38848484)}
    for seed, (loss, bpb) in seeds.items():
        (folder / f"train_seed{seed}.log").write_text("\n".join([
            f"seed:{seed}", "run run_dir:runs/x world_size:1 device:cpu torch:2.13.0",
            "step:1 train_loss:6.93", "step:2 train_loss:6.5",
            "training_done steps:2 train_time_s:1.0 step_avg_ms:500.0 data_reads_after_cap:0",
            f"final_prequant val_loss:{loss - 0.01:.6f} val_bpb:{bpb - 0.005:.6f}",
            f"quantized_roundtrip_exact val_loss:{loss + 0.01:.8f} val_bpb:{bpb + 0.005:.8f}",
            f"Code size: {len(code)} bytes", f"Total submission size: {len(code) + model_bytes} bytes",
            f"final_eval_exact val_loss:{loss:.8f} val_bpb:{bpb:.8f}"]) + "\n")
    (folder / "submission.json").write_text(json.dumps({
        "author": "A", "github_id": "a", "name": "Kit", "blurb": "b", "date": "2026-05-01",
        "val_loss": sum(v[0] for v in seeds.values()) / 3, "val_bpb": sum(v[1] for v in seeds.values()) / 3,
        "seeds": list(seeds), "bytes_total": len(code) + model_bytes, "bytes_code": len(code),
        "seed_results": {str(s): {"val_loss": v[0], "val_bpb": v[1], "artifact_bytes": len(code) + model_bytes,
                                  "steps": 2, "step_avg_ms": 500.0} for s, v in seeds.items()},
        "compliance": {"C1": True, "C2": True, "C3": True, "C4": True}}))
    return folder


def test_kit_folder_passes_and_is_scored_by_final_eval_exact(tmp_path):
    report = check.check_record(kit_folder(tmp_path))
    assert report.problems == [], [str(p) for p in report.problems]
    assert {r.metric_key for r in report.results} == {"final_eval_exact"}
    assert [r.val_bpb for r in report.results] == [1.38977777, 1.38912345, 1.38848484]


def test_kit_folder_with_a_missing_log_fails(tmp_path):
    folder = kit_folder(tmp_path)
    (folder / "train_seed42.log").unlink()
    found = errors(check.check_record(folder))
    assert ("submission.json", "seed 42 is listed in seeds but has no train log") in found
    assert ("submission.json", "seed_results['42'] has no train log") in found


def test_kit_folder_over_the_cap_fails(tmp_path):
    folder = kit_folder(tmp_path, model_bytes=16_000_000 - 29 + 1)  # code is 29 bytes: one byte over
    found = errors(check.check_record(folder))
    assert ("submission.json", "bytes_total 16,000,001 bytes is over the cap of 16,000,000 decimal bytes (it fits "
            "16 MiB = 16,777,216: the cap is 16,000,000, not 16*1024*1024 - a size check computed in MiB passes "
            "it)") in found
    assert len([f for f in found if f[0].startswith("train_seed")]) == 3  # each log's Total submission size too


def test_a_stated_compliance_failure_fails(tmp_path):
    folder = kit_folder(tmp_path)
    edit_submission(folder, compliance={"C1": True, "C2": True, "C3": False, "C4": True})
    (problem,) = check.check_record(folder).errors
    assert problem.message.startswith("compliance C3 is false")
    # free-text notes (as hand-written records have) are not judged
    edit_submission(folder, compliance="score-first TTT; n-gram normalized over the vocabulary")
    assert check.check_record(folder).errors == []
