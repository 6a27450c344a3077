"""MONAI Deploy App SDK (4.x): an operator that runs a bundle with CAM, garbage rejection and suitability verification.

``GamverifyOperator`` (input port ``image``: an SDK ``Image``, a NumPy array or a file path) emits ``prediction``
(dict: class, name, probabilities, garbage rejection), ``cam`` (path of the Grad-CAM NIfTI, aligned with the input)
and ``verdict`` (dict: ``verdict``, ``p_suitable``, ``features``), and writes ``<name>_cam.nii.gz`` and
``<name>_gamverify.json`` in its output folder. ``ImageFileLoaderOperator`` reads a NIfTI/NRRD/MHA file into an
``Image`` that keeps the affine (the SDK's ``NiftiDataLoader`` emits a bare array).

The SDK is the optional extra ``deploy`` (``monai-deploy-app-sdk>=4``, ``pydicom``, ``highdicom``: without the last
two ``import monai`` fails once the SDK is installed). The operator classes are built on first access; the logic they
run, :class:`GamverifyRunner` and :func:`image_array_and_affine`, works without the SDK.

Example:
    >>> from monai_gamverify.apps.integrations.deploy import GamverifyOperator, ImageFileLoaderOperator
    >>> class App(Application):
    ...     def compose(self):
    ...         ctx = Application.init_app_context(self.argv)
    ...         load = ImageFileLoaderOperator(self, CountCondition(self, 1), input_path=ctx.input_path, name="load")
    ...         gam = GamverifyOperator(self, bundle_path=ctx.model_path, output_folder=ctx.output_path, name="gam")
    ...         self.add_flow(load, gam, {("image", "image")})
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from monai_gamverify.apps.integrations import SuitabilityPipeline, image_stem

__all__ = ["GamverifyRunner", "image_array_and_affine", "sdk_available"]

_OPERATORS: dict[str, type] = {}


def sdk_available() -> bool:
    """Whether the MONAI Deploy App SDK (``monai.deploy.core``) imports."""
    try:
        import monai.deploy.core  # noqa: F401
    except ImportError:
        return False
    return True


def _name_of(metadata: Mapping[str, Any], default: str = "image") -> str:
    for key in ("filename", "filename_or_obj", "SeriesInstanceUID", "series_instance_uid"):
        value = metadata.get(key)
        if value:
            return image_stem(str(value)) if key.startswith("filename") else str(value)
    return default


def image_array_and_affine(value: Any) -> tuple[np.ndarray, np.ndarray | None, str]:
    """``(array, affine, name)`` from what an SDK pipeline passes around.

    - an SDK ``Image`` (anything with ``asnumpy()`` and ``metadata()``): from ``DICOMSeriesToVolumeOperator``
      (metadata ``row_pixel_spacing``, array in D, H, W order) the axes are swapped to W, H, D and the affine is
      ``nifti_affine_transform``, as ``MonaiBundleInferenceOperator`` does; otherwise the affine is metadata
      ``affine`` (or ``original_affine``), e.g. from :class:`ImageFileLoaderOperator`;
    - a MONAI ``MetaTensor``: its array and affine;
    - a NumPy array or tensor: no affine (identity).

    Args:
        value: the object received on the operator's ``image`` port.

    Returns:
        The image array ((*spatial) or (1, *spatial)), its 4x4 affine or ``None``, and a name for the output files.

    Example:
        >>> arr, affine, name = image_array_and_affine(Image(np.zeros((8, 8, 8)), {"affine": np.eye(4)}))
    """
    import torch

    if hasattr(value, "asnumpy") and hasattr(value, "metadata"):
        meta = dict(value.metadata() or {})
        arr = np.asarray(value.asnumpy())
        if "row_pixel_spacing" in meta and arr.ndim == 3:  # DICOM series volume: (D, H, W) -> (W, H, D)
            arr = np.swapaxes(arr, 0, 2)
            affine = meta.get("nifti_affine_transform")
        else:
            affine = meta.get("affine", meta.get("original_affine"))
        affine = None if affine is None else np.asarray(affine, dtype=np.float64)
        return arr, affine, _name_of(meta)
    if hasattr(value, "affine") and isinstance(value, torch.Tensor):  # MetaTensor
        from monai_gamverify.io import affine_of
        from monai_gamverify.transforms.dictionary import image_name

        name = image_name(value, default="image")
        return value.detach().cpu().numpy(), affine_of(value), image_stem(name)
    if isinstance(value, (np.ndarray, torch.Tensor)):
        arr = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value
        return arr, None, "image"
    raise TypeError(f"expected an Image, a MetaTensor, an array or a file path, got {type(value).__name__}")


class GamverifyRunner:
    """What :class:`GamverifyOperator` does with one input, without the SDK.

    Args:
        bundle_path: bundle directory.
        output_folder: where the map and the JSON go (created).
        kwargs: :class:`~monai_gamverify.apps.integrations.SuitabilityPipeline` arguments (``reference``, ``verifier``,
            ``threshold``, ``overrides``, ``checkpoint``, ``require_weights``, ``garbage_threshold``, ``device`` ...).

    Example:
        >>> prediction, cam_path, verdict = GamverifyRunner("bundles/sos_staging", "out")("case.nii.gz")
    """

    def __init__(self, bundle_path: str | os.PathLike, output_folder: str | os.PathLike, **kwargs: Any) -> None:
        self.bundle_path = Path(bundle_path)
        self.output_folder = Path(output_folder)
        self.kwargs = dict(kwargs)
        self._pipeline: SuitabilityPipeline | None = None

    @property
    def pipeline(self) -> SuitabilityPipeline:
        """The pipeline, built on first use (the bundle is loaded once)."""
        if self._pipeline is None:
            self._pipeline = SuitabilityPipeline(self.bundle_path, **self.kwargs)
        return self._pipeline

    def __call__(self, value: Any) -> tuple[dict[str, Any], Path, dict[str, Any]]:
        """Run on a file path, an SDK ``Image``, a ``MetaTensor`` or an array.

        Returns:
            ``(prediction, cam path, verdict)``; ``<name>_gamverify.json`` with all of it is written beside the map.
        """
        from monai_gamverify.io import write_json

        if isinstance(value, (str, os.PathLike)):
            res = self.pipeline.run(value, self.output_folder)
        else:
            arr, affine, name = image_array_and_affine(value)
            res = self.pipeline.run_array(arr, self.output_folder, affine=affine, name=name)
        prediction = {
            "class_index": res["prediction"],
            "class_name": res["prediction_name"],
            "probabilities": res.get("probabilities"),
            "garbage": res["garbage"],
        }
        if "outputs" in res:  # single-output (regression) models
            prediction["outputs"] = res["outputs"]
        verdict = {
            "verdict": res["verdict"],
            "p_suitable": res["p_suitable"],
            "threshold": self.pipeline.threshold,
            "features": res["features"],
        }
        cam = Path(res["cam"])
        stem = cam.name[: -len("_cam.nii.gz")] if cam.name.endswith("_cam.nii.gz") else image_stem(cam)
        record = {
            "image": res["image"],
            "bundle": str(self.bundle_path),
            "prediction": prediction,
            "cam": str(cam),
            "cam_layer": res["cam_layer"],
            "cam_method": res["cam_method"],
            **verdict,
        }
        write_json(record, self.output_folder / f"{stem}_gamverify.json")
        return prediction, cam, verdict


def _build_operators() -> dict[str, type]:
    try:
        from monai.deploy.core import ConditionType, Fragment, Image, Operator, OperatorSpec
    except ImportError as err:
        raise ImportError(
            "the MONAI Deploy operators need the extra 'deploy': pip install 'monai-gamverify[deploy]' "
            f"(monai-deploy-app-sdk>=4, pydicom, highdicom). ({err})"
        ) from err

    class GamverifyOperator(Operator):
        """Bundle prediction + Grad-CAM NIfTI + garbage rejection + suitability verdict, as an SDK operator.

        Named input:
            image: an ``Image`` (from :class:`ImageFileLoaderOperator` or ``DICOMSeriesToVolumeOperator``), a
                NumPy array or a file path.

        Named outputs (a receiver is optional):
            prediction: dict with ``class_index``, ``class_name``, ``probabilities``, ``garbage``.
            cam: ``Path`` of the map (NIfTI, the input's grid and affine).
            verdict: dict with ``verdict`` (suitable / not suitable / rejected / unverified), ``p_suitable``,
                ``threshold``, ``features``.

        Args:
            fragment: the application.
            bundle_path: bundle directory (e.g. the app context's ``model_path``).
            output_folder: where ``<name>_cam.nii.gz`` and ``<name>_gamverify.json`` go.
            kwargs: :class:`~monai_gamverify.apps.integrations.SuitabilityPipeline` arguments (``reference``,
                ``verifier``, ``threshold``, ``overrides``, ``require_weights``, ``device`` ...) and the usual
                operator keywords (``name``).

        Example:
            >>> gam = GamverifyOperator(app, bundle_path="bundles/sos_staging", output_folder="out", name="gam")
        """

        def __init__(
            self,
            fragment: Fragment,
            *args: Any,
            bundle_path: str | os.PathLike,
            output_folder: str | os.PathLike,
            **kwargs: Any,
        ) -> None:
            op_kwargs = {k: kwargs.pop(k) for k in ("name",) if k in kwargs}
            self.runner = GamverifyRunner(bundle_path, output_folder, **kwargs)
            self.input_name_image = "image"
            self.outputs = ("prediction", "cam", "verdict")
            self.results: list[tuple[dict[str, Any], Path, dict[str, Any]]] = []
            super().__init__(fragment, *args, **op_kwargs)  # the SDK wants the base constructor last

        def setup(self, spec: OperatorSpec) -> None:
            spec.input(self.input_name_image)
            for name in self.outputs:
                spec.output(name).condition(ConditionType.NONE)

        def compute(self, op_input: Any, op_output: Any, context: Any) -> None:
            value = op_input.receive(self.input_name_image)
            if value is None:
                raise ValueError("GamverifyOperator received no image on its 'image' port")
            result = self.runner(value)
            self.results.append(result)
            for name, item in zip(self.outputs, result):
                op_output.emit(item, name)

    class ImageFileLoaderOperator(Operator):
        """Read an image file (NIfTI, NRRD, MHA, ...) into an SDK ``Image`` that keeps the affine.

        Named input:
            image_path: optional file path overriding ``input_path``.

        Named output:
            image: ``Image`` with a (1, *spatial) array and metadata ``affine`` (4x4, RAS) and ``filename``.

        Args:
            fragment: the application.
            input_path: the file, or a folder holding exactly one image file.

        Example:
            >>> load = ImageFileLoaderOperator(app, CountCondition(app, 1), input_path="in.nii.gz", name="load")
        """

        def __init__(self, fragment: Fragment, *args: Any, input_path: str | os.PathLike | None = None, **kwargs):
            self.input_path = Path(input_path) if input_path else None
            super().__init__(fragment, *args, **kwargs)

        def setup(self, spec: OperatorSpec) -> None:
            spec.input("image_path").condition(ConditionType.NONE)
            spec.output("image").condition(ConditionType.NONE)

        @staticmethod
        def resolve(path: Path) -> Path:
            """The image file of ``path`` (a folder must hold exactly one image file)."""
            if path.is_dir():
                from monai_gamverify.data.datalist import list_images

                files = [Path(d["image"]) for d in list_images(path, spatial_dims=None, check="exists")]
                if len(files) != 1:
                    raise ValueError(f"input folder {path} must hold exactly one image file, found {len(files)}")
                return files[0]
            if not path.is_file():
                raise FileNotFoundError(f"input image not found: {path}")
            return path

        def compute(self, op_input: Any, op_output: Any, context: Any) -> None:
            from monai_gamverify.io import affine_of, load_image

            path = op_input.receive("image_path") or self.input_path
            if not path:
                raise ValueError("ImageFileLoaderOperator has no input: set input_path or send image_path")
            file = self.resolve(Path(path))
            img = load_image(file)
            meta = {"affine": affine_of(img), "filename": str(file), "spatial_shape": list(img.shape[1:])}
            op_output.emit(Image(img.numpy(), meta), "image")

    return {"GamverifyOperator": GamverifyOperator, "ImageFileLoaderOperator": ImageFileLoaderOperator}


def __getattr__(name: str) -> Any:
    if name in ("GamverifyOperator", "ImageFileLoaderOperator"):
        if not _OPERATORS:
            _OPERATORS.update(_build_operators())
        return _OPERATORS[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
