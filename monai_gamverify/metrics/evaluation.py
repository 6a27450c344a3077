"""How good is an explanation: localisation, faithfulness, sanity checks, layer comparison (2D and 3D, batched).

Maps are (B, 1, *spatial) tensors (high = attended), masks the same shape (non-zero = object). Calibration lives in
:mod:`monai_gamverify.metrics.calibration`, text descriptions of maps in :mod:`monai_gamverify.visualize.text`; both
are imported from there.
"""

# long module: localisation, faithfulness and sanity share the map checks and curves; to split
from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
from monai.networks.layers import separable_filtering
from monai.networks.layers.convutils import gaussian_1d
from scipy.ndimage import distance_transform_edt
from scipy.stats import spearmanr

from monai_gamverify.io.nifti import affine_of
from monai_gamverify.metrics.similarity import similarity_metrics
from monai_gamverify.utils import plain_tensor
from monai_gamverify.visualize.hooks import preserved_state

__all__ = [
    "binarize",
    "otsu_threshold",
    "map_iou",
    "map_dice",
    "pointing_game",
    "relevance_mass",
    "sparseness",
    "localisation_scores",
    "Curve",
    "auc",
    "gaussian_blur",
    "deletion_curve",
    "insertion_curve",
    "cascading_randomization",
    "score_layers",
]

Threshold = str | float


# ----------------------------------------------------------------------------------------------------------- inputs
def _as_maps(maps: Any, label: str = "maps") -> torch.Tensor:
    """(B, 1, *spatial) float tensor with 2 or 3 spatial axes and finite values."""
    if isinstance(maps, np.ndarray):
        maps = torch.from_numpy(maps)
    if not isinstance(maps, torch.Tensor):
        raise TypeError(f"{label} must be a torch.Tensor or numpy array, got {type(maps).__name__}")
    if maps.ndim not in (4, 5) or maps.shape[1] != 1:
        raise ValueError(f"{label} must have shape (B, 1, *spatial) with 2 or 3 spatial axes, got {tuple(maps.shape)}")
    if maps.numel() == 0:
        raise ValueError(f"{label} is empty: {tuple(maps.shape)}")
    maps = plain_tensor(maps)  # drop MetaTensor bookkeeping
    maps = maps.float() if not maps.is_floating_point() else maps
    if not torch.isfinite(maps).all():
        raise ValueError(f"{label} contains NaN or infinite values")
    return maps


def _as_masks(masks: Any, maps: torch.Tensor) -> torch.Tensor:
    """Boolean masks of the maps' shape on the maps' device."""
    if isinstance(masks, np.ndarray):
        masks = torch.from_numpy(masks)
    if not isinstance(masks, torch.Tensor):
        raise TypeError(f"masks must be a torch.Tensor or numpy array, got {type(masks).__name__}")
    masks = plain_tensor(masks)
    if tuple(masks.shape) != tuple(maps.shape):
        raise ValueError(f"masks shape {tuple(masks.shape)} differs from maps shape {tuple(maps.shape)}")
    return (masks != 0).to(maps.device)


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1)


# ----------------------------------------------------------------------------------------------------- localisation
def _numpy_linspace(lo: torch.Tensor, hi: torch.Tensor, n: int) -> torch.Tensor:
    """``np.linspace(lo, hi, n + 1)`` bit for bit (torch.linspace rounds differently), float64."""
    edges = torch.arange(n + 1, dtype=torch.float64, device=lo.device) * ((hi - lo) / n) + lo
    edges[-1] = hi
    return edges


