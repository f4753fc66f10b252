"""`pgolf train [KEY=VALUE ...]`: the trainer (submission.train.main) with every config field listed in --help; the run
records the tuning split its data held out (RUN_DIR/tune_split.txt, which `pgolf eval --tune` checks)."""
from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import inspect
import textwrap
import typing

from submission.config import RECIPES, ModelConfig, TrainConfig, parse_overrides
from submission.train import main
from tools.data import held_out_at_start, record_tune_split

CONFIGS = (ModelConfig, TrainConfig)
# `name: type = default  # comment` in a config class body: the comment is the field's documentation


def _type_name(kind) -> str:
    args = typing.get_args(kind)
    return ",".join("..." if a is Ellipsis else a.__name__ for a in args) if args else kind.__name__


def field_docs(kind) -> dict[str, str]:
    """Each field's documentation in the class source: the string literal right below it (a field docstring, joined
    into one line), the kit's one style of documenting a setting."""
    source = textwrap.dedent(inspect.getsource(kind))
    docs = {}
    body = ast.parse(source).body[0].body
    for node, after in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr) \
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def field_help(kind) -> str:
    """One line per setting of a config dataclass: KEY (with the class's PREFIX, e.g. NGRAM_ORDER), type, default and
    its documentation (field_docs). A field holding another config is listed as that config's own table."""
    comments = field_docs(kind)
    hints = typing.get_type_hints(kind)
    prefix = getattr(kind, "PREFIX", "").upper()
    rows = []
    for f in dataclasses.fields(kind):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if dataclasses.is_dataclass(default):
            continue
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else repr(default) if isinstance(
            default, str) else str(default)
        rows.append((prefix + f.name.upper(), _type_name(hints[f.name]), shown, comments.get(f.name, "")))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = [f"  {k:<{widths[0]}}  {t:<{widths[1]}}  {d:<{widths[2]}}  {c}".rstrip() for k, t, d, c in rows]
    return f"{kind.__name__}: {inspect.getdoc(kind).splitlines()[0]}\n" + "\n".join(lines)


def settings_help(*kinds) -> str:
    """The settings tables of a tree of configs: each config's, then those of the configs its fields hold (the
    n-gram's under EvalConfig), as submission.config.settings_index names them."""
    tables = []
    for kind in kinds:
        tables.append(field_help(kind))
        nested = [type(f.default_factory()) for f in dataclasses.fields(kind)
                  if f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory())]
        if nested:
            tables.append(settings_help(*nested))
    return "\n\n".join(tables)


def recipe_help() -> str:
    """RECIPE=name and what each recipe changes from the defaults (also quantization settings: `pgolf quantize`)."""
    lines = ["Recipes (RECIPE=name sets these first; later KEY=VALUE settings override them):"]
    for name, values in RECIPES.items():
        changes = " ".join(f"{k.upper()}={','.join(map(str, v)) if isinstance(v, tuple) else v}"
                           for k, v in values.items())
        lines.append(f"  {name}: {changes or 'the defaults below'}")
    return "\n".join(lines)


def check_overrides(overrides: list[str]) -> dict[str, str]:
    """KEY=VALUE strings -> {KEY: VALUE}; a malformed item or a key that names no config field is a ValueError
    naming it, with the closest field names. Values are parsed and checked by submission.config.resolve."""
    known = {f.name for kind in CONFIGS for f in dataclasses.fields(kind)} | {"overwrite"}  # run setting, no field
    parsed = parse_overrides(overrides)
    for key in parsed:
        if key.lower() not in known:
            close = difflib.get_close_matches(key.lower(), known, n=3)
            hint = f"did you mean {', '.join(c.upper() for c in close)}? " if close else ""
            raise ValueError(f"unknown setting {key!r}: {hint}`pgolf train --help` lists the ModelConfig and "
                             "TrainConfig fields")
    return parsed


def _cmd(args: argparse.Namespace) -> int:
    check_overrides(args.overrides)
    argv = [*args.overrides, "OVERWRITE=1"] if args.overwrite else args.overrides
    held_out = held_out_at_start(argv)  # as training starts: a split made while it trains was not held out
    record_tune_split(main(argv), held_out=held_out)
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser(
        "train", help="train the recipe in this process (CPU or one GPU) and write a run directory",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Runs submission.train.main: the defaults are the recipe; upper-case environment variables named "
                    "after a field apply first, then KEY=VALUE arguments (keys are case-insensitive). Every change "
                    "is logged as an `override` line in RUN_DIR/train.log. For several GPUs run the same through "
                    "torchrun: `torchrun --nproc_per_node=8 -m tools.pipeline KEY=VALUE ...`.",
        epilog="\n\n".join([recipe_help(), settings_help(*CONFIGS)]))
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="config overrides, e.g. NUM_LAYERS=4 MAX_STEPS=100 RUN_DIR=runs/try1")
    p.add_argument("--overwrite", action="store_true",
                   help="RUN_DIR holds a run (train.log, config.json, checkpoint.pt, model.pgz, eval.json, ...): "
                        "delete its files and train in its place (refused otherwise; OVERWRITE=1 does the same)")
    p.set_defaults(func=_cmd)
