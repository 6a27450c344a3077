"""monai-gamverify: is this model suitable for this image? Answers from the model's own attention, on MONAI.

The public names below are imported on first use (PEP 562), so ``import monai_gamverify`` stays light (no pandas,
no scipy.stats); each subpackage holds one concern: :mod:`.visualize` (hooks, CAM methods, feature maps, plots),
:mod:`.metrics` (similarity, explanation quality, calibration), :mod:`.verification`, :mod:`.energy`,
:mod:`.kplus1`, :mod:`.transforms`, :mod:`.handlers`, :mod:`.networks`, :mod:`.data`, :mod:`.io`, :mod:`.bundle`
and :mod:`.apps` (engine, cohort, demo, report, integrations).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "GradCAM": "monai_gamverify.visualize.cam",
    "GradCAMpp": "monai_gamverify.visualize.cam",
    "ScoreCAM": "monai_gamverify.visualize.cam",
    "CAMResult": "monai_gamverify.visualize.cam",
    "similarity_metrics": "monai_gamverify.metrics.similarity",
    "attribution_energy": "monai_gamverify.energy",
    "spearman_loo": "monai_gamverify.energy",
}

__all__ = [
    "GradCAM",
    "GradCAMpp",
    "ScoreCAM",
    "CAMResult",
    "similarity_metrics",
    "attribution_energy",
    "spearman_loo",
    "__version__",
]

if TYPE_CHECKING:
    from monai_gamverify.energy import attribution_energy, spearman_loo
    from monai_gamverify.metrics.similarity import similarity_metrics
    from monai_gamverify.visualize.cam import CAMResult, GradCAM, GradCAMpp, ScoreCAM


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'monai_gamverify' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
