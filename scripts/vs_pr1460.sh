#!/usr/bin/env bash
# The kit configured like the PR #1460 record script against the script itself, same GPU lease, on the GPU machine:
#   source .bench/prep.sh && scripts/vs_pr1460.sh STEPS [KEY=VALUE ...]      (KEY=VALUE: extra kit settings)
# Both train STEPS steps of 98,304 tokens on the sp8192 benchmark corpus, seed 1337, on step-based schedules (depth
# recurrence from step STEPS/2, warmdown over the last 2/3), then score their raw weights on the dev val. The kit runs
# RECIPE=sp8192 with what the script lacks turned off (SmearGate, late QAT). Prints the train loss every 50 steps side
# by side, each one's tokens/s (compile and warmup excluded) and val_bpb at STEPS; logs go to $OUT/vs_pr1460/.
# KIT_LOG=FILE compares against that kit train.log (an earlier call's, carried) instead of training the kit again, so
# the script may have the whole call (PR1460_TIMEOUT=540: its own validation at STEPS compiles for minutes); the
# tokens/s ratio then compares two leases.
set -uo pipefail
steps=${1:?usage: scripts/vs_pr1460.sh STEPS [KEY=VALUE ...]}
shift
out=${OUT:-$(pwd)/p1_out}/vs_pr1460
mkdir -p "$out"
if [ -n "${KIT_LOG:-}" ]; then
  cp "$KIT_LOG" "$out/kit_train.log" || exit 1
  echo "kit: not trained again, its log is $KIT_LOG (tokens/s from another lease)"
else
  rm -rf /tmp/vs_kit
  timeout "${KIT_TIMEOUT:-300}" python3 -m tools.commands.cli train RECIPE=sp8192 DATA_DIR="$BENCH_DATA8" \
    TOKENIZER_PATH="$BENCH_TOKENIZER8" TRAIN_BATCH_TOKENS=98304 MAX_STEPS="$steps" MAX_WALLCLOCK_SECONDS=1000000 \
    SMEAR_GATE=0 QAT_THRESHOLD=0 RUN_DIR=/tmp/vs_kit "$@" > "$out/kit_stdout.txt" 2>&1
  echo "kit exit $?"
  cp /tmp/vs_kit/train.log "$out/kit_train.log" 2>/dev/null
fi
OUT=$out PR1460_TIMEOUT=${PR1460_TIMEOUT:-300} .bench/anchors/run-pr1460 MAX_WALLCLOCK_SECONDS=0 ITERATIONS="$steps" \
  TRAIN_LOG_EVERY=50 VAL_LOSS_EVERY=0 > /dev/null
python3 - "$out/kit_train.log" "$out/pr1460.log" "$steps" <<'EOF'
import re, sys
kit, ref, steps = open(sys.argv[1]).read(), open(sys.argv[2]).read(), int(sys.argv[3])
k_loss = {int(a): float(b) for a, b in re.findall(r"^step:(\d+) train_loss:(\S+)$", kit, re.M)}
r_loss = {int(a): float(b) for a, b in re.findall(r"^(\d+)/\d+ train_loss: (\S+)", ref, re.M)}
r_tps = [float(t) for t in re.findall(r"tok/s: (\d+)", ref)]
k_tps = [float(t) for t in re.findall(r"tokens_per_s:(\d+)", kit)]
k_val = re.search(r"^final_raw val_loss:(\S+) val_bpb:(\S+)", kit, re.M)
r_val = re.search(rf"^{steps}/{steps} val_loss: (\S+) val_bpb: (\S+)", ref, re.M)
print("| step | kit train loss | PR #1460 train loss | difference |\n|---|---|---|---|")
diffs = []
for s in sorted(set(k_loss) & set(r_loss)):
    if s % 50 == 0:
        diffs.append(k_loss[s] - r_loss[s])
        print(f"| {s} | {k_loss[s]:.4f} | {r_loss[s]:.4f} | {diffs[-1]:+.4f} |")
if diffs:
    print(f"mean difference over {len(diffs)} logged steps: {sum(diffs) / len(diffs):+.4f} nats")
print("| system | tokens/s at the end | val_bpb at step", steps, "(raw weights) |\n|---|---|---|")
print(f"| kit | {k_tps[-1] if k_tps else float('nan'):,.0f} | {k_val[2] if k_val else '-'} |")
print(f"| PR #1460 | {r_tps[-1] if r_tps else float('nan'):,.0f} | {r_val[2] if r_val else '-'} |")
if k_tps and r_tps:
    print(f"tokens/s ratio kit / script: {k_tps[-1] / r_tps[-1]:.2f}")
EOF
