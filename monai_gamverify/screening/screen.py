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
``maxz`` need only ``n_cal >= 1/alpha - 1`` calibration images to be able to reject; Bonferroni needs ``n_cal >=
m/alpha - 1``.
Hard failures of the profile (NaN, constant, wrong dimensionality or channels, a single slice, a window that turns
the image into a constant) reject regardless, with ``p_value = 0``.

**Segmentation models** (``task="segmentation"``, e.g. a model-zoo UNet with a ``SlidingWindowInferer``) have no
classifier head, garbage class or class-level CAM: their screen uses ``profile`` and ``layout``, plus the early-layer
detectors when the bundle declares ``feature_layers``. Only then is the network run (no gradient, through the
bundle's inferer: :meth:`Screen.record`); the early features are the channel means and stds of each window the
inferer cuts, averaged over the windows.

Example:
    >>> screen = Screen.from_bundle(bm).fit(bm.network, train_files, labels)
    >>> raw = read_image("new.nii.gz"); x = pre(raw)
    >>> with screen.recorder(bm.network) as rec:        # the engine's one forward (+ backward) pass
    ...     res = cam.explain(x[None])
    >>> screen.score(raw, tensor=x, logits=res.logits[0], activations=rec.activations, cam=res.maps[0])
    {'in_distribution': True, 'p_value': 0.41, 'reasons': [], ...}
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from monai_gamverify.bundle import declared_input
from monai_gamverify.kplus1 import find_classifier_head
from monai_gamverify.screening.calibration import fit_observations
from monai_gamverify.screening.common import DETECTORS, Observation
from monai_gamverify.screening.detectors import bonferroni, conformal_pvalues, fisher_conformal, pool_features
from monai_gamverify.screening.messages import detector_messages, profile_messages
from monai_gamverify.screening.persistence import load_screen, save_screen
from monai_gamverify.screening.profile import DataProfile, attach_tensor, intensity_window_of, profile_image
from monai_gamverify.screening.reading import read_image
from monai_gamverify.screening.recorder import PENULTIMATE, FeatureRecorder
from monai_gamverify.screening.scores import monotone, raw_scores, statistic
from monai_gamverify.visualize.hooks import preserved_state
from monai_gamverify.visualize.registry import make_cam

__all__ = ["Screen", "COMBINE", "TASKS"]

#: ways to combine the detectors into one p-value (the first is the default)
COMBINE = ("fisher", "maxz", "bonferroni")
#: the kinds of model a screen is made for
TASKS = ("classification", "segmentation")
#: detectors that need nothing but the image and its preprocessed tensor (no model pass)
_NO_MODEL = ("profile", "layout")


def _as_np(x: Any) -> np.ndarray:
    t = torch.as_tensor(x).detach().cpu()
    t = t.as_tensor() if hasattr(t, "as_tensor") else t
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
            averaged over the inferer's windows, see :meth:`record`).

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
        cam_method = bundle.parser.get_parsed_content("cam_method") if "cam_method" in bundle.parser else "gradcam"
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

    def recorder(self, model: nn.Module) -> FeatureRecorder:
        """A :class:`FeatureRecorder` for this screen's layers (early layers pooled as the screen uses them): enter it
        around the engine's forward pass. A segmentation screen averages the pooled activations over every pass
        (``reduce="mean"``: the windows of a sliding window)."""
        if self.task == "segmentation":
            return FeatureRecorder(model, self.early_layers, None, pool=True, reduce="mean")
        return FeatureRecorder(model, self.early_layers, self.head, pool=True)

    def record(
        self, network: nn.Module, tensor: Any, inferer: Any = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One no-grad pass of a preprocessed (C, *spatial) tensor through ``network`` with :meth:`recorder` entered.

        With an ``inferer`` (a bundle's ``SlidingWindowInferer``) the network runs as the bundle runs it, window by
        window; a segmentation screen's early features are then the channel means and standard deviations of each
        window's activations, **averaged over all windows** with equal weight (the first window alone would describe
        one corner of the volume, often air). Without one (or with any other inferer), one whole-input forward.

        Args:
            network: the model (eval mode for the pass, its state restored).
            tensor: (C, *spatial) preprocessed image (a batch axis is added).
            inferer: the bundle's inferer (``bundle.inferer()``) or ``None``.

        Returns:
            ``(output, activations)``: the (1, ...) output (stitched by the inferer) and the recorded features.

        Example:
            >>> logits, acts = screen.record(bm.network, x, bm.inferer())
            >>> screen.score(raw, tensor=x, activations=acts)
        """
        device = next((p.device for p in network.parameters()), torch.device("cpu"))
        t = tensor.as_tensor() if hasattr(tensor, "as_tensor") else torch.as_tensor(tensor)
        xb = t[None].to(device=device, dtype=torch.float32)
        with self.recorder(network) as rec, preserved_state(network), torch.no_grad():
            out = inferer(xb, network) if inferer is not None and callable(inferer) else network(xb)
        out = out.as_tensor() if hasattr(out, "as_tensor") else out
        return out, rec.activations

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
        inferer: Any = None,
    ) -> Observation:
        """Read (a path), profile, preprocess and run ``network`` once (CAM forward/backward with the recorder).

        A hard failure of the profile, or a preprocessing that fails, returns before the model is called; so does a
        screen whose detectors need no model pass (:attr:`needs_network`). A segmentation screen runs the network
        through ``inferer`` (:meth:`record`); a classification screen ignores it (its CAM sees the whole input).
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
        if not self.needs_network:
            return self.observe(tensor=x, profile=prof)
        if self.task == "segmentation":  # no logits kept: a (K, *spatial) output is nothing the detectors use
            _, acts = self.record(network, x, inferer)
            return self.observe(tensor=x, activations=acts, profile=prof)
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
        network: nn.Module,
        images: Sequence[Any],
        labels: Sequence[int] | None = None,
        *,
        preprocess: Callable[[Any], torch.Tensor] | None = None,
        calibration: Sequence[Any] | None = None,
        calibration_fraction: float = 0.35,
        seed: int = 0,
        inferer: Any = None,
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
            inferer: a segmentation bundle's inferer (``bundle.inferer()``), see :meth:`observe_image`.

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
        obs = [self.observe_image(network, img, preprocess, cam, inferer) for img in images]
        cal = None
        if calibration is not None:
            cal = [self.observe_image(network, i, preprocess, cam, inferer) for i in calibration]
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
        return fit_observations(
            self,
            observations,
            labels,
            calibration=calibration,
            calibration_fraction=calibration_fraction,
            seed=seed,
            names=names,
        )

    # ---------------------------------------------------------------------------------------------------- score
    def _check_fitted(self) -> None:
        if not self.fitted_:
            raise RuntimeError("the screen is not fitted: call fit() or Screen.load()")

    def score_observations(self, observations: Sequence[Observation]) -> list[dict[str, Any]]:
        """Verdicts for several observations (see :meth:`score`)."""
        self._check_fitted()
        obs = list(observations)
        raw = raw_scores(self, obs)
        pvals = np.full_like(raw, np.nan)
        for j in range(len(DETECTORS)):
            cal = self.cal_scores_[:, j]
            if np.isfinite(cal).all() and cal.size:
                pvals[:, j] = conformal_pvalues(cal, raw[:, j])
        z = self.score_scaler_.transform(monotone(raw))
        if self.combine == "fisher":
            z_cal = self.score_scaler_.transform(monotone(self.cal_scores_))
            combined, stat = fisher_conformal(self.cal_scores_, raw, z_cal, z)
        else:
            stat = statistic(self, raw)
            if self.combine == "maxz":
                combined = conformal_pvalues(self.cal_stat_[np.isfinite(self.cal_stat_)], stat)
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
        return load_screen(cls, directory)


def _batch1(x: Any) -> torch.Tensor:
    t = torch.as_tensor(x).detach()
    return t if t.ndim >= 2 and t.shape[0] == 1 else t[None]


def _make_cam(network: nn.Module, layer: str, method: str) -> Any:
    return make_cam(network, layer, method)
