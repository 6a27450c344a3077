"""The one way back from a preprocessed grid to the input image's grid: a fast exact path, else MONAI's Invertd."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.data.utils import AFFINE_TOL
from monai.networks.layers import AffineTransform
from monai.transforms import Invertd
from monai.transforms.utils import resolves_modes
from monai.utils import get_torch_dtype_from_string

from monai_gamverify.utils import plain_tensor

__all__ = ["fast_invert", "invert_to_input", "to_input_grid"]


# MONAI transforms whose inverse is a pure index operation (crop / zero pad) or one resampling; the fast inverse
# handles a preprocessing made only of these (plus transforms that record nothing, e.g. intensity scaling)
_PAD_OPS = {"SpatialPad", "BorderPad", "DivisiblePad"}
_CROP_OPS = {"SpatialCrop", "CenterSpatialCrop", "CenterScaleCrop"}


def _shift(affine: np.ndarray, offset: Sequence[float]) -> np.ndarray:
    """``affine`` of a grid whose voxel 0 is voxel ``offset`` of the grid of ``affine``."""
    t = np.eye(len(affine))
    t[: len(offset), -1] = offset
    return affine @ t


def _unpad(data: torch.Tensor, affine: np.ndarray, padded: Sequence[Sequence[int]]) -> tuple[torch.Tensor, np.ndarray]:
    lo = [int(p[0]) for p in padded[1:]]  # padded includes the channel axis
    index = (slice(None),) + tuple(slice(a, n - int(p[1])) for a, p, n in zip(lo, padded[1:], data.shape[1:]))
    return data[index], _shift(affine, lo)


def _uncrop(data: torch.Tensor, affine: np.ndarray, cropped: Sequence[int]) -> tuple[torch.Tensor, np.ndarray]:
    lo, hi = [int(c) for c in cropped[0::2]], [int(c) for c in cropped[1::2]]
    if not any(lo) and not any(hi):
        return data, affine
    pad: list[int] = []
    for a, b in zip(reversed(lo), reversed(hi)):  # F.pad: last axis first
        pad += [a, b]
    return torch.nn.functional.pad(data, pad), _shift(affine, [-a for a in lo])


def _unresample(data: torch.Tensor, affine: np.ndarray, op: Mapping[str, Any]) -> tuple[torch.Tensor, np.ndarray]:
    """Inverse of ``SpatialResample`` / ``Spacing``: the same computation as its ``inverse`` (MONAI's
    ``AffineTransform`` with the recorded mode, padding and dtype) on a plain tensor, without MetaTensor bookkeeping."""

    info = op["extra_info"]
    dst = np.asarray(info["src_affine"], dtype=np.float64)
    size = [int(v) for v in op["orig_size"]]
    xform = np.linalg.solve(affine, dst)
    same_size = list(data.shape[1:]) == size
    if same_size and (np.allclose(affine, dst, atol=AFFINE_TOL) or np.allclose(xform, np.eye(4), atol=AFFINE_TOL)):
        return data, dst  # what SpatialResample does: no resampling for an (almost) unchanged grid
    align = info.get("align_corners")
    align = False if not isinstance(align, bool) else align
    _, mode, padding, _ = resolves_modes(info["mode"], info["padding_mode"])
    dtype = get_torch_dtype_from_string(info["dtype"])
    k = data.ndim - 1
    lin = xform[:k, :k]
    if mode == "bilinear" and padding in ("zeros", "border") and np.allclose(lin, np.diag(np.diag(lin)), atol=1e-12):
        # an axis-aligned grid change (Spacing without rotation, the usual case): trilinear interpolation is a
        # product of 1D linear ones, so one pass per axis instead of a sampling grid of the whole output volume
        out = data.to(dtype)
        for axis in range(k):
            coords = torch.arange(size[axis], dtype=dtype, device=data.device) * float(lin[axis, axis])
            out = _lerp_axis(out, axis + 1, coords + float(xform[axis, k]), padding)
        return out.float(), dst
    resample = AffineTransform(normalized=False, mode=mode, padding_mode=padding, align_corners=align,
                               reverse_indexing=True)  # fmt: skip
    theta = torch.as_tensor(xform, dtype=dtype, device=data.device)
    out = resample(data.unsqueeze(0).to(dtype), theta=theta, spatial_size=size).squeeze(0)
    return out.float(), dst


def _lerp_axis(x: torch.Tensor, axis: int, coords: torch.Tensor, padding: str) -> torch.Tensor:
    """``x`` sampled along ``axis`` at voxel coordinates ``coords`` (voxel centres at integers) by linear
    interpolation, the 1D factor of ``grid_sample(mode="bilinear")``: ``"zeros"`` padding counts neighbours outside
    the volume as 0, ``"border"`` clamps the coordinate into it."""
    n = x.shape[axis]
    if padding == "border":
        coords = coords.clamp(0, n - 1)
    i0 = coords.floor()
    w = coords - i0
    i0 = i0.long()
    i1 = i0 + 1
    shape = [1] * x.ndim
    shape[axis] = -1
    w0 = ((1 - w) * ((i0 >= 0) & (i0 <= n - 1))).reshape(shape)
    w1 = (w * ((i1 >= 0) & (i1 <= n - 1))).reshape(shape)
    return x.index_select(axis, i0.clamp(0, n - 1)) * w0 + x.index_select(axis, i1.clamp(0, n - 1)) * w1


def _unorient(data: torch.Tensor, affine: np.ndarray, original: np.ndarray) -> tuple[torch.Tensor, np.ndarray] | None:
    """Inverse of ``Orientation``: the axis permutation and flips that map the grid of ``affine`` onto the grid of
    ``original`` (exact index operations), or ``None`` when the two grids are not related that way."""
    m = np.linalg.solve(affine, original)  # original voxel index -> current voxel index
    r = np.round(m[:3, :3])
    permutation = (np.abs(r).sum(0) == 1).all() and (np.abs(r).sum(1) == 1).all()
    if not permutation or not np.allclose(m[:3, :3], r, atol=1e-4):
        return None
    src_axis = [int(np.nonzero(r[:, j])[0][0]) for j in range(3)]  # output axis j reads current axis src_axis[j]
    out = data.permute(0, *[a + 1 for a in src_axis])
    flips = []
    for j, i in enumerate(src_axis):
        n = data.shape[i + 1]
        if r[i, j] < 0:
            if abs(m[i, 3] - (n - 1)) > 1e-3:
                return None
            flips.append(j + 1)
        elif abs(m[i, 3]) > 1e-3:
            return None
    return (out.flip(flips) if flips else out).contiguous(), original


def fast_invert(cam: torch.Tensor, image: Any) -> tuple[torch.Tensor, np.ndarray] | None:
    """Map a CAM on the preprocessed grid back onto the input grid without ``Invertd``, or ``None`` if the recorded
    preprocessing holds a transform this does not handle (then use :func:`~monai_gamverify.transforms.invert_to_input`).

    Handles orientation, spacing / resampling, padding and cropping (``ResizeWithPadOrCrop`` included); the
    intensity transforms record nothing. Each step repeats the computation of the MONAI inverse on a plain tensor
    (cropping, zero padding, the same ``AffineTransform`` resampling, permutation and flips), so the result equals
    ``Invertd``'s up to float rounding, and it costs a fraction of a millisecond instead of ~10 ms of MetaTensor
    bookkeeping per 32^3 volume.

    Args:
        cam: (C, *spatial) map on the preprocessed grid of ``image``.
        image: the preprocessed ``MetaTensor`` (its ``applied_operations`` and ``meta``).

    Returns:
        (map on the input's grid as a (C, *spatial) float tensor, the input's 4x4 affine), or ``None``.
    """
    ops = list(getattr(image, "applied_operations", None) or [])
    meta = getattr(image, "meta", {})
    if "original_affine" not in meta or "spatial_shape" not in meta or cam.ndim != 4:
        return None
    data = plain_tensor(cam)
    affine = np.asarray(image.affine, dtype=np.float64)
    if affine.shape != (4, 4):
        return None
    for op in reversed(ops):
        name = str(op.get("class", ""))
        info = op.get("extra_info") or {}
        if op.get("lazy") or not op.get("do_transforms", True):
            return None
        if name in _PAD_OPS:
            data, affine = _unpad(data, affine, info["padded"])
        elif name in _CROP_OPS:
            data, affine = _uncrop(data, affine, info["cropped"])
        elif name == "ResizeWithPadOrCrop":  # forward: crop, then pad
            data, affine = _unpad(data, affine, info["pad_info"]["extra_info"]["padded"])
            data, affine = _uncrop(data, affine, info["crop_info"]["extra_info"]["cropped"])
        elif name == "SpatialResample":
            if isinstance(info.get("mode"), int):
                return None  # spline orders go through scipy in MONAI
            data, affine = _unresample(data, affine, op)
        elif name == "Orientation":
            done = _unorient(data, affine, np.asarray(info["original_affine"], dtype=np.float64))
            if done is None:
                return None
            data, affine = done
        else:
            return None
        if list(data.shape[1:]) != [int(v) for v in op.get("orig_size", data.shape[1:])]:
            return None
    original = np.asarray(meta["original_affine"], dtype=np.float64)
    if list(data.shape[1:]) != [int(v) for v in np.asarray(meta["spatial_shape"])] or not np.allclose(
        affine, original, atol=1e-4
    ):
        return None
    return data.float(), original


def invert_to_input(cam: torch.Tensor, image: Any, transform: Any) -> Any:
    """Map a CAM computed on the preprocessed ``image`` back onto the input's own grid and affine.

    Args:
        cam: (C, *spatial) map on the preprocessed grid.
        image: the preprocessed ``MetaTensor`` (its ``applied_operations`` record the preprocessing).
        transform: the invertible preprocessing (e.g. a bundle's ``preprocessing`` ``Compose``) keyed on ``"image"``.

    Returns:
        ``MetaTensor`` map with the input's shape and affine (it overlays the input in 3D Slicer / ITK-SNAP).

    Example:
        >>> cam_in = invert_to_input(cam, data["image"], bundle.preprocessing)
    """

    mt = MetaTensor(cam, meta=dict(image.meta), applied_operations=list(image.applied_operations))
    inverter = Invertd(keys="cam", transform=transform, orig_keys="image", nearest_interp=False)
    return inverter({"cam": mt, "image": image})["cam"]


def to_input_grid(cam: torch.Tensor, image: Any, transform: Any) -> tuple[torch.Tensor, Any]:
    """A map on the preprocessed grid of ``image`` moved onto the input's grid: :func:`fast_invert` when it handles
    the recorded preprocessing, else :func:`invert_to_input` (MONAI's ``Invertd``); unchanged when nothing was
    recorded.

    Args:
        cam: (C, *spatial) map on the preprocessed grid.
        image: the preprocessed ``MetaTensor``.
        transform: the invertible preprocessing that made ``image`` (keyed on ``"image"``).

    Returns:
        (map, reference): the map on the input grid and what carries its affine (a 4x4 array or a ``MetaTensor``),
        for :func:`~monai_gamverify.io.nifti.save_nifti` / ``save_map``.

    Example:
        >>> cam_in, ref = to_input_grid(cam, data["image"], bundle.preprocessing())
    """
    if not getattr(image, "applied_operations", None):
        return cam, image
    done = fast_invert(cam, image)
    if done is not None:
        return done
    inverted = invert_to_input(cam, image, transform)
    return inverted, inverted
