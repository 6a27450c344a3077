"""The in-distribution screen: is this image like the data the model was made for?

Layers, each a detector with an **anomaly score** (higher = less like the training data):

==================  ======================================================================================
``profile``         data profile (geometry, native intensities, window fractions, foreground, histogram):
                    the largest robust z-score of its features against the training images
``layout``          Mahalanobis distance of the content's centroid and second moments in the tensor the model sees
                    (rotated, shifted or cropped anatomy keeps its intensities but moves these)
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
fitted, and a held-out *calibration* part. Each detector's p-value is ``(1 + #{s_cal >= s}) / (n_cal + 1)``. The
combined p-value (``combine="fisher"``, the default) ranks Fisher's statistic ``T = -2 sum_j log p_j`` of the per-
detector p-values against the same statistic of the calibration images, every one of them ranked among the others
and the new image (:func:`~monai_gamverify.screening.detectors.fisher_conformal`: fully symmetric, so exactly
valid); an image beyond every other on a detector adds twice its robust z-score's excess over the largest other (a
rank alone would cap a detector's evidence at ``1 / (n_cal + 1)``: a 4 mm scan among 1.25 mm ones would count no
more than one just outside the range). ``combine="maxz"`` ranks ``T = max_j z_j``, the largest robust z-score of the
detector scores (medians and MADs from the fit part, after a fixed monotone transform per detector), the same way;
``combine="bonferroni"`` uses ``min(1, m min_j p_j)``. Each way a new in-distribution image is rejected with
probability <= alpha (exchangeability with the calibration images), whatever the detectors' dependence. Fisher pools
evidence: a detector that is noisy in distribution does not swamp one that separates well, as it does in a maximum
(30-degree rotated SOS: AUROC 0.97 with Fisher vs 0.88 with ``maxz``, ``docs/screening.md``). ``fisher`` and
``maxz`` need only ``n_cal >= 1/alpha - 1`` calibration images to be able to reject (:meth:`Screen.fit` refuses
fewer); Bonferroni needs ``n_cal >= m/alpha - 1``.
**Tail extension.** An image whose statistic exceeds every calibration image's gets ``p = exp(-(T - max T_cal) / s)
/ (n_cal + 1)`` (``s = 2`` for Fisher's chi-square-like statistic, 1 for a z-score; the per-detector p-values
likewise in robust z units, :func:`~monai_gamverify.screening.detectors.tail_extended`): a far out-of-distribution
image gets a smaller p-value than one barely beyond, and the rejections at ``alpha >= 1/(n_cal + 1)`` are those of
the rank p-value (the guarantee is unchanged).
Hard failures of the profile (NaN, constant, wrong dimensionality or channels, a single slice, a window that turns
the image into a constant) reject regardless, with ``p_value = 0``.

**Segmentation models** (``task="segmentation"``, e.g. a model-zoo UNet with a ``SlidingWindowInferer``) have no
classifier head, garbage class or class-level CAM: their screen uses ``profile`` and ``layout``, plus the early-layer
detectors when the bundle declares ``feature_layers`` (the channel means and stds of each window the inferer cuts,
averaged over the windows, recorded by the engine during its no-grad pass).

The screen runs no model: the engine (``ImagePipeline.observe``) reads, preprocesses and runs the network once, and
the screen does statistics over its observations (:meth:`Screen.fit`, :meth:`Screen.score`). A fitted screen records
the observation settings (reader, CAM layer and method, class policy, slice axis, preprocessing hash) and refuses
observations made otherwise (:meth:`Screen.check_settings`).

Example:
    >>> pipe = ImagePipeline.from_bundle("bundles/sos_staging", screen=Screen.from_bundle(bm))
    >>> pipe.screen.fit([pipe.observe(f) for f in train_files], labels, calibration=[pipe.observe(f) for f in cal])
    >>> pipe.screen.score(pipe.observe("new.nii.gz"))
    {'in_distribution': True, 'p_value': 0.41, 'reasons': [], ...}
"""
# long module: the Screen estimator (record, fit, score, save, load) holds its own state in one class

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from monai_gamverify.bundle import declared_input
from monai_gamverify.kplus1 import find_classifier_head
from monai_gamverify.screening.calibration import FITTED, fit_state
from monai_gamverify.screening.common import DETECTORS, ScreenRecord
from monai_gamverify.screening.detectors import bonferroni, conformal_pvalues, fisher_conformal
from monai_gamverify.screening.messages import detector_messages, profile_messages
from monai_gamverify.screening.persistence import read_screen, save_screen
from monai_gamverify.screening.profile import DataProfile, attach_tensor, intensity_window_of, profile_image
from monai_gamverify.screening.recorder import PENULTIMATE
from monai_gamverify.screening.scores import monotone, raw_scores, statistic
from monai_gamverify.utils import plain_tensor

