"""A map in words: extent, anatomical location (from the affine), shape, peak intensity and boundary."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import torch

from monai_gamverify.io import affine_of
from monai_gamverify.utils import plain_tensor

__all__ = ["describe_map", "describe_maps", "region_properties"]

# RAS+ world axes (NIfTI, MONAI's default): the negative / positive direction of x, y, z
_TERMS = (("left", "right"), ("posterior", "anterior"), ("inferior", "superior"))
# the centroid must be this fraction of the field of view away from the centre to get a side
_OFF_CENTRE = 0.1
# sqrt of the eigenvalue ratio from which a region is called elongated (or flat)
_ELONGATED = 2.0
# face-counted surface relative to a digitised sphere/disc of equal size from which a boundary is irregular
_IRREGULAR = 1.5
# a digitised sphere's face count overestimates its area by 3/2 (sum of projections), a disc's perimeter by 4/pi
_DIGITAL_FACTOR = {2: 4 / np.pi, 3: 1.5}


def _single_map(m: Any) -> np.ndarray:
    arr = m.detach().cpu().double().numpy() if isinstance(m, torch.Tensor) else np.asarray(m, dtype=np.float64)
    while arr.ndim > 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim == 3 and arr.shape[0] == 1:  # (1, H, W) channel-first 2D map
        arr = arr[0]
    if arr.ndim not in (2, 3):
        raise ValueError(f"describe_map expects one map of shape (*spatial) or (1, *spatial), got {np.shape(m)}")
    if not np.isfinite(arr).all():
        raise ValueError("the map contains NaN or infinite values")
    return arr


def _join(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def region_properties(map: Any, affine: Any = None, threshold: float = 0.5) -> dict[str, Any]:
    """Numbers behind :func:`describe_map` for the region ``map >= threshold * max(map)``.

    Args:
        map: one map, (*spatial) or (1, *spatial), 2D or 3D (a MetaTensor brings its affine).
        affine: voxel → RAS world (mm) affine, 4x4 (3x3 for 2D); default the map's own affine, else identity.
        threshold: fraction of the peak that defines the region, in (0, 1].

    Returns:
        dict with ``ndim``, ``peak``, ``peak_voxel``, ``fraction`` (of the image), ``size_mm`` (mm² or mm³),
        ``components``, ``centroid_offset_mm`` (RAS, from the image centre), ``fov_mm``, ``elongation``
        (sqrt of largest/smallest covariance eigenvalue), ``flatness`` (3D: sqrt of middle/smallest),
        ``surface_ratio`` (face-counted boundary over that of a digitised sphere/disc of equal size) and ``mean``
        (inside the region); an empty or flat map gives ``fraction = 0`` and no shape entries.
    """
    from scipy import ndimage

    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    arr = _single_map(map)
    aff = affine_of(affine if affine is not None else getattr(map, "affine", None))
    nd = arr.ndim
    peak = float(arr.max())
    peak_voxel = tuple(int(i) for i in np.unravel_index(arr.argmax(), arr.shape))
    props: dict[str, Any] = {"ndim": nd, "peak": peak, "peak_voxel": peak_voxel}
    if peak <= 0 or peak == float(arr.min()):
        props.update(fraction=0.0, size_mm=0.0, components=0)
        return props
    region = arr >= threshold * peak
    lin = aff[:3, :nd]  # voxel axis -> world mm
    spacing = np.linalg.norm(lin, axis=0)
    coords = np.argwhere(region).astype(np.float64)
    world = coords @ lin.T + aff[:3, 3]
    shape = np.asarray(arr.shape, dtype=np.float64)
    centre = lin @ ((shape - 1) / 2) + aff[:3, 3]
    corners = np.array([lin @ np.asarray(c, dtype=np.float64) for c in itertools.product(*[(0, s - 1) for s in shape])])
    # covariance of the region in mm, each voxel a uniform box (var s^2/12): a single voxel is round, not a point
    cov = np.cov(world.T, bias=True) if len(world) > 1 else np.zeros((3, 3))
    cov = cov + lin @ np.diag(np.full(nd, 1 / 12)) @ lin.T
    eig = np.sort(np.linalg.eigvalsh(cov))[::-1][:nd]  # a 2D image spans only nd world directions
    eig = np.clip(eig, 1e-12, None)
    # boundary faces (padding counts the image border as outside), each weighted by its area in mm
    padded = np.pad(region, 1)
    surface = 0.0
    for ax in range(nd):
        faces = np.count_nonzero(np.diff(padded, axis=ax))
        surface += faces * float(np.prod(np.delete(spacing, ax)))
    size = float(region.sum() * np.prod(spacing))
    if nd == 3:
        ideal = (36 * np.pi * size**2) ** (1 / 3)
    else:
        ideal = 2 * np.sqrt(np.pi * size)
    props.update(
        fraction=float(region.mean()),
        size_mm=size,
        components=int(ndimage.label(region, structure=np.ones((3,) * nd))[1]),
        centroid_offset_mm=world.mean(0) - centre,
        fov_mm=np.ptp(corners, axis=0),
        elongation=float(np.sqrt(eig[0] / eig[-1])),
        flatness=float(np.sqrt(eig[1] / eig[2])) if nd == 3 else 1.0,
        surface_ratio=float(surface / (_DIGITAL_FACTOR[nd] * ideal)),
        mean=float(arr[region].mean()),
    )
    return props


def describe_map(map: Any, affine: Any = None, threshold: float = 0.5) -> str:
    """One or two sentences on the region a map highlights, for a clinician.

    The region is ``map >= threshold * max(map)``. Location is the region's centroid in RAS world coordinates
    (NIfTI / MONAI convention: +x right, +y anterior, +z superior) relative to the image centre, so left/right are
    the patient's; an axis is named when the offset exceeds 10 % of the field of view. Shape: ``elongated`` when
    the square root of the largest/smallest eigenvalue of the region's covariance (in mm) is at least 2, ``flat``
    (3D) when only the smallest is that much smaller, else ``compact``. Boundary: ``irregular`` when the boundary
    (counted voxel faces, mm) is more than 1.5 times that of a digitised sphere (disc) of the same size.

    Args:
        map: one map, (*spatial) or (1, *spatial), 2D or 3D; a MetaTensor brings its affine.
        affine: voxel → world affine (4x4, or 3x3 for 2D); default the map's own, else identity (1 mm voxels).
        threshold: fraction of the peak defining the region.

    Returns:
        The description.

    Example:
        >>> describe_map(ball_at_index_25_16_16_of_32_cubed)  # identity affine: +x is the patient's right
        'The map highlights 0.8% of the volume (257 mm³) as one compact region with a smooth boundary, in the
        right part of the volume. Peak intensity 1.00; mean 1.00 inside the region.'
    """
    p = region_properties(map, affine, threshold)
    kind = "image" if p["ndim"] == 2 else "volume"
    if p["fraction"] == 0.0:
        return f"The map is flat (peak intensity {p['peak']:.2f}): no region of the {kind} stands out."
    unit = "mm²" if p["ndim"] == 2 else "mm³"
    if p["elongation"] >= _ELONGATED and p["flatness"] < _ELONGATED:
        shape = "elongated"
    elif p["flatness"] >= _ELONGATED:
        shape = "flat"
    else:
        shape = "compact"
    boundary = "an irregular" if p["surface_ratio"] > _IRREGULAR else "a smooth"
    n = p["components"]
    count = "one" if n == 1 else f"{n} separate"
    noun = "region" if n == 1 else "regions"
    sides = [
        _TERMS[ax][int(off > 0)]
        for ax, (off, fov) in enumerate(zip(p["centroid_offset_mm"], p["fov_mm"]))
        if fov > 0 and abs(off) > _OFF_CENTRE * fov
    ]
    where = f"in the {_join(sides)} part of the {kind}" if sides else f"near the centre of the {kind}"
    return (
        f"The map highlights {100 * p['fraction']:.1f}% of the {kind} ({p['size_mm']:.0f} {unit}) as {count} {shape} "
        f"{noun} with {boundary} boundary, {where}. "
        f"Peak intensity {p['peak']:.2f}; mean {p['mean']:.2f} inside the region."
    )


def describe_maps(maps: Any, affine: Any = None, threshold: float = 0.5) -> list[str]:
    """:func:`describe_map` for each map of a batch (B, 1, *spatial); ``affine`` one for all or (B, 4, 4).

    Example:
        >>> for text in describe_maps(cam(x), affine=x.affine): print(text)
    """
    if not hasattr(maps, "shape") or len(maps.shape) not in (4, 5) or maps.shape[1] != 1:
        raise ValueError(f"maps must have shape (B, 1, *spatial), got {getattr(maps, 'shape', type(maps))}")
    if affine is None:
        affine = getattr(maps, "affine", None)
    aff = None if affine is None else affine
    if aff is not None:
        aff = aff.detach().cpu().numpy() if isinstance(aff, torch.Tensor) else np.asarray(aff, dtype=np.float64)
    texts = []
    for b in range(maps.shape[0]):
        this = aff[b] if aff is not None and aff.ndim == 3 else aff
        m = maps[b]
        m = plain_tensor(m)  # the affine comes from ``this``
        texts.append(describe_map(m, this, threshold))
    return texts
