"""DICOM in and out for a PACS round trip: one image series checked and turned into a volume, and the answer written
back as DICOM objects every viewer takes.

- :func:`group_series`, :func:`select_series`, :func:`source_volume`: pydicom datasets of a study -> the series to
  judge -> a ``(column, row, slice)`` volume with its RAS affine (the axis order of MONAI's ``ITKReader`` and
  :func:`~monai_gamverify.io.dicom.dicom_affine`). A series that cannot be used raises :class:`SeriesError` naming it
  and the reason (no pixel data, a transfer syntax that cannot be decoded here, mixed orientations or sizes, missing
  slices, multi-frame images).
- :func:`report_sr`: a **Comprehensive SR** (highdicom ``ComprehensiveSR``) with the model (bundle name and version
  from ``metadata.json``), the prediction, the in-distribution answer (``in_distribution``, p-value, reasons), the
  suitability verdict with its protocol, and references to the source Study/Series/SOP Instance UIDs (an IMAGE item
  per source instance, and the evidence sequence); :func:`failure_sr` says in the same form why a study or series was
  not judged.
- :func:`overlay_sc`: the attention map blended over the source slices as a **Secondary Capture** RGB series, one
  instance per source slice, on the source's frame of reference (``FrameOfReferenceUID``, ``ImagePositionPatient``,
  ``ImageOrientationPatient``, ``PixelSpacing`` of the slice it covers; ``SourceImageSequence`` names it).
- :func:`segmentation_seg`: a label map as a **DICOM SEG** (highdicom ``Segmentation``, BINARY, one segment per
  label), its geometry taken from the source instances (non-square pixels and oblique series included).

Every object gets new UIDs. Patient and study attributes are limited to what the IODs require to file the result
with its study (the Patient module's Type 2 PatientName, PatientID, PatientBirthDate, PatientSex and the General
Study module's StudyInstanceUID, StudyDate, StudyTime, StudyID, AccessionNumber, ReferringPhysicianName), copied
from the source; nothing else of the source header is carried over (:data:`LINK_KEYWORDS`).

highdicom (extra ``dicom``) is imported on first use.
"""
# long module: the series checks and the three DICOM writers (SR, Secondary Capture, SEG) share one UID policy

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from monai_gamverify.io.dicom import dicom_affine

__all__ = [
    "LINK_KEYWORDS",
    "IMAGE_MODALITIES",
    "SeriesError",
    "SourceVolume",
    "describe_series",
    "group_series",
    "select_series",
    "source_volume",
    "to_source_frames",
    "report_sr",
    "failure_sr",
    "overlay_sc",
    "segmentation_seg",
    "read_sr_values",
]

logger = logging.getLogger(__name__)

#: patient and study attributes copied from the source into every result (what the IODs require to link it)
LINK_KEYWORDS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
)
#: modalities whose series are images a model can read (in the order :func:`select_series` prefers them)
IMAGE_MODALITIES = ("CT", "MR", "PT", "NM", "US", "CR", "DX", "MG", "XA", "RF", "OT")
_NON_IMAGE = {"SR", "SEG", "PR", "KO", "RTSTRUCT", "RTPLAN", "RTDOSE", "REG", "DOC"}
_SCHEME = "99GAMV"  # local coding scheme (DICOM PS3.16: designators beginning with "99" are private)
_MANUFACTURER = "monai-gamverify"
_SERIES_NUMBERS = {"sr": 9901, "sc": 9902, "seg": 9903}


class SeriesError(ValueError):
    """A series (or study) that cannot be judged; the message names it and says why.

    Attributes:
        series_uid: the SeriesInstanceUID (``None`` for a study-level problem).
    """

    def __init__(self, message: str, series_uid: str | None = None) -> None:
        super().__init__(message)
        self.series_uid = series_uid


