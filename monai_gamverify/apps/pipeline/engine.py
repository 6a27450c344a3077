"""The single-image engine :class:`ImagePipeline` (see :mod:`monai_gamverify.apps.pipeline`).

Over 500 lines because it is the one engine every route shares: construction from a bundle or a network, the read,
the observation (its strategies are in :mod:`~monai_gamverify.apps.pipeline.strategies`), the per-image rules, the
batched features and verdicts, the files. Splitting these would spread one image's path over several modules.
"""
# long module: the single-image engine; load, observe, screen, verify and write share its state

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from monai.transforms import Compose, EnsureChannelFirst, EnsureChannelFirstd, LoadImage, LoadImaged
from torch import nn

from monai_gamverify.apps.pipeline.observation import Observation, preprocessing_hash, reader_policy
from monai_gamverify.apps.pipeline.result import (
    ImageResult,
    PreprocessingError,
    decide_verdict,
    error_message,
    image_stem,
    is_out_of_memory,
    is_regression,
    plain,
    simple_preprocessing,
)
from monai_gamverify.apps.pipeline.strategies import WholeInput, choose_strategy
from monai_gamverify.bundle import BundleModel, geometry_problems, load_bundle, load_checkpoint, network_from_name
from monai_gamverify.energy.attribution import attribution_energy
from monai_gamverify.energy.workflow import SliceCAMd
from monai_gamverify.io import save_map, to_input_grid, write_json
from monai_gamverify.io.dicom import dicom_series
from monai_gamverify.kplus1 import RejectGarbaged, find_classifier_head
from monai_gamverify.metrics.similarity import ALL_METRICS, DEFAULT_METRICS, similarity_metrics
from monai_gamverify.screening import Screen
from monai_gamverify.screening.recorder import FeatureRecorder
from monai_gamverify.visualize.plots import overlay_png
from monai_gamverify.visualize.registry import cam_method, make_cam
from monai_gamverify.visualize.segcam import (
    default_segmentation_label,
    label_index,
)

__all__ = ["ImagePipeline"]

logger = logging.getLogger(__name__)

_LOADERS = (LoadImaged, LoadImage, EnsureChannelFirstd, EnsureChannelFirst)


