"""Attribution energy: per-volume AE (:mod:`.attribution`), leave-one-out Spearman statistics (:mod:`.statistics`),
tables, figures and reports (:mod:`.report`), the AE of a bundle over a datalist (:mod:`.workflow`).

The workflow pieces live in their role packages and are re-exported here on first access (earlier imports and bundle
configs keep working): ``SliceAggregateInferer`` (:mod:`monai_gamverify.inferers`), ``AttributionEnergyd`` and
``SliceCAMd`` (:mod:`monai_gamverify.transforms`), ``regression_metrics`` (:mod:`monai_gamverify.metrics`),
``AttributionEnergyHandler`` (:mod:`monai_gamverify.handlers`).
"""

from __future__ import annotations

import importlib
from typing import Any

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

#: names that moved to their role packages, imported on first access (PEP 562): no import cycle, no eager ignite/pandas
_MOVED = {
    "SliceAggregateInferer": "monai_gamverify.inferers",
    "AttributionEnergyd": "monai_gamverify.transforms.energy",
    "SliceCAMd": "monai_gamverify.transforms.energy",
    "AttributionEnergyHandler": "monai_gamverify.handlers.energy",
    "regression_metrics": "monai_gamverify.metrics.regression",
    "bundle_energy": "monai_gamverify.energy.workflow",  # lazy: the bundle workflow loads ignite, pandas, tqdm
}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        value = getattr(importlib.import_module(_MOVED[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'monai_gamverify.energy' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_MOVED))
