"""The demo's stages: cohorts (1), explanations through the engine (3), verification (4), attribution energy (5)
and the K+1 garbage class (6)."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, Orientationd, ResizeWithPadOrCropd, Spacingd
from scipy.ndimage import gaussian_filter
from tqdm.auto import tqdm

from monai_gamverify.apps.demo.settings import MODELS, SOS_NAMES, DemoSettings, bundles_dir
from monai_gamverify.apps.demo.weights import load_model
from monai_gamverify.apps.pipeline import ImagePipeline
from monai_gamverify.data.datalist import load_datalist
from monai_gamverify.data.garbage import mix_garbage
from monai_gamverify.data.synthetic import make_cohort
from monai_gamverify.energy import cohort_energy, energy_report
from monai_gamverify.io import save_nifti, write_csv, write_json
from monai_gamverify.metrics.evaluation import pointing_game, relevance_mass
from monai_gamverify.metrics.ood import energy_score, kplus1_score, msp_score, ood_metrics
from monai_gamverify.metrics.regression import regression_metrics
from monai_gamverify.transforms.garbage import RejectGarbaged
from monai_gamverify.verification.bundles import verify_bundles
from monai_gamverify.verification.tables import feature_columns
from monai_gamverify.visualize.cam import GradCAM
from monai_gamverify.visualize.plots import overlay_png, save_figure
from monai_gamverify.visualize.text import describe_map

__all__ = ["prepare_cohorts", "explain_examples", "verify_models", "energy_stage", "garbage_stage"]

logger = logging.getLogger("monai_gamverify.apps.demo")


# ------------------------------------------------------------------------------------------------------ 1 cohorts
def _cohort_seeds(seed: int) -> dict[str, int]:
    return {"sos": seed, "chin": seed + 1, "cvm": seed + 2, "quality": seed + 3, "noise": seed + 4}


def _noise_cohort(out: Path, n: int, size: int, seed: int) -> dict:
    """Smooth random volumes in the CBCT HU range (no anatomy at all), with a ``test`` datalist."""

    rng = np.random.default_rng([int(seed), 7])
    spacing = 40.0 / size
    affine = np.diag([spacing, spacing, spacing, 1.0])
    items = []
    for i in range(n):
        vol = gaussian_filter(rng.standard_normal((size,) * 3), sigma=rng.uniform(0.5, 2.5))
        vol = (vol - vol.min()) / max(float(np.ptp(vol)), 1e-6) * 2500.0 - 1000.0
        name = f"noise_{i:04d}"
        save_nifti(vol.astype(np.float32), out / "images" / f"{name}.nii.gz", reference=affine, dtype=np.int16)
        items.append({"image": f"images/{name}.nii.gz", "id": name})
    write_json({"test": items}, out / "datalist.json")
    return {"kind": "noise", "n": n, "size": size, "out_dir": str(out), "splits": {"test": n}}


def _garbage_datalist(data: Path, ratio: float, seed: int) -> dict:
    """K+1 datalist: SOS items (labels 0-4) plus chin and CVM items as garbage (label 5), per split."""

    out = data / "garbage"
    out.mkdir(parents=True, exist_ok=True)
    lists: dict[str, list] = {}
    for split in ("training", "validation", "test"):

        def items(kind: str, split: str = split) -> list[dict]:
            dl = data / kind / "datalist.json"
            return load_datalist(dl, split, check="exists", spatial_dims=None, allow_empty=kind != "sos")

        sources = {k: v for k in ("chin", "cvm") if (v := items(k))}  # tiny cohorts may leave a split empty
        real = items("sos")
        if sources:
            mixed = mix_garbage(real, sources, num_classes=5, ratio=ratio if split == "training" else None, seed=seed)
        else:
            mixed = [dict(e, source="real") for e in real]
        # the same keys in every item (batches are collated), relative paths (the demo folder can be moved)
        lists[split] = [
            {
                "image": os.path.relpath(e["image"], out),
                "label": int(e["label"]),
                "id": str(e.get("id", Path(e["image"]).name.split(".")[0])),
                "source": str(e["source"]),
            }
            for e in mixed
        ]
    write_json(lists, out / "datalist.json")
    labels = [int(e["label"]) for e in lists["training"]]
    return {"kind": "garbage", "out_dir": str(out), "splits": {k: len(v) for k, v in lists.items()}, "labels": labels}


def prepare_cohorts(data_dir: str | os.PathLike, settings: DemoSettings, seed: int = 0, progress: bool = True) -> dict:
    """Write the demo cohorts under ``data_dir``: ``sos``, ``chin``, ``cvm``, ``quality``, ``noise``, ``garbage``.

    Args:
        data_dir: output folder.
        settings: sizes (:func:`demo_settings`).
        seed: base seed (cohort ``k`` uses ``seed + k``).
        progress: progress bars.

    Returns:
        kind -> summary dict of :func:`monai_gamverify.data.synthetic.make_cohort`.

    Example:
        >>> prepare_cohorts("demo_out/data", demo_settings(quick=True))["sos"]["splits"]
    """

    data = Path(data_dir)
    seeds = _cohort_seeds(seed)
    out: dict[str, Any] = {}
    for kind in ("sos", "chin", "cvm", "quality"):
        size = settings.quality_size if kind == "quality" else settings.size
        # quality: a larger test split for the AE analysis; cvm: 6 classes, so every split gets some of each
        fractions = {"quality": (0.6, 0.1, 0.3), "cvm": (0.5, 0.25, 0.25)}.get(kind, (0.7, 0.15, 0.15))
        if progress:
            logger.info("    %s: %d volumes of %d³ (seed %d)", kind, settings.n[kind], size, seeds[kind])
        out[kind] = make_cohort(
            kind,
            n=settings.n[kind],
            size=size,
            seed=seeds[kind],
            out_dir=data / kind,
            fractions=fractions,
            progress=progress,
        )
    out["noise"] = _noise_cohort(data / "noise", settings.n["noise"], settings.size, seeds["noise"])
    out["garbage"] = _garbage_datalist(data, settings.garbage_ratio, seed)
    return out


# ------------------------------------------------------------------------------------------------- 3 explanations
def _mask_transform(bm: Any) -> Any:
    """The bundle's geometric preprocessing for a label mask (nearest neighbour, no intensity scaling)."""

    return Compose(
        [
            LoadImaged("mask", image_only=True),
            EnsureChannelFirstd("mask"),
            Orientationd("mask", axcodes="RAS"),
            Spacingd("mask", pixdim=bm.parser.get_parsed_content("pixdim"), mode="nearest"),
            ResizeWithPadOrCropd("mask", spatial_size=bm.parser.get_parsed_content("roi_size")),
        ]
    )


