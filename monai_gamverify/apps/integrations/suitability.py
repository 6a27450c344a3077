"""The SDK-independent core of the serving integrations: :class:`SuitabilityPipeline`.

It runs a bundle on one image the way the MONAI Label task and the MONAI Deploy operator need it, as a thin wrapper
over the single-image engine (:class:`monai_gamverify.apps.pipeline.ImagePipeline`): the bundle's own inference
``preprocessing``, one forward pass that gives the prediction and the CAM, the map back on the input's grid written as
NIfTI, the K+1 garbage rejection when the model has a garbage class, the optional in-distribution screen, and the
suitability verdict from a reference map and a fitted :class:`~monai_gamverify.verification.SuitabilityVerifier`
(``"unverified"`` without them).

Example:
    >>> pipe = SuitabilityPipeline("bundles/sos_staging", reference="verify/reference_map.nii.gz",
    ...                            verifier="verify/verifier.skops")
    >>> result = pipe.run("case_001.nii.gz", out_dir="out")
    >>> result["prediction_name"], result["cam"], result["verdict"]
    ('stage3', 'out/case_001_cam.nii.gz', 'suitable')
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from monai_gamverify.apps.pipeline import VERDICTS, ImagePipeline, decide_verdict, image_stem
from monai_gamverify.io import save_map, save_nifti
from monai_gamverify.visualize.segcam import bundle_activation, default_segmentation_label, label_index

__all__ = ["SuitabilityPipeline", "VERDICTS", "image_stem"]


class SuitabilityPipeline:
    """One image in; prediction, CAM NIfTI on the input's grid, garbage rejection, screen and suitability verdict out.

    A thin wrapper over :class:`~monai_gamverify.apps.pipeline.ImagePipeline` (``.engine``) that returns plain dicts
    for the MONAI Label task and the MONAI Deploy operator.

    Args:
        bundle_root: MONAI bundle directory (``configs/inference.json``, ``configs/metadata.json``, ``models/``).
        config: inference config under ``configs/``.
        overrides: config keys to override (e.g. ``{"network_name": "small_cnn"}``).
        checkpoint: weights file (default ``models/model.pt``; loaded with ``weights_only=True``).
        require_weights: refuse a bundle without weights (``False`` keeps random weights: tests, demos).
        layer: CAM target layer (the engine's ``target_layers``; default: the bundle's ``cam_layer``).
        method: ``gradcam``, ``gradcampp`` or ``scorecam`` (default: the bundle's ``cam_method``, else Grad-CAM).
        reference: reference map (``ReferenceMap.save`` NIfTI or its directory) for the similarity features.
        verifier: fitted ``SuitabilityVerifier`` (``.skops``); needs ``reference``.
        threshold: P(suitable) at or above which the verdict is ``"suitable"``.
        garbage_index: index of the garbage class; ``None`` = the class named ``"garbage"`` if the model has one.
        garbage_threshold: also reject when the garbage probability reaches it (``None``: argmax only).
        screen: optional in-distribution screen (see :class:`~monai_gamverify.apps.pipeline.ImagePipeline`).
        invert: put the map back on the input's own grid (inverse of the preprocessing); ``False`` keeps the
            preprocessed grid (the reference map's grid).
        device: ``cpu``/``cuda`` (default: CUDA when available).

    Example:
        >>> pipe = SuitabilityPipeline("bundles/sos_staging", overrides={"network_name": "small_cnn"})
        >>> pipe.run("case.nii.gz", "out")["probabilities"]
        {'stage1_open': 0.21, ...}
    """

    def __init__(
        self,
        bundle_root: str | os.PathLike,
        *,
        config: str | None = None,
        overrides: Mapping[str, Any] | None = None,
        checkpoint: str | os.PathLike | None = None,
        require_weights: bool = True,
        layer: str | None = None,
        method: str | None = None,
        reference: str | os.PathLike | None = None,
        verifier: str | os.PathLike | None = None,
        threshold: float = 0.5,
        garbage_index: int | None = None,
        garbage_threshold: float | None = None,
        screen: Any = None,
        invert: bool = True,
        device: str | torch.device | None = None,
        label: int | str | None = None,
    ) -> None:
        if verifier is not None and reference is None:
            raise ValueError("a verifier needs the reference map it was fitted against: pass reference=")
        if not 0.0 <= float(threshold) <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold!r}")
        ref = ver = None
        if reference is not None:  # sklearn and pandas only when verifying
            from monai_gamverify.verification.reference import ReferenceMap
            from monai_gamverify.verification.verifier import SuitabilityVerifier

            ref = ReferenceMap.load(reference).value
            ver = SuitabilityVerifier.load(verifier) if verifier is not None else None
        self.root = Path(bundle_root)
        self.engine = ImagePipeline.from_bundle(
            bundle_root,
            config=config,
            overrides=overrides,
            checkpoint=checkpoint,
            require_weights=require_weights,
            target_layers=layer,
            method=method,
            device=device,
            reference=ref,
            verifier=ver,
            threshold=threshold,
            garbage_index=garbage_index,
            garbage_threshold=garbage_threshold,
            screen=screen,
            invert=invert,
        )
        self.bundle = self.engine.bundle
        self.task = "segmentation" if self.bundle.task == "segmentation" else "classification"
        self.engine.check_screen(self.task)
        self.label: int | None = None
        if self.task == "segmentation":
            first = default_segmentation_label(self.bundle)
            self.label = label_index(first if label is None else label, list(self.bundle.class_names))
        elif label is not None:
            raise ValueError("label= is for segmentation bundles; this bundle is a classifier")

    # the settings live in the engine; these views keep the public attributes of earlier versions
    layer = property(lambda self: self.engine.target_layers, doc="CAM target layer.")
    method = property(lambda self: self.engine.method, doc="CAM method.")
    preprocessing = property(lambda self: self.engine.preprocessing, doc="The bundle's inference preprocessing.")
    class_names = property(lambda self: self.engine.class_names, doc="Output names.")
    garbage_index = property(lambda self: self.engine.garbage_index, doc="Index of the garbage class (or None).")
    spatial_dims = property(lambda self: self.engine.spatial_dims, doc="Spatial axes of the network's input.")
    metrics = property(lambda self: self.engine.metrics, doc="Similarity features (None without a reference).")
    verifier = property(lambda self: self.engine.verifier, doc="The fitted verifier (or None).")
    device = property(lambda self: self.engine.device, doc="Device of the network.")

    def _get(name: str, doc: str) -> property:  # noqa: N805 - a property factory used in the class body
        return property(lambda self: getattr(self.engine, name), lambda self, v: setattr(self.engine, name, v), doc=doc)

    threshold = _get("threshold", "P(suitable) threshold of the verdict (settable).")
    garbage_threshold = _get("garbage_threshold", "P(garbage) threshold that also rejects (settable).")
    reference = _get("reference", "Reference map tensor (settable, e.g. moved to another device).")
    invert = _get("invert", "Whether maps go back onto the input's grid (settable).")
    del _get

    @property
    def verified(self) -> bool:
        """Whether a verifier is configured (else every verdict is ``"unverified"``, ``"rejected"`` or
        ``"out of distribution"``)."""
        return self.engine.verifier is not None

    def run(
        self, image: str | os.PathLike, out_dir: str | os.PathLike, name: str | None = None, *, keep_maps: bool = False
    ) -> dict[str, Any]:
        """Explain, reject, screen and verify one image (a file or a DICOM series directory); write
        ``<name>_cam.nii.gz`` in ``out_dir``.

        Args:
            image: image the bundle's preprocessing can read (NIfTI, NRRD, MHA, DICOM series directory, ...).
            out_dir: directory for the map (created).
            name: file stem of the outputs (default: the image's stem).
            keep_maps: also return the written maps in memory under ``maps`` (``{"cam": (map, reference)}``, and
                ``"label_map"`` for a segmentation bundle; the reference carries the affine), so that a caller
                writing them again in another form (DICOM) need not read the files back.

        Returns:
            Dict with ``image``, ``prediction`` (index), ``prediction_name``, ``probabilities`` (name -> p; raw
            ``outputs`` for a single-output or regression model), ``energy``, ``cam`` (path of the NIfTI map),
            ``cam_layer``, ``cam_method``, ``garbage`` (``rejected``, ``garbage_prob``, ``best_real_class``,
            ``best_real_name``, ``best_real_prob``; ``None`` without a garbage class), ``in_distribution``,
            ``p_value``, ``reasons`` (the screen's; ``None``/empty without one), ``features`` (similarity to the
            reference map; ``None`` without one), ``p_suitable`` (``None`` without a verifier) and ``verdict`` (one
            of :data:`VERDICTS`).
        """
        stem = name or image_stem(image)
        if self.task == "segmentation":
            seg = self.segment(image)
            out = Path(out_dir)
            labels, label_ref = seg.pop("label_map").to(torch.uint8), seg.pop("reference")
            label_file = save_nifti(labels, out / f"{stem}_seg.nii.gz", reference=label_ref, dtype=np.uint8)
            cam, cam_ref = seg.pop("cam_map")
            seg.update(label_map=str(label_file), cam=str(save_map(cam, out / f"{stem}_cam.nii.gz", reference=cam_ref)))
            if keep_maps:
                seg["maps"] = {"cam": (cam, cam_ref), "label_map": (labels, label_ref)}
            return seg
        if not keep_maps:
            res = self.engine.run(image, out_dir, name=f"{stem}_cam", overlay=False, summary=False)
            return self.result_dict(res, res.files["map"])
        engine = self.engine  # the steps of engine.run, keeping the map it writes
        raw, x = engine.load(image)
        res = engine.explain(x, raw, source=str(image))
        error = engine.verify([res])[0]
        if error is not None:
            raise error
        cam, ref = engine.on_input_grid(res)
        res.files["map"] = str(save_map(cam, Path(out_dir) / f"{stem}_cam.nii.gz", reference=ref))
        return {**self.result_dict(res, res.files["map"]), "maps": {"cam": (cam, ref)}}

    def segment(
        self, image: str | os.PathLike, *, label: int | str | None = None, explain: bool = True
    ) -> dict[str, Any]:
        """A segmentation bundle on one image: the label map on the input grid, and with ``explain`` the
        Seg-Grad-CAM of ``label`` (default :attr:`label`), the screen's answer and the suitability verdict.

        One pass through the bundle's inferer gives both the logits and the CAM (the sum of the label's logits over
        its predicted mask; a ``SlidingWindowInferer`` runs window by window). The label map is decided on the input
        grid: the probabilities (softmax, or sigmoid when the bundle's ``postprocessing`` applies one; then the file
        holds the first set channel + 1 per voxel) are moved back with the one inverse the CAMs use, then argmax.

        Args:
            image: a file, a DICOM file or a DICOM series directory.
            label: the label to explain (name or output channel).
            explain: compute the CAM, screen and verdict (``False``: the label map alone, no gradient).

        Returns:
            ``image``, ``task``, ``labels`` (name -> value in the label map), ``voxels`` (per label),
            ``label_map`` (tensor on the input grid) and ``reference`` (what carries its affine); with ``explain``
            also ``cam_map`` ((map, reference) on the input grid), ``cam_label``, ``cam_label_index``,
            ``cam_layer``, ``cam_method``, ``in_distribution``, ``p_value``, ``reasons``, ``features``,
            ``p_suitable``, ``verdict``.

        Example:
            >>> res = SuitabilityPipeline("spleen_ct_segmentation").segment("ct_series_dir", label="spleen")
            >>> res["voxels"]["spleen"], res["verdict"]
        """
        if self.task != "segmentation":
            raise ValueError("segment() is for segmentation bundles; this bundle is a classifier (use run())")
        engine, bm = self.engine, self.bundle
        names = list(bm.class_names)
        out: dict[str, Any] = {"image": str(image), "task": "segmentation"}
        # the engine's one observation: read, preprocessing, the inferer's pass and (explain) the label's CAM
        obs = engine.observe(image, class_idx=self.label if label is None else label, cam=explain)
        x, logits = obs.input, obs.logits
        sigmoid = bundle_activation(bm) == "sigmoid"
        probs = logits.sigmoid() if sigmoid else logits.softmax(0)
        probs_in, ref = engine.on_input_grid(SimpleNamespace(cam=probs, input=x))
        if sigmoid:
            on = probs_in > 0.5
            seg = torch.where(on.any(0), on.float().argmax(0) + 1, 0)
        else:
            seg = probs_in.argmax(0)
        labels = self.label_map()
        by_value = {0: names[0] if names and not sigmoid else "background", **{v: n for n, v in labels.items()}}
        counts = torch.bincount(seg.reshape(-1), minlength=max(by_value) + 1).tolist()
        out.update(
            labels=labels,
            voxels={by_value.get(i, str(i)): int(c) for i, c in enumerate(counts)},
            label_map=seg,
            reference=ref,
        )
        if not explain:
            return out
        idx, cam = obs.explained_class, obs.cam
        cam_in, cam_ref = obs.on_input_grid()
        screen = None if engine.screen is None else engine.screen.score(obs)  # is it like the model's data?
        features = p_suitable = None
        if engine.reference is not None:
            feats = engine.features([cam])[0]
            if isinstance(feats, Exception):
                raise feats
            features = feats
            if engine.verifier is not None:
                p_suitable = engine.suitability([feats])[0]
        in_dist = None if screen is None else bool(screen["in_distribution"])
        out.update(
            cam_map=(cam_in, cam_ref),
            cam_label=names[idx] if idx < len(names) else str(idx),
            cam_label_index=idx,
            cam_layer=engine.target_layers,
            cam_method=engine.method,
            in_distribution=in_dist,
            p_value=None if screen is None else screen.get("p_value"),
            reasons=None if screen is None else list(screen.get("reasons") or []),
            features=features,
            p_suitable=p_suitable,
            verdict=decide_verdict(in_dist, None, p_suitable, engine.threshold),
        )
        return out

    def result_dict(self, res: Any, cam: str | os.PathLike) -> dict[str, Any]:
        """The JSON-ready answer of :meth:`run` for an engine result ``res`` whose map was written to ``cam``."""
        image = res.image
        out: dict[str, Any] = {
            "image": str(image),
            "prediction": res.prediction,
            "prediction_name": res.prediction_name,
        }
        if res.probabilities is not None:
            out["probabilities"] = dict(zip(res.class_names, res.probabilities))
        else:
            out["outputs"] = [float(v) for v in res.logits.tolist()]
        out.update(
            energy=res.energy,
            cam=str(cam),
            cam_layer=self.layer,
            cam_method=self.method,
            garbage=res.garbage,
            in_distribution=res.in_distribution,
            p_value=res.p_value,
            reasons=res.reasons,
            features=res.features,
            p_suitable=res.p_suitable,
            verdict=res.verdict,
        )
        return out

    def run_array(
        self,
        array: Any,
        out_dir: str | os.PathLike,
        affine: Any = None,
        name: str = "image",
        *,
        keep_maps: bool = False,
    ) -> dict[str, Any]:
        """Like :meth:`run` for an in-memory image (e.g. a MONAI Deploy ``Image``).

        The array is written to a temporary NIfTI with its affine so that the bundle's own preprocessing (which
        starts with ``LoadImaged``) runs unchanged; the map is aligned with that affine.

        Args:
            array: (*spatial) or (1, *spatial) image, array or tensor, in the axis order of ``affine``.
            out_dir: directory for the map.
            affine: 4x4 voxel-to-world affine (RAS, as in NIfTI); ``None``: identity.
            name: file stem of the outputs.
            keep_maps: as :meth:`run`.

        Returns:
            As :meth:`run` (``image`` is the given ``name``).
        """
        arr = array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)
        if (
            arr.ndim in (3, 4)
            and arr.shape[0] == 1
            and (self.spatial_dims is None or arr.ndim - 1 == self.spatial_dims)
        ):
            arr = arr[0]
        if arr.ndim not in (2, 3):
            raise ValueError(f"expected a 2D or 3D single-channel image, got shape {arr.shape}")
        if not np.isfinite(arr).all():
            raise ValueError(f"image {name!r} contains NaN or infinite voxels")
        with tempfile.TemporaryDirectory(prefix="gamverify_") as tmp:
            # uncompressed: gzip of a 512x512x128 float volume alone took 8 s of a 16 s run (it is read once, then gone)
            src = save_nifti(arr, Path(tmp) / f"{name}.nii", reference=affine, dtype=np.float32)
            result = self.run(src, out_dir, name=name, keep_maps=keep_maps)
        result["image"] = name
        return result

    def label_map(self) -> dict[str, int]:
        """The ``labels`` MONAI Label shows for the task: ``{class name: index}`` of a classifier; of a segmentation
        bundle ``{label name: value in the label map}``, the background (0) implied (a sigmoid bundle's channel i
        is value i + 1)."""
        if self.task != "segmentation":
            return {n: i for i, n in enumerate(self.class_names)}
        shift = 1 if bundle_activation(self.bundle) == "sigmoid" else 0
        return {n: i + shift for i, n in enumerate(self.bundle.class_names) if i + shift > 0}

    def describe(self) -> dict[str, Any]:
        """Settings of the pipeline (for logs and ``info()``)."""
        return {
            "bundle": str(self.root),
            "cam_layer": self.layer,
            "cam_method": self.method,
            "class_names": list(self.class_names),
            "garbage_index": self.garbage_index,
            "verified": self.verified,
            "threshold": self.threshold,
            "metrics": self.metrics,
            "screen": None if self.engine.screen is None else type(self.engine.screen).__name__,
        }
