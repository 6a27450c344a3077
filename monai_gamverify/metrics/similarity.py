"""Similarity features between attention maps (Method 1 and 2 of the verification study), batched in torch.

The seven features of the study (``DEFAULT_METRICS``) follow the contract in ``DESIGN.md``: each equals its
scikit-image / scipy / numpy reference on the same 2D slice or 3D volume, but all pairs of a batch are computed at
once, with float64 accumulation, on the maps' device. ``spatial_wasserstein`` is an extra feature that, unlike the
value-distribution ``wasserstein``, sees *where* the attention lies.
"""

# long module: the similarity features share one validation, chunking and reference-statistics cache
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

__all__ = [
    "DEFAULT_METRICS",
    "EXTRA_METRICS",
    "ALL_METRICS",
    "SSIM_WIN_SIZE",
    "KL_EPS",
    "BYTES_PER_VOXEL",
    "similarity_metrics",
]

DEFAULT_METRICS: tuple[str, ...] = ("iou", "dice", "ssim", "cosine", "pearson", "kl", "wasserstein")
EXTRA_METRICS: tuple[str, ...] = ("spatial_wasserstein",)
ALL_METRICS: tuple[str, ...] = DEFAULT_METRICS + EXTRA_METRICS

SSIM_WIN_SIZE = 7  # scikit-image's default uniform window
KL_EPS = 1e-8  # added to every voxel before the maps are turned into distributions

_SSIM_C1 = (0.01 * 1.0) ** 2  # skimage K1 = 0.01, data_range = 1
_SSIM_C2 = (0.03 * 1.0) ** 2  # skimage K2 = 0.03
_UNIT_RANGE = frozenset({"ssim", "kl", "spatial_wasserstein"})  # metrics whose definition assumes values in [0, 1]
_NEEDS_SORT = frozenset({"iou", "dice", "wasserstein"})
_NEEDS_DIST = frozenset({"kl", "spatial_wasserstein"})
_CHUNK_ELEMENTS = 1 << 13  # default voxels per chunk (at least one slice): about the working set of the reference loop
# Bytes of temporaries alive per voxel of a chunk (float64 copies, sorted values, masks, centred values, weights and
# their logs for both maps, the stacked SSIM window sums): an estimate that turns ``max_memory_mb`` into a chunk
# size. Check: chunks of 65536 voxels of 64^3 maps peaked at 11.2 MiB above the baseline RSS (65536 x 160 B = 10 MiB).
BYTES_PER_VOXEL = 160


