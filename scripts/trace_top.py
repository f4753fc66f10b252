"""The GPU kernels of a `pgolf bench --trace` file, grouped by name: time per step, calls, share of the total.

    python3 scripts/trace_top.py TRACE.json[.gz] [--steps 2] [--top 40] [--order]

--order prints instead every kernel of one step in launch order (to see what Inductor fused where).
"""
from __future__ import annotations

import argparse
import gzip
import json
from collections import defaultdict


def kernels(path: str) -> list[dict]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        events = json.load(f)["traceEvents"]
    return sorted((e for e in events if e.get("cat") == "kernel" and e.get("ph") == "X"), key=lambda e: e["ts"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("trace")
    p.add_argument("--steps", type=int, default=2, help="profiled steps in the trace (bench --profile-steps)")
    p.add_argument("--top", type=int, default=40)
    p.add_argument("--order", action="store_true")
    p.add_argument("--width", type=int, default=110, help="kernel names are cut to this many characters")
    args = p.parse_args()
    ks = kernels(args.trace)
    if args.order:
        for e in ks[: len(ks) // args.steps]:
            print(f"{e['dur']:9.1f} us  {e['name'][:args.width]}")
        return
    total, calls = defaultdict(float), defaultdict(int)
    for e in ks:
        total[e["name"]] += e["dur"]
        calls[e["name"]] += 1
    whole = sum(total.values())
    print(f"{'ms/step':>8} {'calls':>6} {'share':>6}  kernel  (all kernels: {whole / 1000 / args.steps:.2f} ms/step)")
    for name, us in sorted(total.items(), key=lambda kv: -kv[1])[: args.top]:
        print(f"{us / 1000 / args.steps:8.3f} {calls[name] // args.steps:6d} {us / whole:6.1%}  {name[:args.width]}")


if __name__ == "__main__":
    main()
