"""Early-layer feature maps (Method 2 of the verification study) and their streaming feature table.

A feature map is the sum over channels of the ReLU output of a named layer (``layer1``, ``layer2``, ...). It is
non-negative, so once upsampled to the input size and scaled to [0, 1] it can be treated as a 2D/3D distribution and
compared with a reference model's mean feature map using the same similarity features as Grad-CAM maps.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from monai_gamverify.utils import plain_tensor
from monai_gamverify.visualize.cam import normalize_maps, upsample_maps
from monai_gamverify.visualize.hooks import record_activations

__all__ = ["feature_map", "FeatureMap"]


def _check_input(model: nn.Module, x: Any) -> torch.Tensor:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor of shape (B, C, H, W) or (B, C, D, H, W), got {type(x).__name__}")
    if x.ndim not in (4, 5):
        raise ValueError(f"x must have shape (B, C, H, W) or (B, C, D, H, W); got {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError("empty batch: x has batch size 0")
    if not torch.isfinite(x).all():
        raise ValueError("x contains NaN or infinite values")
    return plain_tensor(x)


def feature_map(
    model: nn.Module,
    x: torch.Tensor,
    layers: str | Sequence[str],
    *,
    normalize: bool = True,
    upsample: bool = True,
) -> torch.Tensor | dict[str, torch.Tensor]:
    """Channel-summed ReLU activation maps of named layers, from one forward pass that stops after the last layer.

    ``torch.relu`` is applied before summing so that a convolution (not only a ReLU/block output) can be named;
    on a layer that already ends in a ReLU it changes nothing. The model runs in eval mode without autograd and
    its flags are restored afterwards; layers after the last named one are never computed.

    Args:
        model: a 2D or 3D network.
        x: (B, C, H, W) or (B, C, D, H, W) input on the model's device.
        layers: one layer name (as in ``model.named_modules()``) or a sequence of names.
        normalize: min-max scale each map to [0, 1] per sample (a constant map becomes zeros).
        upsample: resize to the input size with bilinear/trilinear interpolation (``align_corners=False``).

    Returns:
        (B, 1, *spatial) float32 maps on ``x``'s device, or a dict layer -> maps when ``layers`` is a sequence.

    Example:
        >>> maps = feature_map(net, x, "layer1")                 # (B, 1, *x.shape[2:]) in [0, 1]
        >>> by_layer = feature_map(net, x, ["layer1", "layer2"])
    """
    plain = _check_input(model, x)
    acts = record_activations(model, plain, layers, stop_early=True)
    out: dict[str, torch.Tensor] = {}
    for name, act in acts.items():
        if act.ndim != plain.ndim:
            raise ValueError(
                f"layer {name!r} output has shape {tuple(act.shape)}; a feature map needs (B, C, *spatial) with "
                f"{plain.ndim - 2} spatial axes like the input - choose a convolutional layer"
            )
        fmap = torch.relu(act.float()).sum(dim=1, keepdim=True)
        if upsample:
            fmap = upsample_maps(fmap, plain.shape[2:])
        if normalize:
            fmap = normalize_maps(fmap)
        out[name] = fmap.float()
    return out[layers] if isinstance(layers, str) else out


class FeatureMap:
    """Callable ``x -> (B, 1, *spatial)`` feature maps of one layer, usable wherever a CAM object is.

    The input is moved to the model's device (the model is never moved), so one data loader can feed models that
    live on different devices.

    Args:
        model: the network.
        layer: the layer name.
        normalize: see :func:`feature_map`.

    Example:
        >>> fm = FeatureMap(net, "layer1")
        >>> ref = reference_map(fm, loader)
    """

    def __init__(self, model: nn.Module, layer: str, normalize: bool = True) -> None:
        self.model = model
        self.layer = layer
        self.normalize = normalize

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        param = next(self.model.parameters(), None)
        if param is not None:
            x = x.to(param.device)
        return feature_map(self.model, x, self.layer, normalize=self.normalize)
