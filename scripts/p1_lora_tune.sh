#!/usr/bin/env bash
# Per-document LoRA TTT settings chosen on the tuning split, then scored on the dev val, in one GPU call:
#   source .p1eval/prep.sh && scripts/p1_lora_tune.sh --grid LORA_RANK=96 --grid LORA_CHUNK=16 ...
# (.p1eval/ from scripts/p1_carry.sh, carried as [".p1eval"]). Runs `pgolf eval $RUN --lora-ttt --tune` with the
# --grid arguments given (under TUNE_S seconds, default 330), then `pgolf eval $RUN --lora-ttt` on the dev val with
# the settings it chose. Cut short by TUNE_S, the search keeps what its trials printed so far: each trial's value
# stays only if it beat the best before it, as the coordinate search decides. The whole stays under TOTAL seconds
# (default 575). The tune log, tune_lora.json and eval_lora-ttt*.json go to $OUT.
set -uo pipefail
: "${RUN:?source .p1eval/prep.sh first}" "${DATA:?}" "${TOK:?}"
out=${OUT:-./p1_out}
mkdir -p "$out"
t0=$(date +%s) total=${TOTAL:-575}
timeout "${TUNE_S:-330}" python3 -m tools.commands.cli eval "$RUN" --data-dir "$DATA" --tokenizer "$TOK" --lora-ttt \
  --tune "$@" 2>&1 | tr '\r' '\n' | grep -v '%|' | tee "$out/tune.log" | tail -30
echo "p1_lora_tune: tune took $(( $(date +%s) - t0 )) s"
if [ -f "$RUN/tune_lora.json" ]; then cp "$RUN/tune_lora.json" "$out/"; fi
# The search's choice so far, from its trial lines: a trial's value stays only if it scored below the best before it.
chosen=$(python3 - "$out/tune.log" <<'PY'
import re, sys
best, score = {}, None
for line in open(sys.argv[1]):
    if line.startswith("tune_trial"):
        kv = dict(re.findall(r"(\w+):(\S+)", line))
        if score is None or float(kv["val_bpb"]) < score:
            score = float(kv["val_bpb"])
            if kv["setting"] != "start":
                best[kv["setting"]] = kv["value"]
print(" ".join(f"{k}={v}" for k, v in best.items()))
PY
)
echo "p1_lora_tune: dev val with ${chosen:-the defaults}"
# shellcheck disable=SC2086  # chosen is KEY=VALUE words
timeout $(( total - ($(date +%s) - t0) )) python3 -m tools.commands.cli eval "$RUN" $chosen --data-dir "$DATA" \
  --tokenizer "$TOK" --lora-ttt 2>&1 | tr '\r' '\n' | grep -v '%|' | tail -40
rc=${PIPESTATUS[0]}
echo "p1_lora_tune: took $(( $(date +%s) - t0 )) s"
cp "$RUN"/eval_lora-ttt*.json "$out/" 2>/dev/null
exit "$rc"
