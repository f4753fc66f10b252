"""The `pgolf` command: one module of tools/commands/ per subcommand (`pgolf eval` is tools/commands/eval.py), each
registered by that module's add_commands(), and the argument checks they share (settings after flags, path kinds)."""
from __future__ import annotations

import argparse
import importlib
import re
import sys

from tools.paths import expect_output, expect_path

# Each module defines add_commands(subparsers) and sets `func` on the parsers it adds; --help lists them in this order.
COMMAND_MODULES = [
    "tools.commands.data",
    "tools.commands.bench",
    "tools.commands.stats",
    "tools.commands.ablation",
    "tools.commands.check",
    "tools.commands.size",
    "tools.commands.quantize",
    "tools.commands.pack",
    "tools.commands.bundle",
    "tools.commands.train",
    "tools.commands.eval",
    "tools.commands.seeds",
    "tools.commands.record",
]


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The `pgolf` parser with every command, or with `command` alone when a module of COMMAND_MODULES is named after
    it: `pgolf ablation` or `pgolf stats` then never imports torch, which the model commands' modules load (~3 s)."""
    parser = argparse.ArgumentParser(
        prog="pgolf", description="Parameter Golf kit: data, train, quantize, pack, eval, records.")
    # not dest="command": a subcommand's own option of that name (`pgolf seeds --command`) would overwrite it
    sub = parser.add_subparsers(dest="subcommand", required=True, metavar="COMMAND")
    modules = [m for m in COMMAND_MODULES if m.rsplit(".", 1)[-1] == command] or COMMAND_MODULES
    for name in modules:
        importlib.import_module(name).add_commands(sub)
    return parser


SETTING = re.compile(r"^[A-Za-z_]\w*=")  # a KEY=VALUE setting, never a flag


def settings_dest(parser: argparse.ArgumentParser, command: str) -> str | None:
    """Where `command` keeps its KEY=VALUE settings: the dest of its positional with metavar KEY=VALUE (`overrides`
    in most commands, `settings` in `pgolf quantize`), or None when it takes no settings."""
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return next((a.dest for a in subparsers.choices[command]._actions
                 if not a.option_strings and a.metavar == "KEY=VALUE"), None)


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
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv[0] if argv else None)
    args, extra = parser.parse_known_args(argv)
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
    finally:
        end_distributed()


def end_distributed() -> None:
    """Destroy the process group a torchrun command set up, before the process exits. Left to the interpreter's
    shutdown, a gloo rank of `pgolf eval --lora-ttt` aborted in 3 of 18 runs ("terminate called without an active
    exception") after its work was written, and torchrun then failed the whole command."""
    if "torch.distributed" not in sys.modules:  # a command that never touched torch
        return
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
