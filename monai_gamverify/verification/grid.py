"""Map transforms that make similarity features comparable across architectures.

Grad-CAM maps of different architectures come from layers of different resolution (a SmallCNN ``res4`` at 1/4 of
the input, a ResNet ``layer4`` at 1/32) and are upsampled to the input: a coarse map upsampled is smooth, a fine
one is not, and that smoothness alone tells a forest which architecture (hence which model) a row comes from.
:class:`CommonGrid` brings every map to one coarse grid (area average) before comparison; ``rank=True`` also
replaces the values by their within-map ranks (quantile normalisation: only the ordering of the voxels is kept).

Example:
    >>> fn = CommonGrid(GradCAM(net, "layer4"), grid=4)          # (B, 1, 4, 4, 4) maps in [0, 1]
    >>> table = feature_table(reference_map(CommonGrid(ref_cam, 4), loader), {"m": (fn, 1)}, loader)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from monai_gamverify.utils import plain_tensor

__all__ = ["CommonGrid", "rank_normalize"]


def rank_normalize(maps: torch.Tensor) -> torch.Tensor:
    """Replace each map's values by their ranks scaled to [0, 1] (ties by order of appearance).

    Args:
        maps: (B, 1, *spatial).

    Returns:
        Same shape, float32, each map a permutation of ``linspace(0, 1, n_voxels)``.

    Example:
        >>> rank_normalize(torch.tensor([[[0.2, 0.9, 0.1]]]))
        tensor([[[0.5000, 1.0000, 0.0000]]])
    """
    if maps.ndim < 3:
        raise ValueError(f"maps must be (B, 1, *spatial), got shape {tuple(maps.shape)}")
    flat = maps.reshape(maps.shape[0], -1).float()
    n = flat.shape[1]
    ranks = torch.empty_like(flat)
    order = flat.argsort(dim=1, stable=True)
    ranks.scatter_(1, order, torch.arange(n, dtype=flat.dtype, device=flat.device).expand_as(flat).contiguous())
    return (ranks / max(n - 1, 1)).reshape(maps.shape)


class CommonGrid:
    """Wrap a map function: its maps are area-averaged to a common ``grid`` and re-scaled to [0, 1].

    Args:
        fn: map function ``x -> (B, 1, *spatial)`` in [0, 1] (a CAM object, a ``FeatureMap``).
        grid: output spatial size (an int for every axis, or one per axis).
        rank: also rank-normalise each map (:func:`rank_normalize`).

    Example:
        >>> CommonGrid(lambda x: x, grid=2)(torch.rand(3, 1, 8, 8, 8)).shape
        torch.Size([3, 1, 2, 2, 2])
    """

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], grid: int | Sequence[int], rank: bool = False):
        if not callable(fn):
            raise TypeError("fn must be callable")
        sizes = [grid] if isinstance(grid, int) else list(grid)
        if not sizes or any(int(g) < 1 for g in sizes):
            raise ValueError(f"grid must be positive, got {grid!r}")
        self.fn, self.grid, self.rank = fn, grid, rank

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        maps = self.fn(x)
        maps = plain_tensor(maps)
        dims = maps.ndim - 2
        size = (self.grid,) * dims if isinstance(self.grid, int) else tuple(self.grid)
        pooled = (F.adaptive_avg_pool2d if dims == 2 else F.adaptive_avg_pool3d)(maps.float(), size)
        if self.rank:
            return rank_normalize(pooled)
        lo = pooled.amin(dim=tuple(range(2, pooled.ndim)), keepdim=True)
        hi = pooled.amax(dim=tuple(range(2, pooled.ndim)), keepdim=True)
        return torch.where(hi > lo, (pooled - lo) / (hi - lo).clamp_min(1e-12), torch.zeros_like(pooled))
