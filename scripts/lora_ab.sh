#!/usr/bin/env bash
# The LoRA pass's speed, two versions of eval/lora.py on the same GPU, alternating (hosts differ up to 1.4x in this
# eager, dispatch-bound pass, so only a same-host A/B compares them). Here:
#   mkdir -p .ab && git show REV:eval/lora.py > .ab/lora_old.py    (.ab/ is ignored: carry it)
# then on the GPU machine (carry [".bench", ".ab"]):
#   source .bench/prep.sh && scripts/lora_ab.sh .ab/lora_old.py [--docs 256] [--no-verify] [LORA_<FIELD>=VALUE ...]
# Runs scripts/lora_probe.py with the working tree's eval/lora.py ("new") and with the given file in its place
# ("old", from a copy of the tree in $LORA_AB_DIR, default /tmp/lora_ab), in the order AB_ORDER (default "new old"),
# and prints each one's probe line (tokens/s, the 8-GPU projection, the mean NLL, which must match).
set -uo pipefail
old=${1:?usage: scripts/lora_ab.sh OLD_LORA_PY [lora_probe.py arguments]}
shift
[ -f "$old" ] || { echo "lora_ab: $old is missing (git show REV:eval/lora.py > $old)" >&2; exit 2; }
here=$PWD copy=${LORA_AB_DIR:-/tmp/lora_ab}
rm -rf "$copy" && mkdir -p "$copy" && cp -r eval submission scripts tools "$copy/" && cp "$old" "$copy/eval/lora.py"
for v in ${AB_ORDER:-new old}; do
  dir=$here
  if [ "$v" = old ]; then dir=$copy; fi
  echo "== $v: $dir/eval/lora.py"
  (cd "$dir" && PYTHONPATH=$dir${PYTHONPATH:+:$PYTHONPATH} python3 scripts/lora_probe.py "$@" 2>&1 \
    | grep -E "^docs|^C[1-4] |^compliance|Error" | head -8)
done
