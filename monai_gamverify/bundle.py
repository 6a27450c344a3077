"""Load a MONAI bundle's network, weights and the CAM settings it declares, safely (``weights_only=True``)."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["BundleModel", "load_bundle", "load_checkpoint", "network_from_name"]


def network_from_name(network: str, network_args: dict | str | None = None) -> nn.Module:
    """Build a network from a ``monai.networks.nets`` name or a dotted path, with keyword arguments.

    Args:
        network: e.g. ``"resnet18"`` or ``"monai_gamverify.networks.nets.SmallCNN"``.
        network_args: keyword arguments as a dict or a JSON string.

    Returns:
        The network (random weights).

    Example:
        >>> net = network_from_name("resnet10", {"spatial_dims": 3, "n_input_channels": 1, "num_classes": 2})
    """
    from monai.bundle import ConfigParser

    args = json.loads(network_args) if isinstance(network_args, str) else dict(network_args or {})
    target = network if "." in network else f"monai.networks.nets.{network}"
    try:
        return ConfigParser({"net": {"_target_": target, **args}}).get_parsed_content("net")
    except Exception as err:
        raise ValueError(f"cannot build network {target!r} with {args}: {err}") from err


@dataclass
class BundleModel:
    """A network instantiated from a bundle, with what the package needs to explain it.

    Attributes:
        network: the ``network_def`` with weights loaded (eval mode).
        root: bundle root directory.
        metadata: ``configs/metadata.json`` content.
        target_layer: default CAM layer (config key ``cam_layer``, else metadata ``gamverify.target_layer``).
        feature_layers: early layers for feature-map verification (config ``feature_layers``, else metadata).
        class_names: output names from ``network_data_format.outputs.pred.channel_def``.
        parser: the ``monai.bundle.ConfigParser`` holding the inference config.
    """

    network: nn.Module
    root: Path
    metadata: dict
    target_layer: str | None = None
    feature_layers: list[str] = field(default_factory=list)
    class_names: list[str] = field(default_factory=list)
    parser: Any = None

    def preprocessing(self) -> Any:
        """The bundle's inference ``preprocessing`` transform, or ``None`` when it defines none."""
        return self.parser.get_parsed_content("preprocessing") if "preprocessing" in self.parser else None

    def slice_axis(self, spatial_ndim: int) -> int | None:
        """The spatial axis along which a 2D network explains an image of ``spatial_ndim`` spatial axes slice by
        slice (metadata ``gamverify.spatial_dims`` = 2 on a volume, e.g. ``cbct_quality``), else ``None``."""
        info = self.metadata.get("gamverify", {}) if isinstance(self.metadata, dict) else {}
        if int(spatial_ndim) == 3 and int(info.get("spatial_dims", spatial_ndim)) == 2:
            return int(info.get("slice_axis", 2))
        return None


def load_checkpoint(network: nn.Module, path: str | os.PathLike, map_location: Any = "cpu") -> nn.Module:
    """Load weights into ``network`` from a ``.pt`` file written by a bundle (plain state dict or ``{"model": ...}``).

    Only tensors and plain containers are accepted (``torch.load(weights_only=True)``); a file holding code is
    refused.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint not found: {p}")
    try:
        state = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as err:
        # torch's message suggests weights_only=False: never show that advice; keep only what names the cause
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
        first = f"{type(err).__name__}: {lines[0] if lines else ''}"
        cause = next((ln for ln in lines if "Unsupported global" in ln), first).split(" Please use")[0]
        cause = re.sub(r"\x1b\[[0-9;]*m", "", cause)
        raise ValueError(f"cannot load checkpoint {p} safely (weights_only=True): {cause}") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {p} does not hold a state dict")
    try:
        network.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"checkpoint {p} does not fit the network: {err}") from err
    return network


def load_bundle(
    bundle_root: str | os.PathLike,
    config: str = "inference.json",
    checkpoint: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    require_weights: bool = True,
    overrides: dict | None = None,
) -> BundleModel:
    """Instantiate a bundle's network (``network_def``) and load its trained weights.

    Args:
        bundle_root: the bundle directory (``configs/``, ``models/``).
        config: config file under ``configs/`` that defines ``network_def``.
        checkpoint: weights file (default ``models/model.pt``).
        device: where to put the network (default: CUDA when available, else CPU).
        require_weights: raise when no checkpoint exists (``False``: keep the random initialisation).
        overrides: config keys to override (e.g. ``{"dataset_dir": ...}``).

    Returns:
        :class:`BundleModel`.

    Example:
        >>> bm = load_bundle("bundles/sos_staging")
        >>> maps = GradCAM(bm.network, bm.target_layer)(x)
    """
    from monai.bundle import ConfigParser

    root = Path(bundle_root)
    cfg = root / "configs" / config
    meta_path = root / "configs" / "metadata.json"
    for p in (cfg, meta_path):
        if not p.is_file():
            raise FileNotFoundError(f"not a MONAI bundle: {p} is missing")
    parser = ConfigParser()
    parser.read_config(str(cfg))
    parser.read_meta(str(meta_path))
    parser["bundle_root"] = str(root)
    for key, value in (overrides or {}).items():
        parser[key] = value
    if "network_def" not in parser:
        raise ValueError(f"{cfg} defines no 'network_def'")
    network = parser.get_parsed_content("network_def")
    ckpt = Path(checkpoint) if checkpoint is not None else root / "models" / "model.pt"
    if ckpt.is_file():
        load_checkpoint(network, ckpt)
    elif require_weights:
        raise FileNotFoundError(f"no trained weights at {ckpt}; train the bundle first or pass checkpoint=")
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    network = network.to(dev).eval()
    metadata = json.loads(meta_path.read_text())
    extra = dict(metadata.get("gamverify", {}))
    # the config's keys follow a --network_name override; metadata describes the default network only
    if "cam_layer" in parser:
        extra["target_layer"] = parser.get_parsed_content("cam_layer")
    if "feature_layers" in parser:
        extra["feature_layers"] = parser.get_parsed_content("feature_layers")
    outputs = metadata.get("network_data_format", {}).get("outputs", {})
    channel_def = next(iter(outputs.values()), {}).get("channel_def", {}) if outputs else {}
    names = [channel_def[k] for k in sorted(channel_def, key=lambda k: int(k))] if channel_def else []
    return BundleModel(
        network=network,
        root=root,
        metadata=metadata,
        target_layer=extra.get("target_layer"),
        feature_layers=list(extra.get("feature_layers", [])),
        class_names=names,
        parser=parser,
    )
