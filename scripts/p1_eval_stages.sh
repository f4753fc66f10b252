#!/usr/bin/env bash
# Every evaluation stage's gain on ONE P1 artifact, on the GPU machine:
#   source .bench/prep.sh && scripts/p1_eval_stages.sh RUN_DIR [PASS ...]
# RUN_DIR holds model.pgz (e.g. /tmp/p1/seed1337 after scripts/p1_seed.sh). Each PASS is a quoted list of
# `pgolf eval` arguments scored as a one-off beside the run's eval.json; without any, the stages of issue 21:
#   --ablation                                     flat, sliding, +ttt, +hash_embed, +ngram (the stream's stages)
#   --lora-ttt LORA_RANK=0 LORA_NGRAM=0 LORA_CHUNK=64 LORA_LATE_CHUNK=0   document-masked sliding windows alone
#   --lora-ttt LORA_PHASES=0                       LoRA TTT without the global phases, + the n-gram in stream order
#   --lora-ttt                                     eval/lora.py's defaults: + 3 global phases (every 512 documents)
# Settings chosen on the tuning split come in with "--lora-ttt --settings RUN_DIR/tune_lora.json" (pgolf eval
# RUN_DIR --lora-ttt --tune writes it).
# EVAL_ARGS: pgolf eval arguments added to every pass, e.g. "--data-dir $DATA --tokenizer $TOK" after
# `source .p1eval/prep.sh` (scripts/p1_carry.sh).
# Prints per pass its val_bpb views, C1-C4 and the 8-GPU full-val projection. Logs go to $OUT/eval_stages/.
set -uo pipefail
run=${1:?usage: scripts/p1_eval_stages.sh RUN_DIR [PASS ...]}
shift
out=${OUT:-$(pwd)/p1_out}/eval_stages
mkdir -p "$out"
if [ $# -eq 0 ]; then
  set -- "--ablation" "--lora-ttt LORA_RANK=0 LORA_NGRAM=0 LORA_CHUNK=64 LORA_LATE_CHUNK=0" \
    "--lora-ttt LORA_PHASES=0" "--lora-ttt"
fi
# EVAL_JOBS passes at a time (default 1). Side by side they share the GPU, so their seconds and projections are
# upper bounds: time a pass alone to report its projection.
i=0
for pass in "$@"; do
  i=$((i + 1))
  # shellcheck disable=SC2086  # a pass is words: flags and KEY=VALUE settings
  timeout "${PASS_TIMEOUT:-540}" python3 -m tools.commands.cli eval "$run" $pass ${EVAL_ARGS:-} \
    --out "$out/pass$i.json" > "$out/pass$i.txt" 2>&1 &
  if [ "$(jobs -rp | wc -l)" -ge "${EVAL_JOBS:-1}" ]; then wait -n; fi
done
wait
echo "| pass | views (val_bpb) | final | C1-C4 | 8-GPU projection s |"
echo "|---|---|---|---|---|"
i=0
for pass in "$@"; do
  i=$((i + 1))
  json=$out/pass$i.json
  python3 - "$json" "$pass" <<'EOF'
import json, sys
from pathlib import Path
path, name = Path(sys.argv[1]), sys.argv[2]
if not path.is_file():
    print(f"| {name} | failed (see {path.with_suffix('.txt')}) | | | |")
    sys.exit()
r = json.loads(path.read_text())
views = r.get("views") or {row["name"]: row["val_bpb"] for row in r.get("ablation", [])}
views = {k: (v["val_bpb"] if isinstance(v, dict) else v) for k, v in views.items()}
checks = "".join("p" if c["passed"] else "F" for c in r.get("compliance", {}).values()) or "-"
print(f"| {name} | {' '.join(f'{k} {v:.5f}' for k, v in views.items())} | {r['val_bpb']:.5f} | {checks} | "
      f"{r['projection']['seconds']} |")
EOF
done