def explain_examples(
    models: Mapping[str, Any], items: list[dict], out: Path, device: torch.device, progress: bool
) -> pd.DataFrame:
    """Stage 3: the reference and the chin model explain a few SOS test volumes through the engine
    (:class:`~monai_gamverify.apps.pipeline.ImagePipeline`, maps kept on the preprocessed grid where the masks are):
    NIfTI maps, overlays with the synchondrosis mask, pointing game, relevance mass, text descriptions."""
    engines = {n: ImagePipeline.from_bundle(models[n], method="gradcam", invert=False) for n in ("sos_ref", "chin")}
    mask_pre = _mask_transform(models["sos_ref"])
    rows = []
    for item in tqdm(items, desc="explain", disable=not progress, leave=False):
        raw, img = engines["sos_ref"].load(item["image"])  # both models share the bundle's preprocessing
        mask = mask_pre({"mask": item["mask"]})["mask"] if item.get("mask") else None
        for name, engine in engines.items():
            res = engine.explain(img, raw)
            cam = res.cam
            prob = float(res.probabilities[res.prediction])
            stem = f"{item['id']}_{name}"
            nii = engine.write(res, out, f"{stem}_gradcam", overlay=False, summary=False)["map"]
            truth = SOS_NAMES[int(item["label"])]
            png = overlay_png(
                img[0],
                cam[0],
                out / f"{stem}_gradcam.png",
                mask=None if mask is None else mask[0],
                title=f"{name}: {item['id']} (true {truth}) -> {res.prediction_name} p={prob:.2f}",
            )
            row = {
                "id": item["id"],
                "model": name,
                "true_stage": truth,
                "prediction": res.prediction_name,
                "probability": prob,
                "text": describe_map(cam, affine=img.affine),
                "map": str(nii),
                "overlay": str(png),
            }
            if mask is not None:
                m = (mask > 0).float().unsqueeze(0)
                row["peak_in_synchondrosis"] = bool(pointing_game(cam.unsqueeze(0), m, spacing=1.0)[0] == 1)
                row["relevance_mass"] = float(relevance_mass(cam.unsqueeze(0), m)[0])
            rows.append(row)
    table = pd.DataFrame(rows)
    write_csv(table, out / "explanations.csv")
    return table


