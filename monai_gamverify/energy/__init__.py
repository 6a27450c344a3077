"""Attribution energy: per-volume AE, leave-one-out Spearman statistics and reports (:mod:`.analysis`); the
bundle workflow, slice-aggregating inferer and AE transforms/handlers (:mod:`.workflow`)."""

from __future__ import annotations

from monai_gamverify.energy.analysis import (
    SpearmanLOO,
    attribution_energy,
    atypical_cases,
    cohort_energy,
    energy_from_maps,
    energy_report,
    energy_scatter_png,
    energy_table,
    holm_adjust,
    spearman_loo,
    volume_energy,
    volume_energy_multi,
)
from monai_gamverify.energy.workflow import (
    AttributionEnergyd,
    AttributionEnergyHandler,
    SliceAggregateInferer,
    SliceCAMd,
    bundle_energy,
    regression_metrics,
)

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
    "SliceAggregateInferer",
    "AttributionEnergyd",
    "SliceCAMd",
    "AttributionEnergyHandler",
    "regression_metrics",
    "bundle_energy",
]
