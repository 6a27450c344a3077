"""Data: datalists (:mod:`.datalist`) and reproducible synthetic cohorts (:mod:`.synthetic`)."""

from __future__ import annotations

from monai_gamverify.data.config import exit_on_error
from monai_gamverify.data.datalist import (
    PATH_KEYS,
    DataError,
    check_image,
    list_images,
    load_datalist,
    read_datalist_split,
    require_file,
)
from monai_gamverify.data.garbage import class_weights, mix_garbage, mix_garbage_dirs
from monai_gamverify.data.synthetic import (
    KINDS,
    QUALITY_CATEGORIES,
    QUALITY_REGIONS,
    Cohort,
    generate,
    generate_ceph,
    generate_chin,
    generate_cvm,
    generate_quality,
    generate_sos,
    make_cohort,
    stratified_split,
    summary_line,
    synth,
)

__all__ = [
    "DataError",
    "check_image",
    "load_datalist",
    "read_datalist_split",
    "list_images",
    "require_file",
    "PATH_KEYS",
    "exit_on_error",
    "KINDS",
    "QUALITY_CATEGORIES",
    "QUALITY_REGIONS",
    "Cohort",
    "generate",
    "generate_sos",
    "generate_chin",
    "generate_cvm",
    "generate_ceph",
    "generate_quality",
    "make_cohort",
    "stratified_split",
    "synth",
    "summary_line",
    "mix_garbage",
    "mix_garbage_dirs",
    "class_weights",
]