def otsu_threshold(maps: Any, nbins: int = 256) -> torch.Tensor:
    """Otsu's threshold of each map, the same value as ``skimage.filters.threshold_otsu(map, nbins)`` (float maps).

    Args:
        maps: (B, 1, *spatial) maps.
        nbins: histogram bins between each map's minimum and maximum.

    Returns:
        (B,) float64 thresholds on the maps' device; a constant map returns its value (so ``map > t`` is empty).

    Example:
        >>> t = otsu_threshold(maps)  # foreground: maps > t[:, None, None, None]
    """
    maps = _as_maps(maps)
    if nbins < 2:
        raise ValueError(f"nbins must be >= 2, got {nbins}")
    out = torch.empty(maps.shape[0], dtype=torch.float64, device=maps.device)
    for b, flat in enumerate(_flat(maps).to(torch.float64)):
        lo, hi = flat.min(), flat.max()
        if lo == hi:
            out[b] = lo
            continue
        edges = _numpy_linspace(lo, hi, nbins)
        # np.histogram with explicit edges: bin i holds edges[i] <= v < edges[i+1]; the last bin is closed
        idx = (torch.bucketize(flat, edges, right=True) - 1).clamp_(0, nbins - 1)
        counts = torch.bincount(idx, minlength=nbins).to(torch.float64)
        centers = (edges[:-1] + edges[1:]) / 2
        weight1 = torch.cumsum(counts, 0)
        weight2 = torch.flip(torch.cumsum(torch.flip(counts, [0]), 0), [0])
        mean1 = torch.cumsum(counts * centers, 0) / weight1
        mean2 = torch.flip(torch.cumsum(torch.flip(counts * centers, [0]), 0) / torch.flip(weight2, [0]), [0])
        # the first and last bins hold the minimum and maximum, so no weight is zero
        variance12 = weight1[:-1] * weight2[1:] * (mean1[:-1] - mean2[1:]) ** 2
        out[b] = centers[int(torch.argmax(variance12))]
    return out


