"""Throughput: plain bundle inference against the full per-volume verification of a cohort run.

Over the same N synthetic SOS volumes (written as NIfTI to a temporary directory), per volume:

- **inference**: load + the bundle's inference ``preprocessing`` + one forward pass (``torch.inference_mode``), as
  the bundle's evaluator does;
- **full**: :func:`monai_gamverify.apps.cohort.run_cohort`'s item loop: load + the same preprocessing + one forward pass
  with the Grad-CAM of the predicted class + attribution energy + the seven similarity features against a reference
  map (batched, 8 items a call) + the map inverted onto the input grid and written as ``.nii.gz`` + the item JSON +
  the verdicts of a 200-tree verifier;
- the same with the map written on the preprocessed grid (``--no_invert``: no resampling back), and without any
  map file (``--no_maps``).

Runs are interleaved (inference, full, full without maps) ``--repeats`` times after a warm-up; the table gives the
median wall seconds per volume and the ratio to inference, and the same for the CPU time of the process (all its
threads: on a machine shared with other jobs it moves less than wall time). Random weights: the timings do not
depend on them.

    python scripts/bench_throughput.py                          # 24 volumes, 32^3, convnext_attn_pico and small_cnn
    python scripts/bench_throughput.py --n 24 --size 48 --networks small_cnn --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

warnings.filterwarnings("ignore")
KINDS = (
    "inference (load + preprocessing + forward)",
    "full verification, map resampled onto the input grid (default)",
    "full verification, map on the preprocessed grid (`--no_invert`)",
    "full verification, no map file (`--no_maps`)",
)
STEPS = (
    "load + preprocessing",
    "forward (inference mode)",
    "forward + Grad-CAM (explain)",
    "energy + normalisation",
    "7 similarity features, one item per call",
    "7 similarity features, batched call of 8 (default), per item",
    "map resampled onto the input grid, MONAI Invertd (before)",
    "map resampled onto the input grid, fast_invert (now)",
    "map written (.nii.gz, save_map)",
    "item JSON written",
)
BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "sos_staging"


def setup(tmp: Path, network_name: str, n: int, size: int, seed: int) -> dict:
    """Cohort on disk, random weights, a reference map and a fitted verifier for ``network_name``."""
    import pandas as pd

    from monai_gamverify.bundle import load_bundle
    from monai_gamverify.data.synthetic import make_cohort
    from monai_gamverify.metrics.similarity import DEFAULT_METRICS
    from monai_gamverify.transforms.dictionary import make_cam
    from monai_gamverify.verification.reference import ReferenceMap
    from monai_gamverify.verification.verifier import SuitabilityVerifier

    data = tmp / "sos"
    if not (data / "images").is_dir():
        make_cohort("sos", n=n, size=size, seed=seed, out_dir=data, progress=False)
    images = sorted(str(p) for p in (data / "images").glob("*.nii.gz"))
    overrides = {"network_name": network_name}
    torch.manual_seed(seed)
    bm = load_bundle(BUNDLE, device="cpu", require_weights=False, overrides=overrides)
    ckpt = tmp / f"{network_name}.pt"
    torch.save(bm.network.state_dict(), ckpt)
    pre = bm.preprocessing()
    cam = make_cam(bm.network, bm.target_layer, "gradcam")
    ref = ReferenceMap()
    for path in images[:8]:
        ref.update(cam(pre({"image": path})["image"].unsqueeze(0)))
    ref.save(tmp / f"ref_{network_name}")
    rng = np.random.default_rng(seed)
    table = pd.DataFrame(rng.uniform(size=(200, len(DEFAULT_METRICS))), columns=list(DEFAULT_METRICS))
    table["label"] = (table["cosine"] + 0.3 * rng.normal(size=200) > 0.5).astype(int)
    SuitabilityVerifier(n_estimators=200, random_state=seed).fit(table).save(tmp / f"ver_{network_name}.skops")
    return {
        "images": images,
        "bm": bm,
        "pre": pre,
        "kwargs": {
            "bundle_root": BUNDLE,
            "overrides": overrides,
            "checkpoint": ckpt,
            "reference": tmp / f"ref_{network_name}",
            "verifier": tmp / f"ver_{network_name}.skops",
            "device": "cpu",
            "progress": False,
            "overwrite": True,
        },
    }


def plain_inference(images: list[str], net: torch.nn.Module, pre) -> tuple[float, float]:
    """(wall, CPU) seconds per volume of load + preprocessing + forward."""
    start, cpu = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        for path in images:
            x = pre({"image": path})["image"].unsqueeze(0)
            net(x).softmax(1)
    return (time.perf_counter() - start) / len(images), (time.process_time() - cpu) / len(images)


def full_run(images: list[str], out: Path, kwargs: dict, save_maps: bool, invert: bool = True) -> tuple[float, float]:
    """(wall, CPU of all threads) seconds per volume of the cohort item loop (every item recomputed) and its
    batched verdicts."""
    from monai_gamverify.apps.cohort import run_cohort

    result = run_cohort(images, out, save_maps=save_maps, invert=invert, **kwargs)
    if result["n_failed"]:
        raise RuntimeError(f"{result['n_failed']} items failed: {result['failed_ids']}")
    return result["seconds"]["items"] / len(images), result["seconds"]["items_cpu"] / len(images)


# the step lambdas of breakdown() are called at once, inside the iteration that binds their variables
# ruff: noqa: B023
def breakdown(s: dict, name: str, tmp: Path, repeats: int) -> dict[str, float]:
    """Median ms per volume of each step, timed one at a time in the main thread (no overlap)."""
    from monai_gamverify.energy import attribution_energy
    from monai_gamverify.io import write_json
    from monai_gamverify.io.grid import fast_invert, invert_to_input
    from monai_gamverify.io.nifti import save_map
    from monai_gamverify.metrics.similarity import similarity_metrics
    from monai_gamverify.transforms.dictionary import make_cam
    from monai_gamverify.verification.reference import ReferenceMap
    from monai_gamverify.visualize.cam import normalize_maps

    net, pre, images = s["bm"].network, s["pre"], s["images"]
    cam = make_cam(net, s["bm"].target_layer, "gradcam")
    ref = ReferenceMap.load(tmp / f"ref_{name}").value
    steps: dict[str, list[float]] = {k: [] for k in STEPS}
    batch: list[torch.Tensor] = []

    def timed(step: str, fn):
        start = time.perf_counter()
        value = fn()
        steps[step].append(time.perf_counter() - start)
        return value

    for _ in range(repeats):
        for path in images:
            img = timed(STEPS[0], lambda: pre({"image": path})["image"])
            x = img.unsqueeze(0)
            with torch.inference_mode():
                timed(STEPS[1], lambda: net(x).softmax(1))
            result = timed(STEPS[2], lambda: cam.explain(x, normalize=False))
            raw = result.maps.as_tensor()
            energy, norm = timed(STEPS[3], lambda: (float(attribution_energy(raw)[0]), normalize_maps(raw)))
            feats = timed(STEPS[4], lambda: similarity_metrics(norm, ref))
            batch.append(norm)
            if len(batch) == 8:  # the cohort run's batched call (feature_batch=8)
                timed(STEPS[5], lambda: similarity_metrics(torch.cat(batch), ref))
                steps[STEPS[5]][-1] /= len(batch)
                batch.clear()
            timed(STEPS[6], lambda: invert_to_input(norm[0], img, pre))
            mapped, affine = timed(STEPS[7], lambda: fast_invert(norm[0], img))
            timed(STEPS[8], lambda: save_map(mapped, tmp / "map.nii.gz", reference=affine))
            row = {"energy": energy, **{k: float(v[0]) for k, v in feats.items()}}
            timed(STEPS[9], lambda: write_json(row, tmp / "item.json"))
    return {k: statistics.median(v) * 1000 for k, v in steps.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=24, help="volumes")
    ap.add_argument("--size", type=int, default=32, help="edge length of the synthetic volumes")
    ap.add_argument("--networks", default="convnext_attn_pico,small_cnn", help="sos_staging network_name values")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--breakdown", action="store_true", help="also time each step alone (median per volume)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows, parts = [], {}
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        for name in args.networks.split(","):
            s = setup(tmp, name, args.n, args.size, args.seed)
            net, pre, images = s["bm"].network, s["pre"], s["images"]
            plain_inference(images[:2], net, pre)  # warm-up
            full_run(images[:2], tmp / "warm", s["kwargs"], True)
            times: dict[str, list[tuple[float, float]]] = {k: [] for k in KINDS}
            for r in range(args.repeats):
                times[KINDS[0]].append(plain_inference(images, net, pre))
                times[KINDS[1]].append(full_run(images, tmp / f"out_{name}", s["kwargs"], True))
                times[KINDS[2]].append(full_run(images, tmp / f"out_{name}", s["kwargs"], True, invert=False))
                times[KINDS[3]].append(full_run(images, tmp / f"out_{name}", s["kwargs"], False))
                short = [k.split(" (")[0].split(",")[-1].strip() for k in times]
                print(
                    f"{name} repeat {r + 1}: "
                    + ", ".join(f"{k} {v[-1][0] * 1000:.1f} ms" for k, v in zip(short, times.values()))
                )
            if args.breakdown:
                parts[name] = breakdown(s, name, tmp, args.repeats)
            base = [statistics.median(t[i] for t in times[KINDS[0]]) for i in (0, 1)]
            for kind, values in times.items():
                wall, cpu = (statistics.median(t[i] for t in values) for i in (0, 1))
                rows.append((name, kind, wall * 1000, wall / base[0], cpu * 1000, cpu / base[1]))
    print(
        f"\n{args.n} SOS volumes {args.size}^3 (sos_staging preprocessing: 1.25 mm, 32^3), {args.threads} thread(s), "
        f"median of {args.repeats} interleaved repeats\n"
    )
    print("| network | per volume | wall ms / volume | × inference | CPU ms / volume | × inference (CPU) |")
    print("|---|---|---:|---:|---:|---:|")
    for name, kind, ms, ratio, cpu_ms, cpu_ratio in rows:
        print(f"| {name} | {kind} | {ms:.1f} | **{ratio:.2f}** | {cpu_ms:.1f} | {cpu_ratio:.2f} |")
    if parts:
        names = list(parts)
        print("\n| step (alone, median ms / volume) | " + " | ".join(names) + " |")
        print("|---|" + "---:|" * len(names))
        for step in STEPS:
            print(f"| {step} | " + " | ".join(f"{parts[n][step]:.1f}" for n in names) + " |")


if __name__ == "__main__":
    main()