@dataclass
class SourceVolume:
    """A series read as one volume.

    Attributes:
        array: ``(column, row, slice)`` float32 voxels (rescale slope/intercept applied), slices along the normal.
        affine: 4x4 RAS affine of ``array`` (:func:`~monai_gamverify.io.dicom.dicom_affine`).
        datasets: the source instances in slice order (``array[..., k]`` is ``datasets[k]``).
        series_uid: SeriesInstanceUID.
        window: (low, high) stored-value window of the overlay's gray (WindowCenter/Width, else percentiles).
    """

    array: np.ndarray
    affine: np.ndarray
    datasets: list[Any]
    series_uid: str
    window: tuple[float, float] = field(default=(0.0, 1.0))


def _uid(ds: Any, key: str) -> str:
    return str(getattr(ds, key, "") or "")


def group_series(datasets: Sequence[Any]) -> dict[str, list[Any]]:
    """Instances grouped by SeriesInstanceUID (in the order first seen)."""
    out: dict[str, list[Any]] = {}
    for ds in datasets:
        out.setdefault(_uid(ds, "SeriesInstanceUID") or "?", []).append(ds)
    return out


def describe_series(datasets: Sequence[Any]) -> str:
    """``CT 'desc' (12 instances, <SeriesInstanceUID>)`` for messages."""
    first = datasets[0]
    n = len(datasets)
    desc = str(getattr(first, "SeriesDescription", "") or "")
    count = f"{n} instance{'s' if n != 1 else ''}"
    return f"{getattr(first, 'Modality', '?') or '?'} {desc!r} ({count}, {_uid(first, 'SeriesInstanceUID')})"


def _is_image_series(datasets: Sequence[Any]) -> bool:
    modality = str(getattr(datasets[0], "Modality", "") or "").upper()
    return modality not in _NON_IMAGE and any("PixelData" in ds for ds in datasets)


def select_series(series: Mapping[str, Sequence[Any]]) -> list[str]:
    """The image series of a study, best first: by :data:`IMAGE_MODALITIES` order, ORIGINAL\\PRIMARY before
    derived ones, then the most instances.

    Raises:
        SeriesError: the study holds no image series (the message lists what it holds).
    """
    images = [uid for uid, items in series.items() if items and _is_image_series(items)]
    if not images:
        found = "; ".join(describe_series(items) for items in series.values() if items) or "nothing"
        raise SeriesError(f"no image series in the study: it holds {found}. This app needs a CT or MR image series.")

    def rank(uid: str) -> tuple[int, int, int]:
        first = series[uid][0]
        modality = str(getattr(first, "Modality", "") or "").upper()
        order = IMAGE_MODALITIES.index(modality) if modality in IMAGE_MODALITIES else len(IMAGE_MODALITIES)
        image_type = [str(v).upper() for v in (getattr(first, "ImageType", None) or [])]
        primary = 0 if image_type[:2] == ["ORIGINAL", "PRIMARY"] or not image_type else 1
        return order, primary, -len(series[uid])

    return sorted(images, key=rank)


def _same(datasets: Sequence[Any], key: str, uid: str, what: str, atol: float = 1e-4) -> None:
    first = np.atleast_1d(np.asarray(getattr(datasets[0], key, None), dtype=float))
    for ds in datasets[1:]:
        value = np.atleast_1d(np.asarray(getattr(ds, key, None), dtype=float))
        if value.shape != first.shape or not np.allclose(value, first, atol=atol):
            raise SeriesError(
                f"series {describe_series(datasets)}: its instances have different {what} ({key} {first.tolist()} "
                f"and {value.tolist()})",
                uid,
            )


