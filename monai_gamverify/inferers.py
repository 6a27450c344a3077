"""Inferers: :class:`SliceAggregateInferer` (a 2D network on every slice of a volume, outputs aggregated per
volume) and the sliding-window CAM.

Sliding-window CAM: explain a segmentation target window by window through MONAI's ``SlidingWindowInferer``.

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
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from monai.inferers import Inferer, SlidingWindowInferer

from monai_gamverify.utils import plain_tensor

if TYPE_CHECKING:  # a type only: visualize.segcam imports this module, so no runtime import back
    from monai_gamverify.visualize.cam import BaseCAM

__all__ = ["SliceAggregateInferer", "sliding_window_cam", "is_sliding_window"]

logger = logging.getLogger(__name__)


def is_sliding_window(inferer: Any) -> bool:
    """True for MONAI's ``SlidingWindowInferer`` and its subclasses (e.g. ``SlidingWindowInfererAdapt``)."""
    return isinstance(inferer, SlidingWindowInferer)


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
    xp = plain_tensor(x)
    reg = plain_tensor(region).to(device=xp.device, dtype=xp.dtype)
    if reg.shape != (xp.shape[0], 1, *xp.shape[2:]):
        raise ValueError(f"region must have shape {(xp.shape[0], 1, *xp.shape[2:])}, got {tuple(reg.shape)}")
    channels = xp.shape[1]

    def predictor(window: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        win = plain_tensor(window)
        image, weights = win[:, :channels], win[:, channels:]

        def score(out: torch.Tensor) -> torch.Tensor:
            return (out[:, label : label + 1] * weights).flatten(1).sum(1)

        res = cam.explain(image, score_fn=score, normalize=False, upsample=True)
        return res.logits, plain_tensor(res.maps)

    logits, maps = inferer(torch.cat([xp, reg], dim=1), predictor)
    return plain_tensor(maps), plain_tensor(logits)


class SliceAggregateInferer(Inferer):
    """Apply a 2D network to every slice of a 3D batch and aggregate the slice outputs per volume.

    A (B, C, D, H, W) input is cut along spatial axis ``spatial_dim`` into 2D slices that are fed to the network
    ``sw_batch_size`` at a time (so a volume's slices are never all on the device at once); the per-slice outputs
    (B * S, K) are reduced over the S slices of each volume. A 2D input (B, C, H, W) is passed through unchanged, so
    the same inferer serves slice-level and volume-level evaluation.

    Args:
        spatial_dim: spatial axis to slice along (0, 1 or 2; 2 is axial for RAS-oriented volumes).
        sw_batch_size: slices per network call.
        reduction: ``"mean"`` (the study's aggregation), ``"median"`` or ``"none"`` (keep (B, S, K)).
        device: where slice chunks are sent (default: the input's device).

    Example:
        >>> inferer = SliceAggregateInferer(spatial_dim=2, sw_batch_size=16)
        >>> inferer(torch.rand(2, 1, 48, 48, 40), net2d).shape  # net2d: 5 outputs
        torch.Size([2, 5])
    """

    def __init__(
        self,
        spatial_dim: int = 2,
        sw_batch_size: int = 16,
        reduction: str = "mean",
        device: str | torch.device | None = None,
    ) -> None:
        super().__init__()
        if isinstance(spatial_dim, bool) or spatial_dim not in (0, 1, 2):
            raise ValueError(f"spatial_dim must be 0, 1 or 2, got {spatial_dim!r}")
        if int(sw_batch_size) != sw_batch_size or sw_batch_size < 1:
            raise ValueError(f"sw_batch_size must be a positive integer, got {sw_batch_size!r}")
        if reduction not in ("mean", "median", "none"):
            raise ValueError(f"reduction must be 'mean', 'median' or 'none', got {reduction!r}")
        self.spatial_dim = int(spatial_dim)
        self.sw_batch_size = int(sw_batch_size)
        self.reduction = reduction
        self.device = None if device is None else torch.device(device)

    def __call__(self, inputs: torch.Tensor, network: Callable[..., Any], *args: Any, **kwargs: Any) -> torch.Tensor:
        """Slice-wise predictions of ``network`` on ``inputs`` aggregated per volume.

        Args:
            inputs: (B, C, D, H, W) volumes or (B, C, H, W) slices.
            network: a 2D network returning (N, K) (or (N,)) per slice.
            args, kwargs: passed on to ``network``.

        Returns:
            (B, K) aggregated outputs ((B, S, K) with ``reduction="none"``; for a 2D input the network's output).
        """
        if not isinstance(inputs, torch.Tensor):
            raise TypeError(f"inputs must be a tensor, got {type(inputs).__name__}")
        if inputs.ndim == 4:
            return network(inputs, *args, **kwargs)
        if inputs.ndim != 5:
            raise ValueError(
                "SliceAggregateInferer expects (B, C, D, H, W) volumes or (B, C, H, W) slices, "
                f"got {tuple(inputs.shape)}"
            )
        x = plain_tensor(inputs)
        b = x.shape[0]
        slices = x.movedim(2 + self.spatial_dim, 1)  # (B, S, C, h, w) view
        s = slices.shape[1]
        if s == 0:
            raise ValueError(f"the input has no slice along spatial axis {self.spatial_dim}: {tuple(inputs.shape)}")
        flat = slices.reshape(b * s, *slices.shape[2:])
        outs = []
        for start in range(0, b * s, self.sw_batch_size):
            chunk = flat[start : start + self.sw_batch_size]
            if self.device is not None:
                chunk = chunk.to(self.device)
            out = network(chunk, *args, **kwargs)
            if not isinstance(out, torch.Tensor):
                raise TypeError(f"the network returned {type(out).__name__}; SliceAggregateInferer needs a tensor")
            outs.append(out.reshape(out.shape[0], -1))
        per_slice = torch.cat(outs).reshape(b, s, -1)
        if self.reduction == "mean":
            return per_slice.mean(dim=1)
        if self.reduction == "median":
            return per_slice.median(dim=1).values
        return per_slice
