"""Top-k Score-CAM vs full Score-CAM on a **trained** network: the demo's shipped SOS staging model (``SmallCNN``,
target ``res4``) on SOS test volumes through the bundle's own preprocessing. Prints Pearson and IoU (median masks)
of each top-k map against the full map, per ranking, with the median time per volume.

Run (after ``gamverify demo --out demo_out``):
    ``python scripts/agree_trained.py --demo demo_out --n 20 --ks 4 8 16``
"""

from __future__ import annotations

import argparse
import glob
import sys
import time
from pathlib import Path

import numpy as np
import torch

from monai_gamverify.apps.demo import bundles_dir
from monai_gamverify.bundle import load_bundle
from monai_gamverify.metrics.similarity import similarity_metrics
from monai_gamverify.visualize.cam import ScoreCAM


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo", required=True, help="a gamverify demo output folder (models/, data/sos/)")
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--ks", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    demo = Path(args.demo)
    bm = load_bundle(Path(bundles_dir()) / "sos_staging", overrides={"network_name": "small_cnn"},
                     checkpoint=demo / "models" / "sos_ref.pt", device="cpu")  # fmt: skip
    pre = bm.preprocessing()
    files = sorted(glob.glob(str(demo / "data" / "sos" / "images" / "*.nii.gz")))[-args.n :]
    xs = [pre({"image": f})["image"].as_tensor()[None] for f in files]
    layer = bm.target_layer
    t0 = time.perf_counter()
    full = [ScoreCAM(bm.network, layer, batch_size=64)(x) for x in xs]
    t_full = (time.perf_counter() - t0) / len(xs)
    # a full map that is zero everywhere (every channel weight <= 0 after the ReLU) has no shape to agree with
    keep = [i for i, m in enumerate(full) if float(m.max()) > float(m.min())]
    rows = []
    for rank_by in ("variance", "gradient"):
        for k in args.ks:
            t0 = time.perf_counter()
            approx = [ScoreCAM(bm.network, layer, batch_size=64, top_k=k, rank_by=rank_by)(x) for x in xs]
            secs = (time.perf_counter() - t0) / len(xs)
            feats = similarity_metrics(torch.cat([approx[i] for i in keep]), torch.cat([full[i] for i in keep]),
                                       metrics=["pearson", "iou"])  # fmt: skip
            p, j = feats["pearson"].numpy(), feats["iou"].numpy()
            rows.append((rank_by, k, secs, float(np.mean(p)), float(np.min(p)), float(np.mean(j)), float(np.min(j))))
    acts = {}
    hook = dict(bm.network.named_modules())[layer].register_forward_hook(lambda m, i, o: acts.setdefault("a", o))
    with torch.no_grad():
        bm.network.eval()(xs[0])
    hook.remove()
    head = (
        f"{len(xs)} SOS volumes {tuple(xs[0].shape[2:])}, sos_ref SmallCNN, layer {layer} ({acts['a'].shape[1]} "
        f"channels); full Score-CAM {t_full * 1000:.0f} ms/volume; {len(xs) - len(keep)} full maps zero everywhere "
        f"left out, statistics over {len(keep)}"
    )
    out = [head, "", "| rank_by | k | ms/volume | Pearson (mean, min) | IoU (mean, min) |", "|---|---|---|---|---|"]
    for r, k, sec, pm, pn, jm, jn in rows:
        out.append(f"| {r} | {k} | {sec * 1000:.0f} | {pm:.3f}, {pn:.3f} | {jm:.3f}, {jn:.3f} |")
    sys.stdout.write("\n".join(out) + "\n")
    return {"rows": rows, "t_full": t_full}


if __name__ == "__main__":
    main()
