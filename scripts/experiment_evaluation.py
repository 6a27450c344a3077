"""How good are the zoo's explanations and confidences on the synthetic SOS test set: localisation, faithfulness,
calibration.

Run (after ``python scripts/train_zoo.py``):
``python scripts/experiment_evaluation.py [--zoo runs/zoo] [--out runs/experiment_evaluation] [--n-eval 20]``

For each SOS-trained zoo network and each of Grad-CAM, Grad-CAM++ and Score-CAM (last-stage layer: ResNet ``layer4``,
ConvNeXt ``stages.2``, SmallCNN ``res4``; class = the prediction) on the first ``--n-eval`` volumes of the SOS test
cohort (``generate("sos", n=100, size=32, seed=1000)``; Score-CAM needs one forward pass per channel, hence the
subset): localisation against the synchondrosis region (``mask > 0``): IoU and Dice of the map thresholded with
``--threshold`` (Otsu by default), pointing game with a ``--tolerance-mm`` (2 mm) tolerance (voxel size from the
cohort affine) and relevance mass; faithfulness: deletion AUC (low = faithful) and insertion AUC (high = faithful),
``--steps`` steps, blurred-input baseline, batched. Calibration per network on the whole test cohort: ECE and MCE
(``--bins`` equal-width bins) before and after temperature scaling fitted on the validation split of the training
cohort (``TemperatureScaler``); reliability diagrams (PNG) before/after.

Prints the localisation + faithfulness table (means over volumes) with the chance level of a uniform map, and the
calibration table; writes CSVs and PNGs under ``--out``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from experiment_verify import md_table  # noqa: E402
from train_zoo import CAM_LAYER, DATA_ARCH, family, load_member, predict, split, start_run, to_input  # noqa: E402

from monai_gamverify.data.synthetic import generate  # noqa: E402
from monai_gamverify.io import write_csv  # noqa: E402
from monai_gamverify.metrics import (  # noqa: E402
    TemperatureScaler,
    deletion_curve,
    expected_calibration_error,
    insertion_curve,
    localisation_scores,
    maximum_calibration_error,
    reliability_diagram_png,
)
from monai_gamverify.visualize.cam import GradCAM, GradCAMpp, ScoreCAM  # noqa: E402

METHODS = {"GradCAM": GradCAM, "GradCAMpp": GradCAMpp, "ScoreCAM": ScoreCAM}


def cam_maps(method: str, model: torch.nn.Module, layer: str, x: torch.Tensor, batch: int) -> torch.Tensor:
    """(B, 1, *spatial) normalised maps of the predicted class, computed in chunks."""
    cam = METHODS[method](model, layer, batch_size=batch) if method == "ScoreCAM" else METHODS[method](model, layer)
    try:
        return torch.cat([cam(x[i : i + batch]) for i in range(0, len(x), batch)])
    finally:
        cam.release()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--zoo", default="runs/zoo")
    p.add_argument("--out", default="runs/experiment_evaluation")
    p.add_argument("--n-test", type=int, default=100)
    p.add_argument("--n-eval", type=int, default=20, help="test volumes explained (Score-CAM is costly)")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--n", type=int, default=200, help="training cohort size (its validation split fits T)")
    p.add_argument("--threshold", default="otsu", help="'otsu' or 'median' binarisation for IoU/Dice")
    p.add_argument("--tolerance-mm", type=float, default=2.0)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--baseline", default="blur", help="deletion/insertion baseline: blur, mean, zero")
    p.add_argument("--bins", type=int, default=10)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--nets", default=None, help="comma-separated SOS zoo members (default: every SOS-trained one)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    device, out, t0 = start_run(args)

    wanted = None if args.nets is None else {s.strip() for s in args.nets.split(",")}
    names = [
        n
        for n, (data, _, _) in DATA_ARCH.items()
        if data == "sos" and (Path(args.zoo) / f"{n}.json").is_file() and (wanted is None or n in wanted)
    ]
    if not names:
        raise SystemExit(f"no SOS-trained model in {args.zoo}: run scripts/train_zoo.py first")
    test = generate("sos", n=args.n_test, size=args.size, seed=args.seed + 1000)
    dev = generate("sos", n=args.n, size=args.size, seed=args.seed)
    _, va = split(np.asarray(dev.labels), args.seed)
    x_val, y_val = to_input(dev.images[va]).to(device), torch.as_tensor(np.array(dev.labels)[va]).long()
    x_test, y_test = to_input(test.images).to(device), torch.as_tensor(np.array(test.labels)).long()
    region = torch.from_numpy(np.array(test.masks) > 0).unsqueeze(1)
    spacing = tuple(np.linalg.norm(np.asarray(test.affine)[:3, :3], axis=0))
    x_ev, region_ev = x_test[: args.n_eval], region[: args.n_eval].to(device)
    methods = [m for m in args.methods.split(",") if m]

    loc_rows, cal_rows = [], []
    for name in names:
        model, info = load_member(args.zoo, name)
        model = model.to(device)
        layer = CAM_LAYER[family(info["arch"])]
        for method in tqdm(methods, desc=name):
            t1 = time.perf_counter()
            maps = cam_maps(method, model, layer, x_ev, args.batch)
            t_cam = time.perf_counter() - t1
            loc = localisation_scores(maps, region_ev, args.threshold, args.tolerance_mm, spacing)
            dele = deletion_curve(
                model, x_ev, maps, steps=args.steps, baseline=args.baseline, batch_size=args.batch, seed=args.seed
            )
            ins = insertion_curve(
                model, x_ev, maps, steps=args.steps, baseline=args.baseline, batch_size=args.batch, seed=args.seed
            )
            loc_rows.append(
                {
                    "network": info["arch"],
                    "method": method,
                    "n": len(x_ev),
                    f"IoU ({args.threshold})": loc["iou"].nanmean().item(),
                    f"Dice ({args.threshold})": loc["dice"].nanmean().item(),
                    f"pointing ({args.tolerance_mm:g} mm)": loc["pointing_game"].nanmean().item(),
                    "relevance mass": loc["relevance_mass"].nanmean().item(),
                    "deletion AUC (low)": dele.auc.mean().item(),
                    "insertion AUC (high)": ins.auc.mean().item(),
                    "CAM s": t_cam,
                }
            )
        # calibration on the whole test cohort, T fitted on the validation split of the training cohort
        z_val, z_test = predict(model, x_val).cpu(), predict(model, x_test).cpu()
        scaler = TemperatureScaler().fit(z_val, y_val)
        p_before, p_after = torch.softmax(z_test, 1), scaler.predict_proba(z_test)
        reliability_diagram_png(p_before, y_test, out / f"reliability_{name}_before.png", args.bins, f"{name} T=1")
        reliability_diagram_png(
            p_after, y_test, out / f"reliability_{name}_after.png", args.bins, f"{name} T={scaler.temperature_:.2f}"
        )
        cal_rows.append(
            {
                "network": info["arch"],
                "test acc": (z_test.argmax(1) == y_test).float().mean().item(),
                "T": scaler.temperature_,
                "ECE before": expected_calibration_error(p_before, y_test, args.bins),
                "ECE after": expected_calibration_error(p_after, y_test, args.bins),
                "MCE before": maximum_calibration_error(p_before, y_test, args.bins),
                "MCE after": maximum_calibration_error(p_after, y_test, args.bins),
                "val NLL before": scaler.nll_before_,
                "val NLL after": scaler.nll_after_,
            }
        )
    loc_df, cal_df = pd.DataFrame(loc_rows), pd.DataFrame(cal_rows)
    write_csv(loc_df, out / "localisation_faithfulness.csv")
    write_csv(cal_df, out / "calibration.csv")
    frac = region_ev.float().mean().item()
    print(
        f"\nLocalisation (synchondrosis region = mask > 0) and faithfulness ({args.baseline} baseline, {args.steps} "
        f"steps) on {len(x_ev)} SOS test volumes; voxel {spacing[0]:.2f} mm"
    )
    print(md_table(loc_df))
    print(
        f"(the region covers {100 * frac:.1f} % of the volume: relevance mass and strict pointing game of a "
        "uniform map)"
    )
    print(
        f"\nCalibration on {len(x_test)} SOS test volumes ({args.bins} bins), T fitted on {len(x_val)} "
        "validation volumes"
    )
    print(md_table(cal_df))
    print(f"total {time.perf_counter() - t0:.0f} s; outputs in {out}")


if __name__ == "__main__":
    main()
