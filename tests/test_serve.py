"""Serving: the DICOM affine against ITK, the MONAI Deploy app's checks, the shipped MONAI Label app (no SDK needed)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from monai_gamverify.apps.integrations.deploy import (
    DEFAULT_SERIES_RULES,
    GamverifyRunner,
    image_array_and_affine,
    parse_app_options,
    require_selected_series,
    resolve_bundle,
    runner_kwargs,
)
from monai_gamverify.apps.integrations.monailabel import (
    APP_DIR,
    check_bundle_for_monailabel,
    find_bundles,
    task_options,
    write_app,
)
from monai_gamverify.io.dicom import dicom_affine, series_affine_from_metadata

try:  # pydicom (dev extra) writes the DICOM series; the MONAI Label tests below do not need it
    import pydicom
except ImportError:
    pydicom = None
needs_pydicom = pytest.mark.skipif(pydicom is None, reason="pydicom is not installed")

REPO = Path(__file__).resolve().parents[1]
SOS = REPO / "bundles" / "sos_staging"
TINY = {
    "network_name": "small_cnn",
    "networks#small_cnn#width": 4,
    "roi_size": [16, 16, 16],
    "pixdim": [2.5, 2.5, 2.5],
}


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _rotation(ax: float, ay: float, az: float) -> np.ndarray:
    cx, sx, cy, sy, cz, sz = math.cos(ax), math.sin(ax), math.cos(ay), math.sin(ay), math.cos(az), math.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def write_series(
    folder: Path,
    *,
    rows: int = 12,
    cols: int = 16,
    n: int = 10,
    spacing=(1.5, 1.0),
    step: float = 2.5,
    modality: str = "CT",
    seed: int = 0,
) -> tuple[list[Path], np.ndarray]:
    """An oblique series with PixelSpacing ``spacing``; files written in shuffled order.

    Returns the files and the (slice, row, col) pixel array in the order along the slice normal.
    """
    rng = np.random.default_rng(seed)
    rot = _rotation(0.3, -0.2, 0.5)
    row_cos, col_cos = rot[:, 0], rot[:, 1]
    normal = np.cross(row_cos, col_cos)
    origin = np.array([-40.0, 25.0, 110.0])
    vol = rng.integers(0, 1000, (n, rows, cols)).astype(np.uint16)
    vol[n // 3 : 2 * n // 3, 2:7, 3:12] += 2000  # asymmetric block: a swap of axes would show
    study, series, frame = pydicom.uid.generate_uid(), pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for k in rng.permutation(n):
        ds = pydicom.Dataset()
        ds.file_meta = pydicom.dataset.FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage
        ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.PatientID, ds.PatientName, ds.Modality = "P1", "Test^Serve", modality
        ds.SeriesNumber, ds.InstanceNumber = 1, int(k) + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*row_cos, *col_cos)]
        ds.ImagePositionPatient = [f"{v:.4f}" for v in origin + k * step * normal]
        ds.PixelSpacing = [f"{spacing[0]}", f"{spacing[1]}"]
        ds.SliceThickness = f"{step}"
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleIntercept, ds.RescaleSlope = "0", "1"
        ds.PixelData = vol[k].tobytes()
        path = folder / f"slice_{len(files):03d}.dcm"
        ds.save_as(str(path), enforce_file_format=True)
        files.append(path)
    return files, vol


def itk_affine_and_array(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """ITK's (GDCM series reader) RAS affine and (i, j, k) array of the series."""
    itk = pytest.importorskip("itk")
    img = itk.imread(str(folder))
    direction = np.asarray(img.GetDirection(), dtype=np.float64)
    spacing = np.asarray(img.GetSpacing(), dtype=np.float64)
    lps = np.eye(4)
    lps[:3, :3] = direction @ np.diag(spacing)
    lps[:3, 3] = np.asarray(img.GetOrigin(), dtype=np.float64)
    arr = itk.array_from_image(img).transpose(2, 1, 0)  # (k, j, i) -> (i, j, k)
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps, arr


