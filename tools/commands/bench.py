"""`pgolf bench`: training throughput, a profiled step and the loss curve (tools/bench.py measures them)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from submission.config import ModelConfig, TrainConfig, parse_overrides, resolve
from tools.bench import WINDOW, compare_curves, read_curve, run_bench, window_means
from tools.commands.cli import path_arg


def _cmd(args: argparse.Namespace) -> int:
    model_cfg, cfg = ModelConfig(), TrainConfig()
    reference = read_curve(args.against) if args.against else None  # a bad file fails before the bench runs
    for line in resolve(model_cfg, cfg, cli=parse_overrides(args.overrides)):
        print(f"override {line}")
    if args.trace and not args.profile_steps:
        raise ValueError("--trace needs --profile-steps > 0 (the trace is the profiled steps')")
    result = run_bench(model_cfg, cfg, args.steps, args.warmup, args.profile_steps, args.top, args.trace)
    profile, curve = result.pop("profile", None), result.pop("loss_curve")
    print(" ".join(f"{k}:{v}" for k, v in result.items()))
    windows = window_means(curve)
    print("loss_by_window " + (" ".join(f"{end}:{mean:.4f}" for end, mean in windows) if windows else
                               f"none (windows are {WINDOW} steps from a fresh model; this run had {len(curve)})"))
    if profile:
        print(profile)
    if args.curve_out:
        tmp = Path(args.curve_out).with_suffix(".tmp")
        tmp.write_text(json.dumps({**result, "overrides": args.overrides, "loss_curve": curve}))
        tmp.replace(args.curve_out)
        print(f"curve_written path:{args.curve_out} steps:{len(curve)}")
    if reference is not None:
        rows = compare_curves(curve, reference)
        if not rows:
            raise ValueError(f"this bench ran {len(curve)} steps: fewer than one {WINDOW}-step window to compare")
        for row in rows:
            print(f"curve_window step:{row['step']} loss:{row['a']:.4f} against:{row['b']:.4f} "
                  f"diff:{row['diff']:+.5f} t:{row['t']:.2f}")
        worst = max(abs(r["t"]) for r in rows)
        verdict = "within_noise" if worst < args.max_t else "shifted"
        print(f"curve_check against:{args.against} windows:{len(rows)} max_abs_diff:"
              f"{max(abs(r['diff']) for r in rows):.5f} max_abs_t:{worst:.2f} verdict:{verdict}")
        return 0 if verdict == "within_noise" else 1
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("bench", help="measure training throughput (tokens/s, ms/step, MFU), profile a step, record "
                                     "the loss curve",
                       description="Times the default recipe's training step (plus KEY=VALUE overrides) on real "
                                   "shards from DATA_DIR when present, random tokens otherwise.")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. TRAIN_BATCH_TOKENS=98304")
    p.add_argument("--steps", type=int, default=30, help="timed steps (default 30)")
    p.add_argument("--warmup", type=int, default=10, help="untimed compile/warmup steps (default 10)")
    p.add_argument("--profile-steps", type=int, default=3, help="steps under torch.profiler for the op table "
                                                                 "(0: no profile)")
    p.add_argument("--top", type=int, default=10, help="rows of the op table, by self GPU time (default 10)")
    p.add_argument("--trace", metavar="JSON", type=path_arg("file", output=True),
                   help="write the profiled steps as a Chrome trace (open in chrome://tracing or ui.perfetto.dev)")
    p.add_argument("--curve-out", metavar="JSON", type=path_arg("file", output=True),
                   help="write the figures and the per-step loss curve here")
    p.add_argument("--against", metavar="JSON", type=path_arg("file", fix="write one with `pgolf bench --curve-out "
                                                                         "FILE`"),
                   help="compare this run's loss curve, 50-step window by window, with one written by --curve-out "
                        "(exit 1 if shifted)")
    p.add_argument("--max-t", type=float, default=4.0, help="paired-t bound per window for 'within noise' (default 4)")
    p.set_defaults(func=_cmd)