def similarity_metrics(
    a: torch.Tensor | np.ndarray,
    b: torch.Tensor | np.ndarray,
    slice_axis: int | None = None,
    metrics: Sequence[str] | str | None = None,
    *,
    max_memory_mb: float | None = None,
) -> dict[str, torch.Tensor]:
    """Similarity features between maps ``a`` and reference maps ``b``, one value per sample.

    Definitions (each on one 2D slice, when ``slice_axis`` is given, or on the whole map otherwise):

    - ``iou``, ``dice``: each map binarised as ``map > median(map)`` (``np.median``: the mean of the two middle
      values for an even count); two empty masks count as identical (1.0).
    - ``ssim``: ``skimage.metrics.structural_similarity(a, b, data_range=1.0)`` with its defaults (7-wide uniform
      window, K1 = 0.01, K2 = 0.03, sample covariance, mean over the windows that lie inside the map).
    - ``cosine``, ``pearson``: on the flattened maps; an all-zero map (cosine) or a constant map (pearson) gives 0.
    - ``kl``: ``scipy.stats.entropy(p, q)`` with ``p = (a + 1e-8) / sum(a + 1e-8)`` and ``q`` likewise from ``b``.
    - ``wasserstein``: ``scipy.stats.wasserstein_distance`` of the two flattened value sets (the mean absolute
      difference of the sorted values).
    - ``spatial_wasserstein`` (extra, not in ``DEFAULT_METRICS``): the earth mover's distance between the two maps
      as spatial distributions (``(map + 1e-8)`` normalised to sum 1), computed on the marginal of each spatial axis
      with voxel positions scaled to [0, 1] (position ``i / (L - 1)`` on an axis of length ``L``) and averaged over
      the axes; 0 = same place, 1 = all mass at opposite ends.

    The results are not differentiable (thresholds and sorting) and are computed without autograd.

    Args:
        a: maps of shape (B, 1, H, W) or (B, 1, D, H, W), finite; values in [0, 1] when ``ssim``, ``kl`` or
            ``spatial_wasserstein`` is requested. A torch tensor (any device; MONAI ``MetaTensor`` included) or a
            numpy array.
        b: reference maps, the same shape as ``a`` or with B = 1 (one reference broadcast against every map of
            ``a``); on ``a``'s device.
        slice_axis: ``None`` compares whole maps (2D images or 3D volumes); ``k`` (3D maps only) computes every
            metric on each 2D slice along spatial axis ``k`` (0 = first spatial axis, negative counts from the end)
            and averages over the slices.
        metrics: names to compute, in the order wanted, from ``ALL_METRICS``; ``None`` gives ``DEFAULT_METRICS``.
        max_memory_mb: budget for the working memory (beyond the inputs) in MiB. Slices, or the planes of a whole
            map, are streamed in chunks of ``max_memory_mb * 2**20 / BYTES_PER_VOXEL`` voxels (at least one slice
            or plane); ``None`` uses chunks of 8192 voxels (about 1.3 MiB; at least one slice, and at least 8
            planes of a streamed whole map). A whole map larger than one chunk also needs its sorted values (4 bytes
            per voxel of each float32 map) when ``iou``, ``dice`` or ``wasserstein`` is asked for. The values do not
            depend on the chunk size (up to float64 summation order).

    Returns:
        dict name -> float64 tensor of shape (B,) on ``a``'s device, in the order of ``metrics``.

    Raises:
        TypeError: ``a``/``b`` not a tensor or array, or of a non-real dtype; ``slice_axis`` not an int.
        ValueError: wrong number of dimensions, channel count other than 1, shapes that do not match (other than
            the B = 1 broadcast), different devices, NaN/inf, values outside [0, 1] for the metrics that assume
            them, unknown metric names, or maps (slices) smaller than the 7-wide SSIM window when ``ssim`` is asked
            for (as in scikit-image; no fallback).

    Example:
        >>> a = torch.rand(4, 1, 32, 32, 32)
        >>> ref = a.mean(0, keepdim=True)
        >>> feats = similarity_metrics(a, ref, slice_axis=0)
        >>> feats["ssim"].shape
        torch.Size([4])
    """
    names = _check_metrics(metrics)
    a = _as_tensor(a, "a")
    b = _as_tensor(b, "b")
    _check_shapes(a, b)
    n_spatial = a.ndim - 2
    axis = _check_slice_axis(slice_axis, n_spatial)
    for x, label in ((a, "a"), (b, "b")):
        _check_values(x, label, names)

    # one "item" = one 2D slice or one whole map: (B, S, *dims) with S slices per map (S = 1 without slicing)
    items_a, items_b = _to_items(a, axis), _to_items(b, axis)
    dims = tuple(items_a.shape[2:])
    if "ssim" in names and min(dims) < SSIM_WIN_SIZE:
        raise ValueError(
            f"ssim needs every {'slice' if axis is not None else 'map'} dimension >= {SSIM_WIN_SIZE} (the window of "
            f"skimage.metrics.structural_similarity), got {dims}; drop 'ssim' from metrics or use larger maps."
        )

    chunk = _chunk_voxels(max_memory_mb)
    with torch.no_grad():
        if axis is None and items_a[0, 0].numel() > chunk:
            # one map is larger than a chunk: stream its planes, whole-map statistics accumulated across chunks;
            # by default at least 8 planes, so the SSIM windows along the streamed axis rarely straddle chunks
            return _stream_maps(items_a, items_b, names, chunk, min_planes=8 if max_memory_mb is None else 1)
        n_batch, n_slices = items_a.shape[:2]
        # chunks of whole maps, or of slices of one map: memory stays bounded even for one large volume
        per_chunk = max(1, chunk // max(1, items_a[0, 0].numel()))
        slice_chunk = min(n_slices, per_chunk)
        batch_chunk = max(1, per_chunk // slice_chunk)
        one_ref = items_b.shape[0] == 1  # one reference for every map: its statistics once (and across calls)
        totals = torch.zeros(len(names), n_batch, dtype=torch.float64, device=a.device)
        for s0 in range(0, n_slices, slice_chunk):
            s1 = min(n_slices, s0 + slice_chunk)
            stats_b = _reference_cached(_map_stats, items_b[:, s0:s1], names) if one_ref else None
            for b0 in range(0, n_batch, batch_chunk):
                b1 = min(n_batch, b0 + batch_chunk)
                stats_a = _map_stats(items_a[b0:b1, s0:s1], names)
                sb = stats_b if one_ref else _map_stats(items_b[b0:b1, s0:s1], names)
                values = _pair_metrics(stats_a, sb, names)
                totals[:, b0:b1] += torch.stack([values[name] for name in names]).sum(dim=2)  # one op per chunk
    return {name: totals[j] / n_slices for j, name in enumerate(names)}


def _chunk_voxels(max_memory_mb: float | None) -> int:
    if max_memory_mb is None:
        return _CHUNK_ELEMENTS
    if isinstance(max_memory_mb, bool) or not isinstance(max_memory_mb, (int, float)) or not max_memory_mb > 0:
        raise ValueError(f"max_memory_mb must be a positive number, got {max_memory_mb!r}.")
    return max(1, int(max_memory_mb * 2**20 / BYTES_PER_VOXEL))


def _check_metrics(metrics: Sequence[str] | str | None) -> tuple[str, ...]:
    if metrics is None:
        return DEFAULT_METRICS
    if isinstance(metrics, str):
        metrics = [metrics]
    names = tuple(dict.fromkeys(metrics))  # de-duplicate, keep order
    if not names:
        raise ValueError(f"metrics must name at least one of {list(ALL_METRICS)}.")
    unknown = [m for m in names if m not in ALL_METRICS]
    if unknown:
        raise ValueError(f"unknown metric name(s) {unknown}; valid names are {list(ALL_METRICS)}.")
    return names


def _as_tensor(x: Any, label: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{label} must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}.")
    x = x.detach().as_subclass(torch.Tensor)  # MetaTensor bookkeeping would only slow every op down
    if x.is_complex():
        raise TypeError(f"{label} must be real-valued, got dtype {x.dtype}.")
    if not x.is_floating_point() or x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()  # binary masks and half precision maps are compared in float32
    return x


def _check_shapes(a: torch.Tensor, b: torch.Tensor) -> None:
    for x, label in ((a, "a"), (b, "b")):
        if x.ndim not in (4, 5):
            raise ValueError(f"{label} must have shape (B, 1, H, W) or (B, 1, D, H, W), got {tuple(x.shape)}.")
        if x.shape[1] != 1:
            raise ValueError(f"{label} must have one channel, got shape {tuple(x.shape)}.")
        if x.numel() == 0:
            raise ValueError(f"{label} is empty (shape {tuple(x.shape)}).")
    if a.shape[1:] != b.shape[1:] or b.shape[0] not in (1, a.shape[0]):
        raise ValueError(
            f"a and b must have the same shape, or b batch size 1 to broadcast one reference map; "
            f"got a {tuple(a.shape)} and b {tuple(b.shape)}."
        )
    if a.device != b.device:
        raise ValueError(f"a and b must be on the same device, got {a.device} and {b.device}.")


def _check_slice_axis(slice_axis: int | None, n_spatial: int) -> int | None:
    if slice_axis is None:
        return None
    if isinstance(slice_axis, bool) or not isinstance(slice_axis, (int, np.integer)):
        raise TypeError(f"slice_axis must be None or an int, got {type(slice_axis).__name__}.")
    if n_spatial != 3:
        raise ValueError(f"slice_axis needs 3D maps (B, 1, D, H, W), got {n_spatial} spatial dimension(s).")
    if not -n_spatial <= slice_axis < n_spatial:
        raise ValueError(f"slice_axis must be in [{-n_spatial}, {n_spatial - 1}], got {slice_axis}.")
    return int(slice_axis) % n_spatial


def _check_values(x: torch.Tensor, label: str, names: tuple[str, ...]) -> None:
    # min and max propagate NaN and are infinite iff some value is: one pass, no temporary of the map's size
    lo, hi = torch.aminmax(x)
    if not (bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))):
        raise ValueError(f"{label} contains NaN or inf.")
    needs_unit = sorted(_UNIT_RANGE.intersection(names))
    if needs_unit:
        if lo < 0 or hi > 1:
            raise ValueError(
                f"{label} has values in [{float(lo):.6g}, {float(hi):.6g}] but {needs_unit} assume maps in [0, 1]; "
                "normalise the maps (e.g. GradCAM(..., normalize=True))."
            )


