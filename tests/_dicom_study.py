"""Test helpers: a small CT study as pydicom datasets (oblique, non-square pixels, patient attributes that must not
leak into results), and the bad studies of the DICOM round trip."""

from __future__ import annotations

import math

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
#: attributes of the source that no result may carry (beyond the linking ones)
PRIVATE_PATIENT = {"PatientAddress": "1 Hidden Road", "OtherPatientIDs": "X-99", "PatientComments": "secret"}


def rotation(ax: float, ay: float, az: float) -> np.ndarray:
    cx, sx, cy, sy, cz, sz = math.cos(ax), math.sin(ax), math.cos(ay), math.sin(ay), math.cos(az), math.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def ct_series(
    *,
    rows: int = 32,
    cols: int = 32,
    n: int = 16,
    spacing: tuple[float, float] = (1.5, 1.25),
    step: float = 2.0,
    oblique: bool = True,
    study_uid: str | None = None,
    patient_id: str = "GV-TEST-1",
    seed: int = 0,
    description: str = "test CT",
    volume: np.ndarray | None = None,
) -> list[Dataset]:
    """A CT series (uint16 stored, slope 1, intercept -1024), instances in shuffled order; ``volume`` (slice, row,
    column) of stored values replaces the default noise with a block."""
    rng = np.random.default_rng(seed)
    rot = rotation(0.25, -0.15, 0.4) if oblique else np.eye(3)
    row_cos, col_cos = rot[:, 0], rot[:, 1]
    normal = np.cross(row_cos, col_cos)
    origin = np.array([-30.0, 20.0, 100.0])
    vol = rng.normal(1000, 60, (n, rows, cols)).clip(0, 4000).astype(np.uint16)
    vol[n // 4 : 3 * n // 4, rows // 4 : rows // 2, cols // 3 : 2 * cols // 3] += 900  # asymmetric block
    if volume is not None:
        vol = np.asarray(volume, dtype=np.uint16)
        n, rows, cols = vol.shape
    study = study_uid or generate_uid()
    series, frame = generate_uid(), generate_uid()
    out = []
    for k in rng.permutation(n):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CT_IMAGE
        ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID, ds.SOPInstanceUID = CT_IMAGE, ds.file_meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.PatientID, ds.PatientName, ds.PatientBirthDate, ds.PatientSex = patient_id, "Test^Clinic", "19700101", "O"
        for key, value in PRIVATE_PATIENT.items():
            setattr(ds, key, value)
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20260101", "120000", "1", "ACC1"
        ds.ReferringPhysicianName = ""
        ds.Modality, ds.SeriesDescription, ds.SeriesNumber, ds.InstanceNumber = "CT", description, 1, int(k) + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.PositionReferenceIndicator = ""
        ds.ImageOrientationPatient = [round(float(v), 6) for v in (*row_cos, *col_cos)]
        ds.ImagePositionPatient = [round(float(v), 4) for v in origin + k * step * normal]
        ds.PixelSpacing = [spacing[0], spacing[1]]
        ds.SliceThickness = step
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.WindowCenter, ds.WindowWidth = 40, 400
        ds.PixelData = vol[k].tobytes()
        out.append(ds)
    return out


def sr_only_study(study_uid: str | None = None) -> list[Dataset]:
    """A study with one SR instance and no image."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid or generate_uid(), generate_uid()
    ds.PatientID, ds.PatientName, ds.Modality, ds.SeriesDescription = "GV-TEST-2", "Test^SR", "SR", "Dose report"
    ds.SeriesNumber, ds.InstanceNumber, ds.StudyDate, ds.StudyTime = 1, 1, "20260101", "120000"
    ds.ValueType, ds.CompletionFlag, ds.VerificationFlag = "CONTAINER", "COMPLETE", "UNVERIFIED"
    ds.ContinuityOfContent = "SEPARATE"
    return [ds]


def drop_slice(datasets: list[Dataset], index: int) -> list[Dataset]:
    """The series without the instance at slice position ``index`` (a missing slice)."""
    order = sorted(datasets, key=lambda d: int(d.InstanceNumber))
    return [d for d in order if d is not order[index]]


def compress_undecodable(datasets: list[Dataset]) -> list[Dataset]:
    """The series in JPEG Lossless SV1 with pixel data no decoder here reads (a corrupt / unsupported codestream)."""
    import copy

    from pydicom.encaps import encapsulate

    out = []
    for ds in datasets:
        ds = copy.deepcopy(ds)
        ds.file_meta.TransferSyntaxUID = pydicom.uid.JPEGLosslessSV1
        ds.PixelData = encapsulate([b"\xff\xd8\xff\xc3" + bytes(64) + b"\xff\xd9"])
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True  # encapsulated (what dcmwrite sets; the network encoder does not)
        out.append(ds)
    return out
