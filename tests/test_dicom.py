"""DICOM input: series directories and single files through load_image, the RAS affine from headers (against ITK),
the same map from a DICOM series as from the same volume as NIfTI, and geometry errors."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from _zoo_bundles import write_seg_bundle
from monai.transforms import Orientation

from monai_gamverify import GradCAM
from monai_gamverify.bundle import check_geometry, geometry_problems, load_bundle
from monai_gamverify.io.dicom import dicom_affine, dicom_series, read_dicom_headers
from monai_gamverify.io.grid import to_input_grid
from monai_gamverify.io.nifti import affine_of, load_image
from monai_gamverify.visualize.segcam import bundle_segmentation_cam

itk = pytest.importorskip("itk")

STUDY = "1.2.826.0.1.3680043.2.1125.9.1"


def write_series(directory, vol, *, row, col, origin, pixel_spacing, step, uid="1.2.826.0.1.3680043.2.1125.9.2"):
    """Write ``vol`` (column index, row index, slice) as a CT series of int16 slices with GDCM (ITK), one file per
    slice, geometry set through the DICOM tags."""
    directory.mkdir(parents=True, exist_ok=True)
    row, col = np.asarray(row, float), np.asarray(col, float)
    normal = np.cross(row, col)
    for k in range(vol.shape[2]):
        s = itk.image_from_array(np.ascontiguousarray(vol[:, :, k].T.astype(np.int16)))  # ITK array: (rows, cols)
        s.SetSpacing([pixel_spacing[1], pixel_spacing[0]])
        ipp = np.asarray(origin, float) + k * step * normal
        s["0020|0032"] = "\\".join(f"{v:.6f}" for v in ipp)
        s["0020|0037"] = "\\".join(f"{v:.6f}" for v in [*row, *col])
        s["0028|0030"] = f"{pixel_spacing[0]}\\{pixel_spacing[1]}"
        s["0018|0050"] = f"{step}"
        s["0020|0013"] = str(k + 1)
        s["0008|0060"] = "CT"
        s["0020|000d"] = STUDY
        s["0020|000e"] = uid
        s["0008|0018"] = f"{uid}.{k + 1}"
        io = itk.GDCMImageIO.New()
        io.KeepOriginalUIDOn()
        itk.imwrite(s, str(directory / f"IM{k:04d}.dcm"), imageio=io)
    return directory


def _volume(shape, seed=0):
    rng = np.random.default_rng(seed)
    vol = rng.integers(-200, 300, size=shape).astype(np.int16)
    vol[4:10, 5:12, 3:8] += 400  # a bright block, so maps have something to find
    return vol


def _itk_ras_affine(path) -> np.ndarray:
    img = itk.imread(str(path))
    direction = np.asarray(img.GetDirection(), float)
    lps = np.eye(4)
    lps[:3, :3] = direction @ np.diag(np.asarray(img.GetSpacing(), float))
    lps[:3, 3] = np.asarray(img.GetOrigin(), float)
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def test_dicom_affine_non_square_pixels_against_itk(tmp_path):
    a = 0.3
    row, col = [np.cos(a), np.sin(a), 0.0], [-np.sin(a) * 0.8, np.cos(a) * 0.8, 0.6]
    col = list(np.asarray(col) / np.linalg.norm(col))
    row = list(np.asarray(row) - np.dot(row, col) * np.asarray(col))
    row = list(np.asarray(row) / np.linalg.norm(row))
    d = write_series(
        tmp_path / "s",
        _volume((7, 6, 5)),
        row=row,
        col=col,
        origin=[10.0, -20.0, 30.0],
        pixel_spacing=[1.5, 1.0],
        step=2.0,
    )
    headers = read_dicom_headers(d)
    assert headers[0]["PixelSpacing"] == [1.5, 1.0]
    aff = dicom_affine(headers)
    np.testing.assert_allclose(aff, _itk_ras_affine(d), atol=1e-4)
    np.testing.assert_allclose(aff, load_image(d).affine.numpy(), atol=1e-4)
    # by hand: one step along the first array axis (along a row) moves PixelSpacing[1] = 1.0 mm in the row direction
    np.testing.assert_allclose(np.linalg.norm(aff[:3, 0]), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(aff[:3, 1]), 1.5, atol=1e-5)
    np.testing.assert_allclose(aff[:3, 0] * [-1, -1, 1], row, atol=1e-5)
    # header order does not matter (slices are sorted along the normal)
    np.testing.assert_allclose(dicom_affine(headers[::-1]), aff, atol=1e-9)
    with pytest.raises(ValueError, match="share a position"):
        dicom_affine([headers[0], headers[0]])
    with pytest.raises(ValueError, match="ImageOrientationPatient"):
        dicom_affine([{"ImagePositionPatient": [0, 0, 0], "PixelSpacing": [1, 1]}])


def test_dicom_series_map_equals_nifti_map(tmp_path, one_thread):
    vol = _volume((16, 16, 12), seed=1)
    d = write_series(
        tmp_path / "ct", vol, row=[1, 0, 0], col=[0, 1, 0], origin=[-5.0, 7.0, 11.0], pixel_spacing=[1.5, 1.0], step=2.5
    )
    affine = dicom_affine(read_dicom_headers(d))
    nii = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(vol, affine), str(nii))
    a, b = load_image(d), load_image(nii)
    assert a.shape == b.shape == (1, 16, 16, 12)
    ra, rb = Orientation("RAS")(a), Orientation("RAS")(b)
    assert torch.equal(ra.as_tensor(), rb.as_tensor())
    np.testing.assert_allclose(ra.affine.numpy(), rb.affine.numpy(), atol=1e-4)
    # through a model-zoo-form segmentation bundle: its own LoadImaged reads the directory
    bm = load_bundle(write_seg_bundle(tmp_path / "seg", fmt="json", seed=2), device="cpu")
    pre = bm.preprocessing()
    xa, xb = pre({"image": str(d)})["image"], pre({"image": str(nii)})["image"]
    assert torch.equal(xa.as_tensor(), xb.as_tensor())
    check_geometry(xa, bm)

    def spleen(out):
        return out[:, 1].flatten(1).sum(1)

    cam = GradCAM(bm.network, bm.target_layer)
    ma = cam(xa.unsqueeze(0), score_fn=spleen, normalize=False)
    mb = cam(xb.unsqueeze(0), score_fn=spleen, normalize=False)
    assert float(ma.amax()) > 0
    torch.testing.assert_close(ma, mb, atol=1e-6, rtol=0)
    np.testing.assert_allclose(ma.affine.numpy(), mb.affine.numpy(), atol=1e-4)
    # the segmentation route, back on each input's own grid: the same map, with the series' affine
    out = []
    for img in (xa, xb):
        maps, _ = bundle_segmentation_cam(bm, img.unsqueeze(0), "spleen")
        cam_in, ref = to_input_grid(maps[0], img, pre)
        out.append((torch.as_tensor(np.asarray(cam_in)), affine_of(ref)))
    assert out[0][0].shape == (1, 16, 16, 12)
    torch.testing.assert_close(out[0][0], out[1][0], atol=1e-6, rtol=0)
    np.testing.assert_allclose(out[0][1], affine, atol=1e-4)
    np.testing.assert_allclose(out[1][1], affine, atol=1e-4)


def test_single_file_thin_series_and_geometry_errors(tmp_path, one_thread):
    bm = load_bundle(write_seg_bundle(tmp_path / "seg", fmt="json"), device="cpu")
    assert bm.total_stride() == (4, 4, 4)
    d = write_series(
        tmp_path / "one",
        _volume((16, 16, 1)),
        row=[1, 0, 0],
        col=[0, 1, 0],
        origin=[0, 0, 0],
        pixel_spacing=[0.5, 0.5],
        step=1.0,
    )
    one = load_image(next(d.iterdir()))  # a single DICOM file
    assert one.shape == (1, 16, 16, 1)
    with pytest.raises(ValueError, match=r"one slice along spatial axis 2 .*3D network needs a volume"):
        check_geometry(one, bm)
    two = load_image(
        write_series(
            tmp_path / "two",
            _volume((16, 16, 2)),
            row=[1, 0, 0],
            col=[0, 1, 0],
            origin=[0, 0, 0],
            pixel_spacing=[0.5, 0.5],
            step=1.0,
        )
    )
    assert two.shape == (1, 16, 16, 2)
    assert geometry_problems(two, bm) == [
        "spatial axis 2 has 2 voxels, fewer than the network's total stride 4 along it (shape (16, 16, 2)): its "
        "deepest features have no extent there"
    ]
    assert "a 3D network needs a volume" in geometry_problems(torch.zeros(1, 16, 16), bm)[0]
    assert "2 channel(s) but the network expects 1" in geometry_problems(torch.zeros(2, 16, 16, 16), bm)[0]
    assert geometry_problems(torch.zeros(1, 16, 16, 8), bm) == []


def test_series_selection_and_missing_input(tmp_path):
    vol = _volume((8, 8, 3))
    kw = {"row": [1, 0, 0], "col": [0, 1, 0], "origin": [0, 0, 0], "pixel_spacing": [1.0, 1.0], "step": 1.0}
    write_series(tmp_path / "a", vol, uid="1.2.826.0.1.3680043.2.1125.9.7", **kw)
    write_series(tmp_path / "b", vol[:, :, :2] + 1, uid="1.2.826.0.1.3680043.2.1125.9.8", **kw)
    (tmp_path / "two").mkdir()
    for sub in ("a", "b"):
        for f in sorted((tmp_path / sub).iterdir()):
            f.rename(tmp_path / "two" / f"{sub}{f.name}")
    series = dicom_series(tmp_path / "two")
    assert len(series) == 2
    with pytest.raises(ValueError, match="holds 2 DICOM series .*series_uid"):
        load_image(tmp_path / "two")
    img = load_image(tmp_path / "two", series_uid="1.2.826.0.1.3680043.2.1125.9.7")
    assert img.shape == (1, 8, 8, 3)
    np.testing.assert_array_equal(img[0].numpy(), vol.astype(np.float32))
    with pytest.raises(FileNotFoundError, match="neither a file nor a DICOM series directory"):
        load_image(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no DICOM series"):
        load_image(tmp_path / "empty")
