"""Saving and loading a fitted screen: ``screen.json`` (settings, fitted scalars, SHA-256 of the arrays and of the
JSON content) and ``screen.npz`` (arrays only, no pickled objects)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from monai_gamverify.io import atomic_path
from monai_gamverify.screening.detectors import ClassMahalanobis, KNNDetector, RelativeMahalanobis, RobustScaler

__all__ = ["FORMAT_VERSION", "ScreenFileError", "screen_arrays", "screen_config", "save_screen", "read_screen"]

FORMAT_VERSION = 3  # 2: the layout detector; 3: the observation settings (read: 2 and 3)
_READS = (2, 3)
_JSON = "screen.json"
_NPZ = "screen.npz"


class ScreenFileError(ValueError):
    """A saved screen that is missing, malformed or was modified after saving."""


def _sha256_arrays(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(name.encode())
        h.update(str(a.dtype.str).encode())
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _sha256_json(obj: dict) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def screen_arrays(screen: Any) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {
        "cal_scores": screen.cal_scores_,
        "cal_stat": screen.cal_stat_,
        "score_median": screen.score_scaler_.median_,
        "score_scale": screen.score_scaler_.scale_,
        "profile_median": screen.profile_scaler_.median_,
        "profile_scale": screen.profile_scaler_.scale_,
        "profile_min": screen.profile_min_,
        "profile_max": screen.profile_max_,
        "hist_ref": screen.hist_ref_,
    }
    if hasattr(screen, "cam_ref_"):
        arrays["cam_ref"] = screen.cam_ref_
    for name, det in screen.detectors_.items():
        arrays.update(det.state(f"{name}__"))
    return {k: np.asarray(v) for k, v in arrays.items()}


def screen_config(screen: Any) -> dict[str, Any]:
    return {
        "alpha": screen.alpha,
        "window": screen.window,
        "early_layers": screen.early_layers,
        "head": screen.head,
        "cam_layer": screen.cam_layer,
        "cam_method": screen.cam_method,
        "garbage_index": screen.garbage_index,
        "k": screen.k,
        "combine": screen.combine,
        "spatial_dims": screen.spatial_dims,
        "channels": screen.channels,
        "reg": screen.reg,
        "modality": screen.modality,
        "bundle": screen.bundle,
        "attention_size": screen.attention_size,
        "use": screen.use,
        "task": screen.task,  # absent in files of earlier versions: read as "classification"
    }


def save_screen(screen: Any, directory: str | os.PathLike) -> Path:
    """Write ``screen.json`` (settings, fitted scalars, SHA-256 of the arrays and of the JSON content) and
    ``screen.npz`` (arrays only, no pickled objects).

    Example:
        >>> screen.save("screens/sos_ref")
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    arrays = screen_arrays(screen)
    if any(a.dtype == object for a in arrays.values()):
        raise RuntimeError("refusing to save object arrays")
    content = {
        "format": "monai_gamverify.screening",
        "format_version": FORMAT_VERSION,
        "config": screen_config(screen),
        "detectors": screen.detectors,
        "intensity_width": screen.intensity_width_,
        "hist_range": None if screen.hist_range_ is None else list(screen.hist_range_),
        "orientations": screen.orientations_,
        "n_fit": screen.n_fit_,
        "n_cal": screen.n_cal_,
        "seed": screen.seed_,
        "observation": getattr(screen, "observation_", None),
        "arrays_sha256": _sha256_arrays(arrays),
    }
    content["content_sha256"] = _sha256_json(content)
    with atomic_path(out / _NPZ) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
    with atomic_path(out / _JSON) as tmp:
        tmp.write_text(json.dumps(content, indent=2) + "\n")
    return out


def read_screen(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(settings, fitted state)`` of a screen written by :func:`save_screen`, for
    :meth:`monai_gamverify.screening.Screen.load`; refuse a missing, malformed or modified file.

    Raises:
        ScreenFileError: the JSON or the arrays do not match their recorded SHA-256, or a file is missing.
    """
    d = Path(directory)
    jpath, npath = d / _JSON, d / _NPZ
    for p in (jpath, npath):
        if not p.is_file():
            raise ScreenFileError(f"not a saved screen: {p} is missing")
    try:
        content = json.loads(jpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ScreenFileError(f"screen file {jpath} is not valid JSON: {err}") from err
    if not isinstance(content, dict) or content.get("format") != "monai_gamverify.screening":
        raise ScreenFileError(f"{jpath} is not a monai_gamverify screen")
    recorded = content.pop("content_sha256", None)
    if recorded != _sha256_json(content):
        raise ScreenFileError(f"screen file {jpath} was modified after saving (SHA-256 of its content differs)")
    if content.get("format_version") not in _READS:
        raise ScreenFileError(
            f"{jpath} has format version {content.get('format_version')}; this version reads {FORMAT_VERSION}: fit "
            "the screen again (`gamverify screen fit ...`)"
        )
    try:
        with np.load(npath, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as err:  # zip/format errors of a damaged file
        raise ScreenFileError(f"cannot read screen arrays {npath}: {type(err).__name__}: {err}") from err
    if _sha256_arrays(arrays) != content.get("arrays_sha256"):
        raise ScreenFileError(f"screen arrays {npath} were modified after saving (SHA-256 differs)")
    cfg = content["config"]
    if cfg.get("window") is not None:
        cfg["window"] = tuple(cfg["window"])
    score_scaler, profile_scaler = RobustScaler(), RobustScaler()
    score_scaler.median_, score_scaler.scale_ = arrays["score_median"], arrays["score_scale"]
    profile_scaler.median_, profile_scaler.scale_ = arrays["profile_median"], arrays["profile_scale"]
    reg, k = float(cfg.get("reg", 1e-3)), int(cfg.get("k", 5))
    detectors: dict[str, Any] = {}
    for name in content["detectors"]:
        if name.startswith("maha") or name in ("attention", "layout"):
            detectors[name] = ClassMahalanobis.from_state(arrays, f"{name}__", reg)
        elif name.startswith("rmaha"):
            detectors[name] = RelativeMahalanobis.from_state(arrays, f"{name}__", reg)
        elif name.startswith("knn"):
            detectors[name] = KNNDetector.from_state(arrays, f"{name}__", k)
    state: dict[str, Any] = {
        "cal_scores_": arrays["cal_scores"],
        "cal_stat_": arrays["cal_stat"],
        "score_scaler_": score_scaler,
        "profile_scaler_": profile_scaler,
        "profile_min_": arrays["profile_min"],
        "profile_max_": arrays["profile_max"],
        "hist_ref_": arrays["hist_ref"],
        "hist_range_": None if content["hist_range"] is None else tuple(content["hist_range"]),
        "orientations_": list(content["orientations"]),
        "intensity_width_": float(content["intensity_width"]),
        "detectors_": detectors,
        "n_fit_": int(content["n_fit"]),
        "n_cal_": int(content["n_cal"]),
        "seed_": int(content["seed"]),
        "observation_": content.get("observation"),  # None in version 2 files: not checked
    }
    if "cam_ref" in arrays:
        state["cam_ref_"] = arrays["cam_ref"]
    return cfg, state
