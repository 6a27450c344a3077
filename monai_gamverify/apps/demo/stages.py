"""The demo's stages: cohorts (1), explanations through the engine (3), label-free model verdicts (4), attribution
energy (5) and the K+1 garbage class (6)."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, Orientationd, ResizeWithPadOrCropd, Spacingd
from scipy.ndimage import gaussian_filter
from tqdm.auto import tqdm

from monai_gamverify.apps.demo.settings import MODELS, SOS_NAMES, DemoSettings, bundles_dir
from monai_gamverify.apps.demo.weights import load_model
from monai_gamverify.apps.pipeline import ImagePipeline
from monai_gamverify.apps.suitability import default_prior_path, verify_suitability
from monai_gamverify.data.datalist import load_datalist
from monai_gamverify.data.garbage import mix_garbage
from monai_gamverify.data.synthetic import make_cohort
from monai_gamverify.energy import cohort_energy, energy_report
from monai_gamverify.io import save_nifti, write_csv, write_json
from monai_gamverify.metrics.evaluation import pointing_game, relevance_mass
from monai_gamverify.metrics.ood import energy_score, kplus1_score, msp_score, ood_metrics
from monai_gamverify.metrics.regression import regression_metrics
from monai_gamverify.transforms.garbage import RejectGarbaged
from monai_gamverify.verification.suitability import SuitabilityPrior
from monai_gamverify.visualize.cam import GradCAM
from monai_gamverify.visualize.plots import overlay_png
from monai_gamverify.visualize.text import describe_map

__all__ = ["prepare_cohorts", "verdict_cohorts", "explain_examples", "verify_models", "ground_truth", "energy_stage",
           "garbage_stage", "CANDIDATES", "TARGETS"]  # fmt: skip

logger = logging.getLogger("monai_gamverify.apps.demo")


# ------------------------------------------------------------------------------------------------------ 1 cohorts
def _cohort_seeds(seed: int) -> dict[str, int]:
    return {"sos": seed, "chin": seed + 1, "cvm": seed + 2, "quality": seed + 3, "noise": seed + 4,
            "sos_marker": seed + 5, "sos_target": seed + 6}  # fmt: skip


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


def verdict_cohorts(data_dir: str | os.PathLike, settings: DemoSettings, seed: int = 0, progress: bool = True) -> dict:
    """The cohorts of the verification stage under ``data_dir``: ``sos_cue`` (the ``sos`` cohort's very volumes
    carrying the marker: the shortcut model's ground truth with and without its cue on one test split), and the
    label-free verdict's targets ``sos_target`` (``settings.n_target`` SOS volumes no model saw) and
    ``sos_target_marker`` (the same volumes carrying the marker).

    Returns:
        name -> summary dict of :func:`monai_gamverify.data.synthetic.make_cohort`.
    """
    data, seeds = Path(data_dir), _cohort_seeds(seed)
    out = {"sos_cue": make_cohort("sos", n=settings.n["sos"], size=settings.size, seed=seeds["sos"],
                                  out_dir=data / "sos_cue", progress=progress, cue="marker")}  # fmt: skip
    for name, cue in (("sos_target", "none"), ("sos_target_marker", "marker")):
        out[name] = make_cohort("sos", n=settings.n_target, size=settings.size, seed=seeds["sos_target"],
                                out_dir=data / name, progress=progress, cue=cue)  # fmt: skip
    return out


def prepare_cohorts(data_dir: str | os.PathLike, settings: DemoSettings, seed: int = 0, progress: bool = True) -> dict:
    """Write the demo cohorts under ``data_dir``: ``sos``, ``chin``, ``cvm``, ``quality``, ``sos_marker`` (SOS volumes
    carrying a burned-in marker whose intensity encodes the stage: the shortcut model's training data), ``noise``,
    ``garbage``, and the verification stage's ``sos_cue``, ``sos_target`` and ``sos_target_marker``
    (:func:`verdict_cohorts`).

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
    for name in ("sos", "chin", "cvm", "quality", "sos_marker"):
        kind, cue = ("sos", "marker") if name == "sos_marker" else (name, "none")
        size = settings.quality_size if kind == "quality" else settings.size
        # quality: a larger test split for the AE analysis; cvm: 6 classes, so every split gets some of each
        fractions = {"quality": (0.6, 0.1, 0.3), "cvm": (0.5, 0.25, 0.25)}.get(kind, (0.7, 0.15, 0.15))
        if progress:
            logger.info("    %s: %d volumes of %d³ (seed %d)", name, settings.n[name], size, seeds[name])
        out[name] = make_cohort(
            kind,
            n=settings.n[name],
            size=size,
            seed=seeds[name],
            out_dir=data / name,
            fractions=fractions,
            progress=progress,
            cue=cue,
        )
    out.update(verdict_cohorts(data, settings, seed, progress))
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
#: the label-free verdict's candidates (the reference is ``sos_ref``) -> what they are, and the verdict they should get
CANDIDATES: dict[str, tuple[str, str]] = {
    "sos_b": ("trained on SOS", "suitable"),
    "sos_kplus1": ("trained on SOS", "suitable"),
    "chin": ("trained on other data", "not suitable"),
    "cvm": ("trained on other data", "not suitable"),
    "sos_shortcut": ("shortcut: trained on SOS carrying a stage-encoding marker", "not suitable"),
}
#: the verdict's targets: name -> (cohort folder, what the report calls it)
TARGETS = {"clean": ("sos_target", "the SOS data"), "marker": ("sos_target_marker", "SOS data carrying the marker")}
#: the ground truth: name -> (cohort, splits) on which every SOS-task model's accuracy is measured
TRUTH_SETS = {
    "SOS test split": ("sos", ("test",)),
    "SOS test split with the marker": ("sos_cue", ("test",)),
    "target": ("sos_target", ("training", "validation", "test")),
    "target with the marker": ("sos_target_marker", ("training", "validation", "test")),
}


def ground_truth(data: Path, ckpts: Mapping[str, Path], device: torch.device) -> pd.DataFrame:
    """Measured accuracy of every SOS-task model (the reference, the SOS candidates and the shortcut model) on the
    SOS test split and the target volumes, without and with the marker (the labels are never shown to the verdict).

    Returns:
        One row per model: ``model``, one accuracy column per :data:`TRUTH_SETS` entry and ``n`` per set.
    """
    rows = []
    for name in ("sos_ref", *[n for n in CANDIDATES if MODELS[n]["data"] in ("sos", "sos_marker", "garbage")]):
        bm = load_model(name, ckpts[name], device)
        pre = bm.preprocessing()
        row: dict[str, Any] = {"model": name}
        with torch.no_grad():
            for what, (cohort, splits) in TRUTH_SETS.items():
                dl = data / cohort / "datalist.json"
                items = [e for s in splits for e in load_datalist(dl, s, check="exists", spatial_dims=None,
                                                                  allow_empty=True)]  # fmt: skip
                correct = []
                for e in items:
                    logits = bm.network(pre({"image": e["image"]})["image"].unsqueeze(0).to(device))[0]
                    correct.append(int(logits[: len(SOS_NAMES)].argmax()) == int(e["label"]))  # K+1: real classes
                row[f"accuracy, {what}"] = float(np.mean(correct)) if correct else float("nan")
                row[f"n, {what}"] = len(correct)
        rows.append(row)
    return pd.DataFrame(rows)


def verify_models(
    data: Path,
    ckpts: Mapping[str, Path],
    out: Path,
    settings: DemoSettings,
    seed: int,
    device: torch.device,
    progress: bool,
    alpha: float = 0.05,
) -> dict:
    """Stage 4: the label-free model-level verdict (:func:`monai_gamverify.apps.suitability.verify_suitability`)
    on every candidate next to the one trusted reference ``sos_ref``, on ``settings.n_target`` unlabeled SOS volumes
    no model saw (``data/sos_target``) and on the same volumes carrying the marker (``data/sos_target_marker``: the
    data a shortcut model agrees on), with the prior shipped with the package; plus the measured ground truth.

    Returns:
        ``targets`` (name -> ``{"dir", "cohort", "verdicts": DataFrame, "report", "summary"}``), ``truth``
        (:func:`ground_truth`), ``alpha``, ``n_images``, ``prior`` (file and source).
    """
    root = bundles_dir() / "sos_staging"
    overrides = {
        name: {**MODELS[name]["overrides"], "checkpoint": str(ckpts[name])} for name in ("sos_ref", *CANDIDATES)
    }
    overrides["reference"] = overrides.pop("sos_ref")
    targets = {}
    for target, (cohort, _) in TARGETS.items():
        res = verify_suitability(
            str(root),
            dict.fromkeys(CANDIDATES, str(root)),
            str(data / cohort),
            out=str(out / target),
            n_images=settings.n_target,
            alpha=alpha,
            device=str(device),
            seed=seed,
            overrides=overrides,
            progress=progress,
        )
        targets[target] = {
            "dir": out / target,
            "cohort": cohort,
            "verdicts": res["verdicts"],
            "report": res["files"]["report"],
            "summary": res["summary"],
        }
        said = ", ".join(f"{m}: {v}" for m, v in res["verdicts"][["model", "verdict"]].itertuples(index=False))
        logger.info("    %s target: %s", target, said)
    truth = ground_truth(data, ckpts, device)
    write_csv(truth, out / "ground_truth.csv")
    prior = SuitabilityPrior.load(default_prior_path())
    return {
        "targets": targets,
        "truth": truth,
        "alpha": alpha,
        "n_images": settings.n_target,
        "prior": {"file": str(default_prior_path()), "rows": len(prior), "source": prior.source},
    }


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
