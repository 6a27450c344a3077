"""The demo's models and sizes (:class:`DemoSettings`), where the bundles and the shipped weights are."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = ["DemoSettings", "demo_settings", "MODELS", "WEIGHTS_DIR", "N_STAGES", "SOS_NAMES", "bundles_dir",
           "torch_device"]  # fmt: skip

#: where ``scripts/make_demo_weights.py`` writes the shipped weights and their ``manifest.json``
WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "demo_weights"
#: number of stages of a demo run
N_STAGES = 8
#: the SOS stage names
SOS_NAMES = ["stage1_open", "stage2", "stage3", "stage4", "stage5_fused"]

#: the demo's models: bundle, training cohort, bundle config overrides (training and loading), seed offset
MODELS: dict[str, dict[str, Any]] = {
    "sos_ref": {"bundle": "sos_staging", "data": "sos", "overrides": {"network_name": "small_cnn"}, "seed": 0},
    "sos_b": {
        "bundle": "sos_staging",
        "data": "sos",
        "overrides": {"network_name": "small_cnn", "networks#small_cnn#width": 12},
        "seed": 1,
    },
    "chin": {
        "bundle": "sos_staging",
        "data": "chin",
        "overrides": {"network_name": "small_cnn", "num_classes": 2, "class_names": ["camouflage", "surgery"]},
        "seed": 2,
    },
    "cvm": {
        "bundle": "sos_staging",
        "data": "cvm",
        "overrides": {"network_name": "small_cnn", "num_classes": 6, "class_names": [f"CS{i}" for i in range(1, 7)]},
        "seed": 5,
    },
    "sos_kplus1": {
        "bundle": "sos_staging",
        "data": "garbage",
        "overrides": {"network_name": "small_cnn", "num_classes": 6, "class_names": [*SOS_NAMES, "garbage"]},
        "seed": 3,
    },
    "quality": {
        "bundle": "cbct_quality",
        "data": "quality",
        # pinned (not the bundle's defaults, which may move on): the shipped weights were trained with these
        "overrides": {"network_name": "small_cnn", "image_size": 32, "slices_per_volume": 16, "learning_rate": 0.003},
        "seed": 4,
    },
    # a shortcut ("Clever Hans") model: trained on SOS volumes carrying a burned-in marker whose intensity encodes
    # the stage (cohort ``sos_marker``); this DenseNet learned the marker instead of the anatomy (measured in every
    # run: accurate on SOS volumes with the marker, near chance without; another training seed, 6, learned both)
    "sos_shortcut": {
        "bundle": "sos_staging",
        "data": "sos_marker",
        "overrides": {"network_name": "densenet_tiny"},
        "seed": 8,
    },
}


@dataclass(frozen=True)
class DemoSettings:
    """Sizes of one demo run.

    Attributes:
        size: edge of the SOS / chin / CVM volumes (voxels).
        quality_size: edge of the image-quality volumes (at least 32).
        n: subjects per cohort (``sos``, ``chin``, ``cvm``, ``quality``, ``noise``, ``sos_marker``: SOS with the
            label-encoding marker cue, the shortcut model's training data).
        epochs: training epochs per model (only used when training).
        val_interval: validation interval of the training runs (epochs).
        garbage_ratio: garbage training items per real item of the K+1 model.
        n_examples: SOS test volumes explained in stage 3.
        n_splits: verifier cross-validation folds.
        n_estimators: verifier trees.
        n_boot: bootstrap resamples of the AE analysis.
        n_screen_calibration: extra SOS volumes (seen by no model) that calibrate the in-distribution screen.
        n_target: unlabeled SOS target volumes (seen by no model) on which the label-free verdict judges every
            candidate (clean, and the same volumes carrying the marker cue).
    """

    size: int = 32
    quality_size: int = 32
    n: dict[str, int] = field(
        default_factory=lambda: {"sos": 100, "chin": 60, "cvm": 40, "quality": 120, "noise": 10, "sos_marker": 100}
    )
    epochs: dict[str, int] = field(
        default_factory=lambda: {
            "sos_ref": 30,
            "sos_b": 30,
            "chin": 20,
            "cvm": 20,
            "sos_kplus1": 30,
            "quality": 20,
            "sos_shortcut": 30,
        }
    )
    val_interval: int = 2
    garbage_ratio: float = 0.5
    n_examples: int = 3
    n_splits: int = 5
    n_estimators: int = 200
    n_boot: int = 1000
    n_screen_calibration: int = 40
    n_target: int = 20


def demo_settings(quick: bool = False) -> DemoSettings:
    """The full demo settings, or tiny ones (``quick``: 24³ volumes, a handful of subjects, 1 epoch) for tests.

    Example:
        >>> demo_settings(quick=True).epochs["sos_ref"]
        1
    """
    if not quick:
        return DemoSettings()
    return DemoSettings(
        size=24,
        quality_size=32,
        n={"sos": 20, "chin": 10, "cvm": 18, "quality": 14, "noise": 3, "sos_marker": 20},
        epochs=dict.fromkeys(MODELS, 1),
        val_interval=1,
        n_examples=1,
        n_splits=2,
        n_estimators=20,
        n_boot=50,
        n_screen_calibration=20,
    )


def bundles_dir() -> Path:
    """The repository's ``bundles/`` folder (the demo trains and loads the bundles there), or ``$GAMVERIFY_BUNDLES``.

    Returns:
        The folder holding ``sos_staging``, ``cbct_quality``, ...

    Example:
        >>> (bundles_dir() / "sos_staging").is_dir()
        True

    Raises:
        FileNotFoundError: the package is not run from a source checkout (``pip install -e .``).
    """
    root = Path(os.environ.get("GAMVERIFY_BUNDLES", Path(__file__).resolve().parents[3] / "bundles"))
    if not (root / "sos_staging" / "configs" / "train.json").is_file():
        raise FileNotFoundError(
            f"bundles not found at {root}: run the demo from a source checkout (pip install -e .) "
            "or set GAMVERIFY_BUNDLES to the repository's bundles/ folder"
        )
    return root


def torch_device(device: str | torch.device | None) -> torch.device:
    """``device``, or CUDA when available, else the CPU."""
    return torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
