"""The verification study's setting on the synthetic SOS cohort: Method 1 (Grad-CAM) and Method 2 (early feature maps).

Run (after ``python scripts/train_zoo.py``):
``python scripts/experiment_verify.py [--zoo runs/zoo] [--out runs/experiment_verify] [--reference auto]``

Method 1: the reference is the SOS-trained ConvNeXt+Attn (``--reference auto`` falls back to the SOS model with the
best test accuracy when ConvNeXt+Attn is not clearly above chance, and says so). Suitable candidates (label 1) are
the other SOS-trained zoo models, unsuitable ones (label 0) the chin- and cvm-trained models; every model is applied
to the SOS test cohort (``generate("sos", n=100, size=32, seed=1000)``). The reference mean Grad-CAM map is taken
over the SOS development cohort (seed 0, the reference's training + validation data). Grad-CAM of each model's last
stage (ResNet ``layer4``, ConvNeXt ``stages.2``, SmallCNN ``res4``) -> the seven similarity features against the
reference map -> Random Forest, 5-fold cross-validation grouped by subject (``run_verification``); the same features
are also cross-validated with folds grouped by model (a model never seen in training).

Method 2: for each zoo model and each early layer (ResNet ``layer1``/``layer2``, ConvNeXt ``stages.0``/``stages.1``,
SmallCNN ``stem``/``res2``), the model's feature maps of the SOS test cohort (label 1) and of the same subjects
rotated by 30 degrees (``rotate=30``, label 0) are compared with the model's own mean feature map over the SOS
development cohort; a Random Forest (5 folds grouped by subject) says whether the data is like the training data.

Prints: the zoo; the RF cross-validation table (per fold + mean; precision/recall/F1 weighted over the two labels
as in the study, ``--average``); the mean out-of-fold P(suitable) per model; feature
importances; the per-label feature statistics (``summary_table``); the Method-2 table Model / Layer / Train / Test /
Accuracy / ROC AUC / F1. Writes CSVs, ``cv.json`` and ROC PNGs under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_zoo import CAM_LAYER, DATA_ARCH, FEATURE_LAYERS, family, load_member, start_run, to_input  # noqa: E402

from monai_gamverify.data.synthetic import generate  # noqa: E402
from monai_gamverify.io import write_csv, write_json  # noqa: E402
from monai_gamverify.verification.verifier import (  # noqa: E402
    SuitabilityVerifier,
    feature_table,
    reference_map,
    roc_png,
    run_verification,
)
from monai_gamverify.visualize.featuremaps import FeatureMap  # noqa: E402

SCORES = ["accuracy", "precision", "recall", "f1", "roc_auc"]


def batches(x: torch.Tensor, prefix: str, batch: int) -> list[dict]:
    """List of batch dicts (re-iterable) with image, sample id and subject id (subject ``s{i}`` across cohorts)."""
    return [
        {
            "image": x[i : i + batch],
            "id": [f"{prefix}{j}" for j in range(i, min(i + batch, len(x)))],
            "subject": [f"s{j}" for j in range(i, min(i + batch, len(x)))],
        }
        for i in range(0, len(x), batch)
    ]


def md_table(df: pd.DataFrame, digits: int = 3) -> str:
    """A pandas table as a GitHub markdown table."""
    cols = list(df.columns)
    lines = ["| " + " | ".join(map(str, cols)) + " |", "|" + "---|" * len(cols)]
    for _, row in df.iterrows():
        cells = [f"{v:.{digits}f}" if isinstance(v, (float, np.floating)) else str(v) for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def choose_reference(zoo: dict[str, tuple], wanted: str) -> tuple[str, str]:
    """(reference name, note)."""
    sos = {n: info for n, (_, info) in zoo.items() if info["data"] == "sos"}
    if wanted != "auto":
        return wanted, f"reference {wanted} (chosen by --reference)"
    best = max(sos, key=lambda n: sos[n]["test_acc"])
    attn = "sos_convnext_attn_pico"
    if attn in sos and sos[attn]["test_acc"] >= sos[attn]["chance"] + 0.2:
        return attn, f"reference {attn} (the study's ConvNeXt+Attn), test accuracy {sos[attn]['test_acc']:.3f}"
    why = "is not in the zoo" if attn not in sos else f"is near chance (test accuracy {sos[attn]['test_acc']:.3f})"
    return best, (
        f"NOTE: ConvNeXt+Attn {why}; the reference is the best-learning SOS model {best} "
        f"(test accuracy {sos[best]['test_acc']:.3f}) instead"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--zoo", default="runs/zoo")
    p.add_argument("--out", default="runs/experiment_verify")
    p.add_argument("--reference", default="auto", help="zoo member used as reference, or 'auto'")
    p.add_argument("--n-test", type=int, default=100)
    p.add_argument("--n-ref", type=int, default=200, help="subjects of the SOS development cohort for reference maps")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--rotate", type=float, default=30.0)
    p.add_argument("--n-splits", type=int, default=5)
    p.add_argument("--n-estimators", type=int, default=200)
    p.add_argument("--average", default="weighted", help="precision/recall/F1 averaging (the study: weighted)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    device, out, t0 = start_run(args)

    zoo = {}
    for name in DATA_ARCH:
        if (Path(args.zoo) / f"{name}.json").is_file():
            model, info = load_member(args.zoo, name)
            zoo[name] = (model.to(device), info)
    if not zoo:
        raise SystemExit(f"no trained model in {args.zoo}: run scripts/train_zoo.py first")
    print("zoo (test accuracy on the disjoint test cohort of its own data):")
    for name, (_, info) in zoo.items():
        print(f"  {name:26s} {info['data']:5s} acc {info['test_acc']:.3f} (chance {info['chance']:.3f})")
    ref_name, note = choose_reference(zoo, args.reference)
    print(note)
    ref_model, ref_info = zoo[ref_name]

    dev = generate("sos", n=args.n_ref, size=args.size, seed=args.seed)
    test = generate("sos", n=args.n_test, size=args.size, seed=args.seed + 1000)
    rot = generate("sos", n=args.n_test, size=args.size, seed=args.seed + 1000, rotate=args.rotate)
    dev_b = batches(to_input(dev.images), "dev", args.batch)
    test_b = batches(to_input(test.images), "sos", args.batch)
    rot_b = batches(to_input(rot.images), "rot", args.batch)

    # ------------------------------------------------------------------ Method 1: Grad-CAM of the last stage
    candidates = {
        name: (model, CAM_LAYER[family(info["arch"])], int(info["data"] == "sos"))
        for name, (model, info) in zoo.items()
        if name != ref_name
    }
    t1 = time.perf_counter()
    report = run_verification(
        (ref_model, CAM_LAYER[family(ref_info["arch"])]),
        candidates,
        test_b,
        out / "method1",
        method="gradcam",
        reference_data=dev_b,
        n_splits=args.n_splits,
        groups="subject_id",
        average=args.average,
        n_estimators=args.n_estimators,
        seed=args.seed,
    )
    cv = json.loads(Path(report["files"]["cv"]).read_text())
    folds = pd.DataFrame(cv["cross_validation"]["folds"])
    mean = {"fold": "mean", **{s: cv["cross_validation"]["mean"][s] for s in SCORES}}
    std = {"fold": "std", **{s: cv["cross_validation"]["std"][s] for s in SCORES}}
    m1 = pd.concat([folds[["fold", *SCORES]].astype({"fold": str}), pd.DataFrame([mean, std])], ignore_index=True)
    print(f"\nMethod 1 (Grad-CAM, reference {ref_name}); {len(candidates)} candidates x {args.n_test} SOS test volumes")
    print(f"RF {args.n_splits}-fold cross-validation, folds grouped by subject:")
    print(md_table(m1))
    print(f"pooled out-of-fold ROC AUC: {cv['cross_validation']['mean']['roc_auc_oof']:.3f}")

    table = pd.read_csv(report["files"]["features"])
    # harder: a model never seen in training (folds grouped by model; needs >= 2 models of each label)
    models_per_label = table.groupby("label")["model"].nunique()
    k_models = int(min(args.n_splits, models_per_label.min())) if len(models_per_label) == 2 else 0
    per_model = pd.DataFrame(
        [
            {
                "model": n,
                "label": v["label"],
                "test acc (own data)": zoo[n][1]["test_acc"],
                "mean P(suitable), subject folds": v["mean_p_suitable"],
            }
            for n, v in report["per_model"].items()
        ]
    )
    if k_models >= 2:
        by_model = SuitabilityVerifier(n_estimators=args.n_estimators, random_state=args.seed).cross_validate(
            table, n_splits=k_models, groups="model", seed=args.seed, average=args.average
        )
        write_json(by_model.to_dict(), out / "method1" / "cv_grouped_by_model.json")
        print(f"RF {k_models}-fold cross-validation, folds grouped by model (test models unseen in training), mean:")
        print(md_table(pd.DataFrame([{s: by_model.mean[s] for s in SCORES}])))
        roc_png(
            by_model.y_true,
            by_model.oof_proba,
            out / "method1" / "roc_grouped_by_model.png",
            fold=by_model.fold,
            title="Method 1 ROC, folds grouped by model",
        )
        oof_model = pd.Series(by_model.oof_proba, index=table.index).groupby(table["model"]).mean()
        per_model["mean P(suitable), model folds"] = per_model["model"].map(oof_model)
    else:
        print("(too few models per label for folds grouped by model)")
    write_csv(per_model, out / "method1" / "per_model.csv")
    print("\nper model (out-of-fold):")
    print(md_table(per_model))
    imp = pd.DataFrame(
        sorted(cv["feature_importances"].items(), key=lambda kv: -kv[1]), columns=["feature", "importance"]
    )
    print("\nfeature importances (forest refitted on all rows):")
    print(md_table(imp))
    summary = pd.read_csv(report["files"]["summary"]).drop(columns="count")
    print("\nper-label feature statistics (label 1 = suitable, 0 = unsuitable):")
    print(md_table(summary, digits=4))
    print(f"Method 1 took {time.perf_counter() - t1:.0f} s")

    # ------------------------------------------------------------------ Method 2: early feature maps, SOS vs rotated
    t2 = time.perf_counter()
    rows = []
    jobs = [(n, layer) for n, (_, info) in zoo.items() for layer in FEATURE_LAYERS[family(info["arch"])]]
    for name, layer in tqdm(jobs, desc="Method 2"):
        model, info = zoo[name]
        fm = FeatureMap(model, layer)
        ref = reference_map(fm, dev_b, progress=False)
        tab = pd.concat(
            [
                feature_table(ref, {name: (fm, 1)}, test_b, progress=False),
                feature_table(ref, {name: (fm, 0)}, rot_b, progress=False),
            ],
            ignore_index=True,
        )
        res = SuitabilityVerifier(n_estimators=args.n_estimators, random_state=args.seed).cross_validate(
            tab, n_splits=args.n_splits, groups="subject_id", seed=args.seed, average=args.average
        )
        tag = f"{name}_{layer.replace('.', '')}"
        write_csv(tab, out / "method2" / f"features_{tag}.csv")
        roc_png(
            res.y_true,
            res.oof_proba,
            out / "method2" / f"roc_{tag}.png",
            fold=res.fold,
            title=f"{name} {layer}: SOS vs rotated SOS",
        )
        rows.append(
            {
                "Model": info["arch"],
                "Layer": layer,
                "Train": info["data"],
                "Test": f"sos vs sos rot{args.rotate:g}",
                "Accuracy": res.mean["accuracy"],
                "ROC AUC": res.mean["roc_auc"],
                "F1": res.mean["f1"],
            }
        )
    m2 = pd.DataFrame(rows)
    write_csv(m2, out / "method2" / "method2.csv")
    print(
        "\nMethod 2 (early feature maps vs the model's own mean map on SOS development data; "
        f"RF {args.n_splits}-fold by subject):"
    )
    print(md_table(m2))
    print(f"Method 2 took {time.perf_counter() - t2:.0f} s; total {time.perf_counter() - t0:.0f} s; outputs in {out}")


if __name__ == "__main__":
    main()
