"""Attribution energy as dictionary transforms: :class:`AttributionEnergyd` (the AE of every output column of a
slice-wise model on a volume) and :class:`SliceCAMd` (a 2D model's CAM slice by slice, stacked into a volume).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

from monai_gamverify.energy.attribution import volume_energy_multi
from monai_gamverify.transforms.dictionary import image_name, make_cam
from monai_gamverify.utils import plain_tensor
from monai_gamverify.visualize.registry import unwrap_network

__all__ = ["AttributionEnergyd", "SliceCAMd"]


def _columns(columns: Mapping[str, int] | Sequence[str] | Sequence[int]) -> dict[Any, int]:
    """name -> output column from a mapping, a list of names (columns 0..K-1) or a list of column indices."""
    if isinstance(columns, Mapping):
        cols = {k: int(v) for k, v in columns.items()}
    elif isinstance(columns, Sequence) and not isinstance(columns, str):
        items = list(columns)
        if all(isinstance(c, (int, np.integer)) and not isinstance(c, bool) for c in items):
            cols = {int(c): int(c) for c in items}
        else:
            cols = {str(c): i for i, c in enumerate(items)}
    else:
        raise TypeError(f"columns must be a mapping name -> column or a list of names/columns, got {columns!r}")
    if not cols:
        raise ValueError("columns is empty")
    return cols


class AttributionEnergyd(MapTransform):
    """Dictionary transform: attribution energy of each output column of a (2D, slice-wise) model on a volume.

    For every key, ``data[key]`` (one volume (C, D, H, W), or a batch of one) is explained slice by slice along
    ``slice_axis`` with raw Grad-CAM (``normalize=False``) and the maps are summed per column while streaming
    (:func:`monai_gamverify.energy.volume_energy_multi`: one forward and one backward per chunk of slices for all
    columns). The result, a dict column name -> AE (Python floats), is stored under ``output_key`` (for several keys:
    ``f"{key}_{output_key}"``). With ``slice_axis=None`` the model takes the whole image (a 3D model).

    Args:
        keys: image key(s).
        network: the model (its state is left untouched by the CAM).
        target_layer: CAM layer name as in ``network.named_modules()``.
        columns: category -> output column, a list of category names (columns 0..K-1) or a list of columns.
        method: ``gradcam``, ``gradcampp`` or ``scorecam``.
        slice_axis: spatial axis of the slices (2 = axial for RAS volumes) or ``None`` for a 3D model.
        batch_size: slices per CAM call (each call holds ``len(columns) * batch_size`` slices).
        output_key: where the AE dict is stored.
        device: where slice batches are sent (default: the network's device).
        allow_missing_keys: skip absent keys.

    Example:
        >>> aed = AttributionEnergyd("image", net2d, "stages.2", ["parotid", "submandibular", "larynx"])
        >>> aed({"image": volume})["energy"]
        {'parotid': 812.3, 'submandibular': 640.1, 'larynx': 233.9}
    """

    def __init__(
        self,
        keys: KeysCollection,
        network: torch.nn.Module,
        target_layer: str,
        columns: Mapping[str, int] | Sequence[str] | Sequence[int],
        method: str = "gradcam",
        slice_axis: int | None = 2,
        batch_size: int = 16,
        output_key: str = "energy",
        device: str | torch.device | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if not isinstance(target_layer, str):
            raise TypeError(f"target_layer must be one layer name, got {target_layer!r}")
        self.network = unwrap_network(network)
        self.cam = make_cam(self.network, target_layer, method)
        self.columns = _columns(columns)
        self.slice_axis = slice_axis
        self.batch_size = batch_size
        self.output_key = output_key
        self.device = device

    def _device(self) -> torch.device | None:
        if self.device is not None:
            return torch.device(self.device)
        param = next(self.network.parameters(), None)
        return None if param is None else param.device

    def energy(self, volume: Any) -> dict[Any, float]:
        """AE of one volume for every column (see the class docstring)."""
        return volume_energy_multi(
            self.cam,
            volume,
            self.columns,
            slice_axis=self.slice_axis,
            batch_size=self.batch_size,
            device=self._device(),
            progress=False,
        )

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        keys = list(self.key_iterator(d))
        for key in keys:
            try:
                ae = self.energy(d[key])
            except ValueError as err:
                name = _source_name(d[key])
                raise ValueError(f"attribution energy of {key!r}{f' ({name})' if name else ''}: {err}") from err
            d[self.output_key if len(keys) == 1 else f"{key}_{self.output_key}"] = ae
        return d


def _source_name(x: Any) -> str:
    return image_name(x, default="") if x is not None else ""


class SliceCAMd(MapTransform):
    """Dictionary transform: the CAM of a 2D model applied slice by slice, stacked back into a volume.

    Each slice along ``slice_axis`` of ``data[key]`` (C, D, H, W) is explained (``batch_size`` slices per CAM call)
    for output column ``column``; the (1, D, H, W) stack is stored under ``output_key`` as a MetaTensor carrying the
    image's meta (affine), so ``SaveImaged`` writes it aligned with the volume. With ``normalize=False`` the raw maps
    are kept and their sum is the volume's attribution energy for that column.

    Args:
        keys: image key(s).
        network: the 2D model.
        target_layer: CAM layer name.
        column: output column (or category index) to explain; ``None`` = argmax per slice.
        method: ``gradcam``, ``gradcampp`` or ``scorecam``.
        slice_axis: spatial axis of the slices.
        batch_size: slices per CAM call.
        normalize: scale each slice's map to [0, 1] (``False``: raw values).
        output_key: where the stacked map is stored (for several keys: ``f"{key}_{output_key}"``).
        allow_missing_keys: skip absent keys.

    Example:
        >>> SliceCAMd("image", net2d, "stages.2", column=4, output_key="cam")({"image": volume})["cam"].shape
        torch.Size([1, 48, 48, 48])
    """

    def __init__(
        self,
        keys: KeysCollection,
        network: torch.nn.Module,
        target_layer: str,
        column: int | None = None,
        method: str = "gradcam",
        slice_axis: int = 2,
        batch_size: int = 16,
        normalize: bool = True,
        output_key: str = "cam",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if isinstance(slice_axis, bool) or slice_axis not in (0, 1, 2):
            raise ValueError(f"slice_axis must be 0, 1 or 2, got {slice_axis!r}")
        if int(batch_size) != batch_size or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.network = unwrap_network(network)
        self.cam = make_cam(self.network, target_layer, method)
        self.column, self.slice_axis, self.batch_size = column, int(slice_axis), int(batch_size)
        self.normalize, self.output_key = normalize, output_key

    def maps(self, volume: Any) -> torch.Tensor:
        """(1, D, H, W) stacked slice maps of one (C, D, H, W) volume, on the volume's device."""
        x = plain_tensor(torch.as_tensor(volume))
        if x.ndim != 4:
            raise ValueError(f"SliceCAMd expects one volume (C, D, H, W), got shape {tuple(x.shape)}")
        param = next(self.network.parameters(), None)
        device = param.device if param is not None else x.device
        slices = x.float().movedim(1 + self.slice_axis, 0)  # (S, C, h, w)
        out = []
        for start in range(0, slices.shape[0], self.batch_size):
            xb = slices[start : start + self.batch_size].contiguous().to(device)
            with torch.inference_mode(False), torch.enable_grad():
                m = self.cam(xb, class_idx=self.column, normalize=self.normalize)
            out.append(plain_tensor(m)[:, 0].to(x.device))
        return torch.cat(out).movedim(0, self.slice_axis).unsqueeze(0)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        keys = list(self.key_iterator(d))
        for key in keys:
            img = d[key]
            try:
                cam = self.maps(img)
            except ValueError as err:
                name = _source_name(img)
                raise ValueError(f"slice CAM of {key!r}{f' ({name})' if name else ''}: {err}") from err
            if hasattr(img, "meta"):
                cam = MetaTensor(cam, meta=dict(img.meta))
            d[self.output_key if len(keys) == 1 else f"{key}_{self.output_key}"] = cam
        return d
