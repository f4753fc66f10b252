"""The `pgolf` command: one subcommand family per kit module, each registered by that module's add_commands()."""
from __future__ import annotations

import argparse
import importlib
import sys

# Each module defines add_commands(subparsers) and sets `func` on the parsers it adds.
COMMAND_MODULES = [
    "tools.data",
    "tools.bench",
    "tools.stats",
    "tools.ablation",
    "tools.check",
    "tools.size",
    "tools.pack",
    "tools.bundle",
    "tools.train_cmd",
    "tools.evaluate",
    "tools.seeds",
    "tools.record",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pgolf", description="Parameter Golf kit: data, train, quantize, pack, eval, records.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_commands(sub)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Like parse_args, but KEY=VALUE settings may also follow the flags (`pgolf bench --steps 500 SEED=2`):
    argparse alone ends a command's positionals at the first flag and rejects the rest."""
    parser = build_parser()
    args, extra = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if extra and hasattr(args, "overrides") and all("=" in a and not a.startswith("-") for a in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        # Errors from the kit name the file, the value and the fix; show them without a traceback.
        print(f"pgolf {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
