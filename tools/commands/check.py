"""`pgolf check`: validate a record folder before the pull request (tools/records/check.py)."""
from __future__ import annotations

import argparse
from pathlib import Path

from tools.pack.artifact import DECIMAL_CAP
from tools.records.check import check_record, format_check


def run_check(args: argparse.Namespace) -> int:
    report = check_record(args.folder, args.results_only)
    print(format_check(report))
    return 1 if report.errors else 0


def add_commands(subparsers) -> None:
    parser = subparsers.add_parser(
        "check", help="validate a record folder before the pull request",
        description="Check a record folder: README.md, submission.json (the fields the rules require, values "
                    "against the logs), bytes_code and bytes_total against train_gpt.py, model.pgz when shipped "
                    "and the logs' sizes, one train log per seed with a final metric line, and the "
                    f"{DECIMAL_CAP:,}-byte cap. Exits 1 when an error is found; warnings (usual fields) and "
                    "counts nothing in the folder could confirm are printed.")
    parser.add_argument("folder", type=Path, metavar="DIR", help="record folder (records/<track>/<date>_<name>)")
    parser.add_argument("--results-only", action="store_true",
                        help="check submission.json and the logs only (skip README.md, train_gpt.py, bytes_code)")
    parser.set_defaults(func=run_check)
