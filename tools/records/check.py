"""Validating a record folder (files, submission.json, train logs, sizes) before the pull request: what `pgolf check`
(tools/commands/check.py) reports."""
from __future__ import annotations

import datetime
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tools.pack.artifact import CODE_FILENAME, DECIMAL_CAP, MODEL_FILENAME
from tools.records.results import (ResultFormatError, SeedResult, check_consistent, parse_log, read_submission,
                                  record_logs)

MIB_CAP = 16 * 1024 * 1024         # what a cap computed as 16 MiB lets through (a known bug class)
# submission.json values are usually rounded to 4-5 decimals, sometimes after rounding the per-seed values
# (2026-04-05: mean of logs 1.0856248, stated 1.08563); 1e-4 admits that and is 1/30 of the 0.005-nat bar in BPB.
VALUE_TOLERANCE = 1e-4
MIN_SEEDS = 3                      # records show 3 or more seeds; 3 seeds need t < -6.96 for p < 0.01
RECORD_FILES = ("README.md", "train_gpt.py")

# The fields the challenge's rules require of submission.json: name -> type ("number" is int or float). A missing or
# mistyped one is an error. Merged records omit some of them (2026-03-23 states neither val_loss nor bytes_code);
# the check still fails those, with the value to add where the logs or the folder give it.
REQUIRED_FIELDS = {"author": str, "github_id": str, "name": str, "blurb": str, "date": str, "val_loss": "number",
                   "val_bpb": "number", "bytes_total": int, "bytes_code": int}
# Usual but not required: a mistyped one is a warning that says why it matters; a missing one is not reported.
OPTIONAL_FIELDS = {
    "track": (str, "it says which leaderboard the record competes on"),
    "seeds": (list, "it says which runs the stated mean is over"),
    "seed_results": (dict, "reviewers compare each seed's stated score with its log"),
    "val_loss_std": ("number", "reviewers read the seed-to-seed spread from it"),
    "val_bpb_std": ("number", "reviewers read the seed-to-seed spread from it"),
    "hardware": (str, "the time caps are defined on 8xH100 SXM"),
    "pytorch_version": (str, "a reproduction needs the version the seeds ran with")}
SEED_RESULT_FIELDS = {"val_loss": "number", "val_bpb": "number", "artifact_bytes": int, "steps": int,
                      "step_avg_ms": "number"}
SEED_RESULT_WHY = "reviewers compare each seed's stated values with its log"


@dataclass(frozen=True)
class Problem:
    """One finding: errors fail the check, warnings are printed only."""
    severity: str                  # "error" or "warning"
    file: str                      # relative to the record folder
    message: str                   # what is wrong, with the value found
    fix: str

    def __str__(self) -> str:
        return f"{self.severity}: {self.file}: {self.message}; fix: {self.fix}"


@dataclass
class CheckReport:
    """The problems found in one record folder and the per-seed results its logs gave."""
    folder: Path
    results_only: bool
    results: list[SeedResult] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    unchecked: list[str] = field(default_factory=list)  # counts the folder gave nothing to check against, and why

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    def error(self, file: str, message: str, fix: str) -> None:
        self.problems.append(Problem("error", file, message, fix))

    def warn(self, file: str, message: str, fix: str) -> None:
        self.problems.append(Problem("warning", file, message, fix))


def _type_ok(value, kind) -> bool:
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is str:
        return isinstance(value, str) and bool(value.strip())
    return isinstance(value, kind)


def _kind_name(kind) -> str:
    return {"number": "a number", int: "an integer", str: "a non-empty string", list: "a list",
            dict: "an object"}[kind]


def _over_cap(report: CheckReport, file: str, what: str, value: int, shrink: str = "the artifact") -> None:
    if value <= DECIMAL_CAP:
        return
    message = f"{what} {value:,} bytes is over the cap of {DECIMAL_CAP:,} decimal bytes"
    if value <= MIB_CAP:
        message += (f" (it fits 16 MiB = {MIB_CAP:,}: the cap is 16,000,000, not 16*1024*1024 - "
                    "a size check computed in MiB passes it)")
    report.error(file, message, f"shrink {shrink} by at least {value - DECIMAL_CAP:,} bytes and recount")


