"""Model-suitability verification from attention maps (Methods 1 and 2 of the verification study).

A reference model's normalised maps are averaged over a reference dataset (:class:`ReferenceMap`, streaming).
Every candidate model's map of every sample is compared with that mean map by the similarity features
(:func:`feature_table`), and a Random Forest (:class:`SuitabilityVerifier`) learns to tell "model trained on
similar data" (label 1) from "model trained on other data" (label 0), cross-validated **leave-models-out** whenever
each label has >= 2 models (:mod:`monai_gamverify.verification.protocol`; subject-grouped folds only as a secondary
line), with one verdict per model from a bootstrap interval (:mod:`monai_gamverify.verification.models`).
:func:`run_verification` does all of it and writes a report directory; the one-class mode (no unsuitable models) is
:mod:`monai_gamverify.verification.oneclass`.

A segmentation bundle takes part through a :class:`SegmentationTarget` (bundle + label) in place of its network: its
map is the Seg-Grad-CAM of that label through the bundle's own inferer, and everything downstream (similarity
features, verifier, verdicts, screen) is unchanged.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from monai_gamverify.io import write_csv, write_json
from monai_gamverify.verification.models import format_verdicts, model_level_auc, model_verdicts, verdicts_to_dict
from monai_gamverify.verification.reference import MapFn, reference_map
from monai_gamverify.verification.tables import META_COLUMNS, feature_table, summary_table
from monai_gamverify.verification.verifier import SCORES, SuitabilityVerifier, roc_png
from monai_gamverify.visualize.featuremaps import FeatureMap
from monai_gamverify.visualize.registry import CAM_METHODS, cam_method, make_cam
from monai_gamverify.visualize.segcam import bundle_segmentation_cam, default_segmentation_label, label_index

__all__ = [
    "METHODS",
    "SegmentationTarget",
    "default_segmentation_label",
    "verification_method",
    "map_fn",
    "target_info",
    "run_verification",
]

logger = logging.getLogger(__name__)


class _CAMOnDevice:
    """A CAM callable that first moves the batch to the model's device (the model itself is never moved)."""

    def __init__(self, cam: Any, model: torch.nn.Module, class_idx: Any = None) -> None:
        self.cam, self.model, self.class_idx = cam, model, class_idx

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        param = next(self.model.parameters(), None)
        if param is not None:
            x = x.to(param.device)
        return self.cam(x, class_idx=self.class_idx, normalize=True)


class SegmentationTarget:
    """A segmentation bundle and the label whose Seg-Grad-CAM is verified; used in place of a network in the
    ``(model, layer, ...)`` tuples of :func:`run_verification` and ``run_one_class``.

    Args:
        bundle: a :class:`monai_gamverify.bundle.BundleModel` (``network``, ``class_names``, ``parser``).
        label: output channel by name (``channel_def``) or index; ``None``: :func:`default_segmentation_label`.

    Attributes:
        index: the resolved output channel.
        name: its ``channel_def`` name (the index as text when the bundle names none).
        default: whether the label was chosen by default.

    Example:
        >>> target = SegmentationTarget(load_bundle("spleen_ct_segmentation"), "spleen")
        >>> run_verification((target, target.bundle.target_layer), candidates, loader, "report/")
    """

    def __init__(self, bundle: Any, label: int | str | None = None) -> None:
        self.bundle = bundle
        names = list(getattr(bundle, "class_names", None) or [])
        self.default = label is None
        self.index = default_segmentation_label(bundle) if label is None else label_index(label, names)
        self.name = names[self.index] if self.index < len(names) else str(self.index)

    @property
    def network(self) -> torch.nn.Module:
        """The bundle's network."""
        return self.bundle.network

    def info(self) -> dict[str, Any]:
        """What a report records about the target."""
        return {"task": "segmentation", "seg_label": self.name, "seg_label_index": self.index}

    def __repr__(self) -> str:
        return f"SegmentationTarget({getattr(self.bundle, 'root', '?')}, label={self.name!r} [{self.index}])"


