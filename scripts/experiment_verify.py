"""Suitability verification on the model zoo, leave-models-out and model-level: supervised and one-class.

Run (after ``python scripts/train_zoo.py --zoo full ...``):
``python scripts/experiment_verify.py [--zoo runs/zoo] [--out runs/experiment_verify] [--reference sos_small_cnn_s0]
[--methods gradcam,featuremap] [--threads 1]``

Data: every zoo model is applied to the SOS test cohort (``generate("sos", n=--n-test, size, seed=1000)``, the size
the zoo was trained at); the reference (trusted) model's mean map is taken over the SOS development cohort (seed 0,
its training + validation data).

- **Supervised** (``run_verification``): the trusted SOS model is the reference; every other zoo model is a
  candidate with its label (1 = trained on SOS, 0 = chin / cvm / quality / label-shuffled SOS / contrast-inverted
  SOS). The Random Forest is cross-validated **leave-models-out** (folds grouped by model: a test model is never
  in training); subject-grouped folds as a secondary line. Model-level: each model's out-of-fold P(suitable) mean
  with a 95 % BCa bootstrap interval; verdict suitable / not suitable / undecided at 0.5; ROC AUC over models.
- **One-class** (``run_one_class``): no unsuitable model is used. References = the SOS-trained models (with
  ``--ref-min-val-acc``: only those whose validation accuracy reaches it, as a user would vet them); every zoo
  model is a candidate (a reference is tested against the others: leave one model out); conformal p-value at
  ``--alpha``; ROC AUC over models of the p-value. Also with a small ensemble (``--small-ensemble`` models of
  different architectures, the trusted one first), the user's situation with few references.

Method 1 = Grad-CAM of each model's ``cam_layer``; Method 2 = its first early feature layer (``featuremap``).
Prints markdown tables and a goal check; writes every report directory and ``results.json`` under ``--out``.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_zoo import ZOO, load_cohort, load_member, start_run  # noqa: E402

from monai_gamverify.io import write_csv, write_json  # noqa: E402
from monai_gamverify.verification.grid import CommonGrid  # noqa: E402
from monai_gamverify.verification.models import model_verdicts  # noqa: E402
from monai_gamverify.verification.oneclass import run_one_class  # noqa: E402
from monai_gamverify.verification.verifier import SuitabilityVerifier  # noqa: E402
from monai_gamverify.verification.workflow import run_verification  # noqa: E402


def batches(x: torch.Tensor, prefix: str, batch: int) -> list[dict]:
    """List of batch dicts (re-iterable) with image, sample id and subject id."""
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


def layer_of(info: dict, method: str) -> str:
    return info["feature_layers"][0] if method == "featuremap" else info["cam_layer"]


def small_ensemble(zoo: dict, trusted: str, n: int) -> list[str]:
    """The trusted model and then one SOS model per other architecture (zoo order), ``n`` in all."""
    chosen, archs = [trusted], {zoo[trusted][1]["arch"]}
    for name, (_, info) in zoo.items():
        if len(chosen) >= n:
            break
        if info["label"] == 1 and info["arch"] not in archs:
            chosen.append(name)
            archs.add(info["arch"])
    return chosen


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--zoo", default="runs/zoo")
    p.add_argument("--out", default="runs/experiment_verify")
    p.add_argument("--reference", default="sos_small_cnn_s0", help="the trusted SOS model (supervised reference)")
    p.add_argument("--methods", default="gradcam,featuremap")
    p.add_argument("--n-test", type=int, default=100)
    p.add_argument("--n-ref", type=int, default=200, help="SOS development cohort (the zoo's --n) for reference maps")
    p.add_argument("--n-splits", type=int, default=5)
    p.add_argument("--n-estimators", type=int, default=200)
    p.add_argument("--alpha", type=float, default=0.1)
    p.add_argument("--small-ensemble", type=int, default=4)
    p.add_argument(
        "--learned-margin", type=float, default=0.1,
        help="post-hoc line: supervised leave-models-out on the models whose own-task test accuracy >= chance + this",
    )  # fmt: skip
    p.add_argument(
        "--ref-min-val-acc", type=float, default=0.0,
        help="one-class references: only SOS models with validation accuracy >= this (what a user can check)",
    )  # fmt: skip
    p.add_argument(
        "--grid", type=int, default=0, help="bring every map to a grid^3 common grid first (0: off; >= 7 for ssim)"
    )
    p.add_argument("--rank", action="store_true", help="with --grid: rank-normalise each map too")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    device, out, t0 = start_run(args)

    zoo = {}
    for name in ZOO:
        if (Path(args.zoo) / f"{name}.json").is_file():
            model, info = load_member(args.zoo, name)
            zoo[name] = (model.to(device), info)
    if args.reference not in zoo:
        raise SystemExit(f"reference {args.reference!r} not in {args.zoo}: run scripts/train_zoo.py --zoo full first")
    size = zoo[args.reference][1]["size"]
    zt = pd.DataFrame(
        [
            {
                "model": n,
                "data": info["data"] + (f"/{info['corrupt']}" if info.get("corrupt") else ""),
                "arch": info["arch"],
                "label": info["label"],
                "test acc (own task)": info["test_acc"],
                "chance": info["chance"],
            }
            for n, (_, info) in zoo.items()
        ]
    )
    print(f"zoo: {len(zoo)} models, {zt['arch'].nunique()} architectures, size {size}^3")
    print(md_table(zt))
    dev_x, _ = load_cohort("sos", args.n_ref, size, args.seed)
    test_x, _ = load_cohort("sos", args.n_test, size, args.seed + 1000)
    dev_b, test_b = batches(dev_x, "dev", args.batch), batches(test_x, "sos", args.batch)
    labels = {n: info["label"] for n, (_, info) in zoo.items()}
    wrap = (lambda fn: CommonGrid(fn, args.grid, rank=args.rank)) if args.grid else None
    features = (
        f"maps on a common {args.grid}^3 grid{' , rank-normalised' if args.rank else ''}" if args.grid else "maps"
    )
    print(f"features: similarity of {features}")
    results: dict = {
        "features": features,
        "zoo": zt.to_dict(orient="records"),
        "size": size,
        "n_test": args.n_test,
        "methods": {},
    }

    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        res: dict = {}
        ref_model, ref_info = zoo[args.reference]
        cands = {n: (m, layer_of(i, method), i["label"]) for n, (m, i) in zoo.items() if n != args.reference}
        t1 = time.perf_counter()
        sup = run_verification(
            (ref_model, layer_of(ref_info, method)), cands, test_b, out / method / "supervised", method=method,
            reference_data=dev_b, n_splits=args.n_splits, groups="auto", n_estimators=args.n_estimators,
            seed=args.seed, progress=False, map_transform=wrap,
        )  # fmt: skip
        v = pd.read_csv(sup["files"]["verdicts"])
        res["supervised"] = {
            "protocol": sup["protocol"],
            "roc_auc_model": sup["model_level_roc_auc"],
            "roc_auc_rows_oof": sup["cv_mean"]["roc_auc_oof"],
            "accuracy_rows": sup["cv_mean"]["accuracy"],
            "secondary": sup["cv_secondary"],
            "unsuitable_judged_suitable": v[(v["label"] == 0) & (v["verdict"] == "suitable")]["model"].tolist(),
            "suitable_judged_suitable": int(((v["label"] == 1) & (v["verdict"] == "suitable")).sum()),
            "undecided": int((v["verdict"] == "undecided").sum()),
            "seconds": time.perf_counter() - t1,
        }
        # post-hoc: only models that learned their own task (same features, same protocol, no new maps)
        feats = pd.read_csv(sup["files"]["features"])
        learned = [
            n for n in feats["model"].unique() if zoo[n][1]["test_acc"] >= zoo[n][1]["chance"] + args.learned_margin
        ]
        sub = feats[feats["model"].isin(learned)]
        if sub.groupby("label")["model"].nunique().min() >= 2 and sub["label"].nunique() == 2:
            cv_l = SuitabilityVerifier(n_estimators=args.n_estimators, random_state=args.seed).cross_validate(
                sub, n_splits=args.n_splits, seed=args.seed
            )
            vl = model_verdicts(sub[["model", "label"]].assign(p_suitable=cv_l.oof_proba), seed=args.seed)
            res["supervised_learned_only"] = {
                "protocol": cv_l.params["protocol"],
                "models": learned,
                "roc_auc_model": cv_l.mean["roc_auc_model"],
                "roc_auc_rows_oof": cv_l.mean["roc_auc_oof"],
                "unsuitable_judged_suitable": vl[(vl["label"] == 0) & (vl["verdict"] == "suitable")]["model"].tolist(),
            }
            r = res["supervised_learned_only"]
            print(
                f"post-hoc, supervised on the {len(learned)} models with test acc >= chance + {args.learned_margin} "
                f"({r['protocol']}): model-level ROC AUC {r['roc_auc_model']:.3f}; unsuitable judged suitable: "
                f"{r['unsuitable_judged_suitable'] or 'none'}"
            )
        t2 = time.perf_counter()
        refs = {
            n: (m, layer_of(i, method))
            for n, (m, i) in zoo.items()
            if i["label"] == 1 and i["val_acc"] >= args.ref_min_val_acc
        }
        oc = run_one_class(
            refs, {n: (m, layer_of(i, method)) for n, (m, i) in zoo.items()}, test_b, out / method / "one_class",
            labels=labels, method=method, alpha=args.alpha, progress=False, map_transform=wrap,
        )  # fmt: skip
        ov = pd.read_csv(oc["files"]["verdicts"])
        res["one_class"] = {
            "protocol": oc["protocol"],
            "references": list(refs),
            "n_references": len(refs),
            "alpha": args.alpha,
            "roc_auc_model": oc["model_level_roc_auc"],
            "unsuitable_judged_consistent": ov[(ov["label"] == 0) & (ov["verdict"] == "consistent")]["model"].tolist(),
            "suitable_rejected": ov[(ov["label"] == 1) & (ov["verdict"] == "not suitable")]["model"].tolist(),
            "seconds": time.perf_counter() - t2,
        }
        small = small_ensemble(zoo, args.reference, args.small_ensemble)
        alpha_small = max(args.alpha, 1.0 / (len(small) + 1))
        oc_s = run_one_class(
            {n: (zoo[n][0], layer_of(zoo[n][1], method)) for n in small},
            {n: (m, layer_of(i, method)) for n, (m, i) in zoo.items() if n not in small},
            test_b, out / method / "one_class_small", labels={n: lab for n, lab in labels.items() if n not in small},
            method=method, alpha=alpha_small, progress=False, map_transform=wrap,
        )  # fmt: skip
        osv = pd.read_csv(oc_s["files"]["verdicts"])
        res["one_class_small"] = {
            "references": small,
            "alpha": alpha_small,
            "roc_auc_model": oc_s["model_level_roc_auc"],
            "unsuitable_judged_consistent": osv[(osv["label"] == 0) & (osv["verdict"] == "consistent")][
                "model"
            ].tolist(),
        }
        table = v[["model", "label", "mean_p_suitable", "ci_low", "ci_high", "verdict"]].rename(
            columns={
                "mean_p_suitable": "sup mean P",
                "ci_low": "CI low",
                "ci_high": "CI high",
                "verdict": "sup verdict",
            }
        )
        table = table.merge(
            ov[["model", "p_value", "verdict"]].rename(columns={"p_value": "1-class p", "verdict": "1-class verdict"}),
            on="model",
            how="left",
        )
        table["test acc (own task)"] = table["model"].map(zt.set_index("model")["test acc (own task)"])
        write_csv(table, out / method / "per_model.csv")
        res["per_model"] = table.to_dict(orient="records")
        results["methods"][method] = res
        s, o, sm = res["supervised"], res["one_class"], res["one_class_small"]
        print(f"\n## {method}")
        print(
            f"supervised, {s['protocol']}: model-level ROC AUC {s['roc_auc_model']:.3f}; pooled out-of-fold row AUC "
            f"{s['roc_auc_rows_oof']:.3f}; unsuitable judged suitable: {s['unsuitable_judged_suitable'] or 'none'}; "
            f"suitable judged suitable {s['suitable_judged_suitable']}, undecided {s['undecided']} "
            f"({s['seconds']:.0f} s)"
        )
        if s["secondary"]:
            print(
                f"  secondary, {s['secondary']['protocol']}: pooled out-of-fold row AUC "
                f"{s['secondary']['mean']['roc_auc_oof']:.3f}, "
                f"model-level {s['secondary']['mean']['roc_auc_model']:.3f}"
            )
        print(
            f"one-class ({o['n_references']} SOS references, leave one model out), alpha {o['alpha']}: model-level ROC "
            f"AUC {o['roc_auc_model']:.3f}; unsuitable judged consistent: "
            f"{o['unsuitable_judged_consistent'] or 'none'}; "
            f"suitable rejected: {o['suitable_rejected'] or 'none'} ({o['seconds']:.0f} s)"
        )
        print(
            f"one-class, small ensemble {sm['references']}, alpha {sm['alpha']:.2f}: model-level ROC AUC "
            f"{sm['roc_auc_model']:.3f}; unsuitable judged consistent: {len(sm['unsuitable_judged_consistent'])}"
        )
        print(md_table(table))
    write_json(results, out / "results.json")
    print(f"\ntotal {time.perf_counter() - t0:.0f} s; outputs in {out}")
    print(json.dumps({m: {k: r[k]["roc_auc_model"] for k in ("supervised", "one_class", "one_class_small")}
                      for m, r in results["methods"].items()}))  # fmt: skip


if __name__ == "__main__":
    main()
