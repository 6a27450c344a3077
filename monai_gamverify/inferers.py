"""Sliding-window CAM: explain a segmentation target window by window through MONAI's ``SlidingWindowInferer``.

Each window's map is the CAM of that window, with the gradient of that window's own target (the sum of the
label's logits over the part of the region inside the window); the windows' maps are stitched by the inferer
itself, with its own overlap weighting (``mode="constant"`` or ``"gaussian"``), exactly as it stitches logits.
Autograd holds at most ``sw_batch_size`` windows from the target layer on: never the whole volume.

How: the region travels with the image as one extra input channel, so the inferer cuts the same window of both;
the predictor splits it off, runs the CAM on the image window and returns ``(logits, map)``, which the inferer
stitches as two outputs.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from monai.inferers import SlidingWindowInferer

from monai_gamverify.visualize.cam import BaseCAM

__all__ = ["sliding_window_cam", "is_sliding_window"]

logger = logging.getLogger(__name__)


def is_sliding_window(inferer: Any) -> bool:
    """True for MONAI's ``SlidingWindowInferer`` and its subclasses (e.g. ``SlidingWindowInfererAdapt``)."""
    return isinstance(inferer, SlidingWindowInferer)


def _plain(x: torch.Tensor) -> torch.Tensor:
    return x.as_tensor() if hasattr(x, "as_tensor") else x


def sliding_window_cam(
    cam: BaseCAM, x: torch.Tensor, label: int, region: torch.Tensor, inferer: SlidingWindowInferer
) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw (un-normalised) CAM of ``sum(logits[:, label] * region)`` computed window by window and stitched.

    Args:
        cam: a CAM object (``make_cam(network, layer, method)``) on a segmentation network.
        x: (B, C, *spatial) input.
        label: output channel explained.
        region: (B, 1, *spatial) weights of the target (a 0/1 mask); windows where it is 0 contribute a zero map.
        inferer: a ``monai.inferers.SlidingWindowInferer`` (its roi size, overlap, mode, batch and devices).

    Returns:
        ``(maps, logits)``: (B, 1, *spatial) raw maps and (B, K, *spatial) stitched logits, as plain tensors.

    Example:
        >>> cam = make_cam(net, "model.1")
        >>> maps, logits = sliding_window_cam(cam, x, 1, mask.float(), SlidingWindowInferer((96, 96, 96)))
    """
    if not is_sliding_window(inferer):
        raise TypeError(f"sliding_window_cam needs a monai SlidingWindowInferer, got {type(inferer).__name__}")
    xp = _plain(x)
    reg = _plain(region).to(device=xp.device, dtype=xp.dtype)
    if reg.shape != (xp.shape[0], 1, *xp.shape[2:]):
        raise ValueError(f"region must have shape {(xp.shape[0], 1, *xp.shape[2:])}, got {tuple(reg.shape)}")
    channels = xp.shape[1]

    def predictor(window: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        win = _plain(window)
        image, weights = win[:, :channels], win[:, channels:]

        def score(out: torch.Tensor) -> torch.Tensor:
            return (out[:, label : label + 1] * weights).flatten(1).sum(1)

        res = cam.explain(image, score_fn=score, normalize=False, upsample=True)
        return res.logits, _plain(res.maps)

    logits, maps = inferer(torch.cat([xp, reg], dim=1), predictor)
    return _plain(maps), _plain(logits)
