"""What the engine observes of one image (:class:`Observation`) and the settings that produced it
(:func:`preprocessing_hash`, :func:`reader_policy`): the only per-image evidence the screen and the verifier use."""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from monai.transforms import Compose, LoadImage, LoadImaged

from monai_gamverify.visualize.cam import normalize_maps

__all__ = ["Observation", "preprocessing_hash", "reader_policy", "SETTING_NAMES"]

#: the observation settings a saved screen records and the engine compares (what changes the evidence)
SETTING_NAMES = ("reader", "layer", "method", "class_policy", "slice_axis", "preprocessing")

_SIMPLE = (bool, int, float, str, type(None))


def _describe(obj: Any, depth: int = 0) -> Any:
    """A JSON-able description of a transform: its class and its simple settings (nested transforms too)."""
    if isinstance(obj, _SIMPLE):
        return obj
    if isinstance(obj, type | torch.dtype | np.dtype):  # float32 vs float16 matters
        return str(obj)
    if isinstance(obj, (list, tuple)):
        return [_describe(v, depth + 1) for v in obj] if depth < 6 else "..."
    if isinstance(obj, Mapping):
        return {str(k): _describe(v, depth + 1) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, np.ndarray | torch.Tensor):
        return np.asarray(obj.detach().cpu() if isinstance(obj, torch.Tensor) else obj).round(8).tolist()
    if isinstance(obj, Compose):
        return [_describe(t, depth + 1) for t in obj.transforms]
    if isinstance(obj, LoadImaged | LoadImage):  # the reader policy is recorded on its own
        return type(obj).__name__
    if depth < 4 and hasattr(obj, "__dict__") and type(obj).__module__.split(".")[0] in ("monai", "monai_gamverify"):
        state = {k: v for k, v in vars(obj).items() if not k.startswith("_") or k in ("_lazy",)}
        simple = {
            k: _describe(v, depth + 1) for k, v in sorted(state.items()) if not callable(v) or hasattr(v, "__dict__")
        }
        return {"class": type(obj).__qualname__, **{k: v for k, v in simple.items() if v is not None}}
    return type(obj).__qualname__


