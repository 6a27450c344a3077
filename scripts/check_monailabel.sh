#!/usr/bin/env bash
# Start a real MONAI Label server (127.0.0.1) with the gamverify app shipped in the package (a classification bundle
# and a model-zoo-style segmentation bundle), send good and bad requests with curl, print one line per check, stop the
# server and exit non-zero if a check failed.
#
#   ML_VENV=/work/ml-venv bash scripts/check_monailabel.sh         # MONAI Label's own venv (numpy<2)
#
# The venv: python3 -m venv $ML_VENV && $ML_VENV/bin/pip install torch==2.13.0 \
#           && $ML_VENV/bin/pip install monailabel==0.8.5 'pydicom==2.4.5'
# This package is installed into that venv with pip (`pip install $REPO`, no PYTHONPATH), beside MONAI Label: the same
# resolution a clinic gets from `pip install monailabel==0.8.5 monai-gamverify` (tests/test_install.py checks it).
# The bundle gets small untrained weights (small_cnn, width 4, 16^3) made here: the checks are about serving, not
# about the model. Bounded: at most 240 s to start, N_TIMED (default 7) timed requests per route.
set -euo pipefail

ML_VENV=${ML_VENV:-/work/ml-venv}
PORT=${PORT:-8765}
N_TIMED=${N_TIMED:-7}
REPO=$(cd "$(dirname "$0")/.." && pwd)
if [ ! -x "$ML_VENV/bin/monailabel" ]; then
    echo "SKIP: no MONAI Label in $ML_VENV (see the install line at the top of this script)"
    exit 0
fi
WORK=$(mktemp -d /tmp/check_monailabel.XXXXXX)
SERVER_TMP="$WORK/server_tmp"
mkdir -p "$SERVER_TMP"
# the launcher runs `python -m monailabel.main` from PATH: the venv's bin must come first
export PATH="$ML_VENV/bin:$PATH"
unset PYTHONPATH
echo "== pip install $REPO into $ML_VENV (beside monailabel; torch and pydicom kept as installed)"
"$ML_VENV/bin/python" -m pip install -q --disable-pip-version-check "$REPO" torch=="$("$ML_VENV/bin/python" -c \
    'import torch; print(torch.__version__.split("+")[0])')" pydicom=="$("$ML_VENV/bin/python" -c \
    'import pydicom; print(pydicom.__version__)')" 2> >(grep -v "^WARNING: Location" >&2)
cd "$WORK"  # not the repository: the installed package, not the checkout, is imported
"$ML_VENV/bin/python" -c "import monai_gamverify, monailabel, os, sys; print('monai_gamverify', monai_gamverify.__version__, \
    'from', os.path.dirname(monai_gamverify.__file__), '| monailabel', monailabel.__version__)"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
URL="http://127.0.0.1:$PORT"
SERVER_PID=""
cleanup() {
    if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill "$SERVER_PID" 2>/dev/null || true
        for _ in $(seq 1 20); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.5; done
        kill -9 "$SERVER_PID" 2>/dev/null || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT

# no spaces: the `monailabel` launcher passes its arguments on unquoted ($*), so a space splits a --conf value
OVR='{"network_name":"small_cnn","networks#small_cnn#width":4,"roi_size":[16,16,16],"pixdim":[2.5,2.5,2.5]}'

echo "== app, bundle, studies"
python -m monai_gamverify.apps.integrations.monailabel app --out "$WORK/app" | head -1
mkdir -p "$WORK/app/model/sos_staging"
cp -r "$REPO/bundles/sos_staging/configs" "$WORK/app/model/sos_staging/"
python - "$WORK" "$OVR" "$REPO" <<'EOF'
import json, sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import torch

from monai_gamverify.bundle import load_bundle
from monai_gamverify.metrics.similarity import DEFAULT_METRICS
from monai_gamverify.verification.verifier import SuitabilityVerifier

work, ovr = Path(sys.argv[1]), json.loads(sys.argv[2])
bundle = work / "app" / "model" / "sos_staging"
torch.manual_seed(0)
net = load_bundle(bundle, overrides=ovr, require_weights=False, device="cpu").network
(bundle / "models").mkdir(exist_ok=True)
torch.save(net.state_dict(), bundle / "models" / "model.pt")
studies = work / "studies"
studies.mkdir()
rng = np.random.default_rng(0)
for i in range(3):
    vol = rng.normal(0, 300, (24, 26, 22))
    vol[6 + i : 14 + i, 8:16, 5:12] += 1200
    aff = np.diag([1.5, 1.25, 2.0, 1.0])
    nib.save(nib.Nifti1Image(vol.astype(np.int16), aff), str(studies / f"case_{i}.nii.gz"))
(studies / "corrupt.nii.gz").write_bytes(b"\x1f\x8b not a nifti" + rng.bytes(200))
nib.save(nib.Nifti1Image(rng.normal(size=(24, 24)).astype(np.float32), np.eye(4)), str(studies / "flat2d.nii.gz"))
grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, 16)] * 3, indexing="ij"))
ref = np.exp(-(grid**2).sum(0) * 2).astype(np.float32)
nib.save(nib.Nifti1Image(ref, np.eye(4)), str(work / "reference_map.nii.gz"))
table = pd.DataFrame(rng.uniform(0, 1, (40, len(DEFAULT_METRICS))), columns=list(DEFAULT_METRICS))
table["label"] = (table["cosine"] > 0.5).astype(int)
SuitabilityVerifier(n_estimators=15, random_state=0).fit(table).save(work / "verifier.skops")
# a segmentation bundle in the model zoo's form (MONAI UNet, SlidingWindowInferer, channel_def background/spleen)
sys.path.insert(0, str(Path(sys.argv[3]) / "tests"))
from _zoo_bundles import write_seg_bundle  # noqa: E402