def _median(maps: torch.Tensor) -> torch.Tensor:
    """Per-map median as ``np.median`` (mean of the two middle values for an even count), (B,)."""
    values = torch.sort(_flat(maps), dim=1).values
    n = values.shape[1]
    return (values[:, (n - 1) // 2] + values[:, n // 2]) / 2


def binarize(maps: Any, threshold: Threshold = "median") -> torch.Tensor:
    """Binary region of each map: ``map > t`` with t the map's median, its Otsu threshold, or a fixed number.

    Args:
        maps: (B, 1, *spatial) maps.
        threshold: ``"median"`` (as in the verification study), ``"otsu"`` or a float.

    Returns:
        (B, 1, *spatial) bool tensor.
    """
    maps = _as_maps(maps)
    view = (-1,) + (1,) * (maps.ndim - 1)
    if isinstance(threshold, str):
        if threshold == "median":
            t = _median(maps)
        elif threshold == "otsu":
            t = otsu_threshold(maps)
        else:
            raise ValueError(f"threshold must be 'median', 'otsu' or a number, got {threshold!r}")
        return maps.to(t.dtype) > t.reshape(view)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise TypeError(f"threshold must be 'median', 'otsu' or a number, got {type(threshold).__name__}")
    return maps > float(threshold)


def _overlap(maps: Any, masks: Any, threshold: Threshold, dice: bool) -> torch.Tensor:
    maps = _as_maps(maps)
    gt = _flat(_as_masks(masks, maps))
    pred = _flat(binarize(maps, threshold))
    inter = (pred & gt).sum(1).double()
    if dice:
        den = pred.sum(1).double() + gt.sum(1).double()
        num = 2 * inter
    else:
        den = (pred | gt).sum(1).double()
        num = inter
    # two empty regions agree perfectly (as in similarity_metrics)
    return torch.where(den > 0, num / den.clamp_min(1), torch.ones_like(den)).float()


def map_iou(maps: Any, masks: Any, threshold: Threshold = "median") -> torch.Tensor:
    """Intersection over union of each binarised map with its mask.

    Args:
        maps: (B, 1, *spatial) maps.
        masks: (B, 1, *spatial) ground-truth masks (non-zero = object).
        threshold: ``"median"``, ``"otsu"`` or a number (see :func:`binarize`).

    Returns:
        (B,) float32; both regions empty gives 1.

    Example:
        >>> map_iou(cam(x), seg, threshold="otsu")
    """
    return _overlap(maps, masks, threshold, dice=False)


def map_dice(maps: Any, masks: Any, threshold: Threshold = "median") -> torch.Tensor:
    """Dice coefficient of each binarised map with its mask; arguments and result as :func:`map_iou`."""
    return _overlap(maps, masks, threshold, dice=True)


def _spacing_of(maps: Any, spacing: Sequence[float] | float | None, n_spatial: int) -> np.ndarray:
    """Voxel size in mm: given, else from a MetaTensor's affine (column norms), else 1 mm."""
    if spacing is None:
        affine = getattr(maps, "affine", None)
        if affine is None:
            return np.ones(n_spatial)
        return np.linalg.norm(affine_of(affine)[:3, :n_spatial], axis=0)
    sp = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (n_spatial,)).copy()
    if not np.all(sp > 0):
        raise ValueError(f"spacing must be positive, got {spacing}")
    return sp


def pointing_game(
    maps: Any, masks: Any, tolerance_mm: float = 0.0, spacing: Sequence[float] | float | None = None
) -> torch.Tensor:
    """Pointing game: does the map's maximum fall inside the mask (or within ``tolerance_mm`` of it)?

    Ties at the maximum count as a hit when any of them hits (as Quantus). A constant map has no peak and misses.

    Args:
        maps: (B, 1, *spatial) maps.
        masks: (B, 1, *spatial) ground-truth masks.
        tolerance_mm: distance in mm from the mask that still counts as a hit.
        spacing: voxel size in mm per spatial axis; default from a MetaTensor's affine, else 1.

    Returns:
        (B,) float32 of 1.0 (hit) / 0.0 (miss), NaN where the mask is empty (use ``nanmean``).

    Example:
        >>> hits = pointing_game(maps, seg, tolerance_mm=5.0, spacing=(1.0, 1.0, 2.5))
    """
    if tolerance_mm < 0:
        raise ValueError(f"tolerance_mm must be >= 0, got {tolerance_mm}")
    given = maps
    maps = _as_maps(maps)
    sp = _spacing_of(given, spacing, maps.ndim - 2)
    gt = _as_masks(masks, maps)
    flat = _flat(maps)
    peak = flat == flat.max(dim=1, keepdim=True).values
    has_peak = flat.max(dim=1).values > flat.min(dim=1).values
    if tolerance_mm > 0:
        near = torch.zeros_like(gt)
        for b in range(gt.shape[0]):
            inside = gt[b, 0].cpu().numpy()
            if inside.any():
                dist = distance_transform_edt(~inside, sampling=sp)
                near[b, 0] = torch.from_numpy(dist <= tolerance_mm + 1e-9).to(gt.device)
        target = _flat(near)
    else:
        target = _flat(gt)
    hits = ((peak & target).any(dim=1) & has_peak).float()
    return torch.where(_flat(gt).any(dim=1), hits, torch.full_like(hits, float("nan")))


def relevance_mass(maps: Any, masks: Any) -> torch.Tensor:
    """Fraction of each map's total mass that lies inside its mask (relevance mass accuracy, Arras et al. 2022).

    Args:
        maps: (B, 1, *spatial) non-negative maps.
        masks: (B, 1, *spatial) ground-truth masks.

    Returns:
        (B,) float32 in [0, 1]; an all-zero map gives 0, an empty mask NaN.

    Example:
        >>> relevance_mass(maps, seg).nanmean()
    """
    maps = _as_maps(maps)
    if (maps < 0).any():
        raise ValueError("relevance_mass needs non-negative maps (mass); got negative values")
    gt = _flat(_as_masks(masks, maps))
    flat = _flat(maps).double()
    total = flat.sum(1)
    inside = (flat * gt).sum(1)
    frac = torch.where(total > 0, inside / total.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(total))
    return torch.where(gt.any(dim=1), frac, torch.full_like(frac, float("nan"))).float()


def sparseness(maps: Any) -> torch.Tensor:
    """Gini index of each map's values (Chalasani et al. 2020): 1 = all mass on one voxel, 0 = uniform.

    Args:
        maps: (B, 1, *spatial) non-negative maps.

    Returns:
        (B,) float32; an all-zero map gives 0.
    """
    maps = _as_maps(maps)
    if (maps < 0).any():
        raise ValueError("sparseness needs non-negative maps; got negative values")
    values = torch.sort(_flat(maps).double(), dim=1).values
    n = values.shape[1]
    weights = 2 * torch.arange(1, n + 1, dtype=torch.float64, device=values.device) - n - 1
    total = values.sum(1)
    gini = (values * weights).sum(1) / (n * total.clamp_min(torch.finfo(torch.float64).tiny))
    return torch.where(total > 0, gini, torch.zeros_like(gini)).float()


def localisation_scores(
    maps: Any,
    masks: Any,
    threshold: Threshold = "median",
    tolerance_mm: float = 0.0,
    spacing: Sequence[float] | float | None = None,
) -> dict[str, torch.Tensor]:
    """All localisation scores of each map against its mask in one call.

    Returns:
        ``{"iou", "dice", "pointing_game", "relevance_mass", "sparseness"}`` → (B,) tensors.

    Example:
        >>> scores = localisation_scores(maps, seg, threshold="otsu")
    """
    return {
        "iou": map_iou(maps, masks, threshold),
        "dice": map_dice(maps, masks, threshold),
        "pointing_game": pointing_game(maps, masks, tolerance_mm, spacing),
        "relevance_mass": relevance_mass(maps, masks),
        "sparseness": sparseness(maps),
    }


# ----------------------------------------------------------------------------------------------------- faithfulness
class Curve(NamedTuple):
    """A deletion/insertion curve: ``curve`` (B, steps + 1) scores at fractions 0, 1/steps, ..., 1 and ``auc`` (B,)."""

    curve: torch.Tensor
    auc: torch.Tensor


def auc(curve: Any, fractions: Any | None = None) -> torch.Tensor:
    """Area under curves sampled evenly on [0, 1] (trapezoid rule), or at the given ``fractions``.

    Args:
        curve: (..., n) values.
        fractions: optional (n,) abscissae; default ``linspace(0, 1, n)``.

    Returns:
        (...) areas.

    Example:
        >>> auc(torch.tensor([1.0, 0.5, 0.0]))  # tensor(0.5)
    """
    curve = torch.as_tensor(curve)
    curve = curve if curve.is_floating_point() else curve.float()
    if curve.ndim == 0 or curve.shape[-1] < 2:
        raise ValueError(f"a curve needs at least 2 points, got shape {tuple(curve.shape)}")
    if fractions is None:
        fractions = torch.linspace(0, 1, curve.shape[-1], dtype=curve.dtype, device=curve.device)
    fractions = torch.as_tensor(fractions, dtype=curve.dtype, device=curve.device)
    return torch.trapezoid(curve, x=fractions, dim=-1)


def _attention_ranks(maps: torch.Tensor, seed: int) -> torch.Tensor:
    """(B, N) rank of each voxel, 0 = most attended; ties broken by a seeded random permutation."""
    flat = _flat(maps)
    n = flat.shape[1]
    gen = torch.Generator().manual_seed(int(seed))
    ranks = torch.empty_like(flat, dtype=torch.long)
    positions = torch.arange(n, device=flat.device)
    for b in range(flat.shape[0]):
        perm = torch.randperm(n, generator=gen).to(flat.device)
        order = perm[torch.argsort(flat[b, perm], descending=True, stable=True)]
        ranks[b, order] = positions
    return ranks


def gaussian_blur(x: torch.Tensor, sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """Separable Gaussian blur of every channel, edges replicated: ``scipy.ndimage.gaussian_filter(mode="nearest")``.

    MONAI's sampled Gaussian kernel (``monai.networks.layers.convutils.gaussian_1d``, as in ``GaussianFilter(...,
    approx="sampled")``) applied by ``monai.networks.layers.separable_filtering`` with replicated edges
    (``GaussianFilter`` itself pads with zeros, which would darken the blurred baseline at the image border).

    Args:
        x: (B, C, *spatial) tensor.
        sigma: standard deviation in voxels.
        truncate: kernel radius in standard deviations.

    Returns:
        Blurred tensor of ``x``'s shape, dtype and device.
    """
    kernel = gaussian_1d(torch.tensor(float(sigma), dtype=torch.float64), truncated=truncate, approx="sampled",
                         normalize=True)  # fmt: skip
    kernel = kernel.to(device=x.device, dtype=x.dtype)
    return separable_filtering(x, [kernel] * (x.ndim - 2), mode="replicate")


def _baseline(x: torch.Tensor, baseline: str | float | torch.Tensor, blur_sigma: float | None) -> torch.Tensor:
    if isinstance(baseline, torch.Tensor):
        if baseline.shape != x.shape[1:] and baseline.shape != x.shape:
            raise ValueError(f"baseline tensor shape {tuple(baseline.shape)} does not match x {tuple(x.shape)}")
        return baseline.to(x).expand_as(x)
    if isinstance(baseline, (int, float)) and not isinstance(baseline, bool):
        return torch.full_like(x, float(baseline))
    if baseline == "zero":
        return torch.zeros_like(x)
    if baseline == "mean":  # per sample and channel
        return x.mean(dim=tuple(range(2, x.ndim)), keepdim=True).expand_as(x)
    if baseline == "blur":
        sigma = blur_sigma if blur_sigma is not None else max(1.0, 0.1 * min(x.shape[2:]))
        if sigma <= 0:
            raise ValueError(f"blur_sigma must be > 0, got {sigma}")
        return gaussian_blur(x, sigma)
    raise ValueError(f"baseline must be 'zero', 'blur', 'mean', a number or a tensor, got {baseline!r}")


_ACTIVATIONS = ("softmax", "sigmoid", "none")


def _scores(out: Any, activation: str) -> torch.Tensor:
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"the model must return a tensor (B, K) or (B,), got {type(out).__name__}")
    out = out.float().reshape(out.shape[0], -1)
    if activation == "softmax":
        return torch.softmax(out, dim=1)
    if activation == "sigmoid":
        return torch.sigmoid(out)
    return out


def _class_indices(class_idx: Any, logits: torch.Tensor) -> torch.Tensor:
    b, k = logits.shape
    if class_idx is None:
        idx = logits.argmax(dim=1)
    elif isinstance(class_idx, int) and not isinstance(class_idx, bool):
        idx = torch.full((b,), class_idx, dtype=torch.long, device=logits.device)
    else:
        idx = torch.as_tensor(class_idx, dtype=torch.long, device=logits.device).reshape(-1)
        if idx.numel() != b:
            raise ValueError(f"class_idx needs one index per sample ({b}), got {idx.numel()}")
    if ((idx < 0) | (idx >= k)).any():
        raise ValueError(f"class_idx out of range for {k} outputs: {idx.tolist()}")
    return idx


def _perturbation_curve(
    model: nn.Module,
    x: torch.Tensor,
    maps: Any,
    class_idx: Any,
    steps: int,
    baseline: str | float | torch.Tensor,
    batch_size: int,
    activation: str,
    seed: int,
    blur_sigma: float | None,
    insert: bool,
) -> Curve:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(x, torch.Tensor) or x.ndim not in (4, 5):
        raise ValueError(f"x must be a (B, C, H, W) or (B, C, D, H, W) tensor, got {getattr(x, 'shape', type(x))}")
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps} and {batch_size}")
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {_ACTIVATIONS}, got {activation!r}")
    maps = _as_maps(maps).to(x.device)
    if maps.shape[0] != x.shape[0] or maps.shape[2:] != x.shape[2:]:
        raise ValueError(f"maps {tuple(maps.shape)} must be (B, 1, *spatial) of x {tuple(x.shape)}")
    x = plain_tensor(x)
    n_batch, spatial = x.shape[0], x.shape[2:]
    n_vox = int(np.prod(spatial))
    ranks = _attention_ranks(maps, seed)
    # number of voxels perturbed at each step (0 ... all)
    counts = torch.round(torch.linspace(0, 1, steps + 1, dtype=torch.float64) * n_vox).long().to(x.device)
    jobs = torch.cartesian_prod(torch.arange(n_batch), torch.arange(steps + 1)).to(x.device)
    curve = torch.empty(n_batch, steps + 1, dtype=torch.float32, device=x.device)
    with preserved_state(model), torch.no_grad():
        target = _class_indices(class_idx, _scores(model(x), "none"))
        base = _baseline(x, baseline, blur_sigma)
        for chunk in jobs.split(batch_size):
            bs, ks = chunk[:, 0], chunk[:, 1]
            chosen = (ranks[bs] < counts[ks, None]).reshape(len(chunk), 1, *spatial)
            # deletion: chosen voxels take the baseline; insertion: chosen voxels are revealed on the baseline
            xin = torch.where(chosen, x[bs], base[bs]) if insert else torch.where(chosen, base[bs], x[bs])
            probs = _scores(model(xin), activation)
            curve[bs, ks] = probs[torch.arange(len(chunk), device=x.device), target[bs]]
    return Curve(curve, auc(curve))


