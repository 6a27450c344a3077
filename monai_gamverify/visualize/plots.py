"""Pictures people would rather look at than read: CAM overlays on three orthogonal slices.

Figures are ``matplotlib.figure.Figure`` objects drawn with the Agg canvas: nothing here selects a backend or touches
pyplot's global state, so a caller's interactive backend and open figures are left as they were.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from monai_gamverify.io import atomic_path

__all__ = ["overlay_png", "new_figure", "save_figure", "to_numpy"]


def to_numpy(x: Any) -> np.ndarray:
    """Array from a tensor/MetaTensor/array, dropping a leading singleton channel."""
    arr = x.detach().cpu().float().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float32)
    while arr.ndim > 2 and arr.shape[0] == 1 and arr.ndim in (3, 4):
        arr = arr[0]
    return arr


def new_figure(**kwargs: Any) -> Figure:
    """A ``Figure`` on its own Agg canvas, outside pyplot (no backend switch, no global figure list).

    Args:
        **kwargs: ``Figure`` arguments (``figsize``, ``dpi``, ...).

    Returns:
        The figure; draw with ``fig.subplots(...)`` and write it with :func:`save_figure`.

    Example:
        >>> fig = new_figure(figsize=(3, 3))
        >>> ax = fig.subplots()
    """
    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Any, path: str | os.PathLike, dpi: int = 100) -> Path:
    """Write a matplotlib figure as PNG atomically.

    A figure made by pyplot (one that has a figure manager) is also closed, so pyplot releases it; a plain ``Figure``
    (:func:`new_figure`) needs no closing and pyplot is not imported.

    Args:
        fig: the figure.
        path: PNG file.
        dpi: resolution.

    Returns:
        The written path.

    Example:
        >>> save_figure(new_figure(figsize=(2, 2)), "empty.png")
    """
    out = Path(path)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    pyplot = sys.modules.get("matplotlib.pyplot")  # only a pyplot figure needs closing; pyplot is never imported here
    if pyplot is not None and getattr(fig.canvas, "manager", None) is not None:
        pyplot.close(fig)
    return out


def _window(img: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(img, [1, 99])
    return np.clip((img - lo) / (hi - lo), 0, 1) if hi > lo else np.zeros_like(img)


def overlay_png(
    image: Any,
    cam: Any | None,
    path: str | os.PathLike,
    *,
    mask: Any | None = None,
    title: str | None = None,
    alpha: float = 0.45,
    center: tuple[int, ...] | None = None,
) -> Path:
    """Save a PNG of ``cam`` over ``image``: three orthogonal slices through the map's peak (3D) or one panel (2D).

    Args:
        image: (*spatial) or (1, *spatial) image.
        cam: map of the same spatial shape in [0, 1] (or ``None`` for the image alone).
        path: output PNG (written atomically).
        mask: optional ground-truth mask drawn as a contour.
        title: figure title.
        alpha: opacity of the map.
        center: voxel the slices pass through (default: the map's maximum, else the image centre).

    Returns:
        The written path.

    Example:
        >>> overlay_png(image[0], cam_map[0], "overlay.png", title="case 0")
    """
    img = _window(to_numpy(image))
    heat = None if cam is None else to_numpy(cam)
    msk = None if mask is None else to_numpy(mask)
    if heat is not None and heat.shape != img.shape:
        raise ValueError(f"map shape {heat.shape} differs from image shape {img.shape}")
    if img.ndim == 2:
        panels = [(img, heat, msk, "")]
    elif img.ndim == 3:
        if center is None:
            src = heat if heat is not None and heat.max() > heat.min() else None
            mid = tuple(s // 2 for s in img.shape)
            center = np.unravel_index(int(np.argmax(src)), img.shape) if src is not None else mid
        panels = []
        for axis, name in enumerate(("axis 0", "axis 1", "axis 2")):
            sl = [slice(None)] * 3
            sl[axis] = center[axis]
            t = tuple(sl)
            panels.append(
                (img[t], None if heat is None else heat[t], None if msk is None else msk[t], f"{name} = {center[axis]}")
            )
    else:
        raise ValueError(f"overlay_png expects a 2D or 3D image, got shape {img.shape}")
    fig = new_figure(figsize=(3.2 * len(panels), 3.4))
    axes = fig.subplots(1, len(panels), squeeze=False)
    for ax, (im, hm, mk, label) in zip(axes[0], panels):
        ax.imshow(im.T, cmap="gray", origin="lower", vmin=0, vmax=1)
        if hm is not None:
            ax.imshow(hm.T, cmap="jet", origin="lower", alpha=alpha, vmin=0, vmax=max(float(hm.max()), 1e-12))
        if mk is not None and mk.any() and not mk.all():
            ax.contour(mk.T > 0.5, levels=[0.5], colors="white", linewidths=0.8, origin="lower")
        ax.set_title(label, fontsize=8)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)