write_seg_bundle(work / "app" / "model" / "seg_tiny", fmt="json", seed=4)
EOF
echo "check_bundle_for_monailabel without overrides: $(python -m monai_gamverify.apps.integrations.monailabel check \
    "$WORK/app/model/sos_staging" | python -c 'import json,sys; r=json.load(sys.stdin); print("ok" if r["ok"] else "problem: " + r["problems"][0][:160])' || true)"
echo "check_bundle_for_monailabel with overrides:    $(python -m monai_gamverify.apps.integrations.monailabel check \
    "$WORK/app/model/sos_staging" --overrides "$OVR" | python -c 'import json,sys; r=json.load(sys.stdin); print("ok" if r["ok"] else r["problems"])')"

echo "== start_server"
T0=$(date +%s)
TMPDIR="$SERVER_TMP" monailabel start_server --app "$WORK/app" --studies "$WORK/studies" --host 127.0.0.1 \
    --port "$PORT" --conf gamverify_overrides "{\"sos_staging\":$OVR}" \
    --conf gamverify_reference "{\"sos_staging\":\"$WORK/reference_map.nii.gz\"}" \
    --conf gamverify_verifier "{\"sos_staging\":\"$WORK/verifier.skops\"}" \
    > "$WORK/server.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 1 240); do
    if curl -sf "$URL/info/" -o "$WORK/info.json"; then break; fi
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then echo "server exited:"; tail -30 "$WORK/server.log"; exit 1; fi
    sleep 1
done
[ -s "$WORK/info.json" ] || { echo "server not up after 240 s"; tail -30 "$WORK/server.log"; exit 1; }
echo "server up after $(( $(date +%s) - T0 )) s"

FAILED=0
check() {  # name expected_status actual_status detail
    local ok="ok"; [ "$2" = "$3" ] || { ok="FAIL"; FAILED=1; }
    printf '%-4s %-38s HTTP %s (expected %s) %s\n' "$ok" "$1" "$3" "$2" "$4"
}
req() {  # out_file url -> prints status
    curl -s -o "$1" -w '%{http_code}' -X POST "$2"
}
body() { head -c 220 "$1" | tr '\n' ' '; }

python - "$WORK/info.json" <<'EOF'
import json, sys
info = json.load(open(sys.argv[1]))
m, g = info["models"]["sos_staging"], info["models"]["seg_tiny"]
print(f"ok   GET /info/: models {sorted(info['models'])}, type {m['type']}, labels {sorted(m['labels'], key=m['labels'].get)}")
print(f"ok   GET /info/: seg_tiny type {g['type']}, labels {g['labels']}")
EOF