class _SegCAMOnDevice:
    """Seg-Grad-CAM of one label through the bundle's inferer, the batch first moved to the network's device."""

    def __init__(self, target: SegmentationTarget, layer: str, method: str) -> None:
        make_cam(target.network, layer, method)  # a bad layer or method fails here, not at the first batch
        self.target, self.layer, self.method = target, layer, method

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        param = next(self.target.network.parameters(), None)
        if param is not None:
            x = x.to(param.device)
        maps, _ = bundle_segmentation_cam(
            self.target.bundle, x, self.target.index, layer=self.layer, method=self.method, normalize=True
        )
        return maps


def target_info(model: Any) -> dict[str, Any]:
    """Report fields of a model spec: the label of a :class:`SegmentationTarget`, nothing for a network."""
    return model.info() if isinstance(model, SegmentationTarget) else {}


#: Method 1 (every CAM method of the registry) and Method 2 (``featuremap``)
METHODS = (*CAM_METHODS, "featuremap")


def verification_method(method: str) -> str:
    """Canonical name of a verification method: ``featuremap``, or a CAM method as the registry spells it
    (``gradcam++`` -> ``gradcampp``); a clear error for anything else.

    Example:
        >>> verification_method("Grad-CAM++")
        'gradcampp'
    """
    if str(method).lower() == "featuremap":
        return "featuremap"
    try:
        return cam_method(method)
    except ValueError:
        raise ValueError(f"method must be one of {METHODS} (gradcam++ = gradcampp), got {method!r}") from None


def map_fn(model: torch.nn.Module | SegmentationTarget, layer: str, method: str, class_idx: Any) -> MapFn:
    """The map function of ``method`` (one of :data:`METHODS`) at ``layer`` of ``model``.

    A :class:`SegmentationTarget` gives the Seg-Grad-CAM of its label (``class_idx`` is not used: the target carries
    the label) or, for ``featuremap``, the feature maps of its network.

    Example:
        >>> fn = map_fn(SegmentationTarget(bm, "spleen"), bm.target_layer, "gradcam", None)
        >>> maps = fn(x)  # (B, 1, *spatial), normalised to [0, 1]
    """
    if isinstance(model, SegmentationTarget):
        if method == "featuremap":
            return FeatureMap(model.network, layer)
        return _SegCAMOnDevice(model, layer, verification_method(method))
    if method == "featuremap":
        return FeatureMap(model, layer)
    return _CAMOnDevice(make_cam(model, layer, method), model, class_idx)


