"""What the engine returns and the small rules it applies: :class:`ImageResult`, the verdict order, error messages,
the default preprocessing of a network given by name."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from monai.transforms import Compose, EnsureChannelFirstd, EnsureTyped, LoadImaged, ScaleIntensityRanged

from monai_gamverify.transforms.dictionary import CheckImaged
from monai_gamverify.utils import plain_tensor

__all__ = [
    "ImageResult",
    "PreprocessingError",
    "VERDICTS",
    "decide_verdict",
    "error_message",
    "image_stem",
    "is_out_of_memory",
    "is_regression",
    "simple_preprocessing",
    "plain",
]

#: every verdict a result can carry, in order of precedence
VERDICTS = ("out of distribution", "rejected", "suitable", "not suitable", "unverified")
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")  # object addresses differ between runs: keep messages reproducible


class PreprocessingError(ValueError):
    """An image the preprocessing cannot read or transform; ``cause`` is the one-line reason (``"EOFError: ..."``);
    ``raw_image`` is the image as read when the read succeeded and a later step failed (else ``None``: unreadable)."""

    def __init__(self, path: str, cause: str, raw_image: Any = None) -> None:
        super().__init__(f"cannot preprocess {path}: {cause}")
        self.path, self.cause, self.raw_image = path, cause, raw_image


def error_message(err: BaseException) -> str:
    """One line naming the cause of ``err``: MONAI's ``applying transform ...`` wrappers unwrapped, the exception
    type in front (except for a :class:`PreprocessingError`, whose cause already carries it), addresses dropped."""
    if isinstance(err, PreprocessingError):
        return err.cause
    while isinstance(err, RuntimeError) and str(err).startswith("applying transform") and err.__cause__ is not None:
        err = err.__cause__
    text = _ADDRESS.sub("", " ".join(str(err).split()))
    text = text if len(text) <= 500 else text[:497] + "..."
    return f"{type(err).__name__}: {text}"


def is_out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is a device out-of-memory error (``torch.OutOfMemoryError`` / ``torch.cuda.OutOfMemoryError``):
    callers let it propagate instead of recording it as a bad image."""
    return isinstance(
        err, (getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError), torch.cuda.OutOfMemoryError)
    )


def image_stem(path: str | os.PathLike) -> str:
    """File name without its (possibly double) extension: ``/a/case_1.nii.gz`` -> ``case_1``."""
    name = Path(path).name
    for ext in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".png", ".jpg", ".jpeg", ".dcm"):
        if name.lower().endswith(ext):
            return name[: -len(ext)] or "image"
    return name.split(".")[0] or "image"


def is_regression(metadata: Mapping[str, Any] | None) -> bool:
    """True when bundle metadata declares regression outputs (scores, not class logits: no softmax)."""
    try:
        return metadata["network_data_format"]["outputs"]["pred"]["format"] == "regression"  # type: ignore[index]
    except (KeyError, TypeError):
        return False


def decide_verdict(
    in_distribution: bool | None, rejected: bool | None, p_suitable: float | None, threshold: float
) -> str:
    """The verdict of one image (see :data:`VERDICTS`): the screen first, then K+1, then the verifier."""
    if in_distribution is False:
        return "out of distribution"
    if rejected:
        return "rejected"
    if p_suitable is None:
        return "unverified"
    return "suitable" if p_suitable >= threshold else "not suitable"


def simple_preprocessing(
    spatial_dims: int | None = None, a_min: float | None = None, a_max: float | None = None
) -> Compose:
    """Preprocessing of a network given by name: load, channel first, checks (spatial axes, finite voxels), an
    optional intensity window ``[a_min, a_max] -> [0, 1]`` (clipped), float32."""
    chain: list[Any] = [
        LoadImaged("image", image_only=True),
        EnsureChannelFirstd("image"),
        CheckImaged("image", spatial_dims=spatial_dims),
    ]
    if (a_min is None) != (a_max is None):
        raise ValueError("give both a_min and a_max (the intensity window) or neither")
    if a_min is not None:
        chain.append(ScaleIntensityRanged("image", a_min, a_max, 0.0, 1.0, clip=True))
    chain.append(EnsureTyped("image", dtype=torch.float32))
    return Compose(chain)


def plain(x: torch.Tensor) -> torch.Tensor:
    """The plain tensor of a ``MetaTensor`` (a tensor unchanged)."""
    return plain_tensor(x)


@dataclass
class ImageResult:
    """What the engine found for one image.

    Attributes:
        image: the source (path, or a name for an in-memory image).
        logits: (N,) float32 network output on the CPU.
        class_names: N output names.
        probabilities: softmax of the logits (``None`` for a single output or a regression bundle).
        prediction: argmax of the logits.
        explained_class: the output column the map explains.
        energy: attribution energy (sum of the raw map over the whole image).
        cam: (1, *spatial) normalised map on the preprocessed grid (CPU).
        input: the preprocessed image (``MetaTensor`` (C, *spatial), CPU); its ``applied_operations`` lead back.
        raw_image: the image as loaded (channel first, native units), when the loading was separable.
        garbage: K+1 rejection (``rejected``, ``garbage_prob``, ``best_real_class``, ``best_real_name``,
            ``best_real_prob``), ``None`` without a garbage class.
        in_distribution, p_value, reasons, screen: the screen's answer (``None`` / empty without a screen).
        features: similarity to the reference map (after :meth:`ImagePipeline.verify`).
        p_suitable: the verifier's P(suitable).
        verdict: see :data:`VERDICTS`.
        files: written files (``map``, ``overlay``, ``summary``).
        pending_screen: the observation the screen will judge, kept by ``explain(..., defer_screen=True)`` until
            :meth:`ImagePipeline.screen_results`.
        observation: the engine's :class:`~monai_gamverify.apps.pipeline.observation.Observation` of the image.
    """

    image: str
    logits: torch.Tensor
    class_names: list[str]
    probabilities: list[float] | None
    prediction: int
    explained_class: int
    energy: float
    cam: torch.Tensor
    input: Any
    raw_image: Any = None
    garbage: dict[str, Any] | None = None
    in_distribution: bool | None = None
    p_value: float | None = None
    reasons: list[str] = field(default_factory=list)
    screen: dict[str, Any] | None = None
    features: dict[str, float] | None = None
    p_suitable: float | None = None
    verdict: str = "unverified"
    files: dict[str, str] = field(default_factory=dict)
    pending_screen: Any = field(default=None, repr=False)
    observation: Any = field(default=None, repr=False)

    @property
    def prediction_name(self) -> str:
        """Name of the predicted output."""
        return self.class_names[self.prediction]

    @property
    def rejected(self) -> bool:
        """Whether the K+1 garbage class rejected the image."""
        return bool(self.garbage is not None and self.garbage["rejected"])
