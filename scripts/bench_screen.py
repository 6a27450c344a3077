"""Cost of screening at several image sizes, in one run (the issue's goal: ``gamverify cohort --screen`` <= 1.15x
without it at 32^3 and 64^3):

1. per image: the engine's observation (``ImagePipeline.observe``: read, preprocessing, Grad-CAM forward + backward
   with the features recorded on the way) alone, and followed by ``Screen.score`` (profile, detectors, p-values);
2. a whole ``gamverify cohort`` run (``run_cohort``: reading, preprocessing, CAM, maps written on the input grid)
   with ``screen=`` vs without it; best of ``--repeats`` runs each, alternated.

For each size a synthetic SOS cohort (and a calibration cohort) is written, a screen fitted for the ``sos_staging``
bundle (SmallCNN, random weights of a fixed seed: the cost does not depend on the weights) with ``roi_size`` = the
image size. The machine's load (``uptime``) is printed before and after: timings on a loaded machine are noisy.

Run:
    ``python scripts/bench_screen.py --sizes 32 64 --n 24 --repeats 3``
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from monai_gamverify.apps.cohort import run_cohort
from monai_gamverify.apps.pipeline import ImagePipeline
from monai_gamverify.apps.screening import fit_screen
from monai_gamverify.bundle import load_bundle
from monai_gamverify.data.synthetic import make_cohort

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "sos_staging"


def _load() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return "load: " + " ".join(f"{v:.2f}" for v in os.getloadavg())


def bench_size(size: int, n: int, repeats: int, work: Path) -> dict:
    """Fit a screen at ``size``^3 and time the engine and the cohort with and without it."""
    overrides = {"network_name": "small_cnn", "networks#small_cnn#width": 8, "roi_size": [size] * 3,
                 "pixdim": [40.0 / size] * 3}  # fmt: skip
    data, cal = work / f"sos_{size}", work / f"sos_{size}_cal"
    make_cohort("sos", n=max(n, 30), size=size, seed=0, out_dir=data, progress=False)
    make_cohort("sos", n=20, size=size, seed=1, out_dir=cal, progress=False)
    torch.manual_seed(0)
    ckpt = work / f"w_{size}.pt"
    torch.save(load_bundle(BUNDLE, overrides=overrides, require_weights=False).network.state_dict(), ckpt)
    screen_dir = work / f"screen_{size}"
    fit_screen(BUNDLE, data, screen_dir, overrides, checkpoint=ckpt, calibration_dirs=[cal], device="cpu")
    entries = json.loads((data / "datalist.json").read_text())
    files = [str(data / e["image"]) for e in entries["test"] + entries["validation"] + entries["training"]][:n]
    plain = ImagePipeline.from_bundle(BUNDLE, overrides=overrides, checkpoint=ckpt, device="cpu")
    screened = ImagePipeline.from_bundle(BUNDLE, overrides=overrides, checkpoint=ckpt, device="cpu", screen=screen_dir)
    best = {"observe": np.inf, "observe+score": np.inf}
    for _ in range(repeats):
        t = time.perf_counter()
        for f in files:
            plain.observe(f)
        best["observe"] = min(best["observe"], time.perf_counter() - t)
        t = time.perf_counter()
        for f in files:
            screened.screen.score(screened.observe(f))
        best["observe+score"] = min(best["observe+score"], time.perf_counter() - t)
    out = {f"{k}_ms": 1000 * v / len(files) for k, v in best.items()}
    out["image_ratio"] = best["observe+score"] / best["observe"]
    kw = dict(bundle_root=BUNDLE, overrides=overrides, checkpoint=ckpt, progress=False, device="cpu")
    cohort = {"plain": np.inf, "screen": np.inf}
    cpu = {"plain": np.inf, "screen": np.inf}  # CPU seconds of the item loop (all threads): less sensitive to load
    parts = {"plain": {}, "screen": {}}
    for _ in range(repeats):
        for key, scr in (("plain", None), ("screen", str(screen_dir))):
            shutil.rmtree(work / "out", ignore_errors=True)
            t = time.perf_counter()
            res = run_cohort(files, work / "out", screen=scr, **kw)
            if time.perf_counter() - t < cohort[key]:
                cohort[key], parts[key] = time.perf_counter() - t, res["seconds"]
            cpu[key] = min(cpu[key], res["seconds"]["items_cpu"])
    out.update({f"cohort_{k}_s": v for k, v in cohort.items()})
    out["cohort_ratio"] = cohort["screen"] / cohort["plain"]
    out["cohort_items_ratio"] = parts["screen"]["items"] / parts["plain"]["items"]
    out["cohort_setup_s"] = {k: v["setup"] for k, v in parts.items()}
    out["cohort_cpu_ratio"] = cpu["screen"] / cpu["plain"]
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--n", type=int, default=24, help="images timed per size")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    sys.stdout.write(f"before: {_load()}\n")
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_screen_") as tmp:
        for size in args.sizes:
            r = results[size] = bench_size(size, args.n, args.repeats, Path(tmp))
            sys.stdout.write(
                f"{size}^3, {args.n} images, best of {args.repeats}, {args.threads} thread(s): observe "
                f"{r['observe_ms']:.1f} ms/image, observe + screen {r['observe+score_ms']:.1f} ms/image (ratio "
                f"{r['image_ratio']:.2f}); cohort without screen {r['cohort_plain_s']:.2f} s, with screen "
                f"{r['cohort_screen_s']:.2f} s (ratio {r['cohort_ratio']:.2f}; the item loop alone "
                f"{r['cohort_items_ratio']:.2f}, setup {r['cohort_setup_s']['plain']:.2f} / "
                f"{r['cohort_setup_s']['screen']:.2f} s; CPU time of the item loop {r['cohort_cpu_ratio']:.2f})\n"
            )
    sys.stdout.write(f"after: {_load()}\n")
    sys.stdout.write("cohort ratios: " + ", ".join(f"{s}^3 {r['cohort_ratio']:.2f}" for s, r in results.items()) + "\n")
    return results


if __name__ == "__main__":
    main()