def deletion_curve(
    model: nn.Module,
    x: torch.Tensor,
    maps: Any,
    class_idx: int | Sequence[int] | torch.Tensor | None = None,
    steps: int = 20,
    baseline: str | float | torch.Tensor = "zero",
    batch_size: int = 16,
    activation: str = "softmax",
    seed: int = 0,
    blur_sigma: float | None = None,
) -> Curve:
    """Deletion curve (Petsiuk et al. 2018): the class score as the most-attended voxels are removed first.

    A faithful map makes the score drop fast: a low AUC is good. The model runs in eval mode without gradients
    and its flags (``training``, ``requires_grad``) are restored afterwards.

    Args:
        model: the network explained.
        x: (B, C, *spatial) input.
        maps: (B, 1, *spatial) maps of ``x``; voxels are ranked by map value, ties in seeded random order.
        class_idx: ``None`` (the model's prediction on ``x``), an int, or one index per sample (a regression column).
        steps: the curve has ``steps + 1`` points, at fractions 0, 1/steps, ..., 1 of the voxels removed.
        baseline: what removed voxels become: ``"zero"``, ``"blur"`` (Gaussian blur of ``x``), ``"mean"`` (per sample
            and channel), a number, or a tensor shaped like ``x``.
        batch_size: perturbed inputs per forward pass.
        activation: ``"softmax"`` (class probability), ``"sigmoid"`` or ``"none"`` (raw output, e.g. regression).
        seed: seed of the tie-breaking permutation.
        blur_sigma: Gaussian sigma in voxels for ``"blur"`` (default ``max(1, 0.1 * smallest spatial size)``).

    Returns:
        :class:`Curve` with ``curve`` (B, steps + 1) and ``auc`` (B,).

    Example:
        >>> curve, area = deletion_curve(model, x, GradCAM(model, "layer4")(x), steps=10, baseline="blur")
    """
    return _perturbation_curve(
        model, x, maps, class_idx, steps, baseline, batch_size, activation, seed, blur_sigma, insert=False
    )


