"""MONAI Deploy App SDK (4.x): an operator that runs a bundle with CAM, garbage rejection and suitability verification.

``GamverifyOperator`` (input port ``image``: an SDK ``Image``, a NumPy array or a file path) emits ``prediction``
(dict: class, name, probabilities, garbage rejection), ``cam`` (path of the Grad-CAM NIfTI, aligned with the input)
and ``verdict`` (dict: ``verdict``, ``p_suitable``, ``features``), and writes ``<name>_cam.nii.gz`` and
``<name>_gamverify.json`` in its output folder. ``ImageFileLoaderOperator`` reads a NIfTI/NRRD/MHA file into an
``Image`` that keeps the affine (the SDK's ``NiftiDataLoader`` emits a bare array).

DICOM out: with ``dicom_input`` (the example DICOM app's input folder) a judged DICOM volume also gets its answer as
DICOM in ``<output folder>/dicom/`` (Comprehensive SR, Secondary Capture overlay series, SEG for a segmentation
bundle; :mod:`monai_gamverify.io.dicom_out`). :meth:`GamverifyRunner.run_study` does the same for a study given as
pydicom datasets (series selection, checks, one SR saying why when nothing can be judged): the PACS route
(:mod:`~monai_gamverify.apps.integrations.pacs`) and :func:`run_dicom_folder` (the packaged app without the SDK) use it.

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

# long module: the Deploy operators, their SDK-free runner and the app options belong together
from __future__ import annotations

import argparse
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from monai_gamverify.apps.integrations import SuitabilityPipeline, image_stem
from monai_gamverify.io.dicom import series_affine_from_metadata

__all__ = [
    "GamverifyRunner",
    "StudyResult",
    "model_info",
    "read_dicom_folder",
    "write_datasets",
    "image_array_and_affine",
    "sdk_available",
    "resolve_bundle",
    "check_weights",
    "require_selected_series",
    "DEFAULT_SERIES_RULES",
    "DICOM_RECORD_KEYS",
    "parse_app_options",
    "runner_kwargs",
    "run_dicom_folder",
    "folder_main",
]

#: series selection rules for ``DICOMSeriesSelectorOperator``: the first CT series, else the first MR series, that is
#: an original primary acquisition (no localizer, no derived reformat), the one with the most slices first
DEFAULT_SERIES_RULES = json.dumps(
    {
        "selections": [
            {"name": "CT series", "conditions": {"Modality": "(?i)CT", "ImageType": ["PRIMARY", "ORIGINAL"]}},
            {"name": "MR series", "conditions": {"Modality": "(?i)MR", "ImageType": ["PRIMARY", "ORIGINAL"]}},
        ]
    }
)
#: DICOM attributes of the volume copied into ``<name>_gamverify.json`` (no patient identifiers)
DICOM_RECORD_KEYS = (
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "Modality",
    "SeriesDescription",
    "SeriesNumber",
    "selection_name",
    "row_pixel_spacing",
    "col_pixel_spacing",
    "depth_pixel_spacing",
)
_INFER_CONFIGS = ("inference.json", "inference.yaml", "inference.yml")

_OPERATORS: dict[str, type] = {}
logger = logging.getLogger(__name__)


def _is_bundle(path: Path) -> bool:
    return path.is_dir() and any((path / "configs" / c).is_file() for c in _INFER_CONFIGS)


def resolve_bundle(model_path: str | os.PathLike, name: str | None = None) -> Path:
    """The bundle directory in an SDK model path.

    Accepted layouts: the bundle itself (``configs/inference.json``), ``<model_path>/<bundle>`` and the SDK's default
    ``<model_path>/models/<bundle>`` (what ``monai-deploy package`` lays out under ``/opt/holoscan/models``).

    Args:
        model_path: the app context's ``model_path`` (``-m`` / ``HOLOSCAN_MODEL_PATH``).
        name: the bundle's directory name, needed when the model path holds several bundles.

    Returns:
        The bundle directory.

    Raises:
        FileNotFoundError: the path does not exist or holds no bundle.
        ValueError: several bundles and no ``name``.

    Example:
        >>> resolve_bundle("/opt/holoscan/models")  # holds models/sos_staging/configs/inference.json
        PosixPath('/opt/holoscan/models/models/sos_staging')
    """
    root = Path(model_path)
    if not root.exists():
        raise FileNotFoundError(f"model path {root} does not exist")
    if name:
        for cand in (root / name, root / "models" / name):
            if _is_bundle(cand):
                return cand
        raise FileNotFoundError(f"no bundle {name!r} (configs/inference.json) in {root} or {root / 'models'}")
    if _is_bundle(root):
        return root
    found = sorted(
        {c for base in (root, root / "models") if base.is_dir() for c in base.iterdir() if _is_bundle(c)},
        key=str,
    )
    if not found:
        raise FileNotFoundError(
            f"no bundle (configs/inference.json) in {root}, {root}/<bundle> or {root}/models/<bundle>"
        )
    if len(found) > 1:
        names = ", ".join(c.name for c in found)
        raise ValueError(f"{root} holds several bundles ({names}): choose one by name (--bundle-name)")
    return found[0]


def check_weights(
    bundle: str | os.PathLike, checkpoint: str | os.PathLike | None = None, require_weights: bool = True
) -> Path | None:
    """The weights file the pipeline will load, checked before any input is read.

    Args:
        bundle: bundle directory.
        checkpoint: explicit weights file (must exist).
        require_weights: refuse a bundle without ``models/model.pt``.

    Returns:
        The weights file, or ``None`` (random weights allowed and none present).

    Raises:
        FileNotFoundError: naming the missing file and what to do.

    Example:
        >>> check_weights("bundles/sos_staging")
        PosixPath('bundles/sos_staging/models/model.pt')
    """
    if checkpoint is not None:
        path = Path(checkpoint)
        if not path.is_file():
            raise FileNotFoundError(f"weights file {path} not found")
        return path
    path = Path(bundle) / "models" / "model.pt"
    if path.is_file():
        return path
    if require_weights:
        raise FileNotFoundError(
            f"bundle {bundle} has no weights {path.relative_to(bundle).as_posix()} ({path}): train it, give a "
            "checkpoint, or allow random weights (--allow-random-weights / require_weights=False)"
        )
    return None


def _n_instances(series: Any) -> int | None:
    try:
        return len(series.get_sop_instances())
    except Exception:  # a series object without instances: count unknown
        return None


def require_selected_series(selected: Any, studies: Sequence[Any] | None, rules: str | None = None) -> Any:
    """Pass the selector's output on, or say clearly that no series matched and what the study holds.

    ``DICOMSeriesToVolumeOperator`` answers an empty selection with "Missing expected input" (or an IndexError);
    this names the rules and lists every series found (modality, description, instance count, UID).

    Args:
        selected: ``DICOMSeriesSelectorOperator``'s ``study_selected_series_list``.
        studies: ``DICOMDataLoaderOperator``'s ``dicom_study_list``.
        rules: the selection rules (JSON text) for the message.

    Returns:
        ``selected``, unchanged, when it holds at least one series.

    Raises:
        ValueError: no study, or no series matched.

    Example:
        >>> selected = require_selected_series(selected, studies, DEFAULT_SERIES_RULES)
    """
    if selected and any(len(getattr(s, "selected_series", [s]) or []) for s in selected):
        return selected
    if not studies:
        raise ValueError("no DICOM study in the input folder (no readable DICOM file with a study and series)")
    found = []
    for study in studies:
        for series in study.get_all_series():
            n = _n_instances(series)
            count = "?" if n is None else f"{n} instance{'s' if n != 1 else ''}"
            desc = getattr(series, "SeriesDescription", None)
            uid = getattr(series, "SeriesInstanceUID", None) or series.get_series_instance_uid()
            found.append(f"{getattr(series, 'Modality', None) or '?'} {desc!r} ({count}, {uid})")
    what = f"the selection rules {rules}" if rules else "the selector's default rules"
    raise ValueError(
        f"no series matches {what}; the input holds {len(found)} series: "
        + "; ".join(found)
        + ". This app needs a CT or MR image series (an SR-only or SEG-only study has none)."
    )


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
      (metadata ``row_pixel_spacing``, array in D, H, W order) the axes are swapped to W, H, D, as
      ``MonaiBundleInferenceOperator`` does, and the affine is rebuilt from ImageOrientationPatient, PixelSpacing and
      the slice positions (:func:`~monai_gamverify.io.dicom.series_affine_from_metadata`; the SDK's own
      ``nifti_affine_transform`` swaps the in-plane spacings); otherwise the affine is metadata
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
            # not the SDK's nifti_affine_transform: SDK 4.0 swaps the in-plane spacings (wrong for non-square pixels)
            affine = series_affine_from_metadata(meta)
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

    The bundle is resolved (:func:`resolve_bundle`: the bundle itself, ``<path>/<bundle>`` or the SDK's
    ``<path>/models/<bundle>``) and its weights checked (:func:`check_weights`) at construction, before any input.

    Args:
        bundle_path: bundle directory or SDK model path.
        output_folder: where the map and the JSON go (created).
        bundle_name: the bundle's directory name when the model path holds several.
        dicom_input: the DICOM input folder of an SDK app: a judged DICOM volume also gets its DICOM answer (SR,
            Secondary Capture overlay, SEG) in ``<output_folder>/dicom/`` (:meth:`write_dicom_for`).
        kwargs: :class:`~monai_gamverify.apps.integrations.SuitabilityPipeline` arguments (``reference``, ``verifier``,
            ``threshold``, ``overrides``, ``checkpoint``, ``require_weights``, ``garbage_threshold``, ``device`` ...).

    Example:
        >>> prediction, cam_path, verdict = GamverifyRunner("bundles/sos_staging", "out")("case.nii.gz")
    """

    def __init__(
        self,
        bundle_path: str | os.PathLike,
        output_folder: str | os.PathLike,
        *,
        bundle_name: str | None = None,
        dicom_input: str | os.PathLike | None = None,
        **kwargs: Any,
    ) -> None:
        self.bundle_path = resolve_bundle(bundle_path, name=bundle_name)
        self.dicom_input = Path(dicom_input) if dicom_input is not None else None
        self.output_folder = Path(output_folder)
        self.kwargs = dict(kwargs)
        self.weights = check_weights(
            self.bundle_path, self.kwargs.get("checkpoint"), self.kwargs.get("require_weights", True)
        )
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
        dicom: dict[str, Any] = {}
        if isinstance(value, (str, os.PathLike)):
            res = self.pipeline.run(value, self.output_folder)
        else:
            if hasattr(value, "metadata") and callable(value.metadata):
                meta = dict(value.metadata() or {})
                dicom = {k: _jsonable(meta[k]) for k in DICOM_RECORD_KEYS if meta.get(k) is not None}
            arr, affine, name = image_array_and_affine(value)
            res = self.pipeline.run_array(arr, self.output_folder, affine=affine, name=name)
        record = self._record(res, dicom)
        if self.dicom_input is not None and dicom.get("SeriesInstanceUID"):
            self.write_dicom_for(dicom["SeriesInstanceUID"], record)
        return record["prediction"], Path(record["cam"]), {k: record[k] for k in _VERDICT_KEYS}

    def _record(self, res: Mapping[str, Any], dicom: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The JSON record of one pipeline answer, written as ``<name>_gamverify.json`` beside the map."""
        from monai_gamverify.io import write_json

        if res.get("task") == "segmentation":  # label map + Seg-Grad-CAM of the pipeline's label
            prediction = {
                "label_map": res["label_map"],
                "labels": res["labels"],
                "voxels": res["voxels"],
                "explained_label": res["cam_label"],
            }
        else:
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
            "in_distribution": res.get("in_distribution"),
            "p_value": res.get("p_value"),
            "reasons": res.get("reasons"),
            "p_suitable": res["p_suitable"],
            "threshold": self.pipeline.threshold,
            "features": res["features"],
        }
        cam = Path(res["cam"])
        stem = cam.name[: -len("_cam.nii.gz")] if cam.name.endswith("_cam.nii.gz") else image_stem(cam)
        record = {
            "image": res["image"],
            "bundle": str(self.bundle_path),
            "model": self.model,
            "prediction": prediction,
            "cam": str(cam),
            "cam_layer": res["cam_layer"],
            "cam_method": res["cam_method"],
            **verdict,
        }
        if dicom and dicom.get("SeriesInstanceUID"):
            record["dicom"] = dict(dicom)
        write_json(record, self.output_folder / f"{stem}_gamverify.json")
        return record

    @property
    def model(self) -> dict[str, str]:
        """``{"name", "version"}`` of the bundle (its ``metadata.json``)."""
        return model_info(self.bundle_path)

    def protocol(self) -> str:
        """How the verdict is reached, in words (for the SR)."""
        kw = self.kwargs
        parts = [
            f"verifier {Path(kw['verifier']).name}" if kw.get("verifier") else "no verifier (unverified)",
            f"reference {Path(kw['reference']).name}" if kw.get("reference") else "no reference map",
            f"threshold {self.pipeline.threshold:g}",
            f"screen {Path(str(kw['screen'])).name}"
            if isinstance(kw.get("screen"), (str, os.PathLike))
            else ("screen given" if kw.get("screen") is not None else "no in-distribution screen"),
            f"CAM {self.pipeline.method} at {self.pipeline.layer}",
        ]
        return "; ".join(parts)

    def dicom_objects(self, source: Any, record: Mapping[str, Any], maps: Mapping[str, Any] | None = None) -> list[Any]:
        """SR + Secondary Capture overlay (+ SEG for a segmentation bundle) of one judged series, built in memory.

        Args:
            source: the :class:`~monai_gamverify.io.dicom_out.SourceVolume` the record was computed on.
            record: :meth:`_record`'s answer.
            maps: the pipeline's maps in memory (``run_array(..., keep_maps=True)["maps"]``); ``None`` reads the
                record's NIfTI files.

        Raises:
            ValueError: a map is not on the series' grid (nothing is returned then).
        """
        from monai_gamverify.io import affine_of
        from monai_gamverify.io.dicom_out import overlay_sc, report_sr, segmentation_seg, to_source_frames

        def on_source(key: str, path: str, dtype: Any) -> np.ndarray:
            if maps is not None and key in maps:
                arr, ref = maps[key]
                arr = arr.detach().cpu().numpy() if hasattr(arr, "detach") else np.asarray(arr)
                return to_source_frames(arr.astype(dtype, copy=False), affine_of(ref), source)
            import nibabel as nib

            img = nib.load(path)
            return to_source_frames(np.asarray(img.dataobj, dtype=dtype), img.affine, source)

        cam = on_source("cam", record["cam"], np.float32)  # float32: the values the NIfTI holds
        objects = [report_sr(source.datasets, record, self.model, protocol=self.protocol())]
        objects += overlay_sc(source, cam, description=f"gamverify attention {record['cam_method']}")
        pred = record["prediction"]
        if "label_map" in pred:
            labels = on_source("label_map", pred["label_map"], np.uint8)
            objects.append(segmentation_seg(source, labels, pred["labels"], self.model))
        return objects

    def run_study(self, datasets: Sequence[Any]) -> StudyResult:
        """Judge a study given as pydicom datasets and build its DICOM answer; never raises for bad input.

        The best image series (:func:`~monai_gamverify.io.dicom_out.select_series`) that reads as one volume is
        judged (a series that does not is logged, named in the SR, and the next one tried); the answer is the SR,
        the overlay series and (segmentation) the SEG. A study with no usable series, or a failure while judging or
        writing, gives one SR saying so (``status`` ``"not judged"``) and nothing else: never a partial answer.

        Args:
            datasets: the study's instances (with pixel data).

        Returns:
            :class:`StudyResult`.
        """
        from monai_gamverify.io.dicom_out import (
            SeriesError,
            failure_sr,
            group_series,
            select_series,
            source_volume,
        )

        datasets = list(datasets)
        t0 = time.perf_counter()
        study = str(getattr(datasets[0], "StudyInstanceUID", "")) if datasets else ""
        skipped: list[str] = []
        try:
            series = group_series(datasets)
            source = None
            for uid in select_series(series):
                try:
                    source = source_volume(series[uid])
                    break
                except SeriesError as err:
                    logger.warning("study %s: %s", study, err)
                    skipped.append(str(err))
            if source is None:
                raise SeriesError("no usable image series: " + " | ".join(skipped))
            t1 = time.perf_counter()
            res = self.pipeline.run_array(
                source.array, self.output_folder, affine=source.affine, name=source.series_uid, keep_maps=True
            )
            maps = res.pop("maps", None)
            record = self._record(res, {"StudyInstanceUID": study, "SeriesInstanceUID": source.series_uid,
                                        "Modality": str(getattr(source.datasets[0], "Modality", ""))})  # fmt: skip
            t2 = time.perf_counter()
            if skipped:
                record["reasons"] = [*(record.get("reasons") or []), *(f"skipped: {s}" for s in skipped)]
            objects = self.dicom_objects(source, record, maps)
            del maps
            t3 = time.perf_counter()
        except Exception as err:  # bad input or a failure while judging: one SR that says so, nothing partial
            reason = str(err) if isinstance(err, SeriesError) else f"{type(err).__name__}: {err}"
            logger.error("study %s not judged: %s", study, reason)
            objects = []
            if datasets:
                try:
                    objects = [failure_sr(datasets, reason, self.model)]
                except Exception as sr_err:  # a header too broken to link an SR to: the log line must do
                    logger.error("study %s: no SR written either: %s: %s", study, type(sr_err).__name__, sr_err)
            return StudyResult(study, "not judged", reason, None, objects, {"total": time.perf_counter() - t0})
        times = {"volume": t1 - t0, "model": t2 - t1, "dicom_build": t3 - t2}
        return StudyResult(study, "judged", None, record, objects, times)

    def write_dicom_for(self, series_uid: str, record: Mapping[str, Any]) -> list[Path]:
        """SDK route: read the judged series from :attr:`dicom_input` and write its DICOM answer to
        ``<output_folder>/dicom/``; an error is logged and leaves no file."""
        from monai_gamverify.io.dicom_out import source_volume

        datasets = [
            ds for ds in read_dicom_folder(self.dicom_input) if getattr(ds, "SeriesInstanceUID", None) == series_uid
        ]
        try:
            objects = self.dicom_objects(source_volume(datasets), record)
        except Exception as err:
            logger.error("series %s: no DICOM answer written: %s", series_uid, err)
            return []
        return write_datasets(objects, self.output_folder / "dicom")


@dataclass
class StudyResult:
    """What :meth:`GamverifyRunner.run_study` made of a study.

    Attributes:
        study_uid: StudyInstanceUID.
        status: ``"judged"`` or ``"not judged"``.
        reason: why not judged (naming the series), else ``None``.
        record: the JSON record of the judged series, else ``None``.
        objects: the DICOM answer (SR, overlay instances, SEG; or the one failure SR).
        times: seconds per step (``volume``, ``model``, ``dicom_build``).
    """

    study_uid: str
    status: str
    reason: str | None
    record: dict[str, Any] | None
    objects: list[Any] = field(default_factory=list)
    times: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """A JSON-ready summary (SOP classes and counts of the answer)."""
        classes: dict[str, int] = {}
        for ds in self.objects:
            name = getattr(ds.SOPClassUID, "name", str(ds.SOPClassUID))
            classes[name] = classes.get(name, 0) + 1
        out = {"study": self.study_uid, "status": self.status, "objects": classes, "times": self.times}
        if self.reason:
            out["reason"] = self.reason
        if self.record:
            out.update({k: self.record.get(k) for k in ("verdict", "p_suitable", "in_distribution", "p_value")})
            out["series"] = (self.record.get("dicom") or {}).get("SeriesInstanceUID")
        return out


def model_info(bundle: str | os.PathLike) -> dict[str, str]:
    """``{"name", "version"}`` from a bundle's ``configs/metadata.json`` (``"unknown"`` where absent)."""
    from monai_gamverify.bundle import read_metadata

    try:
        meta, _ = read_metadata(bundle)
    except (FileNotFoundError, ValueError):
        meta = {}
    return {"name": str(meta.get("name") or Path(bundle).name), "version": str(meta.get("version") or "unknown")}


def read_dicom_folder(folder: str | os.PathLike) -> list[Any]:
    """Every DICOM file under ``folder`` (recursively) read with pydicom; unreadable files are logged and skipped."""
    import pydicom

    from monai_gamverify.io.dicom import is_dicom_file

    out = []
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file() and is_dicom_file(path):
            try:
                out.append(pydicom.dcmread(str(path)))
            except Exception as err:
                logger.warning("skipping %s: not readable as DICOM (%s)", path, err)
    return out


def write_datasets(datasets: Sequence[Any], folder: str | os.PathLike) -> list[Path]:
    """Write datasets as ``<Modality>_<SeriesNumber>_<InstanceNumber>.dcm`` files (a folder per series)."""
    out = []
    for ds in datasets:
        path = Path(folder) / str(ds.SeriesInstanceUID) / f"{ds.Modality}_{int(ds.InstanceNumber):04d}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(str(path), enforce_file_format=True)
        out.append(path)
    return out


_VERDICT_KEYS = ("verdict", "in_distribution", "p_value", "reasons", "p_suitable", "threshold", "features")


def parse_app_options(argv: Sequence[str], *, dicom: bool = False) -> tuple[argparse.Namespace, list[str]]:
    """The example apps' own options; the rest (the SDK's ``-i``, ``-o``, ``-m``, ``-l``) is returned untouched.

    Args:
        argv: command-line arguments without the program name.
        dicom: also accept ``--rules`` (series selection rules: JSON text or a file).

    Returns:
        ``(options, remaining arguments)``.

    Raises:
        ValueError: ``--overrides`` or ``--rules`` is not valid JSON (naming the option).

    Example:
        >>> opts, rest = parse_app_options(["-i", "in", "--threshold", "0.7"])
        >>> opts.threshold, rest
        (0.7, ['-i', 'in'])
    """
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--reference", default=None, help="reference map (.nii.gz) of the verifier")
    parser.add_argument("--verifier", default=None, help="fitted SuitabilityVerifier (.skops)")
    parser.add_argument("--threshold", type=float, default=0.5, help="P(suitable) threshold")
    parser.add_argument("--garbage-threshold", type=float, default=None, help="reject when p(garbage) >= this")
    parser.add_argument("--screen", default=None, help="saved in-distribution screen (gamverify screen fit)")
    parser.add_argument("--label", default=None, help="segmentation bundles: the label to explain (name or channel)")
    parser.add_argument("--overrides", default=None, help="bundle config overrides as JSON")
    parser.add_argument("--bundle-name", default=None, help="the bundle's folder when the model path holds several")
    parser.add_argument("--allow-random-weights", action="store_true", help="run a bundle without models/model.pt")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: CUDA when available)")
    if dicom:
        parser.add_argument("--rules", default=None, help="series selection rules: JSON text or a .json file")
        parser.add_argument(
            "--no-dicom-out", dest="dicom_out", action="store_false", help="write no DICOM SR / overlay / SEG"
        )
    opts, rest = parser.parse_known_args(list(argv))
    try:
        opts.overrides = json.loads(opts.overrides) if opts.overrides else None
    except json.JSONDecodeError as err:
        raise ValueError(f"--overrides is not valid JSON: {err}") from err
    if opts.overrides is not None and not isinstance(opts.overrides, dict):
        raise ValueError(f"--overrides must be a JSON object, got {type(opts.overrides).__name__}")
    if dicom:
        text = opts.rules or DEFAULT_SERIES_RULES
        if opts.rules and not text.lstrip().startswith("{"):
            text = Path(opts.rules).read_text()
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"--rules is not valid JSON: {err}") from err
        if not isinstance(parsed, dict) or not parsed.get("selections"):
            raise ValueError('--rules must be a JSON object with a non-empty "selections" list')
        opts.rules = text
    return opts, rest


