"""Model suitability from attention: reference map, feature tables and the Random-Forest verifier
(:mod:`.verifier`), and the bundle-level workflow (:mod:`.bundles`)."""

from __future__ import annotations

from monai_gamverify.verification.bundles import (
    format_summary,
    verify_bundles,
)
from monai_gamverify.verification.featuremap_table import (
    feature_map_table,
)
from monai_gamverify.verification.verifier import (
    META_COLUMNS,
    CrossValidationResult,
    ReferenceMap,
    SuitabilityVerifier,
    feature_columns,
    feature_table,
    reference_map,
    roc_png,
    run_verification,
    summary_table,
)

__all__ = [
    "verify_bundles",
    "format_summary",
    "feature_map_table",
    "META_COLUMNS",
    "ReferenceMap",
    "reference_map",
    "feature_table",
    "feature_columns",
    "SuitabilityVerifier",
    "CrossValidationResult",
    "summary_table",
    "roc_png",
    "run_verification",
]
