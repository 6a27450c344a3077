"""Segmentation explanations (Seg-Grad-CAM, Vinogradova et al. 2020): the target of a segmentation network is the
sum of a label's logits over a region -- the predicted mask of that label by default, or a given mask or box.

With a MONAI ``SlidingWindowInferer`` (the model zoo's segmentation bundles) the map is computed window by window
and stitched by the inferer (:func:`monai_gamverify.inferers.sliding_window_cam`); without one, on the whole input.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from monai.data import MetaTensor
from torch import nn

from monai_gamverify.inferers import is_sliding_window, sliding_window_cam
from monai_gamverify.utils import plain_tensor
from monai_gamverify.visualize.cam import BaseCAM, normalize_maps
from monai_gamverify.visualize.hooks import preserved_state
from monai_gamverify.visualize.registry import make_cam

__all__ = [
    "box_mask",
    "bundle_activation",
    "bundle_segmentation_cam",
    "default_segmentation_label",
    "label_index",
    "predicted_mask",
    "segmentation_cam",
    "segmentation_score",
]

logger = logging.getLogger(__name__)


def label_index(label: int | str, class_names: Sequence[str] | None = None) -> int:
    """Output channel of a label given by index or by name (``network_data_format.outputs.pred.channel_def``).

    Example:
        >>> label_index("spleen", ["background", "spleen"])
        1
    """
    names = list(class_names or [])
    if isinstance(label, bool):
        raise TypeError("label must be a name or an integer index, not a bool")
    if isinstance(label, int) or (isinstance(label, str) and label.strip().lstrip("-").isdigit()):
        idx = int(label)
        if names and not 0 <= idx < len(names):
            raise ValueError(f"label index {idx} out of range for {len(names)} output channels {names}")
        if idx < 0:
            raise ValueError(f"label index must be >= 0, got {idx}")
        return idx
    lowered = [str(n).lower() for n in names]
    if str(label).lower() in lowered:
        return lowered.index(str(label).lower())
    known = f"; the bundle's labels are {names}" if names else "; the bundle declares no channel_def: pass an index"
    raise ValueError(f"unknown label {label!r}{known}")


def bundle_activation(bundle: Any) -> str:
    """``"sigmoid"`` when a bundle's ``postprocessing`` applies a sigmoid (multi-label, e.g. BraTS), else
    ``"softmax"``; read from the config (``Activations[d]`` with ``sigmoid: true``)."""
    parser = getattr(bundle, "parser", None)
    if parser is None or "postprocessing" not in parser:
        return "softmax"

    def walk(node: Any) -> bool:
        if isinstance(node, dict):
            if node.get("sigmoid") in (True, "true", "True", "$True"):
                return True
            return any(walk(v) for v in node.values())
        if isinstance(node, list):
            return any(walk(v) for v in node)
        return False

    return "sigmoid" if walk(parser.get("postprocessing")) else "softmax"


def default_segmentation_label(bundle: Any) -> int:
    """The first foreground output channel of a segmentation bundle: 1 for a softmax output (channel 0 is the
    background, MONAI's convention), 0 for a sigmoid (multi-label, e.g. BraTS) or single-channel output.

    Example:
        >>> default_segmentation_label(load_bundle("spleen_ct_segmentation"))
        1
    """
    names = list(getattr(bundle, "class_names", None) or [])
    if len(names) == 1 or bundle_activation(bundle) == "sigmoid":
        return 0
    return 1


def predicted_mask(logits: torch.Tensor, label: int, activation: str = "auto") -> torch.Tensor:
    """Where the network predicts ``label``: (B, 1, *spatial) float 0/1.

    Args:
        logits: (B, K, *spatial) network output.
        label: channel.
        activation: ``"softmax"`` (argmax over channels == label), ``"sigmoid"`` (logit > 0, multi-label) or
            ``"auto"`` (sigmoid for one output channel, else softmax).
    """
    if activation not in ("auto", "softmax", "sigmoid"):
        raise ValueError(f"activation must be 'auto', 'softmax' or 'sigmoid', got {activation!r}")
    if not 0 <= label < logits.shape[1]:
        raise ValueError(f"label {label} out of range for a network with {logits.shape[1]} output channels")
    sigmoid = activation == "sigmoid" or (activation == "auto" and logits.shape[1] == 1)
    mask = logits[:, label : label + 1] > 0 if sigmoid else (logits.argmax(dim=1, keepdim=True) == label)
    return mask.to(logits.dtype if logits.is_floating_point() else torch.float32)


def box_mask(spatial: Sequence[int], box: Sequence[Sequence[int]], batch: int = 1) -> torch.Tensor:
    """A (batch, 1, *spatial) 0/1 mask that is 1 inside ``box`` = ((start, stop) per spatial axis), voxel indices on
    the network's input grid, stop excluded.

    Example:
        >>> box_mask((32, 32, 32), [(4, 12), (0, 32), (10, 20)]).sum()
        tensor(2560.)
    """
    if len(box) != len(spatial):
        raise ValueError(f"box needs one (start, stop) per spatial axis ({len(spatial)}), got {list(box)}")
    mask = torch.zeros(batch, 1, *spatial)
    idx: list[slice] = []
    for axis, (pair, size) in enumerate(zip(box, spatial)):
        start, stop = (int(v) for v in pair)
        if not 0 <= start < stop <= size:
            raise ValueError(f"box axis {axis}: ({start}, {stop}) is empty or outside 0..{size}")
        idx.append(slice(start, stop))
    mask[(slice(None), slice(None), *idx)] = 1.0
    return mask


def segmentation_score(label: int, region: torch.Tensor):
    """``score_fn(output) -> (B,)``: the sum of ``output[:, label]`` weighted by ``region`` (B or 1, 1, *spatial)."""

    def score(out: torch.Tensor) -> torch.Tensor:
        return (out[:, label : label + 1] * region.to(out.dtype)).flatten(1).sum(1)

    return score


def _region(
    mask: Any, box: Any, x: torch.Tensor, label: int, logits: torch.Tensor | None, activation: str
) -> torch.Tensor:
    b, spatial = x.shape[0], tuple(x.shape[2:])
    if mask is not None and box is not None:
        raise ValueError("give mask or box, not both")
    if box is not None:
        return box_mask(spatial, box, b).to(x.device)
    if mask is not None:
        m = torch.as_tensor(plain_tensor(mask), device=x.device).float()
        if m.shape == spatial:
            m = m.view(1, 1, *spatial)
        elif m.shape == (1, *spatial):
            m = m.unsqueeze(0)
        if m.ndim != len(spatial) + 2 or m.shape[1] != 1 or tuple(m.shape[2:]) != spatial or m.shape[0] not in (1, b):
            raise ValueError(
                f"mask must have shape (*spatial), (1, *spatial) or (B, 1, *spatial) with spatial {spatial} (the "
                f"network input grid), got {tuple(m.shape)}"
            )
        return m.expand(b, 1, *spatial).contiguous()
    return predicted_mask(logits, label, activation)


def segmentation_cam(
    network: nn.Module,
    x: torch.Tensor,
    layer: str,
    label: int | str,
    inferer: Any = None,
    mask: Any = None,
    box: Sequence[Sequence[int]] | None = None,
    method: str = "gradcam",
    normalize: bool = True,
    activation: str = "auto",
    class_names: Sequence[str] | None = None,
    cam: BaseCAM | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Seg-Grad-CAM: the map of ``sum over region of logits[:, label]``.

    Args:
        network: segmentation network (output (B, K, *spatial)).
        x: (B, C, *spatial) input, already preprocessed (a ``MetaTensor`` keeps its affine on the maps).
        layer: target layer (see :func:`monai_gamverify.bundle.find_cam_layer` for a default).
        label: output channel, by index or name (``class_names``).
        inferer: a MONAI ``SlidingWindowInferer``: window-by-window CAM stitched by the inferer; anything else
            (``None``, ``SimpleInferer``): the whole input in one pass.
        mask: region of the target, (*spatial), (1, *spatial) or (B, 1, *spatial) on the input grid (0/1 or
            weights); default: where the network predicts ``label`` (one extra no-grad pass).
        box: region as ((start, stop) per spatial axis), instead of ``mask``.
        method: CAM method name (``gradcam``, ``gradcampp``, ``scorecam``).
        normalize: scale each map to [0, 1] over the whole volume (after stitching); ``False``: raw values.
        activation: how the predicted mask is read: ``softmax`` (argmax), ``sigmoid`` (logit > 0), ``auto``.
        class_names: label names (``BundleModel.class_names``) for a label given by name.
        cam: a ready CAM object (overrides ``method``/``layer``).

    Returns:
        ``(maps, logits)``: (B, 1, *spatial) float32 maps (a ``MetaTensor`` like ``x`` when ``x`` is one) and the
        (B, K, *spatial) logits (stitched by the inferer when it is a sliding window).

    Example:
        >>> bm = load_bundle("spleen_ct_segmentation")
        >>> x = bm.preprocessing()({"image": "CT_dir"})["image"][None]
        >>> maps, logits = segmentation_cam(bm.network, x, bm.target_layer, "spleen", inferer=bm.inferer(),
        ...                                 class_names=bm.class_names)
    """
    if not isinstance(x, torch.Tensor) or x.ndim not in (4, 5):
        raise ValueError(f"x must be a (B, C, H, W) or (B, C, D, H, W) tensor, got {getattr(x, 'shape', type(x))}")
    idx = label_index(label, class_names)
    explainer = cam if cam is not None else make_cam(network, layer, method)
    sliding = is_sliding_window(inferer)
    logits = None
    if mask is None and box is None:
        with preserved_state(explainer.nn_module), torch.no_grad():
            plain = plain_tensor(x)
            logits = inferer(plain, explainer.nn_module) if sliding else explainer.nn_module(plain)
            logits = plain_tensor(logits)
    region = _region(mask, box, x, idx, logits, activation)
    if logits is not None and not 0 <= idx < logits.shape[1]:
        raise ValueError(f"label {idx} out of range for a network with {logits.shape[1]} output channels")
    empty = region.flatten(1).sum(1) == 0
    if bool(empty.any()):
        logger.warning(
            "label %s: empty region for sample(s) %s (%s): their maps are zero; pass mask= or box=",
            label,
            empty.nonzero().flatten().tolist(),
            "not predicted anywhere" if mask is None and box is None else "empty mask/box",
        )
    if sliding:
        maps, logits = sliding_window_cam(explainer, x, idx, region, inferer)
    else:
        res = explainer.explain(
            plain_tensor(x),
            score_fn=segmentation_score(idx, region),
            normalize=False,
        )
        maps, logits = res.maps, res.logits
        if logits.shape[1] <= idx:
            raise ValueError(f"label {idx} out of range for a network with {logits.shape[1]} output channels")
    maps = maps.detach().float()
    if normalize:
        maps = normalize_maps(maps)
    if isinstance(x, MetaTensor):
        maps = MetaTensor(maps).copy_meta_from(x, copy_attr=False)
    return maps, logits.detach()


def bundle_segmentation_cam(
    bundle: Any,
    x: torch.Tensor,
    label: int | str,
    *,
    layer: str | None = None,
    mask: Any = None,
    box: Sequence[Sequence[int]] | None = None,
    method: str = "gradcam",
    normalize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`segmentation_cam` with a bundle's own settings: its network, CAM layer (given, configured or found
    automatically), ``inferer`` (sliding window or not), label names and activation (softmax/sigmoid).

    Args:
        bundle: a :class:`monai_gamverify.bundle.BundleModel`.
        x: (B, C, *spatial) preprocessed input (``bundle.preprocessing()`` output with a batch axis).
        label: name (``channel_def``) or index.
        layer: CAM layer (default ``bundle.target_layer``).
        mask, box, method, normalize: as in :func:`segmentation_cam`.

    Returns:
        ``(maps, logits)`` on the preprocessed grid (bring maps back with ``io.grid.to_input_grid``).

    Example:
        >>> bm = load_bundle("spleen_ct_segmentation")
        >>> img = bm.preprocessing()({"image": "CT_dir"})["image"]
        >>> maps, logits = bundle_segmentation_cam(bm, img[None], "spleen")
    """
    target = layer or bundle.target_layer
    if not target:
        raise ValueError(getattr(bundle, "layer_error", None) or "no target layer: pass layer=")
    inferer = bundle.inferer() if "inferer" in bundle.parser else None
    return segmentation_cam(
        bundle.network,
        x,
        target,
        label,
        inferer=inferer,
        mask=mask,
        box=box,
        method=method,
        normalize=normalize,
        activation=bundle_activation(bundle),
        class_names=bundle.class_names,
    )
