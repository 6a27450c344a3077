"""The in-distribution screen: is this image like the data the model was made for?

Layers, each a detector with an **anomaly score** (higher = less like the training data):

==================  ======================================================================================
``profile``         data profile (geometry, native intensities, window fractions, foreground, histogram):
                    the largest robust z-score of its features against the training images
``maha_penultimate`` class-conditional Mahalanobis on the classifier head's input
``rmaha_penultimate`` relative Mahalanobis on the same features
``knn_penultimate`` k-th neighbour distance of the L2-normalised features (cosine)
``maha_early``      class-conditional Mahalanobis on an early block's pooled activations (channel mean and std)
``rmaha_early``     relative Mahalanobis on the same
``knn_early``       k-NN on the same
``kplus1``          softmax probability of the garbage class (K+1 models only)
``attention``       Mahalanobis distance of the CAM's similarity features (vs the mean training CAM)
==================  ======================================================================================

**Conformal calibration.** The training images are split (seeded) into a *fit* part, on which the detectors are
fitted, and a held-out *calibration* part. Each detector's p-value is ``(1 + #{s_cal >= s}) / (n_cal + 1)``.
The combined p-value (``combine="maxz"``, the default) ranks one statistic, ``T = max_j z_j``, the largest
robust z-score of the detector scores (medians and MADs from the fit part, after a fixed monotone transform per
detector), against the same statistic on the calibration images; ``combine="bonferroni"`` uses
``min(1, m min_j p_j)``. Either way a new in-distribution image is rejected with probability <= alpha
(exchangeability with the calibration images), whatever the detectors' dependence. ``maxz`` needs only
``n_cal >= 1/alpha - 1`` calibration images to be able to reject; Bonferroni needs ``n_cal >= m/alpha - 1``.
Hard failures of the profile (NaN, constant, wrong dimensionality or channels, a single slice, a window that turns
the image into a constant) reject regardless, with ``p_value = 0``.

Example:
    >>> screen = Screen.from_bundle(bm).fit(bm.network, train_files, labels)
    >>> raw = read_image("new.nii.gz"); x = pre(raw)
    >>> with screen.recorder(bm.network) as rec:        # the engine's one forward (+ backward) pass
    ...     res = cam.explain(x[None])
    >>> screen.score(raw, tensor=x, logits=res.logits[0], activations=rec.activations, cam=res.maps[0])
    {'in_distribution': True, 'p_value': 0.41, 'reasons': [], ...}
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from monai_gamverify.io import atomic_path, write_csv
from monai_gamverify.kplus1 import find_classifier_head
from monai_gamverify.metrics.similarity import DEFAULT_METRICS, similarity_metrics
from monai_gamverify.screening.detectors import (
    ClassMahalanobis,
    KNNDetector,
    RelativeMahalanobis,
    RobustScaler,
    bonferroni,
    conformal_pvalues,
    pool_features,
)
from monai_gamverify.screening.profile import DataProfile, attach_tensor, intensity_window_of, profile_image
from monai_gamverify.screening.reading import ImageReadError, preprocessing_after_loading, read_image
from monai_gamverify.screening.recorder import PENULTIMATE, FeatureRecorder
from monai_gamverify.visualize.hooks import preserved_state
from monai_gamverify.visualize.registry import make_cam

__all__ = ["Screen", "Observation", "DETECTORS", "ScreenFileError", "fit_screen", "run_screen", "load_screen_bundle"]

logger = logging.getLogger(__name__)

DETECTORS = (
    "profile",
    "maha_penultimate",
    "rmaha_penultimate",
    "knn_penultimate",
    "maha_early",
    "rmaha_early",
    "knn_early",
    "kplus1",
    "attention",
)
_DESCRIPTION = {
    "profile": "the image's geometry/intensity profile is atypical",
    "maha_penultimate": "the model's penultimate features are far from every class (Mahalanobis)",
    "rmaha_penultimate": "the model's penultimate features are atypical (relative Mahalanobis)",
    "knn_penultimate": "the model's penultimate features have no close training neighbour (k-NN)",
    "maha_early": "the model's early-layer features are far from every class (Mahalanobis: low-level shift)",
    "rmaha_early": "the model's early-layer features are atypical (relative Mahalanobis: low-level shift)",
    "knn_early": "the model's early-layer features have no close training neighbour (k-NN: low-level shift)",
    "kplus1": "the model's garbage class claims the image",
    "attention": "the model looks at an unusual place (attention similarity features atypical)",
}
FORMAT_VERSION = 1
_JSON = "screen.json"
_NPZ = "screen.npz"


class ScreenFileError(ValueError):
    """A saved screen that is missing, malformed or was modified after saving."""


@dataclass
class Observation:
    """What the screen uses of one image (everything comes from the one forward pass the engine runs anyway).

    Attributes:
        profile: the data profile (with the preprocessed tensor's statistics when it was given).
        penultimate: (D,) pooled input of the classifier head, or ``None``.
        early: (D2,) pooled early-layer activations (channel means and stds, layers concatenated), or ``None``.
        logits: (K,) model output, or ``None``.
        cam: (1, *spatial) CAM normalised to [0, 1], or ``None``.
    """

    profile: DataProfile
    penultimate: np.ndarray | None = None
    early: np.ndarray | None = None
    logits: np.ndarray | None = None
    cam: torch.Tensor | None = None


def _as_np(x: Any) -> np.ndarray:
    t = torch.as_tensor(x).detach().cpu()
    t = t.as_tensor() if hasattr(t, "as_tensor") else t
    return t.to(torch.float64).numpy()


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-7, 1 - 1e-7)
    return np.log(p) - np.log1p(-p)


def _js_distance(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Jensen-Shannon distance (base 2, in [0, 1]) of histograms (rows of p) against q."""
    p = np.atleast_2d(np.asarray(p, float))
    q = np.asarray(q, float)[None]
    m = 0.5 * (p + q)

    def kl(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(a > 0, a * np.log2(a / np.where(b > 0, b, 1)), 0.0).sum(1)

    return np.sqrt(np.clip(0.5 * kl(p, m) + 0.5 * kl(q, m), 0.0, None))


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


class Screen:
    """Layered in-distribution screen with conformal p-values (see the module docstring).

    Args:
        alpha: rejection level; an in-distribution image is rejected with probability <= alpha.
        window: the bundle's intensity window (native units) or ``None``.
        early_layers: early layers whose pooled activations form the early features (``[]``: no early detectors).
        head: name of the classifier head (its input = penultimate features); ``None``: no penultimate detectors.
        cam_layer: CAM target layer (``None``: no attention detector).
        cam_method: ``gradcam``, ``gradcampp`` or ``scorecam``.
        garbage_index: output column of the garbage class of a K+1 model (``None``: no K+1 detector).
        k: neighbour rank of the k-NN detectors.
        combine: ``"maxz"`` or ``"bonferroni"``.
        spatial_dims: spatial axes the model expects.
        channels: channels the model expects.
        reg: covariance ridge of the Mahalanobis detectors (relative to the mean variance).
        modality: ``"CT"`` when the window is in Hounsfield units (messages say "not CT-like").
        bundle: where the model comes from, for :func:`run_screen` (``root``, ``config``, ``overrides``,
            ``checkpoint``).
        attention_size: CAMs are average-pooled to at most this many voxels per axis before their similarity
            features are computed.
        use: the detectors to combine (default: every one the model allows); hard failures always apply.

    Example:
        >>> screen = Screen(window=(-1000, 2000), early_layers=["stem"], head="head", cam_layer="res4")
        >>> screen.fit(net, images, labels, preprocess=pre, seed=0)
    """

    def __init__(
        self,
        *,
        alpha: float = 0.05,
        window: tuple[float, float] | None = None,
        early_layers: Sequence[str] = (),
        head: str | None = None,
        cam_layer: str | None = None,
        cam_method: str = "gradcam",
        garbage_index: int | None = None,
        k: int = 5,
        combine: str = "maxz",
        spatial_dims: int = 3,
        channels: int | None = 1,
        reg: float = 1e-3,
        modality: str | None = None,
        bundle: dict | None = None,
        attention_size: int = 16,
        use: Sequence[str] | None = None,
    ) -> None:
        if not 0 < alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
        if combine not in ("maxz", "bonferroni"):
            raise ValueError(f"combine must be 'maxz' or 'bonferroni', got {combine!r}")
        self.alpha = float(alpha)
        self.window = None if window is None else (float(window[0]), float(window[1]))
        self.early_layers = list(early_layers)
        self.head = head
        self.cam_layer = cam_layer
        self.cam_method = cam_method
        self.garbage_index = None if garbage_index is None else int(garbage_index)
        self.k = int(k)
        self.combine = combine
        self.spatial_dims = int(spatial_dims)
        self.channels = None if channels is None else int(channels)
        self.reg = float(reg)
        self.modality = modality
        self.bundle = dict(bundle or {})
        self.attention_size = int(attention_size)
        unknown = sorted(set(use or ()) - set(DETECTORS))
        if unknown:
            raise ValueError(f"unknown detector(s) {unknown}; choose from {list(DETECTORS)}")
        self.use = None if use is None else [d for d in DETECTORS if d in use]
        self.fitted_ = False

    # ------------------------------------------------------------------------------------------------ building
    @classmethod
    def from_bundle(
        cls,
        bundle: Any,
        *,
        config: str = "inference.json",
        overrides: dict | None = None,
        checkpoint: str | os.PathLike | None = None,
        **kwargs: Any,
    ) -> Screen:
        """A screen configured from a :class:`monai_gamverify.bundle.BundleModel`: intensity window of its
        ``ScaleIntensityRanged``, its feature layers (early), classifier head, CAM layer and method, garbage class
        (a class named ``garbage``), modality and channels from its metadata. ``kwargs`` override any of these.

        Example:
            >>> screen = Screen.from_bundle(load_bundle("bundles/sos_staging"), alpha=0.05)
        """
        try:
            head = find_classifier_head(bundle.network)[0]
        except ValueError:
            head = None
        early = list(bundle.feature_layers) or list(getattr(bundle.network, "feature_layers", ()))
        # the config's class names follow overrides (a K+1 bundle adds "garbage"); metadata describes the default
        class_names = bundle.parser.get_parsed_content("class_names") if "class_names" in bundle.parser else None
        names = [str(n).lower() for n in (class_names or bundle.class_names)]
        garbage = names.index("garbage") if "garbage" in names else None
        image_fmt = bundle.metadata.get("network_data_format", {}).get("inputs", {}).get("image", {})
        modality = "CT" if str(image_fmt.get("format", "")).lower() == "hounsfield" else image_fmt.get("modality")
        cam_method = bundle.parser.get_parsed_content("cam_method") if "cam_method" in bundle.parser else "gradcam"
        roi = bundle.parser.get_parsed_content("roi_size") if "roi_size" in bundle.parser else None
        settings: dict[str, Any] = {
            "window": intensity_window_of(bundle.preprocessing()),
            "early_layers": early,
            "head": head,
            "cam_layer": bundle.target_layer,
            "cam_method": cam_method,
            "garbage_index": garbage,
            "modality": modality,
            "spatial_dims": len(roi) if roi is not None else 3,
            "channels": int(image_fmt.get("num_channels", 1)),
            "bundle": {
                "root": str(Path(bundle.root).resolve()),
                "config": config,
                "overrides": dict(overrides or {}),
                "checkpoint": None if checkpoint is None else str(Path(checkpoint).resolve()),
            },
        }
        settings.update(kwargs)
        return cls(**settings)

    @property
    def detectors(self) -> list[str]:
        """Names of the detectors this screen uses (its inputs decide: head, early layers, garbage class, CAM)."""
        return self._active()

    def recorder(self, model: nn.Module) -> FeatureRecorder:
        """A :class:`FeatureRecorder` for this screen's layers: enter it around the engine's forward pass."""
        return FeatureRecorder(model, self.early_layers, self.head)

    def profile(self, image: Any, tensor: Any = None, name: str | None = None) -> DataProfile:
        """The data profile of a raw channel-first image (hard failures decided here, before any model pass)."""
        prof = profile_image(
            image,
            self.window,
            spatial_dims=self.spatial_dims,
            channels=self.channels,
            hist_range=getattr(self, "hist_range_", None),
            name=name,
        )
        if tensor is not None and not prof.hard_failures:
            attach_tensor(prof, tensor)
        return prof

    def observe(
        self,
        image: Any = None,
        *,
        tensor: Any = None,
        logits: Any = None,
        activations: dict[str, Any] | None = None,
        cam: Any = None,
        profile: DataProfile | None = None,
    ) -> Observation:
        """Turn what the engine has for one image into an :class:`Observation` (no model call).

        Args:
            image: raw channel-first image (``MetaTensor``); not needed when ``profile`` is given.
            tensor: the preprocessed (C, *spatial) tensor the model saw.
            logits: (K,) or (1, K) output.
            activations: dict from :meth:`recorder` (layer name -> (1, C, *spatial), ``"penultimate"`` -> (1, D)).
            cam: normalised CAM (1, *spatial) or (1, 1, *spatial) in [0, 1].
            profile: a profile already computed by :meth:`profile`.
        """
        if profile is None:
            if image is None:
                raise ValueError("observe needs the raw image or its profile")
            profile = self.profile(image, tensor)
        elif tensor is not None and profile.windowed_std is None and not profile.hard_failures:
            attach_tensor(profile, tensor)
        obs = Observation(profile)
        if profile.hard_failures:
            return obs
        acts = activations or {}
        if PENULTIMATE in acts:
            obs.penultimate = pool_features(torch.as_tensor(acts[PENULTIMATE]).reshape(1, -1))[0]
        if self.early_layers and all(n in acts for n in self.early_layers):
            parts = [pool_features(_batch1(acts[n]), moments=2)[0] for n in self.early_layers]
            obs.early = np.concatenate(parts)
        if logits is not None:
            obs.logits = _as_np(logits).reshape(-1)
        if cam is not None:
            c = torch.as_tensor(cam).detach().cpu().float()
            c = c.as_tensor() if hasattr(c, "as_tensor") else c
            while c.ndim < self.spatial_dims + 2:
                c = c.unsqueeze(0)
            obs.cam = c[0]
        return obs

    def observe_image(
        self,
        network: nn.Module,
        image: Any,
        preprocess: Callable[[Any], torch.Tensor] | None = None,
        cam: Any = None,
    ) -> Observation:
        """Read (a path), profile, preprocess and run ``network`` once (CAM forward/backward with the recorder).

        A hard failure of the profile, or a preprocessing that fails, returns before the model is called.
        """
        img = read_image(image) if isinstance(image, (str, os.PathLike)) else image
        prof = self.profile(img)
        if prof.hard_failures:
            return Observation(prof)
        try:
            x = (preprocess or (lambda t: torch.as_tensor(t, dtype=torch.float32)))(img)
        except Exception as err:  # the bundle's transforms refuse it: a reason, not a crash
            prof.hard_failures.append(f"the bundle's preprocessing fails on this image: {type(err).__name__}: {err}")
            return Observation(prof)
        x = x.as_tensor() if hasattr(x, "as_tensor") else x
        attach_tensor(prof, x)
        if prof.hard_failures:
            return Observation(prof)
        device = next((p.device for p in network.parameters()), torch.device("cpu"))
        xb = x[None].to(device=device, dtype=torch.float32)
        maps = None
        with self.recorder(network) as rec:
            if self.cam_layer is not None:
                engine = cam if cam is not None else _make_cam(network, self.cam_layer, self.cam_method)
                res = engine.explain(xb)
                logits, maps = res.logits, res.maps
            else:
                with preserved_state(network), torch.no_grad():
                    logits = network(xb)
        return self.observe(tensor=x, logits=logits, activations=rec.activations, cam=maps, profile=prof)

    # ---------------------------------------------------------------------------------------------- detectors
    def _active(self) -> list[str]:
        out = ["profile"]
        if self.head is not None:
            out += ["maha_penultimate", "rmaha_penultimate", "knn_penultimate"]
        if self.early_layers:
            out += ["maha_early", "rmaha_early", "knn_early"]
        if self.garbage_index is not None:
            out.append("kplus1")
        if self.cam_layer is not None:
            out.append("attention")
        return out if self.use is None else [d for d in out if d in self.use]

    def _profile_matrix(self, obs: Sequence[Observation]) -> np.ndarray:
        rows = []
        for o in obs:
            v = o.profile.vector()
            js = np.nan
            if self.hist_ref_.size and len(o.profile.histogram) == self.hist_ref_.size:
                js = _js_distance(np.asarray(o.profile.histogram), self.hist_ref_)[0]
            rows.append(np.append(v, js))
        return np.vstack(rows)

    def _attention_grid(self, cams: torch.Tensor) -> torch.Tensor:
        """(N, 1, *spatial) maps average-pooled to at most ``attention_size`` voxels per axis (a CAM carries no more
        detail than its target layer's grid; this bounds the cost of the similarity features on large inputs)."""
        size = [min(int(s), self.attention_size) for s in cams.shape[2:]]
        if list(cams.shape[2:]) == size:
            return cams
        pool = (F.adaptive_avg_pool3d, F.adaptive_avg_pool2d)[0 if cams.ndim == 5 else 1]
        return pool(cams, size).clamp(0, 1)

    def _attention_features(self, cams: torch.Tensor) -> np.ndarray:
        ref = torch.as_tensor(self.cam_ref_, dtype=torch.float32)
        cams = self._attention_grid(cams)
        if tuple(cams.shape[2:]) != tuple(ref.shape[1:]):
            mode = "trilinear" if ref.ndim == 4 else "bilinear"
            cams = F.interpolate(cams, size=tuple(ref.shape[1:]), mode=mode, align_corners=False).clamp(0, 1)
        sims = similarity_metrics(cams, ref[None], metrics=list(DEFAULT_METRICS))
        return np.stack([sims[m].detach().cpu().double().numpy() for m in DEFAULT_METRICS], axis=1)

    def _raw_scores(self, obs: Sequence[Observation], loo: bool = False) -> np.ndarray:
        """(N, len(DETECTORS)) anomaly scores; NaN where a detector is inactive or its input is missing."""
        n = len(obs)
        out = np.full((n, len(DETECTORS)), np.nan)
        ok = np.array([not o.profile.hard_failures for o in obs])
        col = {d: i for i, d in enumerate(DETECTORS)}
        active = self._active()
        if ok.any() and "profile" in active:
            prof = self._profile_matrix([o for o, g in zip(obs, ok) if g])
            z = np.abs(self.profile_scaler_.transform(prof))
            out[ok, col["profile"]] = np.nanmax(np.where(np.isnan(z), -np.inf, z), axis=1)
        for layer in ("penultimate", "early"):
            names = [d for d in (f"maha_{layer}", f"rmaha_{layer}", f"knn_{layer}") if d in active]
            have = np.array([g and getattr(o, layer) is not None for o, g in zip(obs, ok)])
            if not names or not have.any():
                continue
            feats = np.vstack([getattr(o, layer) for o, h in zip(obs, have) if h])
            for d in names:
                det = self.detectors_[d]
                out[have, col[d]] = det.score(feats, exclude_self=loo) if d.startswith("knn") else det.score(feats)
        if "kplus1" in active:
            for i, o in enumerate(obs):
                if ok[i] and o.logits is not None and o.logits.size > self.garbage_index:
                    out[i, col["kplus1"]] = float(torch.softmax(torch.as_tensor(o.logits), 0)[self.garbage_index])
        if "attention" in active:
            idx = [i for i, o in enumerate(obs) if ok[i] and o.cam is not None]
            if idx:
                cams = torch.stack([obs[i].cam for i in idx])
                out[idx, col["attention"]] = self.detectors_["attention"].score(self._attention_features(cams))
        return out

    @staticmethod
    def _monotone(raw: np.ndarray) -> np.ndarray:
        """Fixed monotone transforms that make each detector's scores roughly symmetric before the robust z-score
        (p-values, being ranks, do not change)."""
        t = raw.copy()
        col = {d: i for i, d in enumerate(DETECTORS)}
        for d in ("maha_penultimate", "maha_early", "attention"):
            t[:, col[d]] = np.sqrt(np.clip(t[:, col[d]], 0.0, None))
        t[:, col["profile"]] = np.log1p(np.clip(t[:, col["profile"]], 0.0, None))
        t[:, col["kplus1"]] = _logit(t[:, col["kplus1"]])
        return t

    def _statistic(self, raw: np.ndarray) -> np.ndarray:
        z = self.score_scaler_.transform(self._monotone(raw))
        allnan = np.isnan(z).all(axis=1)
        stat = np.nanmax(np.where(np.isnan(z), -np.inf, z), axis=1)
        return np.where(allnan, np.nan, stat)

    # ------------------------------------------------------------------------------------------------------ fit
    def fit(
        self,
        network: nn.Module,
        images: Sequence[Any],
        labels: Sequence[int] | None = None,
        *,
        preprocess: Callable[[Any], torch.Tensor] | None = None,
        calibration: Sequence[Any] | None = None,
        calibration_fraction: float = 0.35,
        seed: int = 0,
    ) -> Screen:
        """Fit the detectors on in-distribution images and calibrate them on held-out in-distribution images.

        The calibration images must be exchangeable with the images the screen will judge: **not** images the model
        was trained on (its features are tighter on those, and a screen calibrated on them rejects too many new
        in-distribution images). Give them as ``calibration`` (e.g. a validation split plus unseen images of the
        same source); without it, a seeded random part of ``images`` is held out, which is valid only when the
        model never saw ``images``.

        Args:
            network: the model (eval mode is set for the passes and restored).
            images: paths (any format :func:`read_image` reads) or raw channel-first ``MetaTensor`` s.
            labels: class of every image (class-conditional Mahalanobis); ``None``: the model's predictions.
            preprocess: raw image -> the tensor the model sees (e.g. :func:`preprocessing_after_loading`).
            calibration: held-out in-distribution images for the conformal calibration (``None``: a random part
                of ``images``).
            calibration_fraction: share of ``images`` held out when ``calibration`` is ``None``.
            seed: seed of the fit/calibration split.

        Returns:
            self.
        """
        cam = _make_cam(network, self.cam_layer, self.cam_method) if self.cam_layer is not None else None
        if self.window is None:  # one histogram range for all images: the median 1st-99th percentile range
            profs = [self.profile(read_image(i) if isinstance(i, (str, os.PathLike)) else i) for i in images]
            good = [p for p in profs if not p.hard_failures] or profs
            p1 = float(np.median([p.percentiles["p1"] for p in good]))
            p99 = float(np.median([p.percentiles["p99"] for p in good]))
            self.hist_range_ = (p1, p99 if p99 > p1 else p1 + 1.0)
        obs = [self.observe_image(network, img, preprocess, cam) for img in images]
        cal = None if calibration is None else [self.observe_image(network, i, preprocess, cam) for i in calibration]
        everything = list(images) + list(calibration or [])
        names = [str(i) if isinstance(i, (str, os.PathLike)) else f"image {j}" for j, i in enumerate(everything)]
        return self.fit_observations(
            obs, labels, calibration=cal, calibration_fraction=calibration_fraction, seed=seed, names=names
        )

    def fit_observations(
        self,
        observations: Sequence[Observation],
        labels: Sequence[int] | None = None,
        *,
        calibration: Sequence[Observation] | None = None,
        calibration_fraction: float = 0.35,
        seed: int = 0,
        names: Sequence[str] | None = None,
    ) -> Screen:
        """:meth:`fit` from observations the caller already made (e.g. during the engine's passes)."""
        n_given = len(observations)
        obs = list(observations) + list(calibration or [])
        names = list(names) if names is not None else [f"image {i}" for i in range(len(obs))]
        bad = [(n, o.profile.hard_failures) for n, o in zip(names, obs) if o.profile.hard_failures]
        for n, why in bad:
            logger.warning("screen fit: %s left out: %s", n, "; ".join(why))
        keep = [i for i, o in enumerate(obs) if not o.profile.hard_failures]
        if labels is not None:
            lab = np.full(len(obs), -1, dtype=np.int64)
            lab[:n_given] = np.asarray(labels, dtype=np.int64)
        y = None if labels is None else lab[keep]
        is_cal = np.array([i >= n_given for i in keep])
        obs = [obs[i] for i in keep]
        n = len(obs)
        if not 0 < calibration_fraction < 1:
            raise ValueError(f"calibration_fraction must be in (0, 1), got {calibration_fraction!r}")
        if calibration is not None:
            cal_idx, fit_idx = np.flatnonzero(is_cal), np.flatnonzero(~is_cal)
        else:
            perm = np.random.default_rng(seed).permutation(n)
            n_cal = int(round(calibration_fraction * n))
            cal_idx, fit_idx = np.sort(perm[:n_cal]), np.sort(perm[n_cal:])
        n_cal = len(cal_idx)
        if len(fit_idx) < 8 or n_cal < 1:
            raise ValueError(
                f"{n} usable images: too few to fit ({len(fit_idx)}, need 8) and calibrate ({n_cal}, need 1) a screen"
            )
        if (n_cal + 1) * self.alpha < 1:
            logger.warning(
                "screen: %d calibration images: the smallest p-value is 1/%d = %.3f > alpha = %g, so only hard "
                "failures can be rejected; use more images",
                n_cal,
                n_cal + 1,
                1 / (n_cal + 1),
                self.alpha,
            )
        fit_obs = [obs[i] for i in fit_idx]
        active = self._active()
        if y is None:
            y = np.array([self._predicted(o) for o in obs], dtype=np.int64)
        elif (y[fit_idx] < 0).any():
            raise ValueError("labels must be non-negative class indices")
        y_fit = y[fit_idx]
        self.detectors_: dict[str, Any] = {}
        for layer in ("penultimate", "early"):
            wanted = [d for d in (f"maha_{layer}", f"rmaha_{layer}", f"knn_{layer}") if d in active]
            if not wanted:
                continue
            missing = [names[keep[i]] for i in fit_idx if getattr(obs[i], layer) is None]
            if missing:
                raise ValueError(f"no {layer} features recorded for {missing[:3]}: check the layer names")
            feats = np.vstack([getattr(o, layer) for o in fit_obs])
            makers = {
                f"maha_{layer}": lambda f: ClassMahalanobis(self.reg).fit(f, y_fit),
                f"rmaha_{layer}": lambda f: RelativeMahalanobis(self.reg).fit(f, y_fit),
                f"knn_{layer}": lambda f: KNNDetector(self.k).fit(f),
            }
            for d in wanted:
                self.detectors_[d] = makers[d](feats)
        if "attention" in active:
            cams = torch.stack([o.cam for o in fit_obs])
            self.cam_ref_ = self._attention_grid(cams).mean(0).numpy().astype(np.float32)
            feats = self._attention_features(cams)
            self.detectors_["attention"] = ClassMahalanobis(self.reg).fit(feats, np.zeros(len(feats), np.int64))
        # data profile: histogram range and reference, per-feature robust scales with floors, ranges for messages
        if self.window is not None:
            self.hist_range_ = self.window
        ranges = {tuple(o.profile.hist_range or ()) for o in obs}
        common = getattr(self, "hist_range_", None)
        if common is not None and ranges == {tuple(common)}:
            self.hist_ref_ = np.mean([o.profile.histogram for o in fit_obs], axis=0)
        else:  # histograms binned over different ranges are not comparable: no histogram feature
            self.hist_range_, self.hist_ref_ = None, np.zeros(0)
        if self.window is not None:
            self.intensity_width_ = float(self.window[1] - self.window[0])
        else:
            spread = [o.profile.percentiles["p99"] - o.profile.percentiles["p1"] for o in fit_obs]
            self.intensity_width_ = max(float(np.median(spread)), 1e-6)
        prof = self._profile_matrix(obs)
        self.profile_scaler_ = RobustScaler(self._profile_floors(prof.shape[1])).fit(prof[fit_idx])
        with warnings.catch_warnings():  # an all-NaN column (no histogram feature) stays NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            self.profile_min_ = np.nanmin(prof, axis=0)
            self.profile_max_ = np.nanmax(prof, axis=0)
        self.orientations_ = sorted({o.profile.orientation for o in obs})
        # scale of each detector (fit part, k-NN leave-one-out), then calibration scores
        raw_fit = self._raw_scores(fit_obs, loo=True)
        mono = self._monotone(raw_fit)
        with warnings.catch_warnings():  # inactive detectors: all-NaN columns
            warnings.simplefilter("ignore", RuntimeWarning)
            floor = 1e-6 * (np.abs(np.nanmedian(mono, axis=0)) + 1.0)
        self.score_scaler_ = RobustScaler(np.nan_to_num(floor, nan=1e-6)).fit(mono)
        self.cal_scores_ = self._raw_scores([obs[i] for i in cal_idx])
        self.cal_stat_ = self._statistic(self.cal_scores_)
        self.n_fit_, self.n_cal_, self.seed_ = len(fit_idx), len(cal_idx), int(seed)
        # positions (in the observations given) of the calibration images, for comparisons calibrated the same way
        # (``calibration`` given: positions in it), for comparisons calibrated on the same images
        self.calibration_index_ = np.asarray(keep)[cal_idx] - (n_given if calibration is not None else 0)
        self.fitted_ = True
        logger.info("screen fitted: %d fit, %d calibration images, detectors %s", len(fit_idx), len(cal_idx), active)
        return self

    def _predicted(self, o: Observation) -> int:
        if o.logits is None:
            return 0
        lg = np.array(o.logits, dtype=np.float64)
        if self.garbage_index is not None and lg.size > self.garbage_index:
            lg[self.garbage_index] = -np.inf
        return int(np.argmax(lg))

    def _profile_floors(self, n_features: int) -> np.ndarray:
        nd = self.spatial_dims
        width = _intensity_width(self)
        floors = [0.02] * (2 * nd)  # log spacing / log FOV: a 2 % change is one unit
        floors += [0.01 * width] * 9  # 7 percentiles, mean, std
        if self.window is not None:
            floors += [0.01] * 3
        floors += [0.01, 0.01, 0.01, 0.01]  # foreground fraction, windowed mean/std, histogram JS distance
        if len(floors) != n_features:
            raise RuntimeError(f"profile floors ({len(floors)}) do not match the features ({n_features})")
        return np.asarray(floors)

    # ---------------------------------------------------------------------------------------------------- score
    def _check_fitted(self) -> None:
        if not self.fitted_:
            raise RuntimeError("the screen is not fitted: call fit() or Screen.load()")

    def score_observations(self, observations: Sequence[Observation]) -> list[dict[str, Any]]:
        """Verdicts for several observations (see :meth:`score`)."""
        self._check_fitted()
        obs = list(observations)
        raw = self._raw_scores(obs)
        pvals = np.full_like(raw, np.nan)
        for j in range(len(DETECTORS)):
            cal = self.cal_scores_[:, j]
            if np.isfinite(cal).all() and cal.size:
                pvals[:, j] = conformal_pvalues(cal, raw[:, j])
        stat = self._statistic(raw)
        if self.combine == "maxz":
            finite = np.isfinite(self.cal_stat_)
            combined = conformal_pvalues(self.cal_stat_[finite], stat)
        else:
            combined = bonferroni(pvals, axis=1)
        z = self.score_scaler_.transform(self._monotone(raw))
        rows = []
        for i, o in enumerate(obs):
            hard = list(o.profile.hard_failures)
            p = 0.0 if hard else float(combined[i])
            ok = (not hard) and (not math.isnan(p)) and p > self.alpha
            checks = [] if hard else self._profile_messages(o.profile)
            reasons: list[str] = list(hard)
            if not ok and not hard:
                reasons += checks + self._detector_messages(raw[i], pvals[i], z[i])
            row: dict[str, Any] = {
                "in_distribution": bool(ok),
                "p_value": p,
                "reasons": reasons,
                "notes": checks if ok else [],
                "statistic": float(stat[i]) if np.isfinite(stat[i]) else float("nan"),
            }
            for j, d in enumerate(DETECTORS):
                if d in self._active():
                    row[f"score_{d}"] = float(raw[i, j])
                    row[f"p_{d}"] = float(pvals[i, j])
            rows.append(row)
        return rows

    def score(
        self,
        image: Any = None,
        *,
        tensor: Any = None,
        logits: Any = None,
        activations: dict[str, Any] | None = None,
        cam: Any = None,
        profile: DataProfile | None = None,
    ) -> dict[str, Any]:
        """The verdict for one image from what the engine already computed (no model call here).

        Args:
            image: raw channel-first image (``MetaTensor``, native units).
            tensor: the preprocessed tensor the model saw.
            logits: the model's output for it.
            activations: :attr:`FeatureRecorder.activations` of the same forward pass (:meth:`recorder`).
            cam: its normalised CAM.
            profile: the profile from :meth:`profile` (when the engine checked hard failures first).

        Returns:
            ``{"in_distribution", "p_value", "reasons", "notes", "statistic", "score_<detector>",
            "p_<detector>"}``; a detector whose input was not given gets NaN (the combined p-value is then
            conservative: it ranks a maximum over fewer detectors against the full calibration statistic).
        """
        obs = self.observe(image, tensor=tensor, logits=logits, activations=activations, cam=cam, profile=profile)
        return self.score_observations([obs])[0]

    def _profile_messages(self, prof: DataProfile) -> list[str]:
        msgs: list[str] = []
        nd = self.spatial_dims
        lo, hi = self.profile_min_, self.profile_max_
        sp = np.sort(np.asarray(prof.spacing, float))
        sp_lo, sp_hi = np.exp(lo[:nd]), np.exp(hi[:nd])
        if np.any(sp < sp_lo * 0.98) or np.any(sp > sp_hi * 1.02):
            msgs.append(
                f"spacing {_fmt_mm(prof.spacing)} mm is outside the training range "
                f"{sp_lo.min():.3g}-{sp_hi.max():.3g} mm"
            )
        fov = np.sort(np.asarray(prof.fov_mm, float))
        f_lo, f_hi = np.exp(lo[nd : 2 * nd]), np.exp(hi[nd : 2 * nd])
        if np.any(fov < f_lo * 0.98) or np.any(fov > f_hi * 1.02):
            msgs.append(
                f"field of view {_fmt_mm(prof.fov_mm)} mm is outside the training range "
                f"{f_lo.min():.3g}-{f_hi.max():.3g} mm"
            )
        if self.orientations_ and prof.orientation not in self.orientations_:
            msgs.append(
                f"orientation {prof.orientation} was not seen in training ({', '.join(self.orientations_)}); "
                "the preprocessing reorients it"
            )
        base = 2 * nd
        width = _intensity_width(self)
        med_i = base + 3  # p50
        if not lo[med_i] - 0.05 * width <= prof.percentiles["p50"] <= hi[med_i] + 0.05 * width:
            msgs.append(
                f"median intensity {prof.percentiles['p50']:.4g} is outside the training range "
                f"{lo[med_i]:.4g} to {hi[med_i]:.4g}"
            )
        j = base + 9
        if self.window is not None:
            a, b = self.window
            ct = " : not CT-like" if (self.modality or "").upper() in ("CT", "CBCT") else ""
            for name, k, frac in (("below", 0, prof.frac_below), ("above", 2, prof.frac_above)):
                if frac is not None and frac > hi[j + k] + 0.05:
                    tail = ct.replace(" :", ":") if frac >= 0.9 else ""
                    msgs.append(
                        f"{100 * frac:.0f} % of voxels fall {name} the intensity window [{a:g}, {b:g}] "
                        f"(training: at most {100 * hi[j + k]:.0f} %){tail}"
                    )
            j += 3
        fg = prof.foreground_fraction
        if not lo[j] - 0.05 <= fg <= hi[j] + 0.05:
            msgs.append(f"foreground fraction {fg:.2f} is outside the training range {lo[j]:.2f}-{hi[j]:.2f}")
        ws = prof.windowed_std
        if ws is not None and ws < lo[j + 2] * 0.5:
            msgs.append(
                f"after the intensity window the image is nearly constant (std {ws:.3g}; training "
                f"{lo[j + 2]:.3g}-{hi[j + 2]:.3g})"
            )
        js = np.nan
        if self.hist_ref_.size and len(prof.histogram) == self.hist_ref_.size:
            js = _js_distance(np.asarray(prof.histogram), self.hist_ref_)[0]
        if np.isfinite(js) and np.isfinite(hi[j + 3]) and js > hi[j + 3] + 0.05:
            msgs.append(
                f"the intensity histogram differs from the training images (Jensen-Shannon distance {js:.2f}; "
                f"training at most {hi[j + 3]:.2f})"
            )
        return msgs

    def _detector_messages(self, raw: np.ndarray, pvals: np.ndarray, z: np.ndarray) -> list[str]:
        msgs = []
        order = np.argsort(np.where(np.isnan(pvals), np.inf, pvals))
        for j in order:
            d = DETECTORS[j]
            if np.isnan(pvals[j]) or pvals[j] > self.alpha:
                continue
            extra = f", p(garbage) = {raw[j]:.2f}" if d == "kplus1" else ""
            msgs.append(f"{_DESCRIPTION[d]} (p = {pvals[j]:.3f}{extra})")
        if not msgs and np.isfinite(z).any():
            j = int(np.nanargmax(np.where(np.isnan(z), -np.inf, z)))
            msgs.append(f"combined evidence; most atypical: {_DESCRIPTION[DETECTORS[j]]} (z = {z[j]:.1f})")
        return msgs

    # ----------------------------------------------------------------------------------------------- save/load
    def _arrays(self) -> dict[str, np.ndarray]:
        arrays: dict[str, np.ndarray] = {
            "cal_scores": self.cal_scores_,
            "cal_stat": self.cal_stat_,
            "score_median": self.score_scaler_.median_,
            "score_scale": self.score_scaler_.scale_,
            "profile_median": self.profile_scaler_.median_,
            "profile_scale": self.profile_scaler_.scale_,
            "profile_min": self.profile_min_,
            "profile_max": self.profile_max_,
            "hist_ref": self.hist_ref_,
        }
        if hasattr(self, "cam_ref_"):
            arrays["cam_ref"] = self.cam_ref_
        for name, det in self.detectors_.items():
            arrays.update(det.state(f"{name}__"))
        return {k: np.asarray(v) for k, v in arrays.items()}

    def _config(self) -> dict[str, Any]:
        return {
            "alpha": self.alpha,
            "window": self.window,
            "early_layers": self.early_layers,
            "head": self.head,
            "cam_layer": self.cam_layer,
            "cam_method": self.cam_method,
            "garbage_index": self.garbage_index,
            "k": self.k,
            "combine": self.combine,
            "spatial_dims": self.spatial_dims,
            "channels": self.channels,
            "reg": self.reg,
            "modality": self.modality,
            "bundle": self.bundle,
            "attention_size": self.attention_size,
            "use": self.use,
        }

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``screen.json`` (settings, fitted scalars, SHA-256 of the arrays and of the JSON content) and
        ``screen.npz`` (arrays only, no pickled objects).

        Example:
            >>> screen.save("screens/sos_ref")
        """
        self._check_fitted()
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        arrays = self._arrays()
        if any(a.dtype == object for a in arrays.values()):
            raise RuntimeError("refusing to save object arrays")
        content = {
            "format": "monai_gamverify.screening",
            "format_version": FORMAT_VERSION,
            "config": self._config(),
            "detectors": self._active(),
            "intensity_width": self.intensity_width_,
            "hist_range": None if self.hist_range_ is None else list(self.hist_range_),
            "orientations": self.orientations_,
            "n_fit": self.n_fit_,
            "n_cal": self.n_cal_,
            "seed": self.seed_,
            "arrays_sha256": _sha256_arrays(arrays),
        }
        content["content_sha256"] = _sha256_json(content)
        with atomic_path(out / _NPZ) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, **arrays)
        with atomic_path(out / _JSON) as tmp:
            tmp.write_text(json.dumps(content, indent=2) + "\n")
        return out

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Screen:
        """Load a screen written by :meth:`save`; refuse a missing, malformed or modified file.

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
        if content.get("format_version") != FORMAT_VERSION:
            raise ScreenFileError(
                f"{jpath} has format version {content.get('format_version')}; expected {FORMAT_VERSION}"
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
        obj = cls(**cfg)
        obj.cal_scores_, obj.cal_stat_ = arrays["cal_scores"], arrays["cal_stat"]
        obj.score_scaler_ = RobustScaler()
        obj.score_scaler_.median_, obj.score_scaler_.scale_ = arrays["score_median"], arrays["score_scale"]
        obj.profile_scaler_ = RobustScaler()
        obj.profile_scaler_.median_, obj.profile_scaler_.scale_ = arrays["profile_median"], arrays["profile_scale"]
        obj.profile_min_, obj.profile_max_ = arrays["profile_min"], arrays["profile_max"]
        obj.hist_ref_ = arrays["hist_ref"]
        obj.hist_range_ = None if content["hist_range"] is None else tuple(content["hist_range"])
        obj.orientations_ = list(content["orientations"])
        obj.intensity_width_ = float(content["intensity_width"])
        if "cam_ref" in arrays:
            obj.cam_ref_ = arrays["cam_ref"]
        obj.detectors_ = {}
        for name in content["detectors"]:
            if name.startswith("maha") or name == "attention":
                obj.detectors_[name] = ClassMahalanobis.from_state(arrays, f"{name}__", obj.reg)
            elif name.startswith("rmaha"):
                obj.detectors_[name] = RelativeMahalanobis.from_state(arrays, f"{name}__", obj.reg)
            elif name.startswith("knn"):
                obj.detectors_[name] = KNNDetector.from_state(arrays, f"{name}__", obj.k)
        obj.n_fit_, obj.n_cal_, obj.seed_ = int(content["n_fit"]), int(content["n_cal"]), int(content["seed"])
        obj.fitted_ = True
        return obj


def _batch1(x: Any) -> torch.Tensor:
    t = torch.as_tensor(x).detach()
    return t if t.ndim >= 2 and t.shape[0] == 1 else t[None]


def _intensity_width(screen: Screen) -> float:
    """Intensity scale of the training images: the window's width, else their median 1st-99th percentile range."""
    return float(screen.intensity_width_)


def _fmt_mm(values: Sequence[float]) -> str:
    return " x ".join(f"{v:.3g}" for v in values)


def _make_cam(network: nn.Module, layer: str, method: str) -> Any:
    return make_cam(network, layer, method)


# ----------------------------------------------------------------------------------------------------- CLI helpers
def fit_screen(
    bundle_root: str | os.PathLike,
    dataset_dir: str | os.PathLike,
    out: str | os.PathLike,
    overrides: dict | str | None = None,
    alpha: float = 0.05,
    *,
    config: str = "inference.json",
    checkpoint: str | os.PathLike | None = None,
    datalist: str | os.PathLike | None = None,
    fit_splits: Sequence[str] = ("training",),
    calibration_splits: Sequence[str] = ("validation",),
    calibration_dirs: Sequence[str | os.PathLike] = (),
    calibration_fraction: float = 0.35,
    combine: str = "maxz",
    seed: int = 0,
    device: str | torch.device | None = None,
) -> Screen:
    """Fit a screen for a bundle's model and save it to ``out`` (``gamverify screen fit``).

    The detectors are fitted on ``fit_splits`` of the dataset (the model's training data); the conformal
    calibration uses images the model was **not** trained on: ``calibration_splits`` of the same datalist plus every
    item of the datalists in ``calibration_dirs`` (more in-distribution images of the same source; at least
    ``1/alpha - 1`` are needed to reject anything, a few hundred for a false-rejection rate close to alpha on every
    draw). With no calibration split and no calibration dir, a seeded ``calibration_fraction`` of the fit images is
    held out (valid only if the model never saw them). Items labelled with a K+1 model's garbage class are left out.

    Args:
        bundle_root: the MONAI bundle.
        dataset_dir: the dataset (``datalist.json`` inside unless ``datalist`` is given).
        out: directory for ``screen.json`` / ``screen.npz``.
        overrides: bundle config overrides (dict or JSON string), e.g. ``{"network_name": "small_cnn"}``.
        alpha: rejection level.
        config: the bundle config defining ``network_def`` and ``preprocessing``.
        checkpoint: weights (default: the bundle's ``models/model.pt``).
        datalist: the datalist JSON (default ``dataset_dir/datalist.json``).
        fit_splits: datalist lists the detectors are fitted on.
        calibration_splits: datalist lists used for calibration (held out from training).
        calibration_dirs: more datasets (each with a ``datalist.json``) used for calibration, all their lists.
        calibration_fraction: held-out share of the fit images when no calibration data is given.
        combine: ``maxz`` or ``bonferroni``.
        seed: split seed.
        device: torch device.

    Returns:
        The fitted :class:`Screen`.

    Example:
        >>> fit_screen("bundles/sos_staging", "data/sos", "screen_sos", {"network_name": "small_cnn"},
        ...            calibration_dirs=["data/sos_more"])
    """
    from monai_gamverify.bundle import load_bundle
    from monai_gamverify.data.datalist import load_datalist

    ov = json.loads(overrides) if isinstance(overrides, str) else dict(overrides or {})
    ds = Path(dataset_dir)
    bm = load_bundle(bundle_root, config=config, checkpoint=checkpoint, device=device, overrides=ov)
    screen = Screen.from_bundle(bm, config=config, overrides=ov, checkpoint=checkpoint, alpha=alpha, combine=combine)
    dl = Path(datalist) if datalist is not None else ds / "datalist.json"

    def items_of(path: Path, splits: Sequence[str], root: Path) -> list[dict]:
        got: list[dict] = []
        for split in splits:
            got += load_datalist(
                path,
                split,
                dataset_dir=root,
                spatial_dims=None,
                num_channels=None,
                require_label=False,
                check="exists",
                allow_empty=True,
            )
        if screen.garbage_index is not None:
            got = [e for e in got if int(e.get("label", -1)) != screen.garbage_index]
        return got

    fit_items = items_of(dl, fit_splits, ds)
    cal_items = items_of(dl, calibration_splits, ds) if calibration_splits else []
    for extra in calibration_dirs:
        cal_items += items_of(Path(extra) / "datalist.json", ("training", "validation", "test"), Path(extra))
    if not fit_items:
        raise ValueError(f"no in-distribution items in {dl} ({', '.join(fit_splits)})")
    if not cal_items:
        logger.warning(
            "screen fit: no calibration split or dataset; holding out %.0f %% of the fit images, valid only if the "
            "model was not trained on them",
            100 * calibration_fraction,
        )
    labels = [int(e["label"]) for e in fit_items] if all("label" in e for e in fit_items) else None
    screen.fit(
        bm.network,
        [e["image"] for e in fit_items],
        labels,
        preprocess=preprocessing_after_loading(bm),
        calibration=[e["image"] for e in cal_items] or None,
        calibration_fraction=calibration_fraction,
        seed=seed,
    )
    screen.save(out)
    return screen


def load_screen_bundle(screen: Screen, device: str | torch.device | None = None) -> Any:
    """The bundle model a screen was fitted for (root, config, overrides and checkpoint recorded at fit time).

    Example:
        >>> bm = load_screen_bundle(Screen.load("screen_sos"))
    """
    from monai_gamverify.bundle import load_bundle

    info = screen.bundle
    if not info.get("root"):
        raise ValueError("the screen does not record its bundle; pass bundle= to run_screen")
    return load_bundle(
        info["root"],
        config=info.get("config", "inference.json"),
        checkpoint=info.get("checkpoint"),
        device=device,
        overrides=info.get("overrides") or {},
    )


def run_screen(
    screen: Screen | str | os.PathLike,
    images: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    bundle: Any = None,
    device: str | torch.device | None = None,
    on_error: str = "record",
) -> Any:
    """Screen image files and write ``OUT/screen.csv`` (``gamverify screen run``).

    Columns: ``image, in_distribution, p_value, reasons`` (``; ``-joined), ``notes``, ``statistic``, then
    ``score_<detector>`` and ``p_<detector>`` of every active detector, and ``error`` (empty when read).

    Args:
        screen: a :class:`Screen` or the directory it was saved to.
        images: files (NIfTI, NRRD, MHA, one DICOM file) or DICOM series directories.
        out: output directory.
        bundle: the :class:`monai_gamverify.bundle.BundleModel` (default: reloaded from what the screen records).
        device: torch device for the reloaded bundle.
        on_error: ``"record"``: an unreadable image gets a row (not in distribution, the error as reason) and the
            run goes on; ``"raise"``: raise :class:`ImageReadError` / ``FileNotFoundError`` naming it.

    Returns:
        The table as a pandas DataFrame.

    Example:
        >>> run_screen("screen_sos", ["a.nii.gz", "dicom_dir/"], "screen_out")
    """
    import pandas as pd

    if on_error not in ("record", "raise"):
        raise ValueError(f"on_error must be 'record' or 'raise', got {on_error!r}")
    scr = screen if isinstance(screen, Screen) else Screen.load(screen)
    bm = bundle if bundle is not None else load_screen_bundle(scr, device)
    pre = preprocessing_after_loading(bm)
    cam = _make_cam(bm.network, scr.cam_layer, scr.cam_method) if scr.cam_layer is not None else None
    rows = []
    for path in images:
        try:
            obs = scr.observe_image(bm.network, read_image(path), pre, cam)
        except (FileNotFoundError, ImageReadError) as err:
            if on_error == "raise":
                raise
            logger.warning("%s", err)
            rows.append(
                {
                    "image": str(path),
                    "in_distribution": False,
                    "p_value": float("nan"),
                    "reasons": str(err),
                    "error": str(err),
                }
            )
            continue
        res = scr.score_observations([obs])[0]
        rows.append(
            {
                "image": str(path),
                **res,
                "reasons": "; ".join(res["reasons"]),
                "notes": "; ".join(res["notes"]),
                "error": "",
            }
        )
    df = pd.DataFrame(rows)
    lead = ["image", "in_distribution", "p_value", "reasons"]
    df = df[lead + [c for c in df.columns if c not in lead]]
    write_csv(df, Path(out) / "screen.csv")
    return df
