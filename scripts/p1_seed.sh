#!/usr/bin/env bash
# One seed of proxy track P1 (one GPU, the benchmark corpus, 98,304 tokens/step, 240 s) run with the PACKED
# submission, on the GPU machine:
#   source .bench/prep.sh && scripts/p1_seed.sh SEED [KEY=VALUE ...]
# Trains on a copy of the corpus with 2,000 training documents held out as the tuning split (`pgolf data split`;
# its report goes to tune_split.txt, so that eval settings tuned later are tuned on documents the run never saw;
# scripts/p1_carry.sh checks it). Bundles submission/train_gpt.py into /tmp/p1/pack, runs that single file from its
# folder (train 240 s at 98,304 tokens/step -> self-calibrated GPTQ -> model.pgz -> reload -> legal eval), then
# copies the run's train.log, eval.json, config.json, model.pgz, tune_split.txt and the packed train_gpt.py to
# $OUT/seed<SEED> (default ./p1_out).
set -euo pipefail
seed=${1:?usage: scripts/p1_seed.sh SEED [KEY=VALUE ...]}
shift
kit=$(pwd)
out=${OUT:-$kit/p1_out}/seed$seed
pack=/tmp/p1/pack run=/tmp/p1/seed$seed
rm -rf "$run" && mkdir -p "$pack" "$out"
# Bundled for these settings: a speedrun switch turned on packs submission/switches.py as well.
python3 -c "import sys; from pathlib import Path
from submission.config import ModelConfig, TrainConfig, parse_overrides, resolve
from tools.pack.bundle import write_bundle; from tools.pack.ship import bundle_entry
m, t = ModelConfig(), TrainConfig(); known = {*vars(m), *vars(t)}
resolve(m, t, cli={k: v for k, v in parse_overrides(sys.argv[2:]).items() if k.lower() in known})
r = bundle_entry(m); write_bundle(r, Path(sys.argv[1]))
print(f'packed train_gpt.py: {r.sizes.packed} bytes, source sha256 {r.sha256[:16]}, modules {len(r.modules)}')" \
  "$pack" "$@"
# The benchmark corpus in the run's vocabulary: sp8192 (the default recipe) unless RECIPE=sp1024 is among the settings.
corpus=$BENCH_DATA8 tokenizer=$BENCH_TOKENIZER8
case " $* " in *" RECIPE=sp1024 "*) corpus=$BENCH_DATA tokenizer=$BENCH_TOKENIZER ;; esac
data=/tmp/p1/data_seed$seed
rm -rf "$data" && cp -r "$corpus" "$data"
python3 -m tools.commands.cli data split "$data" --tune-docs 2000 --quiet > "$out/tune_split.txt"
cd "$pack"
rc=0
timeout "${P1_TIMEOUT:-570}" python3 train_gpt.py DATA_DIR="$data" TOKENIZER_PATH="$tokenizer" \
  TRAIN_BATCH_TOKENS=98304 MAX_WALLCLOCK_SECONDS=240 SEED="$seed" RUN_DIR="$run" "$@" > "$out/stdout.txt" 2>&1 || rc=$?
cp train_gpt.py train_gpt.py.sha256 "$out/"
if [ -d "$run" ]; then cp "$out/tune_split.txt" "$run/"; fi  # what `pgolf eval RUN_DIR --tune` checks
for f in train.log eval.json config.json model.pgz; do
  if [ -f "$run/$f" ]; then cp "$run/$f" "$out/"; fi
done
grep -v "override setting\|^step:" "$out/stdout.txt" | tr '\r' '\n' | grep -v "%|" | tail -70
echo "exit status $rc"
exit $rc
