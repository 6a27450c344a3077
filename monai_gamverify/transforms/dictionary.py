"""MONAI dictionary transforms for the bundles: input checks with clear errors and a CAM as a transform.

The CBCT pipeline itself uses MONAI's own transforms (``LoadImaged`` with ITK and NiBabel readers,
``EnsureChannelFirstd``, ``Orientationd``, ``Spacingd``, ``ScaleIntensityRanged`` for the HU window,
``ResizeWithPadOrCropd``, ``RandAffined``, ...); this module adds what MONAI lacks:

- :class:`CheckImaged`: stop with a message naming the file when an image has the wrong dimensionality, channel
  count or NaN/inf voxels (instead of a shape error deep inside a later transform or the network).
- :class:`ComputeCAMd`: add a Grad-CAM / Grad-CAM++ / Score-CAM map of an item to the item (inference
  post-processing), as a MetaTensor carrying the image's affine.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform
from torch import nn

from monai_gamverify.visualize.registry import make_cam

__all__ = [
    "image_name",
    "CheckImaged",
    "ComputeCAMd",
]


def image_name(img: Any, default: str = "image") -> str:
    """``filename_or_obj`` of a MetaTensor (or a meta dict), else ``default``."""
    meta = getattr(img, "meta", img if isinstance(img, Mapping) else {})
    name = meta.get("filename_or_obj", default) if isinstance(meta, Mapping) else default
    if isinstance(name, (list, tuple)):  # batched meta
        name = name[0] if name else default
    return str(name)


class CheckImaged(MapTransform):
    """Check channel-first images: number of spatial axes, channels, minimal size and finite values.

    Place it right after ``LoadImaged`` + ``EnsureChannelFirstd``. The error names the file (from the MetaTensor's
    ``filename_or_obj``), e.g. ``image /data/x.nii.gz has 2 spatial dimension(s) (shape (1, 32, 32)); expected 3``.

    Args:
        keys: keys of the images to check.
        spatial_dims: expected number of spatial axes (``None``: not checked).
        num_channels: expected number of channels (``None``: not checked).
        min_size: minimal voxels along every spatial axis (2: a single slice stored as a volume is refused).
        check_finite: refuse NaN/inf voxels.
        allow_missing_keys: don't raise when a key is missing.

    Example:
        >>> CheckImaged("image", spatial_dims=3)({"image": MetaTensor(torch.zeros(1, 8, 8))})
        Traceback (most recent call last):
        ValueError: image image has 2 spatial dimension(s) (shape (1, 8, 8)); expected 3
    """

    def __init__(
        self,
        keys: KeysCollection,
        spatial_dims: int | None = 3,
        num_channels: int | None = None,
        min_size: int = 2,
        check_finite: bool = True,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.spatial_dims = spatial_dims
        self.num_channels = num_channels
        self.min_size = int(min_size)
        self.check_finite = check_finite

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            name = image_name(img, default=str(key))
            shape = tuple(int(s) for s in getattr(img, "shape", ()))
            if self.spatial_dims is not None and len(shape) - 1 != self.spatial_dims:
                raise ValueError(
                    f"image {name} has {len(shape) - 1} spatial dimension(s) (channel-first shape {shape}); "
                    f"expected {self.spatial_dims}"
                )
            if self.num_channels is not None and shape[0] != self.num_channels:
                raise ValueError(
                    f"image {name} has {shape[0]} channel(s) (shape {shape}); expected {self.num_channels}"
                )
            if len(shape) > 1 and min(shape[1:]) < self.min_size:
                raise ValueError(f"image {name} has spatial shape {shape[1:]}: an axis is shorter than {self.min_size}")
            if self.check_finite:
                t = img if isinstance(img, torch.Tensor) else torch.as_tensor(img)
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    raise ValueError(f"image {name} contains NaN or infinite values")
        return d


class ComputeCAMd(MapTransform):
    """Add the CAM of each item's image to the item (e.g. in an inference ``postprocessing``).

    Args:
        keys: image key(s), channel-first (C, *spatial) without batch axis.
        network: the network (its state is left exactly as it was).
        layer: target layer name.
        method: ``gradcam``, ``gradcampp`` or ``scorecam``.
        output_key: key(s) for the map(s) (one per key); a map is (1, *spatial), a MetaTensor with the image's meta
            when the image is one.
        class_idx_key: key holding the class to explain (an int, a 0-d tensor, or a score/probability vector whose
            argmax is taken, e.g. ``"pred"``); ``None`` explains the predicted class.
        normalize: scale the map to [0, 1]; ``False`` keeps raw values (attribution energy).
        allow_missing_keys: don't raise when a key is missing.

    Example:
        >>> t = ComputeCAMd("image", network=net, layer="stages.2", output_key="cam")
        >>> t({"image": img})["cam"].shape  # (1, *img.shape[1:])
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        network: nn.Module | None = None,
        layer: str | None = None,
        method: str = "gradcam",
        output_key: str | Sequence[str] = "cam",
        class_idx_key: str | None = None,
        normalize: bool = True,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if network is None or layer is None:
            raise ValueError("ComputeCAMd needs a network and a target layer")
        self.cam = make_cam(network, layer, method)
        self.output_keys = [output_key] if isinstance(output_key, str) else list(output_key)
        if len(self.output_keys) != len(self.keys):
            raise ValueError(f"give one output key per key: keys {self.keys}, output_key {self.output_keys}")
        self.class_idx_key = class_idx_key
        self.normalize = normalize

    def _class_idx(self, d: Mapping) -> int | None:
        if self.class_idx_key is None:
            return None
        value = d[self.class_idx_key]
        t = torch.as_tensor(value)
        return int(t.argmax()) if t.numel() > 1 else int(t.reshape(()).item())

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        param = next(self.cam.nn_module.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        for key, out_key in zip(self.keys, self.output_keys):
            if key not in d:
                if self.allow_missing_keys:
                    continue
                raise KeyError(f"ComputeCAMd: key {key!r} not in the data (keys: {list(d)})")
            img = d[key]
            if not isinstance(img, torch.Tensor):
                img = torch.as_tensor(img)
            x = img.unsqueeze(0).to(device=device, dtype=torch.float32)
            with torch.inference_mode(False), torch.enable_grad():
                maps = self.cam(x, class_idx=self._class_idx(d), normalize=self.normalize)
            cam = maps[0].to(img.device)
            if hasattr(img, "meta") and not hasattr(cam, "meta"):
                cam = MetaTensor(cam, meta=dict(img.meta))
            d[out_key] = cam
        return d
