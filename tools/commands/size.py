"""`pgolf size`: the counted bytes of an artifact directory (tools/pack/size.py measures them)."""
from __future__ import annotations

import argparse

from tools.pack.artifact import CODE_FILENAME, MODEL_FILENAME
from tools.pack.size import size_report
from tools.paths import expect_path


def _cmd_size(args) -> int:
    root = expect_path(args.artifact_dir, "folder", "artifact dir", f"expected {MODEL_FILENAME} and {CODE_FILENAME} "
                       "in it")
    report = size_report(root / args.model, root / args.code, progress=not args.quiet)
    print("\n".join(report.lines()))
    return 0 if report.fits else 1


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("size", help="counted bytes of an artifact dir (code + model vs 16,000,000)",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("artifact_dir", help=f"directory holding {MODEL_FILENAME} and {CODE_FILENAME}")
    p.add_argument("--model", default=MODEL_FILENAME, help="model file name inside the dir")
    p.add_argument("--code", default=CODE_FILENAME, help="code file name inside the dir (counted as shipped)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_size)
