"""`pgolf bundle ENTRY --out DIR`: the packed train_gpt.py alone, for inspection (tools/pack/bundle/ makes it)."""
from __future__ import annotations

import argparse
from pathlib import Path

from tools.pack.bundle import bundle, count_or_off, find_kit_root, short_globals, write_bundle


def _cmd_bundle(args: argparse.Namespace) -> int:
    kit_root = args.kit_root or find_kit_root(args.entry)
    result = bundle(args.entry, kit_root, short_names=not args.long_names, short_messages=not args.full_messages,
                    encoding="base85" if args.base85 else "ascii", optional=tuple(args.optional))
    script = write_bundle(result, args.out)
    for module in result.modules:
        print(f"module:{module}")
    for line in result.renamed:
        print(f"renamed:{line}")
    for line in short_globals(result):
        print(f"short_name:{line}")
    for line in result.pruned:
        print(f"pruned:{line}")
    for line in result.warnings:
        print(f"warning:{line}")
    short = result.short_names
    renames = (f"short_names:{len(short.private_globals) + short.locals + short.parameters} short_globals:"
               f"{len(short.private_globals)} short_locals:{short.locals} short_params:{short.parameters} "
               if short else "short_names:off ")
    messages = f"short_messages:{count_or_off(result.short_messages)} "
    print(f"bundle:{script} source_sha256:{result.sha256[:16]} readable_bytes:{result.sizes.readable} "
          f"long_names_bytes:{result.sizes.long_names} minified_bytes:{result.sizes.minified} {renames}{messages}"
          f"compressed_bytes:{result.sizes.compressed} packed_bytes:{result.sizes.packed} packing:{result.packing!r}")
    return 0


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("bundle", help="inline the kit modules ENTRY imports into one packed train_gpt.py "
                                             "(for inspection; `pgolf pack` ships it with the model)")
    p.add_argument("entry", type=Path, help="entry script, e.g. submission/train_gpt.py")
    p.add_argument("--out", type=Path, required=True, help="folder for train_gpt.py and train_gpt.py.sha256")
    p.add_argument("--kit-root", type=Path, default=None,
                   help="folder holding the kit packages (default: the folder above ENTRY's top-level package)")
    p.add_argument("--long-names", action="store_true",
                   help="keep every name as written (default: variables whose names provably do not matter get short "
                        "ones; the short_name: lines map the renamed private functions back)")
    p.add_argument("--full-messages", action="store_true",
                   help="keep raise messages as written (default: each becomes 'kit/path.py:LINE values', the kit file "
                        "and line holding the full text; about 3 KB smaller packed)")
    p.add_argument("--base85", action="store_true",
                   help="encode the compressed payload (brotli or lzma) as base85 (default: the smaller of base85 and "
                        "base93, 1.2234 ASCII chars per byte against 1.25 but a longer stub; base93 is ~600 bytes "
                        "smaller on the pipeline)")
    p.add_argument("--optional", action="append", default=[], metavar="MODULE",
                   help="also pack this lazily imported kit module (repeatable): submission.switches when a speedrun "
                        "switch (KEY_OFFSET_LAST_N, LAYER_BIGRAM_BUCKETS, EMBED2) will be on; `pgolf pack` decides "
                        "from the run's config")
    p.set_defaults(func=_cmd_bundle)
