"""The demo's report: verdicts, ``report.html``, TensorBoard summary scalars and the printed summary."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from monai_gamverify.apps.report import Report

__all__ = ["verdicts", "write_report", "tensorboard_summary", "format_summary", "records"]


# ------------------------------------------------------------------------------------------------- 7 report
def verdicts(summary: dict) -> list[tuple[str, str, bool]]:
    out = []
    v = summary["verification"]["gradcam"]
    for name, info in v["per_model"].items():
        truth = "trained on SOS" if info["label"] == 1 else "trained on other data"
        verdict = info.get("verdict", "suitable" if info["mean_p_suitable"] >= 0.5 else "not suitable")
        interval = f" [{info['ci_low']:.2f}, {info['ci_high']:.2f}]" if "ci_low" in info else ""
        out.append(
            (
                f"model {name} ({truth})",
                f"{verdict} for the SOS data ({v.get('protocol', 'cross-validated')}): mean P(suitable) "
                f"{info['mean_p_suitable']:.2f}{interval}",
                verdict == ("suitable" if info["label"] == 1 else "not suitable"),
            )
        )
    for row in summary.get("screen", {}).get("models", []):  # the dataset judged by each model's own screen
        if row.get("like_training_data") is None:  # no screen could be fitted (a quick run's tiny cohorts)
            continue
        expected_like = row["trained_on"] == "sos"
        truth = "trained on SOS" if expected_like else "trained on other data"
        like = "like" if row["like_training_data"] else "unlike"
        pval = "p < 0.001" if row["p_value"] < 1e-3 else f"p = {row['p_value']:.2g}"
        out.append(
            (
                f"model {row['model']} ({truth})",
                f"{'suitable' if row['like_training_data'] else 'not suitable'} for the SOS data by its own screen: "
                f"{row['n_rejected']}/{row['n']} SOS test volumes out of its distribution ({pval}: {like} its "
                "training data)",
                row["like_training_data"] == expected_like,
            )
        )
    rejections = [
        (summary["garbage"]["rejections"], "rejected by the K+1 model"),
        (summary.get("screen", {}).get("rejections", []), "out of distribution by the screen"),
    ]
    for rows, what in rejections:
        for row in rows:  # in-distribution sources should pass (<= 20 % rejected), the others be rejected (>= 50 %)
            rate = row["rejection_rate"]
            good = rate <= 0.2 if row["source"].startswith("sos") else rate >= 0.5
            out.append((f"{row['source']} volumes", f"{row['rejected']}/{row['n']} {what} ({100 * rate:.0f} %)", good))
    sig = [r["category"] for r in summary["energy"]["table"] if r.get("significant_holm")]
    out.append(
        (
            "attribution energy",
            f"tracks the consensus score (Holm p <= 0.05) for {len(sig)} of {len(summary['energy']['table'])} "
            f"categories{': ' + ', '.join(sig) if sig else ''}",
            bool(sig),
        )
    )
    return out


def write_report(out: Path, summary: dict, results: dict) -> Path:

    rep = Report(
        "monai-gamverify demo: is this model suitable for this data?",
        subtitle=f"synthetic cohorts, seed {summary['seed']}, {summary['mode']} run, weights: {summary['weights']}; "
        "research demonstration, not for clinical use",
    )
    for v in verdicts(summary):
        rep.verdict(*v)
    rep.key_figures(summary["key_figures"])

    sec = rep.section(
        "Data",
        "Synthetic phantoms with ground truth (monai_gamverify.data): SOS volumes (the task: fusion stage 1-5), "
        "chin and cervical-vertebrae volumes (other anatomy), pure noise, and head-and-neck image-quality volumes "
        "scored by five simulated raters.",
    )
    sec.add_table(pd.DataFrame(summary["cohorts"]), "cohorts")

    sec = rep.section(
        "Models",
        "Five small_cnn bundles. Weights: "
        + (
            "shipped with the package (scripts/make_demo_weights.py --seed 0, same bundle configs and cohorts)."
            if summary["weights"] == "shipped"
            else "trained in this run through each bundle's configs/train.json."
        ),
    )
    sec.add_table(pd.DataFrame(summary["models"]), "models")

    sec = rep.section(
        "Explanations (Grad-CAM)",
        "Grad-CAM of the reference SOS model and of the chin model on SOS test volumes, on three orthogonal slices "
        "through the map's peak; the white contour is the true synchondrosis. The text under each figure is "
        "monai_gamverify.visualize.text.describe_map.",
    )
    for row in results["explanations"].to_dict(orient="records"):
        extra = ""
        if "peak_in_synchondrosis" in row:
            extra = (
                f" Peak in the synchondrosis: {'yes' if row['peak_in_synchondrosis'] else 'no'}; "
                f"relevance mass {row['relevance_mass']:.2f}."
            )
        sec.add_figure(row["overlay"], f"{row['model']} on {row['id']}: {row['text']}{extra}")

    methods = {"gradcam": "Method 1: Grad-CAM attention maps", "featuremap": "Method 2: early feature maps"}
    for method, what in methods.items():
        v = results["verification"][method]
        d = Path(v["dir"])
        sec = rep.section(
            f"Verification, {what}",
            f"Every candidate's map of every SOS test volume is compared with the reference model's mean map "
            f"(layer {v['reference_layer']}) by seven similarity features; a Random Forest learns 'trained on similar "
            f"data' (label 1) vs not (label 0). Protocol: {v['protocol']} (each fold's test models were never seen by "
            "the forest: the real use, a candidate model the verifier never saw); folds grouped by subject are shown "
            "as a secondary line only, since every model sits in every training fold there. A model's verdict comes "
            "from the bootstrap interval of its mean out-of-fold P(suitable): suitable when the interval lies above "
            "0.5, not suitable below, else undecided.",
        )
        sec.add_figure(d / "roc.png", "ROC of the out-of-fold P(suitable)")
        sec.add_figure(d / "reference_map.png", "reference map (mean normalised map of the reference model)")
        sec.add_figure(v["feature_distributions"], "per-label feature distributions")
        per_model = pd.DataFrame([{"model": k, **vals} for k, vals in v["per_model"].items()])
        sec.add_table(per_model, f"model-level verdicts ({v['protocol']}): mean out-of-fold P(suitable), 95 % interval")
        sec.add_table(pd.DataFrame([v["cv_mean"]]), f"cross-validation, {v['protocol']} (mean over folds)")
        sec.add_table(
            pd.DataFrame([v["cv_secondary"]]), "secondary: folds grouped by subject (models seen in training)"
        )
        sec.add_table(pd.read_csv(d / "summary.csv"), "per-label feature statistics")

    e = results["energy"]
    sec = rep.section(
        "Attribution energy",
        f"AE (sum of the raw Grad-CAM over all axial slices) of the 2D quality model on {e['n']} held-out "
        "volumes, against the raters' consensus score, per category: Spearman rho, leave-one-out rho/p, bootstrap "
        "interval and Holm adjustment (monai_gamverify.energy).",
    )
    for c in e["categories"]:
        p = Path(e["paths"].get(f"scatter_{c}", ""))
        if p.is_file():
            sec.add_figure(p, f"AE vs consensus: {c}", width=480)
    sec.add_table(e["table"], "AE vs consensus (energy_table.csv)")
    sec.add_table(e["regression"], "quality model predictions vs consensus (regression_metrics.csv)")

    g = results["garbage"]
    sec = rep.section(
        "Garbage class (K+1)",
        "The K+1 SOS model has a sixth class trained on chin and CVM volumes; it should reject what is not an SOS "
        "volume (noise was never seen in training) and keep the SOS test volumes. Post-hoc baselines on the "
        f"5-class reference model for comparison. Stage accuracy of the K+1 model on SOS test volumes: "
        f"{g['stage_accuracy']:.2f}.",
    )
    sec.add_table(g["table"], "rejection table")
    sec.add_table(g["ood"], "OOD detection: in = SOS test, out = chin + CVM + noise")

    s = results["screen"]
    sec = rep.section(
        "In-distribution screen",
        "Is this image like the data the SOS model was made for? A screen fitted on the SOS training volumes (data "
        "profile, Mahalanobis / relative Mahalanobis / k-NN on the model's penultimate and early features, "
        "attention atypicality) and calibrated on SOS volumes no model saw "
        f"({s['n_cal']} images): each detector gives a conformal p-value, their combination rejects at alpha = 0.05, "
        "so at most 5 % of in-distribution images are rejected by construction. The verdict of an image that fails "
        "the screen is 'out of distribution', before any model verdict (monai_gamverify.screening).",
    )
    sec.add_table(s["table"], "out-of-distribution rejections per source (screen_rejections.csv)")
    for pic in s["pictures"]:
        sec.add_figure(pic["png"], f"rejected ({pic['source']}): {pic['reason']}", width=480)
    if "models" in s:
        sec.add_text(
            "Is the SOS dataset like the data each candidate model was made for? Each model's own screen (fitted on "
            "its own training volumes, calibrated on volumes of its own kind it never saw) judges the 15 SOS test "
            "volumes; the number it rejects gives one p-value for the dataset (Beta-binomial: the volumes share the "
            "screen's calibration set; monai_gamverify.screening.dataset_test). Unlike the attention verifier above, "
            "this needs no unsuitable model to learn from."
        )
        sec.add_table(s["models"], "the SOS test volumes judged by each model's own screen (model_screens.csv)")

    sec = rep.section("Files", "Everything in the report is also on disk:")
    sec.add_list([f"{k}: {v}" for k, v in summary["files"].items()])
    sec.add_text(format_summary(summary), pre=True)
    return rep.write(out / "report.html")


def tensorboard_summary(tb: Path, summary: dict) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(tb / "summary"))
    try:
        for method, v in summary["verification"].items():
            for k, val in v["cv_mean"].items():
                writer.add_scalar(f"verify_{method}/{k}", val, 0)
            for name, info in v["per_model"].items():
                writer.add_scalar(f"verify_{method}/mean_p_suitable_{name}", info["mean_p_suitable"], 0)
        for row in summary["energy"]["table"]:
            writer.add_scalar(f"energy/rho_{row['category']}", row["rho"], 0)
            writer.add_scalar(f"energy/median_loo_rho_{row['category']}", row["median_loo_rho"], 0)
        for row in summary["garbage"]["rejections"]:
            writer.add_scalar(f"garbage/rejection_rate_{row['source'].split()[0]}", row["rejection_rate"], 0)
        for k, t in summary["timings_s"].items():
            writer.add_scalar(f"timing_s/{k}", t, 0)
    finally:
        writer.close()


def format_summary(summary: Mapping[str, Any]) -> str:
    """The few lines printed at the end of a demo run: verdicts, key figures, where the report is.

    Example:
        >>> print(format_summary(run_demo("demo_out")))
    """
    lines = ["verdicts:"]
    for subject, text, good in verdicts(dict(summary)):
        lines.append(f"  [{'ok' if good else '!!'}] {subject}: {text}")
    lines.append("key figures:")
    for k, v in summary["key_figures"].items():
        lines.append(f"  {k}: {v:.3f}" if isinstance(v, float) else f"  {k}: {v}")
    lines.append(f"total {summary['timings_s']['total']:.0f} s; report: {summary['report']}")
    return "\n".join(lines)


def records(df: pd.DataFrame) -> list[dict]:
    return json.loads(df.to_json(orient="records"))
