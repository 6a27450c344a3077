"""MONAI dictionary transforms: input checks with clear errors and CAM as a transform (:mod:`.dictionary`), attribution
energy and slice-wise CAM (:mod:`.energy`), K+1 garbage rejection (:mod:`.garbage`)."""

from __future__ import annotations

from monai_gamverify.transforms.dictionary import (
    CheckImaged,
    ComputeCAMd,
    image_name,
)
from monai_gamverify.transforms.energy import AttributionEnergyd, SliceCAMd
from monai_gamverify.transforms.garbage import RejectGarbageD, RejectGarbaged, RejectGarbageDict

__all__ = [
    "image_name",
    "CheckImaged",
    "ComputeCAMd",
    "AttributionEnergyd",
    "SliceCAMd",
    "RejectGarbaged",
    "RejectGarbageD",
    "RejectGarbageDict",
]