def _to_items(x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """(B, 1, *spatial) -> (B, S, *dims): whole maps (S = 1) or 2D slices along ``axis``."""
    x = x[:, 0]
    if axis is None:
        return x.unsqueeze(1)
    return x.movedim(1 + axis, 1)


def _box_sum_axis(t: torch.Tensor, axis: int, win: int = SSIM_WIN_SIZE) -> torch.Tensor:
    """Sum over every ``win``-wide window lying inside axis ``axis`` of ``t`` (length ``L`` -> ``L - win + 1``).

    ``win - 1`` shifted in-place additions: O(win) per voxel whatever the axis length, exact to float64 rounding of
    a 7-term sum, and no cumulative sum whose rounding grows with the axis length.
    """
    length = t.shape[axis]
    out = t.narrow(axis, 0, length - win + 1).clone()
    for j in range(1, win):
        out += t.narrow(axis, j, length - win + 1)
    return out


def _box_mean_valid(t: torch.Tensor, ndim: int, win: int = SSIM_WIN_SIZE) -> torch.Tensor:
    """Mean over every ``win``-wide window lying inside the last ``ndim`` (1 to 3) axes, separably.

    Equals ``scipy.ndimage.uniform_filter(t, win)`` cropped by ``(win - 1) // 2`` on each side, which is the region
    scikit-image averages.
    """
    out = t
    for k in range(ndim):
        out = _box_sum_axis(out, t.ndim - ndim + k, win)
    return out / float(win**ndim)


def _n_windows(dims: Sequence[int]) -> int:
    count = 1
    for d in dims:
        count *= d - SSIM_WIN_SIZE + 1
    return count


def _ssim_sum(
    mx: torch.Tensor, my: torch.Tensor, mxx: torch.Tensor, myy: torch.Tensor, mxy: torch.Tensor, ndim: int
) -> torch.Tensor:
    """Local SSIM values from the five window means (scikit-image's formula), summed over the last ``ndim`` axes."""
    n_win = SSIM_WIN_SIZE**ndim
    cov_norm = n_win / (n_win - 1)  # skimage's default sample covariance: N / (N - 1)
    mu_xy = mx * my
    mu_x2 = mx * mx
    mu_y2 = my * my
    # in-place steps: the SSIM map is the largest temporary of all metrics
    num = (2 * mu_xy + _SSIM_C1).mul_(mxy.sub(mu_xy).mul_(2 * cov_norm).add_(_SSIM_C2))
    den = (mu_x2 + mu_y2).add_(_SSIM_C1).mul_((mxx - mu_x2).add_(myy - mu_y2).mul_(cov_norm).add_(_SSIM_C2))
    return num.div_(den).flatten(-ndim).sum(-1)


def _sort_last(x: torch.Tensor) -> torch.Tensor:
    """Values of ``x`` sorted along the last axis, on ``x``'s device.

    On CPU, ``numpy.sort`` (SIMD sorting networks, values only) is >10x faster than ``torch.sort``, which also
    builds the index tensor; the tensor <-> array conversions share memory.
    """
    if x.device.type == "cpu":
        return torch.from_numpy(np.sort(x.contiguous().numpy(), axis=-1))
    return x.sort(dim=-1).values


def _dot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Sum of ``x * y`` over the last axis of (B, S, n) tensors, ``y`` possibly with B = 1.

    ``einsum`` lowers this to a batched matrix product: no full-size temporary, 2-3x faster on CPU than
    ``(x * y).sum(-1)`` or ``torch.linalg.vecdot``.
    """
    if y.shape[0] == 1 and x.shape[0] != 1:
        return torch.einsum("bsn,sn->bs", x, y[0])
    return torch.einsum("bsn,bsn->bs", x, y)


def _map_stats(items: torch.Tensor, names: tuple[str, ...]) -> dict[str, Any]:
    """Everything that depends on one side only, so a broadcast reference is prepared once."""
    n_batch, n_slices = items.shape[:2]
    dims = tuple(items.shape[2:])
    flat = items.reshape(n_batch, n_slices, -1)
    n = flat.shape[-1]
    x64 = flat.double()
    st: dict[str, Any] = {"x64": x64, "dims": dims}
    if _NEEDS_SORT.intersection(names):
        # sort in the input precision: the median then rounds exactly like np.median on the same array
        sorted_vals = _sort_last(flat)
        if n % 2:
            median = sorted_vals[..., n // 2]
        else:
            median = (sorted_vals[..., n // 2 - 1] + sorted_vals[..., n // 2]) / 2
        st["sorted"] = sorted_vals
        st["mask"] = flat > median.unsqueeze(-1)
        st["count"] = st["mask"].sum(-1, dtype=torch.float64)
    if "cosine" in names:
        st["norm"] = _dot(x64, x64).sqrt()
    if "pearson" in names:
        if "sorted" in st:  # the extremes are already at hand
            lo, hi = st["sorted"][..., 0], st["sorted"][..., -1]
        else:
            lo, hi = torch.aminmax(flat, dim=-1)
        centred = x64 - x64.mean(-1, keepdim=True)
        st["centred"] = centred
        st["cnorm"] = _dot(centred, centred).sqrt()
        st["constant"] = lo == hi  # exact test: a rounded mean would leave ~1e-17 noise to correlate
    if _NEEDS_DIST.intersection(names):
        weights = x64 + KL_EPS
        st["weights"] = weights
        st["wsum"] = weights.sum(-1)
    if "kl" in names:
        st["logw"] = st["weights"].log()
        st["self_info"] = _dot(st["weights"], st["logw"])  # sum w log w
    if "spatial_wasserstein" in names:
        w = st["weights"].reshape(n_batch, n_slices, *dims)
        cdfs = []
        for k in range(len(dims)):
            other = tuple(2 + j for j in range(len(dims)) if j != k)
            marginal = w.sum(dim=other) if other else w
            cdf = marginal.cumsum(-1) / st["wsum"].unsqueeze(-1)
            cdfs.append(cdf[..., :-1])  # the last value is 1 on both sides
        st["cdfs"] = cdfs
    if "ssim" in names:
        st["vol"] = x64.reshape(n_batch, n_slices, *dims)
    return st


def _safe_div(num: torch.Tensor, den: torch.Tensor, fill: float) -> torch.Tensor:
    # the quotient of a zero denominator (inf/NaN) is computed but never selected
    return torch.where(den > 0, num / den, fill)


def _pair_metrics(sa: dict[str, Any], sb: dict[str, Any], names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Per-item values (B, S) of every requested metric; ``sb`` may have batch size 1 (broadcast)."""
    out: dict[str, torch.Tensor] = {}
    if "iou" in names or "dice" in names:
        inter = (sa["mask"] & sb["mask"]).sum(-1, dtype=torch.float64)
        total = sa["count"] + sb["count"]
        if "iou" in names:
            out["iou"] = _safe_div(inter, total - inter, 1.0)  # empty union: two empty masks are identical
        if "dice" in names:
            out["dice"] = _safe_div(2 * inter, total, 1.0)
    if "ssim" in names:
        # the five window means of both maps in one stacked, separable box filter: few large ops per chunk
        ndim = len(sa["dims"])
        va, vb = sa["vol"], sb["vol"].expand_as(sa["vol"])
        means = _box_mean_valid(torch.stack((va, vb, va * va, vb * vb, va * vb)), ndim)
        out["ssim"] = _ssim_sum(*means, ndim=ndim) / _n_windows(sa["dims"])
    if "cosine" in names:
        out["cosine"] = _safe_div(_dot(sa["x64"], sb["x64"]), sa["norm"] * sb["norm"], 0.0)
    if "pearson" in names:
        value = _safe_div(_dot(sa["centred"], sb["centred"]), sa["cnorm"] * sb["cnorm"], 0.0)
        out["pearson"] = torch.where(sa["constant"] | sb["constant"], torch.zeros_like(value), value)
    if "kl" in names:
        # sum p log(p / q) = (sum wa log wa - sum wa log wb) / Sa - log Sa + log Sb, with w = map + eps, S = sum w
        cross = sa["self_info"] - _dot(sa["weights"], sb["logw"])
        out["kl"] = cross / sa["wsum"] - sa["wsum"].log() + sb["wsum"].log()
    if "wasserstein" in names:
        # the float32 difference of two float32 values is within 2**-24 relative; the sum is in float64
        gap = (sa["sorted"] - sb["sorted"]).abs_()
        out["wasserstein"] = gap.sum(-1, dtype=torch.float64) / gap.shape[-1]
    if "spatial_wasserstein" in names:
        per_axis = []
        for cdf_a, cdf_b in zip(sa["cdfs"], sb["cdfs"]):
            length = cdf_a.shape[-1] + 1
            emd = (cdf_a - cdf_b).abs().sum(-1)
            per_axis.append(emd / (length - 1) if length > 1 else torch.zeros_like(emd))
        out["spatial_wasserstein"] = torch.stack(per_axis).mean(0)
    return {name: out[name] for name in names}


# ---------------------------------------------------------------------------------------------- streamed whole maps
def _median(sorted_vals: torch.Tensor) -> torch.Tensor:
    """``np.median`` of sorted values along the last axis, in their precision (the mean of the middle two if even)."""
    n = sorted_vals.shape[-1]
    if n % 2:
        return sorted_vals[..., n // 2]
    return (sorted_vals[..., n // 2 - 1] + sorted_vals[..., n // 2]) / 2


def _map_globals(x: torch.Tensor, names: tuple[str, ...], planes: int) -> dict[str, Any]:
    """Statistics of one whole map ``x`` (*dims) that the streamed pass needs up front, in chunks of ``planes``."""
    st: dict[str, Any] = {"n": x.numel()}
    if _NEEDS_SORT.intersection(names):
        st["sorted"] = _sort_last(x.reshape(-1))  # the map's precision (4 bytes per voxel for float32)
        st["median"] = _median(st["sorted"])
    if "pearson" in names or _NEEDS_DIST.intersection(names):
        total = torch.zeros((), dtype=torch.float64, device=x.device)
        for p0 in range(0, x.shape[0], planes):
            total += x[p0 : p0 + planes].sum(dtype=torch.float64)
        st["mean"] = total / st["n"]
        st["wsum"] = total + st["n"] * KL_EPS  # sum(map + eps)
    if "pearson" in names:
        lo, hi = (st["sorted"][0], st["sorted"][-1]) if "sorted" in st else torch.aminmax(x)
        st["constant"] = bool(lo == hi)
    return st


#: per statistics function, the last reference's: (key, the tensor itself, statistics)
_REFERENCE_CACHE: dict[str, tuple[tuple, torch.Tensor, dict[str, Any]]] = {}


def _reference_cached(stats: Any, y: torch.Tensor, *args: Any) -> dict[str, Any]:
    """``stats(y, *args)`` (:func:`_map_stats`, :func:`_map_globals`) of a reference map compared with many maps, one
    call after another (an engine's reference, a server's requests): computed once (its sort above all), not once
    per call. The cache holds the tensor itself, so its memory cannot be reused by another tensor while cached; an
    in-place change bumps its version."""
    key = (y.data_ptr(), y._version, tuple(y.shape), tuple(y.stride()), y.dtype, y.device, *args)
    hit = _REFERENCE_CACHE.get(stats.__name__)
    if hit is not None and hit[0] == key:
        return hit[2]
    st = stats(y, *args)
    _REFERENCE_CACHE[stats.__name__] = (key, y, st)  # one item assignment: atomic for threads
    return st


def _stream_maps(
    items_a: torch.Tensor, items_b: torch.Tensor, names: tuple[str, ...], chunk: int, min_planes: int = 1
) -> dict[str, torch.Tensor]:
    """Metrics of whole maps (B, 1, *dims) streamed along the first map axis in chunks of about ``chunk`` voxels.

    Per map only its sorted values (when a rank metric is asked for) are held whole; every other quantity is a sum
    over chunks of planes: mask counts, dot products, KL terms, marginals, and SSIM, whose window means along the
    streamed axis reuse the last ``SSIM_WIN_SIZE - 1`` in-plane window sums of the previous chunk.
    """
    n_batch = items_a.shape[0]
    plane = max(1, items_a[0, 0, 0].numel())
    planes = max(1, chunk // plane, min_planes)
    broadcast = items_b.shape[0] == 1
    glob_b = _reference_cached(_map_globals, items_b[0, 0], names, planes) if broadcast else None
    out = {name: torch.empty(n_batch, dtype=torch.float64, device=items_a.device) for name in names}
    for i in range(n_batch):
        x, y = items_a[i, 0], items_b[0 if broadcast else i, 0]
        ga = _map_globals(x, names, planes)
        gb = glob_b if broadcast else _map_globals(y, names, planes)
        for name, value in _stream_pair(x, y, ga, gb, names, planes, chunk).items():
            out[name][i] = value
        del ga  # the sorted copy of this map goes before the next one is made
    return {name: out[name] for name in names}


def _stream_pair(
    x: torch.Tensor,
    y: torch.Tensor,
    ga: dict[str, Any],
    gb: dict[str, Any],
    names: tuple[str, ...],
    planes: int,
    chunk: int,
) -> dict[str, torch.Tensor]:
    """All metrics of one pair of whole maps (*dims), one pass over chunks of ``planes`` planes."""
    ndim = x.ndim
    zero = torch.zeros((), dtype=torch.float64, device=x.device)
    acc: dict[str, torch.Tensor] = {}

    def add(key: str, value: torch.Tensor) -> None:
        acc[key] = acc.get(key, zero) + value

    rank = "iou" in names or "dice" in names
    # per-axis marginals of (map + eps): the first axis plane by plane, the others summed over chunks
    first_a: list[torch.Tensor] = []
    first_b: list[torch.Tensor] = []
    rest_a = [torch.zeros(d, dtype=torch.float64, device=x.device) for d in x.shape[1:]]
    rest_b = [torch.zeros(d, dtype=torch.float64, device=x.device) for d in x.shape[1:]]
    carry: torch.Tensor | None = None  # in-plane window sums of the last SSIM_WIN_SIZE - 1 planes
    for p0 in range(0, x.shape[0], planes):
        xs, ys = x[p0 : p0 + planes], y[p0 : p0 + planes]
        x64, y64 = xs.double(), ys.double()
        if rank:
            mx, my = xs > ga["median"], ys > gb["median"]
            add("inter", (mx & my).sum(dtype=torch.float64))
            add("count_a", mx.sum(dtype=torch.float64))
            add("count_b", my.sum(dtype=torch.float64))
        if "cosine" in names:
            add("ab", (x64 * y64).sum())
            add("aa", (x64 * x64).sum())
            add("bb", (y64 * y64).sum())
        if "pearson" in names:
            ca, cb = x64 - ga["mean"], y64 - gb["mean"]
            add("cab", (ca * cb).sum())
            add("caa", (ca * ca).sum())
            add("cbb", (cb * cb).sum())
        if _NEEDS_DIST.intersection(names):
            wa = x64 + KL_EPS
            if "kl" in names:
                wb = y64 + KL_EPS
                log_a = wa.log()
                add("self_info", (wa * log_a).sum())
                add("cross", (wa * wb.log_()).sum())
            if "spatial_wasserstein" in names:
                for w, first, rest in ((wa, first_a, rest_a), (y64 + KL_EPS, first_b, rest_b)):
                    first.append(w.flatten(1).sum(-1))
                    for k in range(1, ndim):
                        rest[k - 1] += w.sum(dim=tuple(j for j in range(ndim) if j != k))
        if "ssim" in names:
            q = torch.stack((x64, y64, x64 * x64, y64 * y64, x64 * y64))  # (5, planes, *rest)
            for axis in range(2, q.ndim):  # in-plane window sums, valid region only
                q = _box_sum_axis(q, axis)
            if carry is not None:
                q = torch.cat((carry, q), dim=1)
            if q.shape[1] >= SSIM_WIN_SIZE:
                means = _box_sum_axis(q, 1) / float(SSIM_WIN_SIZE**ndim)
                add("ssim", _ssim_sum(*means, ndim=ndim).sum())
            carry = q[:, -(SSIM_WIN_SIZE - 1) :].clone()
    n = ga["n"]
    res: dict[str, torch.Tensor] = {}
    if rank:
        inter, total = acc["inter"], acc["count_a"] + acc["count_b"]
        res["iou"] = _safe_div(inter, total - inter, 1.0)
        res["dice"] = _safe_div(2 * inter, total, 1.0)
    if "ssim" in names:
        res["ssim"] = acc["ssim"] / _n_windows(x.shape)
    if "cosine" in names:
        res["cosine"] = _safe_div(acc["ab"], acc["aa"].sqrt() * acc["bb"].sqrt(), 0.0)
    if "pearson" in names:
        value = _safe_div(acc["cab"], acc["caa"].sqrt() * acc["cbb"].sqrt(), 0.0)
        res["pearson"] = zero if ga["constant"] or gb["constant"] else value
    if "kl" in names:
        res["kl"] = (acc["self_info"] - acc["cross"]) / ga["wsum"] - ga["wsum"].log() + gb["wsum"].log()
    if "wasserstein" in names:
        gap = zero
        sa, sb = ga["sorted"], gb["sorted"]
        for v0 in range(0, n, chunk):
            gap = gap + (sa[v0 : v0 + chunk] - sb[v0 : v0 + chunk]).abs_().sum(dtype=torch.float64)
        res["wasserstein"] = gap / n
    if "spatial_wasserstein" in names:
        per_axis = []
        for ma, mb in zip([torch.cat(first_a), *rest_a], [torch.cat(first_b), *rest_b]):
            cdf_a = ma.cumsum(-1)[:-1] / ga["wsum"]
            cdf_b = mb.cumsum(-1)[:-1] / gb["wsum"]
            length = ma.shape[-1]
            emd = (cdf_a - cdf_b).abs().sum()
            per_axis.append(emd / (length - 1) if length > 1 else torch.zeros_like(emd))
        res["spatial_wasserstein"] = torch.stack(per_axis).mean()
    return {name: res[name] for name in names}
