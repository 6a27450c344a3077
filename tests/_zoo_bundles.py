"""Test helpers: write MONAI bundles in the model zoo's own form (YAML or JSON configs with ``network_def``,
``preprocessing``, ``inferer``, ``postprocessing``; metadata with ``network_data_format``; no project keys)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

CLS_NET = {
    "_target_": "DenseNet",
    "spatial_dims": 2,
    "in_channels": 1,
    "out_channels": 3,
    "init_features": 4,
    "growth_rate": 4,
    "block_config": [2, 2],
    "bn_size": 2,
}
SEG_NET = {
    "_target_": "UNet",
    "spatial_dims": 3,
    "in_channels": 1,
    "out_channels": 2,
    "channels": [4, 8, 16],
    "strides": [2, 2],
    "num_res_units": 1,
}


def _dump(path: Path, content: dict, fmt: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "json":
        path.write_text(json.dumps(content, indent=2))
    else:
        import yaml  # optional dependency (PyYAML): only the YAML bundles need it

        path.write_text(yaml.safe_dump(content, sort_keys=False))


def _metadata(in_shape: list, channels: int, out_def: dict, seg: bool) -> dict:
    pred = {"type": "image" if seg else "probabilities", "num_channels": len(out_def), "channel_def": out_def}
    pred["spatial_shape"] = in_shape if seg else []
    return {
        "version": "0.1.0",
        "monai_version": "1.6.1",
        "name": "test bundle",
        "task": "segmentation" if seg else "classification",
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "hounsfield" if seg else "magnitude",
                    "num_channels": channels,
                    "spatial_shape": in_shape,
                    "dtype": "float32",
                }
            },
            "outputs": {"pred": pred},
        },
    }


def write_cls_bundle(
    root: Path,
    fmt: str = "yaml",
    weights: str | None = "pt",
    seed: int = 0,
    net: dict | None = None,
    spatial_shape: list | None = None,
) -> Path:
    """A 2D classification bundle (MONAI DenseNet, tiny) like the model zoo's classification template.

    weights: ``"pt"`` (plain state dict), ``"pt_model"`` ({"model": state dict}), ``"ts"`` (TorchScript), ``None``.
    """
    net = dict(net or CLS_NET)
    config = {
        "imports": ["$import torch"],
        "bundle_root": ".",
        "device": "$torch.device('cpu')",
        "network_def": net,
        "network": "$@network_def.to(@device)",
        "preprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "LoadImaged", "keys": "image"},
                {"_target_": "EnsureChannelFirstd", "keys": "image"},
                {"_target_": "ScaleIntensityd", "keys": "image"},
                {"_target_": "EnsureTyped", "keys": "image"},
            ],
        },
        "inferer": {"_target_": "SimpleInferer"},
        "postprocessing": {
            "_target_": "Compose",
            "transforms": [{"_target_": "Activationsd", "keys": "pred", "softmax": True}],
        },
    }
    ext = "yaml" if fmt == "yaml" else "json"
    _dump(root / "configs" / f"inference.{ext}", config, fmt)
    shape = [32, 32] if spatial_shape is None else spatial_shape
    meta = _metadata(shape, 1, {"0": "normal", "1": "pneumonia", "2": "other"}, seg=False)
    (root / "configs" / "metadata.json").write_text(json.dumps(meta, indent=2))
    _write_weights(root, net, weights, seed)
    return root


def write_seg_bundle(
    root: Path, fmt: str = "yaml", weights: str | None = "pt", seed: int = 0, roi: int = 16, net: dict | None = None
) -> Path:
    """A 3D segmentation bundle (MONAI UNet, tiny) like the model zoo's spleen bundle: SlidingWindowInferer."""
    net = dict(net or SEG_NET)
    config = {
        "imports": ["$import torch"],
        "bundle_root": ".",
        "device": "$torch.device('cpu')",
        "network_def": net,
        "network": "$@network_def.to(@device)",
        "preprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "LoadImaged", "keys": "image"},
                {"_target_": "EnsureChannelFirstd", "keys": "image"},
                {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
                {
                    "_target_": "ScaleIntensityRanged",
                    "keys": "image",
                    "a_min": -57,
                    "a_max": 164,
                    "b_min": 0.0,
                    "b_max": 1.0,
                    "clip": True,
                },
                {"_target_": "EnsureTyped", "keys": "image"},
            ],
        },
        "inferer": {
            "_target_": "SlidingWindowInferer",
            "roi_size": [roi, roi, roi],
            "sw_batch_size": 2,
            "overlap": 0.5,
        },
        "postprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "Activationsd", "keys": "pred", "softmax": True},
                {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
            ],
        },
    }
    ext = "yaml" if fmt == "yaml" else "json"
    _dump(root / "configs" / f"inference.{ext}", config, fmt)
    meta = _metadata([roi, roi, roi], 1, {"0": "background", "1": "spleen"}, seg=True)
    (root / "configs" / "metadata.json").write_text(json.dumps(meta, indent=2))
    _write_weights(root, net, weights, seed)
    return root


def _write_weights(root: Path, net_cfg: dict, weights: str | None, seed: int) -> None:
    from monai.bundle import ConfigParser

    if weights is None:
        return
    torch.manual_seed(seed)
    net = ConfigParser({"n": net_cfg}).get_parsed_content("n").eval()
    (root / "models").mkdir(parents=True, exist_ok=True)
    if weights == "ts":
        torch.jit.save(torch.jit.script(net), str(root / "models" / "model.ts"))
    elif weights == "pt_model":
        torch.save({"model": net.state_dict(), "epoch": 3}, root / "models" / "model.pt")
    else:
        torch.save(net.state_dict(), root / "models" / "model.pt")
    return None


def reference_state(net_cfg: dict, seed: int) -> dict:
    """The state dict ``_write_weights`` saved for ``seed``."""
    from monai.bundle import ConfigParser

    torch.manual_seed(seed)
    return ConfigParser({"n": net_cfg}).get_parsed_content("n").state_dict()
