"""Attribution energy (AE) and its leave-one-out Spearman analysis against expert scores.

AE of a volume is the sum of its *raw* (unnormalised, ReLU'd) Grad-CAM values; for a 2D model applied slice by
slice it is the sum over all slices. The question asked of AE is whether it tracks the expert consensus score of
each quality category across volumes (volume-level Spearman rho), and how much any single volume drives that
answer (leave-one-out: rho on the other n - 1 volumes, summarised by the median rho and median p). Beyond that
analysis this module adds a bootstrap interval for rho, Holm's adjustment over categories and robust flags for
volumes whose AE is atypical for their score.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy import stats
from tqdm.auto import tqdm

from monai_gamverify.io import write_csv, write_json
from monai_gamverify.visualize.plots import save_figure

__all__ = [
    "attribution_energy",
    "SpearmanLOO",
    "spearman_loo",
    "holm_adjust",
    "energy_table",
    "atypical_cases",
    "volume_energy",
    "volume_energy_multi",
    "cohort_energy",
    "energy_from_maps",
    "energy_scatter_png",
    "energy_report",
]

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------------------------
# attribution energy
# --------------------------------------------------------------------------------------------------------------------


def attribution_energy(raw_maps: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
    """Attribution energy: each map summed over every axis but the batch axis.

    Sums are accumulated in float64 (a volume has millions of voxels; float32 loses digits). On devices without
    float64 (Apple MPS) float32 is used.

    Args:
        raw_maps: raw (``normalize=False``) maps of shape (B, 1, *spatial) or any (B, ...); tensor or array.

    Returns:
        AE of shape (B,): a float64 tensor on the input's device for tensor input, a float64 array otherwise.

    Raises:
        ValueError: if the maps have no batch axis or contain NaN/inf.

    Example:
        >>> maps = cam(x, normalize=False)  # (B, 1, D, H, W)
        >>> attribution_energy(maps)  # (B,)
    """
    if isinstance(raw_maps, torch.Tensor):
        maps = raw_maps.as_tensor() if hasattr(raw_maps, "as_tensor") else raw_maps  # MetaTensor -> plain tensor
        if maps.ndim < 2:
            raise ValueError(f"attribution_energy expects maps of shape (B, ...), got shape {tuple(maps.shape)}")
        dtype = torch.float32 if maps.device.type == "mps" else torch.float64
        maps = maps.detach().to(dtype)
        if not torch.isfinite(maps).all():
            raise ValueError("attribution_energy: maps contain NaN or infinite values")
        return maps.reshape(maps.shape[0], -1).sum(dim=1)
    arr = np.asarray(raw_maps, dtype=np.float64)
    if arr.ndim < 2:
        raise ValueError(f"attribution_energy expects maps of shape (B, ...), got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError("attribution_energy: maps contain NaN or infinite values")
    return arr.reshape(arr.shape[0], -1).sum(axis=1)


# --------------------------------------------------------------------------------------------------------------------
# Spearman leave-one-out
# --------------------------------------------------------------------------------------------------------------------


def _as_vector(x: Any, name: str) -> np.ndarray:
    """1D float64 array from a tensor / array / sequence, with clear errors on bad input."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{name} must be numeric (array, tensor or sequence of numbers): {err}") from err
    arr = np.squeeze(arr) if arr.ndim > 1 else arr
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one value per volume (1D), got shape {np.shape(x)}")
    if not np.isfinite(arr).all():
        bad = np.flatnonzero(~np.isfinite(arr))
        raise ValueError(f"{name} contains NaN or infinite values at positions {bad[:10].tolist()}")
    return arr


def _check_pair(energy: Any, scores: Any, min_n: int) -> tuple[np.ndarray, np.ndarray]:
    e, s = _as_vector(energy, "energy"), _as_vector(scores, "scores")
    if e.shape != s.shape:
        raise ValueError(f"energy and scores differ in length: {e.size} vs {s.size} volumes")
    if e.size < min_n:
        raise ValueError(f"need at least {min_n} volumes, got {e.size}")
    if np.ptp(s) == 0:
        raise ValueError(f"scores are constant (all {s[0]:g}): Spearman's rho is undefined")
    if np.ptp(e) == 0:
        raise ValueError(f"energy is constant (all {e[0]:g}): Spearman's rho is undefined (are the raw maps all zero?)")
    return e, s


