#!/usr/bin/env bash
# Training only, proxy track P1 (one GPU, the benchmark corpus, 98,304 tokens/step, 240 s), for ablations
# measured before quantization (ms/step and the EMA val_bpb on the dev val), on the GPU machine:
#   source .bench/prep.sh && scripts/p1_train.sh NAME [KEY=VALUE ...]
# e.g. scripts/p1_train.sh key_offset KEY_OFFSET_LAST_N=11. Runs the kit's trainer (the same code the packed file
# runs) and copies train.log and config.json to $OUT/NAME (default ./p1_out/NAME); prints the summary lines.
# P1_QUANTIZE=1 then runs `pgolf quantize` on the checkpoint (GPTQ fitted under 16,000,000 bytes with the code this
# model ships with): the clip_floor line's model_bytes is the artifact's size before fitting, what an extra table costs.
set -euo pipefail
name=${1:?usage: scripts/p1_train.sh NAME [KEY=VALUE ...]}
shift
out=${OUT:-$(pwd)/p1_out}/$name
run=/tmp/p1/train_$name
rm -rf "$run" && mkdir -p "$out"
# The benchmark corpus in the run's vocabulary: sp8192 (the default recipe) unless RECIPE=sp1024 is among the settings.
data=$BENCH_DATA8 tokenizer=$BENCH_TOKENIZER8
case " $* " in *" RECIPE=sp1024 "*) data=$BENCH_DATA tokenizer=$BENCH_TOKENIZER ;; esac
rc=0
timeout "${P1_TIMEOUT:-420}" python3 -m tools.commands.cli train DATA_DIR="$data" TOKENIZER_PATH="$tokenizer" \
  TRAIN_BATCH_TOKENS=98304 MAX_WALLCLOCK_SECONDS=240 RUN_DIR="$run" "$@" > "$out/stdout.txt" 2>&1 || rc=$?
if [ "$rc" = 0 ] && [ "${P1_QUANTIZE:-0}" = 1 ]; then
  timeout 300 python3 -m tools.commands.cli quantize "$run" --quiet >> "$out/stdout.txt" 2>&1 || rc=$?
fi
for f in train.log config.json quantize.log; do
  if [ -f "$run/$f" ]; then cp "$run/$f" "$out/"; fi
done
summary="^(model|warmup|training_done|final_raw|final_ema|final_prequant|clip_floor|budget|quantized_roundtrip)"
grep -E "$summary|Error|error:" "$out/stdout.txt" | tail -14 || true
echo "$name exit status $rc"
exit $rc
