"""Deprecated location: the AE code now lives in :mod:`.attribution`, :mod:`.statistics` and :mod:`.report`.

Import from :mod:`monai_gamverify.energy` instead; this module only re-exports those names for callers not yet
updated and will be removed.
"""

from __future__ import annotations

from monai_gamverify.energy.attribution import (
    attribution_energy,
    cohort_energy,
    energy_from_maps,
    volume_energy,
    volume_energy_multi,
)
from monai_gamverify.energy.report import atypical_cases, energy_report, energy_scatter_png, energy_table
from monai_gamverify.energy.statistics import SpearmanLOO, holm_adjust, spearman_loo

__all__ = [
    "attribution_energy",
    "SpearmanLOO",
    "spearman_loo",
    "holm_adjust",
    "energy_table",
    "atypical_cases",
    "volume_energy",
    "volume_energy_multi",
    "cohort_energy",
    "energy_from_maps",
    "energy_scatter_png",
    "energy_report",
]