def _spearman_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman rho of each row pair of (R, n) arrays (average ranks for ties, as scipy); NaN for a constant row."""
    rx = stats.rankdata(x, axis=1)
    ry = stats.rankdata(y, axis=1)
    rx -= rx.mean(axis=1, keepdims=True)
    ry -= ry.mean(axis=1, keepdims=True)
    den = np.sqrt((rx * rx).sum(axis=1) * (ry * ry).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = (rx * ry).sum(axis=1) / den
    rho[den == 0] = np.nan
    return np.clip(rho, -1.0, 1.0)


@dataclass(frozen=True)
class SpearmanLOO:
    """Result of :func:`spearman_loo`.

    Attributes:
        n: number of volumes.
        rho, p: Spearman rho and its p-value on all volumes (``scipy.stats.spearmanr``).
        loo_rho, loo_p: rho and p with volume ``i`` left out, in input order.
        median_rho, median_p: medians of ``loo_rho`` and ``loo_p`` (the study's summary).
        min_loo_rho, max_loo_rho: range of ``loo_rho``.
        most_influential: index of the volume whose removal moves rho the most.
        degenerate_folds: folds whose remaining energy or scores are constant (rho undefined); they are
            reported as rho = 0, p = 1 (no evidence of association) instead of NaN.
        ci_low, ci_high: percentile bootstrap interval for rho at level ``ci`` (NaN only if ``n_boot == 0``
            or no resample was valid).
        ci: interval level.
        n_boot: requested resamples; n_boot_valid: resamples with non-constant energy and scores (used).
    """

    n: int
    rho: float
    p: float
    loo_rho: np.ndarray = field(repr=False)
    loo_p: np.ndarray = field(repr=False)
    median_rho: float
    median_p: float
    min_loo_rho: float
    max_loo_rho: float
    most_influential: int
    degenerate_folds: tuple[int, ...]
    ci_low: float
    ci_high: float
    ci: float
    n_boot: int
    n_boot_valid: int

    def summary(self) -> dict[str, float | int]:
        """The scalar fields (no per-fold arrays) as a plain dict, e.g. for a table row or JSON."""
        d = asdict(self)
        d.pop("loo_rho"), d.pop("loo_p")
        d["degenerate_folds"] = len(self.degenerate_folds)
        return d


def spearman_loo(
    energy: Any,
    scores: Any,
    *,
    n_boot: int = 2000,
    ci: float = 0.95,
    seed: int = 0,
    alternative: str = "two-sided",
) -> SpearmanLOO:
    """Volume-level Spearman correlation of AE with scores, on all volumes and leaving each volume out in turn.

    Every leave-one-out value is exactly ``scipy.stats.spearmanr(np.delete(energy, i), np.delete(scores, i))``;
    ties get average ranks as in scipy. A fold whose remaining energy or scores are constant has no defined rho;
    it is reported as rho = 0, p = 1 and listed in ``degenerate_folds`` so the result never holds NaN.

    Args:
        energy: AE per volume, shape (n,).
        scores: consensus score per volume, shape (n,).
        n_boot: bootstrap resamples (of volumes, with replacement) for the rho interval; 0 disables it.
            Resamples with constant energy or scores are skipped (``n_boot_valid`` counts the used ones).
        ci: level of the percentile bootstrap interval.
        seed: seed of the bootstrap resampling.
        alternative: passed to ``scipy.stats.spearmanr`` ("two-sided", "less", "greater").

    Returns:
        A :class:`SpearmanLOO`.

    Raises:
        ValueError: length mismatch, fewer than 4 volumes (each fold must keep at least 3, otherwise scipy's p is
            NaN), NaN/inf values, constant energy or constant scores over all volumes, bad ``ci``/``n_boot``.

    Example:
        >>> res = spearman_loo(ae, consensus)
        >>> res.median_rho, res.median_p
    """
    e, s = _check_pair(energy, scores, min_n=4)
    if not 0.0 < ci < 1.0:
        raise ValueError(f"ci must lie in (0, 1), got {ci}")
    if int(n_boot) != n_boot or n_boot < 0:
        raise ValueError(f"n_boot must be a non-negative integer, got {n_boot}")
    n = e.size
    full = stats.spearmanr(e, s, alternative=alternative)
    loo_rho, loo_p, degenerate = np.zeros(n), np.ones(n), []
    for i in range(n):
        ei, si = np.delete(e, i), np.delete(s, i)
        if np.ptp(ei) == 0 or np.ptp(si) == 0:
            degenerate.append(i)  # rho undefined: keep the documented (0, 1)
            continue
        r = stats.spearmanr(ei, si, alternative=alternative)
        loo_rho[i], loo_p[i] = float(r.statistic), float(r.pvalue)

    ci_low = ci_high = math.nan
    n_valid = 0
    if n_boot > 0:
        rng = np.random.default_rng(seed)
        idx = rng.integers(0, n, size=(int(n_boot), n))
        boot = _spearman_rows(e[idx], s[idx])
        boot = boot[np.isfinite(boot)]
        n_valid = int(boot.size)
        if n_valid:
            ci_low, ci_high = (float(v) for v in np.quantile(boot, [(1 - ci) / 2, (1 + ci) / 2]))
        else:
            logger.warning("spearman_loo: no bootstrap resample had non-constant data; the interval is NaN")

    rho = float(full.statistic)
    return SpearmanLOO(
        n=n,
        rho=rho,
        p=float(full.pvalue),
        loo_rho=loo_rho,
        loo_p=loo_p,
        median_rho=float(np.median(loo_rho)),
        median_p=float(np.median(loo_p)),
        min_loo_rho=float(loo_rho.min()),
        max_loo_rho=float(loo_rho.max()),
        most_influential=int(np.argmax(np.abs(loo_rho - rho))),
        degenerate_folds=tuple(degenerate),
        ci_low=ci_low,
        ci_high=ci_high,
        ci=float(ci),
        n_boot=int(n_boot),
        n_boot_valid=n_valid,
    )


def holm_adjust(pvalues: Any) -> np.ndarray:
    """Holm's step-down adjusted p-values (family-wise error control), returned in input order.

    With the m p-values sorted ascending, ``p_adj(k) = max_{j <= k} min(1, (m - j + 1) * p(j))`` (1-based ``j``).

    Args:
        pvalues: p-values in [0, 1], shape (m,).

    Returns:
        Adjusted p-values, shape (m,).

    Example:
        >>> holm_adjust([0.01, 0.04, 0.03])  # -> [0.03, 0.06, 0.06]
    """
    p = _as_vector(pvalues, "pvalues") if np.size(pvalues) else np.zeros(0)
    if ((p < 0) | (p > 1)).any():
        raise ValueError(f"p-values must lie in [0, 1], got {p.tolist()}")
    m = p.size
    order = np.argsort(p, kind="stable")
    stepped = np.minimum(1.0, (m - np.arange(m)) * p[order])
    adj = np.empty(m)
    adj[order] = np.maximum.accumulate(stepped)  # monotone: a later hypothesis never gets a smaller p
    return adj


def energy_table(
    energy_by_category: Mapping[str, Any],
    scores_by_category: Mapping[str, Any],
    *,
    n_boot: int = 2000,
    ci: float = 0.95,
    seed: int = 0,
    alpha: float = 0.05,
    progress: bool = True,
) -> pd.DataFrame:
    """The per-category AE-vs-score table: the study's columns plus bootstrap interval and Holm adjustment.

    Args:
        energy_by_category: category -> AE per volume.
        scores_by_category: category -> score per volume (same keys, same volume order).
        n_boot, ci, seed: bootstrap settings of :func:`spearman_loo` (same seed for every category, so a
            category's row does not depend on which other categories are present).
        alpha: family-wise level for the ``significant_holm`` column.
        progress: show a progress bar over categories.

    Returns:
        DataFrame, one row per category: ``category, n, rho, p, median_loo_rho, median_loo_p, min_loo_rho,
        max_loo_rho, ci_low, ci_high, p_holm, median_loo_p_holm, significant_holm, degenerate_folds,
        n_boot_valid``. ``p_holm`` adjusts the full-sample p over the categories; ``median_loo_p_holm`` applies the
        same step-down to the median LOO p (a descriptive note: a median of p-values is not itself a p-value).

    Example:
        >>> energy_table({"parotid": ae_p, "larynx": ae_l}, {"parotid": sc_p, "larynx": sc_l})
    """
    if not isinstance(energy_by_category, Mapping) or not isinstance(scores_by_category, Mapping):
        raise TypeError("energy_by_category and scores_by_category must be mappings category -> values")
    missing = sorted(set(energy_by_category) ^ set(scores_by_category), key=str)
    if missing:
        raise ValueError(f"categories present in only one of energy/scores: {missing}")
    if not energy_by_category:
        raise ValueError("no category given")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    rows = []
    for cat in tqdm(list(energy_by_category), desc="energy table", disable=not progress):
        try:
            res = spearman_loo(energy_by_category[cat], scores_by_category[cat], n_boot=n_boot, ci=ci, seed=seed)
        except ValueError as err:
            raise ValueError(f"category {cat!r}: {err}") from err
        rows.append(
            {
                "category": cat,
                "n": res.n,
                "rho": res.rho,
                "p": res.p,
                "median_loo_rho": res.median_rho,
                "median_loo_p": res.median_p,
                "min_loo_rho": res.min_loo_rho,
                "max_loo_rho": res.max_loo_rho,
                "ci_low": res.ci_low,
                "ci_high": res.ci_high,
                "degenerate_folds": len(res.degenerate_folds),
                "n_boot_valid": res.n_boot_valid,
            }
        )
    df = pd.DataFrame(rows)
    df.insert(df.columns.get_loc("degenerate_folds"), "p_holm", holm_adjust(df["p"].to_numpy()))
    df.insert(df.columns.get_loc("degenerate_folds"), "median_loo_p_holm", holm_adjust(df["median_loo_p"].to_numpy()))
    df.insert(df.columns.get_loc("degenerate_folds"), "significant_holm", df["p_holm"] <= alpha)
    return df


def atypical_cases(
    energy: Any,
    scores: Any,
    ids: Sequence[Any] | None = None,
    *,
    k: float = 1.5,
) -> pd.DataFrame:
    """Volumes whose AE is unusual for their score: robust line of AE on score, residual outside Tukey's fences.

    The line is Theil-Sen (``scipy.stats.theilslopes``: median of pairwise slopes), so a few odd volumes do not
    bend it; a residual below ``Q1 - k * IQR`` or above ``Q3 + k * IQR`` of all residuals is flagged.

    Args:
        energy: AE per volume, shape (n,).
        scores: predicted or consensus score per volume, shape (n,).
        ids: volume identifiers (default ``0..n-1``); must be unique.
        k: Tukey fence multiplier (1.5 = "outlier", 3 = "far out").

    Returns:
        DataFrame with ``id, score, energy, fitted, residual, flag, direction`` (``"high"``/``"low"``/``""``),
        in input order; fence values in ``df.attrs`` (``slope``, ``intercept``, ``lower_fence``, ``upper_fence``).

    Example:
        >>> df = atypical_cases(ae, consensus, ids=volume_ids)
        >>> df[df.flag]
    """
    e, s = _check_pair(energy, scores, min_n=3)
    ids = list(range(e.size)) if ids is None else list(ids)
    if len(ids) != e.size:
        raise ValueError(f"ids has {len(ids)} entries for {e.size} volumes")
    if len(set(map(str, ids))) != len(ids):
        raise ValueError("ids must be unique")
    if not k >= 0:
        raise ValueError(f"k must be non-negative, got {k}")
    slope, intercept = (float(v) for v in stats.theilslopes(e, s)[:2])
    fitted = intercept + slope * s
    resid = e - fitted
    q1, q3 = np.percentile(resid, [25, 75])
    lo, hi = q1 - k * (q3 - q1), q3 + k * (q3 - q1)
    direction = np.where(resid > hi, "high", np.where(resid < lo, "low", ""))
    df = pd.DataFrame(
        {"id": ids, "score": s, "energy": e, "fitted": fitted, "residual": resid, "flag": direction != ""}
    )
    df["direction"] = direction
    df.attrs.update(slope=slope, intercept=intercept, lower_fence=float(lo), upper_fence=float(hi), k=float(k))
    return df


# --------------------------------------------------------------------------------------------------------------------
# streaming AE of a model on a volume
# --------------------------------------------------------------------------------------------------------------------


def _prepare_volume(volume: Any, slice_axis: int | None, batch_size: int) -> tuple[torch.Tensor, int | None]:
    """(C, *spatial) tensor of one image and the slice axis as an index into its shape (``None``: whole image)."""
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    x = torch.as_tensor(volume)
    x = x.as_tensor() if hasattr(x, "as_tensor") else x  # MetaTensor -> plain tensor
    if x.ndim == 5:
        if x.shape[0] != 1:
            raise ValueError(f"expected one volume, got a batch of {x.shape[0]} (shape {tuple(x.shape)})")
        x = x[0]
    if not x.is_floating_point():
        x = x.float()
    if slice_axis is None:
        if x.ndim not in (3, 4):
            raise ValueError(f"expected one image (C, *spatial) with 2 or 3 spatial axes, got {tuple(x.shape)}")
        return x, None
    if x.ndim != 4:
        raise ValueError(f"slice-by-slice AE needs one 3D volume (C, D, H, W) or (1, C, D, H, W), got {tuple(x.shape)}")
    if isinstance(slice_axis, bool) or not isinstance(slice_axis, (int, np.integer)) or not -3 <= slice_axis <= 2:
        raise ValueError(f"slice_axis must be a spatial axis 0, 1, 2 (or -3..-1) or None, got {slice_axis!r}")
    return x, 1 + int(slice_axis) % 3


def _slice_batches(x: torch.Tensor, axis: int | None, batch_size: int, device: Any, progress: bool, desc: str) -> Any:
    """Yield (b, C, ...) batches: 2D slices along ``axis`` (a view; copies only ``batch_size`` at a time)."""
    if axis is None:
        yield x[None].to(device)
        return
    slices = x.movedim(axis, 0)  # (S, C, h, w) view
    n = slices.shape[0]
    for start in tqdm(range(0, n, batch_size), desc=desc, disable=not progress, leave=False):
        yield slices[start : start + batch_size].contiguous().to(device)


def _call_cam(cam: Callable[..., Any], xb: torch.Tensor, class_idx: Any, kwargs: Mapping[str, Any]) -> torch.Tensor:
    maps = cam(xb, class_idx=class_idx, normalize=False, **kwargs)
    if isinstance(maps, Mapping):
        raise ValueError("volume_energy needs a CAM with a single target layer (got a dict of layers)")
    if not isinstance(maps, torch.Tensor) or maps.shape[0] != xb.shape[0]:
        raise ValueError(
            f"the CAM returned {type(maps).__name__} {getattr(maps, 'shape', '')} for a batch of {len(xb)}"
        )
    return maps


def volume_energy(
    cam: Callable[..., Any],
    volume: Any,
    *,
    slice_axis: int | None = 2,
    batch_size: int = 16,
    class_idx: int | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    **cam_kwargs: Any,
) -> float:
    """AE of one volume: raw CAM maps (``normalize=False``) summed over the volume.

    With ``slice_axis`` set, ``cam`` wraps a 2D model that is applied to every slice along that spatial axis,
    ``batch_size`` slices per call, and the maps are summed as they come (a volume's maps are never all held).
    With ``slice_axis=None``, ``cam`` wraps a model taking the whole image and AE = ``attribution_energy(cam(x))``.

    Args:
        cam: a CAM object following the package contract (e.g. ``GradCAM(model, target_layers="layer4")``).
        volume: one volume (C, D, H, W) or (1, C, D, H, W), tensor or array; with ``slice_axis=None`` also a 2D
            image (C, H, W). Integer images are cast to float32.
        slice_axis: spatial axis the slices are taken along (0 = first spatial axis; 2, the default, is axial for
            a RAS-oriented NIfTI loaded by MONAI), or ``None`` for a 3D model.
        batch_size: slices per CAM call.
        class_idx: output column to explain (regression) or class; ``None`` = argmax per slice.
        device: where each slice batch is sent (default: the volume's device), so a volume can stay on the CPU
            while the model runs on a GPU.
        progress: progress bar over slice batches.
        cam_kwargs: passed on to the CAM call (e.g. ``score_fn``).

    Returns:
        AE as a Python float.

    Example:
        >>> cam = GradCAM(net2d, target_layers="layer4")
        >>> volume_energy(cam, ct, slice_axis=2, class_idx=0)
    """
    x, axis = _prepare_volume(volume, slice_axis, batch_size)
    device = x.device if device is None else torch.device(device)
    total = None
    for xb in _slice_batches(x, axis, batch_size, device, progress, "AE slices"):
        ae = attribution_energy(_call_cam(cam, xb, class_idx, cam_kwargs)).sum()
        total = ae if total is None else total + ae  # stays on device: one sync at the end
    return float(total)


def volume_energy_multi(
    cam: Callable[..., Any],
    volume: Any,
    columns: Mapping[str, int] | Sequence[int],
    *,
    slice_axis: int | None = 2,
    batch_size: int = 16,
    device: str | torch.device | None = None,
    progress: bool = True,
    **cam_kwargs: Any,
) -> dict[Any, float]:
    """AE of one volume for several outputs (e.g. the quality categories of a multi-output regressor), one pass.

    How several outputs' gradients come from one CAM call: each slice batch (b slices) is repeated once per column
    into a batch of ``K * b`` and explained with a per-sample ``class_idx`` (block k asks for column k). The CAM
    does one forward and one backward of the summed selected outputs; because samples of a batch do not interact
    in an eval-mode network (the package's CAMs run the network in ``eval()``), each sample's gradient is that of
    its own column, exactly as K separate calls would give. A call holds ``K * batch_size`` slices, so lower
    ``batch_size`` for many columns.

    Args:
        cam: a CAM object following the package contract.
        volume: one volume (C, D, H, W) or (1, C, D, H, W) (see :func:`volume_energy`).
        columns: category -> output column, or a sequence of columns (then the keys are the columns).
        slice_axis: spatial axis of the slices, or ``None`` for a 3D model (see :func:`volume_energy`).
        batch_size: slices per CAM call (before the K-fold repetition).
        device: where each batch is sent (default: the volume's device).
        progress: progress bar over slice batches.
        cam_kwargs: passed on to the CAM call.

    Returns:
        dict key -> AE (Python floats), in the order of ``columns``.

    Example:
        >>> volume_energy_multi(cam, ct, {"parotid": 0, "submandibular": 1, "larynx": 2, "mandible": 3, "overall": 4})
    """
    if isinstance(columns, Mapping):
        keys, cols = list(columns.keys()), list(columns.values())
    elif isinstance(columns, Sequence) and not isinstance(columns, str):
        keys, cols = list(columns), list(columns)
    else:
        raise TypeError(f"columns must be a mapping name -> column or a sequence of columns, got {type(columns)}")
    if not cols:
        raise ValueError("columns is empty")
    if any(isinstance(c, bool) or not isinstance(c, (int, np.integer)) or c < 0 for c in cols):
        raise ValueError(f"output columns must be non-negative integers, got {cols}")
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate column keys: {keys}")
    x, axis = _prepare_volume(volume, slice_axis, batch_size)
    device = x.device if device is None else torch.device(device)
    k = len(cols)
    total = None
    for xb in _slice_batches(x, axis, batch_size, device, progress, "AE slices"):
        b = xb.shape[0]
        rep = xb.repeat(k, *([1] * (xb.ndim - 1)))  # block j (samples j*b .. j*b+b-1) explains column j
        idx = torch.as_tensor(cols, device=xb.device).repeat_interleave(b)
        ae = attribution_energy(_call_cam(cam, rep, idx, cam_kwargs)).reshape(k, b).sum(dim=1)
        total = ae if total is None else total + ae
    values = total.cpu().tolist()
    return dict(zip(keys, values))


def cohort_energy(
    cam: Callable[..., Any],
    volumes: Mapping[Any, Any] | Iterable[tuple[Any, Any]],
    columns: Mapping[str, int] | Sequence[int],
    *,
    slice_axis: int | None = 2,
    batch_size: int = 16,
    device: str | torch.device | None = None,
    progress: bool = True,
    **cam_kwargs: Any,
) -> pd.DataFrame:
    """AE of every volume of a cohort and every column: the wide table :func:`energy_report` reads.

    Args:
        cam: a CAM object following the package contract.
        volumes: id -> volume, or (id, volume) pairs; a volume may be a tensor/array or an image path
            (read with :func:`monai_gamverify.io.files.load_image`). Volumes are loaded one at a time.
        columns: category -> output column (or a sequence of columns), see :func:`volume_energy_multi`.
        slice_axis, batch_size, device, cam_kwargs: as in :func:`volume_energy_multi`.
        progress: progress bar over volumes.

    Returns:
        DataFrame ``id, <category>...`` (one row per volume, input order).

    Example:
        >>> df = cohort_energy(cam, {"case01": "case01.nii.gz"}, {"parotid": 0, "overall": 4})
        >>> write_csv(df, "ae.csv")
    """
    from monai_gamverify.io import load_image

    items = list(volumes.items()) if isinstance(volumes, Mapping) else list(volumes)
    rows = []
    for vid, vol in tqdm(items, desc="AE volumes", disable=not progress):
        if isinstance(vol, (str, os.PathLike)):
            vol = load_image(vol)
        ae = volume_energy_multi(
            cam, vol, columns, slice_axis=slice_axis, batch_size=batch_size, device=device, progress=False, **cam_kwargs
        )
        rows.append({"id": vid, **ae})
    if not rows:
        raise ValueError("no volume given")
    return pd.DataFrame(rows)


def energy_from_maps(root: str | os.PathLike, pattern: str = "*.nii*") -> pd.DataFrame:
    """AE from raw maps saved as NIfTI: ``root/<category>/<id>.nii.gz`` (or ``root/<id>.nii.gz``: one category).

    A 2D model's slice maps are expected stacked into one volume per image; AE is the sum of all its values.

    Args:
        root: folder of maps.
        pattern: file glob inside each folder.

    Returns:
        Wide DataFrame ``id, <category>...`` (a single flat folder gives the column ``energy``).

    Example:
        >>> energy_from_maps("maps/")  # maps/parotid/case01.nii.gz ...
    """
    import nibabel as nib

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"maps folder not found: {root}")
    groups = {d.name: d for d in sorted(root.iterdir()) if d.is_dir()} or {"energy": root}
    cols: dict[str, dict[str, float]] = {}
    for cat, folder in groups.items():
        files = sorted(folder.glob(pattern))
        for f in files:
            data = np.asanyarray(nib.load(str(f)).dataobj, dtype=np.float64)
            if not np.isfinite(data).all():
                raise ValueError(f"map {f} contains NaN or infinite values")
            vid = re.sub(r"(\.nii(\.gz)?|\.[^.]+)$", "", f.name)
            cols.setdefault(cat, {})[vid] = float(data.sum())
    if not cols:
        raise ValueError(f"no map files matching {pattern!r} under {root}")
    df = pd.DataFrame(cols)
    return df.rename_axis("id").reset_index()


# --------------------------------------------------------------------------------------------------------------------
# figures and report
# --------------------------------------------------------------------------------------------------------------------


def energy_scatter_png(
    energy: Any,
    scores: Any,
    path: str | os.PathLike,
    title: str | None = None,
    *,
    ids: Sequence[Any] | None = None,
    flags: Any | None = None,
    result: SpearmanLOO | None = None,
    fit: tuple[float, float] | None = None,
) -> Path:
    """Scatter plot of AE against the score with Spearman's rho in the title; written atomically as PNG.

    Args:
        energy: AE per volume.
        scores: score per volume (x axis).
        path: output PNG.
        title: first title line (e.g. the category).
        ids: labels for flagged points.
        flags: boolean per volume (e.g. ``atypical_cases(...).flag``), drawn in red and labelled with the id.
        result: a :func:`spearman_loo` result to quote (median LOO rho/p, interval); computed when ``None``
            and at least 4 volumes are given, otherwise only ``scipy.stats.spearmanr`` is quoted.
        fit: (slope, intercept) of a line to draw, e.g. the robust fit of :func:`atypical_cases`.

    Returns:
        The written path.

    Example:
        >>> energy_scatter_png(ae, consensus, "parotid.png", "parotid")
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    e, s = _check_pair(energy, scores, min_n=3)
    flags = np.zeros(e.size, bool) if flags is None else np.asarray(flags, bool).reshape(-1)
    if flags.size != e.size:
        raise ValueError(f"flags has {flags.size} entries for {e.size} volumes")
    ids = list(range(e.size)) if ids is None else list(ids)
    if result is None and e.size >= 4:
        result = spearman_loo(e, s, n_boot=0)
    if result is not None:
        stat = f"Spearman ρ = {result.rho:.2f} (p = {result.p:.2g}), n = {result.n}"
        if math.isfinite(result.ci_low):
            stat += f", {100 * result.ci:.0f}% CI [{result.ci_low:.2f}, {result.ci_high:.2f}]"
        stat += (
            f"\nmedian LOO ρ = {result.median_rho:.2f} (p = {result.median_p:.2g}), "
            f"LOO range [{result.min_loo_rho:.2f}, {result.max_loo_rho:.2f}]"
        )
    else:
        r = stats.spearmanr(e, s)
        stat = f"Spearman ρ = {float(r.statistic):.2f} (p = {float(r.pvalue):.2g}), n = {e.size}"

    fig = Figure(figsize=(6.4, 4.8))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.scatter(s[~flags], e[~flags], s=28, c="tab:blue", label="volumes")
    if flags.any():
        ax.scatter(s[flags], e[flags], s=40, c="tab:red", marker="D", label="atypical AE")
        for i in np.flatnonzero(flags):
            ax.annotate(str(ids[i]), (s[i], e[i]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if fit is not None:
        xs = np.array([s.min(), s.max()])
        ax.plot(xs, fit[1] + fit[0] * xs, "--", c="gray", lw=1, label="Theil-Sen fit")
    if flags.any() or fit is not None:
        ax.legend(fontsize=8, loc="best")
    ax.set_xlabel("score (consensus)")
    ax.set_ylabel("attribution energy (sum of raw CAM)")
    ax.set_title(f"{title}\n{stat}" if title else stat, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)


def _read_wide_csv(path: str | os.PathLike, id_column: str, what: str) -> pd.DataFrame:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} CSV not found: {p}")
    df = pd.read_csv(p)
    if id_column not in df.columns:
        raise ValueError(f"{what} CSV {p} has no id column {id_column!r} (columns: {list(df.columns)})")
    df[id_column] = df[id_column].astype(str)
    dup = df[id_column][df[id_column].duplicated()].unique().tolist()
    if dup:
        raise ValueError(f"{what} CSV {p} repeats ids {dup[:10]}")
    return df.set_index(id_column)


def _json_safe(obj: Any) -> Any:
    """Replace NaN/inf by None so the JSON is standard."""
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def energy_report(
    energy: str | os.PathLike,
    scores: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    categories: str | Sequence[str] | None = None,
    id_column: str = "id",
    n_boot: int = 2000,
    ci: float = 0.95,
    seed: int = 0,
    alpha: float = 0.05,
    k: float = 1.5,
    plots: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """AE-vs-score analysis per category from precomputed AE: table (CSV/JSON), LOO folds, atypical cases, plots.

    Inputs are wide tables keyed by volume id: the energy CSV has ``id`` and one AE column per category (or is a
    folder of raw NIfTI maps, see :func:`energy_from_maps`); the scores CSV has ``id`` and one consensus column per
    category. Every volume with AE must have a score row; score rows without AE are ignored. Empty cells drop
    that volume from that category only (the table's ``n`` shows it). A category whose AE or scores are constant
    (or that has fewer than 3 volumes) has no Spearman rho: it is left out with a warning and listed under
    ``skipped`` (with the reason) in the result and in ``energy_table.json``; no usable category is an error.

    Written to ``out_dir``: ``energy_table.csv``, ``energy_table.json`` (table, folds, atypical cases, settings),
    ``energy_loo.csv`` (category, left-out id, rho, p), ``energy_atypical.csv`` and ``energy_scatter_<category>.png``.

    Args:
        energy: AE CSV or a folder of raw maps.
        scores: consensus-score CSV.
        out_dir: output folder.
        categories: categories to analyse (default: every column present in both tables); a comma-separated
            string is accepted.
        id_column: name of the id column in both CSVs.
        n_boot, ci, seed: bootstrap settings (:func:`spearman_loo`).
        alpha: family-wise level for Holm's flag.
        k: Tukey fence multiplier for atypical cases.
        plots: write the scatter PNGs.
        progress: progress bars.

    Returns:
        dict with the written paths, the table as records and the skipped categories (name -> reason).

    Example:
        >>> energy_report("ae.csv", "consensus.csv", "out/energy")
    """
    out = Path(out_dir)
    src = Path(energy)
    if src.is_dir():
        e_df = energy_from_maps(src).rename(columns={"id": id_column})
        e_df[id_column] = e_df[id_column].astype(str)
        e_df = e_df.set_index(id_column)
    else:
        e_df = _read_wide_csv(src, id_column, "energy")
    s_df = _read_wide_csv(scores, id_column, "scores")
    missing = sorted(set(e_df.index) - set(s_df.index))
    if missing:
        raise ValueError(f"{len(missing)} volume(s) with AE have no score row: {missing[:10]}")
    if categories is None:
        cats = [c for c in e_df.columns if c in s_df.columns]
    else:
        cats = (
            [c.strip() for c in categories.split(",")] if isinstance(categories, str) else [str(c) for c in categories]
        )
    absent = [c for c in cats if c not in e_df.columns or c not in s_df.columns]
    if absent or not cats:
        raise ValueError(
            f"categories {absent or cats} not found in both tables "
            f"(energy columns {list(e_df.columns)}, score columns {list(s_df.columns)})"
        )

    e_by, s_by, ids_by = {}, {}, {}
    for c in cats:
        pair = pd.DataFrame(
            {"e": pd.to_numeric(e_df[c], errors="coerce"), "s": pd.to_numeric(s_df[c], errors="coerce")}
        )
        pair = pair.loc[e_df.index].dropna()
        if len(pair) < len(e_df):
            logger.warning("category %r: %d volume(s) without AE or score are left out", c, len(e_df) - len(pair))
        e_by[c], s_by[c], ids_by[c] = pair["e"].to_numpy(), pair["s"].to_numpy(), pair.index.tolist()
    skipped: dict[str, str] = {}
    loo_by: dict[str, SpearmanLOO] = {}
    for c in list(cats):  # e.g. all-zero maps of one output: that category has no rho, the others still do
        try:
            loo_by[c] = spearman_loo(e_by[c], s_by[c], n_boot=0)
        except ValueError as err:
            skipped[c] = str(err)
            cats.remove(c)
            logger.warning("category %r is left out of the AE analysis: %s", c, err)
    if not cats:
        raise ValueError(f"no category can be analysed: {skipped}")
    e_by, s_by, ids_by = ({c: d[c] for c in cats} for d in (e_by, s_by, ids_by))

    table = energy_table(e_by, s_by, n_boot=n_boot, ci=ci, seed=seed, alpha=alpha, progress=progress)
    loo_rows, atyp, written = [], [], {}
    for c in cats:
        res = loo_by[c]
        loo_rows += [
            {"category": c, "left_out": i, "loo_rho": r, "loo_p": p}
            for i, r, p in zip(ids_by[c], res.loo_rho, res.loo_p)
        ]
        cases = atypical_cases(e_by[c], s_by[c], ids_by[c], k=k)
        cases.insert(0, "category", c)
        atyp.append(cases)
        if plots:
            row = table.set_index("category").loc[c]
            res_ci = SpearmanLOO(**{**asdict(res), "ci_low": row.ci_low, "ci_high": row.ci_high, "ci": ci})
            name = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(c))
            written[f"scatter_{c}"] = energy_scatter_png(
                e_by[c],
                s_by[c],
                out / f"energy_scatter_{name}.png",
                str(c),
                ids=ids_by[c],
                flags=cases.flag,
                result=res_ci,
                fit=(cases.attrs["slope"], cases.attrs["intercept"]),
            )
    loo_df, atyp_df = pd.DataFrame(loo_rows), pd.concat(atyp, ignore_index=True)
    written["table_csv"] = write_csv(table, out / "energy_table.csv")
    written["loo_csv"] = write_csv(loo_df, out / "energy_loo.csv")
    written["atypical_csv"] = write_csv(atyp_df, out / "energy_atypical.csv")
    summary = {
        "table": table.to_dict(orient="records"),
        "folds": loo_df.to_dict(orient="records"),
        "atypical": atyp_df[atyp_df.flag].to_dict(orient="records"),
        "skipped": skipped,
        "settings": {
            "n_boot": n_boot,
            "ci": ci,
            "seed": seed,
            "alpha": alpha,
            "k": k,
            "energy": str(src),
            "scores": str(scores),
        },
    }
    written["table_json"] = write_json(_json_safe(summary), out / "energy_table.json")
    return {
        "paths": {key: str(v) for key, v in written.items()},
        "table": _json_safe(summary["table"]),
        "skipped": skipped,
    }
