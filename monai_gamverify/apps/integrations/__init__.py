"""Serving integrations: MONAI Label infer task and MONAI Deploy operator around one SDK-independent core.

:class:`SuitabilityPipeline` runs a bundle on one image the way both front ends need it: the bundle's own inference
``preprocessing``, one forward pass that gives the prediction and the Grad-CAM (``cam.explain``), the map inverted
back onto the input's grid and written as NIfTI, the K+1 garbage rejection when the model has a garbage class, and the
suitability verdict from a reference map and a fitted :class:`~monai_gamverify.verification.SuitabilityVerifier`
(``"unverified"`` without them). Neither ``monailabel`` nor ``monai-deploy-app-sdk`` is needed for it:

- :mod:`monai_gamverify.apps.integrations.monailabel`: ``check_bundle_for_monailabel`` and ``SuitabilityInferTask``
  (created only when ``monailabel`` imports);
- :mod:`monai_gamverify.apps.integrations.deploy`: ``GamverifyOperator`` (extra ``deploy``).

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
from typing import Any

import numpy as np
import torch

__all__ = ["SuitabilityPipeline", "VERDICTS", "image_stem"]

#: every verdict a result can carry
VERDICTS = ("suitable", "not suitable", "rejected", "unverified")


def image_stem(path: str | os.PathLike) -> str:
    """File name without its (possibly double) extension: ``/a/case_1.nii.gz`` -> ``case_1``."""
    name = Path(path).name
    for ext in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".png", ".jpg", ".jpeg", ".dcm"):
        if name.lower().endswith(ext):
            return name[: -len(ext)] or "image"
    return name.split(".")[0] or "image"


class SuitabilityPipeline:
    """One image in; prediction, Grad-CAM NIfTI on the input's grid, garbage rejection and suitability verdict out.

    Args:
        bundle_root: MONAI bundle directory (``configs/inference.json``, ``configs/metadata.json``, ``models/``).
        config: inference config under ``configs/``.
        overrides: config keys to override (e.g. ``{"network_name": "small_cnn"}``).
        checkpoint: weights file (default ``models/model.pt``; loaded with ``weights_only=True``).
        require_weights: refuse a bundle without weights (``False`` keeps random weights: tests, demos).
        layer: CAM target layer (default: the bundle's ``cam_layer``).
        method: ``gradcam``, ``gradcampp`` or ``scorecam`` (default: the bundle's ``cam_method``, else Grad-CAM).
        reference: reference map (``ReferenceMap.save`` NIfTI or its directory) for the similarity features.
        verifier: fitted ``SuitabilityVerifier`` (``.skops``); needs ``reference``.
        threshold: P(suitable) at or above which the verdict is ``"suitable"``.
        garbage_index: index of the garbage class; ``None`` = the class named ``"garbage"`` if the model has one.
        garbage_threshold: also reject when the garbage probability reaches it (``None``: argmax only).
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
        config: str = "inference.json",
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
        invert: bool = True,
        device: str | torch.device | None = None,
    ) -> None:
        from monai_gamverify.bundle import load_bundle
        from monai_gamverify.transforms.dictionary import make_cam

        if verifier is not None and reference is None:
            raise ValueError("a verifier needs the reference map it was fitted against: pass reference=")
        if not 0.0 <= float(threshold) <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold!r}")
        self.bundle = load_bundle(
            bundle_root,
            config=config,
            checkpoint=checkpoint,
            device=device,
            require_weights=require_weights,
            overrides=dict(overrides or {}),
        )
        parser = self.bundle.parser
        self.root = Path(bundle_root)
        self.layer = layer or self.bundle.target_layer
        if not self.layer:
            raise ValueError(f"bundle {self.root} declares no CAM layer (cam_layer): pass layer=")
        if method is None:
            method = parser.get_parsed_content("cam_method") if "cam_method" in parser else None
            method = method or self.bundle.metadata.get("gamverify", {}).get("cam_method") or "gradcam"
        self.method = str(method)
        self.cam = make_cam(self.bundle.network, self.layer, self.method)
        self.preprocessing = self.bundle.preprocessing()
        if self.preprocessing is None:
            raise ValueError(f"bundle {self.root} ({config}) defines no 'preprocessing'")
        self.class_names = self._class_names()
        self.garbage_index = garbage_index
        if garbage_index is None and "garbage" in self.class_names:
            self.garbage_index = self.class_names.index("garbage")
        self.garbage_threshold = garbage_threshold
        self.threshold = float(threshold)
        self.invert = bool(invert)
        inputs = self.bundle.metadata.get("network_data_format", {}).get("inputs", {})
        shape = next(iter(inputs.values()), {}).get("spatial_shape") if inputs else None
        self.spatial_dims = len(shape) if shape else None
        self.reference = self.verifier = None
        self.metrics: list[str] | None = None
        if reference is not None:
            from monai_gamverify.metrics.similarity import ALL_METRICS, DEFAULT_METRICS
            from monai_gamverify.verification.verifier import ReferenceMap, SuitabilityVerifier

            self.reference = ReferenceMap.load(reference).value.to(self.device)
            self.metrics = list(DEFAULT_METRICS)
            if verifier is not None:
                self.verifier = SuitabilityVerifier.load(verifier)
                used = [str(c) for c in self.verifier.feature_names_in_]
                unknown = [c for c in used if c not in ALL_METRICS]
                if unknown:
                    raise ValueError(f"verifier {verifier} uses feature(s) {unknown} that are not similarity metrics")
                self.metrics += [c for c in used if c not in self.metrics]

    @property
    def device(self) -> torch.device:
        """Device of the network."""
        param = next(self.bundle.network.parameters(), None)
        return param.device if param is not None else torch.device("cpu")

    @property
    def verified(self) -> bool:
        """Whether a verifier is configured (else every verdict is ``"unverified"`` or ``"rejected"``)."""
        return self.verifier is not None

    def _class_names(self) -> list[str]:
        parser = self.bundle.parser
        names = parser.get_parsed_content("class_names") if "class_names" in parser else None
        # the config follows overrides (a K+1 config adds "garbage"); metadata describes the default network only
        return [str(n) for n in names] if names else list(self.bundle.class_names)

    def _names_for(self, n: int) -> list[str]:
        if len(self.class_names) == n:
            return list(self.class_names)
        if len(self.bundle.class_names) == n:
            return list(self.bundle.class_names)
        return [str(i) for i in range(n)]

    def _invert_map(self, cam: torch.Tensor, img: Any) -> Any:
        from monai_gamverify.io.grid import invert_to_input

        return invert_to_input(cam, img, self.preprocessing)

    def run(self, image: str | os.PathLike, out_dir: str | os.PathLike, name: str | None = None) -> dict[str, Any]:
        """Explain, reject and verify one image file; write ``<name>_cam.nii.gz`` in ``out_dir``.

        Args:
            image: image file the bundle's preprocessing can read (NIfTI, NRRD, MHA, ...).
            out_dir: directory for the map (created).
            name: file stem of the outputs (default: the image's stem).

        Returns:
            Dict with ``image``, ``prediction`` (index), ``prediction_name``, ``probabilities`` (name -> p; raw
            ``outputs`` for a single-output model), ``cam`` (path of the NIfTI map), ``cam_layer``, ``cam_method``,
            ``garbage`` (``rejected``, ``garbage_prob``, ``best_real_class``, ``best_real_name``,
            ``best_real_prob``; ``None`` without a garbage class), ``features`` (similarity to the reference map;
            ``None`` without one), ``p_suitable`` (``None`` without a verifier) and ``verdict`` (one of
            :data:`VERDICTS`).
        """
        from monai_gamverify.io import save_nifti
        from monai_gamverify.visualize.cam import normalize_maps

        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"image file not found: {path}")
        stem = name or image_stem(path)
        try:
            img = self.preprocessing({"image": str(path)})["image"]
        except Exception as err:  # transforms wrap errors in long chains: name the file and the first cause
            cause = err.__cause__ or err
            raise ValueError(f"cannot preprocess {path} with the bundle's preprocessing: {cause}") from err
        if self.spatial_dims is not None and img.ndim - 1 != self.spatial_dims:
            raise ValueError(
                f"the bundle's network takes {self.spatial_dims}D inputs but its preprocessing gives "
                f"{img.ndim - 1}D images ({tuple(img.shape)}): slice-aggregating bundles are not supported here"
            )
        x = img.unsqueeze(0).to(self.device, dtype=torch.float32)
        with torch.inference_mode(False), torch.enable_grad():
            result = self.cam.explain(x, normalize=False)  # one forward: logits + raw map of the predicted class
        raw = result.maps.as_tensor() if hasattr(result.maps, "as_tensor") else result.maps
        norm = normalize_maps(raw)
        logits = result.logits.float()[0]
        pred = int(logits.argmax())
        names = self._names_for(int(logits.numel()))
        out: dict[str, Any] = {
            "image": str(path),
            "prediction": pred,
            "prediction_name": names[pred],
        }
        if logits.numel() > 1:
            out["probabilities"] = {n: float(p) for n, p in zip(names, logits.softmax(0).tolist())}
        else:
            out["outputs"] = [float(v) for v in logits.tolist()]
        cam, ref = norm[0].cpu(), img
        if self.invert and getattr(img, "applied_operations", None):
            cam = self._invert_map(cam, img)
            ref = cam
        out["cam"] = str(save_nifti(cam, Path(out_dir) / f"{stem}_cam.nii.gz", reference=ref))
        out["cam_layer"], out["cam_method"] = self.layer, self.method

        out["garbage"] = None
        if self.garbage_index is not None:
            from monai_gamverify.kplus1 import RejectGarbaged

            rej = RejectGarbaged("pred", garbage_index=self.garbage_index, threshold=self.garbage_threshold).reject(
                logits
            )
            best = int(rej["best_real_class"])
            out["garbage"] = {
                "rejected": bool(rej["rejected"]),
                "garbage_prob": float(rej["garbage_prob"]),
                "best_real_class": best,
                "best_real_name": names[best],
                "best_real_prob": float(rej["best_real_prob"]),
            }

        out["features"], out["p_suitable"] = None, None
        if self.reference is not None:
            from monai_gamverify.metrics.similarity import similarity_metrics

            if tuple(norm.shape[2:]) != tuple(self.reference.shape[2:]):
                raise ValueError(
                    f"the map of {path} has shape {tuple(norm.shape[2:])} but the reference map has "
                    f"{tuple(self.reference.shape[2:])}: the reference was made with another preprocessing"
                )
            feats = similarity_metrics(norm.float(), self.reference.float(), metrics=self.metrics)
            out["features"] = {k: float(v[0]) for k, v in feats.items()}
            if self.verifier is not None:
                import pandas as pd

                cols = [str(c) for c in self.verifier.feature_names_in_]
                row = pd.DataFrame([{c: out["features"][c] for c in cols}])
                out["p_suitable"] = float(self.verifier.predict_proba(row)[0, 1])
        if out["garbage"] is not None and out["garbage"]["rejected"]:
            out["verdict"] = "rejected"
        elif out["p_suitable"] is not None:
            out["verdict"] = "suitable" if out["p_suitable"] >= self.threshold else "not suitable"
        else:
            out["verdict"] = "unverified"
        return out

    def run_array(
        self,
        array: Any,
        out_dir: str | os.PathLike,
        affine: Any = None,
        name: str = "image",
    ) -> dict[str, Any]:
        """Like :meth:`run` for an in-memory image (e.g. a MONAI Deploy ``Image``).

        The array is written to a temporary NIfTI with its affine so that the bundle's own preprocessing (which
        starts with ``LoadImaged``) runs unchanged; the map is aligned with that affine.

        Args:
            array: (*spatial) or (1, *spatial) image, array or tensor, in the axis order of ``affine``.
            out_dir: directory for the map.
            affine: 4x4 voxel-to-world affine (RAS, as in NIfTI); ``None``: identity.
            name: file stem of the outputs.

        Returns:
            As :meth:`run` (``image`` is the given ``name``).
        """
        from monai_gamverify.io import save_nifti

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
            src = save_nifti(arr, Path(tmp) / f"{name}.nii.gz", reference=affine, dtype=np.float32)
            result = self.run(src, out_dir, name=name)
        result["image"] = name
        return result

    def label_map(self) -> dict[str, int]:
        """``{class name: index}``, the ``labels`` MONAI Label shows for the task."""
        return {n: i for i, n in enumerate(self.class_names)}

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
        }