def _check_files(folder: Path, report: CheckReport) -> None:
    for name in RECORD_FILES:
        if not (folder / name).is_file():
            report.error(name, "missing", f"add {name} (a record folder holds README.md, submission.json, "
                         "train_gpt.py and one train log per seed; --results-only skips this)")


def _check_fields(folder: Path, submission: dict, report: CheckReport, hints: dict[str, str],
                  results_only: bool) -> None:
    """Required fields: missing or mistyped is an error. Usual fields: mistyped is a warning saying why it matters."""
    for name, kind in REQUIRED_FIELDS.items():
        if name not in submission:
            if name == "bytes_code" and results_only:
                report.unchecked.append("submission.json: bytes_code is missing (the rules require it; "
                                        "--results-only does not ask for it)")
                continue
            report.error("submission.json", f"required field {name} is missing",
                         hints.get(name, f"add {name} ({_kind_name(kind)})"))
        elif not _type_ok(submission[name], kind):
            report.error("submission.json", f"{name} is {submission[name]!r}", f"make it {_kind_name(kind)}")
    for name, (kind, why) in OPTIONAL_FIELDS.items():
        if name in submission and not _type_ok(submission[name], kind):
            report.warn("submission.json", f"{name} is {submission[name]!r} ({why})", f"make it {_kind_name(kind)}")
    date = submission.get("date")
    if _type_ok(date, str):
        try:
            datetime.date.fromisoformat(date)
        except ValueError:
            report.error("submission.json", f"date {date!r} is not YYYY-MM-DD", "write the date as e.g. 2026-03-25")
        else:
            if not folder.name.startswith(f"{date}_"):
                report.warn(".", f"folder name {folder.name!r} does not start with the date {date}_ (the "
                            "challenge's folders are records/<track>/<date>_<Description>)",
                            f"name the folder {date}_<Description>")
    seeds = submission.get("seeds")
    if isinstance(seeds, list) and not all(_type_ok(s, int) for s in seeds):
        report.warn("submission.json", f"seeds {seeds!r} are not all integers (so they cannot be matched with the "
                    "logs)", "list the seeds as integers")
    _check_compliance(submission.get("compliance"), report)


def _check_compliance(compliance, report: CheckReport) -> None:
    """`pgolf record` states {"C1": true, ...}: whether every seed's evaluation passed each condition of issue
    #1017. Records written by hand often hold free-text notes there instead; only a stated failure is an error."""
    if not isinstance(compliance, dict):
        return
    for condition, passed in compliance.items():
        if passed is False:
            report.error("submission.json", f"compliance {condition} is false: the evaluation broke condition "
                         f"{condition} on at least one seed (README.md says which check failed)",
                         "fix the eval-time adaptation and re-run the seeds; an illegal evaluation is not a record")


def _load_logs(folder: Path, report: CheckReport) -> None:
    logs = record_logs(folder)
    if not logs:
        report.error(".", "no train logs", "add the log of each seed as train_seed<N>.log")
    for path in logs:
        try:
            report.results.append(parse_log(path))
        except ResultFormatError as err:
            report.error(path.name, err.problem, err.fix)
    report.results.sort(key=lambda r: r.seed)
    try:
        check_consistent(report.results)
    except ResultFormatError as err:
        report.error(err.path.name, err.problem, err.fix)
    if 0 < len(report.results) < MIN_SEEDS:
        report.warn(".", f"{len(report.results)} seed(s) (the significance test needs {MIN_SEEDS}: 3 seeds need "
                    "t < -6.96 for p < 0.01)", f"run at least {MIN_SEEDS} seeds")
    for r in report.results:
        if r.bytes_total is not None:
            _over_cap(report, r.source.name, "artifact (Total submission size)", r.bytes_total)


def _compare(report: CheckReport, file: str, what: str, stated, actual: float, source: str) -> None:
    if _type_ok(stated, "number") and abs(stated - actual) > VALUE_TOLERANCE:
        report.error(file, f"{what} is {stated} but {source} gives {actual:.8f}", f"set {what} to {actual:.8f}")


