"""The MONAI Label infer logic without MONAI Label: :class:`SuitabilityInfer` turns one request into ``(result file,
result json)`` -- for a classification bundle the CAM NIfTI (aligned with the input) and label, probabilities, garbage
rejection, screen and suitability verdict; for a segmentation bundle the label map (or the Seg-Grad-CAM) and the
labels' voxel counts, screen and verdict. ``monailabel.SuitabilityInferTask`` wraps it as a MONAI Label task.

Example:
    >>> task = SuitabilityInfer("bundles/sos_staging", reference="ref.nii.gz", verifier="verifier.skops")
    >>> cam_file, result = task({"image": "case.nii.gz"})
    >>> result["label"], result["suitability"]["verdict"]
    ('stage3', 'suitable')
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

from monai_gamverify.apps.integrations import SuitabilityPipeline
from monai_gamverify.io import save_map, save_nifti
from monai_gamverify.utils import plain_tensor

__all__ = ["SuitabilityInfer"]


class SuitabilityInfer:
    """MONAI Label infer logic: label, probabilities, CAM NIfTI and suitability verdict for one request.

    Args:
        bundle_root: bundle directory.
        reference: reference map for the similarity features (``None``: no features).
        verifier: fitted ``SuitabilityVerifier`` (``None``: verdict ``"unverified"``).
        output_dir: where result files go (default: a new temporary directory; MONAI Label moves or deletes the
            result file after answering).
        description: text shown by MONAI Label (default: the bundle's ``description``).
        kwargs: further :class:`~monai_gamverify.apps.integrations.SuitabilityPipeline` arguments (``overrides``,
            ``checkpoint``, ``layer``, ``method``, ``threshold``, ``garbage_threshold``, ``device`` ...).

    Example:
        >>> infer = SuitabilityInfer("bundles/sos_staging")
        >>> cam_file, result = infer({"image": "case.nii.gz"})
        >>> result["label"], result["probabilities"]["stage3"], result["suitability"]["verdict"]
    """

    def __init__(
        self,
        bundle_root: str | os.PathLike,
        *,
        reference: str | os.PathLike | None = None,
        verifier: str | os.PathLike | None = None,
        output_dir: str | os.PathLike | None = None,
        description: str | None = None,
        label: int | str | None = None,
        **kwargs: Any,
    ) -> None:
        self.pipeline = SuitabilityPipeline(bundle_root, reference=reference, verifier=verifier, label=label, **kwargs)
        self.output_dir = Path(output_dir) if output_dir is not None else None
        meta = self.pipeline.bundle.metadata
        self.description = description or str(meta.get("description") or meta.get("name") or "gamverify bundle")
        self.labels = self.pipeline.label_map()
        self.dimension = self.pipeline.spatial_dims or 3
        self.version = meta.get("version")
        self.task = self.pipeline.task
        self.label = self.pipeline.label

    def __call__(self, request: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
        """Run one request.

        Args:
            request: MONAI Label request; ``image`` is the image file path (the datastore's path); an optional
                ``result_name`` sets the file stem of the map.

        Returns:
            ``(cam NIfTI path, result json)``. The file is MONAI Label's result file: the server sends it (the body
            of ``output=image``, the ``image`` part of the ``output=all`` multipart answer) and deletes it. Without
            ``output_dir`` it is a single temporary file (no folder is left behind). The json has ``label`` (class
            name), ``label_index``, ``probabilities``, ``cam`` (``in_response``, ``shape``, ``layer``, ``method``,
            and ``path`` only when ``output_dir`` was given: the server's temporary file is gone once answered),
            ``garbage`` (``None`` without a garbage class), ``screen`` (``in_distribution``, ``p_value``, ``reasons``;
            ``None`` values without a screen), ``suitability`` (``verdict``, ``p_suitable``,
            ``features``, ``threshold``) and ``latencies`` (seconds).

        Raises:
            TypeError: ``request`` is not a dict.
            ValueError: no image path, an image that is not a file, or one the bundle cannot read or take (e.g. 2D
                for a 3D network); the message names the problem.
        """
        image = self._image(request)
        if self.task == "segmentation":
            return self._segment(request, image, explain=True)
        start = time.perf_counter()
        try:
            if self.output_dir is not None:
                res = self.pipeline.run(image, self.output_dir, name=request.get("result_name"))
                cam_file = res["cam"]
                shape = list(nib.load(cam_file).shape)
            else:  # one temporary file, written in place (no folder, no sync): the server removes it after answering
                engine = self.pipeline.engine
                raw, x = engine.load(image)
                found = engine.explain(x, raw, source=str(image))
                # the map goes back on the input grid and is compressed (zlib releases the GIL) while the
                # similarity features and the forest run here
                writing = self._writer().submit(_write_answer_map, engine, found)
                errors = engine.verify([found])
                cam_file, shape = writing.result()
                if errors[0] is not None:
                    os.unlink(cam_file)
                    raise errors[0]
                res = self.pipeline.result_dict(found, cam_file)
        except FileNotFoundError as err:
            raise ValueError(str(err)) from err
        result = {
            "label": res["prediction_name"],
            "label_index": res["prediction"],
            "probabilities": res.get("probabilities"),
            "outputs": res.get("outputs"),
            "cam": {
                "in_response": True,
                "path": cam_file if self.output_dir is not None else None,
                "shape": shape,
                "layer": res["cam_layer"],
                "method": res["cam_method"],
            },
            "cam_layer": res["cam_layer"],
            "cam_method": res["cam_method"],
            "garbage": res["garbage"],
            "screen": {
                "in_distribution": res.get("in_distribution"),
                "p_value": res.get("p_value"),
                "reasons": res.get("reasons"),
            },
            "suitability": {
                "verdict": res["verdict"],
                "p_suitable": res["p_suitable"],
                "features": res["features"],
                "threshold": self.pipeline.threshold,
            },
            "latencies": {"total": round(time.perf_counter() - start, 3)},
        }
        return cam_file, {k: v for k, v in result.items() if not (k == "outputs" and v is None)}

    def _segment(self, request: Mapping[str, Any], image: str | os.PathLike, explain: bool) -> tuple[str, dict]:
        """A segmentation bundle's answer (:meth:`SuitabilityPipeline.segment`): the label map on the input grid as
        the result file (what MONAI Label clients display), or with the request param ``result="cam"`` the
        Seg-Grad-CAM of the request's ``label`` (default: the app's); the json has the labels, their voxel counts,
        the explained label, the screen's answer and the verdict."""
        start = time.perf_counter()
        want = str(request.get("result", "label")).lower()
        if want not in ("label", "cam"):
            raise ValueError(f"request param result must be 'label' or 'cam', got {request.get('result')!r}")
        if want == "cam" and not explain:
            raise ValueError("the label-only route returns no CAM: use the full route")
        try:
            seg = self.pipeline.segment(image, label=request.get("label"), explain=explain)
        except FileNotFoundError as err:
            raise ValueError(str(err)) from err
        result: dict[str, Any] = {k: seg[k] for k in ("task", "labels", "voxels")}
        result["result"] = want

        def write(path: str) -> None:
            if want == "label":
                save_nifti(seg["label_map"].to(torch.uint8), path, reference=seg["reference"], dtype=np.uint8)
            else:
                save_map(seg["cam_map"][0], path, reference=seg["cam_map"][1], durable=False)

        out_file = _answer_file(want, write)
        if explain:
            result["cam"] = {
                "in_response": want == "cam",
                "label": seg["cam_label"],
                "label_index": seg["cam_label_index"],
                "shape": [int(v) for v in seg["cam_map"][0].shape[1:]],
                "layer": seg["cam_layer"],
                "method": seg["cam_method"],
            }
            result["screen"] = {k: seg[k] for k in ("in_distribution", "p_value", "reasons")}
            result["suitability"] = {
                "verdict": seg["verdict"],
                "p_suitable": seg["p_suitable"],
                "features": seg["features"],
                "threshold": self.pipeline.threshold,
            }
        result["latencies"] = {"total": round(time.perf_counter() - start, 3)}
        return out_file, result

    def _writer(self) -> ThreadPoolExecutor:
        if getattr(self, "_pool", None) is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="gamverify-map")
        return self._pool

    @staticmethod
    def _image(request: Mapping[str, Any]) -> str | os.PathLike:
        if not isinstance(request, Mapping):
            raise TypeError(f"request must be a dict, got {type(request).__name__}")
        image = request.get("image")
        if not isinstance(image, (str, os.PathLike)) or not str(image):
            raise ValueError(f"request['image'] must be an image file path, got {image!r}")
        if not Path(image).is_file():
            raise ValueError(f"image {str(image)!r} not found: not a datastore image id nor an existing file")
        return image

    def predict(self, request: Mapping[str, Any]) -> tuple[None, dict[str, Any]]:
        """The plain prediction: the bundle's preprocessing and one forward pass, no map, no verdict.

        The baseline the full request is timed against, and a cheap label-only route.

        Args:
            request: as :meth:`__call__`.

        Returns:
            ``(None, json)`` with ``label``, ``label_index``, ``probabilities`` and ``latencies``.

        Example:
            >>> _, result = infer.predict({"image": "case.nii.gz"})
        """
        image = self._image(request)
        if self.task == "segmentation":  # the label map alone: the bundle's inferer, no CAM
            return self._segment(request, image, explain=False)
        start = time.perf_counter()
        engine = self.pipeline.engine
        _, img = engine.load(image)  # the engine's reading, preprocessing and geometry checks
        x = img.unsqueeze(0).to(engine.device)
        with torch.inference_mode():
            out = engine.network(plain_tensor(x))
        logits = out.float()[0]
        names = engine.names_for(int(logits.numel()))
        pred = int(logits.argmax())
        result: dict[str, Any] = {"label": names[pred], "label_index": pred}
        if logits.numel() > 1:
            result["probabilities"] = {n: float(p) for n, p in zip(names, logits.softmax(0).tolist())}
        else:
            result["outputs"] = [float(v) for v in logits.tolist()]
        result["latencies"] = {"total": round(time.perf_counter() - start, 3)}
        return None, result

    def info(self) -> dict[str, Any]:
        """What MONAI Label shows for the task."""
        return {
            "type": self.task,
            "labels": self.labels,
            "dimension": self.dimension,
            "description": self.description,
            "version": self.version,
            "config": self.pipeline.describe(),
        }


# ----------------------------------------------------------------------------------------------------------------------
# the MONAI Label subclass, built only when monailabel imports
# ----------------------------------------------------------------------------------------------------------------------


def _answer_file(kind: str, write: Any) -> str:
    """A new temporary ``gamverify_*_<kind>.nii.gz`` written by ``write(path)`` (no folder, no sync: MONAI Label
    removes the answer file once sent); removed again if the write fails."""
    fd, path = tempfile.mkstemp(prefix="gamverify_", suffix=f"_{kind}.nii.gz")
    os.close(fd)
    try:
        write(path)
    except BaseException:
        os.unlink(path)
        raise
    return path


def _write_answer_map(engine: Any, found: Any) -> tuple[str, list[int]]:
    """The map of an engine result on the input grid in a new temporary ``.nii.gz`` (path, spatial shape)."""
    cam, ref = engine.on_input_grid(found)
    path = _answer_file("cam", lambda f: save_map(cam, f, reference=ref, durable=False))
    return path, [int(v) for v in cam.shape[1:]]
