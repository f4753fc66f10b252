"""Record-folder validation and `pgolf check` (tools/records/check.py) on the real records and broken copies of them."""
import argparse
import json
from pathlib import Path

import pytest

from tools.commands.check import add_commands
from tools.records import check

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
    add_commands(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.func(args), capsys.readouterr().out


# What the merged records lack of the fields the rules require (2026-03-23 has neither val_loss nor bytes_code)
MISSING_REQUIRED = {REC_0323: ["val_loss", "bytes_code"], REC_0325: ["bytes_code"], REC_0405: []}


@needs_records
@pytest.mark.parametrize("folder", ALL_RECORDS, ids=lambda p: p.name[:10])
def test_fixtures_fail_only_for_what_the_rules_require(folder):
    missing = [("submission.json", f"required field {name} is missing") for name in MISSING_REQUIRED[folder]]
    report = check.check_record(folder, results_only=True)  # results-only does not ask for bytes_code
    assert errors(report) == [m for m in missing if "bytes_code" not in m[1]]
    assert report.warnings == []
    assert len(report.results) in (3, 5)
    full = check.check_record(folder)
    assert errors(full) == [("README.md", "missing"), ("train_gpt.py", "missing"), *missing]
    # no model.pgz in a challenge folder: bytes_total is checked against the logs, and the report says so
    assert any(note.startswith("submission.json: bytes_total is not recounted from files") and
               "checked against the logs' Total submission size" in note for note in full.unchecked)


@needs_records
def test_cli_exit_codes_and_output(capsys):
    code, out = run_cli(["check", str(REC_0405)], capsys)
    assert code == 1 and "error: README.md: missing; fix: add README.md" in out
    assert "check:failed mode:full errors:2" in out
    assert "unchecked: submission.json: bytes_total is not recounted from files (model.pgz is not in the folder)" \
        in out
    # 2026-03-23 states no val_loss, which the rules require: an error that gives the value to add, in one line
    code, out = run_cli(["check", str(REC_0323), "--results-only"], capsys)
    assert code == 1 and "check:failed mode:results-only errors:1" in out
    assert "error: submission.json: required field val_loss is missing; fix: add val_loss: 1.89002068 (the mean " \
           "of the 3 logs' legal_ttt_exact)\n" in out
    code, out = run_cli(["check", str(REC_0325), "--results-only"], capsys)
    assert code == 0 and "check:ok mode:results-only errors:0 warnings:0" in out


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
    assert ("submission.json", "val_bpb is 1.1194 but the mean of the 2 logs' legal_ttt_exact gives "
                               f"{(1.12002032 + 1.11922988) / 2:.8f}") in found


@needs_records
@pytest.mark.parametrize("total, mib_hint", [(16_000_001, True), (16_777_216, True), (16_777_217, False)])
def test_bytes_total_over_the_decimal_cap(tmp_path, total, mib_hint):
    folder = copy_record(REC_0325, tmp_path)
    edit_submission(folder, bytes_total=total)
    report = check.check_record(folder, results_only=True)
    over, disagrees = report.errors
    assert over.file == "submission.json"
    assert over.message.startswith(f"bytes_total {total:,} bytes is over the cap of 16,000,000 decimal bytes")
    assert ("16 MiB = 16,777,216" in over.message) == mib_hint
    assert f"by at least {total - 16_000_000:,} bytes" in over.fix
    # and the logs do not say so either
    assert disagrees.message == (f"bytes_total is {total:,} but the logs' Total submission size is "
                                 "15,863,278..15,984,850 bytes")


def test_bytes_total_at_the_cap_passes(tmp_path):
    folder = kit_folder(tmp_path, model_bytes=16_000_000 - 29)  # code is 29 bytes
    data = json.loads((folder / "submission.json").read_text())
    assert data["bytes_total"] == 16_000_000
    assert check.check_record(folder).errors == []


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
    (folder / "train_gpt.py").write_bytes(b"#" * 101850)  # the logs' Code size
    (problem,) = check.check_record(folder).errors
    assert problem.message == "required field bytes_code is missing"
    assert problem.fix == "add bytes_code: 101850 (size of train_gpt.py)"


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


# --- byte counts: checked against the files and the logs, never trusted ---------------------------------------------

def drop_size_lines(folder: Path) -> None:
    """Logs without `Code size` / `Total submission size` lines (scripts that do not print them)."""
    for log in folder.glob("*.log"):
        log.write_text("".join(line for line in log.read_text().splitlines(keepends=True)
                               if not line.startswith(("Code size", "Total submission size"))))


def test_bytes_total_is_checked_against_the_logs(tmp_path):
    folder = kit_folder(tmp_path)
    edit_submission(folder, bytes_total=123)
    assert errors(check.check_record(folder)) == [
        ("submission.json", "bytes_total is 123 but the logs' Total submission size is 50,029 bytes")]
    (problem,) = check.check_record(folder).errors
    assert problem.fix == "set bytes_total to 50029 (the largest seed's)"
    # shipped code other than the logs' (a warning per log): the total counts the logs' models with the shipped code
    (folder / "train_gpt.py").write_text("#" * 1029)
    edit_submission(folder, bytes_code=1029, bytes_total=50_029)
    report = check.check_record(folder)
    assert errors(report) == [("submission.json", "bytes_total is 50,029 but the logs' model bytes (Total submission "
                                                  "size - Code size) + the code's 1,029 is 51,029 bytes")]
    assert len(report.warnings) == 3
    edit_submission(folder, bytes_total=51_029)
    assert check.check_record(folder).errors == []


@needs_records
def test_bytes_total_123_in_a_challenge_record_fails(tmp_path):
    folder = copy_record(REC_0405, tmp_path)  # states the mean of its seeds' totals: within their range, passes
    assert check.check_record(folder, results_only=True).errors == []
    edit_submission(folder, bytes_total=123)
    assert errors(check.check_record(folder, results_only=True)) == [
        ("submission.json", "bytes_total is 123 but the logs' Total submission size is 15,983,318..15,988,983 bytes")]


def test_bytes_total_without_size_lines_is_checked_against_seed_results_then_the_code(tmp_path):
    folder = kit_folder(tmp_path)
    drop_size_lines(folder)
    edit_submission(folder, bytes_total=123)
    assert errors(check.check_record(folder)) == [
        ("submission.json", "bytes_total is 123 but seed_results' artifact_bytes is 50,029 bytes")]
    # nothing states a per-seed total: bytes_total must at least exceed the code it counts
    (folder / "train_gpt.py").write_text("#" * 1000)
    edit_submission(folder, bytes_code=1000, seed_results={})
    report = check.check_record(folder)
    assert errors(report) == [("submission.json", "bytes_total is 123 but the code alone is 1,000 bytes (bytes_total "
                                                  "counts code + compressed model)")]
    assert report.unchecked == ["submission.json: bytes_total is not recounted from files (model.pgz is not in the "
                                "folder); no log states a Total submission size either"]


def test_bytes_total_against_a_shipped_model(tmp_path):
    folder = kit_folder(tmp_path)  # code 29 + model 50,000 bytes
    (folder / "model.pgz").write_bytes(b"\0" * 50_000)
    report = check.check_record(folder)
    assert report.problems == [] and report.unchecked == []
    (folder / "model.pgz").write_bytes(b"\0" * 50_100)
    assert errors(check.check_record(folder)) == [
        ("submission.json", "bytes_total is 50,029 but train_gpt.py (29) + model.pgz (50,100) = 50,129 bytes")]
    # the shipped code and model over the cap, whatever submission.json and the logs say
    with open(folder / "model.pgz", "r+b") as f:
        f.truncate(16_000_000)  # sparse: nothing is really written
    found = errors(check.check_record(folder))
    assert ("model.pgz", "train_gpt.py (29) + model.pgz (16,000,000) = 16,000,029 bytes is over the cap of "
            "16,000,000 decimal bytes (it fits 16 MiB = 16,777,216: the cap is 16,000,000, not 16*1024*1024 - a size "
            "check computed in MiB passes it)") in found


def test_code_alone_over_the_cap_fails(tmp_path):
    folder = kit_folder(tmp_path)
    with open(folder / "train_gpt.py", "r+b") as f:
        f.truncate(16_000_001)
    edit_submission(folder, bytes_code=16_000_001)
    report = check.check_record(folder)
    assert ("train_gpt.py", "train_gpt.py alone 16,000,001 bytes is over the cap of 16,000,000 decimal bytes (it fits "
            "16 MiB = 16,777,216: the cap is 16,000,000, not 16*1024*1024 - a size check computed in MiB passes "
            "it)") in errors(report)
    assert "shrink the code by at least 1 bytes" in str(report.errors[0])
    # without the file (--results-only), the stated bytes_code is held to the cap
    found = errors(check.check_record(folder, results_only=True))
    assert any(f == "submission.json" and m.startswith("bytes_code alone 16,000,001 bytes is over the cap")
               for f, m in found)


@needs_records
def test_bytes_code_without_the_script_is_checked_against_the_logs(tmp_path):
    folder = copy_record(REC_0405, tmp_path)  # logs: Code size: 15516 bytes
    edit_submission(folder, bytes_code=15000)
    assert errors(check.check_record(folder, results_only=True)) == [
        ("submission.json", "bytes_code is 15000 but the logs' Code size is 15,516 bytes")]


# --- the schema: errors for what the rules require or what is provably wrong, warnings for the rest -------------------

@pytest.mark.parametrize("name", ["author", "github_id", "name", "blurb", "date", "val_loss", "val_bpb",
                                  "bytes_total", "bytes_code"])
def test_every_field_the_rules_require_is_an_error(tmp_path, name):
    folder = kit_folder(tmp_path)
    data = json.loads((folder / "submission.json").read_text())
    stated = data.pop(name)
    (folder / "submission.json").write_text(json.dumps(data))
    report = check.check_record(folder)
    assert ("submission.json", f"required field {name} is missing") in errors(report)
    if name in ("val_loss", "val_bpb", "bytes_total", "bytes_code"):  # the fix gives the value the folder implies
        problem = next(p for p in report.errors if p.message == f"required field {name} is missing")
        assert problem.fix.startswith(f"add {name}: ")
        assert float(problem.fix.split()[2]) == pytest.approx(stated, abs=1e-8)


def test_usual_fields_are_warnings_that_say_why(tmp_path):
    folder = kit_folder(tmp_path)
    data = json.loads((folder / "submission.json").read_text())
    del data["seed_results"]["1337"]["val_loss"]
    data["seed_results"]["42"] = "see the log"
    del data["seed_results"]["2025"]
    data["seed_results"]["first"] = {}
    data.update(hardware=8, val_bpb_std="small", track=["10min_16mb"])
    (folder / "submission.json").write_text(json.dumps(data))
    report = check.check_record(folder)
    assert report.errors == [], [str(p) for p in report.errors]
    warnings = {p.message: p.fix for p in report.warnings}
    assert warnings == {
        "track is ['10min_16mb'] (it says which leaderboard the record competes on)": "make it a non-empty string",
        "val_bpb_std is 'small' (reviewers read the seed-to-seed spread from it)": "make it a number",
        "hardware is 8 (the time caps are defined on 8xH100 SXM)": "make it a non-empty string",
        "seed_results['1337'].val_loss is missing (reviewers compare each seed's stated values with its log)":
            "add val_loss: 2.40112233 from train_seed1337.log",
        "seed_results['42'] is 'see the log' (reviewers compare each seed's stated values with its log)":
            "make it an object with val_loss and val_bpb",
        "seed_results['first']: key is not a seed, so the entry cannot be matched with a log":
            "key seed_results by the seed number",
        "seed 2025 has no entry in submission.json seed_results (reviewers compare each seed's stated values with its "
        "log)": "add its val_loss, val_bpb, artifact_bytes and steps, or remove the log"}
    # what the logs contradict stays an error
    data["seed_results"]["1337"]["val_bpb"] = 1.2
    (folder / "submission.json").write_text(json.dumps(data))
    assert errors(check.check_record(folder)) == [
        ("submission.json", "seed_results['1337'].val_bpb is 1.2 but train_seed1337.log gives 1.38912345")]


def test_a_file_where_the_record_folder_belongs_is_named_as_such(tmp_path):
    file = tmp_path / "submission.json"
    file.write_text("{}")
    with pytest.raises(NotADirectoryError, match=r"submission.json is a file, expected a folder"):
        check.check_record(file)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        check.check_record(tmp_path / "missing")