class ImagePipeline:
    """One image in: prediction, CAM, attribution energy, map on the input grid, K+1, screen, verdict, files out.

    Args:
        network: the ``torch.nn.Module`` (eval mode is used for every call; its state is left as it was).
        target_layers: the CAM layer (one name as in ``network.named_modules()``).
        preprocessing: dictionary transform ``{"image": path} -> {"image": (C, *spatial)}``, invertible for the
            maps to go back onto the input grid (default: :func:`simple_preprocessing`).
        method: CAM method (``gradcam``, ``gradcampp``/``gradcam++``, ``scorecam``; see ``visualize.registry``).
        class_names: output names (default: the indices).
        regression: the outputs are scores, not logits (no softmax).
        slice_axis: a 2D network explained slice by slice along this spatial axis of a volume (``None``: the
            network takes the image's own dimensionality).
        reference: reference map (1, 1, *spatial) or (1, *spatial) on the preprocessed grid, for the features.
        verifier: fitted ``SuitabilityVerifier`` (needs ``reference``).
        threshold: P(suitable) at or above which the verdict is ``"suitable"``.
        metrics: similarity features (default ``DEFAULT_METRICS`` plus any the verifier uses).
        garbage_index: index of the garbage class; ``None``: the class named ``"garbage"`` if there is one.
        garbage_threshold: also reject when P(garbage) reaches it (``None``: argmax only).
        screen: optional in-distribution screen: a saved :class:`~monai_gamverify.screening.Screen` directory, or an
            object with ``score(observation) -> {"in_distribution", "p_value", "reasons", ...}`` (optionally
            ``score_observations``, ``early_layers`` and ``head``: recorded during the CAM's own forward pass,
            ``check_settings(settings)``: refuse observations unlike those it was fitted on).
        invert: put maps back on the input's grid (``False``: keep the preprocessed grid).
        device: where the network runs (default: where its parameters are).
        cam_options: extra arguments of the CAM class (e.g. Score-CAM's ``top_k``, ``max_memory_mb``).
        feature_layers: early layers whose pooled activations every observation records (channel means and
            standard deviations; a screen's early layers are added).
        head: the classifier head whose input every observation records (``"penultimate"``; a screen's head wins).

    Example:
        >>> pipe = ImagePipeline(net, "layer4", class_names=["a", "b"])
        >>> res = pipe.run("img.nii.gz", out_dir="out")
    """

    def __init__(
        self,
        network: nn.Module,
        target_layers: str,
        *,
        preprocessing: Callable[[dict], dict] | None = None,
        method: str = "gradcam",
        class_names: Sequence[str] | None = None,
        regression: bool = False,
        slice_axis: int | None = None,
        reference: Any = None,
        verifier: Any = None,
        threshold: float = 0.5,
        metrics: Sequence[str] | None = None,
        garbage_index: int | None = None,
        garbage_threshold: float | None = None,
        screen: Any = None,
        invert: bool = True,
        device: str | torch.device | None = None,
        cam_options: Mapping[str, Any] | None = None,
        feature_layers: Sequence[str] = (),
        head: str | None = None,
    ) -> None:
        if not isinstance(target_layers, str) or not target_layers:
            raise ValueError(f"target_layers must be one layer name (a string), got {target_layers!r}")
        if verifier is not None and reference is None:
            raise ValueError("a verifier needs the reference map it was fitted against: pass reference=")
        if not 0.0 <= float(threshold) <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold!r}")
        if device is not None:
            network = network.to(torch.device(device))
        self.network = network.eval()
        self.target_layers = target_layers
        self.method = cam_method(method)
        self.preprocessing = preprocessing if preprocessing is not None else simple_preprocessing()
        self.class_names = [str(n) for n in (class_names or [])]
        self.regression = bool(regression)
        self.slice_axis = slice_axis
        self.cam = make_cam(network, target_layers, self.method, **dict(cam_options or {}))
        self.slicer = None
        if slice_axis is not None:
            self.slicer = SliceCAMd("image", network, target_layers, method=self.method, slice_axis=int(slice_axis),
                                    normalize=False)  # fmt: skip
        self.threshold = float(threshold)
        self.garbage_index = garbage_index
        if garbage_index is None and "garbage" in self.class_names:
            self.garbage_index = self.class_names.index("garbage")
        self.garbage_threshold = garbage_threshold
        self.screen = Screen.load(screen) if isinstance(screen, (str, os.PathLike)) else screen
        self.invert = bool(invert)
        self.verifier = verifier
        self.reference = None if reference is None else self._as_map(torch.as_tensor(plain(reference))).float()
        self.metrics: list[str] | None = None
        if reference is not None:
            self.metrics = list(metrics) if metrics is not None else list(DEFAULT_METRICS)
            if verifier is not None:
                used = [str(c) for c in verifier.feature_names_in_]
                unknown = [c for c in used if c not in ALL_METRICS]
                if unknown:
                    raise ValueError(f"the verifier uses feature(s) {unknown} that are not similarity metrics")
                self.metrics += [c for c in used if c not in self.metrics]
        self.feature_layers = list(feature_layers)
        self.head = head
        self._settings: dict[str, Any] | None = None
        self._loader, self._rest = self._split(self.preprocessing)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_bundle(
        cls,
        bundle: BundleModel | str | os.PathLike,
        *,
        config: str | None = None,
        overrides: Mapping[str, Any] | None = None,
        checkpoint: str | os.PathLike | None = None,
        require_weights: bool = True,
        target_layers: str | None = None,
        method: str | None = None,
        device: str | torch.device | None = None,
        **kwargs: Any,
    ) -> ImagePipeline:
        """The engine for a MONAI bundle: its network and weights (``checkpoint`` overrides ``models/model.pt``),
        inference ``preprocessing``, CAM layer and method, class names, regression flag and slice axis.

        Args:
            bundle: bundle directory or a loaded :class:`~monai_gamverify.bundle.BundleModel`.
            config: inference config under ``configs/`` (default: the first of ``inference.json``, ``.yaml``, ``.yml``).
            overrides: config keys to override (e.g. ``{"network_name": "small_cnn"}``).
            checkpoint: weights file.
            require_weights: refuse a bundle without weights.
            target_layers: CAM layer (default: the bundle's ``cam_layer``).
            method: CAM method (default: the bundle's ``cam_method``, else Grad-CAM).
            device: where the network runs.
            kwargs: further :class:`ImagePipeline` arguments.

        Returns:
            The engine; ``.bundle`` holds the :class:`BundleModel`.
        """
        bm = bundle
        if not isinstance(bm, BundleModel):
            bm = load_bundle(bundle, config=config, checkpoint=checkpoint, device=device,
                             require_weights=require_weights, overrides=dict(overrides or {}))  # fmt: skip
        elif checkpoint is not None:
            load_checkpoint(bm.network, checkpoint)
        layer = target_layers or bm.target_layer
        if not layer:
            raise ValueError(f"bundle {bm.root} declares no CAM layer (cam_layer): pass target_layers=")
        parser = bm.parser
        if method is None:
            method = parser.get_parsed_content("cam_method") if "cam_method" in parser else None
            method = method or bm.metadata.get("gamverify", {}).get("cam_method") or "gradcam"
        pre = kwargs.pop("preprocessing", None) or bm.preprocessing()
        if pre is None:
            raise ValueError(f"bundle {bm.root} defines no 'preprocessing'")
        # the config follows overrides (a K+1 config adds "garbage"); metadata describes the default network only
        names = kwargs.pop("class_names", None)
        if names is None and "class_names" in parser:
            names = parser.get_parsed_content("class_names")
        inputs = bm.metadata.get("network_data_format", {}).get("inputs", {})
        shape = next(iter(inputs.values()), {}).get("spatial_shape") if inputs else None
        kwargs.setdefault("slice_axis", bm.slice_axis(3))  # a 2D network on volumes (e.g. cbct_quality)
        kwargs.setdefault("feature_layers", list(bm.feature_layers) or list(getattr(bm.network, "feature_layers", ())))
        if "head" not in kwargs and not (bm.task == "segmentation" and kwargs["slice_axis"] is None):
            try:
                kwargs["head"] = find_classifier_head(bm.network)[0]
            except ValueError:  # no linear head: no penultimate features
                kwargs["head"] = None
        pipe = cls(bm.network, layer, preprocessing=pre, method=method, class_names=names or bm.class_names,
                   regression=is_regression(bm.metadata), device=device, **kwargs)  # fmt: skip
        pipe.bundle = bm
        pipe.spatial_dims = len(shape) if shape else None
        return pipe

    @classmethod
    def from_network(
        cls,
        network: str | nn.Module,
        target_layers: str,
        *,
        network_args: Mapping[str, Any] | str | None = None,
        checkpoint: str | os.PathLike | None = None,
        a_min: float | None = None,
        a_max: float | None = None,
        spatial_dims: int | None = None,
        device: str | torch.device | None = None,
        **kwargs: Any,
    ) -> ImagePipeline:
        """The engine for a network given by name (``monai.networks.nets`` name or dotted path) or as a module.

        Args:
            network: name, or a ``torch.nn.Module``.
            target_layers: CAM layer.
            network_args: keyword arguments of a named network (dict or JSON).
            checkpoint: weights (``torch.load(weights_only=True)``); without one the weights stay as they are (a
                warning is logged).
            a_min: with ``a_max``, intensity window mapped to [0, 1].
            a_max: see ``a_min``.
            spatial_dims: spatial axes every image must have (``None``: not checked).
            device: where the network runs (default: CUDA when available).
            kwargs: further :class:`ImagePipeline` arguments.
        """
        net = network_from_name(network, network_args) if isinstance(network, str) else network
        if not isinstance(net, nn.Module):
            raise TypeError(f"network must be a torch.nn.Module or a network name, got {type(network).__name__}")
        if checkpoint is not None:
            load_checkpoint(net, checkpoint)
        else:
            logger.warning("no checkpoint given; the network keeps its current (possibly random) weights")
        dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        kwargs.setdefault("preprocessing", simple_preprocessing(spatial_dims, a_min, a_max))
        pipe = cls(net, target_layers, device=dev, **kwargs)
        pipe.spatial_dims = spatial_dims
        return pipe

    bundle: BundleModel | None = None
    spatial_dims: int | None = None

    # ------------------------------------------------------------------ helpers
    @property
    def device(self) -> torch.device:
        """Device of the network."""
        param = next(self.network.parameters(), None)
        return param.device if param is not None else torch.device("cpu")

    def names_for(self, n: int) -> list[str]:
        """Output names for a network with ``n`` outputs (the indices when the names do not fit)."""
        if len(self.class_names) == n:
            return list(self.class_names)
        if self.bundle is not None and len(self.bundle.class_names) == n:
            return list(self.bundle.class_names)
        return [str(i) for i in range(n)]

    @staticmethod
    def _as_map(t: torch.Tensor) -> torch.Tensor:
        return t if t.ndim >= 4 and t.shape[0] == 1 and t.shape[1] == 1 else t.reshape(1, 1, *t.shape[-3:])

    @staticmethod
    def _split(pre: Any) -> tuple[list[Any], Callable | None]:
        """(leading loading transforms, the rest) of a ``Compose``; ``([], None)`` when not separable."""
        if not isinstance(pre, Compose):
            return [], None
        ts = list(pre.transforms)
        k = 0
        while k < len(ts) and isinstance(ts[k], _LOADERS):
            k += 1
        if k == 0 or not any(isinstance(t, (LoadImaged, LoadImage)) for t in ts[:k]):
            return [], None
        return ts[:k], Compose(ts[k:]) if k < len(ts) else (lambda d: d)

    # ------------------------------------------------------------------ 1 load
    def load(self, image: str | os.PathLike | torch.Tensor, extra: Mapping[str, Any] | None = None) -> tuple[Any, Any]:
        """Read and preprocess one image.

        Args:
            image: a file, a DICOM series directory, or an already loaded channel-first ``MetaTensor``.
            extra: further entries of the data dict (e.g. a datalist entry's ``label``).

        Returns:
            (the image as loaded, channel first, native units or ``None`` when the preprocessing does not separate
            its loading; the preprocessed (C, *spatial) float32 image).

        Raises:
            FileNotFoundError: the path does not exist.
            PreprocessingError: it cannot be read or transformed (the message names the file and the cause; its
                ``raw_image`` is the image as read when only a later step failed).
        """
        data = {k: v for k, v in (extra or {}).items() if k not in ("id", "image")}
        if isinstance(image, torch.Tensor):
            if self._rest is None:
                raise ValueError("the preprocessing does not separate its loading: give a file, not a tensor")
            raw, name = image, getattr(image, "meta", {}).get("filename_or_obj", "image")
        else:
            p = Path(image)
            if not p.exists():  # exists(), not is_file(): a DICOM series is a directory
                raise FileNotFoundError(f"image file not found: {p}")
            raw, name = None, str(p)
            data["image"] = str(p)
            if p.is_dir():  # the policy of io.load_image: a folder of several DICOM series is ambiguous, refuse it
                try:
                    series = dicom_series(p)
                except ImportError:  # no ITK: the bundle's reader decides (and names its own error)
                    series = {}
                if len(series) > 1:
                    raise PreprocessingError(
                        name,
                        f"the directory holds {len(series)} DICOM series {sorted(series)}: give the directory of one "
                        "series (io.load_image(path, series_uid=...) reads one of several)",
                    )
        try:
            if raw is None and self._rest is None:
                return None, self._check(self.preprocessing(data)["image"], name)
            if raw is None:
                for t in self._loader:
                    data = t(data)
                raw = data["image"]
            out = self._rest({**data, "image": raw.clone() if hasattr(raw, "clone") else raw})["image"]
        except Exception as err:  # readers and transforms raise many types: name the file and the first cause
            if is_out_of_memory(err):
                raise
            raise PreprocessingError(name, error_message(err), raw_image=raw) from err
        try:
            out = self._check(out, name)
        except PreprocessingError as err:
            err.raw_image = raw
            raise
        if self.bundle is not None:  # one slice into a 3D network, fewer voxels than the total stride, channels
            problems = geometry_problems(out, self.bundle)
            if problems:
                raise PreprocessingError(name, "the image does not suit the network: " + "; ".join(problems), raw)
        return raw, out

    @staticmethod
    def _check(x: Any, name: str) -> Any:
        if not isinstance(x, torch.Tensor):
            raise PreprocessingError(name, f"the preprocessing gave a {type(x).__name__}, not a tensor")
        return x.float() if x.dtype != torch.float32 else x

    # ------------------------------------------------------------------ 2 observe
    @property
    def task(self) -> str:
        """``"segmentation"`` for a segmentation bundle explained through its inferer (Seg-Grad-CAM), else
        ``"classification"`` (a classifier or regressor; a 2D one on volumes slice by slice)."""
        seg = self.bundle is not None and self.bundle.task == "segmentation" and self.slice_axis is None
        return "segmentation" if seg else "classification"

    def observation_settings(self, class_idx: Any = None) -> dict[str, Any]:
        """The settings an observation depends on (recorded by a screen when it is fitted, compared when it is
        applied): ``reader`` (the loading transform's readers), ``layer``, ``method``, ``class_policy`` (which
        output the map explains), ``slice_axis`` and ``preprocessing`` (:func:`preprocessing_hash`)."""
        if self.task == "segmentation":
            labels = class_idx if isinstance(class_idx, (list, tuple)) else [class_idx]
            names = list(self.bundle.class_names)
            idx = [
                label_index(default_segmentation_label(self.bundle) if lab is None else lab, names) for lab in labels
            ]
            policy = "label " + ",".join(str(i) for i in idx)
        else:
            policy = "predicted class" if class_idx is None else f"output {int(class_idx)}"
        if self._settings is None:
            self._settings = {
                "reader": reader_policy(self.preprocessing),
                "preprocessing": preprocessing_hash(self.preprocessing),
            }
        return {
            "reader": self._settings["reader"],
            "layer": self.target_layers,
            "method": self.method,
            "class_policy": policy,
            "slice_axis": self.slice_axis,
            "preprocessing": self._settings["preprocessing"],
        }

    def _recorder(self, reduce: str = "first") -> FeatureRecorder:
        """The features recorded during the forward pass: the engine's ``feature_layers`` and the screen's early
        layers (pooled), and the classifier head's input (``"penultimate"``)."""
        layers = list(dict.fromkeys([*self.feature_layers, *(getattr(self.screen, "early_layers", None) or [])]))
        head = getattr(self.screen, "head", None) or self.head
        if self.task == "segmentation":
            head = None
        return FeatureRecorder(self.network, layers, head, pool=True, reduce=reduce)

    def observe(
        self,
        item: str | os.PathLike | Mapping[str, Any] | torch.Tensor,
        class_idx: Any = None,
        *,
        box: Sequence[Sequence[int]] | None = None,
        cam: bool = True,
        forward: bool = True,
    ) -> Observation:
        """Everything the package knows about one image, from one read, one preprocessing and one forward (+ backward)
        pass: THE producer of per-image evidence (the screen, the verifier, the cohort, ``gamverify cam``, MONAI Label
        and Deploy use it).

        Args:
            item: a file or DICOM series directory, a dict with ``"image"`` (a datalist entry; its other keys go to
                the preprocessing), or an already loaded channel-first ``MetaTensor``.
            class_idx: classification: the output column explained (default: the predicted one); segmentation: the
                label(s) explained, names or channels (default: the first foreground channel,
                ``segcam.default_segmentation_label``).
            box: segmentation: ``[[lo, hi], ...]`` per spatial axis of the preprocessed grid, the region of the target
                instead of the predicted mask.
            cam: compute the maps (``False``: the forward pass only, no backward).
            forward: run the network (``False``: read and preprocess only).

        Returns:
            :class:`Observation`.

        Raises:
            FileNotFoundError: the file does not exist.
            PreprocessingError: it cannot be read or preprocessed (``raw_image`` holds the image when the read
                succeeded and a later transform failed).

        Example:
            >>> obs = ImagePipeline.from_bundle("bundles/sos_staging").observe("case_001.nii.gz")
            >>> obs.prediction, obs.cam.shape, obs.cam_input.shape, obs.features["penultimate"].shape
        """
        extra = None
        if isinstance(item, Mapping):
            if "image" not in item:
                raise ValueError(f"an item dict needs an 'image' entry, got keys {sorted(item)}")
            extra, item = item, item["image"]
        raw, x = self.load(item, extra=extra)
        source = str(item) if not isinstance(item, torch.Tensor) else None
        return self.observe_loaded(x, raw, class_idx, source=source, box=box, cam=cam, forward=forward)

    def observe_loaded(
        self,
        x: Any,
        raw_image: Any = None,
        class_idx: Any = None,
        *,
        source: str | None = None,
        box: Sequence[Sequence[int]] | None = None,
        cam: bool = True,
        forward: bool = True,
    ) -> Observation:
        """:meth:`observe` of an image already read and preprocessed by :meth:`load` (``x``: (C, *spatial))."""
        name = source or str(getattr(x, "meta", {}).get("filename_or_obj", "image"))
        task = self.task
        if task == "segmentation" and box is None and class_idx is None:
            class_idx = default_segmentation_label(self.bundle)
        obs = Observation(
            image=name,
            task=task,
            raw_image=raw_image,
            input=x.detach().cpu() if hasattr(x, "detach") else x,
            regression=self.regression,
            settings=self.observation_settings(class_idx),
            inverse=self._inverse,
        )
        check = getattr(self.screen, "check_settings", None)
        if check is not None:
            check(obs.settings)
        if not forward:
            return obs
        strategy = choose_strategy(self, x)
        if self.spatial_dims is not None and isinstance(strategy, WholeInput) and x.ndim - 1 != self.spatial_dims:
            raise ValueError(
                f"the network takes {self.spatial_dims}D inputs but the preprocessing gives {x.ndim - 1}D images "
                f"({tuple(x.shape)})"
            )
        strategy.observe(self, obs, x.unsqueeze(0).to(self.device, dtype=torch.float32), class_idx, box, cam)
        return obs

    def _inverse(self, cam: torch.Tensor, x: Any) -> tuple[torch.Tensor, Any]:
        return self.on_input_grid(SimpleNamespace(cam=cam, input=x))

    # ------------------------------------------------------------------ 2b the result of one image
    def explain(
        self,
        x: Any,
        raw_image: Any = None,
        class_idx: int | None = None,
        source: str | None = None,
        defer_screen: bool = False,
    ) -> ImageResult:
        """:meth:`observe_loaded` then the per-image rules: energy, normalised map, K+1 and the screen.

        Args:
            x: preprocessed (C, *spatial) image (from :meth:`load`).
            raw_image: the image as loaded (for the screen's data profile).
            class_idx: output column to explain (default: the predicted one).
            source: name of the image in the result (default: the ``MetaTensor``'s file name).
            defer_screen: keep the observation and let :meth:`screen_results` judge many results in one vectorised
                call later (e.g. in a cohort's writer thread, overlapping the next forward pass).

        Returns:
            :class:`ImageResult` (``features``/``p_suitable`` filled by :meth:`verify`).
        """
        obs = self.observe_loaded(x, raw_image, class_idx, source=source)
        return self.result(obs, defer_screen=defer_screen)

    def result(self, obs: Observation, defer_screen: bool = False) -> ImageResult:
        """The :class:`ImageResult` of a classification observation: energy, normalised map, K+1 and the screen."""
        if obs.task != "classification":
            raise ValueError("result() is for classification observations; a segmentation's maps are obs.cams")
        raw_map = obs.raw_map[None]
        energy = float(attribution_energy(raw_map)[0])
        logits, names = obs.logits, obs.class_names
        probs = obs.probabilities.tolist() if obs.probabilities is not None else None
        result = ImageResult(obs.image, logits, names, probs, int(obs.prediction), int(obs.explained_class), energy,
                             obs.cam, obs.input, obs.raw_image)  # fmt: skip
        result.observation = obs
        if self.garbage_index is not None:
            rej = RejectGarbaged("pred", garbage_index=self.garbage_index, threshold=self.garbage_threshold)
            out = rej.reject(logits)
            best = int(out["best_real_class"])
            result.garbage = {
                "rejected": bool(out["rejected"]),
                "garbage_prob": float(out["garbage_prob"]),
                "best_real_class": best,
                "best_real_name": names[best],
                "best_real_prob": float(out["best_real_prob"]),
            }
        if self.screen is not None:
            if defer_screen and hasattr(self.screen, "score_observations"):
                result.pending_screen = obs
                return result
            self._set_screen(result, self.screen.score(obs))
        result.verdict = decide_verdict(result.in_distribution, result.rejected, None, self.threshold)
        return result

    def screen_results(self, results: Sequence[Any]) -> None:
        """The screen's answers for results made with ``explain(..., defer_screen=True)`` (or any object with
        ``pending_screen`` holding an :class:`Observation`), in one vectorised call (the same numbers as one call
        each); each result's screen fields and verdict are updated."""
        todo = [r for r in results if r.pending_screen is not None]
        if not todo:
            return
        for r, s in zip(todo, self.screen.score_observations([r.pending_screen for r in todo])):
            r.pending_screen = None
            self._set_screen(r, s)

    def check_screen(self, task: str) -> None:
        """Refuse a screen fitted for another kind of model (``task``: ``"classification"`` or ``"segmentation"``,
        what this engine is used for); a screen object without a ``task`` is not checked."""
        fitted = getattr(self.screen, "task", None)
        if self.screen is not None and fitted is not None and fitted != task:
            raise ValueError(
                f"the screen was fitted for a {fitted} model but it is used with a {task} model: fit a screen for "
                "this bundle (gamverify screen fit)"
            )

    def _set_screen(self, result: ImageResult, answer: Mapping[str, Any]) -> None:
        s = dict(answer)
        result.screen = s
        result.in_distribution = bool(s["in_distribution"])
        result.p_value = None if s.get("p_value") is None else float(s["p_value"])
        result.reasons = [str(r) for r in s.get("reasons", [])]
        result.verdict = decide_verdict(result.in_distribution, result.rejected, result.p_suitable, self.threshold)

    # ------------------------------------------------------------------ 3 features and verdicts
    def features(self, maps: Sequence[torch.Tensor]) -> list[dict[str, float] | Exception]:
        """Similarity features of many normalised maps against the reference map, in one ``similarity_metrics``
        call for all maps of the reference's shape (the values are computed per map: the same as one call each).

        Args:
            maps: (1, *spatial) maps on the preprocessed grid.

        Returns:
            One dict per map, or the error of that map (e.g. a shape unlike the reference's).
        """
        if self.reference is None:
            raise ValueError("no reference map: pass reference= to compute similarity features")
        ref = self.reference.to(self.device)
        out: list[dict[str, float] | Exception] = [ValueError("not computed")] * len(maps)
        want = tuple(ref.shape[2:])
        fits = [k for k, m in enumerate(maps) if tuple(m.shape[1:]) == want]
        for k in set(range(len(maps))) - set(fits):
            out[k] = ValueError(
                f"the map has shape {tuple(maps[k].shape[1:])} but the reference map has {want}: the reference was "
                "made with another preprocessing"
            )
        todo = list(fits)
        if len(fits) > 1:
            try:
                batch = torch.stack([maps[k] for k in fits]).to(ref.device).float()
                values = {n: v.tolist() for n, v in similarity_metrics(batch, ref, metrics=self.metrics).items()}
                for j, k in enumerate(fits):
                    out[k] = {n: float(v[j]) for n, v in values.items()}
                todo = []
            except Exception as err:  # noqa: BLE001 - e.g. one map with NaN: the calls per map below say which
                if is_out_of_memory(err):
                    raise
                todo = list(fits)
        for k in todo:
            try:
                feats = similarity_metrics(maps[k][None].to(ref.device).float(), ref, metrics=self.metrics)
                out[k] = {n: float(v[0]) for n, v in feats.items()}
            except Exception as err:  # noqa: BLE001 - reported per map
                if is_out_of_memory(err):
                    raise
                out[k] = err
        return out

    def suitability(self, features: Sequence[Mapping[str, float]]) -> list[float]:
        """The verifier's P(suitable) for many feature rows in one forest call (a single-row call costs about as
        much as the forward pass and CAM of a 32^3 volume, a batched one does not)."""
        if self.verifier is None:
            raise ValueError("no verifier configured")
        if not features:
            return []
        cols = [str(c) for c in self.verifier.feature_names_in_]
        rows = np.array([[float(f[c]) for c in cols] for f in features], dtype=np.float64)  # the verifier's order
        return [float(p) for p in self.verifier.predict_proba(rows)[:, 1]]

    def verify(self, results: Sequence[ImageResult]) -> list[Exception | None]:
        """Features, P(suitable) and verdicts of a batch of results (in place); returns the error of each (or None)."""
        errors: list[Exception | None] = [None] * len(results)
        if self.reference is not None and results:
            feats = self.features([r.cam for r in results])
            for k, (r, f) in enumerate(zip(results, feats)):
                if isinstance(f, Exception):
                    errors[k] = f
                else:
                    r.features = f
            if self.verifier is not None:
                ok = [k for k in range(len(results)) if errors[k] is None]
                for k, p in zip(ok, self.suitability([results[k].features for k in ok])):
                    results[k].p_suitable = p
        for r in results:
            r.verdict = decide_verdict(r.in_distribution, r.rejected, r.p_suitable, self.threshold)
        return errors

    # ------------------------------------------------------------------ 4 files
    def on_input_grid(self, result: ImageResult) -> tuple[torch.Tensor, Any]:
        """(map, what carries its affine): on the input's grid (``io.grid.to_input_grid``: the fast exact inverse,
        else MONAI's ``Invertd``), or on the preprocessed grid when ``invert`` is off."""
        if not self.invert:
            return result.cam, result.input
        return to_input_grid(result.cam, result.input, self.preprocessing)

    def write(
        self, result: ImageResult, out_dir: str | os.PathLike, name: str, *, overlay: bool = True, summary: bool = True
    ) -> dict[str, str]:
        """Write ``<name>.nii.gz`` (the map on the input grid with the input's affine), ``<name>.png`` (overlay on
        the image) and ``<name>.json`` (:meth:`summary`) in ``out_dir``; returns (and records) the paths."""
        out = Path(out_dir)
        cam, ref = self.on_input_grid(result)
        files = {"map": str(save_map(cam, out / f"{name}.nii.gz", reference=ref))}
        if overlay:
            on_input = (
                self.invert
                and result.raw_image is not None
                and tuple(result.raw_image.shape[1:]) == tuple(cam.shape[1:])
            )
            base = result.raw_image if on_input else result.input
            if not on_input:
                cam = result.cam
            title = f"{self.method} {self.target_layers}: {image_stem(result.image)} -> {result.prediction_name}"
            files["overlay"] = str(overlay_png(base[0], plain(cam)[0], out / f"{name}.png", title=title))
        result.files.update(files)
        if summary:
            files["summary"] = str(out / f"{name}.json")
            result.files["summary"] = files["summary"]
            write_json(self.summary(result), out / f"{name}.json")
        return files

    def summary(self, result: ImageResult) -> dict[str, Any]:
        """JSON-ready summary of a result."""
        return {
            "image": result.image,
            "layer": self.target_layers,
            "method": self.method,
            "explained_class": result.explained_class,
            "outputs": [float(v) for v in result.logits.tolist()],
            "prediction": result.prediction,
            "prediction_name": result.prediction_name,
            "probabilities": result.probabilities,
            "energy": result.energy,
            "garbage": result.garbage,
            "in_distribution": result.in_distribution,
            "p_value": result.p_value,
            "reasons": result.reasons,
            "features": result.features,
            "p_suitable": result.p_suitable,
            "verdict": result.verdict,
            **result.files,
        }

    def run(
        self,
        image: str | os.PathLike | torch.Tensor,
        out_dir: str | os.PathLike | None = None,
        name: str | None = None,
        class_idx: int | None = None,
        overlay: bool = True,
        summary: bool = True,
    ) -> ImageResult:
        """All steps for one image: :meth:`load`, :meth:`explain`, :meth:`verify` and, with ``out_dir``,
        :meth:`write` (file stem ``name``, default ``<image stem>_cam``)."""
        raw, x = self.load(image)
        source = str(image) if not isinstance(image, torch.Tensor) else None
        result = self.explain(x, raw, class_idx=class_idx, source=source)
        errors = self.verify([result])
        if errors[0] is not None:
            raise errors[0]
        if out_dir is not None:
            self.write(result, out_dir, name or f"{image_stem(result.image)}_cam", overlay=overlay, summary=summary)
        return result