def sdk_metadata(files: list[Path]) -> tuple[dict, np.ndarray]:
    """What MONAI Deploy SDK 4.0 puts in an Image from DICOMSeriesToVolumeOperator (its loader and
    ``compute_affine_transform`` replayed on the same files), and its (D, H, W) array."""
    ds = [pydicom.dcmread(str(f)) for f in files]
    iop = [float(v) for v in ds[0].ImageOrientationPatient]
    normal = np.cross(iop[:3], iop[3:])
    ds.sort(key=lambda d: float(normal @ np.asarray(d.ImagePositionPatient, dtype=float)))
    ps = [float(v) for v in ds[0].PixelSpacing]
    vr, vc = ps  # the SDK: vr = PixelSpacing[0] scales the ROW direction (the bug)
    p1, pn, n = np.asarray(ds[0].ImagePositionPatient, float), np.asarray(ds[-1].ImagePositionPatient, float), len(ds)
    m1 = np.eye(4)
    m1[:3, 0], m1[:3, 1] = np.asarray(iop[:3]) * vr, np.asarray(iop[3:]) * vc
    m1[:3, 2], m1[:3, 3] = (pn - p1) / (n - 1), p1
    m2 = np.diag([-1.0, -1.0, 1.0, 1.0]) @ m1
    meta = {
        "SeriesInstanceUID": ds[0].SeriesInstanceUID,
        "StudyInstanceUID": ds[0].StudyInstanceUID,
        "Modality": ds[0].Modality,
        "row_pixel_spacing": ps[0],
        "col_pixel_spacing": ps[1],
        "depth_pixel_spacing": float(np.linalg.norm(pn - p1) / (n - 1)),
        "row_direction_cosine": iop[:3],
        "col_direction_cosine": iop[3:],
        "depth_direction_cosine": list(normal),
        "dicom_affine_transform": m1,
        "nifti_affine_transform": m2,
    }
    return meta, np.stack([d.pixel_array for d in ds]).astype(np.int16)


class _SdkImage:
    """Same interface as ``monai.deploy.core.domain.Image`` (``asnumpy()``, ``metadata()``)."""

    def __init__(self, data, metadata):
        self._data, self._metadata = data, metadata

    def asnumpy(self):
        return self._data

    def metadata(self):
        return self._metadata


# ------------------------------------------------------------------------------------------------ DICOM affine
@needs_pydicom
@pytest.mark.parametrize("spacing", [(1.5, 1.0), (0.8, 0.8)])
def test_dicom_affine_matches_itk(tmp_path, spacing):
    files, _ = write_series(tmp_path / "series", spacing=spacing)
    ref_affine, ref_arr = itk_affine_and_array(tmp_path / "series")
    meta, dhw = sdk_metadata(files)
    arr, affine, name = image_array_and_affine(_SdkImage(dhw, meta))
    assert name == meta["SeriesInstanceUID"]
    np.testing.assert_array_equal(arr, ref_arr)
    np.testing.assert_allclose(affine, ref_affine, atol=1e-4)
    np.testing.assert_allclose(dicom_affine([pydicom.dcmread(str(f)) for f in files]), ref_affine, atol=1e-4)
    np.testing.assert_allclose(
        series_affine_from_metadata(meta, ras=False)[:3, :3], ref_affine[:3, :3] * [[-1], [-1], [1]], atol=1e-4
    )
    # the SDK's own nifti_affine_transform agrees with ITK only for square pixels
    sdk_ok = np.allclose(meta["nifti_affine_transform"], ref_affine, atol=1e-4)
    assert sdk_ok == (spacing[0] == spacing[1])


@needs_pydicom
def test_dicom_affine_matches_monai_pydicom_reader(tmp_path):
    from monai.transforms import LoadImage

    files, _ = write_series(tmp_path / "series", spacing=(1.5, 1.0))
    img = LoadImage(reader="PydicomReader", image_only=True)(str(tmp_path / "series"))
    meta, dhw = sdk_metadata(files)
    arr, affine, _ = image_array_and_affine(_SdkImage(dhw, meta))
    np.testing.assert_allclose(affine, np.asarray(img.affine, dtype=np.float64), atol=1e-3)
    np.testing.assert_array_equal(arr, np.asarray(img))


def test_dicom_affine_bad_metadata():
    with pytest.raises(ValueError, match="row_direction_cosine"):
        series_affine_from_metadata({"row_pixel_spacing": 1.0, "col_pixel_spacing": 1.0})
    meta = {
        "row_direction_cosine": [1, 0, 0],
        "col_direction_cosine": [0, 1, 0],
        "row_pixel_spacing": 0.0,
        "col_pixel_spacing": 1.0,
    }
    with pytest.raises(ValueError, match="PixelSpacing"):
        series_affine_from_metadata(meta)
    meta["row_pixel_spacing"] = 2.0
    affine = series_affine_from_metadata(meta, ras=False)  # single slice: unit step along the normal
    np.testing.assert_allclose(affine, np.diag([1.0, 2.0, 1.0, 1.0]))


