#!/usr/bin/env bash
# Quantization settings compared on ONE trained P1 checkpoint, on the GPU machine:
#   source .bench/prep.sh && scripts/p1_quant_variants.sh NAME "TRAIN SETTINGS" "VARIANT 1" "VARIANT 2" ...
# e.g. scripts/p1_quant_variants.sh sp8192 "RECIPE=sp8192 DATA_DIR=$BENCH_DATA8 TOKENIZER_PATH=$BENCH_TOKENIZER8" \
#        "" "LQER_RANK=4" "EMBED_BITS=7 SDCLIP_SIGMAS=11.5"
# Trains once (P1: 240 s at 98,304 tokens/step; skipped when /tmp/p1/quant_NAME already holds a checkpoint), then runs
# `pgolf quantize` per variant, side by side (an empty string: the run's recipe as is), each in its own run directory
# beside it (the checkpoint hard-linked), fitted under 16,000,000 bytes with the packed program's size, and prints
# per variant the model bytes before fitting, the codes zeroed, the clip floor, the roundtrip val_bpb and its gap to
# the EMA weights.
# Logs go to $OUT/NAME/ (default ./p1_out/NAME).
set -uo pipefail
name=${1:?usage: scripts/p1_quant_variants.sh NAME "TRAIN SETTINGS" "VARIANT" ...}
train=$2
shift 2
out=${OUT:-$(pwd)/p1_out}/$name
run=/tmp/p1/quant_$name
mkdir -p "$out"
if [ ! -f "$run/checkpoint.pt" ]; then
  rm -rf "$run"
  # shellcheck disable=SC2086  # the settings are KEY=VALUE words
  timeout "${P1_TIMEOUT:-420}" python3 -m tools.commands.cli train TRAIN_BATCH_TOKENS=98304 MAX_WALLCLOCK_SECONDS=240 \
    RUN_DIR="$run" $train > "$out/train_stdout.txt" 2>&1 ||
    { echo "training failed"; tail -5 "$out/train_stdout.txt"; exit 1; }
  cp "$run/train.log" "$run/config.json" "$out/"
fi
ema=$(grep -oP "^final_prequant val_loss:\S+ val_bpb:\K\S+" "$run/train.log" | tail -1)
echo "| variant | model bytes before fit | zeroed codes | clip floor | roundtrip val_bpb | gap to EMA ($ema) |"
echo "|---|---|---|---|---|---|"
# The variants run side by side (QUANT_JOBS at a time, default all): GPTQ holds the GPU for seconds, the rest is
# packing and the roundtrip, so one lease measures several.
i=0
for variant in "$@"; do
  i=$((i + 1))
  dir=$run/v$i && rm -rf "$dir" && mkdir -p "$dir"
  for f in checkpoint.pt train.log config.json; do ln "$run/$f" "$dir/$f"; done
  # shellcheck disable=SC2086
  timeout "${QUANT_TIMEOUT:-300}" python3 -m tools.commands.cli quantize "$dir" --quiet $variant \
    > "$out/quantize_v$i.txt" 2>&1 &
  if [ "$(jobs -rp | wc -l)" -ge "${QUANT_JOBS:-$#}" ]; then wait -n; fi
done
wait
i=0
for variant in "$@"; do
  i=$((i + 1))
  cp "$run/v$i/quantize.log" "$out/quantize_v$i.log" 2>/dev/null
  log=$out/quantize_v$i.txt
  before=$(grep -oP "model_bytes_before:\K\d+" "$log" | tail -1)
  zeroed=$(grep -oP "^budget: .* zeroed:\K\d+" "$log" | tail -1)
  floor=$(grep -oP "^clip_floor .* min_clip_sigma:\K\S+" "$log" | tail -1)
  bpb=$(grep -oP "^quantized_roundtrip_exact .* val_bpb:\K\S+" "$log" | tail -1)
  gap=-
  if [ -n "$bpb" ] && [ -n "$ema" ]; then gap=$(python3 -c "print(f'{$bpb - $ema:+.5f}')"); fi
  echo "| ${variant:-recipe as is} | ${before:-failed} | ${zeroed:--} | ${floor:-none} | ${bpb:--} | $gap |"
done
