"""Model-level evidence for the label-free suitability verdict: what a candidate does on a few unlabeled target
images, compared with a trusted reference.

Each function computes one number from per-model observations of the *same* images (:class:`ModelObservation`):
prediction agreement (Cohen's kappa), attention agreement (Method 1: Pearson correlation of the two models' mean
Grad-CAM maps over the images, on one common coarse grid), early-feature agreement (Method 2, the same on the
channel-summed early feature maps), a label-free accuracy estimate from the candidate's own validation confidences
(ATC, Garg et al. 2022) and the task compatibility of two bundles' metadata. The statistics that turn these numbers
into p-values and a verdict are in :mod:`monai_gamverify.verification.suitability`.

Example:
    >>> obs = {n: observe_model(net, x, cam_layer=layer, feature_layer=f) for n, (net, layer, f) in models.items()}
    >>> kappa = prediction_agreement(obs["candidate"], obs["reference"])
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from monai_gamverify.utils import plain_tensor
from monai_gamverify.visualize.cam import GradCAM
from monai_gamverify.visualize.featuremaps import feature_map

__all__ = [
    "ModelObservation",
    "observe_model",
    "common_grid",
    "cohen_kappa",
    "aligned_probabilities",
    "prediction_agreement",
    "map_agreement",
    "mean_map_agreement",
    "map_reliability",
    "disattenuated_agreement",
    "atc_threshold",
    "atc_accuracy",
    "task_mismatches",
    "EVIDENCE",
]

#: the evidence names, in the order they are reported (higher value = more like the reference)
EVIDENCE = ("agreement", "attention", "features", "atc")
#: edge of the common grid every map is area-averaged to before comparison (removes the resolution signature of
#: each architecture's CAM layer; 8 = the coarsest CAM layer of the zoo at 32^3)
GRID = 8


@dataclass
class ModelObservation:
    """What one model did on the target images (all models of a verdict observe the same images in the same order).

    Attributes:
        probs: (n, K) class probabilities (softmax of the logits).
        cam: (n, 1, *grid) Grad-CAM maps of each image's predicted class on the common grid, each in [0, 1].
        features: (n, 1, *grid) early feature maps on the common grid in [0, 1], or None.
        val_conf: the model's own validation confidences ``{"max_prob": [...], "correct": [...]}`` or None.
        info: task metadata (``num_classes``, ``class_names``, ``modality``, ``spatial_shape``, ``pixdim``,
            ``intensity_window``) used by :func:`task_mismatches`.
    """

    probs: np.ndarray
    cam: torch.Tensor
    features: torch.Tensor | None = None
    val_conf: Mapping[str, Sequence[float]] | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def predictions(self) -> np.ndarray:
        return self.probs.argmax(1)


def common_grid(maps: torch.Tensor, grid: int = GRID) -> torch.Tensor:
    """Area-average (B, 1, *spatial) maps to ``grid`` per axis and rescale each to [0, 1] (a constant map -> 0).

    Example:
        >>> common_grid(torch.rand(2, 1, 32, 32, 32)).shape
        torch.Size([2, 1, 8, 8, 8])
    """
    if maps.ndim not in (4, 5):
        raise ValueError(f"maps must be (B, 1, H, W) or (B, 1, D, H, W), got shape {tuple(maps.shape)}")
    maps = plain_tensor(maps).float()
    pool = F.adaptive_avg_pool2d if maps.ndim == 4 else F.adaptive_avg_pool3d
    pooled = pool(maps, (grid,) * (maps.ndim - 2))
    flat = pooled.flatten(1)
    lo, hi = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    out = torch.where(hi > lo, (flat - lo) / (hi - lo).clamp_min(1e-12), torch.zeros_like(flat))
    return out.view_as(pooled)


def observe_model(
    model: nn.Module,
    x: torch.Tensor,
    cam_layer: str,
    feature_layer: str | None = None,
    grid: int = GRID,
    batch_size: int = 8,
    val_conf: Mapping[str, Sequence[float]] | None = None,
    info: Mapping[str, Any] | None = None,
    align: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
) -> ModelObservation:
    """Observe a classifier on preprocessed target images: probabilities, Grad-CAM of the predicted class and the
    early feature map, both on the common grid. One forward + backward per batch for the CAM (the logits come from
    the same pass) and one truncated forward for the features; the model is left exactly as it was.

    Args:
        model: the network (on any device; inputs are moved to it).
        x: (n, C, *spatial) images as the model takes them (the bundle's preprocessing applied).
        cam_layer: Grad-CAM target layer (``named_modules`` name).
        feature_layer: early layer for Method 2, or None.
        grid: common grid edge (:func:`common_grid`).
        batch_size: images per pass.
        val_conf: the model's validation confidences, kept for :func:`atc_accuracy`.
        info: task metadata kept for :func:`task_mismatches`.
        align: ``(maps, start) -> maps`` applied to each batch's maps (on the input's grid; ``start`` = index of the
            batch's first image) before the common grid, e.g. a resampling onto the reference model's grid when two
            bundles preprocess differently.

    Returns:
        :class:`ModelObservation`.
    """
    if x.ndim not in (4, 5) or len(x) == 0:
        raise ValueError(f"x must be a non-empty (n, C, *spatial) batch of 2D/3D images, got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError("the target images contain NaN or inf values")
    device = next(model.parameters()).device
    cam = GradCAM(model, cam_layer)
    probs, maps, feats = [], [], []
    for i in range(0, len(x), batch_size):
        xb = x[i : i + batch_size].to(device)
        res = cam.explain(xb, class_idx=None, normalize=True)
        probs.append(res.logits.float().softmax(1).cpu())
        cam_maps = res.maps.cpu()
        feat_maps = feature_map(model, xb, feature_layer).cpu() if feature_layer is not None else None
        if align is not None:
            cam_maps = align(cam_maps, i)
            feat_maps = None if feat_maps is None else align(feat_maps, i)
        maps.append(common_grid(cam_maps, grid))
        if feat_maps is not None:
            feats.append(common_grid(feat_maps, grid))
    return ModelObservation(
        probs=torch.cat(probs).numpy().astype(np.float64),
        cam=torch.cat(maps),
        features=torch.cat(feats) if feats else None,
        val_conf=val_conf,
        info=dict(info or {}),
    )


def cohen_kappa(a: Sequence[int] | np.ndarray, b: Sequence[int] | np.ndarray) -> float:
    """Cohen's kappa of two label sequences (equal to ``sklearn.metrics.cohen_kappa_score``); 0 when the expected
    agreement is 1 (both constant and equal: kappa is undefined, and such predictions carry no evidence).

    Example:
        >>> cohen_kappa([0, 1, 2, 2], [0, 1, 2, 1])
        0.6363636363636364
    """
    a, b = np.asarray(a).ravel(), np.asarray(b).ravel()
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"kappa needs two non-empty label sequences of equal length, got {a.shape} and {b.shape}")
    labels, inv = np.unique(np.concatenate([a, b]), return_inverse=True)
    ia, ib = inv[: a.size], inv[a.size :]
    k = len(labels)
    confusion = np.bincount(ia * k + ib, minlength=k * k).reshape(k, k) / a.size
    observed = np.trace(confusion)
    expected = float(confusion.sum(1) @ confusion.sum(0))
    if expected >= 1.0:
        return 0.0
    return float((observed - expected) / (1.0 - expected))


def aligned_probabilities(candidate: ModelObservation, reference: ModelObservation) -> np.ndarray | None:
    """The candidate's probabilities over the reference's classes: its own when the label spaces match, the first K
    columns of a K+1 (garbage-class) model, ``None`` when the label spaces differ otherwise."""
    kc, kr = candidate.probs.shape[1], reference.probs.shape[1]
    if kc == kr:
        return candidate.probs
    if kc == kr + 1:
        return candidate.probs[:, :kr]
    return None


def prediction_agreement(candidate: ModelObservation, reference: ModelObservation) -> float:
    """Cohen's kappa of the candidate's and the reference's predicted classes on the same images (a K+1 candidate
    over its first K classes).

    Raises:
        ValueError: other images or label spaces that cannot be aligned (:func:`aligned_probabilities`).
    """
    probs = aligned_probabilities(candidate, reference)
    if probs is None or len(probs) != len(reference.probs):
        raise ValueError(
            "prediction agreement needs the same images and label spaces: "
            f"{candidate.probs.shape} vs {reference.probs.shape}"
        )
    return cohen_kappa(probs.argmax(1), reference.predictions)


def _pearson_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.flatten(1).double(), b.flatten(1).double()
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    den = (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-12)
    return torch.where(den > 1e-12, (a * b).sum(1) / den, torch.zeros(len(a), dtype=a.dtype))


def map_agreement(candidate: torch.Tensor, reference: torch.Tensor) -> np.ndarray:
    """Per-image Pearson correlation of two sets of maps of the same images on the same grid (a constant map
    gives 0, never NaN); equal to ``scipy.stats.pearsonr`` per image.

    Args:
        candidate: (n, 1, *grid).
        reference: (n, 1, *grid).

    Returns:
        (n,) float64 correlations.
    """
    if candidate.shape != reference.shape:
        raise ValueError(
            f"maps of the candidate {tuple(candidate.shape)} and of the reference {tuple(reference.shape)} differ: "
            "bring both to the common grid first (common_grid)"
        )
    return _pearson_rows(candidate, reference).numpy()


def mean_map_agreement(candidate: torch.Tensor, reference: torch.Tensor) -> float:
    """Pearson correlation of the two models' *mean* maps over the same images (the study's reference map, taken
    for both models): stable where single Grad-CAM maps are not (a map whose weighted activations are all negative
    is zero after the ReLU and carries no information for that image).

    Args:
        candidate: (n, 1, *grid).
        reference: (n, 1, *grid).
    """
    return float(map_agreement(candidate.mean(0, keepdim=True), reference.mean(0, keepdim=True))[0])


def map_reliability(maps: torch.Tensor) -> float:
    """Split-half reliability of a model's mean map over a set of images: the Pearson r of the mean maps of the
    even- and odd-indexed images, Spearman-Brown corrected to the full set (``2 r / (1 + r)``); 1 for one image.

    A model whose single maps are noisy has a mean map that correlates less with *any* other model's; dividing an
    agreement by ``sqrt(rel_a * rel_b)`` (Spearman's correction for attenuation) compares what the two models attend
    to rather than how noisy each is.
    """
    if len(maps) < 2:
        return 1.0
    r = float(map_agreement(maps[0::2].mean(0, keepdim=True), maps[1::2].mean(0, keepdim=True))[0])
    return float(np.clip(2 * r / (1 + r), 0.0, 1.0)) if r > -1 else 0.0


def disattenuated_agreement(candidate: torch.Tensor, reference: torch.Tensor, floor: float = 0.25) -> float:
    """:func:`mean_map_agreement` corrected for the attenuation by each model's map noise
    (:func:`map_reliability`, floored at ``floor`` so that few images cannot blow it up), clipped to [-1, 1]."""
    r = mean_map_agreement(candidate, reference)
    rel = max(map_reliability(candidate), floor) * max(map_reliability(reference), floor)
    return float(np.clip(r / np.sqrt(rel), -1.0, 1.0))


def atc_threshold(val_conf: Mapping[str, Sequence[float]]) -> float:
    """The ATC threshold (Garg et al. 2022, max-confidence score): the confidence ``t`` such that the fraction of
    validation images with confidence above ``t`` equals the validation accuracy.

    Args:
        val_conf: ``{"max_prob": [...], "correct": [0/1, ...]}`` of the model's own validation images.
    """
    conf = np.asarray(val_conf.get("max_prob", ()), float)
    correct = np.asarray(val_conf.get("correct", ()), float)
    if conf.size == 0 or conf.shape != correct.shape:
        raise ValueError("validation confidences need equal-length 'max_prob' and 'correct' lists")
    n_wrong = int(round((1.0 - correct.mean()) * conf.size))
    return float(np.sort(conf)[n_wrong - 1]) if n_wrong > 0 else float(conf.min()) - 1e-9


def atc_accuracy(observation: ModelObservation) -> float:
    """Label-free accuracy estimate on the target images: the fraction whose maximum probability exceeds the
    model's ATC threshold (NaN when the model ships no validation confidences)."""
    if not observation.val_conf:
        return float("nan")
    t = atc_threshold(observation.val_conf)
    return float((observation.probs.max(1) > t).mean())


def _norm_names(names: Any) -> list[str] | None:
    if not names:
        return None
    if isinstance(names, Mapping):
        return [str(names[k]) for k in sorted(names, key=lambda s: int(s))]
    return [str(n) for n in names]


def task_mismatches(candidate: Mapping[str, Any], reference: Mapping[str, Any], rtol: float = 0.05) -> list[str]:
    """Reasons, in words, why a candidate's declared task differs from the reference's (empty: compatible).

    Compares what both declare (a field missing on either side is not a mismatch, but is reported by the caller as
    unknown): number of classes (a K+1 model whose first K class names are the reference's is compatible), class
    names, modality, input channels and intensity window (relative tolerance ``rtol``). Input shape and voxel size
    are not compared: they are how a bundle preprocesses, and its maps are brought onto the reference's grid.

    Args:
        candidate: task info (keys ``num_classes``, ``class_names``, ``modality``, ``num_channels``,
            ``spatial_shape``, ``pixdim``, ``intensity_window``), e.g. from :func:`~monai_gamverify.verification.
            passport.task_info`.
        reference: the same for the trusted reference.

    Example:
        >>> task_mismatches({"num_classes": 2}, {"num_classes": 5})
        ['it predicts 2 classes, the reference 5']
    """
    reasons = []
    kc, kr = candidate.get("num_classes"), reference.get("num_classes")
    nc, nr = _norm_names(candidate.get("class_names")), _norm_names(reference.get("class_names"))
    garbage = kc is not None and kr is not None and int(kc) == int(kr) + 1 and nc and nr and nc[: len(nr)] == nr
    if kc is not None and kr is not None and int(kc) != int(kr) and not garbage:
        reasons.append(f"it predicts {int(kc)} classes, the reference {int(kr)}")
    elif nc and nr and nc[: len(nr)] != nr:
        reasons.append(f"its classes {nc} are not the reference's {nr}")
    for key, what in (("modality", "modality"), ("num_channels", "input channels")):
        vc, vr = candidate.get(key), reference.get(key)
        if vc is not None and vr is not None and str(vc).lower() != str(vr).lower():
            reasons.append(f"its {what} is {vc}, the reference's {vr}")
    # input shape and voxel size are how a bundle preprocesses, not its task: its maps are resampled onto the
    # reference's grid instead (apps.suitability); the intensity window says which images it reads
    for key, what in (("intensity_window", "window"),):
        vc, vr = candidate.get(key), reference.get(key)
        if vc is None or vr is None:
            continue
        a, b = np.asarray(vc, float).ravel(), np.asarray(vr, float).ravel()
        if a.shape != b.shape or not np.allclose(a, b, rtol=rtol, atol=1e-6):
            reasons.append(f"its {what} is {list(np.round(a, 3))}, the reference's {list(np.round(b, 3))}")
    return reasons
