#!/usr/bin/env bash
# The main job until `gamverify demo` lands: set up, generate a synthetic SOS cohort, train the sos_staging bundle
# briefly, evaluate it, and explain one test volume with Grad-CAM (NIfTI map + PNG overlay + JSON).
# Usage: bash scripts/quickstart.sh [OUT_DIR]      (env: EPOCHS, N, SIZE, NETWORK)
# NETWORK defaults to small_cnn, the bundle network that learns SOS staging in CPU minutes (see the bundle README).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-quickstart_out}
EPOCHS=${EPOCHS:-40}
N=${N:-200}
SIZE=${SIZE:-32}
NETWORK=${NETWORK:-small_cnn}
bash scripts/setup.sh
PY=.venv/bin/python
GV=.venv/bin/gamverify
mkdir -p "$OUT"
$GV synth --kind sos --n "$N" --size "$SIZE" --seed 0 --out "$OUT/data/sos" >/dev/null
echo "cohort: $OUT/data/sos"
# a private copy of the bundle, so trained weights and logs stay in OUT
rm -rf "$OUT/sos_staging" && cp -r bundles/sos_staging "$OUT/sos_staging"
B="$OUT/sos_staging"
t0=$(date +%s)
$PY -m monai.bundle run --config_file "$B/configs/train.json" --bundle_root "$B" --dataset_dir "$OUT/data/sos" \
    --network_name "$NETWORK" --num_epochs "$EPOCHS" --val_interval 2 > "$OUT/train.log" 2>&1 || { tail -20 "$OUT/train.log"; exit 1; }
echo "trained sos_staging in $(( $(date +%s) - t0 )) s (log: $OUT/train.log, TensorBoard: $B/eval/tensorboard)"
$PY -m monai.bundle run --config_file "$B/configs/evaluate.json" --bundle_root "$B" --dataset_dir "$OUT/data/sos" \
    --network_name "$NETWORK" > "$OUT/evaluate.log" 2>&1 || { tail -20 "$OUT/evaluate.log"; exit 1; }
echo "test metrics ($B/eval/metrics.csv):"
cat "$B/eval/metrics.csv"
IMG=$($PY -c "import json,sys; d=json.load(open('$OUT/data/sos/datalist.json')); print(d['test'][0]['image'])")
$GV cam --image "$OUT/data/sos/$IMG" --bundle_root "$B" --overrides "{\"network_name\": \"$NETWORK\"}" --out "$OUT/cam" > "$OUT/cam.log"
grep -v "^$" "$OUT/cam.log" | head -3
echo "done: open $OUT/cam/*.png, or load $OUT/cam/*.nii.gz over the image in 3D Slicer / ITK-SNAP"
