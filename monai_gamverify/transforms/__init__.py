"""MONAI dictionary transforms: input checks with clear errors, CAM as a transform."""

from __future__ import annotations

from monai_gamverify.transforms.dictionary import (
    CheckImaged,
    ComputeCAMd,
    image_name,
)

__all__ = [
    "image_name",
    "CheckImaged",
    "ComputeCAMd",
]
