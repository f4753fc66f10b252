"""`pgolf record`: write a record folder for the pull request (tools/records/record.py builds it)."""
from __future__ import annotations

import argparse
from pathlib import Path

from tools.pack.artifact import CODE_FILENAME
from tools.records.check import format_check
from tools.records.record import TRACKS, RecordConfig, write_record


def _cmd_record(args: argparse.Namespace) -> int:
    cfg = RecordConfig(run_dirs=args.run_dirs, name=args.name, track=args.track, author=args.author,
                       github_id=args.github_id, blurb=args.blurb, reference=args.record_folder,
                       pack_dir=args.pack_dir, out=args.out, date=args.date, hardware=args.hardware,
                       overwrite=args.overwrite)
    folder, report = write_record(cfg)
    print(format_check(report))
    for path in sorted(folder.iterdir()):
        print(f"file:{path} bytes:{path.stat().st_size}")
    print(f"record:{folder}")
    return 0


def add_commands(subparsers) -> None:
    parser = subparsers.add_parser(
        "record", help="write a record folder for the pull request from the seeds' run directories",
        description="Write records/track_<TRACK>/<date>_<NAME>/: README.md (results, significance, compliance, "
                    "sizes, how to reproduce), submission.json, train_seed<N>.log per seed, train_gpt.py, "
                    "requirements.txt and plots. It is built in a temp folder, checked like `pgolf check`, and "
                    "only then moved into place.")
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR",
                        help="run directory of each seed (or a `pgolf seeds --out` folder holding them)")
    parser.add_argument("--name", required=True, help="submission name, e.g. 'Int6 GPTQ + Legal TTT'")
    parser.add_argument("--track", required=True, choices=TRACKS, help="the challenge track")
    parser.add_argument("--author", required=True, help="your name as it should appear in submission.json")
    parser.add_argument("--github-id", required=True, help="your GitHub user name")
    parser.add_argument("--blurb", help="one paragraph on what the submission does (default: the results)")
    parser.add_argument("--record-folder", type=Path, metavar="REF",
                        help="record folder to test significance against (its train logs)")
    parser.add_argument("--pack-dir", type=Path, metavar="DIR",
                        help=f"`pgolf pack --out` folder holding the {CODE_FILENAME} to ship (default: a run "
                             f"directory's {CODE_FILENAME}, else bundled now from the kit)")
    parser.add_argument("--out", type=Path, default=Path("records"), help="records root (default: records)")
    parser.add_argument("--date", help="YYYY-MM-DD for submission.json and the folder name (default: today)")
    parser.add_argument("--hardware", help="hardware line (default: from the train logs, e.g. '8x cuda')")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing folder of the same name (its files that the new record does not "
                             "write, e.g. added by hand, are listed as they are removed)")
    parser.set_defaults(func=_cmd_record)
