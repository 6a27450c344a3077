"""Cost of screening beside the CAM pass the engine runs anyway: Grad-CAM alone vs Grad-CAM with the feature recorder
plus ``Screen.score`` (data profile, detectors, p-values), per image, on a saved screen and its bundle.

Run (after ``scripts/experiment_screen.py --out screen_experiment``):
    ``python scripts/bench_screen.py --screen screen_experiment/screen_ref --images screen_experiment/data/sos_cal``
"""

from __future__ import annotations

import argparse
import glob
import sys
import time
from pathlib import Path

import numpy as np
import torch

from monai_gamverify.screening import Screen, load_screen_bundle, preprocessing_after_loading, read_image
from monai_gamverify.visualize.registry import make_cam


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--screen", required=True)
    ap.add_argument("--images", required=True, help="a folder with images/*.nii.gz")
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
    return out


if __name__ == "__main__":
    main()
