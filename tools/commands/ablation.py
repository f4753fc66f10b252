"""`pgolf ablation`: the table of an ablation from the kit's logs (tools/records/ablation.py reads and compares
them)."""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from tools.paths import expect_output
from tools.records import ablation
from tools.records.ablation import collect, compare, format_markdown, format_text, summarize, table_rows
from tools.records.results import ResultFormatError


def run_ablation(args: argparse.Namespace) -> int:
    if args.plot:
        expect_output(args.plot, "file", "--plot")
    baselines = [run for path in args.baseline for run in collect(path)]
    runs = [run for path in args.runs for run in collect(path)]
    seeds = [b.seed for b in baselines]
    if len(set(seeds)) != len(seeds):
        raise SystemExit(f"pgolf ablation: two baselines share a seed ({sorted(seeds)}): pass one baseline per seed")
    compare(runs, baselines, args.ignore)
    summaries = summarize(runs)
    if args.plot:
        from tools.records.plots import plot_ablation
        plot_ablation(runs, args.plot, f"Ablation: {', '.join(str(p) for p in args.runs)} against "
                                       f"{', '.join(str(p) for p in args.baseline)}")
    if args.json:
        print(json.dumps({"baselines": [asdict(b) for b in baselines], "runs": [asdict(r) for r in runs],
                          "summary": [asdict(s) for s in summaries]}, indent=1))
        return 0
    rows = table_rows(runs, baselines)
    print(format_markdown(rows, summaries) if args.markdown else format_text(rows, summaries))
    return 0


def _main(args: argparse.Namespace) -> int:
    try:
        return run_ablation(args)
    except (ResultFormatError, ValueError, OSError) as err:
        raise SystemExit(f"pgolf ablation: {err}") from None


def add_commands(subparsers) -> None:
    parser = subparsers.add_parser(
        "ablation", help="an ablation's table from the kit's logs: step time, val_bpb before/after int6, size cost, "
                         "each against the baseline of the same seed",
        description=ablation.__doc__.split("\n\n")[0] + "\n\n" + ablation.__doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN",
                        help="run directory, kit train.log, or a folder of run directories")
    parser.add_argument("--baseline", action="append", type=Path, default=[], metavar="RUN",
                        help="baseline run(s): run directories, logs or a record folder (repeatable; one per seed)")
    parser.add_argument("--ignore", action="append", default=[], metavar="KEY",
                        help="a setting that names a place, not a variant, so never a change (repeatable): e.g. "
                             "DATA_DIR when each seed trained on its own copy of one corpus (scripts/p1_seed.sh)")
    out = parser.add_mutually_exclusive_group()
    out.add_argument("--markdown", action="store_true", help="a Markdown table (for a README or a closing note)")
    out.add_argument("--json", action="store_true", help="every figure as JSON")
    parser.add_argument("--plot", type=Path, metavar="PNG",
                        help="also draw each change's per-seed deltas (before and after int6) into this PNG")
    parser.set_defaults(func=_main)
