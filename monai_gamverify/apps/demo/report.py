"""The demo's report: verdicts, ``report.html``, TensorBoard summary scalars and the printed summary."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from monai_gamverify.apps.demo.settings import SOS_NAMES
from monai_gamverify.apps.demo.stages import CANDIDATES, TARGETS
from monai_gamverify.apps.report import Report

__all__ = ["verdicts", "verdict_figures", "write_report", "tensorboard_summary", "format_summary", "records"]


# ------------------------------------------------------------------------------------------------- 7 report
def _p(p: float | None) -> str:
    return "n/a" if p is None or not np.isfinite(p) else f"{p:.2g}"


def _shortcut_truth(truth: list[dict]) -> dict | None:
    row = next((r for r in truth if r["model"] == "sos_shortcut"), None)
    if row is None:
        return None
    return {"with": row["accuracy, SOS test split with the marker"], "without": row["accuracy, SOS test split"]}


def verdict_figures(verification: Mapping[str, Any]) -> dict[str, float]:
    """Key figures of the verification stage: the share of label-free verdicts that are right per target, and the
    shortcut model's measured accuracy with and without its cue."""
    out = {}
    for target, info in verification["targets"].items():
        df = info["verdicts"]
        right = [v == CANDIDATES[m][1] for m, v in zip(df["model"], df["verdict"])]
        what = "clean SOS target" if target == "clean" else "SOS target carrying the marker"
        out[f"label-free model verdicts as expected, {what}"] = float(np.mean(right)) if right else float("nan")
    truth = verification["truth"]
    short = _shortcut_truth(truth.to_dict(orient="records") if isinstance(truth, pd.DataFrame) else list(truth))
    if short is not None:
        out["shortcut model accuracy, SOS test split with the marker"] = float(short["with"])
        out["shortcut model accuracy, SOS test split without the marker"] = float(short["without"])
    return out


def verdicts(summary: dict) -> list[tuple[str, str, bool]]:
    """The report's and the printed summary's verdict lines: ``(subject, text, as expected)``.

    Every candidate's label-free verdict on the clean SOS target (and the shortcut model's on the same volumes
    carrying its marker), the shortcut model's measured ground truth, each model's own screen, the rejections of the
    K+1 model and of the screen, and the attribution-energy result.
    """
    out = []
    v = summary["verification"]
    for target, info in v["targets"].items():
        where = TARGETS[target][1]
        for row in info["verdicts"]:
            name = row["model"]
            if target != "clean" and name != "sos_shortcut":  # the other models' verdicts there: in the report
                continue
            kind, expected = CANDIDATES[name]
            out.append(
                (
                    f"model {name} ({kind})",
                    f"{row['verdict']} for {where} (label-free, p = {_p(row['p_value'])}): {row['reasons']}",
                    row["verdict"] == expected,
                )
            )
    short = _shortcut_truth(v.get("truth", []))
    if short is not None:
        chance = 1.0 / len(SOS_NAMES)
        out.append(
            (
                "model sos_shortcut (ground truth, measured)",
                f"accuracy {short['with']:.2f} on the SOS test split carrying the marker, {short['without']:.2f} on "
                f"the same volumes without it (chance {chance:.2f}): it relies on the marker, not on the anatomy",
                short["with"] >= chance + 0.5 and short["without"] < chance + 0.3,
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
        "Seven bundles: six small_cnn models (the SOS reference, a second SOS model, the K+1 SOS model, a chin, a CVM "
        "and an image-quality model) and a DenseNet trained on SOS volumes carrying a stage-encoding marker (a "
        "shortcut model). Weights: "
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

    v = results["verification"]
    sec = rep.section(
        "Model verdicts (label-free)",
        "Is each candidate model suitable for the SOS data? The user's case: one trusted reference model (sos_ref), "
        f"{v['n_images']} unlabeled SOS volumes no model saw, and no zoo of known-bad models "
        "(monai_gamverify.apps.suitability.verify_suitability). Every model reads the volumes through its bundle; "
        "the evidence is task compatibility from the bundle's metadata (classes), prediction agreement with the "
        "reference (Cohen's kappa), attention agreement (Method 1: the mean Grad-CAM maps on one common grid) and "
        "early-feature agreement (Method 2). H0 'the candidate behaves next to the reference like a suitable model' "
        "is tested by an exact conformal p-value against the null rows of the prior shipped with the package "
        f"({v['prior']['rows']} suitable pairs: {v['prior']['source']}); rejected at alpha = {v['alpha']}: not "
        "suitable; not rejected and predictions related beyond chance: suitable; otherwise undecided. The same "
        "volumes carrying the stage-encoding marker are the data a shortcut model agrees on: there its predictions "
        "match the reference's, and only its attention can tell. The ground truth (measured accuracy on labelled "
        "volumes) is never shown to the verdict.",
    )
    cols = ["model", "verdict", "expected", "p_value", "agreement", "p_agreement", "attention", "p_attention",
            "features", "p_features", "related_p", "reasons"]  # fmt: skip
    for target, info in v["targets"].items():
        df = info["verdicts"].copy()
        df.insert(2, "expected", [CANDIDATES[m][1] for m in df["model"]])
        sec.add_table(df[[c for c in cols if c in df]], f"verdicts on {TARGETS[target][1]} ({info['dir']})")
    sec.add_table(v["truth"], "ground truth: measured accuracy of the SOS-task models (ground_truth.csv)")
    for target, info in v["targets"].items():
        for name in CANDIDATES:
            png = Path(info["dir"]) / "maps" / f"{name}_mean_maps.png"
            if png.is_file():
                sec.add_figure(png, f"{name} on {TARGETS[target][1]}: mean Grad-CAM maps, reference | candidate",
                               width=360)  # fmt: skip

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
        for target, info in summary["verification"]["targets"].items():
            for row in info["verdicts"]:
                writer.add_scalar(f"verify_{target}/p_value_{row['model']}", row["p_value"], 0)
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