@needs_pydicom
def test_dicom_series_map_lands_on_itk_grid(tmp_path):
    """A DICOM volume through the runner: the CAM NIfTI has ITK's affine and the volume's shape."""
    files, _ = write_series(tmp_path / "series", spacing=(1.5, 1.0))
    ref_affine, ref_arr = itk_affine_and_array(tmp_path / "series")
    meta, dhw = sdk_metadata(files)
    runner = GamverifyRunner(SOS, tmp_path / "out", overrides=TINY, require_weights=False, device="cpu")
    prediction, cam, verdict = runner(_SdkImage(dhw, meta))
    out = nib.load(cam)
    assert out.shape == ref_arr.shape
    np.testing.assert_allclose(out.affine, ref_affine, atol=1e-4)
    record = json.loads((tmp_path / "out" / f"{meta['SeriesInstanceUID']}_gamverify.json").read_text())
    assert record["dicom"]["SeriesInstanceUID"] == meta["SeriesInstanceUID"] and record["dicom"]["Modality"] == "CT"
    assert record["prediction"] == prediction and verdict["verdict"] == "unverified"


# ------------------------------------------------------------------------------------------------ Deploy checks
def test_resolve_bundle_layouts(tmp_path):
    assert resolve_bundle(SOS) == SOS
    sdk = tmp_path / "model"
    (sdk / "models" / "sos_staging" / "configs").mkdir(parents=True)
    (sdk / "models" / "sos_staging" / "configs" / "inference.json").write_text("{}")
    assert resolve_bundle(sdk) == sdk / "models" / "sos_staging"  # the SDK's default layout models/<bundle>
    (sdk / "models" / "other" / "configs").mkdir(parents=True)
    (sdk / "models" / "other" / "configs" / "inference.json").write_text("{}")
    with pytest.raises(ValueError, match="other.*sos_staging|sos_staging.*other"):
        resolve_bundle(sdk)
    assert resolve_bundle(sdk, name="other") == sdk / "models" / "other"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        resolve_bundle(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no bundle"):
        resolve_bundle(tmp_path / "model" / "models" / "other" / "configs")


def test_weights_checked_before_any_input(tmp_path):
    root = tmp_path / "b"
    (root / "configs").mkdir(parents=True)
    for f in ("inference.json", "metadata.json"):
        (root / "configs" / f).write_text((SOS / "configs" / f).read_text())
    with pytest.raises(FileNotFoundError, match=r"models/model\.pt"):
        GamverifyRunner(root, tmp_path / "out")  # at construction: before a study is loaded
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        GamverifyRunner(root, tmp_path / "out", checkpoint=tmp_path / "missing.pt")
    GamverifyRunner(root, tmp_path / "out", require_weights=False)


class _Series:
    def __init__(self, modality, description, n, uid):
        self.Modality, self.SeriesDescription, self.SeriesInstanceUID = modality, description, uid
        self._n = n

    def get_sop_instances(self):
        return [object()] * self._n


class _Study:
    def __init__(self, uid, series):
        self.StudyInstanceUID, self._series = uid, series

    def get_all_series(self):
        return self._series


def test_no_matching_series_names_what_the_study_holds():
    studies = [_Study("1.2", [_Series("SR", "Dose report", 1, "1.2.3"), _Series("OT", None, 2, "1.2.4")])]
    with pytest.raises(ValueError, match=r"no series matches.*SR 'Dose report' \(1 instance.*OT") as err:
        require_selected_series([], studies, rules='{"selections": [{"name": "CT", "conditions": {"Modality": "CT"}}]}')
    assert "Modality" in str(err.value)
    with pytest.raises(ValueError, match="no DICOM study"):
        require_selected_series([], [], rules=None)
    selected = [object()]
    assert require_selected_series(selected, studies) is selected


def test_runner_on_tensor_input_keeps_working(tmp_path):
    torch.manual_seed(0)
    runner = GamverifyRunner(SOS, tmp_path, overrides=TINY, require_weights=False, device="cpu")
    prediction, cam, _ = runner(np.zeros((16, 16, 16), np.float32))
    assert cam.is_file() and set(prediction) >= {"class_index", "class_name", "probabilities", "garbage"}


def test_app_options(tmp_path):
    opts, rest = parse_app_options(["-i", "in", "-m", "m", "--threshold", "0.7", "--overrides", '{"a": 1}'])
    assert rest == ["-i", "in", "-m", "m"] and opts.threshold == 0.7 and opts.overrides == {"a": 1}
    kw = runner_kwargs(opts)
    assert kw["require_weights"] and kw["overrides"] == {"a": 1} and kw["bundle_name"] is None
    assert "screen" not in kw and "label" not in kw
    kw = runner_kwargs(parse_app_options(["--screen", "scr", "--label", "spleen"])[0])
    assert kw["screen"] == "scr" and kw["label"] == "spleen"
    with pytest.raises(ValueError, match="--overrides"):
        parse_app_options(["--overrides", "{bad"])
    opts, _ = parse_app_options([], dicom=True)
    assert opts.rules == DEFAULT_SERIES_RULES
    modalities = [s["conditions"]["Modality"] for s in json.loads(opts.rules)["selections"]]
    assert modalities == ["(?i)CT", "(?i)MR"]
    rules = tmp_path / "rules.json"
    rules.write_text('{"selections": [{"name": "MR", "conditions": {"Modality": "MR"}}]}')
    assert "MR" in parse_app_options(["--rules", str(rules)], dicom=True)[0].rules
    with pytest.raises(ValueError, match="selections"):
        parse_app_options(["--rules", "{}"], dicom=True)


# ------------------------------------------------------------------------------------------------ MONAI Label app
def _tiny_bundle(root: Path, weights: bool = True) -> Path:
    """sos_staging's configs with small_cnn weights saved (a bundle trained with --network_name small_cnn)."""
    from monai_gamverify.bundle import load_bundle

    shutil.copytree(SOS / "configs", root / "configs")
    if weights:
        torch.manual_seed(0)
        net = load_bundle(root, overrides=TINY, require_weights=False, device="cpu").network
        (root / "models").mkdir()
        torch.save(net.state_dict(), root / "models" / "model.pt")
    return root


def test_check_bundle_loads_weights_with_overrides(tmp_path):
    root = _tiny_bundle(tmp_path / "sos_staging")
    report = check_bundle_for_monailabel(root)
    assert not report["ok"] and report["weights_load"] is False
    assert any("does not load into network_def" in p and "overrides" in p for p in report["problems"])
    report = check_bundle_for_monailabel(root, overrides=TINY)
    assert report["ok"], report["problems"]
    assert report["weights_load"] is True and report["overrides"] == TINY


def test_find_bundles_and_task_options(tmp_path):
    for name in ("b_one", "a_two"):
        (tmp_path / name / "configs").mkdir(parents=True)
        (tmp_path / name / "configs" / "inference.json").write_text("{}")
    (tmp_path / "not_a_bundle").mkdir()
    assert list(find_bundles(tmp_path)) == ["a_two", "b_one"]
    assert list(find_bundles(tmp_path, only="b_one")) == ["b_one"] and len(find_bundles(tmp_path, only="all")) == 2
    with pytest.raises(FileNotFoundError, match=r"zzz.*a_two"):
        find_bundles(tmp_path, only="zzz,a_two")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_bundles(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no bundle"):
        find_bundles(tmp_path / "not_a_bundle")

    names = ["a_two", "b_one"]
    conf = {"gamverify_overrides": json.dumps(TINY), "gamverify_threshold": "0.7", "gamverify_reference": "r.nii.gz"}
    assert task_options(conf, "a_two", names) == {"overrides": TINY, "threshold": 0.7, "reference": "r.nii.gz"}
    per = {"gamverify_overrides": json.dumps({"a_two": TINY}), "gamverify_verifier": json.dumps({"b_one": "v.skops"})}
    assert task_options(per, "a_two", names) == {"overrides": TINY}
    assert task_options(per, "b_one", names) == {"verifier": "v.skops"}
    assert task_options({"gamverify_allow_random_weights": "true"}, "a_two") == {"require_weights": False}
    screens = {"gamverify_screen": json.dumps({"b_one": "screen_b"})}  # a saved screen per bundle
    assert task_options(screens, "b_one", names) == {"screen": "screen_b"}
    with pytest.raises(ValueError, match="gamverify_overrides"):
        task_options({"gamverify_overrides": "{bad"}, "a_two")
    with pytest.raises(ValueError, match="gamverify_threshold"):
        task_options({"gamverify_threshold": "high"}, "a_two")


def test_write_app_and_module_entry(tmp_path):
    out = tmp_path / "apps" / "gamverify"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "monai_gamverify.apps.integrations.monailabel"]
    done = subprocess.run([*cmd, "app", "--out", str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (out / "main.py").read_text() == (APP_DIR / "main.py").read_text() and (out / "model").is_dir()
    again = subprocess.run([*cmd, "app", "--out", str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode != 0 and "--overwrite" in again.stderr
    assert write_app(out, overwrite=True) == out


class _Store:
    def __init__(self, images):
        self.images = images

    def get_image_uri(self, image_id):
        return self.images.get(image_id, "")

    def list_images(self):
        return list(self.images)


def _load_app_module(monkeypatch):
    """The shipped main.py against stand-ins for the MONAI Label modules it imports."""
    import monai_gamverify.apps.integrations.monailabel as ml

    monkeypatch.setattr(ml, "_TASK_CLASS", None)
    monkeypatch.setattr(ml, "_ERROR_CLASS", None)

    class MONAILabelError:
        INVALID_INPUT, APP_INIT_ERROR = "INVALID_INPUT", "APP_INIT_ERROR"

    class MONAILabelException(Exception):
        def __init__(self, error, msg):
            super().__init__(msg)
            self.error, self.msg = error, msg

    class HTTPException(Exception):
        def __init__(self, status_code, detail=None, headers=None):
            super().__init__(detail)
            self.status_code, self.detail = status_code, detail

    class InferType:
        CLASSIFICATION = "classification"

    class BasicInferTask:
        def __init__(self, path, network, type, labels, dimension, description, config=None, **kwargs):
            self.type, self.labels, self.description = type, labels, description

        def info(self):
            return {"type": self.type, "labels": self.labels}

    class MONAILabelApp:  # what the base does that matters here: keep conf, build the infers, answer infer()
        def __init__(self, app_dir, studies, conf, name="", description="", version="", labels=None):
            self.app_dir, self.studies, self.conf = app_dir, studies, conf
            self._infers = self.init_infers()
            self._store = _Store({})

        def datastore(self):
            return self._store

        def infer(self, request, datastore=None):
            request = dict(request)
            if not os.path.exists(request["image"]):
                request["image"] = self.datastore().get_image_uri(request["image"])
            file, params = self._infers[request["model"]](request)
            return {"file": file, "params": params}

    mods = {n: types.ModuleType(n) for n in (
        "fastapi", "monailabel", "monailabel.interfaces", "monailabel.interfaces.app",
        "monailabel.interfaces.exception", "monailabel.interfaces.tasks", "monailabel.interfaces.tasks.infer_v2",
        "monailabel.tasks", "monailabel.tasks.infer", "monailabel.tasks.infer.basic_infer",
    )}  # fmt: skip
    mods["fastapi"].HTTPException = HTTPException
    mods["monailabel.interfaces.app"].MONAILabelApp = MONAILabelApp
    mods["monailabel.interfaces.exception"].MONAILabelError = MONAILabelError
    mods["monailabel.interfaces.exception"].MONAILabelException = MONAILabelException
    mods["monailabel.interfaces.tasks.infer_v2"].InferType = InferType
    mods["monailabel.tasks.infer.basic_infer"].BasicInferTask = BasicInferTask
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)
    spec = importlib.util.spec_from_file_location("gamverify_app_main", APP_DIR / "main.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, HTTPException, MONAILabelException


def test_shipped_app_serves_bundles_with_conf(tmp_path, monkeypatch):
    from monai_gamverify.io import save_nifti

    main, http, mlexc = _load_app_module(monkeypatch)
    app_dir = tmp_path / "app"
    _tiny_bundle(app_dir / "model" / "sos_staging")
    with pytest.raises(mlexc, match="does not fit|does not load|sos_staging"):  # trained with small_cnn: no overrides
        main.GamverifyApp(str(app_dir), str(tmp_path), {})
    app = main.GamverifyApp(str(app_dir), str(tmp_path), {"gamverify_overrides": json.dumps(TINY)})
    assert sorted(app._infers) == ["sos_staging", "sos_staging_predict"]
    assert app._infers["sos_staging_predict"].core is app._infers["sos_staging"].core
    vol = np.random.default_rng(0).normal(size=(20, 22, 18)).astype(np.float32)
    img = save_nifti(vol, tmp_path / "case_1.nii.gz", reference=np.diag([1.5, 1.25, 2.0, 1.0]))
    app._store.images["case_1"] = str(img)
    res = app.infer({"model": "sos_staging", "image": "case_1"})
    assert Path(res["file"]).is_file() and res["params"]["cam"]["path"] is None
    assert res["params"]["label"] == app.infer({"model": "sos_staging_predict", "image": "case_1"})["params"]["label"]
    Path(res["file"]).unlink()
    for request, status, text in (
        ({"model": "nope", "image": "case_1"}, 404, "unknown model 'nope'"),
        ({"model": "sos_staging", "image": "case_9"}, 404, "image 'case_9' not found in the datastore"),
        ({"model": "", "image": "case_1"}, 400, "no model"),
    ):
        with pytest.raises(http) as err:
            app.infer(request)
        assert err.value.status_code == status and text in err.value.detail and isinstance(err.value, mlexc)


# ------------------------------------------------------------------------------------------------ with the SDK
def _load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", REPO / "examples" / name / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@needs_pydicom
def test_dicom_app_with_sdk(tmp_path):
    """The shipped DICOM example app in a real Holoscan run: the map carries the series' affine (non-square pixels),
    the SDK's default model layout is accepted, and an SR-only study stops with a message naming what it holds."""
    pytest.importorskip("monai.deploy.core")
    app_mod = _load_example("deploy_dicom_app")
    files, _ = write_series(tmp_path / "study", spacing=(1.5, 1.0))
    model = tmp_path / "model" / "models" / "sos_staging"  # the SDK's default layout
    _tiny_bundle(model)
    opts, rest = parse_app_options(
        ["-i", str(tmp_path / "study"), "-o", str(tmp_path / "out"), "-m", str(tmp_path / "model"),
         "--overrides", json.dumps(TINY), "--device", "cpu"],
        dicom=True,
    )  # fmt: skip
    app_mod.GamverifyDicomApp([sys.executable, "app.py", *rest], gamverify_options=opts).run()
    uid = pydicom.dcmread(str(files[0])).SeriesInstanceUID
    cam = nib.load(str(tmp_path / "out" / f"{uid}_cam.nii.gz"))
    expected = dicom_affine([pydicom.dcmread(str(f)) for f in files])  # = ITK's (test_dicom_affine_matches_itk)
    np.testing.assert_allclose(cam.affine, expected, atol=1e-4)
    assert cam.shape == (16, 12, 10)
    record = json.loads((tmp_path / "out" / f"{uid}_gamverify.json").read_text())
    assert record["dicom"]["Modality"] == "CT" and record["verdict"] == "unverified"

    sr = tmp_path / "sr_study"
    sr.mkdir()
    ds = pydicom.dcmread(str(files[0]))
    for key in ("PixelData", "Rows", "Columns", "ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing"):
        delattr(ds, key)
    ds.Modality, ds.SeriesDescription = "SR", "Dose report"
    ds.SeriesInstanceUID = ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(str(sr / "sr.dcm"), enforce_file_format=True)
    opts, rest = parse_app_options(
        ["-i", str(sr), "-o", str(tmp_path / "out2"), "-m", str(tmp_path / "model"), "--overrides", json.dumps(TINY)],
        dicom=True,
    )
    with pytest.raises(Exception, match="no series matches"):
        app_mod.GamverifyDicomApp([sys.executable, "app.py", *rest], gamverify_options=opts).run()

    # weights are checked before the study is read: a bundle without weights fails in compose
    (model / "models" / "model.pt").unlink()
    opts, rest = parse_app_options(["-i", str(tmp_path / "study"), "-o", str(tmp_path / "o3"), "-m", str(model)])
    with pytest.raises(FileNotFoundError, match="model.pt"):
        app_mod.GamverifyDicomApp([sys.executable, "app.py", *rest], gamverify_options=opts).run()
