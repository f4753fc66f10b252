#!/usr/bin/env bash
# The ms/step column of an ablation table: `pgolf bench` per setting on ONE lease, the recipe as is timed first and
# last (its drift over the call is the noise floor), on the GPU machine:
#   source .bench/prep.sh && scripts/ablation_speed.sh "COMMON SETTINGS" "SETTING 1" "SETTING 2" ...
# e.g. scripts/ablation_speed.sh "TRAIN_BATCH_TOKENS=98304 DATA_DIR=$BENCH_DATA8" "XSA_LAST_N=0" "NUM_LOOPS=0"
# A built model runs its depth recurrence, so the steps timed are the looped ones (a P1 run's ms/step averages the
# first half without the loop and the second with it). BENCH_STEPS (default 50) timed steps after BENCH_WARMUP
# (default 8) compile/warmup steps, each setting under BENCH_TIMEOUT seconds (default 120). Logs go to
# $OUT/ablation_speed/ (default ./p1_out/ablation_speed).
set -uo pipefail
common=${1?usage: scripts/ablation_speed.sh "COMMON SETTINGS" "SETTING" ...}
shift
out=${OUT:-$(pwd)/p1_out}/ablation_speed
mkdir -p "$out"
settings=("" "$@" "")
: > "$out/ms.tsv"
for i in "${!settings[@]}"; do
  # shellcheck disable=SC2086  # the settings are KEY=VALUE words
  timeout "${BENCH_TIMEOUT:-120}" python3 -m tools.commands.cli bench $common ${settings[$i]} \
    --steps "${BENCH_STEPS:-50}" --warmup "${BENCH_WARMUP:-8}" > "$out/bench_$i.txt" 2>&1
  printf '%s\t%s\n' "${settings[$i]}" "$(grep -oP "\bms_per_step:\K\S+" "$out/bench_$i.txt" | tail -1)" >> "$out/ms.tsv"
done
python3 - "$out/ms.tsv" <<'PY'
import sys
rows = [line.rstrip("\n").split("\t") for line in open(sys.argv[1])]
first, last = rows[0][1], rows[-1][1]
base = [float(v) for v in (first, last) if v]
mean = sum(base) / len(base) if base else None
print(f"recipe as is: {first or 'failed'} ms/step first, {last or 'failed'} last"
      + (f" (mean {mean:.2f})" if mean else ""))
print("| setting | ms/step | vs the recipe |")
print("|---|---|---|")
for i, (setting, ms) in enumerate(rows[1:-1], start=1):
    delta = f"{float(ms) - mean:+.2f}" if ms and mean else "-"
    print(f"| {setting} | {ms or f'failed (bench_{i}.txt)'} | {delta} |")
PY