def _check_seed_results(submission: dict, by_seed: dict[int, SeedResult], report: CheckReport) -> None:
    """Per-seed entries are usual, not required: a missing or malformed one is a warning; a stated value that its
    log contradicts, or an entry for a seed without a log, is an error."""
    seed_results = submission.get("seed_results")
    if not isinstance(seed_results, dict):
        return
    listed = set()
    for key, entry in seed_results.items():
        where = f"seed_results[{key!r}]"
        if not str(key).isdigit():
            report.warn("submission.json", f"{where}: key is not a seed, so the entry cannot be matched with a log",
                        "key seed_results by the seed number")
            continue
        seed = int(key)
        listed.add(seed)
        result = by_seed.get(seed)
        if result is None:
            report.error("submission.json", f"{where} has no train log",
                         f"add train_seed{seed}.log or drop the entry")
        if not isinstance(entry, dict):
            report.warn("submission.json", f"{where} is {entry!r} ({SEED_RESULT_WHY})",
                        "make it an object with val_loss and val_bpb")
            continue
        for name, kind in SEED_RESULT_FIELDS.items():
            if name in ("val_loss", "val_bpb") and name not in entry:
                value = f": {getattr(result, name):.8f} from {result.source.name}" if result else " from its log"
                report.warn("submission.json", f"{where}.{name} is missing ({SEED_RESULT_WHY})", f"add {name}{value}")
            elif name in entry and not _type_ok(entry[name], kind):
                report.warn("submission.json", f"{where}.{name} is {entry[name]!r} ({SEED_RESULT_WHY})",
                            f"make it {_kind_name(kind)}")
        if _type_ok(entry.get("artifact_bytes"), int):
            _over_cap(report, "submission.json", f"{where}.artifact_bytes", entry["artifact_bytes"])
        if result is None:
            continue
        log = result.source.name
        for name in ("val_loss", "val_bpb"):
            _compare(report, "submission.json", f"{where}.{name}", entry.get(name), getattr(result, name), log)
        for name, actual in (("artifact_bytes", result.bytes_total), ("steps", result.steps)):
            stated = entry.get(name)
            if _type_ok(stated, int) and actual is not None and stated != actual:
                report.error("submission.json", f"{where}.{name} is {stated} but {log} says {actual}",
                             f"set {name} to {actual}")
    for seed in sorted(set(by_seed) - listed):
        report.warn(by_seed[seed].source.name, f"seed {seed} has no entry in submission.json seed_results "
                    f"({SEED_RESULT_WHY})", "add its val_loss, val_bpb, artifact_bytes and steps, or remove the log")


def _log_means(results: list[SeedResult]) -> tuple[float, float, str]:
    """(mean val_loss, mean val_bpb, where they come from) of the logs."""
    return (float(np.mean([r.val_loss for r in results])), float(np.mean([r.val_bpb for r in results])),
            f"the mean of the {len(results)} logs' {results[0].metric_key}")


def _check_values(submission: dict, results: list[SeedResult], report: CheckReport) -> None:
    by_seed = {r.seed: r for r in results}
    seeds = submission.get("seeds")
    if isinstance(seeds, list) and all(_type_ok(s, int) for s in seeds):
        for seed in sorted(set(seeds) - set(by_seed)):
            report.error("submission.json", f"seed {seed} is listed in seeds but has no train log",
                         f"add train_seed{seed}.log, or remove {seed} from seeds and seed_results")
        for seed in sorted(set(by_seed) - set(seeds)):
            report.error(by_seed[seed].source.name, f"seed {seed} is not in submission.json seeds {seeds}",
                         "add it to seeds (and seed_results), or remove the log")
    _check_seed_results(submission, by_seed, report)
    mean_loss, mean_bpb, source = _log_means(results)
    _compare(report, "submission.json", "val_bpb", submission.get("val_bpb"), mean_bpb, source)
    _compare(report, "submission.json", "val_loss", submission.get("val_loss"), mean_loss, source)
    stated_std = submission.get("val_bpb_std")
    if _type_ok(stated_std, "number") and len(results) > 1:
        values = [r.val_bpb for r in results]
        sample, population = float(np.std(values, ddof=1)), float(np.std(values))
        if min(abs(stated_std - sample), abs(stated_std - population)) > VALUE_TOLERANCE:
            report.warn("submission.json", f"val_bpb_std is {stated_std} but the logs give {sample:.8f} "
                        "(sample std; reviewers read the seed-to-seed spread from it)",
                        f"set val_bpb_std to {sample:.8f}")


