#!/usr/bin/env bash
# Evaluation-only GPU calls without training again: a P1 run's artifact carried with the dev val and the tuning split.
# Here, after scripts/p1_seed.sh came back (its $OUT/seed<SEED> folder holds model.pgz and config.json):
#   scripts/p1_carry.sh RUN_FOLDER
# writes .p1eval/ (git-ignored, ~21 MB; .bench/ is 47 MB, so the two do not travel together under a call's 64 MiB):
#   run/    the artifact and its records (model.pgz, config.json, eval.json, train.log)
#   data8/  the sp8192 dev val and the 2,000-document tuning split, no training shards: built here from .bench's
#           corpus the way scripts/p1_seed.sh builds it (`pgolf data split --tune-docs 2000`); the split goes only
#           when the run's tune_split.txt names the same fingerprint (it was held out of the run's training)
#   tok/ and whl/, and prep.sh, which installs the wheels and sets RUN (a fresh copy in /tmp), DATA and TOK.
# On the device: run(command="source .p1eval/prep.sh && python3 -m tools.commands.cli eval $RUN --data-dir $DATA
#   --tokenizer $TOK --lora-ttt --tune ...", carry=[".p1eval"]). Saves the ~7 minutes of training per session.
set -euo pipefail
src=${1:?usage: scripts/p1_carry.sh RUN_FOLDER (holding model.pgz and config.json)}
for f in model.pgz config.json; do
  [ -f "$src/$f" ] || { echo "p1_carry: $src/$f is missing: give the folder scripts/p1_seed.sh wrote" >&2; exit 2; }
done
if [ ! -f .bench/prep.sh ]; then
  echo "p1_carry: .bench/ is missing: fill it with the benchmark setup first (docs/BENCHMARKING.md)" >&2
  exit 2
fi
py=${PYTHON:-.venv/bin/python}
tmp=$(mktemp -d) && trap 'rm -rf "$tmp"' EXIT
tok=.bench/tokenizers/fineweb_8192_bpe.model
"$py" .bench/prep_shards.py .bench/docs_train.jsonl.xz "$tok" "$tmp/data8" train > /dev/null &
"$py" .bench/prep_shards.py .bench/docs_val.jsonl.xz "$tok" "$tmp/data8" val > /dev/null &
wait
"$py" -m tools.commands.cli data split "$tmp/data8" --tune-docs 2000 --quiet
rm "$tmp"/data8/fineweb_train_*.bin
new=$tmp/p1eval
mkdir -p "$new/run" "$new/tok" "$new/whl"
mv "$tmp/data8" "$new/data8"
for f in model.pgz config.json eval.json train.log tune_split.txt; do
  if [ -f "$src/$f" ]; then cp "$src/$f" "$new/run/"; fi
done
chmod -R u+w "$new"
cp "$tok" "$new/tok/" && cp .bench/whl/*.whl "$new/whl/"
fingerprint=$("$py" -m tools.commands.cli data verify "$new/data8" | sed -n 's/^tune_fingerprint://p')
# Tuning needs a run that never saw the tuning split: scripts/p1_seed.sh records the split it held out.
held_out=$(sed -n 's/^tune_fingerprint://p' "$src/tune_split.txt" 2>/dev/null || true)
if [ "$held_out" != "$fingerprint" ]; then
  rm "$new"/data8/fineweb_tune_*.bin
  echo "p1_carry: warning: $src did not train with this tuning split held out (its tune_split.txt:" \
    "${held_out:-missing}; the split: $fingerprint), so its training may hold those documents: .p1eval/ carries" \
    "the dev val only (pgolf eval --tune will refuse). Train with scripts/p1_seed.sh to tune." >&2
  fingerprint="none (dev val only)"
fi
cat > "$new/prep.sh" <<'EOF'
# Sourced on the GPU machine: the wheels, then RUN (a fresh copy of the artifact's folder), DATA and TOK.
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .p1eval/whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export RUN=/tmp/p1eval_run DATA=$PWD/.p1eval/data8 TOK=$PWD/.p1eval/tok/fineweb_8192_bpe.model
export BENCH_DATA8=$DATA  # what scripts/lora_probe.py reads
rm -rf "$RUN" && cp -r .p1eval/run "$RUN"
EOF
rm -rf .p1eval && mv "$new" .p1eval
echo "p1_carry: .p1eval/ $(du -sh .p1eval | cut -f1), tune_fingerprint $fingerprint; carry it as [\".p1eval\"]"
