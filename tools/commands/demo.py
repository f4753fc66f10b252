"""`make demo`: the whole kit on the shipped sample, on CPU: shards, 2 seeds (train, quantize, evaluate), pack,
statistics and a record folder with plots, all under runs/demo (the repo's records/ stays clean)."""
from __future__ import annotations

import argparse
import datetime
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from tools.records.record import folder_slug

ROOT = Path(__file__).resolve().parents[2]
# Paths relative to ROOT, where every stage runs: the record's README then shows `DATA_DIR=runs/demo/data`, not a
# path of this machine.
DEMO = Path("runs/demo")
SAMPLE = Path("data/sample/sample_wiki.jsonl.xz")
TOKENIZER = Path("data/sample/fineweb_8192_bpe.model")  # the default recipe's vocabulary
SEEDS = "1337,42"
RECORD_NAME = "Demo tiny CPU"
# 5 of the sample's Wikipedia articles are ~25k validation tokens: enough for 3 score-first TTT chunks of 8,192.
VAL_DOCS = 5

# The default recipe (sp8192) with every feature on; only sizes shrink (4 layers: layers 1-2 looped, parallel
# residuals on the last 2) so that the whole demo (2 seeds, each training, quantizing and evaluating) takes about 6
# minutes on 2 CPU cores (348 s from a fresh clone; 685 s with 4,096 tokens a step and probes on 16 sequences).
MODEL = ["NUM_LAYERS=4", "MODEL_DIM=128", "NUM_HEADS=4", "NUM_KV_HEADS=2", "XSA_LAST_N=4", "LOOP_LAYERS=1,2",
         "PARALLEL_LAST_N=2"]
TRAIN = ["SEQ_LEN=256", "TRAIN_BATCH_TOKENS=2048", "MICRO_BATCH_TOKENS=2048", "MAX_STEPS=100", "WARMUP_STEPS=2",
         "LOG_EVERY=20"]
# 16 self-generated sequences of the training length instead of the record's 64 x 2048; bit allocation's probes on
# the first 4 (on the CPU they took a minute a seed on 16). A 128-wide model's matrices (16k-49k elements) are under
# the recipe's 65,536-element fp16 passthrough: lower it so that they go through GPTQ int6 as the record's do.
QUANT = ["CALIB_SEQS=16", "CALIB_SEQ_LEN=256", "ALLOCATION_SEQS=4", "PASSTHROUGH_MAX_NUMEL=4096"]
# Windows of the training length; 8,192-token chunks so that TTT, the hash embedding and the n-gram have several
# scored chunks to learn from (the record's 32,768 would leave the whole demo set in one chunk, never trained on).
EVAL = ["CONTEXT_LEN=256", "STRIDE=64", "CHUNK_TOKENS=8192", "TTT_BATCH_SEQS=32", "COMPLIANCE_CHUNK_TOKENS=1024"]


def pgolf(*args: str) -> list[str]:
    return [sys.executable, "-m", "tools.commands.cli", *args]


def stages(today: str) -> list[tuple[str, list[str]]]:
    data, seeds, pack = DEMO / "data", DEMO / "seeds", DEMO / "pack"
    records = DEMO / "records"
    folder = records / "track_non_record_16mb" / f"{today}_{folder_slug(RECORD_NAME)}"
    overrides = [f"DATA_DIR={data}", f"TOKENIZER_PATH={TOKENIZER}", *MODEL, *TRAIN, *QUANT, *EVAL]
    return [
        ("build shards from the sample", pgolf("data", "build", str(SAMPLE), "--tokenizer", str(TOKENIZER), "--out",
                                               str(data), "--val-docs", str(VAL_DOCS), "--overwrite")),
        ("verify the shards", pgolf("data", "verify", str(data))),
        (f"seeds {SEEDS}: train, quantize, reload, evaluate (sliding + TTT + hash embedding + n-gram, compliance)",
         pgolf("seeds", "--seeds", SEEDS, "--out", str(seeds), *overrides)),
        ("pack the first seed: one train_gpt.py + model, size against the cap",
         pgolf("pack", str(seeds / f"seed{SEEDS.split(',')[0]}"), "--out", str(pack))),
        ("statistics over the seeds", pgolf("stats", str(seeds))),
        ("record folder with plots", pgolf("record", str(seeds), "--name", RECORD_NAME, "--track", "non_record_16mb",
                                           "--author", "pgolf demo", "--github-id", "pgolf-demo", "--pack-dir",
                                           str(pack), "--out", str(records), "--date", today, "--overwrite")),
        ("check the record folder", pgolf("check", str(folder))),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--resume", action="store_true",
                        help=f"keep the seeds already finished in {DEMO / 'seeds'} (default: start afresh)")
    args = parser.parse_args(argv)
    if (ROOT / DEMO).exists() and not args.resume:
        print(f"demo: removing the previous demo output {ROOT / DEMO}", flush=True)
        shutil.rmtree(ROOT / DEMO)
    plan = stages(datetime.date.today().isoformat())
    timings = []
    start = time.monotonic()
    for number, (title, cmd) in enumerate(plan, start=1):
        print(f"\n=== demo stage {number}/{len(plan)}: {title}\n$ {shlex.join(['pgolf', *cmd[3:]])}", flush=True)
        t0 = time.monotonic()
        code = subprocess.run(cmd, cwd=ROOT).returncode
        timings.append((title, time.monotonic() - t0))
        if code != 0:
            print(f"\ndemo: stage {number} ({title}) failed with exit code {code}; the output above says why "
                  f"(re-run with `python -m tools.commands.demo --resume` to keep finished seeds)", file=sys.stderr)
            return code
    print("\n=== demo done")
    for title, seconds in timings:
        print(f"stage_s:{seconds:7.1f}  {title}")
    print(f"demo_total_s:{time.monotonic() - start:.1f} output:{ROOT / DEMO}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