def _counts(values: list[int]) -> str:
    low, high = min(values), max(values)
    return f"{low:,}" if low == high else f"{low:,}..{high:,}"


def _check_bytes(folder: Path, submission: dict, results: list[SeedResult], report: CheckReport,
                 results_only: bool) -> None:
    """bytes_code and bytes_total against what the folder holds: train_gpt.py (the code as counted), model.pgz when
    it is shipped (challenge record folders ship none), the logs' Code size and Total submission size lines, and
    the decimal cap. What nothing in the folder can confirm is listed in report.unchecked."""
    total = submission["bytes_total"] if _type_ok(submission.get("bytes_total"), int) else None
    stated_code = submission["bytes_code"] if _type_ok(submission.get("bytes_code"), int) else None
    script = folder / CODE_FILENAME
    code_file = script.stat().st_size if not results_only and script.is_file() else None
    log_codes = sorted({r.bytes_code for r in results if r.bytes_code is not None})
    if total is not None:
        _over_cap(report, "submission.json", "bytes_total", total)
    if code_file is not None:
        _over_cap(report, CODE_FILENAME, f"{CODE_FILENAME} alone", code_file, shrink="the code")
    elif stated_code is not None:
        _over_cap(report, "submission.json", "bytes_code alone", stated_code, shrink="the code")

    # bytes_code: the shipped file when it is there, else the logs' Code size
    if code_file is not None:
        if stated_code is not None and stated_code != code_file:
            report.error("submission.json", f"bytes_code is {stated_code} but {CODE_FILENAME} is {code_file} bytes",
                         f"set bytes_code to {code_file}, and bytes_total to the model bytes + {code_file}")
        for r in results:
            if r.bytes_code is not None and r.bytes_code != code_file:
                report.warn(r.source.name, f"the log's Code size is {r.bytes_code} bytes but {CODE_FILENAME} is "
                            f"{code_file} (the shipped code is not the code that produced this score)",
                            "ship the train_gpt.py that produced the logs, or re-run the seeds with this one")
    elif stated_code is not None:
        why = "--results-only" if results_only else f"no {CODE_FILENAME} in the folder"
        if log_codes and stated_code not in log_codes:
            report.error("submission.json", f"bytes_code is {stated_code} but the logs' Code size is "
                         f"{_counts(log_codes)} bytes", f"set bytes_code to {log_codes[-1]}")
        elif log_codes:
            report.unchecked.append(f"submission.json: bytes_code ({why}: checked against the logs' Code size only)")
        else:
            report.unchecked.append(f"submission.json: bytes_code ({why}, and no log states a Code size)")
    code = code_file if code_file is not None else stated_code if stated_code is not None else \
        (log_codes[-1] if log_codes else None)

    # bytes_total: the artifact in the folder, else the per-seed totals the logs (or seed_results) state
    seed_totals = [r.bytes_total for r in results if r.bytes_total is not None]
    totals_source = "the logs' Total submission size"
    if code is not None and any(r.bytes_code not in (None, code) for r in results if r.bytes_total is not None):
        # the shipped code is not the one the seeds ran (warned above): their models with this code
        seed_totals = [r.bytes_total - (r.bytes_code if r.bytes_code is not None else code) + code
                       for r in results if r.bytes_total is not None]
        totals_source = f"the logs' model bytes (Total submission size - Code size) + the code's {code:,}"
    if not seed_totals and isinstance(submission.get("seed_results"), dict):
        seed_totals = [e["artifact_bytes"] for e in submission["seed_results"].values()
                       if isinstance(e, dict) and _type_ok(e.get("artifact_bytes"), int)]
        totals_source = "seed_results' artifact_bytes"
    model = folder / MODEL_FILENAME
    if model.is_file() and code is not None:
        counted = code + model.stat().st_size
        what = f"{CODE_FILENAME} ({code:,}) + {MODEL_FILENAME} ({counted - code:,})"
        _over_cap(report, MODEL_FILENAME, what + " =", counted)
        # a folder of several seeds may ship one seed's model: then it matches that seed's total
        if total is not None and total != counted and counted not in seed_totals:
            report.error("submission.json", f"bytes_total is {total:,} but {what} = {counted:,} bytes",
                         f"set bytes_total to {counted}")
    elif total is not None:
        missing = "the code size is not known" if model.is_file() else f"{MODEL_FILENAME} is not in the folder"
        report.unchecked.append(f"submission.json: bytes_total is not recounted from files ({missing}); "
                                + (f"checked against {totals_source}" if seed_totals else
                                   "no log states a Total submission size either"))
    if total is None:
        return
    if seed_totals:
        # records state the largest seed's total (2026-03-25) or the mean (2026-04-05): within the seeds' range
        if not min(seed_totals) <= total <= max(seed_totals):
            report.error("submission.json", f"bytes_total is {total:,} but {totals_source} is "
                         f"{_counts(seed_totals)} bytes", f"set bytes_total to {max(seed_totals)} (the largest seed's)")
    elif code is not None and total <= code:
        report.error("submission.json", f"bytes_total is {total:,} but the code alone is {code:,} bytes "
                     "(bytes_total counts code + compressed model)",
                     f"set bytes_total to {code} + the bytes of the compressed model")


