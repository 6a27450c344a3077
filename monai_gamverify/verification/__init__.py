"""Model suitability from attention: reference map (:mod:`.reference`), feature tables (:mod:`.tables`), the
Random-Forest verifier (:mod:`.verifier`), the report directory of :func:`run_verification` (:mod:`.workflow`),
the cross-validation protocol (:mod:`.protocol`: leave-models-out whenever there are >= 2 models per label),
model-level verdicts with bootstrap intervals (:mod:`.models`), the one-class mode with conformal p-values
(:mod:`.oneclass`), maps of every architecture on one grid (:mod:`.grid`), Method 2 tables (:mod:`.featuremap_table`)
and the bundle-level workflow (:mod:`.bundles`)."""

from __future__ import annotations

from monai_gamverify.verification.bundles import (
    check_same_task,
    format_summary,
    verify_bundles,
)
from monai_gamverify.verification.featuremap_table import (
    feature_map_table,
)
from monai_gamverify.verification.grid import (
    CommonGrid,
    rank_normalize,
)
from monai_gamverify.verification.models import (
    VERDICTS,
    bootstrap_mean_ci,
    format_verdicts,
    model_level_auc,
    model_verdicts,
    verdict_of,
    verdicts_to_dict,
)
from monai_gamverify.verification.oneclass import (
    ONE_CLASS_PROTOCOL,
    OneClassResult,
    conformal_pvalue,
    nonconformity_scores,
    one_class_verify,
    run_one_class,
)
from monai_gamverify.verification.protocol import (
    LEAVE_MODELS_OUT,
    STRATIFIED_ROWS,
    SUBJECT_GROUPED,
    make_splits,
    protocol_name,
    resolve_groups,
)
from monai_gamverify.verification.reference import (
    ReferenceMap,
    reference_map,
)
from monai_gamverify.verification.tables import (
    FEATURE_PREFIX,
    KNOWN_NON_FEATURES,
    META_COLUMNS,
    feature_columns,
    feature_table,
    summary_table,
)
from monai_gamverify.verification.verifier import (
    CrossValidationResult,
    SuitabilityVerifier,
    roc_png,
)
from monai_gamverify.verification.workflow import (
    SegmentationTarget,
    run_verification,
)

__all__ = [
    "verify_bundles",
    "format_summary",
    "check_same_task",
    "feature_map_table",
    "CommonGrid",
    "rank_normalize",
    "VERDICTS",
    "bootstrap_mean_ci",
    "verdict_of",
    "model_verdicts",
    "model_level_auc",
    "format_verdicts",
    "verdicts_to_dict",
    "ONE_CLASS_PROTOCOL",
    "conformal_pvalue",
    "nonconformity_scores",
    "OneClassResult",
    "one_class_verify",
    "run_one_class",
    "LEAVE_MODELS_OUT",
    "SUBJECT_GROUPED",
    "STRATIFIED_ROWS",
    "protocol_name",
    "resolve_groups",
    "make_splits",
    "META_COLUMNS",
    "KNOWN_NON_FEATURES",
    "FEATURE_PREFIX",
    "ReferenceMap",
    "reference_map",
    "feature_table",
    "feature_columns",
    "SuitabilityVerifier",
    "CrossValidationResult",
    "summary_table",
    "roc_png",
    "run_verification",
    "SegmentationTarget",
]
