#!/usr/bin/env bash
# Per-document LoRA TTT settings chosen on the tuning split, then scored on the dev val, in one GPU call:
#   source .p1eval/prep.sh && scripts/p1_lora_tune.sh --grid LORA_RANK=96 --grid LORA_PHASE_LR=0.006 ...
# (.p1eval/ from scripts/p1_carry.sh, carried as [".p1eval"]; or RUN, DATA and TOK set by hand). Runs
# `pgolf eval $RUN --lora-ttt --tune --tune-seconds $TUNE_S` with the --grid arguments given (default TUNE_S 330: a
# search cut short keeps the best of the trials it ran, and says so), then `pgolf eval $RUN --lora-ttt --settings
# $RUN/tune_lora.json` on the dev val. KEY=VALUE arguments (settings held fixed) apply to both, except that the
# dev-val pass drops those the grid searched (the search's choice holds there; e.g. a resumed search's old base).
# The whole stays under TOTAL seconds (default 575). RESUME=FILE goes on with the earlier search that FILE (its
# tune_lora.json, carried in) holds: its trials are taken, not scored again (--resume). The tune log,
# tune_lora.json and eval_lora-ttt*.json go to $OUT.
set -uo pipefail
: "${RUN:?source .p1eval/prep.sh first}" "${DATA:?}" "${TOK:?}"
out=${OUT:-./p1_out}
mkdir -p "$out"
t0=$(date +%s) total=${TOTAL:-575}
grid=() fixed=()  # --grid KEY=V1,V2 pairs for the search; KEY=VALUE settings (right after RUN_DIR) for both passes
while [ $# -gt 0 ]; do
  if [ "$1" = --grid ] && [ $# -gt 1 ]; then grid+=("$1" "$2"); shift 2; else fixed+=("$1"); shift; fi
done
resume=()
if [ -n "${RESUME:-}" ]; then resume=(--resume "$RESUME"); fi
scoring=()  # the dev-val pass's fixed settings: not those the grid searched (KEY=VALUE would beat the search's choice)
for kv in ${fixed[@]+"${fixed[@]}"}; do
  key=${kv%%=*} searched=0
  for ((i = 1; i < ${#grid[@]}; i += 2)); do
    g=${grid[i]%%=*}
    if [ "${g^^}" = "${key^^}" ]; then searched=1; fi
  done
  if [ "$searched" = 0 ]; then scoring+=("$kv"); fi
done
rm -f "$RUN/tune_lora.json"
timeout "$total" python3 -m tools.commands.cli eval "$RUN" "${fixed[@]}" --data-dir "$DATA" --tokenizer "$TOK" \
  --lora-ttt --tune --tune-seconds "${TUNE_S:-330}" "${grid[@]}" "${resume[@]}" 2>&1 | tr '\r' '\n' | grep -v '%|' \
  | tee "$out/tune.log" | tail -30
echo "p1_lora_tune: tune took $(( $(date +%s) - t0 )) s"
if [ ! -f "$RUN/tune_lora.json" ]; then
  echo "p1_lora_tune: the search wrote no $RUN/tune_lora.json (see $out/tune.log)" >&2
  exit 1
fi
cp "$RUN/tune_lora.json" "$out/"
timeout $(( total - ($(date +%s) - t0) )) python3 -m tools.commands.cli eval "$RUN" "${scoring[@]}" --data-dir "$DATA" \
  --tokenizer "$TOK" --lora-ttt --settings "$RUN/tune_lora.json" 2>&1 | tr '\r' '\n' | grep -v '%|' | tail -40
rc=${PIPESTATUS[0]}
echo "p1_lora_tune: took $(( $(date +%s) - t0 )) s"
cp "$RUN"/eval_lora-ttt*.json "$out/" 2>/dev/null
exit "$rc"
