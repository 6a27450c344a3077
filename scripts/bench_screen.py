"""Cost of screening, measured in one run on a saved screen and its bundle:

1. per image, beside the CAM pass the engine runs anyway: Grad-CAM alone vs Grad-CAM with the feature recorder plus
   ``Screen.score`` (data profile, detectors, p-values);
2. a whole ``gamverify cohort`` run (``run_cohort``: reading, preprocessing, CAM, maps written on the input grid)
   with ``screen=`` vs without it (the issue's goal: <= 1.15x); best of ``--repeats`` runs each, alternated.

Run (after ``gamverify demo --out demo_out``, or ``scripts/experiment_screen.py --out screen_experiment``):
    ``python scripts/bench_screen.py --screen demo_out/screening/screen --images demo_out/data/sos``
"""

from __future__ import annotations

import argparse
import glob
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from monai_gamverify.apps.cohort import run_cohort
from monai_gamverify.screening import Screen, load_screen_bundle, preprocessing_after_loading, read_image
from monai_gamverify.visualize.registry import make_cam


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--screen", required=True)
    ap.add_argument("--images", required=True, help="a folder with images/*.nii.gz (in-distribution)")
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    screen = Screen.load(args.screen)
    bm = load_screen_bundle(screen, "cpu")
    pre = preprocessing_after_loading(bm)
    cam = make_cam(bm.network, screen.cam_layer, screen.cam_method)
    files = sorted(glob.glob(str(Path(args.images) / "images" / "*.nii.gz")))[: args.n]
    raws = [read_image(f) for f in files]
    xs = [pre(r) for r in raws]
    best = {"cam": np.inf, "cam+screen": np.inf}
    for _ in range(args.repeats):
        t = time.perf_counter()
        for x in xs:
            cam.explain(x[None])
        best["cam"] = min(best["cam"], time.perf_counter() - t)
        t = time.perf_counter()
        for raw, x in zip(raws, xs):
            with screen.recorder(bm.network) as rec:
                res = cam.explain(x[None])
            screen.score(raw, tensor=x, logits=res.logits[0], activations=rec.activations, cam=res.maps[0])
        best["cam+screen"] = min(best["cam+screen"], time.perf_counter() - t)
    out = {k: 1000 * v / len(xs) for k, v in best.items()}
    out["ratio"] = best["cam+screen"] / best["cam"]
    sys.stdout.write(
        f"{len(xs)} images {tuple(xs[0].shape)}, best of {args.repeats}, {args.threads} thread(s): "
        f"Grad-CAM {out['cam']:.1f} ms/image, Grad-CAM + screen {out['cam+screen']:.1f} ms/image, "
        f"ratio {out['ratio']:.2f}\n"
    )
    b = screen.bundle
    kw = dict(bundle_root=b["root"], overrides=b.get("overrides"), checkpoint=b.get("checkpoint"), progress=False)
    cohort = {"plain": np.inf, "screen": np.inf}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            for key, scr in (("plain", None), ("screen", args.screen)):
                shutil.rmtree(Path(tmp) / "out", ignore_errors=True)
                t = time.perf_counter()
                res = run_cohort(files, Path(tmp) / "out", screen=scr, **kw)
                cohort[key] = min(cohort[key], time.perf_counter() - t)
    out.update({f"cohort_{k}_s": v for k, v in cohort.items()})
    out["cohort_ratio"] = cohort["screen"] / cohort["plain"]
    n_ood = res.get("n_out_of_distribution")
    sys.stdout.write(
        f"gamverify cohort on the same {len(files)} images, best of {args.repeats}: without screen "
        f"{cohort['plain']:.2f} s, with screen {cohort['screen']:.2f} s (ratio {out['cohort_ratio']:.2f}; "
        f"{n_ood} out of distribution)\n"
    )
    return out


if __name__ == "__main__":
    main()
