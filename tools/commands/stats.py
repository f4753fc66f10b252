"""`pgolf stats`: per-seed summary and significance against a record (tools/records/stats.py computes them)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from tools.paths import expect_path
from tools.records.results import load_record, load_results
from tools.records.stats import build_report, format_report, report_to_json


def run_stats(args: argparse.Namespace) -> int:
    if args.record:
        expect_path(args.record, "folder", "--record", "pass the record folder holding train_seed<N>.log")
    results = [r for path in args.paths for r in load_results(path)]
    record = load_record(args.record) if args.record else None
    report = build_report(results, record, args.record_loss)
    print(json.dumps(report_to_json(report), indent=1) if args.json else format_report(report))
    return 0


def add_commands(subparsers) -> None:
    parser = subparsers.add_parser(
        "stats", help="per-seed summary and significance against a record",
        description="Summarize per-seed results (run directories with eval.json, record folders, train logs) and "
                    "test them against a record: the rules' one-sided t-test of mean val_loss < record - 0.005 nats "
                    "(p < 0.01) and Welch's t-test against the record's per-seed values.")
    parser.add_argument("paths", nargs="+", type=Path, metavar="RUN_OR_RECORD",
                        help="run directory, record folder, train_seed<N>.log or eval.json (one per seed or folder)")
    reference = parser.add_mutually_exclusive_group()
    reference.add_argument("--record", type=Path, metavar="DIR", help="record folder to compare against")
    reference.add_argument("--record-loss", type=float, metavar="NATS",
                           help="record val_loss (nats/token) for the one-sample test")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(func=run_stats)
