"""`pgolf train [KEY=VALUE ...]`: the trainer (submission.train.main) with every config field listed in --help."""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import inspect
import re
import typing

from submission.config import ModelConfig, TrainConfig
from submission.train import main

CONFIGS = (ModelConfig, TrainConfig)
# `name: type = default  # comment` in a config class body: the comment is the field's documentation
_FIELD_COMMENT = re.compile(r"^\s+(\w+)\s*:[^#]*#\s*(.*)$")


def _type_name(kind) -> str:
    args = typing.get_args(kind)
    return ",".join(a.__name__ for a in args) if args else kind.__name__


def field_help(kind) -> str:
    """One line per field of a config dataclass: KEY, type, default and the comment beside it in the source."""
    comments = dict(m.groups() for m in map(_FIELD_COMMENT.match, inspect.getsource(kind).splitlines()) if m)
    hints = typing.get_type_hints(kind)
    rows = []
    for f in dataclasses.fields(kind):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else repr(default) if isinstance(
            default, str) else str(default)
        rows.append((f.name.upper(), _type_name(hints[f.name]), shown, comments.get(f.name, "")))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = [f"  {k:<{widths[0]}}  {t:<{widths[1]}}  {d:<{widths[2]}}  {c}".rstrip() for k, t, d, c in rows]
    return f"{kind.__name__}: {inspect.getdoc(kind).splitlines()[0]}\n" + "\n".join(lines)


def check_overrides(overrides: list[str]) -> dict[str, str]:
    """KEY=VALUE strings -> {KEY: VALUE}; a malformed item or a key that names no config field is a ValueError
    naming it, with the closest field names. Values are parsed and checked by submission.config.resolve."""
    known = {f.name for kind in CONFIGS for f in dataclasses.fields(kind)}
    parsed = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{item!r} is not KEY=VALUE (e.g. NUM_LAYERS=4; `pgolf train --help` lists the keys)")
        if key.lower() not in known:
            close = difflib.get_close_matches(key.lower(), known, n=3)
            hint = f"did you mean {', '.join(c.upper() for c in close)}? " if close else ""
            raise ValueError(f"unknown setting {key!r}: {hint}`pgolf train --help` lists the ModelConfig and "
                             "TrainConfig fields")
        parsed[key] = value
    return parsed


def _cmd(args: argparse.Namespace) -> int:
    check_overrides(args.overrides)
    main(args.overrides)
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser(
        "train", help="train the recipe in this process (CPU or one GPU) and write a run directory",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Runs submission.train.main: the defaults are the recipe; upper-case environment variables named "
                    "after a field apply first, then KEY=VALUE arguments (keys are case-insensitive). Every change "
                    "is logged as an `override` line in RUN_DIR/train.log. For several GPUs run the same through "
                    "torchrun: `torchrun --nproc_per_node=8 submission/train_gpt.py KEY=VALUE ...`.",
        epilog="\n\n".join(field_help(kind) for kind in CONFIGS))
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="config overrides, e.g. NUM_LAYERS=4 MAX_STEPS=100 RUN_DIR=runs/try1")
    p.set_defaults(func=_cmd)