def preprocessing_hash(preprocessing: Any) -> str:
    """SHA-256 (16 hex digits) of a preprocessing's transforms and their simple settings (window, spacing, sizes,
    keys...): two engines whose preprocessing differs in any of them give different hashes.

    Example:
        >>> preprocessing_hash(bm.preprocessing()) == preprocessing_hash(load_bundle(root).preprocessing())
        True
    """
    text = json.dumps(_describe(preprocessing), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def _default_reader_count() -> int:
    """How many readers MONAI registers by default here (those whose packages import)."""
    return len(LoadImage(image_only=True).readers)


def reader_policy(preprocessing: Any) -> str:
    """The image readers a preprocessing's loading transform was given, in the order they are tried (``"default"``
    when MONAI chooses among its registered readers, ``"none"`` without a loading transform); independent of which
    optional reader packages are installed."""
    ts = list(preprocessing.transforms) if isinstance(preprocessing, Compose) else [preprocessing]
    for t in ts:
        loader = getattr(t, "_loader", t) if isinstance(t, LoadImaged) else t
        if isinstance(loader, LoadImage):
            if loader.auto_select:
                return "default"
            given = loader.readers[_default_reader_count() :]  # the readers given come after MONAI's defaults
            return ",".join(type(r).__name__ for r in reversed(given))  # in the order they are tried
    return "none"


@dataclass
class Observation:
    """Everything the engine (:meth:`~monai_gamverify.apps.pipeline.ImagePipeline.observe`) found for one image in
    one read, one preprocessing and one forward (+ backward) pass.

    Attributes:
        image: the source (path, or a name for an in-memory image).
        task: ``"classification"`` (whole input, or a 2D network slice by slice) or ``"segmentation"``.
        raw_image: the image as read (channel first, native units, ``MetaTensor`` with the input's affine), or
            ``None`` when the preprocessing does not separate its loading.
        input: the preprocessed (C, *spatial) image the network saw (CPU; its ``applied_operations`` lead back).
        logits: network output on the CPU: (K,) for a classifier (averaged over the slices of a slice-wise model),
            (K, *spatial) for a segmentation model; ``None`` without a forward pass.
        features: pooled activations recorded during that forward pass: each early layer's channel means then
            standard deviations (2C,), ``"penultimate"`` the classifier head's input (D,) (averaged over slices or
            sliding windows); empty when nothing was recorded.
        raw_maps: explained target name -> raw (un-normalised) CAM (1, *spatial) on the network's grid; the first
            entry is the one :attr:`raw_map` / :attr:`cam` give (classification: the explained class).
        explained: output column (classification) or label channel (segmentation) of each map, same order.
        regression: the outputs are scores (no softmax).
        class_names: output names (classification) or label names (segmentation).
        predicted_voxels: segmentation: voxels where each explained label is predicted.
        settings: the observation settings (``reader``, ``layer``, ``method``, ``class_policy``, ``slice_axis``,
            ``preprocessing``), compared with what a screen was fitted with.
    """

    image: str
    task: str
    raw_image: Any
    input: Any
    logits: torch.Tensor | None = None
    features: dict[str, np.ndarray] = field(default_factory=dict)
    raw_maps: dict[str, torch.Tensor] = field(default_factory=dict)
    explained: list[int] = field(default_factory=list)
    regression: bool = False
    class_names: list[str] = field(default_factory=list)
    predicted_voxels: dict[str, int] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    inverse: Callable[[torch.Tensor, Any], tuple[torch.Tensor, Any]] | None = field(default=None, repr=False)
    _cams: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    # ---------------------------------------------------------------------------------------------- the maps
    @property
    def raw_map(self) -> torch.Tensor | None:
        """Raw CAM (1, *spatial) of the first explained target on the network's grid (what attribution energy
        sums)."""
        return next(iter(self.raw_maps.values()), None)

    def cam_of(self, name: str) -> torch.Tensor:
        """Normalised map ([0, 1], (1, *spatial)) of one explained target on the network's grid."""
        if name not in self._cams:
            self._cams[name] = normalize_maps(self.raw_maps[name][None].float())[0]
        return self._cams[name]

    @property
    def cams(self) -> dict[str, torch.Tensor]:
        """Name -> normalised map on the network's grid, every explained target."""
        return {n: self.cam_of(n) for n in self.raw_maps}

    @property
    def cam(self) -> torch.Tensor | None:
        """Normalised map (1, *spatial) of the first explained target on the network's (preprocessed) grid."""
        return self.cam_of(next(iter(self.raw_maps))) if self.raw_maps else None

    def on_input_grid(self, name: str | None = None) -> tuple[torch.Tensor, Any]:
        """(normalised map on the input's grid, what carries its affine) of ``name`` (default: the first); the
        engine's one inverse (``io.grid.to_input_grid``), or the network's grid when the engine does not invert."""
        cam = self.cam if name is None else self.cam_of(name)
        if cam is None:
            raise ValueError(f"{self.image}: no map was computed (observe(..., cam=False))")
        if self.inverse is None:
            return cam, self.input
        return self.inverse(cam, self.input)

    @property
    def cam_input(self) -> torch.Tensor:
        """Normalised map of the first explained target on the input's grid (see :meth:`on_input_grid`)."""
        return self.on_input_grid()[0]

    # ------------------------------------------------------------------------------------------- predictions
    @property
    def probabilities(self) -> torch.Tensor | None:
        """Softmax of a classifier's (K,) logits (``None`` for a regression, a single output or a segmentation)."""
        if self.logits is None or self.task != "classification" or self.regression or self.logits.numel() < 2:
            return None
        return self.logits.float().softmax(0)

    @property
    def prediction(self) -> int | None:
        """Argmax of a classifier's logits (``None`` for a segmentation or without a forward pass)."""
        if self.logits is None or self.task != "classification":
            return None
        return int(self.logits.argmax())

    @property
    def explained_class(self) -> int | None:
        """The output column (or label channel) of the first map."""
        return self.explained[0] if self.explained else None

    @property
    def energy(self) -> float | None:
        """Attribution energy of the first map: the sum of its raw values."""
        m = self.raw_map
        return None if m is None else float(m.double().sum())

    # ------------------------------------------------------------------------------------------------ meta
    @property
    def affine(self) -> torch.Tensor | None:
        """The input image's voxel-to-world affine (of the raw image, else of the preprocessed one)."""
        for img in (self.raw_image, self.input):
            aff = getattr(img, "affine", None)
            if aff is not None:
                return aff
        return None

    @property
    def meta(self) -> dict[str, Any]:
        """Meta data of the image as read (``MetaTensor.meta``), else of the preprocessed image."""
        for img in (self.raw_image, self.input):
            m = getattr(img, "meta", None)
            if m is not None:
                return dict(m)
        return {}