def runner_kwargs(opts: argparse.Namespace) -> dict[str, Any]:
    """:class:`GamverifyRunner` keyword arguments from :func:`parse_app_options` options.

    Example:
        >>> GamverifyOperator(app, bundle_path=ctx.model_path, output_folder=ctx.output_path, **runner_kwargs(opts))
    """
    return {
        "bundle_name": opts.bundle_name,
        "reference": opts.reference,
        "verifier": opts.verifier,
        "threshold": opts.threshold,
        "garbage_threshold": opts.garbage_threshold,
        "overrides": opts.overrides,
        "require_weights": not opts.allow_random_weights,
        "device": opts.device,
        **({"screen": opts.screen} if opts.screen else {}),
        **({"label": opts.label} if opts.label is not None else {}),
    }


def run_dicom_folder(
    input_folder: str | os.PathLike,
    output_folder: str | os.PathLike,
    model_path: str | os.PathLike,
    **kwargs: Any,
) -> dict[str, Any]:
    """The DICOM app without the SDK: judge the study in a folder, write its DICOM answer under
    ``<output_folder>/dicom/<SeriesInstanceUID>/`` beside the NIfTI map and JSON record.

    What :class:`GamverifyRunner.run_study` does for the PACS route, on files: the best usable image series is
    judged (SR + Secondary Capture overlay + SEG for a segmentation bundle), or one SR says why none could be.

    Args:
        input_folder: DICOM files (searched recursively; one study).
        output_folder: where the results go.
        model_path: bundle or SDK model path.
        kwargs: :class:`GamverifyRunner` arguments.

    Returns:
        :meth:`StudyResult.summary` plus ``files`` (the DICOM files written).

    Raises:
        ValueError: the folder holds no DICOM file, or several studies.
    """
    datasets = read_dicom_folder(input_folder)
    if not datasets:
        raise ValueError(f"no DICOM file in {input_folder}")
    studies = sorted({str(getattr(ds, "StudyInstanceUID", "")) for ds in datasets})
    if len(studies) > 1:
        raise ValueError(f"{input_folder} holds {len(studies)} studies {studies}: give one study per run")
    result = GamverifyRunner(model_path, output_folder, **kwargs).run_study(datasets)
    files = write_datasets(result.objects, Path(output_folder) / "dicom")
    return {**result.summary(), "files": [str(f) for f in files]}