def insertion_curve(
    model: nn.Module,
    x: torch.Tensor,
    maps: Any,
    class_idx: int | Sequence[int] | torch.Tensor | None = None,
    steps: int = 20,
    baseline: str | float | torch.Tensor = "blur",
    batch_size: int = 16,
    activation: str = "softmax",
    seed: int = 0,
    blur_sigma: float | None = None,
) -> Curve:
    """Insertion curve (Petsiuk et al. 2018): the class score as the most-attended voxels are revealed first on the
    baseline. A faithful map makes the score rise fast: a high AUC is good. Arguments as :func:`deletion_curve`
    (the default baseline here is ``"blur"``, as in the RISE paper).

    Example:
        >>> curve, area = insertion_curve(model, x, maps, steps=10)
    """
    return _perturbation_curve(
        model, x, maps, class_idx, steps, baseline, batch_size, activation, seed, blur_sigma, insert=True
    )


# ----------------------------------------------------------------------------------------------------- sanity check
_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


def _forward_order(model: nn.Module, x: torch.Tensor, include_norm: bool) -> list[str]:
    """Names of modules owning parameters, in the order the forward pass first calls them."""
    owners = {
        name: m
        for name, m in model.named_modules()
        if any(True for _ in m.parameters(recurse=False)) and (include_norm or not isinstance(m, _NORM_TYPES))
    }
    order: list[str] = []

    def hook(name: str) -> Callable[..., None]:
        def _record(*_: Any) -> None:
            if name not in order:
                order.append(name)

        return _record

    handles = [m.register_forward_hook(hook(name)) for name, m in owners.items()]
    try:
        with preserved_state(model), torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return order


