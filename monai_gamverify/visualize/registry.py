"""The one registry of CAM methods: a name (``gradcam``, ``gradcam++``/``gradcampp``, ``scorecam``) -> CAM class.

Every caller (command line, cohort runs, verification, bundles' transforms, integrations) resolves a method name
here, so a name accepted in one place is accepted everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from monai_gamverify.visualize.cam import BaseCAM, GradCAM, GradCAMpp, ScoreCAM

__all__ = ["CAM_METHODS", "cam_method", "make_cam", "unwrap_network"]

#: method name (case-insensitive, ``-``/``_``/``+`` ignored) -> CAM class
CAM_METHODS: dict[str, type[BaseCAM]] = {"gradcam": GradCAM, "gradcampp": GradCAMpp, "scorecam": ScoreCAM}


def cam_method(method: str) -> str:
    """Canonical key of a CAM method name (case-insensitive; ``-``, ``_`` ignored, ``+`` read as ``p``).

    Args:
        method: e.g. ``"Grad-CAM"``, ``"gradcam++"``, ``"score_cam"``.

    Returns:
        A key of :data:`CAM_METHODS`.

    Raises:
        ValueError: for an unknown name, listing the known ones.

    Example:
        >>> cam_method("GradCAM++")
        'gradcampp'
    """
    key = str(method).lower().replace("+", "p").replace("-", "").replace("_", "")
    if key not in CAM_METHODS:
        raise ValueError(f"unknown CAM method {method!r}; choose one of {sorted(CAM_METHODS)} (gradcam++ = gradcampp)")
    return key


def unwrap_network(network: nn.Module) -> nn.Module:
    """The module inside ``DataParallel`` / ``DistributedDataParallel`` wrappers (layer names as in the bare net)."""
    while isinstance(network, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        network = network.module
    return network


def make_cam(network: nn.Module, layer: str | Sequence[str], method: str = "gradcam", **kwargs: Any) -> BaseCAM:
    """A CAM object by method name.

    Args:
        network: the network (DDP / DataParallel wrappers are removed).
        layer: target layer name(s) as in ``network.named_modules()`` of the bare network.
        method: ``gradcam``, ``gradcampp`` (``gradcam++``) or ``scorecam``.
        kwargs: extra arguments of the CAM class (e.g. ``batch_size`` for Score-CAM).

    Returns:
        The CAM object.

    Example:
        >>> cam = make_cam(net, "stages.2", "gradcam++")
    """
    return CAM_METHODS[cam_method(method)](unwrap_network(network), layer, **kwargs)