def _hints(folder: Path, results: list[SeedResult], results_only: bool) -> dict[str, str]:
    """The fix for a missing required field, with the value where the folder gives it."""
    hints = {}
    if results:
        mean_loss, mean_bpb, source = _log_means(results)
        hints.update(val_loss=f"add val_loss: {mean_loss:.8f} ({source})",
                     val_bpb=f"add val_bpb: {mean_bpb:.8f} ({source})")
        if (totals := [r.bytes_total for r in results if r.bytes_total is not None]):
            hints["bytes_total"] = f"add bytes_total: {max(totals)} (the largest of the logs' Total submission size)"
    script = folder / CODE_FILENAME
    if not results_only and script.is_file():
        hints["bytes_code"] = f"add bytes_code: {script.stat().st_size} (size of {CODE_FILENAME})"
    elif (codes := sorted({r.bytes_code for r in results if r.bytes_code is not None})):
        hints["bytes_code"] = f"add bytes_code: {codes[-1]} (the logs' Code size)"
    return hints


def check_record(folder: str | Path, results_only: bool = False) -> CheckReport:
    """Validate a record folder in the challenge's layout; results_only skips README.md and train_gpt.py."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"record folder {folder} is a file, expected a folder (pass records/<track>/"
                                 "<date>_<name>, the folder holding submission.json)")
    if not folder.is_dir():
        raise FileNotFoundError(f"record folder {folder} does not exist (pass records/<track>/<date>_<name>)")
    report = CheckReport(folder, results_only)
    if not results_only:
        _check_files(folder, report)
    submission = None
    if not (folder / "submission.json").is_file():
        report.error("submission.json", "missing", "add submission.json (`pgolf record` writes it)")
    else:
        try:
            submission = read_submission(folder / "submission.json")
        except ResultFormatError as err:
            report.error("submission.json", err.problem, err.fix)
    _load_logs(folder, report)
    if submission is not None:
        _check_fields(folder, submission, report, _hints(folder, report.results, results_only), results_only)
        if report.results:
            _check_values(submission, report.results, report)
        _check_bytes(folder, submission, report.results, report, results_only)
    return report


def format_check(report: CheckReport) -> str:
    lines = [str(p) for p in report.problems] + [f"unchecked: {note}" for note in report.unchecked]
    if report.results:
        keys = sorted({r.metric_key for r in report.results})
        lines.append(f"seeds:{','.join(str(r.seed) for r in report.results)} metric:{','.join(keys)} "
                     f"val_bpb_mean:{np.mean([r.val_bpb for r in report.results]):.8f} "
                     f"val_loss_mean:{np.mean([r.val_loss for r in report.results]):.8f}")
    status = "failed" if report.errors else "ok"
    mode = "results-only" if report.results_only else "full"
    lines.append(f"check:{status} mode:{mode} errors:{len(report.errors)} warnings:{len(report.warnings)} "
                 f"folder:{report.folder}")
    return "\n".join(lines)
