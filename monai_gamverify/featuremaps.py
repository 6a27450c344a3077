"""Early-layer feature maps (Method 2 of the verification study) and their streaming feature table.

A feature map is the sum over channels of the ReLU output of a named layer (``layer1``, ``layer2``, ...). It is
non-negative, so once upsampled to the input size and scaled to [0, 1] it can be treated as a 2D/3D distribution and
compared with a reference model's mean feature map using the same similarity features as Grad-CAM maps.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import pandas as pd
import torch
from torch import nn

from .cam import normalize_maps, upsample_maps
from .hooks import record_activations

__all__ = ["feature_map", "FeatureMap", "feature_map_table"]


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
    return x.as_tensor() if hasattr(x, "as_tensor") else x


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


def feature_map_table(
    reference: tuple[nn.Module, str],
    candidates: Mapping[str, tuple[nn.Module, str, int | None]],
    data: Iterable[Mapping[str, Any]],
    *,
    reference_data: Iterable[Mapping[str, Any]] | None = None,
    slice_axis: int | None = None,
    metrics: Sequence[str] | None = None,
    progress: bool = True,
    **keys: Any,
) -> pd.DataFrame:
    """Method 2 feature table: each candidate's feature map of each sample against the reference's mean feature map.

    Both passes stream: the reference mean is a running sum, and the table is built batch by batch.

    Args:
        reference: ``(model, layer)`` of the reference model.
        candidates: ``{name: (model, layer, label)}`` with label 1 (suitable), 0 (not) or ``None`` (unknown).
        data: iterable of batch dicts (as a ``DataLoader`` yields) with ``"image"`` (B, C, *spatial) and optional
            ``"id"`` / ``"subject"``.
        reference_data: data for the reference mean (default: ``data``).
        slice_axis: compare per 2D slice along this spatial axis (see ``similarity_metrics``).
        metrics: feature names (default: the seven of the study).
        progress: show progress bars.
        **keys: ``image_key``, ``id_key``, ``subject_key`` overrides passed to :func:`feature_table`.

    Returns:
        The feature table (see :func:`monai_gamverify.verification.feature_table`).

    Example:
        >>> table = feature_map_table((ref_net, "layer1"), {"sos": (net_a, "layer1", 1)}, loader)
    """
    from .verification import feature_table, reference_map

    ref_model, ref_layer = reference
    image_key = keys.get("image_key", "image")
    ref = reference_map(
        FeatureMap(ref_model, ref_layer),
        data if reference_data is None else reference_data,
        image_key=image_key,
        progress=progress,
    )
    fns: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], int | None]] = {
        name: (FeatureMap(model, layer), label) for name, (model, layer, label) in candidates.items()
    }
    return feature_table(ref, fns, data, slice_axis=slice_axis, metrics=metrics, progress=progress, **keys)