def _reinitialise(module: nn.Module, seed: int) -> None:
    """Re-draw the module's own parameters from its default initialiser, seeded, without touching the global RNG."""
    cuda = sorted({p.device.index or 0 for p in module.parameters(recurse=False) if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda), torch.no_grad():
        torch.manual_seed(seed)
        if callable(getattr(module, "reset_parameters", None)):
            module.reset_parameters()
        else:  # no initialiser: a Gaussian with the parameter's own scale
            for p in module.parameters(recurse=False):
                std = float(p.std()) if p.numel() > 1 and float(p.std()) > 0 else 1.0
                p.normal_(0.0, std)


def cascading_randomization(
    model: nn.Module,
    x: torch.Tensor,
    cam_cls: Callable[..., Any],
    target_layer: str,
    class_idx: int | Sequence[int] | torch.Tensor | None = None,
    seed: int = 0,
    include_norm: bool = False,
    cam_kwargs: dict[str, Any] | None = None,
) -> Any:
    """Model-parameter randomisation test (Adebayo et al. 2018), cascading from the output layer downwards.

    On a deep copy of ``model`` (the caller's model is never touched) the parameterised layers are re-initialised
    one after another from the top (the last layer the forward pass calls) down, cumulatively; after each step the
    map is recomputed for the *original* predicted class and compared with the original map. A map that stays
    similar while the weights it claims to explain are destroyed fails the sanity check.

    Args:
        model: the network.
        x: (B, C, *spatial) input.
        cam_cls: a CAM class such as :class:`monai_gamverify.GradCAM`, called as ``cam_cls(model, target_layers=...)``.
        target_layer: layer name for the CAM.
        class_idx: classes explained; default the original model's prediction per sample.
        seed: layer ``i`` (0 = top) is re-drawn with seed ``seed + i``.
        include_norm: also randomise normalisation layers (by default only weight layers are, as in the paper).
        cam_kwargs: extra keyword arguments for the CAM call (``normalize`` is forced to ``True``).

    Returns:
        ``pandas.DataFrame`` with columns ``step`` (0 = original model), ``layer`` (the layer randomised at that
        step), ``sample``, ``ssim`` and ``spearman`` (between the original and the randomised map).

    Example:
        >>> df = cascading_randomization(model, x, GradCAM, "layer4")
        >>> df.groupby("layer", sort=False)[["ssim", "spearman"]].mean()
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    work = copy.deepcopy(model)
    work.eval()
    kwargs = dict(cam_kwargs or {}, normalize=True)
    with preserved_state(work), torch.no_grad():
        target = _class_indices(class_idx, _scores(work(x), "none"))
    layers = _forward_order(work, x, include_norm)[::-1]
    modules = dict(work.named_modules())

    def explain() -> torch.Tensor:
        return cam_cls(work, target_layers=target_layer)(x, class_idx=target, **kwargs).detach()

    original = explain()
    orig_flat = _flat(original).double().cpu().numpy()
    rows: list[dict[str, Any]] = []
    for step, name in enumerate(["(none)", *layers]):
        if step > 0:
            _reinitialise(modules[name], seed + step - 1)
        current = original if step == 0 else explain()
        ssim = similarity_metrics(original, current, metrics=["ssim"])["ssim"].cpu()
        cur_flat = _flat(current).double().cpu().numpy()
        for b in range(x.shape[0]):
            # a constant map has no ranks: the correlation is undefined (NaN), not 0
            if np.ptp(orig_flat[b]) > 0 and np.ptp(cur_flat[b]) > 0:
                rho = float(spearmanr(orig_flat[b], cur_flat[b]).statistic)
            else:
                rho = float("nan")
            rows.append({"step": step, "layer": name, "sample": b, "ssim": float(ssim[b]), "spearman": rho})
    return pd.DataFrame(rows, columns=["step", "layer", "sample", "ssim", "spearman"])


# ---------------------------------------------------------------------------------------------- layer comparison
def score_layers(
    maps_by_layer: dict[str, Any],
    masks: Any,
    threshold: Threshold = "median",
    tolerance_mm: float = 0.0,
    spacing: Sequence[float] | float | None = None,
    model: nn.Module | None = None,
    x: torch.Tensor | None = None,
    class_idx: int | Sequence[int] | torch.Tensor | None = None,
    **curve_kwargs: Any,
) -> Any:
    """Localisation (and, given ``model`` and ``x``, deletion/insertion AUC) of the maps of several layers.

    Args:
        maps_by_layer: layer name → (B, 1, *spatial) maps, e.g. ``GradCAM(model, ["layer2", "layer4"])(x)``.
        masks: (B, 1, *spatial) ground-truth masks.
        threshold, tolerance_mm, spacing: as in :func:`localisation_scores`.
        model, x, class_idx: when given, faithfulness AUCs are added.
        curve_kwargs: passed to :func:`deletion_curve` / :func:`insertion_curve` (``steps``, ``baseline``, ...).

    Returns:
        ``pandas.DataFrame``, one row per layer and sample: ``layer``, ``sample``, ``iou``, ``dice``,
        ``pointing_game``, ``relevance_mass``, ``sparseness`` (+ ``deletion_auc``, ``insertion_auc``).

    Example:
        >>> df = score_layers(GradCAM(model, ["layer1", "layer4"])(x), seg, model=model, x=x)
        >>> df.groupby("layer").mean(numeric_only=True)
    """
    if not isinstance(maps_by_layer, dict) or not maps_by_layer:
        raise TypeError("maps_by_layer must be a non-empty dict layer name -> maps")
    if (model is None) != (x is None):
        raise ValueError("give both model and x for faithfulness scores, or neither")
    frames = []
    for layer, maps in maps_by_layer.items():
        scores = localisation_scores(maps, masks, threshold, tolerance_mm, spacing)
        cols = {k: v.cpu().numpy() for k, v in scores.items()}
        if model is not None:
            cols["deletion_auc"] = deletion_curve(model, x, maps, class_idx, **curve_kwargs).auc.cpu().numpy()
            cols["insertion_auc"] = insertion_curve(model, x, maps, class_idx, **curve_kwargs).auc.cpu().numpy()
        n = len(cols["iou"])
        frames.append(pd.DataFrame({"layer": [layer] * n, "sample": np.arange(n), **cols}))
    return pd.concat(frames, ignore_index=True)
