"""`pgolf seeds`: the pipeline once per seed, resumable (tools/records/seeds.py runs them)."""
from __future__ import annotations

import argparse
from pathlib import Path

from tools.records.seeds import PIPELINE, PIPELINE_TORCHRUN, SeedRunner, SeedsConfig, outcome_line
from tools.records.stats import build_report, format_report


def parse_seeds(text: str) -> list[int]:
    """`1337,42,2025` -> [1337, 42, 2025] (one argument, so KEY=VALUE overrides may follow it)."""
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds {text!r}: expected comma-separated integers, e.g. 1337,42,2025")


def _cmd_seeds(args: argparse.Namespace) -> int:
    cfg = SeedsConfig(seeds=args.seeds, out=args.out, overrides=args.overrides, gpus_per_seed=args.gpus_per_seed,
                      gpus=args.gpus.split(",") if args.gpus else None, command=args.command)
    outcomes = SeedRunner(cfg).run()
    print()
    for outcome in outcomes:
        print(outcome_line(outcome))
    failed = [o for o in outcomes if o.status == "failed"]
    results = [o.result for o in outcomes if o.result is not None]
    if results:
        print()
        print(format_report(build_report(results)))
    print(f"seeds_done:{sum(o.status == 'done' for o in outcomes)} "
          f"seeds_finished_before:{sum(o.status == 'finished' for o in outcomes)} seeds_failed:{len(failed)} "
          f"out:{cfg.out}")
    if failed:
        print(f"re-run the same command to retry seed(s) {','.join(str(o.seed) for o in failed)}: finished seeds "
              "are kept")
    return 1 if failed else 0


def add_commands(subparsers) -> None:
    parser = subparsers.add_parser(
        "seeds", help="run the pipeline for several seeds (resumable)",
        description="Run `python -m tools.pipeline SEED=<s> RUN_DIR=<out>/seed<s> KEY=VALUE...` once per seed "
                    "(train, quantize, reload, evaluate: each seed's run directory gets eval.json). Seeds whose "
                    "eval.json exists are not redone, and OUT/settings.json stores the settings they ran with "
                    "(environment and KEY=VALUE settings, command, processes per seed): resuming with others is an "
                    "error. A failed seed is reported and the others go on. With --gpus-per-seed K each seed runs "
                    "under `torchrun --standalone --nproc_per_node=K` on its own CUDA_VISIBLE_DEVICES group, as many "
                    "at once as there are groups.")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides for every seed")
    parser.add_argument("--seeds", type=parse_seeds, required=True, metavar="N,N,...",
                        help="seeds to run, comma-separated (e.g. 1337,42,2025)")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR",
                        help="folder for the run directories (DIR/seed<N>)")
    parser.add_argument("--gpus-per-seed", "--nproc", dest="gpus_per_seed", type=int, default=0, metavar="K",
                        help="GPUs per seed (torchrun processes); 0 (default): plain processes, one seed at a time")
    parser.add_argument("--gpus", metavar="IDS", help="comma-separated device ids to split into groups "
                        "(default: CUDA_VISIBLE_DEVICES, else every visible GPU)")
    parser.add_argument("--command", metavar="TEMPLATE",
                        help="command per seed instead of the pipeline, with {python} {seed} {run_dir} {nproc} "
                             f"filled in; overrides are appended (default: {PIPELINE!r}, or {PIPELINE_TORCHRUN!r} "
                             "with --gpus-per-seed)")
    parser.set_defaults(func=_cmd_seeds)
