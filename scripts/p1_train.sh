#!/usr/bin/env bash
# Training only, proxy track P1 (../shared/docs/BENCHMARK.md: 1 x H100, 98,304 tokens/step, 240 s), for ablations
# measured before quantization (ms/step and the EMA val_bpb on the dev val), on the GPU machine:
#   source .bench/prep.sh && scripts/p1_train.sh NAME [KEY=VALUE ...]
# e.g. scripts/p1_train.sh key_offset KEY_OFFSET_LAST_N=11. Runs the kit's trainer (the same code the packed file
# runs) and copies train.log and config.json to $OUT/NAME (default ./p1_out/NAME); prints the summary lines.
set -euo pipefail
name=${1:?usage: scripts/p1_train.sh NAME [KEY=VALUE ...]}
shift
out=${OUT:-$(pwd)/p1_out}/$name
run=/tmp/p1/train_$name
rm -rf "$run" && mkdir -p "$out"
rc=0
timeout "${P1_TIMEOUT:-420}" python3 -m tools.cli train DATA_DIR="$BENCH_DATA" TOKENIZER_PATH="$BENCH_TOKENIZER" \
  TRAIN_BATCH_TOKENS=98304 MAX_WALLCLOCK_SECONDS=240 RUN_DIR="$run" "$@" > "$out/stdout.txt" 2>&1 || rc=$?
for f in train.log config.json; do
  if [ -f "$run/$f" ]; then cp "$run/$f" "$out/"; fi
done
grep -E "^(model|warmup|training_done|final_raw|final_ema|final_prequant)|Error" "$out/stdout.txt" | tail -12
echo "$name exit status $rc"
exit $rc