def folder_main(argv: Sequence[str] | None = None) -> int:
    """``python examples/deploy_dicom_app -i STUDY -o OUT -m MODEL [app options]`` without the SDK: one JSON summary on
    stdout (:func:`run_dicom_folder`); exit status 0 when the study was judged, 2 when an SR says why not."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    opts, rest = parse_app_options(argv, dicom=True)
    parser = argparse.ArgumentParser(description="DICOM study folder -> SR + overlay (+ SEG), without the SDK")
    parser.add_argument("-i", "--input", default=os.environ.get("HOLOSCAN_INPUT_PATH"), help="DICOM study folder")
    parser.add_argument("-o", "--output", default=os.environ.get("HOLOSCAN_OUTPUT_PATH"), help="output folder")
    parser.add_argument("-m", "--model", default=os.environ.get("HOLOSCAN_MODEL_PATH"), help="bundle or model path")
    args = parser.parse_args(rest)
    for name in ("input", "output", "model"):
        if not getattr(args, name):
            parser.error(f"--{name} is required (or its HOLOSCAN_*_PATH variable)")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    summary = run_dicom_folder(args.input, args.output, args.model, **runner_kwargs(opts))
    print(json.dumps(summary))
    return 0 if summary["status"] == "judged" else 2


def _jsonable(value: Any) -> Any:
    if isinstance(value, (str, bool, type(None))):
        return value
    if isinstance(value, (int, float, np.integer, np.floating)):
        return float(value) if isinstance(value, (float, np.floating)) else int(value)
    return str(value)


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
            self.runner = GamverifyRunner(bundle_path, output_folder, **kwargs)  # resolves, checks the weights
            _ = self.runner.pipeline  # the network is built now: a bad bundle fails before any study is loaded
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

    class SeriesCheckOperator(Operator):
        """Between ``DICOMSeriesSelectorOperator`` and ``DICOMSeriesToVolumeOperator``: a clear error when no series
        matched (the SDK's own answer is "Missing expected input"), naming the rules and the series found.

        Named inputs:
            dicom_study_list: the loader's studies.
            study_selected_series_list: the selector's output.

        Named output:
            study_selected_series_list: the same list, when it holds a series.

        Args:
            fragment: the application.
            rules: the selector's rules (JSON text), for the message.

        Example:
            >>> check = SeriesCheckOperator(app, rules=DEFAULT_SERIES_RULES, name="series_check")
            >>> app.add_flow(loader, check, {("dicom_study_list", "dicom_study_list")})
            >>> app.add_flow(selector, check, {("study_selected_series_list", "study_selected_series_list")})
        """

        def __init__(self, fragment: Fragment, *args: Any, rules: str | None = None, **kwargs: Any) -> None:
            self.rules = rules
            super().__init__(fragment, *args, **kwargs)

        def setup(self, spec: OperatorSpec) -> None:
            spec.input("dicom_study_list")
            spec.input("study_selected_series_list")
            spec.output("study_selected_series_list").condition(ConditionType.NONE)

        def compute(self, op_input: Any, op_output: Any, context: Any) -> None:
            studies = op_input.receive("dicom_study_list")
            selected = op_input.receive("study_selected_series_list")
            op_output.emit(require_selected_series(selected, studies, self.rules), "study_selected_series_list")

    return {
        "GamverifyOperator": GamverifyOperator,
        "ImageFileLoaderOperator": ImageFileLoaderOperator,
        "SeriesCheckOperator": SeriesCheckOperator,
    }


def __getattr__(name: str) -> Any:
    if name in ("GamverifyOperator", "ImageFileLoaderOperator", "SeriesCheckOperator"):
        if not _OPERATORS:
            _OPERATORS.update(_build_operators())
        return _OPERATORS[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
