"""DICOM out without a server: a series read as one volume (against ITK), maps put back on the source frames in any
axis order, the checks that refuse a series (each naming it), series selection, and the SDK route's DICOM answer
(``GamverifyRunner(dicom_input=...)`` with an SDK ``Image`` stand-in)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pydicom
import pytest
from _dicom_study import compress_undecodable, ct_series, drop_slice, sr_only_study
from test_serve import SOS, TINY, _SdkImage, itk_affine_and_array, sdk_metadata, write_series

hd = pytest.importorskip("highdicom")

from monai_gamverify.apps.integrations.deploy import GamverifyRunner, run_dicom_folder  # noqa: E402
from monai_gamverify.io.dicom import dicom_affine  # noqa: E402
from monai_gamverify.io.dicom_out import (  # noqa: E402
    SeriesError,
    group_series,
    read_sr_values,
    select_series,
    source_volume,
    to_source_frames,
)


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


def _save(datasets, folder):
    folder.mkdir(parents=True, exist_ok=True)
    for i, ds in enumerate(datasets):
        ds.save_as(str(folder / f"{i:03d}.dcm"), enforce_file_format=True)
    return folder


def test_source_volume_equals_itk(tmp_path):
    """Voxels and affine of a shuffled oblique series with non-square pixels, as ITK (GDCM) reads the files."""
    files, _ = write_series(tmp_path / "s", spacing=(1.5, 1.0))
    vol = source_volume([pydicom.dcmread(str(f)) for f in files])
    ref_affine, ref_arr = itk_affine_and_array(tmp_path / "s")
    np.testing.assert_allclose(vol.affine, ref_affine, atol=1e-4)
    np.testing.assert_array_equal(vol.array, ref_arr.astype(np.float32))


@pytest.mark.parametrize("perm", [(0, 1, 2), (2, 0, 1), (1, 2, 0)])
@pytest.mark.parametrize("flip", [(), (0,), (1, 2)])
def test_to_source_frames_any_axis_order(perm, flip):
    vol = source_volume(ct_series(rows=6, cols=5, n=4))
    arr, affine = vol.array.copy(), vol.affine.copy()
    for ax in flip:  # flip axis ax: voxel i -> n-1-i
        arr = np.flip(arr, ax)
        f = np.eye(4)
        f[ax, ax], f[ax, 3] = -1, arr.shape[ax] - 1
        affine = affine @ f
    arr = np.transpose(arr, perm)
    p = np.eye(4)[[*perm, 3]].T  # new voxel -> old voxel
    affine = affine @ p
    frames = to_source_frames(arr, affine, vol)
    np.testing.assert_array_equal(frames, np.transpose(vol.array, (2, 1, 0)))
    shifted = affine.copy()
    shifted[:3, 3] += affine[:3, 0]
    with pytest.raises(ValueError, match="shifted"):
        to_source_frames(arr, shifted, vol)


def _mixed(datasets):
    out = copy.deepcopy(datasets)
    out[0].ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    return out


def _resized(datasets):
    out = copy.deepcopy(datasets)
    out[1].Rows = 16
    return out


def _no_pixels(datasets):
    out = copy.deepcopy(datasets)
    del out[2].PixelData
    return out


@pytest.mark.parametrize(
    "spoil, message",
    [
        (lambda d: drop_slice(d, 5), "about 1 missing slice"),
        (lambda d: drop_slice(drop_slice(d, 5), 5), "about 2 missing slice"),
        (_mixed, "different orientations"),
        (_resized, "different sizes"),
        (_no_pixels, "has no pixel data"),
        (compress_undecodable, r"cannot decode the pixel data .* JPEG Lossless"),
        (lambda d: d[:1] * 2, "share a slice position"),
    ],
)
def test_unusable_series_named(spoil, message):
    datasets = spoil(ct_series(rows=8, cols=8, n=10))
    with pytest.raises(SeriesError, match=message) as err:
        source_volume(datasets)
    assert err.value.series_uid == str(datasets[0].SeriesInstanceUID) in str(err.value)


def test_select_series():
    ct, sr = ct_series(rows=8, cols=8, n=4), sr_only_study()
    derived = ct_series(rows=8, cols=8, n=6, study_uid=str(ct[0].StudyInstanceUID))
    for d in derived:
        d.ImageType = ["DERIVED", "SECONDARY"]
    series = group_series([*sr, *derived, *ct])
    assert select_series(series) == [str(ct[0].SeriesInstanceUID), str(derived[0].SeriesInstanceUID)]
    with pytest.raises(SeriesError, match="no image series in the study: it holds SR 'Dose report'"):
        select_series(group_series(sr))


def test_sdk_route_writes_the_dicom_answer(tmp_path):
    """GamverifyOperator's logic with ``dicom_input`` (the example app's default): the SDK Image is judged, the series
    is read from the input folder, SR + overlay go to ``out/dicom/``; the overlay has ITK's geometry of the source."""
    files, _ = write_series(tmp_path / "study", spacing=(1.5, 1.0))
    meta, dhw = sdk_metadata(files)
    runner = GamverifyRunner(SOS, tmp_path / "out", overrides=TINY, require_weights=False, device="cpu",
                             dicom_input=tmp_path / "study")  # fmt: skip
    prediction, _, verdict = runner(_SdkImage(dhw, meta))
    written = [pydicom.dcmread(str(f)) for f in sorted((tmp_path / "out" / "dicom").rglob("*.dcm"))]
    sr = [d for d in written if d.Modality == "SR"]
    sc = [d for d in written if d.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"]
    assert len(sr) == 1 and len(sc) == len(files) == len(written) - 1
    values = read_sr_values(sr[0])
    assert values["Prediction"] == prediction["class_name"] and values["Suitability verdict"] == verdict["verdict"]
    assert values["Series Instance UID"] == meta["SeriesInstanceUID"]
    np.testing.assert_allclose(dicom_affine(sc), itk_affine_and_array(tmp_path / "study")[0], atol=1e-4)


def test_folder_route_without_sdk(tmp_path):
    """``run_dicom_folder`` (the packaged app's entry point without the SDK): a good study answered, a bad one SR'd."""
    study = _save(ct_series(n=8, rows=16, cols=16), tmp_path / "good")
    summary = run_dicom_folder(study, tmp_path / "out", SOS, overrides=TINY, require_weights=False, device="cpu")
    assert summary["status"] == "judged" and summary["objects"]["Secondary Capture Image Storage"] == 8
    assert len(summary["files"]) == 9 and json.loads(json.dumps(summary)) == summary
    bad = _save(drop_slice(ct_series(n=8, rows=16, cols=16), 3), tmp_path / "bad")
    summary = run_dicom_folder(bad, tmp_path / "out2", SOS, overrides=TINY, require_weights=False, device="cpu")
    assert summary["status"] == "not judged" and "missing slice" in summary["reason"]
    assert summary["objects"] == {"Comprehensive SR Storage": 1} and len(summary["files"]) == 1
    with pytest.raises(ValueError, match="no DICOM file"):
        run_dicom_folder(tmp_path / "out2" / "nothing", tmp_path / "o3", SOS, require_weights=False)
