"""The `pgolf` command: one subcommand family per kit module, each registered by that module's add_commands(), and
the argument checks they share (settings after flags, path kinds)."""
from __future__ import annotations

import argparse
import importlib
import re
import sys
from pathlib import Path

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
    # not dest="command": a subcommand's own option of that name (`pgolf seeds --command`) would overwrite it
    sub = parser.add_subparsers(dest="subcommand", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_commands(sub)
    return parser


SETTING = re.compile(r"^[A-Za-z_]\w*=")  # a KEY=VALUE setting, never a flag


def settings_dest(parser: argparse.ArgumentParser, command: str) -> str | None:
    """Where `command` keeps its KEY=VALUE settings: the dest of its positional with metavar KEY=VALUE (`overrides`
    in most commands, `settings` in `pgolf quantize`), or None when it takes no settings."""
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return next((a.dest for a in subparsers.choices[command]._actions
                 if not a.option_strings and a.metavar == "KEY=VALUE"), None)


def expect_path(path: str | Path, kind: str, what: str, fix: str) -> Path:
    """`path` as a Path when it is an existing `kind` ("file" or "folder"); else an OSError that says what is there
    instead (a folder where a file is expected, or the reverse, or nothing), then the fix in brackets."""
    path = Path(path)
    if path.is_dir() if kind == "folder" else path.is_file():
        return path
    name = f"{what} {path}" if what else str(path)
    if not path.exists():
        raise FileNotFoundError(f"{name} not found ({fix})")
    if path.is_dir():
        raise IsADirectoryError(f"{name} is a folder, expected a file ({fix})")
    if kind == "folder":
        raise NotADirectoryError(f"{name} is a file, expected a folder ({fix})")
    raise OSError(f"{name} is not a regular file ({fix})")


def expect_output(path: str | Path, kind: str, what: str) -> Path:
    """An output location, checked before the work that fills it: nothing of the other kind there, and a file's
    folder exists (a folder is created with its parents)."""
    path = Path(path)
    name = f"{what} {path}" if what else str(path)
    if kind == "file" and path.is_dir():
        raise IsADirectoryError(f"{name} is a folder, expected a file (name the file to write)")
    if kind == "folder" and path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{name} is a file, expected a folder (name a folder to write into)")
    if kind == "file" and not path.parent.is_dir():
        raise FileNotFoundError(f"{name}: its folder {path.parent} not found (create it, or name another)")
    return path


def path_arg(kind: str, output: bool = False, fix: str = ""):
    """An argparse `type` that checks a path argument as expect_output (output=True) or expect_path does, so that a
    wrong one is a usage error before any work; the argument stays a string."""
    def check(text: str) -> str:
        try:
            expect_output(text, kind, "") if output else expect_path(text, kind, "", fix)
        except OSError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
        return text
    return check


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Like parse_args, but KEY=VALUE settings may also follow the flags (`pgolf quantize RUN --device cpu
    CALIB_SEQS=8`): argparse alone ends a command's positionals at the first flag and rejects the rest."""
    parser = build_parser()
    args, extra = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    dest = settings_dest(parser, args.subcommand) if extra else None
    if dest is not None and all(SETTING.match(a) for a in extra):
        setattr(args, dest, [*getattr(args, dest), *extra])
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, OSError, RuntimeError) as err:
        # Errors from the kit name the file, the value and the fix; show them without a traceback. An OSError's
        # own text names the file too (`[Errno 13] Permission denied: 'runs/x/eval.json'`).
        print(f"pgolf {args.subcommand}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
