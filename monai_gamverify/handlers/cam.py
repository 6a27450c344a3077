"""Ignite handlers drawing CAMs: overlays in TensorBoard (:class:`CAMImageHandler`) and NIfTI maps (:class:`CAMWriter`).

- :class:`CAMImageHandler` (training/validation): every ``interval`` epochs, the CAM of a few images of the current
  batch overlaid on the image (3D: three orthogonal slices through the map peak, tiled) as TensorBoard images.
- :class:`CAMWriter` (evaluation/inference): each item's normalised map as NIfTI aligned with its input image
  (optionally resampled back onto the original grid by inverting the preprocessing), plus an optional PNG; one
  unique file per input image (see :class:`monai_gamverify.io.names.OutputNamer`).

All CAMs leave the network exactly as it was (mode, ``requires_grad``, no ``.grad``), so training is undisturbed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from matplotlib import colormaps
from monai.utils import min_version, optional_import
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from monai_gamverify.handlers.utils import batch_items, network_device, rank_and_world
from monai_gamverify.io.grid import invert_to_input
from monai_gamverify.io.names import OutputNamer
from monai_gamverify.io.nifti import save_nifti
from monai_gamverify.transforms.dictionary import image_name, make_cam
from monai_gamverify.utils import plain_tensor
from monai_gamverify.visualize.plots import overlay_png
from monai_gamverify.visualize.registry import unwrap_network

Events, _ = optional_import("ignite.engine", "0.4.11", min_version, "Events")
if TYPE_CHECKING:
    from ignite.engine import Engine
else:
    Engine, _ = optional_import("ignite.engine", "0.4.11", min_version, "Engine")

__all__ = ["CAMImageHandler", "CAMWriter", "cam_overlay_rgb"]

logger = logging.getLogger(__name__)


def _window(img: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(img, [1, 99])
    return np.clip((img - lo) / (hi - lo), 0, 1) if hi > lo else np.zeros_like(img, dtype=np.float32)


def cam_overlay_rgb(image: Any, cam: Any, alpha: float = 0.45, cmap: str = "jet") -> np.ndarray:
    """RGB (H, W, 3) float image in [0, 1]: ``cam`` (in [0, 1]) over ``image``.

    3D: the three orthogonal slices through the map's maximum, side by side (padded to a common height); 2D: one
    panel.

    Args:
        image: (*spatial) or (1, *spatial) image (its first channel is shown).
        cam: map of the same spatial shape.
        alpha: opacity of the map.
        cmap: matplotlib colormap name.

    Returns:
        float32 array (H, W, 3).

    Example:
        >>> cam_overlay_rgb(torch.rand(1, 16, 16, 16), torch.rand(1, 16, 16, 16)).shape
        (16, 48, 3)
    """

    def arr(x: Any) -> np.ndarray:
        a = x.detach().cpu().float().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float32)
        return a

    img, heat = arr(image), arr(cam)
    spatial = heat.ndim - 1 if heat.ndim == img.ndim and heat.shape[0] == 1 else heat.ndim
    img = img.reshape(img.shape[-spatial:]) if img.ndim == spatial else img[0]
    heat = heat.reshape(heat.shape[-spatial:])
    if img.shape != heat.shape:
        raise ValueError(f"map shape {heat.shape} differs from image shape {img.shape}")
    img = _window(img)
    if img.ndim == 2:
        pairs = [(img, heat)]
    elif img.ndim == 3:
        peak = (
            np.unravel_index(int(np.argmax(heat)), heat.shape)
            if heat.max() > heat.min()
            else tuple(s // 2 for s in heat.shape)
        )
        pairs = [(np.take(img, peak[a], axis=a), np.take(heat, peak[a], axis=a)) for a in range(3)]
    else:
        raise ValueError(f"expected a 2D or 3D image, got spatial shape {img.shape}")
    colour = colormaps[cmap]
    height = max(p[0].shape[0] for p in pairs)
    panels = []
    for im, hm in pairs:
        rgb = (1 - alpha) * np.repeat(im[..., None], 3, axis=-1) + alpha * colour(np.clip(hm, 0, 1))[..., :3]
        pad = height - rgb.shape[0]
        panels.append(np.pad(rgb, ((0, pad), (0, 0), (0, 0))))
    return np.concatenate(panels, axis=1).astype(np.float32)


# ---------------------------------------------------------------------------------------------------- CAM images
class CAMImageHandler:
    """Log CAM overlays of the current batch's images to TensorBoard every ``interval`` epochs.

    The CAM is computed with ``engine.network`` (DDP wrappers removed) or ``network``; the network's mode and flags
    are restored after each call, so training continues exactly as without the handler.

    Args:
        layer: target layer name (as in the bare network's ``named_modules()``).
        method: ``gradcam``, ``gradcampp`` or ``scorecam``.
        summary_writer: a ``SummaryWriter``; if ``None``, one is created in ``log_dir``.
        log_dir: TensorBoard directory when no writer is given (default ``./runs``).
        interval: epochs (or iterations with ``epoch_level=False``) between logs.
        max_images: images of the batch to show.
        image_key: key of the image in the batch items.
        tag: TensorBoard tag prefix (``{tag}/{i}``).
        network: network to explain instead of ``engine.network``.
        epoch_level: log at epoch ends (``True``) or every ``interval`` iterations.

    Example:
        >>> CAMImageHandler("stages.2", log_dir="runs", interval=5).attach(trainer)
    """

    def __init__(
        self,
        layer: str,
        method: str = "gradcam",
        summary_writer: Any = None,
        log_dir: str | os.PathLike | None = None,
        interval: int = 1,
        max_images: int = 2,
        image_key: str = "image",
        tag: str = "cam",
        network: nn.Module | None = None,
        epoch_level: bool = True,
    ) -> None:
        if int(interval) < 1:
            raise ValueError(f"interval must be >= 1, got {interval}")
        self.layer = layer
        self.method = method
        self._writer = summary_writer
        self._own_writer = summary_writer is None
        self.log_dir = str(log_dir) if log_dir is not None else "./runs"
        self.interval = int(interval)
        self.max_images = int(max_images)
        self.image_key = image_key
        self.tag = tag
        self.network = network
        self.epoch_level = epoch_level
        make_cam(network, layer, method) if network is not None else None  # fail early on a bad layer

    @property
    def writer(self) -> Any:
        if self._writer is None:
            self._writer = SummaryWriter(log_dir=self.log_dir)
        return self._writer

    def attach(self, engine: Engine) -> None:
        """Register on ``EPOCH_COMPLETED`` (or ``ITERATION_COMPLETED``) every ``interval``; close on ``COMPLETED``."""
        event = Events.EPOCH_COMPLETED if self.epoch_level else Events.ITERATION_COMPLETED
        engine.add_event_handler(event(every=self.interval), self)
        engine.add_event_handler(Events.COMPLETED, self._close)

    def _close(self, engine: Engine) -> None:
        if self._own_writer and self._writer is not None:
            self._writer.close()
            self._writer = None

    def images(self, engine: Engine) -> list[np.ndarray]:
        """The overlays (H, W, 3) for the current batch (what :meth:`__call__` logs)."""
        network = self.network if self.network is not None else getattr(engine, "network", None)
        if network is None:
            raise ValueError("CAMImageHandler needs a network: the engine has none, pass network=")
        items = [it for it in batch_items(engine.state.batch) if self.image_key in it][: self.max_images]
        if not items:
            return []
        net = unwrap_network(network)
        x = torch.stack([torch.as_tensor(it[self.image_key]).float() for it in items]).to(network_device(net))
        x = plain_tensor(x)
        with torch.inference_mode(False), torch.enable_grad():
            maps = make_cam(net, self.layer, self.method)(x)
        return [cam_overlay_rgb(x[i].cpu(), maps[i].cpu()) for i in range(len(items))]

    def __call__(self, engine: Engine) -> None:
        step = engine.state.epoch if self.epoch_level else engine.state.iteration
        for i, rgb in enumerate(self.images(engine)):
            self.writer.add_image(f"{self.tag}/{i}", rgb, global_step=step, dataformats="HWC")
        self.writer.flush()


# ---------------------------------------------------------------------------------------------------- CAM NIfTI
class CAMWriter:
    """Write each item's normalised CAM as NIfTI aligned with its input image (and optionally an overlay PNG).

    Each input image gets its own file ``<name>_<postfix>.nii.gz`` in ``output_dir``, ``<name>`` from the image's
    ``filename_or_obj``: with ``data_root_dir`` its path relative to that root without extension (the input folder
    structure is kept: ``case_00000/imaging.nii.gz`` -> ``case_00000/imaging_cam.nii.gz``), else its stem, with a
    hash of the full path added when another image has the same stem (always in multi-process runs); see
    :class:`monai_gamverify.io.names.OutputNamer`. Each rank writes the maps of its own items. The map
    carries the affine of the preprocessed image, so it overlays the input in 3D Slicer / ITK-SNAP; with
    ``invert_transform`` (the preprocessing ``Compose``) it is also resampled back onto the input's original grid
    (same shape and affine as the file on disk).

    Args:
        layer: target layer name.
        output_dir: directory for the maps.
        method: ``gradcam``, ``gradcampp`` or ``scorecam``.
        image_key: key of the image in the batch items.
        postfix: file-name postfix.
        network: network to explain instead of ``engine.network``.
        class_idx_key: key whose argmax (``"pred"``) or value (``"label"``) is explained; ``None``: predicted class.
        invert_transform: preprocessing to invert so the map lies on the input's original grid.
        overlay: also write ``<stem>_<postfix>.png`` (three orthogonal slices through the peak).
        normalize: write maps scaled to [0, 1] (``False``: raw values, e.g. for attribution energy).
        data_root_dir: root of the input images; output names keep their path relative to it.

    Example:
        >>> CAMWriter("stages.2", "eval/cams", invert_transform=preprocessing).attach(evaluator)
    """

    def __init__(
        self,
        layer: str,
        output_dir: str | os.PathLike,
        method: str = "gradcam",
        image_key: str = "image",
        postfix: str = "cam",
        network: nn.Module | None = None,
        class_idx_key: str | None = None,
        invert_transform: Callable | None = None,
        overlay: bool = False,
        normalize: bool = True,
        data_root_dir: str | os.PathLike | None = None,
    ) -> None:
        self.layer = layer
        self.output_dir = Path(output_dir)
        self.method = method
        self.image_key = image_key
        self.postfix = postfix
        self.network = network
        self.class_idx_key = class_idx_key
        self.invert_transform = invert_transform
        self.overlay = overlay
        self.normalize = normalize
        self.namer = OutputNamer(data_root_dir)
        self.written: list[Path] = []

    def attach(self, engine: Engine) -> None:
        """Register on ``ITERATION_COMPLETED``."""
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def _class_idx(self, items: list[dict]) -> list[int] | None:
        if self.class_idx_key is None:
            return None
        out = []
        for it in items:
            t = torch.as_tensor(it[self.class_idx_key])
            out.append(int(t.argmax()) if t.numel() > 1 else int(t.reshape(()).item()))
        return out

    def __call__(self, engine: Engine) -> None:
        network = self.network if self.network is not None else getattr(engine, "network", None)
        if network is None:
            raise ValueError("CAMWriter needs a network: the engine has none, pass network=")
        items = [it for it in batch_items(engine.state.batch) if self.image_key in it]
        if not items:
            return
        net = unwrap_network(network)
        imgs = [it[self.image_key] for it in items]
        x = torch.stack([torch.as_tensor(im).float() for im in imgs]).to(network_device(net))
        x = plain_tensor(x)
        with torch.inference_mode(False), torch.enable_grad():
            maps = make_cam(net, self.layer, self.method)(
                x, class_idx=self._class_idx(items), normalize=self.normalize
            ).cpu()
        for i, img in enumerate(imgs):
            rank, world = rank_and_world()
            default = f"item{engine.state.iteration}_{i}" + (f"_rank{rank}" if world > 1 else "")
            name = self.namer(image_name(img, default=default))
            cam = maps[i]
            ref = img
            if self.invert_transform is not None and hasattr(img, "applied_operations"):
                cam = invert_to_input(cam, img, self.invert_transform)
                ref = cam
            path = save_nifti(cam, self.output_dir / f"{name}_{self.postfix}.nii.gz", reference=ref)
            if path not in self.written:
                self.written.append(path)
            if self.overlay:
                overlay_png(img[0], maps[i][0], self.output_dir / f"{name}_{self.postfix}.png", title=name)