def run_verification(
    reference: tuple[torch.nn.Module, str],
    candidates: Mapping[str, tuple[torch.nn.Module, str, int]],
    data: Iterable[Mapping[str, Any]],
    out_dir: str | os.PathLike,
    *,
    method: str = "gradcam",
    reference_data: Iterable[Mapping[str, Any]] | None = None,
    class_idx: int | None = None,
    slice_axis: int | None = None,
    metrics: Sequence[str] | None = None,
    n_splits: int = 5,
    groups: str | None = "auto",
    average: str = "binary",
    n_estimators: int = 200,
    seed: int = 0,
    threshold: float = 0.5,
    confidence: float = 0.95,
    map_transform: Callable[[MapFn], MapFn] | None = None,
    image_key: str = "image",
    id_key: str = "id",
    subject_key: str = "subject",
    progress: bool = True,
) -> dict[str, Any]:
    """Verify candidate models against a reference model and write a report directory.

    Steps: reference mean map over ``reference_data`` (default ``data``) → feature table of every candidate on
    ``data`` → grouped, stratified cross-validation of a :class:`SuitabilityVerifier` (leave-models-out whenever
    each label has >= 2 models) → model-level verdicts from each model's out-of-fold P(suitable) (mean with a
    bootstrap interval, :func:`~monai_gamverify.verification.models.model_verdicts`) → verifier refitted on all
    rows. Written to ``out_dir``: ``features.csv``, ``predictions.csv`` (out-of-fold P(suitable) per row),
    ``verdicts.csv`` (per model: mean, interval, verdict), ``cv.json`` (protocol, per-fold and mean scores,
    model-level AUC, importances, per-model verdicts), ``summary.csv`` (per-label feature statistics), ``roc.png``,
    ``reference_map.nii.gz/.png/.json``, ``verifier.skops`` and TensorBoard scalars in ``tensorboard/``.

    Args:
        reference: ``(model, layer)`` of the reference model (a :class:`SegmentationTarget` for a segmentation
            bundle, here and in ``candidates``).
        candidates: ``{name: (model, layer, label)}``, label 1 = trained on similar data (suitable), 0 = not.
        data: re-iterable batches (``DataLoader`` or list of batch dicts) with ``image_key`` (B, C, *spatial) and
            optional ``id_key`` / ``subject_key``.
        out_dir: report directory (created).
        method: ``"gradcam"``, ``"gradcampp"``, ``"scorecam"`` (Method 1) or ``"featuremap"`` (Method 2).
        reference_data: data for the reference mean map (default: ``data``).
        class_idx: class explained by the CAMs (``None``: each sample's predicted class).
        slice_axis: compute features per 2D slice along this spatial axis.
        metrics: feature names (default: the study's seven).
        n_splits: cross-validation folds.
        groups: column grouping the folds: ``"auto"`` (leave-models-out when each label has >= 2 models, else
            subject-grouped), ``"model"``, ``"subject_id"`` or ``None``. When the protocol is leave-models-out, the
            subject-grouped figures are added as a secondary line (``cross_validation_secondary`` in ``cv.json``).
        average: precision/recall/F1 averaging (``"binary"`` or ``"weighted"`` as in the study).
        n_estimators: trees of the forest.
        seed: seed of the forest, the folds and the bootstrap.
        threshold: P(suitable) threshold of the model-level verdicts.
        confidence: coverage of the bootstrap interval of each model's mean out-of-fold P(suitable).
        map_transform: optional wrapper of every map function, e.g.
            ``lambda fn: CommonGrid(fn, 4)`` (:mod:`monai_gamverify.verification.grid`).
        image_key: image key in the batches.
        id_key: sample-id key in the batches.
        subject_key: subject-id key in the batches.
        progress: show progress bars.

    Returns:
        Dict with ``"out_dir"``, ``"files"`` (name -> path), ``"protocol"``, ``"cv_mean"`` (mean scores of that
        protocol), ``"cv_secondary"`` (``{"protocol", "mean"}`` of the subject-grouped folds, or ``None``) and
        ``"per_model"`` (model -> label, mean out-of-fold P(suitable), ``ci_low``, ``ci_high``, ``verdict``).

    Example:
        >>> report = run_verification((ref_net, "layer4"), {"r18": (r18, "layer4", 1), "chin": (c, "layer4", 0)},
        ...                           loader, "report/")
    """
    from torch.utils.tensorboard import SummaryWriter

    method = verification_method(method)
    if reference_data is None and iter(data) is data:
        raise TypeError(
            "data is read twice (reference map, then features): pass a DataLoader or a list, not an iterator"
        )
    if not isinstance(reference, (tuple, list)) or len(reference) != 2:
        raise TypeError(f"reference must be (model, layer), got {reference!r}")
    for name, spec in candidates.items():
        if not isinstance(spec, (tuple, list)) or len(spec) != 3:
            raise TypeError(f"candidate {name!r} must be (model, layer, label), got {spec!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    wrap = map_transform or (lambda fn: fn)
    ref_fn = wrap(map_fn(reference[0], reference[1], method, class_idx))
    ref = reference_map(
        ref_fn, data if reference_data is None else reference_data, image_key=image_key, progress=progress
    )
    files: dict[str, Any] = {f"reference_{k}": v for k, v in ref.save(out).items()}
    fns = {name: (wrap(map_fn(m, layer, method, class_idx)), label) for name, (m, layer, label) in candidates.items()}
    table = feature_table(
        ref,
        fns,
        data,
        image_key=image_key,
        id_key=id_key,
        subject_key=subject_key,
        slice_axis=slice_axis,
        metrics=metrics,
        progress=progress,
    )
    files["features"] = write_csv(table, out / "features.csv")

    verifier = SuitabilityVerifier(n_estimators=n_estimators, random_state=seed)
    cv = verifier.cross_validate(table, n_splits=n_splits, groups=groups, seed=seed, average=average, progress=progress)
    protocol = cv.params["protocol"]
    secondary = None
    if cv.params["groups"] == "model" and "subject_id" in table.columns:
        sub_cv = verifier.cross_validate(
            table, n_splits=n_splits, groups="subject_id", seed=seed, average=average, progress=progress
        )
        secondary = {"protocol": sub_cv.params["protocol"], **sub_cv.to_dict()}
    verifier.fit(table)
    files["verifier"] = verifier.save(out / "verifier.skops")

    preds = table[list(META_COLUMNS)].assign(fold=cv.fold, p_suitable=cv.oof_proba)
    files["predictions"] = write_csv(preds, out / "predictions.csv")
    verdicts = model_verdicts(preds, threshold=threshold, confidence=confidence, seed=seed)
    files["verdicts"] = write_csv(verdicts.assign(protocol=protocol), out / "verdicts.csv")
    per_model = verdicts_to_dict(verdicts)
    logger.info("%s", format_verdicts(verdicts, protocol, confidence, threshold))
    summary = summary_table(table)
    files["summary"] = write_csv(summary, out / "summary.csv")
    files["roc"] = roc_png(
        cv.y_true, cv.oof_proba, out / "roc.png", fold=cv.fold, title=f"verifier ROC ({method}; {protocol})"
    )
    importances = dict(zip(verifier.feature_names_in_.tolist(), verifier.feature_importances_.tolist()))
    report = {
        "method": method,
        "protocol": protocol,
        "reference_layer": reference[1],
        **({"reference_target": target_info(reference[0])} if target_info(reference[0]) else {}),
        "n_rows": len(table),
        "n_samples": int(table["sample_id"].nunique()),
        "models": {n: {"layer": spec[1], "label": spec[2], **target_info(spec[0])} for n, spec in candidates.items()},
        "cross_validation": cv.to_dict(),
        "cross_validation_secondary": secondary,
        "model_level": {
            "protocol": protocol,
            "roc_auc": model_level_auc(verdicts),
            "threshold": threshold,
            "confidence": confidence,
            "interval": "BCa bootstrap of the mean out-of-fold P(suitable), 2000 resamples",
        },
        "feature_importances": importances,
        "per_model": per_model,
    }
    files["cv"] = write_json(report, out / "cv.json")

    writer = SummaryWriter(log_dir=str(out / "tensorboard"))
    try:
        writer.add_text("protocol", f"cross-validation and model-level verdicts: {protocol}", 0)
        for row in cv.folds.to_dict(orient="records"):
            for s in SCORES:
                writer.add_scalar(f"cv_fold/{s}", row[s], int(row["fold"]))
        for s, v in cv.mean.items():
            writer.add_scalar(f"cv_mean/{s}", v, 0)
        for f, v in importances.items():
            writer.add_scalar(f"importance/{f}", v, 0)
        for name, info in per_model.items():
            writer.add_scalar(f"mean_p_suitable/{name}", info["mean_p_suitable"], 0)
    finally:
        writer.close()
    files["tensorboard"] = out / "tensorboard"
    return {
        "out_dir": out,
        "files": files,
        "protocol": protocol,
        "cv_mean": cv.mean,
        "cv_secondary": None if secondary is None else {"protocol": secondary["protocol"], "mean": secondary["mean"]},
        "model_level_roc_auc": report["model_level"]["roc_auc"],
        "per_model": per_model,
    }