# ------------------------------------------------------------------------------------------------- 4 verification
def _feature_distributions_png(features: pd.DataFrame, path: Path, title: str) -> Path:
    """Box plots of every similarity feature by label (1 = suitable, 0 = not)."""

    cols = feature_columns(features)
    ncol = min(4, len(cols))
    nrow = int(np.ceil(len(cols) / ncol))
    fig = Figure(figsize=(3.0 * ncol, 2.6 * nrow))
    axes = fig.subplots(nrow, ncol, squeeze=False)
    labels = sorted(features["label"].unique())
    for ax, col in zip(axes.flat, cols):
        groups = [features.loc[features["label"] == lab, col].to_numpy(float) for lab in labels]
        ax.boxplot(groups, tick_labels=[f"label {lab}" for lab in labels], widths=0.6)
        for k, g in enumerate(groups):
            jitter = np.random.default_rng(k).uniform(-0.12, 0.12, g.size)
            ax.scatter(np.full(g.size, k + 1) + jitter, g, s=8, alpha=0.6, c=f"C{k}")
        ax.set_title(col, fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(cols) :]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def verify_models(
    data: Path,
    ckpts: Mapping[str, Path],
    out: Path,
    settings: DemoSettings,
    seed: int,
    device: torch.device,
    progress: bool,
) -> dict:

    root = bundles_dir() / "sos_staging"
    labels = {"sos_b": 1, "sos_kplus1": 1, "chin": 0, "cvm": 0}
    candidates = {n: {"bundle": str(root), "checkpoint": str(ckpts[n])} for n in labels}
    results = {}
    for method in ("gradcam", "featuremap"):
        report = verify_bundles(
            reference=str(root),
            candidates=candidates,
            dataset_dir=str(data / "sos"),
            out=str(out / method),
            labels=labels,
            split="test",
            method=method,
            overrides={**MODELS["sos_ref"]["overrides"], "checkpoint": str(ckpts["sos_ref"])},
            candidate_overrides={n: MODELS[n]["overrides"] for n in labels},
            n_splits=settings.n_splits,
            seed=seed,
            progress=progress,
            device=str(device),
            n_estimators=settings.n_estimators,
        )
        features = pd.read_csv(out / method / "features.csv")
        dist = _feature_distributions_png(
            features, out / method / "feature_distributions.png", f"similarity features by label ({method})"
        )
        cv = json.loads((out / method / "cv.json").read_text(encoding="utf-8"))
        results[method] = {
            "protocol": cv["protocol"],
            "cv_mean": dict(report["cv_mean"]),
            "cv_secondary": {
                "protocol": cv.get("cross_validation_secondary", {}).get("protocol"),
                **cv.get("cross_validation_secondary", {}).get("mean", {}),
            },  # fmt: skip
            "per_model": report["per_model"],
            "reference_layer": report["reference"]["layer"],
            "n_items": report["n_items"],
            "dir": out / method,
            "feature_distributions": dist,
        }
    return results


