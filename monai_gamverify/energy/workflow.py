"""Attribution energy of a bundle's model over a datalist (:func:`bundle_energy`).

The MONAI workflow pieces of the CBCT image-quality study live in their role packages (and are re-exported here and
from :mod:`monai_gamverify.energy` for earlier imports):

- :class:`monai_gamverify.inferers.SliceAggregateInferer` — runs a 2D network on every slice of a (B, C, D, H, W)
  batch and aggregates the slice outputs to one prediction per volume (mean by default);
- :class:`monai_gamverify.transforms.AttributionEnergyd` — per volume, the attribution energy (AE: sum of raw
  Grad-CAM values over all slices) of every output column; :class:`monai_gamverify.transforms.SliceCAMd` — the
  slice-wise CAM stacked into a volume;
- :func:`monai_gamverify.metrics.regression_metrics` — MAE, RMSE, bias, Spearman of predictions vs consensus;
- :class:`monai_gamverify.handlers.AttributionEnergyHandler` — collects predictions, consensus scores and AE during
  an evaluator run and writes the regression metrics and the AE analysis at the end of the epoch.

Example (``evaluate.json`` of the ``cbct_quality`` bundle, abridged)::

    "inferer": {"_target_": "monai_gamverify.inferers.SliceAggregateInferer", "spatial_dim": 2},
    "postprocessing": {"_target_": "monai_gamverify.transforms.AttributionEnergyd", "keys": "image",
                       "network": "@network", "target_layer": "stages.2", "columns": "@categories"},
    "handlers": [{"_target_": "monai_gamverify.handlers.AttributionEnergyHandler",
                  "categories": "@categories", "output_dir": "@output_dir"}]
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from monai_gamverify.bundle import load_bundle
from monai_gamverify.data.datalist import load_datalist
from monai_gamverify.energy.attribution import volume_energy_multi
from monai_gamverify.energy.report import energy_report
from monai_gamverify.io import load_image, write_csv
from monai_gamverify.io.names import OutputNamer
from monai_gamverify.visualize.registry import make_cam

__all__ = ["bundle_energy"]

#: names that lived here before they moved to their role packages; imported on first access (PEP 562), so that this
#: module does not import the transforms and handlers that themselves build on the energy package
_MOVED = {
    "SliceAggregateInferer": "monai_gamverify.inferers",
    "AttributionEnergyd": "monai_gamverify.transforms.energy",
    "SliceCAMd": "monai_gamverify.transforms.energy",
    "AttributionEnergyHandler": "monai_gamverify.handlers.energy",
    "regression_metrics": "monai_gamverify.metrics.regression",
}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module 'monai_gamverify.energy.workflow' has no attribute {name!r}")


# ------------------------------------------------------------------------------------------------- bundle + datalist
def bundle_energy(
    bundle_root: str | os.PathLike,
    datalist: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    split: str = "test",
    scores: str | os.PathLike | None = None,
    categories: Sequence[str] | str | None = None,
    overrides: dict | None = None,
    checkpoint: str | os.PathLike | None = None,
    method: str | None = None,
    batch_size: int = 16,
    device: str | torch.device | None = None,
    n_boot: int = 2000,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """AE of a bundle's model on every volume of a datalist split, then :func:`monai_gamverify.energy.energy_report`.

    Each image goes through the bundle's inference preprocessing, one at a time; a 2D bundle on volumes (metadata
    ``gamverify.spatial_dims`` = 2, e.g. ``cbct_quality``) is explained slice by slice along
    ``gamverify.slice_axis``, streamed in slice batches, all categories in one pass. The scores come from
    ``scores`` (a CSV ``id, <category>...``) or, without it, from the datalist entries themselves (the synthetic
    ``quality`` datalist carries each volume's consensus scores).

    Args:
        bundle_root: bundle directory (``configs/inference.json``, ``models/model.pt``).
        datalist: MONAI datalist JSON.
        out_dir: output folder: ``ae.csv``, ``scores.csv`` and everything ``energy_report`` writes.
        split: datalist key.
        scores: consensus-score CSV (default: the scores in the datalist entries).
        categories: output names, in output order (default: metadata ``gamverify.categories``, else the output
            ``channel_def``); a comma-separated string is accepted.
        overrides: config overrides of the bundle (e.g. ``{"network_name": "resnet18"}``).
        checkpoint: weights other than ``models/model.pt``.
        method: ``gradcam`` (default: metadata ``gamverify.cam_method``), ``gradcampp`` or ``scorecam``.
        batch_size: slices per CAM call.
        device: CAM device (default: CUDA when available).
        n_boot, seed: bootstrap settings of the Spearman analysis.
        progress: progress bars.

    Returns:
        what ``energy_report`` returns, plus ``ae`` and ``scores`` (the two CSV paths) and ``n`` (volumes).

    Raises:
        ValueError: unknown method, categories that do not match the outputs, an item whose image cannot be
            preprocessed or explained (named), scores missing from the datalist entries.

    Example:
        >>> bundle_energy("bundles/cbct_quality", "data/quality/datalist.json", "energy_out")["paths"]["table_csv"]
    """
    bm = load_bundle(bundle_root, checkpoint=checkpoint, device=device, overrides=overrides)
    info = bm.metadata.get("gamverify", {}) if isinstance(bm.metadata, dict) else {}
    if isinstance(categories, str):
        categories = [c.strip() for c in categories.split(",") if c.strip()]
    cats = list(categories or info.get("categories") or bm.class_names)
    if not cats:
        raise ValueError("the bundle names no outputs: pass categories")
    if bm.target_layer is None:
        raise ValueError(f"bundle {bundle_root} defines no cam_layer / gamverify.target_layer")
    items = load_datalist(datalist, split, check="exists", spatial_dims=None, require_label=False)
    pre = bm.preprocessing()
    cam = make_cam(bm.network, bm.target_layer, method or info.get("cam_method", "gradcam"))
    dev = next(bm.network.parameters()).device
    columns = {c: i for i, c in enumerate(cats)}
    rows = []
    namer = OutputNamer()
    for e in tqdm(items, desc="AE volumes", disable=not progress):
        vid = str(e["id"]) if "id" in e else namer(e["image"])  # unique: case_0/imaging, case_1/imaging differ
        try:
            x = pre({"image": e["image"]})["image"] if pre is not None else load_image(e["image"])
            ae = volume_energy_multi(
                cam, x, columns, slice_axis=bm.slice_axis(x.ndim - 1), batch_size=batch_size, device=dev, progress=False
            )
        except (MemoryError, torch.cuda.OutOfMemoryError):
            raise  # out of memory says nothing about the item: let the caller see it (e.g. to lower batch_size)
        except Exception as err:  # preprocessing / CAM errors of one item: name the item
            raise ValueError(f"attribution energy of {e['image']}: {err}") from err
        rows.append({"id": vid, **ae})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(pd.DataFrame(rows), out / "ae.csv")
    if scores is None:
        lacking = sorted({c for e in items for c in cats if c not in e})
        if lacking:
            raise ValueError(f"the datalist entries of {split!r} have no score for {lacking}: pass scores=<CSV>")
        table = pd.DataFrame([{"id": r["id"], **{c: float(e[c]) for c in cats}} for r, e in zip(rows, items)])
        write_csv(table, out / "scores.csv")
        scores = out / "scores.csv"
    report = energy_report(out / "ae.csv", scores, out, categories=cats, n_boot=n_boot, seed=seed, progress=progress)
    return {**report, "ae": str(out / "ae.csv"), "scores": str(scores), "n": len(rows)}
