"""DICOM through the datalist routes: ``verify_bundles`` (``gamverify verify``) and ``bundle_energy``
(``gamverify energy``) give the same features / attribution energies for a datalist of DICOM series directories and
a multi-frame DICOM file as for the same volumes written as NIfTI (same physical grid: DICOM axes are LPS)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from monai_gamverify.bundle import load_bundle
from monai_gamverify.data.datalist import DataError, check_image, list_images, load_datalist
from monai_gamverify.data.synthetic import QUALITY_CATEGORIES, generate
from monai_gamverify.energy.workflow import bundle_energy
from monai_gamverify.verification.bundles import verify_bundles

itk = pytest.importorskip("itk", reason="writing DICOM needs itk (GDCM)")

REPO = Path(__file__).resolve().parents[1]
SOS = REPO / "bundles" / "sos_staging"
QUALITY = REPO / "bundles" / "cbct_quality"
TINY = {"network_name": "small_cnn", "networks#small_cnn#width": 4, "roi_size": [16, 16, 16], "pixdim": [2.5] * 3}
QTINY = {"image_size": 32, "networks#small_cnn#width": 4}
SPACING = 2.0
N = 4  # volumes: 3 as series directories, the last as one multi-frame file


def _tag(img, uid: str) -> itk.Image:
    for tag, val in {"0008|0060": "CT", "0020|000e": uid, "0020|000d": uid + ".0"}.items():
        img.GetMetaDataDictionary()[tag] = val
    return img


def _gdcm() -> itk.GDCMImageIO:
    io = itk.GDCMImageIO.New()
    io.KeepOriginalUIDOn()
    return io


def _write_series(vol: np.ndarray, out: Path, uid: str) -> None:
    """``vol`` (x, y, z) as one DICOM file per z slice, identity direction (LPS), origin 0."""
    out.mkdir(parents=True)
    for k in range(vol.shape[2]):
        sl = itk.image_from_array(np.ascontiguousarray(vol[None, :, :, k].transpose(0, 2, 1)))  # ITK array: (z, y, x)
        sl.SetSpacing([SPACING] * 3)
        sl.SetOrigin([0.0, 0.0, SPACING * k])
        _tag(sl, uid).GetMetaDataDictionary()["0020|0013"] = str(k + 1)
        itk.imwrite(sl, str(out / f"IM{k:04d}.dcm"), imageio=_gdcm())


def _write_multiframe(vol: np.ndarray, path: Path, uid: str) -> None:
    """``vol`` (x, y, z) as one multi-frame DICOM file (GDCM writes an enhanced CT with per-frame positions)."""
    path.parent.mkdir(parents=True)
    img = itk.image_from_array(np.ascontiguousarray(vol.transpose(2, 1, 0)))
    img.SetSpacing([SPACING] * 3)
    itk.imwrite(_tag(img, uid), str(path), imageio=_gdcm())


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """``nii.json`` and ``dcm.json``: the same volumes as LPS NIfTI twins and as DICOM, each under ``case_i/CT``
    (the usual export layout: every series directory has the same name)."""
    root = tmp_path_factory.mktemp("dicom_routes")
    vols = generate("sos", n=N, size=24, seed=3).images
    scores = np.random.default_rng(0).uniform(0, 5, (N, len(QUALITY_CATEGORIES)))
    lists: dict[str, list] = {"nii": [], "dcm": []}
    for i, vol in enumerate(vols):
        vol = np.asarray(vol).astype(np.int16)
        entry = dict(zip(QUALITY_CATEGORIES, scores[i].tolist()))
        lps = np.diag([-SPACING, -SPACING, SPACING, 1.0])  # DICOM's first two axes point left and posterior
        nii = root / "nii" / f"case_{i}.nii.gz"
        nii.parent.mkdir(exist_ok=True)
        nib.save(nib.Nifti1Image(vol, lps), str(nii))
        uid = f"1.2.826.0.1.3680043.2.1125.17.{i + 1}"
        if i < N - 1:
            dcm = root / "dcm" / f"case_{i}" / "CT"
            _write_series(vol, dcm, uid)
        else:
            dcm = root / "dcm" / f"case_{i}" / "CT.dcm"
            _write_multiframe(vol, dcm, uid)
        lists["nii"].append({"image": str(nii.relative_to(root)), **entry})
        lists["dcm"].append({"image": str(dcm.relative_to(root)), **entry})
    for kind, items in lists.items():
        (root / f"{kind}.json").write_text(json.dumps({"test": items}))
    # the same voxels labelled RAS: another physical image (flipped in x and y), for the sanity check below
    nib.save(
        nib.Nifti1Image(np.asarray(vols[0]).astype(np.int16), np.diag([SPACING] * 3 + [1.0])), str(root / "ras.nii")
    )
    return root


def _bundle(tmp: Path, src: Path, name: str, seed: int, overrides: dict) -> Path:
    root = tmp / name
    shutil.copytree(src, root, ignore=shutil.ignore_patterns("models", "eval", "data"))
    (root / "models").mkdir()
    torch.manual_seed(seed)
    bm = load_bundle(root, require_weights=False, overrides=overrides, device="cpu")
    torch.save(bm.network.state_dict(), root / "models" / "model.pt")
    return root


def test_datalist_accepts_dicom_and_names_bad_input(data, tmp_path):
    items = load_datalist(data / "dcm.json", "test", spatial_dims=None, require_label=False, check="exists")
    assert [Path(e["image"]).name for e in items] == ["CT"] * (N - 1) + ["CT.dcm"]
    assert check_image(items[0]["image"]) == (1, 24, 24, 24)  # a series directory, read completely
    assert check_image(items[-1]["image"]) == (1, 24, 24, 24)  # the multi-frame file
    full = load_datalist(data / "dcm.json", "test", spatial_dims=3, require_label=False, check="full")
    assert [e["image"] for e in full] == [e["image"] for e in items]
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    for image, match in [
        (tmp_path / "empty", r"image directory .* holds no DICOM file: .*empty"),
        (
            tmp_path / "gone",
            r"image file listed in .* not found: .*gone \(neither a file nor a DICOM series directory\)",
        ),
    ]:
        (tmp_path / "dl.json").write_text(json.dumps({"test": [{"image": str(image)}]}))
        with pytest.raises(DataError, match=match):
            load_datalist(tmp_path / "dl.json", "test", require_label=False, check="exists")
    with pytest.raises(DataError, match=r"cannot use image .*empty.*no DICOM series"):
        check_image(tmp_path / "empty")


def test_verify_bundles_dicom_equals_nifti(data, tmp_path, one_thread):
    ref = _bundle(tmp_path, SOS, "ref", 0, TINY)
    pre = load_bundle(ref, overrides=TINY, device="cpu").preprocessing()
    dcm = load_datalist(data / "dcm.json", "test", spatial_dims=None, require_label=False, check="none")
    nii = load_datalist(data / "nii.json", "test", spatial_dims=None, require_label=False, check="none")
    xs = {}
    for name, path in [("dcm", dcm[0]["image"]), ("mf", dcm[-1]["image"]), ("nii", nii[0]["image"])]:
        xs[name] = pre({"image": path})["image"]
    xs["nii_last"] = pre({"image": nii[-1]["image"]})["image"]
    assert xs["dcm"].shape == (1, 16, 16, 16)
    torch.testing.assert_close(xs["dcm"].as_tensor(), xs["nii"].as_tensor(), rtol=0, atol=0)
    torch.testing.assert_close(xs["mf"].as_tensor(), xs["nii_last"].as_tensor(), rtol=0, atol=0)
    np.testing.assert_allclose(xs["dcm"].affine.numpy(), xs["nii"].affine.numpy(), atol=1e-4)
    # the twin is the right one: the same voxels labelled RAS are another image after orientation
    assert not torch.equal(pre({"image": str(data / "ras.nii")})["image"].as_tensor(), xs["dcm"].as_tensor())

    small2 = {**TINY, "num_classes": 2}
    cands = {
        "sos_b": str(_bundle(tmp_path, SOS, "sos_b", 1, TINY)),
        "sos_c": str(_bundle(tmp_path, SOS, "sos_c", 3, TINY)),
        "chin": str(_bundle(tmp_path, SOS, "chin", 2, small2)),
        "chin_c": str(_bundle(tmp_path, SOS, "chin_c", 4, small2)),
    }
    tables, maps = {}, {}
    for kind in ("nii", "dcm"):
        out = tmp_path / f"report_{kind}"
        report = verify_bundles(
            str(ref),
            cands,
            str(data),
            out=str(out),
            datalist=str(data / f"{kind}.json"),
            labels={"sos_b": 1, "sos_c": 1, "chin": 0, "chin_c": 0},
            overrides=TINY,
            candidate_overrides={"*": TINY, "chin": {"num_classes": 2}, "chin_c": {"num_classes": 2}},
            n_splits=2,
            n_estimators=10,
            progress=False,
            device="cpu",
        )
        assert report["n_items"] == N
        tables[kind] = pd.read_csv(out / "features.csv")
        maps[kind] = nib.load(str(out / "reference_map.nii.gz"))
    a, b = tables["dcm"], tables["nii"]
    assert len(a) == len(b) == 4 * N
    # every "case_i/CT" is its own sample (ids unique although the series directories share a name)
    assert a.groupby("model")["sample_id"].nunique().to_dict() == {"chin": N, "chin_c": N, "sos_b": N, "sos_c": N}
    assert list(a["model"]) == list(b["model"])
    values = [c for c in b.columns if c not in ("model", "sample_id", "subject_id", "label")]
    assert values and pd.api.types.is_numeric_dtype(b[values[0]])
    assert b[values].std().max() > 0  # the features differ between volumes: equality below means something
    np.testing.assert_allclose(a[values].to_numpy(float), b[values].to_numpy(float), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(maps["dcm"].get_fdata(), maps["nii"].get_fdata(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(maps["dcm"].affine, maps["nii"].affine, atol=1e-4)


def test_bundle_energy_dicom_equals_nifti(data, tmp_path, one_thread):
    root = _bundle(tmp_path, QUALITY, "cbct_quality", 0, QTINY)
    ae = {}
    for kind in ("nii", "dcm"):
        res = bundle_energy(
            root,
            data / f"{kind}.json",
            tmp_path / f"energy_{kind}",
            overrides=QTINY,
            device="cpu",
            n_boot=50,
            progress=False,
        )
        assert res["n"] == N
        ae[kind] = pd.read_csv(res["ae"])
    assert list(ae["nii"]["id"]) == [f"case_{i}" for i in range(N)]
    assert ae["dcm"]["id"].nunique() == N  # "CT", "CT_<hash>", ...: one row per series
    cats = list(QUALITY_CATEGORIES)
    assert (ae["nii"][cats].to_numpy() > 0).all() and ae["nii"][cats].std().min() > 0
    np.testing.assert_allclose(ae["dcm"][cats].to_numpy(), ae["nii"][cats].to_numpy(), rtol=1e-5)


def test_image_folder_lists_dicom_series(data, tmp_path):
    """A folder given to `gamverify cohort` / `list_images`: its image files and every subdirectory holding a DICOM
    series; a folder of DICOM slices alone is one series; a folder with neither is refused by name."""
    series = sorted(str(p.parent) for p in (data / "dcm").glob("case_*/CT/*.dcm"))[:1]
    case0 = Path(series[0])
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    shutil.copy(data / "nii" / "case_0.nii.gz", mixed / "a.nii.gz")
    shutil.copytree(case0, mixed / "series_0")
    (mixed / "notes").mkdir()  # a subdirectory without DICOM is not an image
    got = [Path(e["image"]).name for e in list_images(mixed, spatial_dims=None, num_channels=None, check="none")]
    assert got == ["a.nii.gz", "series_0"]
    assert [e["image"] for e in list_images(case0, spatial_dims=None, num_channels=None, check="none")] == [str(case0)]
    with pytest.raises(DataError, match="DICOM series subdirectories"):
        list_images(mixed / "notes", check="none")