# ---------------------------------------------------------------------------------------------- 5 attribution energy
def energy_stage(
    data: Path, ckpt: Path, out: Path, settings: DemoSettings, seed: int, device: torch.device, progress: bool
) -> dict:

    bm = load_model("quality", ckpt, device)
    categories = list(bm.parser.get_parsed_content("categories"))
    pre = bm.preprocessing()
    dl = data / "quality" / "datalist.json"
    items = [e for split in ("validation", "test") for e in load_datalist(dl, split, check="exists", spatial_dims=None)]
    volumes = {e["id"]: pre({"image": e["image"]})["image"] for e in items}
    cam = GradCAM(bm.network, bm.target_layer)
    ae = cohort_energy(cam, volumes, {c: i for i, c in enumerate(categories)}, slice_axis=2, device=device)
    consensus = pd.DataFrame([{"id": e["id"], **{c: float(e[c]) for c in categories}} for e in items])
    out.mkdir(parents=True, exist_ok=True)
    write_csv(ae, out / "ae.csv")
    write_csv(consensus, out / "consensus.csv")
    preds = []
    with torch.no_grad():
        for vol in volumes.values():  # the bundle's evaluation: every axial slice, mean over slices
            slices = vol.as_tensor().movedim(-1, 0).to(device)  # (D, 1, H, W)
            preds.append(bm.network(slices).mean(0).cpu().numpy())
    reg = regression_metrics(np.stack(preds), consensus[categories].to_numpy(), categories)
    write_csv(reg, out / "regression_metrics.csv")
    rep = energy_report(
        out / "ae.csv", out / "consensus.csv", out, n_boot=settings.n_boot, seed=seed, progress=progress
    )
    table = pd.read_csv(out / "energy_table.csv")
    return {"table": table, "regression": reg, "paths": rep["paths"], "n": len(items), "categories": categories}


# -------------------------------------------------------------------------------------------------- 6 garbage class
def garbage_stage(data: Path, models: Mapping[str, Any], out: Path, device: torch.device, progress: bool) -> dict:

    pre = models["sos_ref"].preprocessing()
    sources = {"sos (in-distribution)": "sos", "chin": "chin", "cvm": "cvm", "noise": "noise"}
    reject = RejectGarbaged(keys="pred")
    rows, per_item = [], []
    with torch.no_grad():
        for source, kind in sources.items():
            dl = data / kind / "datalist.json"
            items = load_datalist(dl, "test", check="exists", spatial_dims=None, require_label=False, allow_empty=True)
            for e in tqdm(items, desc=f"K+1 {kind}", disable=not progress, leave=False):
                x = pre({"image": e["image"]})["image"].unsqueeze(0).to(device)
                logits6 = models["sos_kplus1"].network(x)[0].float().cpu()
                logits5 = models["sos_ref"].network(x)[0].float().cpu()
                r = reject({"pred": logits6})
                row = {
                    "id": e.get("id", Path(e["image"]).name.split(".")[0]),
                    "source": source,
                    "rejected": bool(r["rejected"]),
                    "garbage_prob": float(r["garbage_prob"]),
                    "best_real_class": int(r["best_real_class"]),
                    "kplus1_score": float(kplus1_score(logits6[None])[0]),
                    "msp_ref": float(msp_score(logits5[None])[0]),
                    "energy_ref": float(energy_score(logits5[None])[0]),
                }
                if kind == "sos":
                    row["stage_correct"] = int(r["best_real_class"]) == int(e["label"])
                per_item.append(row)
    items_df = pd.DataFrame(per_item)
    for source, part in items_df.groupby("source", sort=False):
        rows.append(
            {
                "source": source,
                "n": len(part),
                "rejected": int(part["rejected"].sum()),
                "rejection_rate": float(part["rejected"].mean()),
                "mean_garbage_prob": float(part["garbage_prob"].mean()),
            }
        )
    table = pd.DataFrame(rows)
    is_in = items_df["source"].str.startswith("sos")
    ood = []
    baselines = {"K+1 (1 - p garbage)": "kplus1_score", "MSP (ref.)": "msp_ref", "energy (ref.)": "energy_ref"}
    for method, col in baselines.items():
        m = ood_metrics(items_df.loc[is_in, col], items_df.loc[~is_in, col])
        ood.append({"method": method, "auroc": m["auroc"], "fpr_at_95tpr": m["fpr_at_tpr"]})
    ood_df = pd.DataFrame(ood)
    write_csv(items_df, out / "garbage_items.csv")
    write_csv(table, out / "rejections.csv")
    write_csv(ood_df, out / "ood_baselines.csv")
    acc = float(items_df.loc[is_in, "stage_correct"].mean()) if is_in.any() else float("nan")
    return {"table": table, "ood": ood_df, "items": items_df, "stage_accuracy": acc}