__all__ = ["Screen", "COMBINE", "TASKS"]

#: ways to combine the detectors into one p-value (the first is the default)
COMBINE = ("fisher", "maxz", "bonferroni")
#: the kinds of model a screen is made for
TASKS = ("classification", "segmentation")
#: detectors that need nothing but the image and its preprocessed tensor (no model pass)
_NO_MODEL = ("profile", "layout")


def _as_np(x: Any) -> np.ndarray:
    t = torch.as_tensor(x).detach().cpu()
    t = plain_tensor(t)
    return t.to(torch.float64).numpy()


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
        combine: ``"fisher"`` (default), ``"maxz"`` or ``"bonferroni"`` (see the module docstring).
        spatial_dims: spatial axes the model expects.
        channels: channels the model expects.
        reg: covariance ridge of the Mahalanobis detectors (relative to the mean variance).
        modality: ``"CT"`` when the window is in Hounsfield units (messages say "not CT-like").
        bundle: where the model comes from, for :func:`run_screen` (``root``, ``config``, ``overrides``,
            ``checkpoint``).
        attention_size: CAMs are average-pooled to at most this many voxels per axis before their similarity
            features are computed.
        use: the detectors to combine (default: every one the model allows); hard failures always apply.
        task: ``"classification"`` or ``"segmentation"`` (no head, no garbage class, no CAM; early features
            averaged over the inferer's windows).

    Example:
        >>> screen = Screen(window=(-1000, 2000), early_layers=["stem"], head="head", cam_layer="res4")
        >>> screen.fit([engine.observe(f) for f in files], labels, seed=0)
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
        combine: str = "fisher",
        spatial_dims: int = 3,
        channels: int | None = 1,
        reg: float = 1e-3,
        modality: str | None = None,
        bundle: dict | None = None,
        attention_size: int = 16,
        use: Sequence[str] | None = None,
        task: str = "classification",
    ) -> None:
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        if task == "segmentation":
            given = {"head": head, "cam_layer": cam_layer, "garbage_index": garbage_index}
            bad = [k for k, v in given.items() if v is not None]
            if bad:
                raise ValueError(
                    f"a segmentation screen has no classifier head, CAM attention or garbage class: got {bad}; its "
                    "detectors are the data profile, the layout and the early layers (early_layers=)"
                )
        if not 0 < alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
        if combine not in COMBINE:
            raise ValueError(f"combine must be one of {COMBINE}, got {combine!r}")
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
        self.task = task
        self.fitted_ = False

    # ------------------------------------------------------------------------------------------------ building
    @classmethod
    def from_bundle(
        cls,
        bundle: Any,
        *,
        config: str | None = None,
        overrides: dict | None = None,
        checkpoint: str | os.PathLike | None = None,
        **kwargs: Any,
    ) -> Screen:
        """A screen configured from a :class:`monai_gamverify.bundle.BundleModel`: intensity window of its
        ``ScaleIntensityRanged``, its feature layers (early), classifier head, CAM layer and method, garbage class
        (a class named ``garbage``), modality and channels from its metadata. ``kwargs`` override any of these.

        A segmentation bundle (``bundle.task == "segmentation"``, not explained slice by slice) gets a segmentation
        screen: no head, garbage class or attention; ``profile``, ``layout`` and, with ``feature_layers``, the
        early-layer detectors.

        Example:
            >>> screen = Screen.from_bundle(load_bundle("bundles/sos_staging"), alpha=0.05)
        """
        try:
            seg = bundle.task == "segmentation" and bundle.slice_axis(3) is None
        except (ValueError, RuntimeError):  # a network the traced forward cannot run: a classifier's screen, as before
            seg = False
        head = garbage = cam_layer = None
        if not seg:
            try:
                head = find_classifier_head(bundle.network)[0]
            except ValueError:
                head = None
            # the config's class names follow overrides (a K+1 bundle adds "garbage"); metadata describes the default
            class_names = bundle.parser.get_parsed_content("class_names") if "class_names" in bundle.parser else None
            names = [str(n).lower() for n in (class_names or bundle.class_names)]
            garbage = names.index("garbage") if "garbage" in names else None
            cam_layer = bundle.target_layer
        early = list(bundle.feature_layers) or list(getattr(bundle.network, "feature_layers", ()))
        image_fmt = bundle.metadata.get("network_data_format", {}).get("inputs", {}).get("image", {})
        modality = "CT" if str(image_fmt.get("format", "")).lower() == "hounsfield" else image_fmt.get("modality")
        # the engine's rule (ImagePipeline.from_bundle): the config's cam_method, else the metadata's, else Grad-CAM
        cam_method = bundle.parser.get_parsed_content("cam_method") if "cam_method" in bundle.parser else None
        cam_method = cam_method or bundle.metadata.get("gamverify", {}).get("cam_method") or "gradcam"
        roi = bundle.parser.get_parsed_content("roi_size") if "roi_size" in bundle.parser else None
        if roi is None and seg:  # model-zoo segmentation bundles declare the window size of their inferer
            roi = declared_input(bundle.metadata, bundle.parser)[1]
        settings: dict[str, Any] = {
            "window": intensity_window_of(bundle.preprocessing()),
            "early_layers": early,
            "head": head,
            "cam_layer": cam_layer,
            "cam_method": cam_method,
            "garbage_index": garbage,
            "modality": modality,
            "spatial_dims": len(roi) if roi else 3,
            "channels": int(image_fmt.get("num_channels", 1)),
            "task": "segmentation" if seg else "classification",
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

    @property
    def needs_network(self) -> bool:
        """Whether a detector needs the model's pass (``profile`` and ``layout`` need only the image and its
        preprocessed tensor)."""
        return any(d not in _NO_MODEL for d in self._active())

    @property
    def setting_keys(self) -> tuple[str, ...]:
        """The observation settings this screen's scores depend on: always the reader, the slice axis and the
        preprocessing; with the attention detector also the CAM layer, method and class policy."""
        keys = ("reader", "slice_axis", "preprocessing")
        return keys + (("layer", "method", "class_policy") if "attention" in self._active() else ())

    def check_settings(self, settings: Mapping[str, Any]) -> None:
        """Refuse observations made with other settings than the screen was fitted with (the p-values would be
        meaningless); a screen that records no settings (fitted from records) is not checked.

        Raises:
            ValueError: naming each differing setting, the screen's value and the observation's.
        """
        fitted = getattr(self, "observation_", None)
        if not fitted:
            return
        diff = [k for k in self.setting_keys if k in fitted and k in settings and fitted[k] != settings[k]]
        if diff:
            parts = [f"{k} {settings[k]!r} (the screen was fitted with {fitted[k]!r})" for k in diff]
            raise ValueError(
                "the screen was fitted on observations made with other settings: this one uses "
                + "; ".join(parts)
                + ". Use the screen's settings or fit a screen for these (gamverify screen fit)"
            )

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

    def record(self, observation: Any) -> ScreenRecord:
        """What the screen takes of an engine :class:`~monai_gamverify.apps.pipeline.Observation` (no model call):
        the data profile of the image as read (with the preprocessed tensor's statistics and layout), the pooled
        head input and early-layer features recorded during its forward pass, its logits (classifier) and its
        normalised map (attention detector).

        Args:
            observation: an object with ``raw_image``, ``input``, ``features`` (dict), ``logits`` and ``cam``
                (``ImagePipeline.observe``); a :class:`ScreenRecord` is returned as it is.
        """
        if isinstance(observation, ScreenRecord):
            return observation
        raw = observation.raw_image
        if raw is None:
            raise ValueError(
                f"{observation.image}: the screen profiles the image as read, but the preprocessing does not separate "
                "its loading (LoadImaged / EnsureChannelFirstd first)"
            )
        profile = self.profile(raw, observation.input, name=str(observation.image))
        rec = ScreenRecord(profile)
        if profile.hard_failures:
            return rec
        feats = observation.features or {}
        if PENULTIMATE in feats:
            rec.penultimate = np.asarray(feats[PENULTIMATE], dtype=np.float64).reshape(-1)
        if self.early_layers and all(n in feats for n in self.early_layers):
            rec.early = np.concatenate([np.asarray(feats[n], dtype=np.float64).reshape(-1) for n in self.early_layers])
        if observation.logits is not None and self.task == "classification":
            rec.logits = _as_np(observation.logits).reshape(-1)
        if self.cam_layer is not None and observation.cam is not None:
            c = observation.cam
            c = torch.as_tensor(plain_tensor(c)).detach().cpu().float()
            while c.ndim < self.spatial_dims + 1:
                c = c.unsqueeze(0)
            rec.cam = c
        return rec

    def record_failure(self, image: Any, failure: str, name: str | None = None) -> ScreenRecord:
        """The record of an image that was read but that the model cannot take (its preprocessing or geometry check
        fails): its profile's hard failures, else ``failure``; such an image is rejected with ``p_value = 0``."""
        profile = self.profile(image, name=name)
        if not profile.hard_failures:
            profile.hard_failures.append(failure)
        return ScreenRecord(profile)

    def set_histogram_range(self, images: Iterable[Any]) -> None:
        """Without an intensity window, one histogram range for all images: the median 1st-99th percentile range of
        ``images`` (raw channel-first images, e.g. the fit images as read); call before :meth:`record`."""
        profs = [self.profile(i) for i in images]
        good = [p for p in profs if not p.hard_failures] or profs
        if not good:
            raise ValueError("no image to set the histogram range from")
        p1 = float(np.median([p.percentiles["p1"] for p in good]))
        p99 = float(np.median([p.percentiles["p99"] for p in good]))
        self.hist_range_ = (p1, p99 if p99 > p1 else p1 + 1.0)

    # ---------------------------------------------------------------------------------------------- detectors
    def _active(self) -> list[str]:
        out = ["profile", "layout"]
        if self.head is not None:
            out += ["maha_penultimate", "rmaha_penultimate", "knn_penultimate"]
        if self.early_layers:
            out += ["maha_early", "rmaha_early", "knn_early"]
        if self.garbage_index is not None:
            out.append("kplus1")
        if self.cam_layer is not None:
            out.append("attention")
        return out if self.use is None else [d for d in out if d in self.use]

    # ------------------------------------------------------------------------------------------------------ fit
    def fit(
        self,
        observations: Sequence[Any],
        labels: Sequence[int] | None = None,
        *,
        calibration: Sequence[Any] | None = None,
        calibration_fraction: float = 0.35,
        seed: int = 0,
        names: Sequence[str] | None = None,
        settings: Mapping[str, Any] | None = None,
    ) -> Screen:
        """Fit the detectors on in-distribution observations and calibrate them on held-out ones.

        The calibration images must be exchangeable with the images the screen will judge: **not** images the model
        was trained on (its features are tighter on those, and a screen calibrated on them rejects too many new
        in-distribution images). Give them as ``calibration`` (e.g. a validation split plus unseen images of the
        same source); without it, a seeded random part of ``observations`` is held out, which is valid only when the
        model never saw those images.

        Args:
            observations: the engine's observations (``ImagePipeline.observe``) or :class:`ScreenRecord` s (from
                :meth:`record`).
            labels: class of every image (class-conditional Mahalanobis); ``None``: the model's predictions.
            calibration: held-out in-distribution observations (``None``: a random part of ``observations``).
            calibration_fraction: share of ``observations`` held out when ``calibration`` is ``None``.
            seed: seed of the fit/calibration split.
            names: image names for messages.
            settings: the observation settings (``ImagePipeline.observation_settings``); saved with the screen and
                compared with every observation it judges (default: those of the first observation that has them).

        Returns:
            self.

        Raises:
            ValueError: too few images, or too few calibration images to reject anything at ``alpha``.
        """
        obs, cal = list(observations), list(calibration or [])
        if self.window is None and not hasattr(self, "hist_range_"):
            raws = [o.raw_image for o in obs + cal if not isinstance(o, ScreenRecord) and o.raw_image is not None]
            if raws:
                self.set_histogram_range(raws)
        if settings is None:
            settings = next((o.settings for o in obs + cal if getattr(o, "settings", None)), None)
        if names is None:
            names = [str(getattr(o, "image", f"image {i}")) for i, o in enumerate(obs + cal)]
        state = fit_state(
            self,
            [self.record(o) for o in obs],
            labels,
            calibration=None if calibration is None else [self.record(o) for o in cal],
            calibration_fraction=calibration_fraction,
            seed=seed,
            names=names,
        )
        state["observation_"] = None if settings is None else {k: settings[k] for k in sorted(settings)}
        self._set_fitted(state)
        return self

    def _set_fitted(self, state: Mapping[str, Any]) -> None:
        """Set the fitted state (:data:`~monai_gamverify.screening.calibration.FITTED` and ``observation_``): the
        one place the screen's state changes after construction (:meth:`fit`, :meth:`load`)."""
        unknown = sorted(set(state) - set(FITTED) - {"observation_"})
        if unknown:
            raise ValueError(f"unknown screen state {unknown}")
        for name in FITTED:  # a refit forgets what the previous fit had and this one has not (e.g. cam_ref_)
            if name not in state and name in self.__dict__:
                delattr(self, name)
        for name, value in state.items():
            setattr(self, name, value)
        self.fitted_ = True

    # ---------------------------------------------------------------------------------------------------- score
    def _check_fitted(self) -> None:
        if not self.fitted_:
            raise RuntimeError("the screen is not fitted: call fit() or Screen.load()")

    def score_observations(self, observations: Sequence[Any]) -> list[dict[str, Any]]:
        """Verdicts for several observations (engine observations or records; see :meth:`score`), in one vectorised
        call (the same numbers as one call each)."""
        self._check_fitted()
        obs = [self.record(o) for o in observations]
        raw = raw_scores(self, obs)
        pvals = np.full_like(raw, np.nan)
        z = self.score_scaler_.transform(monotone(raw))
        z_cal = self.score_scaler_.transform(monotone(self.cal_scores_))
        for j in range(len(DETECTORS)):
            cal = self.cal_scores_[:, j]
            if np.isfinite(cal).all() and cal.size:  # beyond every calibration image: smaller the further (z units)
                pvals[:, j] = conformal_pvalues(cal, raw[:, j], z_cal[:, j], z[:, j])
        if self.combine == "fisher":
            combined, stat = fisher_conformal(self.cal_scores_, raw, z_cal, z)
        else:
            stat = statistic(self, raw)
            if self.combine == "maxz":  # the statistic is a robust z-score already: its own tail scale
                cal_stat = self.cal_stat_[np.isfinite(self.cal_stat_)]
                combined = conformal_pvalues(cal_stat, stat, cal_stat, stat)
            else:
                combined = bonferroni(pvals, axis=1)
        rows = []
        for i, o in enumerate(obs):
            hard = list(o.profile.hard_failures)
            p = 0.0 if hard else float(combined[i])
            ok = (not hard) and (not math.isnan(p)) and p > self.alpha
            checks = [] if hard else profile_messages(self, o.profile)
            reasons: list[str] = list(hard)
            if not ok and not hard:
                reasons += checks + detector_messages(self, raw[i], pvals[i], z[i])
            row: dict[str, Any] = {
                "in_distribution": bool(ok),
                "p_value": p,
                "reasons": reasons,
                "notes": checks if ok else [],
                # a hard failure is the most atypical an image can be, whatever the detectors could score
                "statistic": float("inf") if hard else float(stat[i]) if np.isfinite(stat[i]) else float("nan"),
            }
            for j, d in enumerate(DETECTORS):
                if d in self._active():
                    row[f"score_{d}"] = float(raw[i, j])
                    row[f"p_{d}"] = float(pvals[i, j])
            rows.append(row)
        return rows

    def score(self, observation: Any) -> dict[str, Any]:
        """The verdict for one image from the engine's observation of it (no model call here).

        Args:
            observation: ``ImagePipeline.observe``'s :class:`~monai_gamverify.apps.pipeline.Observation` (or a
                :class:`ScreenRecord`).

        Returns:
            ``{"in_distribution", "p_value", "reasons", "notes", "statistic", "score_<detector>",
            "p_<detector>"}``; a detector whose input is missing gets NaN (the combined p-value is then
            conservative).
        """
        return self.score_observations([observation])[0]

    # ----------------------------------------------------------------------------------------------- save/load
    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``screen.json`` (settings, fitted scalars, SHA-256 of the arrays and of the JSON content) and
        ``screen.npz`` (arrays only, no pickled objects).

        Example:
            >>> screen.save("screens/sos_ref")
        """
        self._check_fitted()
        return save_screen(self, directory)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Screen:
        """Load a screen written by :meth:`save`; refuse a missing, malformed or modified file.

        Raises:
            ScreenFileError: the JSON or the arrays do not match their recorded SHA-256, or a file is missing.
        """
        config, state = read_screen(directory)
        screen = cls(**config)
        screen._set_fitted(state)
        return screen