def source_volume(datasets: Sequence[Any], *, gap_tolerance: float = 0.05) -> SourceVolume:
    """One series as a volume, after checking it is one.

    Args:
        datasets: the instances of one series (pydicom datasets with pixel data), in any order.
        gap_tolerance: slice gaps may differ from their median by this fraction; larger (missing slices) is refused.

    Returns:
        The :class:`SourceVolume`.

    Raises:
        SeriesError: no instance, no pixel data, multi-frame instances, different sizes, spacings or orientations,
            two slices at one position, missing slices, or pixel data that cannot be decoded (the transfer syntax
            is named), each naming the series.

    Example:
        >>> vol = source_volume([pydicom.dcmread(f) for f in files])
        >>> vol.array.shape, vol.affine
    """
    if not datasets:
        raise SeriesError("an empty series has no image to judge")
    uid = _uid(datasets[0], "SeriesInstanceUID")
    desc = describe_series(datasets)
    if any("PixelData" not in ds for ds in datasets):
        raise SeriesError(f"series {desc}: an instance has no pixel data", uid)
    if any(int(getattr(ds, "NumberOfFrames", 1) or 1) > 1 for ds in datasets):
        raise SeriesError(f"series {desc}: multi-frame (enhanced) instances are not read by this app", uid)
    for key in ("ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing"):
        if any(getattr(ds, key, None) is None for ds in datasets):
            raise SeriesError(f"series {desc}: an instance lacks {key}: cannot place it in patient space", uid)
    _same(datasets, "Rows", uid, "sizes")
    _same(datasets, "Columns", uid, "sizes")
    _same(datasets, "PixelSpacing", uid, "pixel spacings")
    _same(datasets, "ImageOrientationPatient", uid, "orientations (mixed orientations are not one volume)")
    iop = np.asarray(datasets[0].ImageOrientationPatient, dtype=float)
    normal = np.cross(iop[:3], iop[3:])
    pos = np.array([float(np.asarray(ds.ImagePositionPatient, dtype=float) @ normal) for ds in datasets])
    order = np.argsort(pos, kind="stable")
    items = [datasets[i] for i in order]
    if len(items) > 1:
        gaps = np.diff(pos[order])
        if gaps.min() <= 1e-4:
            raise SeriesError(f"series {desc}: two instances share a slice position (several series mixed?)", uid)
        med = float(np.median(gaps))
        worst = int(np.argmax(np.abs(gaps - med)))
        if abs(gaps[worst] - med) > gap_tolerance * med:
            missing = max(int(round(gaps[worst] / med)) - 1, 0)
            what = f"about {missing} missing slice(s)" if missing else "uneven slice spacing"
            raise SeriesError(
                f"series {desc}: {what}: a gap of {gaps[worst]:.3g} mm after instance "
                f"{getattr(items[worst], 'InstanceNumber', worst + 1)} where the series steps {med:.3g} mm",
                uid,
            )
    try:
        affine = dicom_affine(items)
    except ValueError as err:
        raise SeriesError(f"series {desc}: {err}", uid) from err
    rows, cols = int(items[0].Rows), int(items[0].Columns)
    arr = np.empty((cols, rows, len(items)), dtype=np.float32)
    for k, ds in enumerate(items):
        try:
            pixels = ds.pixel_array
        except Exception as err:  # pydicom raises several types for a codec it lacks
            ts = (
                ds.file_meta.TransferSyntaxUID
                if hasattr(ds, "file_meta") and "TransferSyntaxUID" in ds.file_meta
                else "?"
            )
            name = getattr(ts, "name", str(ts))
            raise SeriesError(
                f"series {desc}: cannot decode the pixel data of instance {_uid(ds, 'SOPInstanceUID')} in transfer "
                f"syntax {name} ({ts}): {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}",
                uid,
            ) from err
        if pixels.shape != (rows, cols):
            raise SeriesError(f"series {desc}: instance pixel array {pixels.shape} is not one {rows}x{cols} slice", uid)
        slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
        intercept = float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
        arr[:, :, k] = pixels.T.astype(np.float32) * slope + intercept
    if not np.isfinite(arr).all():
        raise SeriesError(f"series {desc}: non-finite voxel values", uid)
    center, width = getattr(items[0], "WindowCenter", None), getattr(items[0], "WindowWidth", None)
    if center is not None and width is not None:
        c = float(np.atleast_1d(center)[0])
        w = max(float(np.atleast_1d(width)[0]), 1e-6)
        window = (c - w / 2, c + w / 2)
    else:
        lo, hi = np.percentile(arr[:: max(1, cols // 128), :: max(1, rows // 128)], [1, 99])
        window = (float(lo), float(hi) if hi > lo else float(lo) + 1.0)
    return SourceVolume(arr, affine, items, uid, window)


def to_source_frames(array: Any, affine: Any, source: SourceVolume, *, atol: float = 1e-3) -> np.ndarray:
    """A volume on the source grid (in any axis order and direction) as ``(slice, row, column)`` frames in the order
    of ``source.datasets``.

    Args:
        array: (X, Y, Z) or (1, X, Y, Z) voxels, e.g. a map written by the pipeline on the input grid.
        affine: its 4x4 RAS affine.
        source: the series it must lie on.
        atol: tolerance (voxels) of the grid match.

    Returns:
        A view of ``array`` (not copied: a 512x512x128 transpose costs 0.3 s, and the writers read it in slabs).

    Raises:
        ValueError: the volume is not on the source grid (a permutation or flip of its axes).
    """
    arr = np.asarray(array)
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 3:
        raise ValueError(f"expected a 3D volume on the series grid, got shape {arr.shape}")
    m = np.linalg.solve(source.affine, np.asarray(affine, dtype=np.float64))  # map voxel -> source voxel
    lin = m[:3, :3]
    perm = np.abs(lin).argmax(axis=1)  # source axis i comes from map axis perm[i]
    target = np.zeros((3, 3))
    target[np.arange(3), perm] = np.sign(lin[np.arange(3), perm])
    if sorted(perm.tolist()) != [0, 1, 2] or not np.allclose(lin, target, atol=atol):
        raise ValueError(f"the volume is not on the source series' grid (voxel map {np.round(lin, 4).tolist()})")
    out = np.transpose(arr, perm)
    shape = source.array.shape
    if out.shape != shape:
        raise ValueError(f"the volume's shape {arr.shape} does not match the series' {shape} (after axis order)")
    signs = target[np.arange(3), perm]
    for i in np.flatnonzero(signs < 0):
        out = np.flip(out, axis=int(i))
    expected = np.array([shape[i] - 1 if signs[i] < 0 else 0 for i in range(3)], dtype=float)
    if not np.allclose(m[:3, 3], expected, atol=atol):
        raise ValueError(f"the volume is shifted from the series' grid by {np.round(m[:3, 3] - expected, 4)} voxels")
    return np.transpose(out, (2, 1, 0))  # (X, Y, Z) -> (Z, Y=row, X=column): a view, copied by whoever needs to


def _hd():
    try:
        import highdicom
    except ImportError as err:
        raise ImportError(
            f"DICOM results need highdicom: pip install 'monai-gamverify[dicom]' (highdicom, pydicom>=3) ({err})"
        ) from err
    return highdicom


def _link(ds: Any) -> Any:
    """A header-only copy with the identifiers a result needs (evidence for SR, nothing else)."""
    from pydicom.dataset import Dataset

    out = Dataset()
    for key in ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", *LINK_KEYWORDS):
        setattr(out, key, getattr(ds, key, None) or "")
    return out


_GEOMETRY_KEYWORDS = (
    "Modality",
    "FrameOfReferenceUID",
    "Rows",
    "Columns",
    "PixelSpacing",
    "ImageOrientationPatient",
    "ImagePositionPatient",
    "SliceThickness",
    "SpacingBetweenSlices",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "BitsAllocated",
)


def _geometry_link(ds: Any) -> Any:
    """:func:`_link` plus the image geometry (what a SEG takes from its source images)."""
    out = _link(ds)
    for key in _GEOMETRY_KEYWORDS:
        if key in ds:
            setattr(out, key, getattr(ds, key))
    return out


def _code(value: str, meaning: str) -> Any:
    return _hd().sr.CodedConcept(value=value, scheme_designator=_SCHEME, meaning=meaning)


def _text(name: Any, value: Any) -> Any:
    hd = _hd()
    return hd.sr.TextContentItem(name=name, value=str(value)[:1024] or "-", relationship_type="CONTAINS")


def _num(name: Any, value: float, unit: Any = None) -> Any:
    from pydicom.sr.codedict import codes

    hd = _hd()
    return hd.sr.NumContentItem(
        name=name, value=float(value), unit=unit or codes.UCUM.NoUnits, relationship_type="CONTAINS"
    )


def _model_items(model: Mapping[str, Any]) -> list[Any]:
    from pydicom.sr.codedict import codes

    return [
        _text(codes.DCM.AlgorithmName, model.get("name") or "unnamed bundle"),
        _text(codes.DCM.AlgorithmVersion, model.get("version") or "unknown"),
    ]


def _reference_items(datasets: Sequence[Any]) -> list[Any]:
    from pydicom.sr.codedict import codes

    hd = _hd()
    first = datasets[0]
    items = [
        hd.sr.UIDRefContentItem(
            codes.DCM.StudyInstanceUID, _uid(first, "StudyInstanceUID"), relationship_type="CONTAINS"
        ),
        hd.sr.UIDRefContentItem(
            codes.DCM.SeriesInstanceUID, _uid(first, "SeriesInstanceUID"), relationship_type="CONTAINS"
        ),
    ]
    items += [
        hd.sr.ImageContentItem(
            codes.DCM.SourceImageForImageProcessingOperation,
            _uid(ds, "SOPClassUID"),
            _uid(ds, "SOPInstanceUID"),
            relationship_type="CONTAINS",
        )
        for ds in datasets
        if _uid(ds, "SOPClassUID") and "PixelData" in ds
    ]
    return items


def _sr(evidence: Sequence[Any], items: list[Any], title: str, *, complete: bool) -> Any:
    hd = _hd()
    root = hd.sr.ContainerContentItem(name=_code("GV-REPORT", title))
    root.ContentSequence = hd.sr.ContentSequence(items)
    links = [_link(ds) for ds in evidence]
    sr = hd.sr.ComprehensiveSR(
        evidence=links,
        content=root,
        series_instance_uid=hd.UID(),
        series_number=_SERIES_NUMBERS["sr"],
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=_MANUFACTURER,
        is_complete=complete,
    )
    sr.SeriesDescription = title[:64]
    return sr


def report_sr(
    source: Sequence[Any],
    record: Mapping[str, Any],
    model: Mapping[str, Any],
    *,
    protocol: str | None = None,
) -> Any:
    """A Comprehensive SR of one judged series.

    Content (root container ``(GV-REPORT, 99GAMV, "Model suitability report")``, all CONTAINS): Algorithm Name and
    Algorithm Version (DCM 111001/111003; the bundle's ``metadata.json`` name and version); Prediction (class name,
    or the explained label of a segmentation bundle) and one ``Probability of <class>`` per class, or ``Voxels
    labelled <label>`` per label; Garbage rejected; In distribution (``yes``/``no``/``not screened``),
    In-distribution p-value, one Out-of-distribution reason per reason; Suitability verdict, P(suitable),
    Suitability threshold, Verification protocol; Study and Series Instance UID (DCM 110180/112002) and one Source
    image for image processing operation (DCM 121322) IMAGE item per source instance. The source instances are also
    the SR's evidence (``CurrentRequestedProcedureEvidenceSequence``).

    Args:
        source: the judged series' instances (headers suffice).
        record: the runner's record (``prediction``, ``verdict``, ``in_distribution``, ``p_value``, ``reasons``,
            ``p_suitable``, ``threshold``).
        model: ``{"name": ..., "version": ...}`` from the bundle's metadata.
        protocol: how the verdict was reached (verifier, reference, threshold, CAM method and layer).

    Returns:
        The SR dataset (new Series and SOP Instance UIDs).
    """
    pred = record.get("prediction") or {}
    items = _model_items(model)
    if "label_map" in pred or "voxels" in pred:
        items.append(
            _text(_code("GV-PRED", "Prediction"), f"segmentation; explained label {pred.get('explained_label')}")
        )
        for i, (name, count) in enumerate((pred.get("voxels") or {}).items()):
            items.append(_num(_code(f"GV-VOX-{i}", f"Voxels labelled {name}"), count, _voxel_unit()))
    else:
        items.append(_text(_code("GV-PRED", "Prediction"), pred.get("class_name", pred.get("class_index"))))
        for i, (name, p) in enumerate((pred.get("probabilities") or {}).items()):
            items.append(_num(_code(f"GV-PROB-{i}", f"Probability of {name}"), p))
        garbage = pred.get("garbage")
        if garbage:
            items.append(_text(_code("GV-GARB", "Garbage rejected"), "yes" if garbage.get("rejected") else "no"))
    ind = record.get("in_distribution")
    items.append(
        _text(_code("GV-INDIST", "In distribution"), "not screened" if ind is None else ("yes" if ind else "no"))
    )
    if record.get("p_value") is not None:
        items.append(_num(_code("GV-PVAL", "In-distribution p-value"), record["p_value"]))
    for reason in record.get("reasons") or []:
        items.append(_text(_code("GV-REASON", "Out-of-distribution reason"), reason))
    items.append(_text(_code("GV-VERDICT", "Suitability verdict"), record.get("verdict")))
    if record.get("p_suitable") is not None:
        items.append(_num(_code("GV-PSUIT", "P(suitable)"), record["p_suitable"]))
    if record.get("threshold") is not None:
        items.append(_num(_code("GV-THRESH", "Suitability threshold"), record["threshold"]))
    items.append(_text(_code("GV-PROTO", "Verification protocol"), protocol or "not given"))
    items += _reference_items(source)
    return _sr(source, items, "Model suitability report", complete=True)


def _voxel_unit() -> Any:
    return _hd().sr.CodedConcept(value="{voxels}", scheme_designator="UCUM", meaning="voxels")


def failure_sr(evidence: Sequence[Any], reason: str, model: Mapping[str, Any]) -> Any:
    """A Comprehensive SR saying that a study or series was not judged, and why.

    Content: Algorithm Name/Version, ``Processing status`` = ``not judged``, ``Reason`` (the message naming the
    series), Study Instance UID and the series' references.

    Args:
        evidence: the study's instances (at least one; headers suffice).
        reason: the message.
        model: ``{"name": ..., "version": ...}``.
    """
    if not evidence:
        raise ValueError("a failure SR needs at least one instance of the study to link it to")
    items = [*_model_items(model), _text(_code("GV-STATUS", "Processing status"), "not judged")]
    items.append(_text(_code("GV-FAIL", "Reason"), reason))
    items += _reference_items(evidence)
    return _sr(evidence, items, "Model suitability report: not judged", complete=True)


def _orientation_letters(v: np.ndarray) -> str:
    letters = ("LR", "PA", "HF")  # LPS +/- per axis
    order = np.argsort(-np.abs(v))
    out = "".join(letters[i][0 if v[i] > 0 else 1] for i in order if abs(v[i]) > 0.25)
    return out or letters[int(order[0])][0 if v[order[0]] > 0 else 1]


def _blend_table(alpha: float) -> np.ndarray:
    """(256 gray levels x 256 map levels, 3) uint8: the gray level blended with the ``jet`` color of the map level at
    opacity ``alpha`` x level (none below 0.1), flattened to (65536, 3) for one lookup per pixel."""
    import matplotlib

    levels = np.arange(256, dtype=np.float32)
    jet = matplotlib.colormaps["jet"](levels / 255.0)[:, :3].astype(np.float32) * 255.0
    a = np.where(levels / 255.0 < 0.1, 0.0, alpha * levels / 255.0).astype(np.float32)[None, :, None]
    table = (1.0 - a) * levels[:, None, None] + a * jet[None, :, :]
    return np.clip(np.rint(table), 0, 255).astype(np.uint8).reshape(-1, 3)


def _derive(template: Any, **changes: Any) -> Any:
    """A new dataset sharing ``template``'s unchanged elements (never modified afterwards), with new elements for
    ``changes`` (keywords) and its own file meta: what a deep copy gives for a fraction of its cost."""
    from pydicom.datadict import dictionary_VR, tag_for_keyword
    from pydicom.dataelem import DataElement
    from pydicom.dataset import Dataset, FileMetaDataset

    out = Dataset({tag: template[tag] for tag in template.keys()})
    out.file_meta = FileMetaDataset(copy.deepcopy(template.file_meta))
    for keyword, value in changes.items():
        tag = tag_for_keyword(keyword)
        vr = "OB" if keyword == "PixelData" else dictionary_VR(tag)
        out[tag] = DataElement(tag, vr, value)
    out.file_meta.MediaStorageSOPInstanceUID = out.SOPInstanceUID
    return out


def overlay_sc(source: SourceVolume, cam_frames: np.ndarray, *, alpha: float = 0.5, description: str = "") -> list:
    """The map blended over the source slices as a Secondary Capture RGB series, one instance per source slice.

    Gray: the source slice in its window (``WindowCenter``/``WindowWidth``, else the 1st-99th percentiles); color:
    the ``jet`` colormap of the map (values in [0, 1], below 0.1 left out), opacity ``alpha`` x value; both quantized
    to 256 levels and blended by one table lookup per pixel. Each instance
    carries the frame of reference, ``ImagePositionPatient``, ``ImageOrientationPatient``, ``PixelSpacing`` and
    ``SliceThickness`` of the slice it covers, and names it in ``SourceImageSequence``.

    Args:
        source: the series.
        cam_frames: ``(slice, row, column)`` map in ``source.datasets`` order (:func:`to_source_frames`).
        alpha: opacity of the map at value 1.
        description: SeriesDescription.

    Returns:
        The instances (new Series and SOP Instance UIDs).
    """
    from pydicom.dataset import Dataset

    hd = _hd()
    frames = np.asarray(cam_frames)
    n = len(source.datasets)
    if frames.shape != (n, *source.array.shape[1::-1]):
        raise ValueError(
            f"map frames {frames.shape} do not match the series ({n} slices of {source.array.shape[1::-1]})"
        )
    table = _blend_table(alpha)
    lo, hi = source.window
    series_uid = hd.UID()
    first = source.datasets[0]
    iop = np.asarray(first.ImageOrientationPatient, dtype=float)
    orientation = (_orientation_letters(iop[:3]), _orientation_letters(iop[3:]))
    link = {k: getattr(first, k, None) or None for k in LINK_KEYWORDS}
    out = []
    template = None
    scale = 255.0 / (hi - lo)
    index = np.empty(frames.shape, dtype=np.uint16)  # gray level << 8 | map level, (slice, row, column)
    for k in range(0, n, 16):  # in slabs: slices are the volume's last, strided axis (one at a time is 2x slower)
        gray = np.clip((source.array[:, :, k : k + 16] - lo) * scale, 0, 255).astype(np.uint16).transpose(2, 1, 0)
        level = (np.clip(frames[k : k + 16], 0.0, 1.0) * 255).astype(np.uint16)
        np.bitwise_or(gray << 8, level, out=index[k : k + 16])
    for k, ds in enumerate(source.datasets):
        rgb = np.take(table, index[k], axis=0)
        ref = Dataset()
        ref.ReferencedSOPClassUID = ds.SOPClassUID
        ref.ReferencedSOPInstanceUID = ds.SOPInstanceUID
        per_slice = {
            "ImagePositionPatient": list(ds.ImagePositionPatient),
            "SourceImageSequence": [ref],
            **({"SliceThickness": ds.SliceThickness} if getattr(ds, "SliceThickness", None) is not None else {}),
        }
        if template is None:  # highdicom builds (and checks) the first; the others differ in per-slice attributes
            template = hd.sc.SCImage(
                pixel_array=rgb,
                photometric_interpretation="RGB",
                bits_allocated=8,
                coordinate_system="PATIENT",
                study_instance_uid=_uid(first, "StudyInstanceUID"),
                series_instance_uid=series_uid,
                series_number=_SERIES_NUMBERS["sc"],
                sop_instance_uid=hd.UID(),
                instance_number=1,
                manufacturer=_MANUFACTURER,
                patient_id=link["PatientID"],
                patient_name=link["PatientName"],
                patient_birth_date=link["PatientBirthDate"],
                patient_sex=link["PatientSex"],
                accession_number=link["AccessionNumber"],
                study_id=link["StudyID"],
                study_date=link["StudyDate"],
                study_time=link["StudyTime"],
                referring_physician_name=link["ReferringPhysicianName"],
                pixel_spacing=tuple(float(v) for v in ds.PixelSpacing),
                patient_orientation=(orientation[0][0], orientation[1][0]),  # highdicom takes one letter each
            )
            template.PatientOrientation = list(orientation)
            template.SeriesDescription = (description or "gamverify attention overlay")[:64]
            template.FrameOfReferenceUID = _uid(first, "FrameOfReferenceUID")
            template.PositionReferenceIndicator = ""
            template.ImageOrientationPatient = list(first.ImageOrientationPatient)
            template.ImageComments = "attention map (jet) over the source slice; not for primary diagnosis"
            for key, value in per_slice.items():
                setattr(template, key, value)
            sc = template
        else:
            sc = _derive(template, SOPInstanceUID=hd.UID(), InstanceNumber=k + 1, PixelData=rgb.tobytes(), **per_slice)
        out.append(sc)
    return out


def segmentation_seg(
    source: SourceVolume, label_frames: np.ndarray, labels: Mapping[str, int], model: Mapping[str, Any]
) -> Any:
    """A label map as a DICOM SEG (BINARY, one segment per label; geometry from the source instances).

    Args:
        source: the series.
        label_frames: ``(slice, row, column)`` integer label map in ``source.datasets`` order.
        labels: ``{label name: value in the map}`` (the background 0 implied).
        model: ``{"name": ..., "version": ...}`` (the segments' algorithm identification).

    Returns:
        The SEG dataset (segment ``i + 1`` is the ``i``-th label by value; new UIDs).
    """
    from pydicom.sr.codedict import codes

    hd = _hd()
    frames = np.asarray(label_frames)
    values = sorted(labels.items(), key=lambda kv: kv[1])
    mapped = np.zeros(frames.shape, dtype=np.uint8)
    for number, (_, value) in enumerate(values, start=1):
        mapped[frames == value] = number
    algorithm = hd.AlgorithmIdentificationSequence(
        name=str(model.get("name") or "bundle")[:64],
        family=codes.cid7162.ArtificialIntelligence,
        version=str(model.get("version") or "unknown")[:64],
    )
    segments = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=str(name)[:64],
            segmented_property_category=codes.SCT.AnatomicalStructure,
            segmented_property_type=_code(f"GV-LABEL-{value}", str(name)[:64]),
            algorithm_type="AUTOMATIC",
            algorithm_identification=algorithm,
        )
        for number, (name, value) in enumerate(values, start=1)
    ]
    first = source.datasets[0]
    seg = hd.seg.Segmentation(
        source_images=[_geometry_link(ds) for ds in source.datasets],  # highdicom copies more of the patient module
        pixel_array=mapped,
        segmentation_type="BINARY",
        segment_descriptions=segments,
        series_instance_uid=hd.UID(),
        series_number=_SERIES_NUMBERS["seg"],
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=_MANUFACTURER,
        manufacturer_model_name=str(model.get("name") or "bundle")[:64],
        software_versions=str(model.get("version") or "unknown")[:64],
        device_serial_number="none",
        omit_empty_frames=bool(mapped.any()),
    )
    seg.SeriesDescription = f"gamverify segmentation ({getattr(first, 'SeriesDescription', '') or 'source'})"[:64]
    return seg


def read_sr_values(sr: Any) -> dict[str, Any]:
    """``{concept meaning: value}`` of an SR made by :func:`report_sr` / :func:`failure_sr` (a meaning seen several
    times gives a list; IMAGE items give their SOP Instance UIDs under ``"images"``)."""
    out: dict[str, Any] = {}

    def put(key: str, value: Any) -> None:
        if key in out:
            out[key] = out[key] if isinstance(out[key], list) else [out[key]]
            out[key].append(value)
        else:
            out[key] = value

    for item in sr.ContentSequence:
        meaning = item.ConceptNameCodeSequence[0].CodeMeaning
        kind = item.ValueType
        if kind == "TEXT":
            put(meaning, str(item.TextValue))
        elif kind == "NUM":
            put(meaning, float(item.MeasuredValueSequence[0].NumericValue))
        elif kind == "UIDREF":
            put(meaning, str(item.UID))
        elif kind == "IMAGE":
            out.setdefault("images", []).append(str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID))
    return out
