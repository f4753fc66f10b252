"""`pgolf pack RUN_DIR --out DIR`: the shippable folder (tools/pack/ship.py writes it)."""
from __future__ import annotations

import argparse
from pathlib import Path

from tools.pack.artifact import MODEL_FILENAME
from tools.pack.ship import pack


def _cmd_pack(args: argparse.Namespace) -> int:
    result, report = pack(args.run_dir, args.out, progress=not args.quiet)
    print(f"pack: out:{args.out} source_sha256:{result.sha256[:16]} modules:{len(result.modules)} "
          f"readable_bytes:{result.sizes.readable} packed_bytes:{result.sizes.packed}")
    print("\n".join(report.lines()))
    return 0


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("pack", help="write the shippable folder: packed train_gpt.py (+ .sha256) and model.pgz,"
                                           " checked against 16,000,000 bytes")
    p.add_argument("run_dir", help=f"run directory holding {MODEL_FILENAME}")
    p.add_argument("--out", type=Path, required=True, help="folder to write (created if missing)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_pack)