s=$(req "$WORK/r.json" "$URL/infer/sos_staging?image=case_0&output=json")
check "infer json" 200 "$s" "$(python -c 'import json,sys; r=json.load(open(sys.argv[1])); print(r["label"], r["suitability"]["verdict"], "p=%.3f" % r["suitability"]["p_suitable"], "cam:", {k: r["cam"][k] for k in ("in_response", "path", "shape")})' "$WORK/r.json")"
s=$(curl -s -D "$WORK/h.txt" -o "$WORK/r.multipart" -w '%{http_code}' -X POST "$URL/infer/sos_staging?image=case_1&output=all")
check "infer all (multipart)" 200 "$s" "$(python - "$WORK/r.multipart" "$WORK/h.txt" <<'EOF'
import gzip, io, json, sys
import nibabel as nib
from requests_toolbelt import MultipartDecoder
ctype = next(l.split(":", 1)[1].strip() for l in open(sys.argv[2]) if l.lower().startswith("content-type"))
parts = MultipartDecoder(open(sys.argv[1], "rb").read(), ctype).parts
names = [p.headers.get(b"Content-Disposition", b"").decode() for p in parts]
params = json.loads(next(p.text for p, n in zip(parts, names) if 'name="params"' in n))
cam = next(p.content for p, n in zip(parts, names) if 'name="image"' in n)
img = nib.Nifti1Image.from_bytes(gzip.decompress(cam))
print(f"parts {len(parts)}; CAM NIfTI {img.shape} range [{img.get_fdata().min():.2f}, {img.get_fdata().max():.2f}]; label {params['label']}")
EOF
)"
s=$(req "$WORK/r.nii.gz" "$URL/infer/sos_staging?image=case_2&output=image")
check "infer image (CAM NIfTI body)" 200 "$s" "$(python -c 'import nibabel as nib,sys; i=nib.load(sys.argv[1]); print(i.shape, "affine diag", [round(float(v), 2) for v in i.affine.diagonal()[:3]])' "$WORK/r.nii.gz")"
s=$(req "$WORK/e.json" "$URL/infer/sos_staging?image=no_such_case&output=json");  check "unknown image" 404 "$s" "$(body "$WORK/e.json")"
s=$(req "$WORK/e.json" "$URL/infer/sos_staging?image=corrupt&output=json");       check "corrupt file" 422 "$s" "$(body "$WORK/e.json")"
s=$(req "$WORK/e.json" "$URL/infer/sos_staging?image=flat2d&output=json");        check "2D image for a 3D model" 422 "$s" "$(body "$WORK/e.json")"
s=$(req "$WORK/e.json" "$URL/infer/no_such_model?image=case_0&output=json");      check "unknown model" 404 "$s" "$(body "$WORK/e.json")"
s=$(req "$WORK/r.json" "$URL/infer/sos_staging?image=case_0&output=json");        check "server goes on after bad requests" 200 "$s" ""

s=$(req "$WORK/seg.nii.gz" "$URL/infer/seg_tiny?image=case_0&output=image")
check "segmentation: label map (body)" 200 "$s" "$(python -c 'import nibabel as nib,numpy as np,sys; i=nib.load(sys.argv[1]); d=np.asarray(i.dataobj); print(i.shape, d.dtype, "labels", sorted(np.unique(d).tolist()), "affine diag", [round(float(v), 2) for v in i.affine.diagonal()[:3]])' "$WORK/seg.nii.gz")"
s=$(curl -s -o "$WORK/segcam.nii.gz" -w '%{http_code}' -X POST -F 'params={"result":"cam","label":"spleen"}' "$URL/infer/seg_tiny?image=case_1&output=image")
check "segmentation: Seg-Grad-CAM (result=cam)" 200 "$s" "$(python -c 'import nibabel as nib,sys; i=nib.load(sys.argv[1]); d=i.get_fdata(); print(i.shape, "range [%.2f, %.2f]" % (d.min(), d.max()))' "$WORK/segcam.nii.gz")"
s=$(req "$WORK/seg.json" "$URL/infer/seg_tiny?image=case_2&output=json")
check "segmentation: json" 200 "$s" "$(python -c 'import json,sys; r=json.load(open(sys.argv[1])); print("voxels", r["voxels"], "explained", r["cam"]["label"])' "$WORK/seg.json")"
s=$(curl -s -o "$WORK/e.json" -w '%{http_code}' -X POST -F 'params={"label":"liver"}' "$URL/infer/seg_tiny?image=case_0&output=json")
check "segmentation: unknown label" 422 "$s" "$(body "$WORK/e.json")"

echo "== timing: $N_TIMED requests each (output=json), median wall time per request"
for route in sos_staging sos_staging_predict seg_tiny seg_tiny_predict; do
    : > "$WORK/t_$route.txt"
    for i in $(seq 1 "$N_TIMED"); do
        curl -s -o /dev/null -w '%{time_total}\n' -X POST "$URL/infer/$route?image=case_$(( i % 3 ))&output=json" >> "$WORK/t_$route.txt"
    done
done
python - "$WORK" <<'EOF'
import statistics, sys
med = {r: statistics.median(float(x) for x in open(f"{sys.argv[1]}/t_{r}.txt").read().split())
       for r in ("sos_staging", "sos_staging_predict", "seg_tiny", "seg_tiny_predict")}
print(f"classification: suitability task {med['sos_staging']:.3f} s, plain predict {med['sos_staging_predict']:.3f} s, "
      f"ratio {med['sos_staging'] / med['sos_staging_predict']:.2f}")
print(f"segmentation: label map + Seg-Grad-CAM {med['seg_tiny']:.3f} s, label map only {med['seg_tiny_predict']:.3f} s, "
      f"ratio {med['seg_tiny'] / med['seg_tiny_predict']:.2f}")
EOF

sleep 1  # background tasks remove the result files after the answer
LEFT=$(find "$SERVER_TMP" -mindepth 1 -name 'gamverify_*' | wc -l)
check "temporary files left by gamverify" 0 "$LEFT" "(in the server's TMPDIR)"
[ "$FAILED" = 0 ] && echo "ALL CHECKS PASSED" || { echo "SOME CHECKS FAILED"; tail -20 "$WORK/server.log"; }
exit "$FAILED"
