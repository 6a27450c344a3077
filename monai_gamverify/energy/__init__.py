"""Attribution energy: per-volume AE (:mod:`.attribution`), leave-one-out Spearman statistics (:mod:`.statistics`),
tables, figures and reports (:mod:`.report`); the bundle workflow, slice-aggregating inferer and AE
transforms/handlers (:mod:`.workflow`)."""

from __future__ import annotations

from monai_gamverify.energy.attribution import (
    attribution_energy,
    cohort_energy,
    energy_from_maps,
    volume_energy,
    volume_energy_multi,
)
from monai_gamverify.energy.report import (
    atypical_cases,
    energy_report,
    energy_scatter_png,
    energy_table,
    table_from_results,
)
from monai_gamverify.energy.statistics import SpearmanLOO, holm_adjust, spearman_loo
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
    "table_from_results",
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
